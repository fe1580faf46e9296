"""Every stateful piece follows one protocol (docs/conventions.md, rule 2).

For each piece a small "world" (a model, an optimizer, the piece, seeded data) is run

* uninterrupted for ``2k`` steps, and
* for ``k`` steps, saved with ``torch.save`` (the piece's ``state_dict()`` beside the model's
  and the optimizer's), loaded with ``torch.load(weights_only=True)`` into a freshly built
  world, and continued for ``k`` steps;

the two must end identical (the model's weights and the piece's state). Then every key of
the piece's state is dropped, replaced by a value of the wrong type and by a value out of
range: ``load_state_dict`` must raise (``TypeError``/``ValueError``) and leave the piece
exactly as it was.

A world is a class with ``build(seed)`` (classmethod), ``piece`` (the stateful object),
``advance(i)`` (one step of the loop, which advances the piece), ``save()`` / ``load(blob)``
(everything a checkpoint holds) and ``observe()`` (what must match after resuming). Add a
world for each new stateful piece to ``WORLDS``. A piece whose counter is not ``num_steps``
(``NormalEquations.count`` counts samples) sets ``counter`` and ``counter_per_step``; a
world may drop a generated bad value that is valid for its piece (``bad_values``).
"""

from __future__ import annotations

import io
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from tests.badcalls import assert_same, snapshot
from torch_recal import (
    Budget,
    CoherentStrongReg,
    DescentGate,
    NormalEquations,
    RandomLayerTraining,
    RifleScheduler,
)

WORLDS: list[Any] = []  # one section per piece below; the generic tests are at the end


def _roundtrip(blob: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class World:
    """Shared plumbing: subclasses set ``piece`` and implement ``build`` and ``advance``."""

    steps: ClassVar[int] = 3  # k
    counter: ClassVar[str] = "num_steps"  # the piece's counter (attribute and state key)
    counter_per_step: ClassVar[int] = 1  # how much one advance() adds to it
    optional_keys: ClassVar[tuple[str, ...]] = ()  # keys an older state lacks (may be dropped)
    piece: Any
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None

    def save(self) -> dict[str, Any]:
        blob: dict[str, Any] = {"piece": self.piece.state_dict()}
        if self.model is not None:
            blob["model"] = self.model.state_dict()
        if self.optimizer is not None:
            blob["optimizer"] = self.optimizer.state_dict()
        return blob

    def load(self, blob: dict[str, Any]) -> None:
        if self.model is not None:
            self.model.load_state_dict(blob["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(blob["optimizer"])
        self.piece.load_state_dict(blob["piece"])

    def observe(self) -> Any:
        return snapshot([self.model, self.piece] if self.model is not None else self.piece)

    @classmethod
    def bad_values(cls, key: str, value: Any) -> list[Any]:
        """Values of the wrong type or out of range for the state entry ``key``."""
        return _bad_values(value)


def _bad_values(value: Any) -> list[Any]:
    """Values of the wrong type or out of range for one state entry."""
    out: list[Any] = ["x", None]
    if isinstance(value, bool):
        out += [2, "no"]
    elif isinstance(value, int):
        out += [-7, 1.5]
    elif isinstance(value, float):
        out += [float("nan"), float("inf"), -1.0]
    elif isinstance(value, torch.Tensor):
        out += [value.new_full((3, 1), float("nan")) if value.is_floating_point() else
                value.new_zeros((3, 1)), value.reshape(-1)[:1].clone() if value.numel() > 1
                else value.new_zeros(5)]  # fmt: skip
        if value.is_floating_point() and value.numel():
            nan = value.clone()
            nan.view(-1)[0] = float("nan")
            out.append(nan)
    elif isinstance(value, (list, tuple)):
        out += [5, [object()]]
    elif isinstance(value, dict):
        out += [5, {"unknown": 1}]
    return out


# --------------------------------------------------------------------------- CoherentStrongReg
class CoherentStrongRegWorld(World):
    """Attached to the optimizer; the automatic warm-up starts within the first k steps,
    so every field of the state is set when it is saved (the next-batch progress of the
    last step is pending: ``last_step`` holds tensors)."""

    steps = 8
    optional_keys = (
        "measured_step",
        "measured_cost",
        "measured_applied",
        "last_step",
        "budget_limits",
        "budget_target",
        "criterion",  # a state saved before the criterion's name was recorded lacks it
    )

    @classmethod
    def build(cls, seed: int) -> CoherentStrongRegWorld:
        torch.manual_seed(seed)
        world = cls()
        world.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        world.optimizer = torch.optim.SGD(world.model.parameters(), lr=0.5)
        world.piece = CoherentStrongReg(
            world.model.named_parameters(), strength=0.05, optimizer=world.optimizer, smoothing=0.0
        )
        world.piece.attach()
        return world

    def advance(self, i: int) -> None:
        assert self.model is not None and self.optimizer is not None
        _train_step(self.model, self.optimizer, i)
        if i == self.steps - 1:  # constant lr: the zero pattern is never frozen
            state = self.piece.state_dict()
            assert all(v is not None for k, v in state.items()
                       if k != "frozen_at" and not k.startswith("budget"))  # fmt: skip
            assert len(state["last_step"]) == 2  # the next-batch measurement is pending

    @classmethod
    def bad_values(cls, key: str, value: Any) -> list[Any]:
        if key == "peak_lr":  # None (no learning rate seen yet) is valid; <= 0 is not
            return ["x", float("nan"), float("inf"), 0.0, -0.5]
        if key == "frozen_at":  # None (not frozen) is valid; a step not yet taken is not
            return ["x", -7, 1.5, 10**6]
        if key == "budget_limits":  # None (no budget, or not yet marked) is valid
            return ["x", 5, [float("nan")] * len(value or [0]), ["a"] * len(value or [0])]
        if key == "budget_target":
            return ["x", float("nan"), 2.0, -0.5]
        if key == "measured_cost" and value is None:  # nothing pending: a cost alone is wrong
            return ["x", float("nan"), 0.5]
        if key == "measured_step":  # None goes with last_step None; a later step is wrong
            return ["x", -7, 1.5, 10**6]
        if key == "last_step" and value is None:  # nothing pending: a change of no step
            return [5, "x", [torch.zeros(16, 4), torch.zeros(3, 16)]]
        if key == "last_step":  # None is valid (nothing pending) only with measured_step None
            return [5, "x", [value[0]], [value[0], value[1].T], [value[0], value[1] * float("nan")]]
        if isinstance(value, float):  # the averages may be negative: only non-finite is wrong
            return ["x", None, float("nan"), float("inf")]
        return _bad_values(value)


class FrozenCoherentWorld(CoherentStrongRegWorld):
    """The learning rate drops to a twentieth after step 5: the zero pattern is frozen
    before the save, and the resumed run keeps it (the gate measures with the same batch,
    so that the take-off comes before the freeze)."""

    @classmethod
    def build(cls, seed: int) -> FrozenCoherentWorld:
        torch.manual_seed(seed)
        world = cls()
        world.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        world.optimizer = torch.optim.SGD(world.model.parameters(), lr=0.5)
        gate = DescentGate(progress="same-batch", smoothing=0.0)
        world.piece = CoherentStrongReg(
            world.model.named_parameters(), strength=0.05, optimizer=world.optimizer,
            criterion=gate,
        )  # fmt: skip
        world.piece.attach()
        return world

    def advance(self, i: int) -> None:
        assert self.model is not None and self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = 0.5 if i < 6 else 0.025
        _train_step(self.model, self.optimizer, i)
        if i == self.steps - 1:
            state = self.piece.state_dict()
            assert all(
                v is not None
                for k, v in state.items()
                if not k.startswith(("measured", "last", "budget"))
            )
            assert self.piece.frozen and state["frozen_at"] == 6


class BudgetCoherentWorld(CoherentStrongRegWorld):
    """A budget (total_steps 12, threshold renewed every 2 steps, SGD with momentum): saved
    mid-ramp, the resumed run marks and shrinks the same weights and freezes at step 10."""

    steps = 6

    @classmethod
    def build(cls, seed: int) -> BudgetCoherentWorld:
        torch.manual_seed(seed)
        world = cls()
        world.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        world.optimizer = torch.optim.SGD(world.model.parameters(), lr=0.5, momentum=0.9)
        world.piece = CoherentStrongReg(
            world.model.named_parameters(),
            optimizer=world.optimizer,
            criterion=Budget(0.7, total_steps=12, every=2),
        )
        world.piece.attach()
        return world

    def advance(self, i: int) -> None:
        assert self.model is not None and self.optimizer is not None
        _train_step(self.model, self.optimizer, i)
        if i == self.steps - 1:
            state = self.piece.state_dict()
            assert state["budget_limits"] is not None and 0 < state["budget_target"] < 0.7

    @classmethod
    def bad_values(cls, key: str, value: Any) -> list[Any]:
        if value is None and key in (
            "cost_ema",
            "progress_ema",
            "reference_progress",
            "peak_progress",
            "ramp_start",
            "ramp_length",
        ):
            return ["x"]  # the gate's fields, unused by a budget: None is their valid value
        return super().bad_values(key, value)


WORLDS.extend([CoherentStrongRegWorld, FrozenCoherentWorld, BudgetCoherentWorld])


# --------------------------------------------------------------------------- RifleScheduler
# (S1)
def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


class RifleWorld(World):
    """Six epochs, resets after epochs 1 and 3 (seeded values); the head's momentum is kept."""

    @classmethod
    def build(cls, seed: int) -> RifleWorld:
        torch.manual_seed(seed)
        world = cls()
        world.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        world.optimizer = torch.optim.SGD(world.model.parameters(), lr=0.1, momentum=0.9)
        world.piece = RifleScheduler(world.model[2], total_epochs=6, num_resets=2, seed=7)
        return world

    def advance(self, i: int) -> None:
        assert self.model is not None and self.optimizer is not None
        _train_step(self.model, self.optimizer, i)
        self.piece.step()


WORLDS.append(RifleWorld)


# --------------------------------------------------------------------------- RandomLayerTraining
# (S1)
class RandomLayerTrainingWorld(World):
    """Four hidden layers, a fraction schedule longer than the run; SGD with momentum."""

    @classmethod
    def build(cls, seed: int) -> RandomLayerTrainingWorld:
        torch.manual_seed(seed)
        world = cls()
        layers = [nn.Linear(4, 4) for _ in range(4)]
        world.model = nn.Sequential(*layers, nn.Linear(4, 3))
        world.optimizer = torch.optim.SGD(world.model.parameters(), lr=0.1, momentum=0.9)
        schedule = [1.0, 0.75, 0.5, 0.5, 0.25, 0.25, 0.25]
        world.piece = RandomLayerTraining(layers, seed=5, schedule=schedule)
        return world

    def advance(self, i: int) -> None:
        assert self.model is not None and self.optimizer is not None
        _train_step(self.model, self.optimizer, i)
        self.piece.step()

    @classmethod
    def bad_values(cls, key: str, value: Any) -> list[Any]:
        # the epoch counter has no upper bound (training may go on past the schedule)
        return [v for v in super().bad_values(key, value) if key != "num_steps" or v != 10**12]


WORLDS.append(RandomLayerTrainingWorld)


# --------------------------------------------------------------------------- NormalEquations
# (S1)
class NormalEquationsWorld(World):
    """Batches of 5 samples (features with a large mean) into a (4 -> 2) accumulator."""

    counter = "count"
    counter_per_step = 5

    @classmethod
    def build(cls, seed: int) -> NormalEquationsWorld:
        world = cls()
        world.piece = NormalEquations(4, 2)
        return world

    def advance(self, i: int) -> None:
        g = torch.Generator().manual_seed(200 + i)
        h = torch.randn(5, 4, generator=g, dtype=torch.float64) + 10.0
        self.piece.update(h, torch.randn(5, 2, generator=g, dtype=torch.float64))

    @classmethod
    def bad_values(cls, key: str, value: Any) -> list[Any]:
        # any number of samples is a valid count
        return [v for v in super().bad_values(key, value) if key != "count" or v != 10**12]


WORLDS.append(NormalEquationsWorld)


# --------------------------------------------------------------------------- GenerativeGradientLoss
# (S2)
class GenerativeGradientLossWorld(World):
    """A tiny conv net refined with CE + GGR: a decoder reference, ``ema=0.5``, ``every=2``
    (applied on steps 0, 2, 4: the resumed half starts between two applied steps)."""

    @classmethod
    def build(cls, seed: int) -> GenerativeGradientLossWorld:
        from torch_recal import GenerativeGradientLoss, ReferenceDecoder

        world = cls()
        world.seed = seed
        torch.manual_seed(seed)
        world.model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
            torch.nn.Linear(3 * 6 * 6, 3),
        )  # fmt: skip
        decoder = ReferenceDecoder.for_layer(world.model[0])  # seeded: the same in every build
        world.optimizer = torch.optim.SGD(world.model.parameters(), lr=0.1, momentum=0.9)
        world.piece = GenerativeGradientLoss(
            world.model[0].weight, decoder, weight=1.0, ema=0.5, every=2
        )
        return world

    def advance(self, i: int) -> None:
        g = torch.Generator().manual_seed(1000 * self.seed + i)
        x, y = torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        loss = loss + self.piece(loss, x)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


WORLDS.append(GenerativeGradientLossWorld)


# --------------------------------------------------------------------------- the protocol
def _ids(worlds: list[Any]) -> list[str]:
    return [w.__name__.removesuffix("World") for w in worlds]


@pytest.fixture(params=WORLDS, ids=_ids(WORLDS))
def world_cls(request: pytest.FixtureRequest) -> Any:
    return request.param


def test_resume_equals_uninterrupted_run(world_cls: Any) -> None:
    k = world_cls.steps
    straight = world_cls.build(seed=0)
    for i in range(2 * k):
        straight.advance(i)
    first = world_cls.build(seed=0)
    for i in range(k):
        first.advance(i)
    blob = _roundtrip(first.save())
    resumed = world_cls.build(seed=0)
    resumed.load(blob)
    for i in range(k, 2 * k):
        resumed.advance(i)
    assert_same(straight.observe(), resumed.observe())


def test_counter_is_num_steps(world_cls: Any) -> None:
    world = world_cls.build(seed=0)
    name, expected = world_cls.counter, world_cls.steps * world_cls.counter_per_step
    assert getattr(world.piece, name) == 0
    for i in range(world_cls.steps):
        world.advance(i)
    assert getattr(world.piece, name) == expected
    assert world.piece.state_dict()[name] == expected


def test_load_state_dict_rejects_bad_state_and_changes_nothing(world_cls: Any) -> None:
    world = world_cls.build(seed=0)
    for i in range(world_cls.steps):
        world.advance(i)
    good = world.piece.state_dict()
    before = snapshot(world.piece)
    bad_states: list[Any] = [None, 5, [], {**good, "unexpected": 1}]
    bad_states += [
        {k: v for k, v in good.items() if k != key}
        for key in good
        if key not in world_cls.optional_keys
    ]
    bad_states += [
        {**good, key: bad} for key in good for bad in world_cls.bad_values(key, good[key])
    ]
    for bad in bad_states:
        with pytest.raises((TypeError, ValueError)):
            world.piece.load_state_dict(bad)
        assert_same(before, snapshot(world.piece), f"after load_state_dict({bad!r:.200})")
    world.piece.load_state_dict(_roundtrip({"s": good})["s"])  # the good state still loads
    assert_same(before, snapshot(world.piece))

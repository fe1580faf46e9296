"""RandomLayerTraining: the fast-retraining paper's "random learning strategy".

Each epoch only a random part of the conv layers (or blocks) is trainable, so backward stops
early and costs less.

Paper: Wu, Zhang, Yang, "Deep Networks with Fast Retraining", https://arxiv.org/abs/2008.07387
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torch_recal import _dist
from torch_recal._checks import check_int, check_optional_int, check_real, check_state_keys

__all__ = ["RandomLayerTraining"]


def _check_schedule(schedule: Any, who: str) -> list[float] | None:
    """``None`` or a non-empty sequence of fractions in ``[0, 1]`` (as a list of floats)."""
    if schedule is None:
        return None
    if isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Iterable):
        raise TypeError(
            f"{who}: `schedule` must be a sequence of fractions in [0, 1] or None, "
            f"got {type(schedule).__name__}"
        )
    rates = [
        check_real(r, f"schedule[{i}]", who=who, minimum=0, maximum=1)
        for i, r in enumerate(schedule)
    ]
    if not rates:
        raise ValueError(f"{who}: `schedule` must hold at least one fraction, got an empty one")
    return rates


class RandomLayerTraining:
    """The paper's random learning strategy: each epoch only some conv layers are trained.

    ``layers`` are the candidate conv layers or blocks, first to last. The choice for the
    current epoch is applied at construction and by every :meth:`step` (call it once after
    each epoch, i.e. before the next epoch's training): frozen layers get
    ``requires_grad=False`` so backward stops early and costs less. Parameters that were
    already frozen at construction stay frozen. Two rules:

    * ``schedule=None``: a uniformly random number ``m`` in ``[min_trainable, n]`` of the
      *last* layers is trainable (backward stops before the first of them).
    * ``schedule=[r_0, r_1, ...]``: the authors' pipeline: in epoch ``e`` a uniformly random
      subset of ``round((1 - r_e) * n)`` layers is frozen (at least ``min_trainable`` stay
      trainable). The paper's ResNet-50 schedule is ``[1, 1, .75, .75, .5, .5, .25, .25]``
      (:attr:`PAPER_SCHEDULE`). :meth:`step` may be called ``len(schedule)`` times (once
      after each epoch of the schedule); a later call warns once (``UserWarning``) and keeps
      the schedule's last fraction, drawing a new subset each epoch.

    The draw for epoch ``e`` is a pure function of ``(seed, e)``, so it is identical on all
    ranks (with ``seed=None`` a seed is drawn on rank 0 and broadcast) and a resumed run
    (:meth:`load_state_dict`) repeats an uninterrupted one. Under DDP, build the wrapper with
    ``find_unused_parameters=True`` or re-create it when the trainable set changes.

    State (docs/conventions.md, rule 2): :meth:`step` advances; the counter is
    :attr:`num_steps`, the number of completed :meth:`step` calls (= the current epoch);
    :attr:`epoch` is a read-only alias of it.

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387

    Args:
        layers: the candidate modules, in forward order (a list, ``nn.ModuleList`` or
            ``nn.Sequential``).
        min_trainable: the fewest layers that are trainable in any epoch (``0 ... n``).
        seed: seed (an int >= 0) of the per-epoch draws; ``None`` draws one on rank 0.
        schedule: per-epoch fraction of layers trained (see above), or ``None``.

    Attributes:
        num_steps: completed :meth:`step` calls, i.e. the epoch whose draw is applied.
        trainable: which layers are trainable in the current epoch.

    Example:
        >>> from torch import nn
        >>> from torch_recal import RandomLayerTraining
        >>> convs = [nn.Conv2d(3, 3, 3) for _ in range(4)]
        >>> rlt = RandomLayerTraining(convs, seed=0, schedule=[1.0, 0.5])
        >>> rlt.trainable
        [True, True, True, True]
        >>> rlt.step()
        >>> rlt.num_steps, sum(rlt.trainable)
        (1, 2)
        >>> sum(p.requires_grad for c in convs for p in c.parameters())  # weight and bias of 2
        4
        >>> rlt.restore()
        >>> all(p.requires_grad for c in convs for p in c.parameters())
        True
    """

    PAPER_SCHEDULE: tuple[float, ...] = (1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25)

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        min_trainable: int = 1,
        seed: int | None = None,
        schedule: Sequence[float] | None = None,
    ) -> None:
        who = "RandomLayerTraining"
        if isinstance(layers, nn.Module) and not isinstance(layers, (nn.Sequential, nn.ModuleList)):
            raise TypeError(
                f"{who}: `layers` must be a sequence of modules (a list, nn.ModuleList or "
                f"nn.Sequential), got a single {type(layers).__name__}"
            )
        if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
            raise TypeError(
                f"{who}: `layers` must be a sequence of modules (a list, nn.ModuleList or "
                f"nn.Sequential), got {type(layers).__name__}"
            )
        layers = list(layers)
        wrong = sorted({type(m).__name__ for m in layers if not isinstance(m, nn.Module)})
        if wrong:
            raise TypeError(f"{who}: every item of `layers` must be an nn.Module, got {wrong}")
        if not layers:
            raise ValueError(f"{who}: `layers` must hold at least one module, got an empty one")
        n = len(layers)
        min_trainable = check_int(min_trainable, "min_trainable", who=who, minimum=0, maximum=n)
        seed = check_optional_int(seed, "seed", who=who, minimum=0)
        rates = _check_schedule(schedule, who)
        self._seed_given = seed is not None
        if seed is None:  # drawn after every check: an error leaves the global RNG alone
            drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
            _dist.broadcast_(drawn, src=0)
            seed = int(drawn.item())
        self.layers = layers
        self.min_trainable = min_trainable
        self.seed = seed
        self.schedule = rates
        self.num_steps = 0
        self._warned_past_end = False
        self._originally_trainable = [[p.requires_grad for p in m.parameters()] for m in layers]
        self.trainable: list[bool] = []
        self._apply()

    @property
    def epoch(self) -> int:
        """Read-only alias of :attr:`num_steps` (the epoch whose draw is applied)."""
        return self.num_steps

    def choice(self, epoch: int) -> list[bool]:
        """Which layers are trainable in ``epoch`` (pure function of ``seed`` and ``epoch``)."""
        epoch = check_int(epoch, "epoch", who="RandomLayerTraining.choice", minimum=0)
        n = len(self.layers)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        if self.schedule is None:
            m = int(torch.randint(self.min_trainable, n + 1, (1,), generator=g).item())
            return [i >= n - m for i in range(n)]
        rate = self.schedule[min(epoch, len(self.schedule) - 1)]
        frozen = min(round((1.0 - rate) * n), n - self.min_trainable)
        perm = torch.randperm(n, generator=g)[:frozen].tolist()
        return [i not in perm for i in range(n)]

    def _apply(self) -> None:
        self.trainable = self.choice(self.num_steps)
        for module, on, orig in zip(
            self.layers, self.trainable, self._originally_trainable, strict=True
        ):
            for p, was in zip(module.parameters(), orig, strict=True):
                p.requires_grad_(bool(on and was))

    def step(self) -> None:
        """Advance to the next epoch and apply its draw (warns once past the schedule)."""
        if (
            self.schedule is not None
            and self.num_steps >= len(self.schedule)
            and not self._warned_past_end
        ):
            warnings.warn(
                f"RandomLayerTraining: step() called {self.num_steps + 1} times, more than the "
                f"{len(self.schedule)} epochs of `schedule`; its last fraction "
                f"({self.schedule[-1]:g}) is kept for every later epoch",
                UserWarning,
                stacklevel=2,
            )
            self._warned_past_end = True
        self.num_steps += 1
        self._apply()

    def restore(self) -> None:
        """Give every parameter back the ``requires_grad`` it had at construction."""
        for module, orig in zip(self.layers, self._originally_trainable, strict=True):
            for p, was in zip(module.parameters(), orig, strict=True):
                p.requires_grad_(was)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: ``num_steps``, ``seed``, and the configuration ``min_trainable``
        and ``schedule`` (checked on load)."""
        return {
            "num_steps": self.num_steps,
            "seed": self.seed,
            "min_trainable": self.min_trainable,
            "schedule": None if self.schedule is None else list(self.schedule),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and re-apply that epoch's choice.

        Checks first, assigns after: ``num_steps`` and ``seed`` must be ints >= 0,
        ``min_trainable`` and ``schedule`` must pass the constructor's checks and equal this
        object's, and so must ``seed`` when the constructor was given one (a drawn seed is
        replaced by the checkpoint's). A bad or partial state raises and changes nothing.
        """
        who = "RandomLayerTraining.load_state_dict"
        check_state_keys(state, ("num_steps", "seed", "min_trainable", "schedule"), who=who)
        num_steps = check_int(state["num_steps"], "num_steps", who=who, minimum=0)
        seed = check_int(state["seed"], "seed", who=who, minimum=0)
        n = len(self.layers)
        min_trainable = check_int(
            state["min_trainable"], "min_trainable", who=who, minimum=0, maximum=n
        )
        schedule = _check_schedule(state["schedule"], who)
        for name, theirs, mine in (
            ("min_trainable", min_trainable, self.min_trainable),
            ("schedule", schedule, self.schedule),
            ("seed", seed, self.seed if self._seed_given else seed),
        ):
            if theirs != mine:
                raise ValueError(
                    f"{who}: the checkpoint has `{name}`={theirs!r}, this object {mine!r}; "
                    f"build it with the run's original arguments"
                )
        self.num_steps = num_steps
        self.seed = seed
        self._apply()

    def __repr__(self) -> str:
        return (
            f"RandomLayerTraining(layers={len(self.layers)}, num_steps={self.num_steps}, "
            f"trainable={sum(self.trainable)})"
        )

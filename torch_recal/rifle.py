"""RifleScheduler: periodic re-initialisation of the classifier head during fine-tuning (RIFLE).

Paper: Li et al., "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, https://arxiv.org/abs/2007.03349
(official code: https://github.com/lixingjian/RIFLE, ``train.py``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from torch_recal import _dist
from torch_recal._checks import (
    check_choice,
    check_flag,
    check_instance,
    check_int,
    check_optional_int,
    check_state_keys,
)
from torch_recal.heads import (
    _HEAD_NAMES,
    _has_own_parameters,
    _tied_elsewhere,
    _unwrap,
    find_classifier,
)

__all__ = ["RifleScheduler", "find_classifier"]

_log = logging.getLogger("torch_recal")
_WHO = "RifleScheduler"
_UNITS = ("epoch", "step")
_STATE_KEYS = ("num_steps", "last_reset", "schedule", "total_epochs", "unit", "seed")
_MASK64 = (1 << 64) - 1


def _reset_roots(module: nn.Module) -> list[nn.Module]:
    """Outermost modules that define ``reset_parameters`` (their children are left to them)."""
    if callable(getattr(module, "reset_parameters", None)):
        return [module]
    roots: list[nn.Module] = []
    for child in module.children():
        roots.extend(_reset_roots(child))
    return roots


def _derive_seed(seed: int, index: int) -> int:
    """A 64-bit seed for the ``index``-th reset (a fixed formula, stable across versions)."""
    return (seed * 6364136223846793005 + (index + 1) * 1442695040888963407) & _MASK64


@contextmanager
def _seeded_rng(seed: int, devices: set[torch.device]) -> Iterator[None]:
    """Seed the CPU generator and the generators of ``devices``; restore all of them after."""
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.default_generator.manual_seed(seed)
        for device_type in sorted({d.type for d in devices} - {"cpu", "meta"}):
            indices = sorted({d.index or 0 for d in devices if d.type == device_type})
            stack.enter_context(torch.random.fork_rng(devices=indices, device_type=device_type))
            module = getattr(torch, device_type)
            generators = getattr(module, "default_generators", None)
            if generators is not None:
                for i in indices:
                    generators[i].manual_seed(seed)
            else:  # e.g. mps: one generator
                module.manual_seed(seed)
        yield


class RifleScheduler:
    """Re-initialise the classifier head a few times during fine-tuning (RIFLE).

    Fine-tuning a pretrained network on a new task trains mostly the new head: the backbone's
    gradients are small once the head fits. RIFLE re-initialises the final fully-connected
    layer at fixed points, so that large gradients flow back into the deep layers again; the
    last re-initialisation leaves enough epochs for the head to converge. Only the head is
    touched: the backbone, the learning-rate schedule and (by default) the optimizer state
    stay as they are.

    Call :meth:`step` once after every epoch (or every optimizer step with ``unit="step"``),
    on every rank. With ``num_resets=n`` the run is cut into ``n + 1`` periods of
    ``P = total_epochs // (n + 1)`` epochs and the head is re-initialised after epochs
    ``P - 1, 2P - 1, ..., nP - 1`` (0-based), as in the official code, which also fires after
    the very last epoch: this class never does. With ``period=P`` it fires after every ``P``
    epochs as long as at least ``min_epochs_after_last`` epochs remain. :meth:`schedule`
    lists the epochs. :meth:`step` called more than ``total_epochs`` times warns once
    (``UserWarning``) and does nothing more. Each reset is logged at ``INFO`` on
    ``logging.getLogger("torch_recal")``.

    A head whose parameters are tied to another module (e.g. an output layer sharing the
    embedding's weight) cannot be re-initialised alone: given the model, the constructor
    raises a ``ValueError`` naming both parameters. Given only the head (or a list), the
    scheduler cannot see the other modules, so pass the model when weights may be tied.

    State (docs/conventions.md, rule 2): :meth:`step` advances; the counter is
    :attr:`num_steps`, the number of completed :meth:`step` calls (at most ``total_epochs``);
    :attr:`last_epoch` is the read-only alias ``num_steps - 1`` of ``torch.optim``'s
    schedulers.

    Paper: Li et al., https://arxiv.org/abs/2007.03349

    Args:
        target: a whole model, whose head :func:`find_classifier` picks (used whenever the
            module has ``get_classifier()``, ``fc``, ``classifier`` or ``head``); the head
            itself (a layer with parameters, e.g. ``model.fc``); or a list of modules that
            form the head (always taken as given).
        total_epochs: the number of epochs (``unit="step"``: optimizer steps) of the run,
            i.e. how many times :meth:`step` will be called.
        num_resets: how many re-initialisations (the official code's ``fc_reinit_times``;
            its experiments use 1). ``0`` disables RIFLE. Give this or ``period``.
        period: re-initialise every ``period`` epochs instead. Give this or ``num_resets``.
        unit: ``"epoch"`` or ``"step"``: what one :meth:`step` call stands for; every count
            (``total_epochs``, ``period``, :meth:`schedule`) is in this unit.
        init: ``init(head)`` re-initialises the head in place (e.g. He-normal, as the
            authors' Paddle port). Default: the ``reset_parameters()`` of the outermost
            modules of the head that define one (PyTorch's default ``nn.Linear`` init).
        optimizer: the optimizer holding the head's parameters; only used with
            ``reset_optimizer_state=True``.
        reset_optimizer_state: also drop the optimizer state (momentum, Adam moments and
            step count) of the head's parameters, and only theirs, at each reset. The official
            code keeps it (``False``).
        seed: make the re-initialised values deterministic: the ``k``-th reset draws from
            generators seeded with a value derived from ``(seed, k)``, so a resumed run
            re-creates the same values, and the global RNG state is left untouched.
            Default: the global RNG (as the official code).
        min_epochs_after_last: the least number of epochs that must follow the last reset.
            Default: one full period. With ``num_resets``, a schedule that leaves fewer is
            an error; with ``period``, resets that would leave fewer are dropped (the
            authors' Paddle port is ``period=total_epochs // c, min_epochs_after_last=4``).

    Attributes:
        head: the module that is re-initialised (an ``nn.ModuleList`` for a list target).
        num_steps: completed :meth:`step` calls (epochs, or steps with ``unit="step"``).
        last_reset: epoch after which the head was last re-initialised, or ``None``.

    Distributed: the reset is deterministic in the epoch, so every rank fires at the same
    :meth:`step`; the new head (parameters and buffers) is then broadcast from rank 0, so it
    is identical on every rank even without ``seed`` (or with a different seed per rank).
    FSDP2 (``fully_shard``): a sharded head is re-initialised at full size (the same values
    as unsharded, for a given ``seed``) and each rank keeps its slice. Pass the model (or
    call ``model.reshard()`` before :meth:`step`): after a ``no_grad`` forward FSDP2 keeps
    the root's parameters gathered, and the scheduler reshards the model it was given.

    Example:
        >>> import torch
        >>> from torch_recal import RifleScheduler
        >>> from torch_recal.models import resnet20
        >>> model = resnet20(num_classes=5)
        >>> rifle = RifleScheduler(model, total_epochs=12, num_resets=2, seed=0)
        >>> rifle.schedule()
        [3, 7]
        >>> fired = [rifle.step() for epoch in range(12)]  # after each epoch's training
        >>> [e for e, f in enumerate(fired) if f], rifle.last_reset
        ([3, 7], 7)
        >>> round(rifle.head_lr_factor(4), 3)  # cyclic head lr: restarts after each reset
        1.0
    """

    def __init__(
        self,
        target: nn.Module | Sequence[nn.Module],
        *,
        total_epochs: int,
        num_resets: int | None = None,
        period: int | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        init: Callable[[nn.Module], Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        reset_optimizer_state: bool = False,
        seed: int | None = None,
        min_epochs_after_last: int | None = None,
    ) -> None:
        head = self._resolve_head(target)
        total_epochs = check_int(total_epochs, "total_epochs", who=_WHO, minimum=1)
        if (num_resets is None) == (period is None):
            raise ValueError(
                f"{_WHO}: give exactly one of `num_resets` (how many re-initialisations) "
                f"or `period` (epochs between them), got num_resets={num_resets!r}, "
                f"period={period!r}"
            )
        unit = check_choice(unit, "unit", _UNITS, who=_WHO)  # type: ignore[assignment]
        min_epochs_after_last = check_optional_int(
            min_epochs_after_last, "min_epochs_after_last", who=_WHO, minimum=1
        )
        seed = check_optional_int(seed, "seed", who=_WHO, minimum=0)
        if init is not None and not callable(init):
            raise TypeError(f"{_WHO}: `init` must be callable or None, got {type(init).__name__}")
        reset_optimizer_state = check_flag(reset_optimizer_state, "reset_optimizer_state", who=_WHO)
        params = list(head.parameters())
        if not params:
            raise ValueError(
                f"{_WHO}: the head ({type(head).__name__}) of `target` has no parameters; pass "
                f"the classifier layer, e.g. RifleScheduler(model.fc, ...)"
            )
        if isinstance(target, nn.Module) and (tied := _tied_elsewhere(_unwrap(target), head)):
            mine, other = tied[0]
            raise ValueError(
                f"{_WHO}: the head's parameter `{mine}` is also `{other}` of `target` (tied "
                f"weights); re-initialising the head would reset that module too. Give the "
                f"head its own parameters, or do not use RIFLE on this head"
            )
        if init is None:
            covered = {id(p) for root in _reset_roots(head) for p in root.parameters()}
            missing = [n for n, p in head.named_parameters() if id(p) not in covered]
            if missing:
                raise ValueError(
                    f"{_WHO}: head parameters {missing} are not reset by any "
                    f"reset_parameters() of the head; pass `init=` (a function that "
                    f"re-initialises the head in place)"
                )
        if optimizer is not None:
            check_instance(optimizer, "optimizer", torch.optim.Optimizer, who=_WHO,
                           what="a torch.optim.Optimizer or None")  # fmt: skip
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(p) in held for p in params):
                raise ValueError(
                    f"{_WHO}: `optimizer` holds none of the head's parameters; pass the "
                    "optimizer that trains the head"
                )
        elif reset_optimizer_state:
            raise ValueError(
                f"{_WHO}: `reset_optimizer_state=True` needs `optimizer=` (the optimizer "
                "that trains the head)"
            )
        if num_resets is not None:
            schedule = self._schedule_from_resets(total_epochs, num_resets, min_epochs_after_last)
        else:
            schedule = self._schedule_from_period(total_epochs, period, min_epochs_after_last)

        self.head = head
        # FSDP2: the module to reshard before a reset, and whether the head was sharded
        self._fsdp_scope = target if isinstance(target, nn.Module) else None
        if self._fsdp_scope is not None:
            _dist.reshard_fsdp(self._fsdp_scope)
        self._head_sharded = any(_dist.is_dtensor(p) for p in head.parameters())
        self.total_epochs = total_epochs
        self.num_resets = len(schedule)
        self.unit = unit
        self.init = init
        self.optimizer = optimizer
        self.reset_optimizer_state = reset_optimizer_state
        self.seed = seed
        self._schedule = schedule
        self.num_steps = 0
        self.last_reset: int | None = None
        self._warned_past_end = False

    @property
    def last_epoch(self) -> int:
        """Read-only alias: the index of the last epoch passed to :meth:`step`
        (``num_steps - 1``; ``-1`` before the first call), as in ``torch.optim``'s schedulers.
        """
        return self.num_steps - 1

    # ----------------------------------------------------------------------------- set-up
    @staticmethod
    def _resolve_head(target: Any) -> nn.Module:
        if isinstance(target, nn.Module):
            target = _unwrap(target)
            if next(target.parameters(), None) is None:
                raise ValueError(
                    f"{_WHO}: `target` ({type(target).__name__}) has no parameters; pass the "
                    f"classifier layer, e.g. RifleScheduler(model.fc, ...)"
                )
            looks_like_model = callable(getattr(target, "get_classifier", None)) or any(
                isinstance(getattr(target, name, None), nn.Module) for name in _HEAD_NAMES
            )
            if looks_like_model or not _has_own_parameters(target):
                return find_classifier(target)
            return target
        if isinstance(target, (list, tuple)):
            wrong = sorted({type(m).__name__ for m in target if not isinstance(m, nn.Module)})
            if wrong:
                raise TypeError(
                    f"{_WHO}: every item of a `target` list must be a module, got {wrong}"
                )
            if not target:
                raise ValueError(f"{_WHO}: a `target` list must hold at least one module")
            return nn.ModuleList(target)
        raise TypeError(
            f"{_WHO}: `target` must be a module (the head or the model) or a list of modules, "
            f"got {type(target).__name__}"
        )

    @staticmethod
    def _schedule_from_resets(total: int, num_resets: Any, min_after: int | None) -> list[int]:
        num_resets = check_int(num_resets, "num_resets", who=_WHO, minimum=0)
        if num_resets == 0:
            return []
        period = total // (num_resets + 1)
        if period < 1:
            raise ValueError(
                f"{_WHO}: `total_epochs`={total} is too short for `num_resets`={num_resets}: "
                f"the {num_resets + 1} periods need at least {num_resets + 1} epochs"
            )
        schedule = [k * period - 1 for k in range(1, num_resets + 1)]
        remaining = total - 1 - schedule[-1]
        need = period if min_after is None else min_after
        if remaining < need:
            raise ValueError(
                f"{_WHO}: with `total_epochs`={total} and `num_resets`={num_resets} only "
                f"{remaining} epochs follow the last reset, fewer than "
                f"`min_epochs_after_last`={need}; lower num_resets or min_epochs_after_last"
            )
        return schedule

    @staticmethod
    def _schedule_from_period(total: int, period: Any, min_after: int | None) -> list[int]:
        period = check_int(period, "period", who=_WHO, minimum=1)
        need = period if min_after is None else min_after
        schedule = []
        k = 1
        while total - k * period >= need:
            schedule.append(k * period - 1)
            k += 1
        if not schedule:
            raise ValueError(
                f"{_WHO}: `period`={period} leaves no room for a reset in "
                f"`total_epochs`={total} with `min_epochs_after_last`={need} epochs after it; "
                f"use a shorter period"
            )
        return schedule

    # ------------------------------------------------------------------------------ public
    def schedule(self) -> list[int]:
        """The 0-based epochs (or steps) after which :meth:`step` re-initialises the head.

        Example:
            >>> from torch import nn
            >>> from torch_recal import RifleScheduler
            >>> RifleScheduler(nn.Linear(4, 2), total_epochs=40, num_resets=1).schedule()
            [19]
            >>> RifleScheduler(nn.Linear(4, 2), total_epochs=20, period=5).schedule()
            [4, 9, 14]
        """
        return list(self._schedule)

    def step(self) -> bool:
        """Advance one epoch (or step); re-initialise the head if it is due.

        Past ``total_epochs`` calls it warns once (``UserWarning``) and does nothing more.

        Returns:
            ``True`` when the head was re-initialised at this call.
        """
        if self.num_steps >= self.total_epochs:
            if not self._warned_past_end:
                warnings.warn(
                    f"{_WHO}: step() called more than `total_epochs`={self.total_epochs} times; "
                    f"the schedule has ended, the head is not re-initialised again",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned_past_end = True
            return False
        epoch = self.num_steps
        fired = epoch in self._schedule
        if fired:
            index = self._schedule.index(epoch)
            self._reset(index)
            self.last_reset = epoch
            _log.info(
                "RifleScheduler: re-initialised the head (%s) after %s %d (reset %d of %d)",
                type(self.head).__name__,
                self.unit,
                epoch,
                index + 1,
                len(self._schedule),
            )
        self.num_steps = epoch + 1
        return fired

    def head_lr_factor(self, epoch: int) -> float:
        """Cyclic learning-rate factor for the head: a cosine restarted after every reset.

        ``0.5 * (1 + cos(pi * t / L))`` where ``t`` counts the epochs since the start of the
        current period and ``L`` is its length; the official ``fc_lr_util="cyclic"`` option
        (the backbone keeps one cosine over the whole run). Use it with
        ``torch.optim.lr_scheduler.LambdaLR`` on the head's param group.

        Args:
            epoch: 0-based epoch (or step); from ``total_epochs`` on the factor is ``0.0``
                    (the end of the last cosine), so a ``LambdaLR`` stepped once more is harmless.

        Example:
            >>> from torch import nn
            >>> from torch_recal import RifleScheduler
            >>> rifle = RifleScheduler(nn.Linear(4, 2), total_epochs=8, num_resets=1)
            >>> " ".join(f"{rifle.head_lr_factor(e):.3f}" for e in range(9))
            '1.000 0.854 0.500 0.146 1.000 0.854 0.500 0.146 0.000'
        """
        epoch = check_int(epoch, "epoch", who=f"{_WHO}.head_lr_factor", minimum=0)
        start = max([0] + [e + 1 for e in self._schedule if e < epoch])
        end = min([e + 1 for e in self._schedule if e + 1 > start] + [self.total_epochs])
        t = min(epoch - start, end - start)
        return 0.5 * (1.0 + math.cos(math.pi * t / (end - start)))

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (ints, strings, lists): ``num_steps``, ``last_reset`` and, checked
        on load, the configuration ``schedule``, ``total_epochs``, ``unit``, ``seed``."""
        return {
            "num_steps": self.num_steps,
            "last_reset": self.last_reset,
            "schedule": list(self._schedule),
            "total_epochs": self.total_epochs,
            "unit": self.unit,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        Checks first, assigns after: the keys; the types of every entry; the configuration
        (``schedule``, ``total_epochs``, ``unit``, ``seed``) must equal this scheduler's;
        ``num_steps`` must lie in ``[0, total_epochs]`` and ``last_reset`` must be the last
        scheduled epoch before it (``None`` if there is none).

        Raises:
            TypeError: an entry of the wrong type.
            ValueError: missing or unknown keys, another configuration, an inconsistent
                position. Nothing is changed then.
        """
        who = f"{_WHO}.load_state_dict"
        state = check_state_keys(state_dict, _STATE_KEYS, who=who)
        schedule = state["schedule"]
        if not isinstance(schedule, (list, tuple)):
            raise TypeError(
                f"{who}: `schedule` must be a list of ints, got {type(schedule).__name__}"
            )
        theirs = {
            "schedule": [check_int(e, "schedule", who=who, minimum=0) for e in schedule],
            "total_epochs": check_int(state["total_epochs"], "total_epochs", who=who, minimum=1),
            "unit": check_choice(state["unit"], "unit", _UNITS, who=who),
            "seed": check_optional_int(state["seed"], "seed", who=who, minimum=0),
        }
        mine = {"schedule": self._schedule, "total_epochs": self.total_epochs,
                "unit": self.unit, "seed": self.seed}  # fmt: skip
        for key, value in theirs.items():
            if value != mine[key]:
                raise ValueError(
                    f"{who}: the checkpoint has `{key}`={value!r}, this scheduler "
                    f"{mine[key]!r}; build the scheduler with the run's original arguments"
                )
        num_steps = check_int(
            state["num_steps"], "num_steps", who=who, minimum=0, maximum=self.total_epochs
        )
        last_reset = state["last_reset"]
        if last_reset is not None:
            last_reset = check_int(last_reset, "last_reset", who=who, minimum=0)
        expected = max((e for e in self._schedule if e < num_steps), default=None)
        if last_reset != expected:
            raise ValueError(
                f"{who}: `last_reset`={last_reset!r} does not fit `num_steps`={num_steps} "
                f"(the schedule {self._schedule} gives {expected!r})"
            )
        self.num_steps = num_steps
        self.last_reset = last_reset

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(head={type(self.head).__name__}, "
            f"total_epochs={self.total_epochs}, unit={self.unit!r}, schedule={self._schedule}, "
            f"seed={self.seed}, reset_optimizer_state={self.reset_optimizer_state})"
        )

    # ----------------------------------------------------------------------------- reset
    @torch.no_grad()
    def _reset(self, index: int) -> None:
        if self._fsdp_scope is not None:
            _dist.reshard_fsdp(self._fsdp_scope)
        # DTensor (FSDP2) parameters are swapped for full-size copies while re-initialising
        sharded = [
            (mod, name, p)
            for mod in self.head.modules()
            for name, p in mod._parameters.items()
            if p is not None and _dist.is_dtensor(p)
        ]
        if self._head_sharded and not sharded:
            raise RuntimeError(
                "RifleScheduler: the head's parameters were FSDP-sharded when the scheduler was "
                "built and are gathered copies now (FSDP2 keeps the root's parameters gathered "
                "after a no_grad forward); call model.reshard() before step(), or pass the "
                "model itself: RifleScheduler(model, ...)"
            )
        for mod, name, p in sharded:
            mod._parameters[name] = nn.Parameter(
                _dist.full_tensor(p.detach()), requires_grad=p.requires_grad
            )
        try:
            tensors = [*self.head.parameters(), *self.head.buffers()]
            if self.seed is None:
                self._reinit()
            else:
                with _seeded_rng(_derive_seed(self.seed, index), {t.device for t in tensors}):
                    self._reinit()
            _dist.broadcast_(*(t.detach() for t in tensors), src=0)
        finally:
            full = [mod._parameters[name] for mod, name, _ in sharded]
            for mod, name, p in sharded:  # the optimizer and FSDP hold these objects
                mod._parameters[name] = p
        for (_, _, p), value in zip(sharded, full, strict=True):
            _dist.copy_full_(p, cast(Tensor, value).detach())
        if self.reset_optimizer_state and self.optimizer is not None:
            for p in self.head.parameters():
                self.optimizer.state.pop(p, None)

    def _reinit(self) -> None:
        if self.init is not None:
            self.init(self.head)
            return
        for root in _reset_roots(self.head):
            root.reset_parameters()  # type: ignore[operator]

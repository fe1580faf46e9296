"""Gradient-coherent strong L1/L2 regularisation: :class:`CoherentStrongReg` imposes a strong
regulariser only while the loss gradient stays coherent with the regularised update (see the
class docstring and ``docs/methods/coherent.md``; the criteria are this library's, chosen by
measurement, since the paper's exact criterion could not be read here).

Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
https://arxiv.org/abs/1811.08056
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from torch_recal import _dist
from torch_recal._budget import count_zeros, marked_, progress, ramp, thresholds, top_up_
from torch_recal._checks import (
    check_choice,
    check_flag,
    check_instance,
    check_int,
    check_optional_int,
    check_optional_real,
    check_real,
)
from torch_recal._coherent_ops import (
    OPTIONAL_STATE,
    Pending,
    add_to_grad_,
    check_gate_state,
    check_last_step,
    check_one_mesh,
    descent_switch,
    dots,
    first_order_cost,
    freezes_now,
    ratio_gate_update,
    ratio_measures,
    select_params,
    smooth_,
    sum_over_tensors,
    survivors,
    takeoff_update,
    truncate_,
)
from torch_recal._optim_hooks import Attachment, attach_to_optimizer
from torch_recal.compression import (
    CompressionReport,
    LayerSparsity,
    compression_report,
)
from torch_recal.criteria import (
    Always,
    Budget,
    Criterion,
    DescentGate,
    RatioRule,
    resolve_criterion,
)
from torch_recal.functional import group_soft_threshold_, soft_threshold_

__all__ = [
    "Always",
    "Attachment",
    "Budget",
    "CoherentStrongReg",
    "CompressionReport",
    "DescentGate",
    "LayerSparsity",
    "RatioRule",
    "compression_report",
]

Kind = Literal["l1", "l2"]
L1Mode = Literal["prox", "subgradient"]
Group = Literal["unit"] | None

_KINDS = ("l1", "l2")
_L1_MODES = ("prox", "subgradient")
_WHO = "CoherentStrongReg"
_UNRECORDED = object()  # a state saved before the criterion's name was recorded
_UNSCHEDULED_AFTER = 1000  # steps at the peak learning rate before a budget warns
_log = logging.getLogger("torch_recal")


class CoherentStrongReg:
    """Strong L1/L2 regularisation imposed only while the gradients stay coherent, or to a
    compression budget.

    *What* is applied: proximal L1 (``l1_mode="prox"``, default) soft-thresholds the weights
    after the optimizer's step, ``w <- sign(w) max(|w| - lr * strength, 0)``, so removed
    weights are exact zeros; with ``group="unit"`` it shrinks each output unit's incoming
    weights (a row of a Linear, an output channel of a conv) as a group,
    ``w_u <- w_u max(0, 1 - lr * strength * sqrt(n_u) / ||w_u||)``, so whole units die (and
    :func:`~torch_recal.shrink` can remove them); subgradient L1 adds ``strength * sign(w)``
    to ``.grad`` (the minimum-norm subgradient at ``w == 0``) and truncates zero crossings to
    exact zeros; L2 adds ``strength * w`` (exactly SGD's ``weight_decay``).

    *When and how strongly* is the ``criterion`` (:mod:`torch_recal.criteria`):

    * :class:`~torch_recal.Always` (``"always"``; the default with ``strength=``): on at
      every step after ``delay`` and the warm-up until the freeze, i.e. the simple schedule
      warm-up -> proximal L1 -> freeze (with ``delay=``: Delayed Strong Regularization);
    * :class:`~torch_recal.DescentGate` (``"descent"``): off when the regulariser's step
      undoes more than ``max_undo`` of the optimizer's first-order progress on the loss
      (smoothed), on again below ``resume_undo``; the progress is measured with the next
      mini-batch's gradient (unbiased) by default. It was the default before; pass
      ``criterion=DescentGate()`` for it (the gate's options as keyword arguments without a
      criterion, ``max_undo=`` ..., also select it);
    * :class:`~torch_recal.RatioRule` (``"ratio"``): the library's first default (norm ratio
      and cosine of the loss and regulariser gradients); it measured poorly, kept by name;
    * :class:`~torch_recal.Budget` (``target_sparsity=``): reach that share of exact zeros by
      the end of training, then keep the zero pattern; no strength to search.

    At the end of a decayed learning-rate schedule (``freeze_below``, default 0.1: once the
    learning rate is below a tenth of the largest it has been) the regulariser stops for good
    and the weights that are exactly zero stay zero: the zero pattern is frozen and the other
    weights finish training without the penalty's shrinkage. With a constant learning rate
    this never happens (a budget then needs ``total_steps``).

    Attach it to the optimizer once (``reg.attach()``; the optimizer's step hooks then run
    it, also with ``optimizer.step(closure)``, fused/foreach optimizers, gradient clipping
    and ``torch.amp.GradScaler``), or call :meth:`step` after ``loss.backward()`` and
    :meth:`after_step` after ``optimizer.step()`` yourself.

    Which tensors: by default (``weights_only=True``) the weights of conv/linear layers,
    told apart from biases and norm parameters as the tensors with at least 2 dims whose
    name does not end in ``bias`` (embeddings are 2-D too: pass explicit pairs to exclude
    them). Frozen tensors (``requires_grad=False``) are skipped.

    Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
    https://arxiv.org/abs/1811.08056 (the criteria and the budget are this library's; see
    ``docs/methods/coherent.md`` for what is verified and what is chosen).

    Args:
        params: parameters or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        strength: the regularisation strength (lambda), a positive float; required unless a
            budget is given (with a budget it is where the strength starts, default chosen
            by the budget).
        target_sparsity: a compression budget, in ``(0, 1)``: shorthand for
            ``criterion=Budget(target_sparsity, total_steps=total_steps)``.
        kind: ``"l1"`` or ``"l2"``.
        l1_mode: ``"prox"`` (default; the learning rate comes from ``optimizer`` or ``lr``)
            or ``"subgradient"``.
        group: ``None`` (each weight on its own) or ``"unit"`` (group L1 over each output
            unit's incoming weights; needs ``kind="l1"`` and ``l1_mode="prox"``). Leave the
            output layer out of ``params`` then: its units are the model's outputs.
        criterion: a criterion object (:class:`~torch_recal.DescentGate`,
            :class:`~torch_recal.RatioRule`, :class:`~torch_recal.Always`,
            :class:`~torch_recal.Budget`) or one of ``"descent"``, ``"ratio"``,
            ``"always"``; ``None`` (default): :class:`~torch_recal.Always` with
            ``strength=``, unless the gate's options are given (``max_undo=`` ...), which
            select :class:`~torch_recal.DescentGate` with them.
        total_steps: the run's number of optimizer steps, for a budget (needed when the
            learning rate does not decay).
        warmup: ``"auto"`` (wait for take-off, then ramp the strength; see the card), or a
            number of steps over which the strength ramps up linearly from
            ``strength / warmup`` (``0``: full strength at once).
        takeoff: ``warmup="auto"``: the growth of the optimizer's progress over its level
            in the first steps that counts as take-off (> 1).
        delay: steps without any regularisation first (Delayed Strong Regularization).
        freeze_below: freeze the zero pattern and stop the regulariser for good once the
            learning rate (the largest over the regularised tensors' groups) falls below
            this fraction of its peak, in ``(0, 1)``; ``None``: never. Needs the learning
            rate (``optimizer`` or ``lr``).
        lr: learning rate for the proximal and decay steps when no ``optimizer`` is given.
        optimizer: the optimizer; its per-group learning rates are read at every step, and
            :meth:`attach` hooks into it.
        scaler: the ``torch.amp.GradScaler`` in use, if any: steps with inf/NaN gradients are
            then skipped silently (they are the scaler's skipped steps), else with a warning.
        weights_only: keep only conv/linear weights (see above).
        history_size: how many recent steps :attr:`history` keeps.
        **options: the criterion options of the form before criteria were objects
            (``max_undo``, ``resume_undo``, ``smoothing`` with ``"descent"`` or without a
            criterion, which then is the descent gate; ``max_ratio``, ``min_cosine``,
            ``window``, ``reactivate`` with ``"ratio"``): passed to the criterion named by
            ``criterion``. Prefer the object form.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import CoherentStrongReg
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> reg = CoherentStrongReg(model.named_parameters(), strength=1e-3, optimizer=opt)
        >>> reg.names
        ['0.weight', '2.weight']
        >>> handle = reg.attach()  # the optimizer's step now runs the regulariser
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(16, 4)).square().mean().backward()
        ...     opt.step()
        >>> reg.num_steps, len(reg.history)
        (3, 3)
        >>> handle.remove()
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        strength: float | None = None,
        target_sparsity: float | None = None,
        kind: Kind = "l1",
        l1_mode: L1Mode = "prox",
        group: Group = None,
        criterion: str | Criterion | None = None,
        total_steps: int | None = None,
        warmup: int | Literal["auto"] = "auto",
        takeoff: float = 10.0,
        delay: int = 0,
        freeze_below: float | None = 0.1,
        lr: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any | None = None,
        weights_only: bool = True,
        history_size: int = 1000,
        **options: Any,
    ) -> None:
        self.kind: Kind = check_choice(kind, "kind", _KINDS, who=_WHO)  # type: ignore[assignment]
        self.l1_mode: L1Mode = check_choice(l1_mode, "l1_mode", _L1_MODES, who=_WHO)  # type: ignore[assignment]
        if group is not None:
            check_choice(group, "group", ("unit",), who=_WHO)
            if self.kind != "l1" or self.l1_mode != "prox":
                raise ValueError(
                    f"{_WHO}: `group`='unit' needs kind='l1' and l1_mode='prox', got "
                    f"kind={self.kind!r}, l1_mode={self.l1_mode!r}"
                )
        self.group: Group = group
        if target_sparsity is not None:
            if criterion is not None or options:
                raise TypeError(
                    f"{_WHO}: `target_sparsity` is the budget criterion; pass either it or "
                    "`criterion=` (and no criterion options), not both"
                )
            criterion = Budget(
                check_real(target_sparsity, "target_sparsity", who=_WHO, minimum=0, maximum=1,
                           open_low=True, open_high=True),
                total_steps=check_optional_int(total_steps, "total_steps", who=_WHO, minimum=1),
            )  # fmt: skip
        elif total_steps is not None and not isinstance(criterion, Budget):
            raise ValueError(f"{_WHO}: `total_steps` applies to a budget (`target_sparsity=`)")
        self.criterion: Criterion = resolve_criterion(criterion, options, who=_WHO)
        if isinstance(self.criterion, Budget):
            if self.kind != "l1":
                raise ValueError(f"{_WHO}: a budget needs kind='l1', got {self.kind!r}")
            if total_steps is not None and self.criterion.total_steps is None:
                self.criterion = dataclasses.replace(self.criterion, total_steps=total_steps)
            if self.criterion.allocation == "auto":
                self.criterion = dataclasses.replace(
                    self.criterion, allocation="layer" if self.group == "unit" else "global"
                )
        if isinstance(self.criterion, Budget):
            if strength is not None:
                raise TypeError(
                    f"{_WHO}: `strength` is not used with a budget (`target_sparsity=`), which "
                    "marks and shrinks weights by their magnitude; pass one or the other"
                )
            if self.l1_mode != "prox":
                raise ValueError(f"{_WHO}: a budget needs l1_mode='prox', got {self.l1_mode!r}")
            self.strength = 0.0
        elif strength is None:
            raise TypeError(
                f"{_WHO}: `strength` is required (a positive float) unless a budget "
                "(`target_sparsity=`) sets it"
            )
        else:
            self.strength = check_real(strength, "strength", who=_WHO, minimum=0, open_low=True)
        if warmup != "auto":
            if isinstance(warmup, str):
                raise ValueError(f"{_WHO}: `warmup` must be 'auto' or an int >= 0, got {warmup!r}")
            check_int(warmup, "warmup", who=_WHO, minimum=0)
        self.warmup: int | Literal["auto"] = warmup
        self.takeoff = check_real(takeoff, "takeoff", who=_WHO, minimum=1, open_low=True)
        self.delay = check_int(delay, "delay", who=_WHO, minimum=0)
        self.freeze_below = check_optional_real(
            freeze_below, "freeze_below", who=_WHO, minimum=0, maximum=1, open_low=True,
            open_high=True,
        )  # fmt: skip
        self.lr = check_optional_real(lr, "lr", who=_WHO, minimum=0, open_low=True)
        if optimizer is not None:
            check_instance(optimizer, "optimizer", torch.optim.Optimizer, who=_WHO)
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise TypeError(
                f"{_WHO}: `scaler` must be a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        weights_only = check_flag(weights_only, "weights_only", who=_WHO)
        history_size = check_int(history_size, "history_size", who=_WHO, minimum=0)
        self.names, self.params = select_params(params, weights_only)
        check_one_mesh(self.names, self.params)
        if isinstance(self.criterion, Budget):
            if self.criterion.total_steps is None and self.freeze_below is None:
                raise ValueError(
                    f"{_WHO}: a budget needs `total_steps` or `freeze_below` (the learning "
                    "rate's decay) to know when training ends"
                )
            sharded = [n for n, p in zip(self.names, self.params, strict=True)
                       if _dist.is_dtensor(p)]  # fmt: skip
            if sharded:
                raise ValueError(
                    f"{_WHO}: a budget does not support sharded (FSDP2) parameters yet "
                    f"(its threshold is a quantile over whole tensors): {sharded[:3]}"
                )
        self.optimizer = optimizer
        self.scaler = scaler
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self._pending: Pending | None = None
        self._attachment: Attachment | None = None
        # DescentGate(progress="next-batch"): the last step's change, one entry per tensor
        # (None for a tensor that was not trained in that step)
        self._last_step: list[Tensor | None] | None = None
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._warned_unscheduled = False
        self._state = self._initial_state()

    # ------------------------------------------------------------------ state
    def _initial_state(self) -> dict[str, Any]:
        return {
            "num_steps": 0,
            "num_skipped": 0,
            "is_active": self.warmup != "auto" or self._rule != "descent",
            "streak": 0,
            "cost_ema": None,
            "progress_ema": None,
            "reference_progress": None,
            "peak_progress": None,
            "ramp_start": None if self.warmup == "auto" else self.delay,
            "ramp_length": None if self.warmup == "auto" else int(self.warmup),
            "peak_lr": None,
            "frozen_at": None,
            "measured_step": None,  # next-batch progress: the step whose measurement is due
            "measured_cost": None,  # ... its regulariser cost (same-batch)
            "measured_applied": False,  # ... and whether that step applied the regulariser
            "budget_limits": None,  # Budget: the marking thresholds, one per tensor
            "budget_target": None,  # ... and the sparsity the schedule asked for last
        }

    @property
    def _rule(self) -> str:
        return self.criterion.name

    @property
    def _next_batch(self) -> bool:
        return isinstance(self.criterion, DescentGate) and self.criterion.progress == "next-batch"

    @property
    def num_steps(self) -> int:
        """Completed :meth:`step` calls."""
        return int(self._state["num_steps"])

    @property
    def num_skipped(self) -> int:
        """Steps skipped because the loss gradient was not finite."""
        return int(self._state["num_skipped"])

    @property
    def is_active(self) -> bool:
        """Whether the gate lets the regulariser act at the next step (after ``delay``, once
        the warm-up has started, and before the zero pattern is frozen)."""
        return bool(self._state["is_active"]) and self._started(self.num_steps) and not self.frozen

    @property
    def frozen(self) -> bool:
        """Whether the zero pattern is frozen (``freeze_below``): no more regularisation,
        and exact zeros stay zero."""
        return self._state["frozen_at"] is not None

    @property
    def strength_now(self) -> float:
        """The strength the next step would use (ramped during the warm-up)."""
        return 0.0 if self.frozen else self.strength * self._ramp(self.num_steps)

    @property
    def _needs_lr(self) -> bool:
        """The proximal step and the descent criterion's cost need the learning rate."""
        return (self.kind == "l1" and self.l1_mode == "prox") or self._rule == "descent"

    def _started(self, step: int) -> bool:
        start = self._state["ramp_start"]
        return step >= self.delay and start is not None and step >= start

    def _ramp(self, step: int) -> float:
        if not self._started(step):
            return 0.0
        length = self._state["ramp_length"] or 0
        return min(1.0, (step - self._state["ramp_start"] + 1) / length) if length else 1.0

    def state_dict(self) -> dict[str, Any]:
        """The state: counters, the gate and its averages (not the history), as plain data;
        ``criterion``, the criterion's name (``"always"``, ``"descent"``, ...), which
        :meth:`load_state_dict` checks; with ``DescentGate(progress="next-batch")`` also
        ``last_step``, the last step's weight change (one tensor per regularised tensor,
        this rank's part), whose progress the next step measures.

        Example:
            >>> import torch
            >>> from torch_recal import CoherentStrongReg
            >>> reg = CoherentStrongReg([torch.nn.Parameter(torch.ones(2, 2))], strength=0.1,
            ...                         lr=0.1)
            >>> state = reg.state_dict()
            >>> state["num_steps"], state["criterion"]
            (0, 'always')
        """
        out = dict(self._state)
        out["last_step"] = None if self._last_step is None else list(self._last_step)
        out["criterion"] = self.criterion.name
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; everything is checked first (types,
        ranges, consistency), then assigned at once. A state saved before the next-batch
        progress existed (without its keys) loads too: its first step is not measured.

        The state must come from the same criterion: a state saved with the descent gate
        (the default before ``Always()``) loads into a regulariser built with
        ``criterion=DescentGate()``; into another criterion it is a :class:`ValueError`
        naming both. A state saved before ``criterion`` was recorded is told apart by what
        only the gate leaves in it (a pending next-batch measurement, or the regulariser off
        before the freeze)."""
        who = f"{_WHO}.load_state_dict"
        saved: Any = _UNRECORDED
        if isinstance(state_dict, Mapping):
            state_dict = {**OPTIONAL_STATE, **state_dict}
            saved = state_dict.pop("criterion", _UNRECORDED)
        new = check_gate_state(state_dict, self._state.keys(), self.warmup, self.delay, who)
        self._check_saved_criterion(saved, new, state_dict["last_step"], who)
        last = check_last_step(state_dict["last_step"], self.params, who)
        self._state = new
        self._last_step = last
        if last is None:
            self._state["measured_step"] = None
        self._pending = None

    def _check_saved_criterion(
        self, saved: Any, state: dict[str, Any], last_step: Any, who: str
    ) -> None:
        """``load_state_dict``: the saved criterion (its name, or ``_UNRECORDED`` for a state
        saved before it was recorded) must be this regulariser's."""
        mine = self.criterion
        if saved is _UNRECORDED:  # an older state: only the descent gate leaves these
            gate_only = last_step is not None or state["measured_step"] is not None
            if isinstance(mine, Always):
                gate_only = gate_only or (not state["is_active"] and state["frozen_at"] is None)
            if isinstance(mine, DescentGate) or not gate_only:
                return
            saved = DescentGate.name
        elif not isinstance(saved, str):
            raise TypeError(
                f"{who}: `criterion` must be a criterion's name, got {type(saved).__name__}"
            )
        if saved == mine.name:
            return
        hint = (
            " (the default of the strength-driven form was the descent gate before it became "
            "Always(): construct the regulariser with criterion=DescentGate() to resume it)"
            if saved == DescentGate.name
            else ""
        )
        raise ValueError(
            f"{who}: `criterion`: the state was saved with criterion {saved!r}, this "
            f"regulariser's is {mine!r}{hint}"
        )

    # ------------------------------------------------------------------ hooks
    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> Attachment:
        """Run the regulariser from the optimizer's step hooks: :meth:`step` just before the
        update (after the closure's ``backward()`` when ``optimizer.step(closure)`` is used,
        after gradient clipping and the ``GradScaler``'s unscaling), :meth:`after_step` just
        after it. A step the ``GradScaler`` skips (inf/NaN) never calls the optimizer, so the
        regulariser does nothing either.

        Args:
            optimizer: the optimizer (default: the one given to the constructor).

        Returns:
            A handle whose ``remove()`` detaches the regulariser again.

        Raises:
            TypeError: ``optimizer`` is not an optimizer.
            ValueError: no optimizer is known, or another one than the constructor's.
            RuntimeError: the regulariser is already attached.
        """
        who = f"{_WHO}.attach"
        if optimizer is None:
            optimizer = self.optimizer
            if optimizer is None:
                raise ValueError(f"{who}: `optimizer` must be given (here or to the constructor)")
        check_instance(optimizer, "optimizer", torch.optim.Optimizer, who=who)
        if self.optimizer is not None and optimizer is not self.optimizer:
            raise ValueError(f"{who}: `optimizer` is not the optimizer given to the constructor")
        if self._attachment is not None:
            raise RuntimeError(f"{who}: already attached; remove() the first handle first")
        self._check_in_optimizer(optimizer, who)
        self.optimizer = optimizer

        self._attachment = attach_to_optimizer(
            optimizer, self.step, self.after_step, self._detached
        )
        return self._attachment

    def _detached(self) -> None:
        self._attachment = None
        self.check_budget()

    def _check_in_optimizer(self, optimizer: torch.optim.Optimizer, who: str) -> None:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in zip(self.names, self.params, strict=True) if id(p) not in owned]
        if missing:
            raise ValueError(f"{who}: `optimizer` does not hold the regularised {missing}")

    def _lrs(self, names: list[str], params: list[Tensor], who: str) -> list[float]:
        if self.optimizer is None:
            if self.lr is None:
                raise RuntimeError(
                    f"{who}: the proximal/decay step needs a learning rate: pass `optimizer=` "
                    "or `lr=` to the constructor, or attach(optimizer)"
                )
            return [self.lr] * len(params)
        lr_of = {id(p): float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]}
        out = []
        for n, p in zip(names, params, strict=True):
            if id(p) not in lr_of:
                raise ValueError(f"{who}: `{n}` is not in `optimizer`")
            out.append(lr_of[id(p)])
        return out

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        """Start a step: read the loss gradient and, if the regulariser is on and acts
        through the gradient (subgradient L1, L2), add it to ``.grad``.

        Call after ``loss.backward()`` (and after any gradient clipping and
        ``scaler.unscale_(optimizer)``), before ``optimizer.step()``; then call
        :meth:`after_step`. :meth:`attach` does both for you.

        Raises:
            RuntimeError: a regularised parameter has no ``.grad``, or the last step's
                :meth:`after_step` was not called (the regulariser would act twice on the
                same gradients). Nothing changes.
        """
        who = f"{_WHO}.step"
        if self._pending is not None:
            raise RuntimeError(
                f"{who}: called twice without after_step(); call after_step() after "
                "optimizer.step() (or use attach())"
            )
        live = [(n, p) for n, p in zip(self.names, self.params, strict=True) if p.requires_grad]
        missing = [n for n, p in live if p.grad is None]
        if missing or not live:
            raise RuntimeError(
                f"{who}: these regularised parameters have no .grad (call step() after "
                f"loss.backward(), and pass only parameters the loss uses): "
                f"{missing or 'none requires grad'}"
            )
        names = [n for n, _ in live]
        params: list[Tensor] = [p for _, p in live]
        local = [_dist.local_tensor(p) for p in params]  # FSDP2: this rank's slices (views)
        grads: list[Tensor] = [_dist.local_tensor(p.grad) for p in params]  # type: ignore[arg-type]
        lrs = self._lrs(names, params, who) if self._lr_known else []  # fail now, not later
        step = self.num_steps
        budget = self.criterion if isinstance(self.criterion, Budget) else None
        p = None
        if budget is not None:
            p = progress(
                step,
                lrs,
                self._state["peak_lr"],
                total_steps=budget.total_steps,
                end=budget.end,
                freeze_below=self.freeze_below,
                delay=self.delay,
            )
            self._warn_if_unscheduled(step, p, lrs)
            ends = p >= 1.0
        else:
            ends = freezes_now(lrs, self._state["peak_lr"], self.freeze_below)
        if self.frozen or ends:
            # the zero pattern is (now) frozen: remember the zeros, after_step() keeps them
            nothing = local[0].new_zeros((), dtype=torch.float64)
            zeros = [w == 0 for w in local]
            self._pending = Pending(names, params, nothing, False, 0.0, zeros=zeros,
                                    peak_lr=max(lrs, default=None))  # fmt: skip
            return
        if budget is not None:
            self._pending = self._budget_pending(step, names, params, local, lrs, budget, p)
            return
        strength = self.strength * self._ramp(step)
        ratio_stats: dict[str, float] = {}
        if self._rule == "ratio":
            ratio_stats = self._ratio_gate(grads, local, params)
        active = self._started(step) and bool(self._state["is_active"]) and strength > 0
        if self._rule == "always":
            active = self._started(step) and strength > 0
        before = sum_over_tensors(dots(grads, local), params)
        peak = max([*lrs, self._state["peak_lr"] or 0.0]) if lrs else self._state["peak_lr"]
        pending = Pending(
            names, params, before, active, strength, ratio_stats=ratio_stats, peak_lr=peak
        )
        if self._next_batch:
            pending.net_before = self._start_measurement(step, grads, local, params)
        if active and (self.kind == "l2" or self.l1_mode == "subgradient"):
            pending.added = add_to_grad_(self.kind, grads, local, strength, pending)
        self._pending = pending

    def _start_measurement(
        self, step: int, grads: list[Tensor], local: list[Tensor], params: list[Tensor]
    ) -> Tensor | None:
        """Next-batch progress: ``<g_t, w_{t-1} - w_t>`` of the last step with this step's
        (independent) gradient, on the device; then remember ``w_t`` (in the same buffers)."""
        index = [self._index[id(p)] for p in params]
        last = self._last_step
        due = (
            self._state["measured_step"] == step - 1
            and last is not None
            and [i for i, t in enumerate(last) if t is not None] == sorted(index)
        )  # the same tensors were trained in both steps
        net = None
        if due:
            assert last is not None
            net = sum_over_tensors(dots(grads, [last[i] for i in index]), params)  # type: ignore[misc]
        new: list[Tensor | None] = [None] * len(self.params)
        for i, w in zip(index, local, strict=True):
            old = last[i] if last is not None else None
            if old is not None and old.shape == w.shape:
                old.copy_(w)
                new[i] = old
            else:
                new[i] = w.detach().clone()
        self._last_step = new
        return net

    @torch.no_grad()
    def after_step(self) -> None:
        """Finish the step after ``optimizer.step()``: measure the optimizer's progress and
        the regulariser's cost, apply the proximal L1 step or the subgradient truncation if
        the regulariser is on, and decide whether it is on at the next step.

        Raises:
            RuntimeError: no :meth:`step` came before (nothing changes).
        """
        who = f"{_WHO}.after_step"
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(f"{who}: called without step(); call step() first (or attach())")
        step = self.num_steps
        local = [_dist.local_tensor(p) for p in pending.params]
        if pending.zeros is not None:
            self._keep_zeros(step, local, pending)
            return
        if pending.budget is not None:
            self._budget_step(step, local, pending)
            return
        grads: list[Tensor] = [_dist.local_tensor(p.grad) for p in pending.params]  # type: ignore[arg-type]
        lrs = self._lrs(pending.names, pending.params, who) if self._lr_known else []
        added = pending.added
        after = dots(grads, local)
        if added is not None:  # <g_loss, w> = <g_loss + added, w> - <added, w>
            after = after - dots(added, local)
        strength = pending.strength if pending.active else self.strength * self._ramp(step)
        loss_grads = grads if added is None else list(torch._foreach_sub(grads, added))
        thresholds = [lr * strength for lr in lrs]
        cost = (
            first_order_cost(loss_grads, local, thresholds, self.kind, self.group)
            if lrs
            else after.new_zeros(1)
        )
        sums = [
            pending.before,
            sum_over_tensors(after, pending.params),
            sum_over_tensors(cost, pending.params),
            pending.before.new_zeros(()) if pending.net_before is None else pending.net_before,
        ]
        prox = pending.active and self.kind == "l1" and self.l1_mode == "prox"
        guard = prox and self._rule == "descent"
        if guard:  # per tensor: non-zero entries, and those the proximal step would keep
            kept = survivors(local, [lr * pending.strength for lr in lrs], pending.params,
                             self.group)  # fmt: skip
            sums.extend(kept.reshape(-1))
        stats = torch.stack(sums).tolist()  # the one host sync of the step
        before_sum, after_sum, cost_sum, net_prev = stats[:4]
        if not all(math.isfinite(v) for v in stats):
            self._skip(step, who)
            return
        progress = before_sum - after_sum
        if added is not None and pending.active:
            progress += cost_sum  # the optimizer's step also carried the regulariser's pull
        wiped = []
        if guard:  # a step that would zero a whole tensor is not taken: a collapse
            n = len(local)
            nonzero, kept_counts = stats[4 : 4 + n], stats[4 + n :]
            wiped = [
                name
                for name, a, b in zip(pending.names, nonzero, kept_counts, strict=True)
                if a > 0 and b == 0
            ]
        if wiped:
            self._wipe_out(step, wiped, pending)
            return
        if prox:
            self._prox_(local, lrs, pending.strength)
        elif pending.active and pending.signs is not None and pending.leave_zero is not None:
            truncate_(local, pending.signs, pending.leave_zero)
        if not self._next_batch:
            self._update(step, pending, cost_sum, (step, progress, cost_sum))
            return
        measured = None
        s = self._state
        if pending.net_before is not None:  # the last step's measurement is complete
            applied = s["measured_cost"] if s["measured_applied"] else 0.0
            measured = (step - 1, net_prev + applied, s["measured_cost"])
        assert self._last_step is not None
        changes = [self._last_step[self._index[id(p)]] for p in pending.params]
        torch._foreach_sub_(changes, local)  # type: ignore[arg-type]  # w_t - w_{t+1}
        s["measured_step"], s["measured_cost"] = step, cost_sum
        s["measured_applied"] = bool(pending.active)
        self._update(step, pending, cost_sum, measured)

    def _prox_(self, local: list[Tensor], lrs: list[float], strength: float) -> None:
        """The proximal step: soft-threshold by ``lr * strength`` (per group learning rate),
        or the group soft-threshold of each unit (``group="unit"``)."""
        by_lr: dict[float, list[Tensor]] = {}
        for p, lr in zip(local, lrs, strict=True):
            by_lr.setdefault(lr * strength, []).append(p)
        for threshold, tensors in by_lr.items():
            if self.group == "unit":
                group_soft_threshold_(tensors, threshold)
            else:
                soft_threshold_(tensors, threshold)

    @property
    def _lr_known(self) -> bool:
        return self._needs_lr or self.optimizer is not None or self.lr is not None

    # ------------------------------------------------------------------ the budget
    def _budget_pending(
        self,
        step: int,
        names: list[str],
        params: list[Tensor],
        local: list[Tensor],
        lrs: list[float],
        budget: Budget,
        p: float | None,
    ) -> Pending:
        """A budget step before the freeze: what the schedule asks for now, and (for
        ``method="magnitude"``) the zeros to keep through the optimizer's step."""
        target = ramp(budget.target_sparsity, p or 0.0)
        due = self._state["budget_limits"] is None or (step - self.delay) % budget.every == 0
        nothing = local[0].new_zeros((), dtype=torch.float64)
        peak = max([*lrs, self._state["peak_lr"] or 0.0]) if lrs else self._state["peak_lr"]
        pending = Pending(names, params, nothing, step >= self.delay, 0.0, peak_lr=peak)
        pending.budget = (target, due)
        if budget.method == "magnitude":
            pending.keep = [w == 0 for w in local]
        return pending

    def _budget_step(self, step: int, local: list[Tensor], pending: Pending) -> None:
        """After the optimizer's step: keep the pruned zeros (magnitude), renew the marking
        threshold when it is due, and zero or shrink the marked weights."""
        budget = self.criterion
        assert isinstance(budget, Budget) and pending.budget is not None
        target, due = pending.budget
        if pending.keep is not None:  # method="magnitude": the pruned stay pruned
            for w, zero in zip(local, pending.keep, strict=True):
                w.masked_fill_(zero, 0.0)
        s = self._state
        entry: dict[str, Any] = {"step": step, "active": pending.active, "target": target}
        if pending.active:
            if due:
                s["budget_limits"] = thresholds(local, target, budget.allocation, self.group)
            limits = s["budget_limits"]
            if budget.method == "magnitude" and due:
                marked_(local, limits, self.group, None)
            elif budget.method == "shrink":
                marked_(local, limits, self.group, budget.rate)
            if due:
                zeros, total = count_zeros(local)
                entry["sparsity"] = zeros / total
        s["budget_target"] = target
        s["num_steps"], s["peak_lr"] = step + 1, pending.peak_lr
        self.history.append(entry)

    def _warn_if_unscheduled(self, step: int, p: float | None, lrs: list[float]) -> None:
        """A budget read off the learning rate's decay, whose learning rate has not moved
        from its peak in 1,000 steps: say so once (it will not be reached)."""
        budget = self.criterion
        if (
            isinstance(budget, Budget)
            and budget.total_steps is None
            and step == _UNSCHEDULED_AFTER
            and not p
            and not self._warned_unscheduled
        ):
            self._warned_unscheduled = True
            warnings.warn(
                f"{_WHO}: the budget (target sparsity {budget.target_sparsity:g}) follows the "
                f"learning rate's decay, but the learning rate ({max(lrs, default=0.0):g}) has "
                f"not fallen below its peak in {step} steps: with a constant learning rate "
                "pass `total_steps=` (sparsity now "
                f"{self.sparsity:.3f})",
                RuntimeWarning,
                stacklevel=4,
            )

    @property
    def sparsity(self) -> float:
        """The share of exact zeros in the regularised tensors now (this rank's part)."""
        zeros, total = count_zeros([_dist.local_tensor(p).detach() for p in self.params])
        return zeros / total if total else 0.0

    def check_budget(self) -> None:
        """Warn (``RuntimeWarning``, naming the sparsity reached) if a budget's target has not
        been reached and frozen; :meth:`attach`'s handle calls it when removed, the trainer
        integrations at the end of training. Nothing happens without a budget.

        Example:
            >>> import torch
            >>> from torch_recal import CoherentStrongReg
            >>> w = torch.nn.Parameter(torch.randn(8, 8))
            >>> reg = CoherentStrongReg([w], target_sparsity=0.5, total_steps=10, lr=0.1)
            >>> for _ in range(10):
            ...     w.grad = torch.zeros_like(w)
            ...     reg.step()
            ...     reg.after_step()
            >>> reg.frozen, round(reg.sparsity, 3)
            (True, 0.5)
            >>> reg.check_budget()  # reached: silent
        """
        budget = self.criterion
        if not isinstance(budget, Budget) or self.num_steps == 0 or self.frozen:
            return
        warnings.warn(
            f"{_WHO}: the budget was not reached: sparsity {self.sparsity:.3f} of the target "
            f"{budget.target_sparsity:g} after {self.num_steps} steps (the schedule was at "
            f"{self._state['budget_target'] or 0.0:.3f}); give `total_steps=` or a learning "
            "rate that decays below `freeze_below` of its peak",
            RuntimeWarning,
            stacklevel=2,
        )

    def _keep_zeros(self, step: int, local: list[Tensor], pending: Pending) -> None:
        """A step with the zero pattern frozen: the weights that were zero before the
        optimizer's step are zero again; the first such step freezes the pattern."""
        for w, zero in zip(local, pending.zeros or [], strict=True):
            w.masked_fill_(zero, 0.0)
        s = self._state
        if s["frozen_at"] is None:
            if isinstance(self.criterion, Budget):  # exactly the target, then frozen
                b = self.criterion
                top_up_(local, b.target_sparsity, b.allocation, self.group)
                s["budget_target"] = b.target_sparsity
            s["frozen_at"], s["is_active"] = step, False
            s["peak_lr"] = max(pending.peak_lr or 0.0, s["peak_lr"] or 0.0) or None
            self._forget_measurement()
            _log.info(
                "CoherentStrongReg: zero pattern frozen at step %d (learning rate below %g of "
                "its peak %g); no more regularisation",
                step,
                self.freeze_below,
                s["peak_lr"],
            )
        s["num_steps"] = step + 1
        self.history.append({"step": step, "active": False, "strength": 0.0, "frozen": True})

    def _forget_measurement(self) -> None:
        self._state["measured_step"], self._state["measured_cost"] = None, None
        self._state["measured_applied"] = False
        self._last_step = None

    def _wipe_out(self, step: int, names: list[str], pending: Pending) -> None:
        """The proximal step would have zeroed every remaining weight of ``names``: it is not
        taken, the regulariser goes off, and the averages start afresh."""
        s = self._state
        s["is_active"], s["cost_ema"], s["progress_ema"] = False, None, None
        s["num_steps"], s["peak_lr"] = step + 1, pending.peak_lr
        self._forget_measurement()
        self.history.append({"step": step, "active": False, "strength": 0.0, "wiped": names})
        _log.info(
            "CoherentStrongReg: regulariser off after step %d: its step would have zeroed "
            "all of %s",
            step,
            names,
        )

    def _skip(self, step: int, who: str) -> None:
        self._state["num_steps"] = step + 1
        self._state["num_skipped"] += 1
        self._forget_measurement()
        self.history.append({"step": step, "active": False, "skipped": True})
        if self.scaler is None:
            warnings.warn(
                f"{who}: the loss gradient or a regularised weight is not finite at step {step}; "
                "the regulariser skipped this step and kept its state (pass `scaler=` to skip "
                "a GradScaler's inf steps silently)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _fold(self, step: int, progress: float, cost: float) -> None:
        """Fold a complete (progress, cost) measurement of ``step`` into the averages, the
        take-off detection and the switch."""
        s = self._state
        smooth_(s, progress, cost, getattr(self.criterion, "smoothing", 0.9))
        if self.warmup == "auto" and s["ramp_start"] is None and step >= self.delay:
            self._wait_for_takeoff(step)
        if isinstance(self.criterion, DescentGate) and self._started(step):
            descent_switch(s, self.criterion.max_undo, self.criterion.resume_undo)

    def _update(
        self,
        step: int,
        pending: Pending,
        cost: float,
        measured: tuple[int, float, float] | None,
    ) -> None:
        """End of a step: fold in the measurement that is complete (this step's with the
        same-batch progress, the last step's with the next-batch one), count the step,
        record it in the history."""
        s = self._state
        was_on = self.is_active
        if measured is not None:
            self._fold(*measured)
        s["num_steps"] = step + 1
        s["peak_lr"] = pending.peak_lr
        now = measured is not None and measured[0] == step
        if measured is not None and not now:  # the last step's entry gets its progress
            entry = self.history[-1] if self.history else None
            if entry is not None and entry.get("step") == measured[0]:
                entry["progress"], entry["undo"] = measured[1], _undo(measured[2], measured[1])
        progress = measured[1] if measured is not None and now else None
        self.history.append(
            {
                "step": step,
                "active": pending.active,
                "strength": pending.strength if pending.active else 0.0,
                "progress": progress,
                "cost": cost,
                "undo": None if progress is None else _undo(cost, progress),
                **pending.ratio_stats,
            }
        )
        if self.is_active != was_on:
            _log.info("CoherentStrongReg: regulariser %s after step %d",
                      "on" if self.is_active else "off", step)  # fmt: skip

    def _wait_for_takeoff(self, step: int) -> None:
        """``warmup="auto"``: start the ramp once the optimizer's progress has grown
        ``takeoff``-fold over its level after the first steps, or fallen to half its peak
        (a problem learnt fast from the start, or a trained model being fine-tuned)."""
        length = takeoff_update(self._state, step, self.delay, self.takeoff)
        if length is not None:
            _log.info(
                "CoherentStrongReg: warm-up starts after step %d, ramp over %d steps", step, length
            )

    # ------------------------------------------------------------------ the ratio rule
    def _ratio_gate(
        self, grads: list[Tensor], local: list[Tensor], params: list[Tensor]
    ) -> dict[str, float]:
        """The first default (norm ratio and cosine of g and r over all tensors), updated in
        :meth:`step`; returns its measures for the history."""
        rule = self.criterion
        assert isinstance(rule, RatioRule)
        measures = ratio_measures(grads, local, params, self.kind, self.strength)
        if self._started(self.num_steps) and not math.isnan(measures["cosine"]):
            ratio_gate_update(self._state, measures, rule.max_ratio, rule.min_cosine,
                              rule.window, rule.reactivate)  # fmt: skip
        return measures  # a NaN cosine (non-finite gradient): after_step() skips this step

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (
            f"CoherentStrongReg(kind={self.kind!r}, strength={self.strength}, "
            f"l1_mode={self.l1_mode!r}, criterion={self.criterion!r}, "
            f"tensors={len(self.params)}, active={self.is_active}, steps={self.num_steps})"
        )


def _undo(cost: float, progress: float) -> float:
    return cost / progress if progress else math.inf if cost > 0 else 0.0

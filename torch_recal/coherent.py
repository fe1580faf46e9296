"""Gradient-coherent strong L1/L2 regularisation: :class:`CoherentStrongReg` imposes a strong
regulariser only while the loss gradient stays coherent with the regularised update (see the
class docstring and ``docs/methods/coherent.md``; the criteria are this library's, chosen by
measurement, since the paper's exact criterion could not be read here).

Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
https://arxiv.org/abs/1811.08056
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from torch_recal import _dist
from torch_recal._checks import (
    check_choice,
    check_flag,
    check_instance,
    check_int,
    check_optional_real,
    check_real,
)
from torch_recal._coherent_ops import (
    Pending,
    add_to_grad_,
    check_gate_state,
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
from torch_recal.functional import soft_threshold_

__all__ = [
    "Attachment",
    "CoherentStrongReg",
    "CompressionReport",
    "LayerSparsity",
    "compression_report",
]

Kind = Literal["l1", "l2"]
L1Mode = Literal["prox", "subgradient"]
Criterion = Literal["descent", "ratio", "always"]

_KINDS = ("l1", "l2")
_L1_MODES = ("prox", "subgradient")
_CRITERIA = ("descent", "ratio", "always")
_WHO = "CoherentStrongReg"
_log = logging.getLogger("torch_recal")


class CoherentStrongReg:
    """Strong L1/L2 regularisation imposed only while the gradients stay coherent.

    Attach it to the optimizer once (``reg.attach()``; the optimizer's step hooks then run
    it, also with ``optimizer.step(closure)``, fused/foreach optimizers, gradient clipping
    and ``torch.amp.GradScaler``), or call :meth:`step` after ``loss.backward()`` and
    :meth:`after_step` after ``optimizer.step()`` yourself.

    While it is on: proximal L1 (``l1_mode="prox"``, default) soft-thresholds the weights
    after the optimizer's step, ``w <- sign(w) max(|w| - lr * strength, 0)``, so removed
    weights are exact zeros; subgradient L1 adds ``strength * sign(w)`` to ``.grad`` (the
    minimum-norm subgradient at ``w == 0``) and truncates zero crossings to exact zeros; L2
    adds ``strength * w`` (exactly SGD's ``weight_decay``). When it is on is decided by the
    ``criterion`` (see the module docstring and ``docs/methods/coherent.md``):

    * ``"descent"`` (default): off when the regulariser's step undoes more than ``max_undo``
      of the optimizer's first-order progress on the loss (smoothed), on again below
      ``resume_undo``;
    * ``"ratio"``: the first default of this library (off after ``window`` steps with
      ``|r| / |g| > max_ratio`` or ``cos(g, r) < min_cosine``, ``|r| = strength sqrt(n)``
      for L1); it measured poorly and is kept by name;
    * ``"always"``: on at every step after ``delay`` (the plain and delayed baselines).

    At the end of a decayed learning-rate schedule (``freeze_below``, default 0.1: once the
    learning rate is below a tenth of the largest it has been) the regulariser stops for good
    and the weights that are exactly zero stay zero: the zero pattern is frozen and the other
    weights finish training without the penalty's shrinkage. With a constant learning rate
    this never happens.

    Which tensors: by default (``weights_only=True``) the weights of conv/linear layers,
    told apart from biases and norm parameters as the tensors with at least 2 dims whose
    name does not end in ``bias`` (embeddings are 2-D too: pass explicit pairs to exclude
    them). Frozen tensors (``requires_grad=False``) are skipped.

    Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
    https://arxiv.org/abs/1811.08056 (the criteria are this library's; see
    ``docs/methods/coherent.md`` for what is verified and what is chosen).

    Args:
        params: parameters or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        kind: ``"l1"`` or ``"l2"``.
        strength: the regularisation strength (lambda), a positive float.
        l1_mode: ``"prox"`` (default; the learning rate comes from ``optimizer`` or ``lr``)
            or ``"subgradient"``.
        criterion: ``"descent"`` (default), ``"ratio"`` or ``"always"``.
        max_undo: ``"descent"``: switch off above this undone fraction (> 0).
        resume_undo: ``"descent"``: switch back on below it (``0 < resume_undo <= max_undo``).
        smoothing: ``"descent"``: EMA factor of the progress and the cost, in ``[0, 1)``.
        warmup: ``"auto"`` (wait for take-off, then ramp the strength; see the module
            docstring), or a number of steps over which the strength ramps up linearly from
            ``strength / warmup`` (``0``: full strength at once).
        takeoff: ``warmup="auto"``: the growth of the optimizer's progress over its level
            in the first steps that counts as take-off (> 1).
        max_ratio: ``"ratio"``: incoherent when ``|r| / |g| > max_ratio`` (``None``: unused).
        min_cosine: ``"ratio"``: incoherent when ``cos(g, r) < min_cosine`` (``None``: unused).
        window: ``"ratio"``: consecutive incoherent (coherent) steps to switch off (on).
        reactivate: ``"ratio"``: switch back on after ``window`` coherent steps.
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
        kind: Kind = "l1",
        strength: float,
        l1_mode: L1Mode = "prox",
        criterion: Criterion = "descent",
        max_undo: float = 0.5,
        resume_undo: float = 0.25,
        smoothing: float = 0.9,
        warmup: int | Literal["auto"] = "auto",
        takeoff: float = 10.0,
        max_ratio: float | None = 4.0,
        min_cosine: float | None = None,
        window: int = 2,
        reactivate: bool = True,
        delay: int = 0,
        freeze_below: float | None = 0.1,
        lr: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any | None = None,
        weights_only: bool = True,
        history_size: int = 1000,
    ) -> None:
        self.kind: Kind = check_choice(kind, "kind", _KINDS, who=_WHO)  # type: ignore[assignment]
        self.strength = check_real(strength, "strength", who=_WHO, minimum=0, open_low=True)
        self.l1_mode: L1Mode = check_choice(l1_mode, "l1_mode", _L1_MODES, who=_WHO)  # type: ignore[assignment]
        self.criterion: Criterion = check_choice(criterion, "criterion", _CRITERIA, who=_WHO)  # type: ignore[assignment]
        self.max_undo = check_real(max_undo, "max_undo", who=_WHO, minimum=0, open_low=True)
        self.resume_undo = check_real(
            resume_undo, "resume_undo", who=_WHO, minimum=0, maximum=self.max_undo, open_low=True
        )
        self.smoothing = check_real(
            smoothing, "smoothing", who=_WHO, minimum=0, maximum=1, open_high=True
        )
        if warmup != "auto":
            if isinstance(warmup, str):
                raise ValueError(f"{_WHO}: `warmup` must be 'auto' or an int >= 0, got {warmup!r}")
            check_int(warmup, "warmup", who=_WHO, minimum=0)
        self.warmup: int | Literal["auto"] = warmup
        self.takeoff = check_real(takeoff, "takeoff", who=_WHO, minimum=1, open_low=True)
        self.max_ratio = check_optional_real(
            max_ratio, "max_ratio", who=_WHO, minimum=0, open_low=True
        )
        self.min_cosine = check_optional_real(
            min_cosine, "min_cosine", who=_WHO, minimum=-1, maximum=1
        )
        self.window = check_int(window, "window", who=_WHO, minimum=1)
        self.reactivate = check_flag(reactivate, "reactivate", who=_WHO)
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
        self.optimizer = optimizer
        self.scaler = scaler
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self._pending: Pending | None = None
        self._attachment: Attachment | None = None
        self._state = self._initial_state()

    # ------------------------------------------------------------------ state
    def _initial_state(self) -> dict[str, Any]:
        return {
            "num_steps": 0,
            "num_skipped": 0,
            "is_active": self.warmup != "auto" or self.criterion != "descent",
            "streak": 0,
            "cost_ema": None,
            "progress_ema": None,
            "reference_progress": None,
            "peak_progress": None,
            "ramp_start": None if self.warmup == "auto" else self.delay,
            "ramp_length": None if self.warmup == "auto" else int(self.warmup),
            "peak_lr": None,
            "frozen_at": None,
        }

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
        return (self.kind == "l1" and self.l1_mode == "prox") or self.criterion == "descent"

    def _started(self, step: int) -> bool:
        start = self._state["ramp_start"]
        return step >= self.delay and start is not None and step >= start

    def _ramp(self, step: int) -> float:
        if not self._started(step):
            return 0.0
        length = self._state["ramp_length"] or 0
        return min(1.0, (step - self._state["ramp_start"] + 1) / length) if length else 1.0

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: the counters, the gate and its averages (not the history).

        Example:
            >>> import torch
            >>> from torch_recal import CoherentStrongReg
            >>> reg = CoherentStrongReg([torch.nn.Parameter(torch.ones(2, 2))], strength=0.1,
            ...                         lr=0.1)
            >>> state = reg.state_dict()
            >>> state["num_steps"], state["is_active"]
            (0, False)
        """
        return dict(self._state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; everything is checked first (types,
        ranges, consistency), then assigned at once."""
        who = f"{_WHO}.load_state_dict"
        new = check_gate_state(state_dict, self._state.keys(), self.warmup, self.delay, who)
        self._state = new
        self._pending = None

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
        if self.frozen or freezes_now(lrs, self._state["peak_lr"], self.freeze_below):
            # the zero pattern is (now) frozen: remember the zeros, after_step() keeps them
            nothing = local[0].new_zeros((), dtype=torch.float64)
            zeros = [w == 0 for w in local]
            self._pending = Pending(names, params, nothing, False, 0.0, zeros=zeros,
                                    peak_lr=max(lrs, default=None))  # fmt: skip
            return
        strength = self.strength * self._ramp(step)
        ratio_stats: dict[str, float] = {}
        if self.criterion == "ratio":
            ratio_stats = self._ratio_gate(grads, local, params)
        active = self._started(step) and bool(self._state["is_active"]) and strength > 0
        if self.criterion == "always":
            active = self._started(step) and strength > 0
        before = sum_over_tensors(dots(grads, local), params)
        peak = max([*lrs, self._state["peak_lr"] or 0.0]) if lrs else self._state["peak_lr"]
        pending = Pending(
            names, params, before, active, strength, ratio_stats=ratio_stats, peak_lr=peak
        )
        if active and (self.kind == "l2" or self.l1_mode == "subgradient"):
            pending.added = add_to_grad_(self.kind, grads, local, strength, pending)
        self._pending = pending

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
            first_order_cost(loss_grads, local, thresholds, self.kind)
            if lrs
            else after.new_zeros(1)
        )
        sums = [
            pending.before,
            sum_over_tensors(after, pending.params),
            sum_over_tensors(cost, pending.params),
        ]
        prox = pending.active and self.kind == "l1" and self.l1_mode == "prox"
        guard = prox and self.criterion == "descent"
        if guard:  # per tensor: non-zero entries, and those the soft-threshold would keep
            kept = survivors(local, [lr * pending.strength for lr in lrs], pending.params)
            sums.extend(kept.reshape(-1))
        stats = torch.stack(sums).tolist()  # the one host sync of the step
        before_sum, after_sum, cost_sum = stats[:3]
        if not all(math.isfinite(v) for v in stats):
            self._skip(step, who)
            return
        progress = before_sum - after_sum
        if added is not None and pending.active:
            progress += cost_sum  # the optimizer's step also carried the regulariser's pull
        wiped = []
        if guard:  # a step that would zero a whole tensor is not taken: a collapse
            n = len(local)
            nonzero, kept_counts = stats[3 : 3 + n], stats[3 + n :]
            wiped = [
                name
                for name, a, b in zip(pending.names, nonzero, kept_counts, strict=True)
                if a > 0 and b == 0
            ]
        if wiped:
            self._wipe_out(step, wiped, pending)
            return
        if prox:
            by_lr: dict[float, list[Tensor]] = {}
            for p, lr in zip(local, lrs, strict=True):
                by_lr.setdefault(lr * pending.strength, []).append(p)
            for threshold, tensors in by_lr.items():
                soft_threshold_(tensors, threshold)
        elif pending.active and pending.signs is not None and pending.leave_zero is not None:
            truncate_(local, pending.signs, pending.leave_zero)
        self._update(step, progress, cost_sum, pending)

    @property
    def _lr_known(self) -> bool:
        return self._needs_lr or self.optimizer is not None or self.lr is not None

    def _keep_zeros(self, step: int, local: list[Tensor], pending: Pending) -> None:
        """A step with the zero pattern frozen: the weights that were zero before the
        optimizer's step are zero again; the first such step freezes the pattern."""
        for w, zero in zip(local, pending.zeros or [], strict=True):
            w.masked_fill_(zero, 0.0)
        s = self._state
        if s["frozen_at"] is None:
            s["frozen_at"], s["is_active"] = step, False
            s["peak_lr"] = max(pending.peak_lr or 0.0, s["peak_lr"] or 0.0) or None
            _log.info(
                "CoherentStrongReg: zero pattern frozen at step %d (learning rate below %g of "
                "its peak %g); no more regularisation",
                step,
                self.freeze_below,
                s["peak_lr"],
            )
        s["num_steps"] = step + 1
        self.history.append({"step": step, "active": False, "strength": 0.0, "frozen": True})

    def _wipe_out(self, step: int, names: list[str], pending: Pending) -> None:
        """The proximal step would have zeroed every remaining weight of ``names``: it is not
        taken, the regulariser goes off, and the averages start afresh."""
        s = self._state
        s["is_active"], s["cost_ema"], s["progress_ema"] = False, None, None
        s["num_steps"], s["peak_lr"] = step + 1, pending.peak_lr
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
        self.history.append({"step": step, "active": False, "skipped": True})
        if self.scaler is None:
            warnings.warn(
                f"{who}: the loss gradient or a regularised weight is not finite at step {step}; "
                "the regulariser skipped this step and kept its state (pass `scaler=` to skip "
                "a GradScaler's inf steps silently)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _update(self, step: int, progress: float, cost: float, pending: Pending) -> None:
        s = self._state
        smooth_(s, progress, cost, self.smoothing)
        was_on = self.is_active
        if self.warmup == "auto" and s["ramp_start"] is None and step >= self.delay:
            self._wait_for_takeoff(step)
        if self.criterion == "descent" and self._started(step):
            descent_switch(s, self.max_undo, self.resume_undo)
        s["num_steps"] = step + 1
        s["peak_lr"] = pending.peak_lr
        undo = cost / progress if progress else math.inf if cost > 0 else 0.0
        self.history.append(
            {
                "step": step,
                "active": pending.active,
                "strength": pending.strength if pending.active else 0.0,
                "progress": progress,
                "cost": cost,
                "undo": undo,
                **pending.ratio_stats,
            }
        )
        if self.is_active != was_on:
            _log.info(
                "CoherentStrongReg: regulariser %s after step %d (undo %.3g)",
                "on" if self.is_active else "off",
                step,
                undo,
            )

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
        measures = ratio_measures(grads, local, params, self.kind, self.strength)
        if self._started(self.num_steps) and not math.isnan(measures["cosine"]):
            ratio_gate_update(self._state, measures, self.max_ratio, self.min_cosine,
                              self.window, self.reactivate)  # fmt: skip
        return measures  # a NaN cosine (non-finite gradient): after_step() skips this step

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (
            f"CoherentStrongReg(kind={self.kind!r}, strength={self.strength}, "
            f"l1_mode={self.l1_mode!r}, criterion={self.criterion!r}, "
            f"tensors={len(self.params)}, active={self.is_active}, steps={self.num_steps})"
        )

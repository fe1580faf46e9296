"""The per-tensor statistics and update rules behind :class:`~torch_recal.CoherentStrongReg`
(private): parameter selection, inner products, the regulariser's first-order cost, the L1
subgradient with its zero truncation, and sums over FSDP2 shards."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torch_recal import _dist
from torch_recal._checks import (
    check_flag,
    check_int,
    check_optional_int,
    check_optional_real,
    check_state_keys,
)
from torch_recal.compression import is_weight
from torch_recal.functional import coherence_statistics, group_shrink_factor

_WHO = "CoherentStrongReg"


def check_one_mesh(names: list[str], params: list[nn.Parameter]) -> None:
    """Sharded (DTensor) parameters must share one mesh and placement: their statistics are
    summed over that mesh's sharded dimensions in one collective."""
    sharded = [(n, p) for n, p in zip(names, params, strict=True) if _dist.is_dtensor(p)]
    if not sharded:
        return
    name0, first = sharded[0]
    layout = (first.device_mesh, first.placements)  # type: ignore[attr-defined]
    for name, p in sharded[1:]:
        if (p.device_mesh, p.placements) != layout:  # type: ignore[attr-defined]
            raise ValueError(
                f"{_WHO}: sharded parameters must share one device mesh and placement; "
                f"`{name}` ({p.placements}) differs from `{name0}` "  # type: ignore[attr-defined]
                f"({first.placements}): use one regulariser per layout"  # type: ignore[attr-defined]
            )


def select_params(
    params: Iterable[Any], weights_only: bool
) -> tuple[list[str], list[nn.Parameter]]:
    """Names and tensors to regularise from parameters or ``(name, parameter)`` pairs."""
    if isinstance(params, Tensor) or params is None or not isinstance(params, Iterable):
        raise TypeError(
            f"{_WHO}: `params` must be an iterable of parameters or (name, parameter) pairs "
            f"(e.g. model.named_parameters()), got {type(params).__name__}"
        )
    names: list[str] = []
    tensors: list[nn.Parameter] = []
    seen: set[int] = set()
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            name, p = f"params[{i}]", item
        if not isinstance(p, Tensor):
            raise TypeError(
                f"{_WHO}: `params` must hold Tensors or (name, Tensor) pairs, got "
                f"{type(p).__name__} at position {i}"
            )
        if id(p) in seen or (weights_only and not is_weight(name, p)):
            continue
        if not p.is_floating_point():
            raise TypeError(f"{_WHO}: `params` entry `{name}` must be floating point")
        if _dist.is_sharded(p) and not _dist.is_dtensor(p):
            raise TypeError(
                f"{_WHO}: `params` entry `{name}` is an FSDP1 flat parameter, which is not "
                "supported; use FSDP2 (fully_shard) or DDP"
            )
        if not p.requires_grad:
            continue
        seen.add(id(p))
        names.append(name)
        tensors.append(p)  # type: ignore[arg-type]
    if not tensors:
        raise ValueError(
            f"{_WHO}: `params` selected no tensor to regularise (with weights_only="
            f"{weights_only}, only tensors with requires_grad, at least 2 dims and a name not "
            "ending in 'bias' are kept)"
        )
    return names, tensors


@dataclass
class Pending:
    """What :meth:`CoherentStrongReg.after_step` needs from the :meth:`~CoherentStrongReg.step`
    before it."""

    names: list[str]
    params: list[Tensor]  # the parameters (DTensor or plain) regularised in this step
    before: Tensor  # sum of <g, w> before the optimizer's step (device scalar)
    active: bool
    strength: float  # the strength of this step (ramped during the warm-up)
    added: list[Tensor] | None = None  # what step() added to .grad (gradient forms)
    signs: list[Tensor] | None = None  # sign(w) before the step (L1 subgradient truncation)
    leave_zero: list[Tensor] | None = None  # zeros allowed to leave zero (L1 subgradient)
    ratio_stats: dict[str, float] = field(default_factory=dict)
    zeros: list[Tensor] | None = None  # frozen zero pattern: masks of the zeros before the step
    peak_lr: float | None = None  # the peak learning rate including this step's
    net_before: Tensor | None = None  # next-batch progress of the last step (device scalar)
    budget: tuple[float, bool] | None = None  # Budget: (sparsity asked for, threshold due)
    keep: list[Tensor] | None = None  # Budget(method="magnitude"): zeros kept through the step


def dots(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Per-tensor ``<a_i, b_i>`` in float64 (one value per tensor)."""
    pairs = zip(a, b, strict=True)
    return torch.stack(
        [torch.vdot(x.reshape(-1), y.reshape(-1).to(x.dtype)).double() for x, y in pairs]
    )


def first_order_cost(
    grads: list[Tensor],
    weights: list[Tensor],
    thresholds: list[float],
    kind: str,
    group: str | None = None,
) -> Tensor:
    """Per tensor, the first-order loss change ``<g, w_reg - w>`` of the decoupled
    regulariser step: soft-threshold by ``t`` (L1; per unit with ``group="unit"``), or
    ``w <- w - t w`` (L2)."""
    out = []
    for g, w, t in zip(grads, weights, thresholds, strict=True):
        if kind == "l1" and group == "unit":
            keep = group_shrink_factor(w, t).reshape(-1, *([1] * (w.ndim - 1)))
            out.append(-torch.vdot(g.reshape(-1), (w * (1 - keep)).reshape(-1)).double())
        elif kind == "l1":
            step = w.sign() * w.abs().clamp_max(t)  # w - soft_threshold(w, t)
            out.append(-torch.vdot(g.reshape(-1), step.reshape(-1)).double())
        else:
            out.append(-t * torch.vdot(g.reshape(-1), w.reshape(-1)).double())
    return torch.stack(out)


def l1_subgradient_(
    grads: list[Tensor], params: list[Tensor], lam: float
) -> tuple[list[Tensor], list[Tensor]]:
    """``g + lam * sign(w)`` where ``w != 0``; at ``w == 0`` the minimum-norm subgradient
    ``sign(g) * max(|g| - lam, 0)`` (zero unless the loss gradient beats the regulariser).
    Returns ``sign(w)`` and the mask of zeros allowed to leave zero, for the truncation."""
    signs = torch._foreach_sign(params)
    at_zero = torch._foreach_abs(signs)  # 1 where w != 0 ...
    torch._foreach_neg_(at_zero)
    torch._foreach_add_(at_zero, 1.0)  # ... now 1 where w == 0
    leaves = torch._foreach_abs(grads)  # 1 where |g| > lam, else 0
    torch._foreach_sub_(leaves, lam)
    torch._foreach_sign_(leaves)
    torch._foreach_clamp_min_(leaves, 0.0)
    shrink = torch._foreach_sign(grads)  # at zero: g - lam * sign(g) where |g| > lam, else 0
    torch._foreach_mul_(shrink, -lam)
    torch._foreach_add_(shrink, grads)
    torch._foreach_mul_(shrink, leaves)
    torch._foreach_mul_(grads, torch._foreach_abs(signs))  # elsewhere: g + lam * sign(w)
    torch._foreach_add_(grads, signs, alpha=lam)
    torch._foreach_mul_(shrink, at_zero)
    torch._foreach_add_(grads, shrink)
    torch._foreach_mul_(at_zero, leaves)  # zeros allowed to leave zero
    return list(signs), list(at_zero)


def truncate_(params: list[Tensor], signs: list[Tensor], leave_zero: list[Tensor]) -> None:
    """Zero the weights whose sign the step flipped, and the zeros that should have stayed."""
    keep = list(torch._foreach_sign(params))
    torch._foreach_mul_(keep, signs)  # +1 same side, -1 crossed, 0 was zero
    torch._foreach_clamp_min_(keep, 0.0)
    torch._foreach_add_(keep, leave_zero)
    torch._foreach_mul_(params, keep)


def sum_over_tensors(per_tensor: Tensor, params: list[Tensor]) -> Tensor:
    """Sum over dim 0 of per-tensor statistics, over whole tensors: the DTensor (FSDP2)
    slices' part is all-reduced over the ranks that hold the other slices (one collective),
    plain tensors count once."""
    sharded = [i for i, p in enumerate(params) if _dist.is_dtensor(p)]
    if not sharded:
        return per_tensor.sum(0)
    mask = torch.zeros(len(params), dtype=torch.bool, device=per_tensor.device)
    mask[sharded] = True
    part = per_tensor[mask].sum(0, keepdim=True)
    _dist.all_reduce_over_shards_(part, params[sharded[0]])
    return part[0] + per_tensor[~mask].sum(0)


def ratio_measures(
    grads: list[Tensor], weights: list[Tensor], params: list[Tensor], kind: str, strength: float
) -> dict[str, float]:
    """The first default's measures over all tensors: ``cos(g, r)`` and ``|r| / |g|`` with
    ``|r| = strength sqrt(n)`` for L1 (NaN when a gradient is not finite)."""
    per = torch.stack(
        [
            coherence_statistics([g], [w], kind).double()  # type: ignore[arg-type]
            for g, w in zip(grads, weights, strict=True)
        ]
    )
    dot, gg, rr = sum_over_tensors(per, params).tolist()
    if not all(math.isfinite(v) for v in (dot, gg, rr)):
        return {"cosine": math.nan, "ratio": math.nan}
    r_norm = strength * math.sqrt(sum(p.numel() for p in params) if kind == "l1" else rr)
    g_norm = math.sqrt(gg)
    cosine = dot / math.sqrt(gg * rr) if gg > 0 and rr > 0 else 0.0
    ratio = r_norm / g_norm if g_norm > 0 else (math.inf if r_norm > 0 else 0.0)
    return {"cosine": cosine, "ratio": ratio, "grad_norm": g_norm, "reg_norm": r_norm}


def check_gate_state(
    state: Any, keys: Iterable[str], warmup: int | str, delay: int, who: str
) -> dict[str, Any]:
    """The checked copy of a :meth:`~torch_recal.CoherentStrongReg.state_dict` (types,
    ranges, and consistency between the fields and with ``warmup`` and ``delay``)."""
    state = check_state_keys(state, [*keys, "last_step"], who=who)
    new: dict[str, Any] = {}
    for key in ("num_steps", "num_skipped", "streak"):
        new[key] = check_int(state[key], key, who=who, minimum=0)
    if new["num_skipped"] > new["num_steps"]:
        raise ValueError(f"{who}: `num_skipped` must be <= `num_steps`, got {new}")
    new["is_active"] = check_flag(state["is_active"], "is_active", who=who)
    for key in ("cost_ema", "progress_ema", "reference_progress", "peak_progress"):
        new[key] = check_optional_real(state[key], key, who=who)
    for key in ("ramp_start", "ramp_length"):
        new[key] = check_optional_int(state[key], key, who=who, minimum=0)
    for a, b in (
        ("cost_ema", "progress_ema"),
        ("reference_progress", "peak_progress"),
        ("ramp_start", "ramp_length"),
    ):
        if (new[a] is None) != (new[b] is None):
            raise ValueError(f"{who}: `{a}` and `{b}` must both be set or both be None")
    if warmup != "auto" and (new["ramp_start"], new["ramp_length"]) != (delay, warmup):
        raise ValueError(
            f"{who}: `ramp_start`/`ramp_length` must be ({delay}, {warmup}) for warmup={warmup} "
            f"and delay={delay}, got ({new['ramp_start']}, {new['ramp_length']})"
        )
    if new["ramp_start"] is not None and new["ramp_start"] > max(new["num_steps"], delay):
        raise ValueError(f"{who}: `ramp_start` must be <= `num_steps`, got {new}")
    new["peak_lr"] = check_optional_real(state["peak_lr"], "peak_lr", who=who, minimum=0,
                                         open_low=True)  # fmt: skip
    new["frozen_at"] = check_optional_int(state["frozen_at"], "frozen_at", who=who, minimum=0)
    if new["frozen_at"] is not None:
        if new["frozen_at"] >= new["num_steps"]:
            raise ValueError(f"{who}: `frozen_at` must be < `num_steps`, got {new}")
        if new["is_active"]:
            raise ValueError(f"{who}: `is_active` must be False once `frozen_at` is set")
    new["measured_step"] = check_optional_int(state["measured_step"], "measured_step", who=who,
                                              minimum=0)  # fmt: skip
    new["measured_cost"] = check_optional_real(state["measured_cost"], "measured_cost", who=who)
    new["measured_applied"] = check_flag(state["measured_applied"], "measured_applied", who=who)
    if (new["measured_step"] is None) != (new["measured_cost"] is None):
        raise ValueError(f"{who}: `measured_step` and `measured_cost` must both be set or None")
    if new["measured_step"] is not None and new["measured_step"] >= new["num_steps"]:
        raise ValueError(f"{who}: `measured_step` must be < `num_steps`, got {new}")
    limits = state["budget_limits"]
    if limits is not None and (
        not isinstance(limits, (list, tuple))
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in limits)
    ):  # fmt: skip
        raise ValueError(f"{who}: `budget_limits` must be None or a list of finite floats")
    new["budget_limits"] = None if limits is None else [float(v) for v in limits]
    new["budget_target"] = check_optional_real(state["budget_target"], "budget_target", who=who,
                                               minimum=0, maximum=1)  # fmt: skip
    if (new["measured_step"] is None) != (state["last_step"] is None):
        raise ValueError(
            f"{who}: `measured_step` and `last_step` must both be set (a step's change awaits "
            "its measurement) or both be None"
        )
    return new


# keys a state saved before the next-batch progress lacks, with the values it implies
OPTIONAL_STATE: dict[str, Any] = {
    "budget_limits": None,
    "budget_target": None,
    "measured_step": None,
    "measured_cost": None,
    "measured_applied": False,
    "last_step": None,
}


def survivors(
    weights: list[Tensor], thresholds: list[float], params: list[Tensor], group: str | None = None
) -> Tensor:
    """Per tensor (whole tensors: DTensor slices summed over their shards), ``[number of
    non-zero entries, number the proximal step keeps]`` (units with ``group="unit"``),
    shape ``(2, n)``, float64."""
    rows = []
    for w, t in zip(weights, thresholds, strict=True):
        if group == "unit":
            units = w.reshape(w.shape[0], -1)
            alive = torch.count_nonzero(units.abs().amax(1) > 0)
            rows.append(torch.stack([alive, torch.count_nonzero(group_shrink_factor(w, t))]))
        else:
            rows.append(torch.stack([torch.count_nonzero(w), torch.count_nonzero(w.abs() > t)]))
    counts = torch.stack(rows).double().T.contiguous()
    sharded = [i for i, p in enumerate(params) if _dist.is_dtensor(p)]
    if sharded:
        part = counts[:, sharded].contiguous()
        _dist.all_reduce_over_shards_(part, params[sharded[0]])
        counts[:, sharded] = part
    return counts


def check_last_step(value: Any, params: Sequence[Tensor], who: str) -> list[Tensor | None] | None:
    """The checked copy of the state's ``last_step`` (the last step's weight change: one entry
    per regularised tensor, a tensor of its local shape or ``None`` for a tensor that step
    did not train; ``None``: nothing to measure)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != len(params):
        raise ValueError(
            f"{who}: `last_step` must be None or a list of {len(params)} entries (one per "
            f"regularised tensor), got {type(value).__name__}"
        )
    out: list[Tensor | None] = []
    for i, (v, p) in enumerate(zip(value, params, strict=True)):
        if v is None:
            out.append(None)
            continue
        local = _dist.local_tensor(p)
        if not isinstance(v, Tensor):
            raise TypeError(f"{who}: `last_step[{i}]` must be a tensor, got {type(v).__name__}")
        if v.shape != local.shape:
            raise ValueError(
                f"{who}: `last_step[{i}]` must have shape {tuple(local.shape)}, "
                f"got {tuple(v.shape)}"
            )
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise ValueError(f"{who}: `last_step[{i}]` must be finite floating point")
        out.append(v.detach().to(device=local.device, dtype=local.dtype).clone())
    if all(v is None for v in out):
        raise ValueError(f"{who}: `last_step` must hold at least one tensor (or be None)")
    return out


# --------------------------------------------------------------------------- gate updates
def smooth_(state: dict[str, Any], progress: float, cost: float, beta: float) -> None:
    """The descent criterion's averages: the first step sets them, later ones are EMAs."""
    if state["progress_ema"] is None:
        state["progress_ema"], state["cost_ema"] = progress, cost
    else:
        state["progress_ema"] = beta * state["progress_ema"] + (1 - beta) * progress
        state["cost_ema"] = beta * state["cost_ema"] + (1 - beta) * cost


def descent_switch(state: dict[str, Any], max_undo: float, resume_undo: float) -> None:
    """Off above ``max_undo`` of the progress undone, on again below ``resume_undo``."""
    if state["is_active"] and state["cost_ema"] > max_undo * state["progress_ema"]:
        state["is_active"] = False
    elif not state["is_active"] and state["cost_ema"] < resume_undo * state["progress_ema"]:
        state["is_active"] = True


def ratio_gate_update(
    state: dict[str, Any],
    measures: dict[str, float],
    max_ratio: float | None,
    min_cosine: float | None,
    window: int,
    reactivate: bool,
) -> None:
    """The first default's switch: off after ``window`` incoherent steps in a row
    (``|r|/|g| > max_ratio`` or ``cos(g, r) < min_cosine``), on again after ``window``
    coherent ones when ``reactivate``."""
    cosine, ratio = measures["cosine"], measures["ratio"]
    bad = (max_ratio is not None and ratio > max_ratio) or (
        min_cosine is not None and cosine < min_cosine
    )
    if state["is_active"]:
        state["streak"] = state["streak"] + 1 if bad else 0
        if state["streak"] >= window:
            state["is_active"], state["streak"] = False, 0
    elif reactivate:
        state["streak"] = state["streak"] + 1 if not bad else 0
        if state["streak"] >= window:
            state["is_active"], state["streak"] = True, 0


REFERENCE_STEPS = 5  # steps after `delay` whose progress is the take-off reference
RAMP_PER_WAIT = 4  # warmup="auto": ramp over this many times the steps the take-off took


def takeoff_update(state: dict[str, Any], step: int, delay: int, takeoff: float) -> int | None:
    """``warmup="auto"``: start the ramp once the optimizer's progress has grown
    ``takeoff``-fold over its level after the first steps, or fallen to half its peak (a
    problem learnt fast from the start, or a trained model being fine-tuned); returns the
    ramp's length when it starts, else ``None``."""
    waited = step - delay + 1
    if waited == REFERENCE_STEPS:
        state["reference_progress"] = state["peak_progress"] = state["progress_ema"]
    reference, progress = state["reference_progress"], state["progress_ema"]
    if reference is None or waited <= REFERENCE_STEPS:
        return None
    state["peak_progress"] = max(state["peak_progress"], progress)
    grown = reference > 0 and progress >= takeoff * reference
    if grown or progress <= 0.5 * state["peak_progress"]:
        state["ramp_start"], state["ramp_length"] = step + 1, RAMP_PER_WAIT * waited
        state["is_active"] = True
        return RAMP_PER_WAIT * waited
    return None


def freezes_now(lrs: list[float], peak_lr: float | None, fraction: float | None) -> bool:
    """``freeze_below``: whether this step's learning rate is below ``fraction`` of the peak
    (the peak including this step's)."""
    if fraction is None or not lrs:
        return False
    return max(lrs) < fraction * max([*lrs, peak_lr or 0.0])


def add_to_grad_(
    kind: str, grads: list[Tensor], local: list[Tensor], strength: float, pending: Pending
) -> list[Tensor]:
    """Add the regulariser's gradient (L2 or the L1 subgradient) to ``.grad``; returns what
    was added."""
    original = [g.clone() for g in grads]
    if kind == "l2":
        torch._foreach_add_(grads, local, alpha=strength)
    else:
        pending.signs, pending.leave_zero = l1_subgradient_(grads, local, strength)
    return list(torch._foreach_sub(grads, original))

"""Gradient-coherent strong L1/L2 regularisation and a compression report.

A strong L1 or L2 penalty trained with SGD easily makes learning fail: the regulariser's
gradient swamps the loss gradient, the weights collapse and the loss gradient vanishes.
:class:`CoherentStrongReg` imposes the strong regulariser only while the gradients stay
coherent, judged each step from the loss gradient ``g`` (the ``.grad`` that
``loss.backward()`` left, already all-reduced under DDP) and the regulariser's gradient
``r`` over all regularised tensors:

* ``cosine = <g, r> / (|g| |r|)`` and ``ratio = |r| / |g|`` (one fused reduction, one
  host-device sync per step); for L1, ``|r| = strength * sqrt(n)`` over the ``n``
  regularised weights (the subgradient at a zero weight can reach ``strength``);
* a step is *incoherent* when ``ratio > max_ratio`` (the loss gradient is dominated) or
  ``cosine < min_cosine`` (it points against the regulariser);
* after ``window`` consecutive incoherent steps the regulariser is switched off; with
  ``reactivate=True`` it is switched back on after ``window`` consecutive coherent steps.

The exact criterion of the paper could not be read here (only its abstract and
introduction); this is the library's documented default, see ``docs/methods/coherent.md``.

Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
https://arxiv.org/abs/1811.08056
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_recal import _dist
from torch_recal.functional import coherence_statistics, soft_threshold_

__all__ = ["CoherentStrongReg", "CompressionReport", "LayerSparsity", "compression_report"]

_KINDS = ("l1", "l2")
_L1_MODES = ("subgradient", "prox")
_PAPER = "https://arxiv.org/abs/1811.08056"


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_one_mesh(names: list[str], params: list[nn.Parameter]) -> None:
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
                f"CoherentStrongReg: sharded parameters must share one device mesh and "
                f"placement; `{name}` ({p.placements}) differs from `{name0}` "  # type: ignore[attr-defined]
                f"({first.placements}): use one regulariser per layout"  # type: ignore[attr-defined]
            )


def _is_weight(name: str, p: Tensor) -> bool:
    """The ``weights_only`` rule: at least 2 dims and a name that does not end in ``bias``."""
    return p.ndim >= 2 and name.rsplit(".", 1)[-1] != "bias"


def _select_params(
    params: Iterable[Any], weights_only: bool
) -> tuple[list[str], list[nn.Parameter]]:
    """Names and tensors to regularise from parameters or ``(name, parameter)`` pairs."""
    if isinstance(params, Tensor):
        raise TypeError(
            "CoherentStrongReg: `params` must be an iterable of parameters or (name, parameter) "
            "pairs (e.g. model.named_parameters()), got a single Tensor"
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
                "CoherentStrongReg: `params` must hold Tensors or (name, Tensor) pairs, got "
                f"{type(p).__name__} at position {i}"
            )
        if id(p) in seen:
            continue
        if weights_only and not _is_weight(name, p):
            continue
        if not p.is_floating_point():
            raise TypeError(f"CoherentStrongReg: parameter `{name}` must be floating point")
        if _dist.is_sharded(p) and not _dist.is_dtensor(p):
            raise TypeError(
                f"CoherentStrongReg: parameter `{name}` is an FSDP1 flat parameter, which is "
                "not supported; use FSDP2 (fully_shard) or DDP"
            )
        if not p.requires_grad:
            continue
        seen.add(id(p))
        names.append(name)
        tensors.append(p)  # type: ignore[arg-type]
    if not tensors:
        raise ValueError(
            "CoherentStrongReg: `params` selected no tensor to regularise (with "
            f"weights_only={weights_only}, only tensors with requires_grad, at least 2 dims and "
            "a name not ending in 'bias' are kept)"
        )
    return names, tensors


class CoherentStrongReg:
    """Strong L1/L2 regularisation imposed only while the gradients stay coherent.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``: it measures
    the coherence of the current loss gradients with the regulariser's gradient, updates the
    on/off state and, when on, adds the regulariser's gradient to ``.grad`` (L2:
    ``strength * w``, exactly what SGD's ``weight_decay`` adds; L1 with
    ``l1_mode="subgradient"``: ``strength * sign(w)``, and at ``w == 0`` the minimum-norm
    subgradient ``sign(g) max(|g| - strength, 0)``). Call :meth:`after_step` after
    ``optimizer.step()``: for ``l1_mode="prox"`` it applies the soft-threshold
    ``w <- sign(w) max(|w| - lr * strength, 0)`` (the regulariser is not added to the
    gradient in that mode); for ``"subgradient"`` it sets to exactly zero the weights that
    the step pushed across zero, and keeps a zero weight at zero unless its loss gradient
    exceeded ``strength`` (momentum cannot drag it away). So in
    both L1 modes the weights the regulariser removes are exact zeros, which is what
    :func:`compression_report` counts.

    Which tensors: by default (``weights_only=True``) the weights of conv/linear layers,
    told apart from biases and norm parameters as the tensors with at least 2 dims whose
    name does not end in ``bias`` (embeddings are 2-D too: pass explicit pairs to exclude
    them). Frozen tensors (``requires_grad=False``) are skipped.

    Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
    https://arxiv.org/abs/1811.08056 (the criterion's defaults are this library's; see
    ``docs/methods/coherent.md`` for what is verified and what is chosen).

    Args:
        params: parameters or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        kind: ``"l1"`` or ``"l2"``.
        strength: the regularisation strength (lambda), a positive float.
        l1_mode: ``"subgradient"`` (default) or ``"prox"`` (needs ``lr`` or ``optimizer``).
        max_ratio: a step is incoherent when ``|r| / |g| > max_ratio`` (``None``: unused).
        min_cosine: a step is incoherent when ``cos(g, r) < min_cosine`` (``None``: unused).
        window: consecutive incoherent (coherent) steps needed to switch off (on).
        reactivate: switch the regulariser back on after ``window`` coherent steps.
        delay: number of initial steps without any regularisation (Delayed Strong
            Regularization, the authors' earlier method); ``0`` starts at once.
        gate: ``False`` imposes the regulariser on every step after ``delay`` (the plain or
            delayed baselines), while still recording the coherence measures.
        lr: learning rate for ``l1_mode="prox"`` (ignored when ``optimizer`` is given).
        optimizer: the optimizer, read at each :meth:`after_step` for per-group learning rates.
        weights_only: keep only conv/linear weights (see above).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import CoherentStrongReg
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> reg = CoherentStrongReg(model.named_parameters(), kind="l1", strength=1e-3)
        >>> reg.names
        ['0.weight', '2.weight']
        >>> loss = model(torch.randn(16, 4)).square().mean()
        >>> loss.backward()
        >>> reg.step()
        >>> opt.step()
        >>> reg.after_step()
        >>> reg.is_active, len(reg.history)
        (True, 1)
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        kind: str = "l1",
        strength: float,
        l1_mode: str = "subgradient",
        max_ratio: float | None = 4.0,
        min_cosine: float | None = None,
        window: int = 2,
        reactivate: bool = True,
        delay: int = 0,
        gate: bool = True,
        lr: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        weights_only: bool = True,
    ) -> None:
        name = "CoherentStrongReg"
        if kind not in _KINDS:
            raise ValueError(f"{name}: `kind` must be one of {_KINDS}, got {kind!r}")
        if not (_is_real(strength) and strength > 0):
            raise ValueError(
                f"{name}: `strength` must be a positive finite float, got {strength!r}"
            )
        if l1_mode not in _L1_MODES:
            raise ValueError(f"{name}: `l1_mode` must be one of {_L1_MODES}, got {l1_mode!r}")
        if max_ratio is not None and not (_is_real(max_ratio) and max_ratio > 0):
            raise ValueError(
                f"{name}: `max_ratio` must be a positive float or None, got {max_ratio!r}"
            )
        if min_cosine is not None and not (_is_real(min_cosine) and -1 <= min_cosine <= 1):
            raise ValueError(f"{name}: `min_cosine` must be in [-1, 1] or None, got {min_cosine!r}")
        if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
            raise ValueError(f"{name}: `window` must be an int >= 1, got {window!r}")
        if not (isinstance(delay, int) and not isinstance(delay, bool) and delay >= 0):
            raise ValueError(f"{name}: `delay` must be an int >= 0, got {delay!r}")
        if lr is not None and not (_is_real(lr) and lr > 0):
            raise ValueError(f"{name}: `lr` must be a positive float or None, got {lr!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{name}: `optimizer` must be a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        if kind == "l1" and l1_mode == "prox" and lr is None and optimizer is None:
            raise ValueError(
                f"{name}: l1_mode='prox' needs `lr=` or `optimizer=` for the threshold"
            )
        self.names, self.params = _select_params(params, bool(weights_only))
        _check_one_mesh(self.names, self.params)
        self._live: tuple[list[str], list[Tensor]] = (self.names, list(self.params))
        self.kind = kind
        self.strength = float(strength)
        self.l1_mode = l1_mode
        self.max_ratio = None if max_ratio is None else float(max_ratio)
        self.min_cosine = None if min_cosine is None else float(min_cosine)
        self.window = window
        self.reactivate = bool(reactivate)
        self.delay = delay
        self.gate = bool(gate)
        self.lr = None if lr is None else float(lr)
        self.optimizer = optimizer
        self.num_steps = 0
        self.is_active = delay == 0
        self._streak = 0
        self.history: list[dict[str, Any]] = []
        self._pending: str | None = None  # what after_step() has to do for the last step()
        self._signs: list[Tensor] | None = None
        self._leave_zero: list[Tensor] | None = None

    # ------------------------------------------------------------------ the gate
    def _incoherent(self, cosine: float, ratio: float) -> bool:
        if self.max_ratio is not None and ratio > self.max_ratio:
            return True
        return self.min_cosine is not None and cosine < self.min_cosine

    def _update_state(self, cosine: float, ratio: float) -> None:
        if self.num_steps < self.delay:
            self.is_active, self._streak = False, 0
            return
        if self.num_steps == self.delay:
            self.is_active, self._streak = True, 0
        if not self.gate:
            return
        bad = self._incoherent(cosine, ratio)
        if self.is_active:
            self._streak = self._streak + 1 if bad else 0
            if self._streak >= self.window:
                self.is_active, self._streak = False, 0
        elif self.reactivate:
            self._streak = self._streak + 1 if not bad else 0
            if self._streak >= self.window:
                self.is_active, self._streak = True, 0

    @torch.no_grad()
    def step(self) -> None:
        """Measure coherence, update the on/off state and add the regulariser if it is on.

        Call after ``loss.backward()`` and before ``optimizer.step()``.

        Raises:
            RuntimeError: a regularised parameter has no ``.grad``.
        """
        # Tensors frozen right now (requires_grad=False, e.g. by RandomLayerTraining) are
        # neither updated by the optimizer nor regularised in this step.
        live = [(n, p) for n, p in zip(self.names, self.params, strict=True) if p.requires_grad]
        missing = [n for n, p in live if p.grad is None]
        if missing or not live:
            raise RuntimeError(
                "CoherentStrongReg.step: these regularised parameters have no .grad (call "
                f"step() after loss.backward(), and pass only parameters the loss uses): "
                f"{missing or 'none requires grad'}"
            )
        names = [n for n, _ in live]
        params: list[Tensor] = [p for _, p in live]
        # elementwise work on this rank's slices of FSDP2 / DTensor parameters (views)
        local_params = [_dist.local_tensor(p) for p in params]
        grads: list[Tensor] = [_dist.local_tensor(p.grad) for p in params]  # type: ignore[arg-type]  # fmt: skip
        stats = self._statistics(grads, local_params, params)
        dot, gg, rr = stats.tolist()  # the one host-device sync of the step
        g_norm = math.sqrt(gg)
        # L1: at w == 0 the regulariser's subgradient can reach `strength` in size (it is
        # what holds a zero weight at zero), so |r| counts every entry: strength * sqrt(n).
        numel = sum(p.numel() for p in params)
        r_norm = self.strength * math.sqrt(numel if self.kind == "l1" else rr)
        cosine = dot / math.sqrt(gg * rr) if gg > 0 and rr > 0 else 0.0
        ratio = r_norm / g_norm if g_norm > 0 else (math.inf if r_norm > 0 else 0.0)
        self._update_state(cosine, ratio)
        self._pending, self._signs, self._leave_zero = None, None, None
        self._live = (names, params)
        if self.is_active:
            if self.kind == "l2":
                torch._foreach_add_(grads, local_params, alpha=self.strength)
            elif self.l1_mode == "subgradient":
                self._l1_subgradient_(grads, local_params)
                self._pending = "truncate"
            else:
                self._pending = "prox"
        self.history.append(
            {
                "step": self.num_steps,
                "active": self.is_active,
                "cosine": cosine,
                "ratio": ratio,
                "grad_norm": g_norm,
                "reg_norm": r_norm,
            }
        )
        self.num_steps += 1

    def _statistics(
        self,
        grads: list[Tensor],
        local_params: list[Tensor],
        params: list[Tensor],
    ) -> Tensor:
        """``[<g, r>, |g|^2, |r|^2]`` over the whole tensors: DTensor (FSDP2) slices are
        reduced over the ranks that hold the other slices, plain tensors are counted once."""
        sharded = [i for i, p in enumerate(params) if _dist.is_dtensor(p)]
        if not sharded:
            return coherence_statistics(grads, local_params, self.kind)
        plain = [i for i, p in enumerate(params) if not _dist.is_dtensor(p)]
        stats = coherence_statistics(
            [grads[i] for i in sharded], [local_params[i] for i in sharded], self.kind
        )
        _dist.all_reduce_over_shards_(stats, params[sharded[0]])  # one mesh: checked at init
        if plain:
            stats = stats + coherence_statistics(
                [grads[i] for i in plain], [local_params[i] for i in plain], self.kind
            )
        return stats

    def _l1_subgradient_(self, grads: list[Tensor], params: list[Tensor]) -> None:
        """``g + strength * sign(w)`` where ``w != 0``; at ``w == 0`` the minimum-norm
        subgradient ``sign(g) * max(|g| - strength, 0)`` (zero unless the loss gradient beats
        the regulariser). Keeps what :meth:`after_step` needs."""
        lam = self.strength
        signs = torch._foreach_sign(params)
        at_zero = torch._foreach_abs(signs)  # 1 where w != 0 ...
        torch._foreach_neg_(at_zero)
        torch._foreach_add_(at_zero, 1.0)  # ... now 1 where w == 0
        leaves = torch._foreach_abs(grads)  # 1 where |g| > strength, else 0
        torch._foreach_sub_(leaves, lam)
        torch._foreach_sign_(leaves)
        torch._foreach_clamp_min_(leaves, 0.0)
        # at zero: g - strength * sign(g) where |g| > strength, else 0
        shrink = torch._foreach_sign(grads)
        torch._foreach_mul_(shrink, -lam)
        torch._foreach_add_(shrink, grads)
        torch._foreach_mul_(shrink, leaves)
        # elsewhere: g + strength * sign(w)   (sign(w) = 0 at zero, so that term vanishes)
        torch._foreach_mul_(grads, torch._foreach_abs(signs))
        torch._foreach_add_(grads, signs, alpha=lam)
        torch._foreach_mul_(shrink, at_zero)
        torch._foreach_add_(grads, shrink)
        torch._foreach_mul_(at_zero, leaves)  # zeros allowed to leave zero
        self._signs, self._leave_zero = list(signs), list(at_zero)

    def _group_lrs(self, names: list[str], params: list[Tensor]) -> list[float]:
        if self.optimizer is None:
            return [float(self.lr)] * len(params)  # type: ignore[arg-type]
        lr_of: dict[int, float] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                lr_of[id(p)] = float(group["lr"])
        out = []
        for n, p in zip(names, params, strict=True):
            if id(p) not in lr_of:
                raise ValueError(f"CoherentStrongReg.after_step: `{n}` is not in `optimizer`")
            out.append(lr_of[id(p)])
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """Finish the L1 update after ``optimizer.step()`` (a no-op for L2 or when off).

        ``l1_mode="prox"``: soft-threshold by ``lr * strength`` (zeros stay zero unless the
        loss step moved them by more than the threshold). ``"subgradient"``: weights whose
        sign the step flipped are set to exactly zero, and zero weights whose loss gradient
        did not exceed ``strength`` are put back to exactly zero.
        """
        pending, self._pending = self._pending, None
        if pending is None:  # L2, gate off, or no step() since the last call
            return
        names, originals = self._live
        params = [_dist.local_tensor(p) for p in originals]  # DTensor: this rank's slice
        if pending == "prox":
            by_lr: dict[float, list[Tensor]] = {}
            for p, lr in zip(params, self._group_lrs(names, originals), strict=True):
                by_lr.setdefault(lr, []).append(p)
            for lr, tensors in by_lr.items():
                soft_threshold_(tensors, lr * self.strength)
        elif pending == "truncate" and self._signs is not None and self._leave_zero is not None:
            # keep = 1 where the weight stayed on its side, or was zero and its loss gradient
            # beat the regulariser; 0 where the step crossed zero, or moved a zero weight
            # that should have stayed (e.g. through the momentum buffer).
            keep = list(torch._foreach_sign(params))
            torch._foreach_mul_(keep, self._signs)  # +1 same side, -1 crossed, 0 was zero
            torch._foreach_clamp_min_(keep, 0.0)
            torch._foreach_add_(keep, self._leave_zero)
            torch._foreach_mul_(params, keep)
        self._signs, self._leave_zero = None, None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: counters, the on/off state and the history.

        Example:
            >>> import torch
            >>> from torch_recal import CoherentStrongReg
            >>> reg = CoherentStrongReg([torch.nn.Parameter(torch.ones(2, 2))], strength=0.1)
            >>> sorted(reg.state_dict())
            ['history', 'is_active', 'num_steps', 'streak']
        """
        return {
            "num_steps": self.num_steps,
            "is_active": self.is_active,
            "streak": self._streak,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (checked before anything changes)."""
        keys = {"num_steps", "is_active", "streak", "history"}
        if not isinstance(state, dict) or not keys <= set(state):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                "CoherentStrongReg.load_state_dict: `state` must have keys "
                f"{sorted(keys)}, got {got}"
            )
        num_steps, streak = state["num_steps"], state["streak"]
        if not (isinstance(num_steps, int) and num_steps >= 0 and isinstance(streak, int)):
            raise ValueError(
                "CoherentStrongReg.load_state_dict: `num_steps` and `streak` must be non-negative "
                f"ints, got {num_steps!r} and {streak!r}"
            )
        self.num_steps = num_steps
        self.is_active = bool(state["is_active"])
        self._streak = streak
        self.history = [dict(h) for h in state["history"]]
        self._pending, self._signs, self._leave_zero = None, None, None

    def __repr__(self) -> str:
        return (
            f"CoherentStrongReg(kind={self.kind!r}, strength={self.strength}, "
            f"l1_mode={self.l1_mode!r}, tensors={len(self.params)}, active={self.is_active}, "
            f"steps={self.num_steps})"
        )


@dataclass(frozen=True)
class LayerSparsity:
    """Zero count of one tensor in a :class:`CompressionReport`."""

    name: str
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class CompressionReport:
    """Per-tensor and total sparsity; ``str(report)`` is a table.

    ``compression_ratio`` is dense parameters / non-zero parameters over the reported
    tensors, as the paper defines it (``inf`` when every weight is zero).
    """

    layers: tuple[LayerSparsity, ...]
    threshold: float

    @property
    def total(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return self.total - self.zeros

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.total / self.nonzeros if self.nonzeros else math.inf

    def __str__(self) -> str:
        rows = [(x.name, str(x.numel), str(x.zeros), f"{x.sparsity:.2%}") for x in self.layers]
        rows.append(("total", str(self.total), str(self.zeros), f"{self.sparsity:.2%}"))
        head = ("tensor", "params", "zeros", "sparsity")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()
        out = [line, "-" * len(line)]
        out += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        out.append(f"compression ratio (dense / non-zero): {self.compression_ratio:.2f}x")
        return "\n".join(out)


@torch.no_grad()
def compression_report(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    *,
    threshold: float = 0.0,
    weights_only: bool = True,
) -> CompressionReport:
    """Count zero (or ``|w| <= threshold``) weights per tensor and in total.

    Paper: Park et al., https://arxiv.org/abs/1811.08056 (compression ratio = dense
    parameters / non-zero parameters).

    Args:
        model: a module, or ``(name, tensor)`` pairs.
        threshold: weights with ``|w| <= threshold`` count as zero; ``0.0`` counts exact zeros.
        weights_only: report only tensors with at least 2 dims whose name does not end in
            ``bias`` (the tensors :class:`CoherentStrongReg` regularises by default).

    Returns:
        A :class:`CompressionReport`; print it for a table.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import compression_report
        >>> layer = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     layer.weight[:, :3] = 0.0
        >>> report = compression_report(layer)
        >>> report.zeros, report.total, report.compression_ratio
        (6, 8, 4.0)
    """
    if not (_is_real(threshold) and threshold >= 0):
        raise ValueError(
            f"compression_report: `threshold` must be a non-negative float, got {threshold!r}"
        )
    if isinstance(model, nn.Module):
        pairs: Iterable[tuple[str, Tensor]] = model.named_parameters()
    elif isinstance(model, Tensor):
        raise TypeError("compression_report: `model` must be a Module or (name, tensor) pairs")
    else:
        pairs = model
    layers = []
    for name, p in pairs:
        if weights_only and not _is_weight(name, p):
            continue
        local = _dist.local_tensor(p.detach())  # FSDP2 / DTensor: count this rank's slice
        nonzero_t = torch.count_nonzero(local.abs() > threshold).reshape(1)
        if _dist.is_dtensor(p):  # ... and add the other slices' counts (a collective)
            _dist.all_reduce_over_shards_(nonzero_t, p)
        nonzero = int(nonzero_t.item())
        layers.append(LayerSparsity(name, p.numel(), p.numel() - nonzero))
    return CompressionReport(tuple(layers), float(threshold))

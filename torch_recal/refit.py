"""Fast retraining: closed-form (MP-inverse / ridge) refit of dense layers, streamed.

* :func:`pinv_refit_dense` solves ``min ||H W^T + b - T||^2 + ridge * ||W||^2`` (bias not
  penalised: the same solution as scikit-learn's ``Ridge(alpha=ridge, fit_intercept=True)``)
  for a trained network's dense layer, from one pass over the data, in O(d^2 + d k) memory.
* :class:`NormalEquations` is the reusable float64 accumulator behind it
  (``update``/``merge``/``all_reduce``/``solve``, torchmetrics-style).
* :class:`RandomLayerTraining` is the paper's "random learning strategy": each epoch only a
  random part of the conv layers/blocks is trainable.

Papers: Wu, Zhang, Yang, "Deep Networks with Fast Retraining", https://arxiv.org/abs/2008.07387;
Yang et al., "Recomputation of the dense layers for the performance improvement of DCNN",
TPAMI 2019, https://arxiv.org/abs/1809.05606.

Numerics. Each batch is centred on its own mean and its centred Gram products are merged
into running centred statistics with Chan et al.'s pairwise update (float64). The Gram
product is symmetric, so only its lower block triangle is computed (block rows of
``_gram_block(d)`` columns: 0.53-0.69x the time of the full GEMM for d = 256 ... 2048,
``benchmarks/bench_refit.py --blocks``)
and the upper triangle is mirrored once, when the statistics are read. The bias is
then ``b = mean(T) - W mean(H)``, i.e. the augmented system with an unpenalised bias row
is solved by eliminating the bias exactly, without forming the ill-conditioned uncentred
``[H 1]^T [H 1]``. The centred system is Jacobi-scaled (unit diagonal) and solved by
Cholesky; when Cholesky fails or the system looks ill-conditioned, an eigendecomposition of
the unscaled system gives the (minimum-norm) pseudo-inverse solution.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from torch_recal import _dist

__all__ = [
    "NormalEquations",
    "RandomLayerTraining",
    "RefitResult",
    "RidgeSolution",
    "pinv_refit_dense",
]

# Above this (lower-bound) condition estimate of the scaled system, Cholesky's answer is not
# trusted and the eigendecomposition is used instead.
_COND_LIMIT = 1e10
_TARGETS = ("onehot", "bipolar", "raw")
_STARTS = ("zero", "current")
_CLAMP = 1e-3  # targets are clamped this far inside the domain of logit/atanh


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class RidgeSolution(NamedTuple):
    """What :meth:`NormalEquations.solve` returns (float64 tensors).

    Attributes:
        weight: ``(num_outputs, num_features)``, the ``nn.Linear`` layout.
        bias: ``(num_outputs,)``, or ``None`` when ``fit_intercept=False``.
        solver: ``"cholesky"`` or ``"eigh"`` (the pseudo-inverse fallback).
        condition: 2-norm condition estimate of the solved system: exact for ``"eigh"``; for
            ``"cholesky"`` the cheap lower bound ``(max diag L / min diag L)^2`` of the
            Jacobi-scaled system.
    """

    weight: Tensor
    bias: Tensor | None
    solver: str
    condition: float


class NormalEquations:
    """Streaming float64 sufficient statistics of a least-squares problem ``H W^T + b ~ T``.

    Holds the sample count, the means of ``H`` and ``T`` and the centred scatter matrices
    ``S_hh = sum (h - mean_h)(h - mean_h)^T`` (d x d), ``S_ht`` (d x k) and the diagonal of
    ``S_tt`` (k), so memory is O(d^2 + d k) however many samples go in. Batches are merged
    with Chan et al.'s pairwise update, which stays accurate when features have a large
    mean. Under ``torch.distributed`` :meth:`all_reduce` combines the ranks' statistics so that
    every rank then holds the statistics of the union of the data.

    Paper: https://arxiv.org/abs/2008.07387 (the dense-layer solve of fast retraining).

    Args:
        num_features: ``d``, the width of ``H``.
        num_outputs: ``k``, the width of ``T``.
        fit_intercept: solve for an unpenalised bias (otherwise ``b = 0`` and the problem is
            uncentred, like ``Ridge(fit_intercept=False)``).
        device: where the statistics live (default CPU).

    Example:
        >>> import torch
        >>> from torch_recal import NormalEquations
        >>> h = torch.randn(100, 5, dtype=torch.float64)
        >>> t = h @ torch.randn(5, 3, dtype=torch.float64) + 2.0
        >>> acc = NormalEquations(5, 3)
        >>> for i in range(0, 100, 32):
        ...     acc.update(h[i : i + 32], t[i : i + 32])
        >>> sol = acc.solve(ridge=0.0)
        >>> torch.allclose(h @ sol.weight.T + sol.bias, t), sol.solver, acc.count
        (True, 'cholesky', 100)
    """

    def __init__(
        self,
        num_features: int,
        num_outputs: int,
        *,
        fit_intercept: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("num_features", num_features), ("num_outputs", num_outputs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NormalEquations: `{name}` must be a positive int, got {value!r}")
        self.num_features = num_features
        self.num_outputs = num_outputs
        self.fit_intercept = bool(fit_intercept)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    # -- accumulation ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything accumulated so far."""
        d, k, f64 = self.num_features, self.num_outputs, torch.float64
        self._n = 0.0  # a host float: no device sync per batch
        self.mean_h = torch.zeros(d, device=self.device, dtype=f64)
        self.mean_t = torch.zeros(k, device=self.device, dtype=f64)
        self._s_hh = torch.zeros(d, d, device=self.device, dtype=f64)
        self._upper_stale = False  # only the lower triangle of _s_hh is current
        self.s_ht = torch.zeros(d, k, device=self.device, dtype=f64)
        self.s_tt = torch.zeros(k, device=self.device, dtype=f64)

    @property
    def s_hh(self) -> Tensor:
        """The centred scatter matrix ``sum (h - mean_h)(h - mean_h)^T`` (d x d, float64)."""
        if self._upper_stale:  # mirror the lower triangle, which update() keeps current
            s, d = self._s_hh, self.num_features
            step = _gram_block(d)
            for r0 in range(0, d, step):  # block by block: touches the upper half only
                r1 = min(r0 + step, d)
                diag = s[r0:r1, r0:r1]
                diag.copy_(diag.tril() + diag.tril(-1).T)
                s[r0:r1, r1:].copy_(s[r1:, r0:r1].T)
            self._upper_stale = False
        return self._s_hh

    @property
    def count(self) -> int:
        """Number of samples accumulated."""
        return int(self._n)

    def update(self, h: Tensor, t: Tensor) -> None:
        """Add a batch: ``h`` of shape ``(n, num_features)``, ``t`` of shape ``(n, num_outputs)``.

        The batch's centred Gram products run in the features' dtype (float32 for
        float16/bfloat16 inputs); the merge into the running statistics is float64.
        """
        if not isinstance(h, Tensor) or not isinstance(t, Tensor):
            raise TypeError("NormalEquations.update: `h` and `t` must be tensors")
        if h.ndim != 2 or h.shape[1] != self.num_features:
            raise ValueError(
                f"NormalEquations.update: `h` must have shape (n, {self.num_features}), "
                f"got {tuple(h.shape)}"
            )
        if t.ndim != 2 or t.shape != (h.shape[0], self.num_outputs):
            raise ValueError(
                f"NormalEquations.update: `t` must have shape ({h.shape[0]}, "
                f"{self.num_outputs}), got {tuple(t.shape)}"
            )
        n_b = h.shape[0]
        if n_b == 0:
            return
        cdt = _compute_dtype(torch.promote_types(h.dtype, t.dtype))
        h = h.to(self.device, cdt)
        t = t.to(self.device, cdt)
        if self.fit_intercept:
            m_h, m_t = h.mean(0), t.mean(0)
            h, t = h - m_h, t - m_t
        else:
            m_h = torch.zeros(self.num_features, device=self.device, dtype=cdt)
            m_t = torch.zeros(self.num_outputs, device=self.device, dtype=cdt)
        f64 = torch.float64
        blocks = _lower_gram_blocks(h)
        diag = [blk[:, r0:].diagonal() for r0, blk in blocks]
        s_tt = (t * t).sum(0)
        stats = torch.cat([m_h.to(f64), m_t.to(f64), s_tt.to(f64), *diag])
        if not bool(torch.isfinite(stats).all()):
            # a non-finite entry makes its column mean (or, without intercept, its column's sum
            # of squares) non-finite; an entry too large for the compute dtype overflows the
            # Gram diagonal or sum of squares: one O(d + k) check catches all of them
            raise ValueError(
                "NormalEquations.update: `h` or `t` contains inf or nan (or values whose "
                f"squares overflow {cdt}); nothing was accumulated from this batch"
            )
        self._merge(float(n_b), m_h.to(f64), m_t.to(f64), blocks, (t.T @ h).T, s_tt)

    def _merge(
        self,
        n_b: float,
        m_h: Tensor,
        m_t: Tensor,
        s_hh: Tensor | list[tuple[int, Tensor]],
        s_ht: Tensor,
        s_tt: Tensor,
    ) -> None:
        """Chan's pairwise update. ``s_hh`` is a full symmetric matrix, or the lower block
        rows ``(first_row, block)`` of one (block ``i`` holds rows ``first_row:first_row+b``,
        columns ``0:first_row+b``); statistics may be in a lower precision (added in float64).
        """
        n_a = self._n
        n = n_a + n_b
        if n_b == 0:
            return
        if isinstance(s_hh, Tensor):
            self._s_hh.add_(s_hh)
        else:
            for r0, blk in s_hh:
                self._s_hh[r0 : r0 + blk.shape[0], : blk.shape[1]].add_(blk)
            self._upper_stale = True
        if self.fit_intercept:
            d_h, d_t = m_h - self.mean_h, m_t - self.mean_t
            c = n_a * n_b / n
            self._s_hh.addr_(d_h, d_h, alpha=c)
            self.s_ht.add_(s_ht).addr_(d_h, d_t, alpha=c)
            self.s_tt += s_tt + c * d_t * d_t
            self.mean_h += d_h * (n_b / n)
            self.mean_t += d_t * (n_b / n)
        else:
            self.s_ht += s_ht
            self.s_tt += s_tt
        self._n = n

    def merge(self, other: NormalEquations) -> NormalEquations:
        """Add another accumulator's statistics into this one (returns ``self``)."""
        if not isinstance(other, NormalEquations):
            raise TypeError(f"NormalEquations.merge: expected a NormalEquations, got {other!r}")
        if (other.num_features, other.num_outputs, other.fit_intercept) != (
            self.num_features,
            self.num_outputs,
            self.fit_intercept,
        ):
            raise ValueError(
                "NormalEquations.merge: `other` must have the same num_features, num_outputs "
                "and fit_intercept"
            )
        dev = self.device
        self._merge(
            other._n,
            other.mean_h.to(dev),
            other.mean_t.to(dev),
            other.s_hh.to(dev),
            other.s_ht.to(dev),
            other.s_tt.to(dev),
        )
        return self

    def all_reduce(self) -> NormalEquations:
        """Combine the statistics of all ranks in place (a no-op when not distributed).

        Two sum-reductions: first the counts and first moments give the global means, then
        each rank re-centres its scatter matrices on them before they are summed, so the
        result equals (to float64 round-off) one accumulator fed with all ranks' data.
        Returns ``self``.
        """
        if not _dist.is_distributed():
            return self
        n_local = torch.tensor(self._n, dtype=torch.float64, device=self.device)
        sums = torch.cat([n_local.reshape(1), self.mean_h * n_local, self.mean_t * n_local])
        _dist.all_reduce_sum_(sums)
        n = float(sums[0].item())  # the one host sync
        if n == 0:
            return self
        if self.fit_intercept:
            d, n_a = self.num_features, self._n
            mean_h, mean_t = sums[1 : 1 + d] / n, sums[1 + d :] / n
            d_h, d_t = self.mean_h - mean_h, self.mean_t - mean_t
            self.s_hh.addr_(d_h, d_h, alpha=n_a)
            self.s_ht.addr_(d_h, d_t, alpha=n_a)
            self.s_tt += n_a * d_t * d_t
            self.mean_h.copy_(mean_h)
            self.mean_t.copy_(mean_t)
        _dist.all_reduce_sum_(self.s_hh, self.s_ht, self.s_tt)
        self._n = n
        return self

    # -- solving --------------------------------------------------------------------------
    def solve(
        self, ridge: float = 1e-3, *, start: Tensor | None = None, start_bias: Tensor | None = None
    ) -> RidgeSolution:
        """Solve ``min ||H W^T + b - T||^2 + ridge * ||W - W0||^2`` (bias unpenalised).

        ``W0`` is ``start`` (default zero, i.e. plain ridge regression). With ``start``, the
        problem is solved on the residual ``T - (H W0^T + b0)`` (``b0 = start_bias``) and the
        returned weight is ``W0 + delta``, which is the paper's MP refinement with step 1.

        Args:
            ridge: the L2 penalty (``1/C`` in the papers); ``0`` gives the (minimum-norm)
                least-squares solution.
            start: ``(num_outputs, num_features)`` weight to start from.
            start_bias: ``(num_outputs,)`` bias that goes with ``start``.

        Returns:
            A :class:`RidgeSolution` of float64 tensors.
        """
        _check_ridge(ridge, "NormalEquations.solve")
        if self._n == 0:
            raise ValueError("NormalEquations.solve: no samples accumulated (call update first)")
        s_hh, rhs, mean_t = self.s_hh, self.s_ht, self.mean_t
        if start is not None:
            w0 = start.detach().to(self.device, torch.float64)
            if w0.shape != (self.num_outputs, self.num_features):
                raise ValueError(
                    f"NormalEquations.solve: `start` must have shape "
                    f"({self.num_outputs}, {self.num_features}), got {tuple(w0.shape)}"
                )
            rhs = rhs - s_hh @ w0.T
            mean_t = mean_t - self.mean_h @ w0.T
            if start_bias is not None:
                mean_t = mean_t - start_bias.detach().to(self.device, torch.float64)
        delta, solver, cond = _solve_spd(s_hh, rhs, ridge)
        weight = delta.T.contiguous()
        bias = None
        if self.fit_intercept:
            bias = mean_t - self.mean_h @ delta
        if start is not None:
            weight = weight + w0
            if bias is not None and start_bias is not None:
                bias = bias + start_bias.detach().to(self.device, torch.float64)
        return RidgeSolution(weight, bias, solver, cond)

    def residual_sum_of_squares(self, weight: Tensor, bias: Tensor | None = None) -> float:
        """``sum ||H W^T + b - T||^2`` over the accumulated data, from the statistics alone."""
        w = weight.detach().to(self.device, torch.float64)
        a = w.T  # (d, k)
        rss = self.s_tt.sum() - 2 * (a * self.s_ht).sum() + (a * (self.s_hh @ a)).sum()
        offset = self.mean_h @ a - self.mean_t
        if bias is not None:
            offset = offset + bias.detach().to(self.device, torch.float64)
        if self.fit_intercept:
            rss = rss + self._n * (offset * offset).sum()
        return float(rss.clamp_min(0).item())

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (sizes, count, means, scatter matrices)."""
        return {
            "num_features": self.num_features,
            "num_outputs": self.num_outputs,
            "fit_intercept": self.fit_intercept,
            "count": self._n,
            "mean_h": self.mean_h.detach().cpu().clone(),
            "mean_t": self.mean_t.detach().cpu().clone(),
            "s_hh": self.s_hh.detach().cpu().clone(),
            "s_ht": self.s_ht.detach().cpu().clone(),
            "s_tt": self.s_tt.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (sizes must match)."""
        sizes = (state.get("num_features"), state.get("num_outputs"), state.get("fit_intercept"))
        if sizes != (self.num_features, self.num_outputs, self.fit_intercept):
            raise ValueError(
                f"NormalEquations.load_state_dict: state is for (num_features, num_outputs, "
                f"fit_intercept)={sizes}, this accumulator is "
                f"{(self.num_features, self.num_outputs, self.fit_intercept)}"
            )
        self._n = float(state["count"])
        for name in ("mean_h", "mean_t", "s_hh", "s_ht", "s_tt"):
            getattr(self, name).copy_(state[name])

    def __repr__(self) -> str:
        return (
            f"NormalEquations(num_features={self.num_features}, num_outputs={self.num_outputs}, "
            f"fit_intercept={self.fit_intercept}, count={self.count})"
        )


def _gram_block(d: int) -> int:
    """Rows per block of :func:`_lower_gram_blocks`, from 64/128/256 timed for d = 256 ... 2048
    on 1024-row float32 batches (``PYTHONPATH=. python benchmarks/bench_refit.py --blocks``;
    two threads: with ``OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2``). One
    thread: ``max(64, d // 8)`` was the best or within 2 % of it. Two threads: 64-row blocks
    were slower than 128-row ones at every d >= 512 in three runs; 128 and 256 traded places."""
    if torch.get_num_threads() == 1:
        return max(64, d // 8)
    return 64 if d <= 256 else 128


def _lower_gram_blocks(h: Tensor) -> list[tuple[int, Tensor]]:
    """The lower block triangle of ``h^T h`` as ``(first_row, h[:, r0:r1]^T h[:, :r1])``."""
    d = h.shape[1]
    step = _gram_block(d)
    return [(r0, h[:, r0 : r0 + step].T @ h[:, : r0 + step]) for r0 in range(0, d, step)]


def _check_ridge(ridge: float, where: str) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"{where}: `ridge` must be a float >= 0, got {ridge!r}")
    if not math.isfinite(ridge):
        raise ValueError(f"{where}: `ridge` must be finite, got {ridge!r}")


def _solve_spd(a: Tensor, rhs: Tensor, ridge: float) -> tuple[Tensor, str, float]:
    """Solve ``(a + ridge I) x = rhs`` for symmetric PSD ``a`` (float64)."""
    d = a.shape[0]
    diag = a.diagonal().clamp_min(0)
    scale = torch.where(diag > 0, diag.rsqrt(), torch.ones_like(diag))
    scaled = a * scale[:, None] * scale[None, :]
    scaled.diagonal().add_(ridge * scale * scale)
    chol, info = torch.linalg.cholesky_ex(scaled)
    if int(info.item()) == 0:
        ld = chol.diagonal()
        cond = float(((ld.max() / ld.min()) ** 2).item()) if ld.min() > 0 else math.inf
        if cond < _COND_LIMIT:
            x = torch.cholesky_solve(rhs * scale[:, None], chol) * scale[:, None]
            if torch.isfinite(x).all():
                return x, "cholesky", cond
    # Fallback: eigendecomposition of the unscaled system; pseudo-inverse with the usual
    # cutoff, so a rank-deficient ridge=0 problem gives the minimum-norm solution.
    full = a.clone()
    full.diagonal().add_(ridge)
    full = 0.5 * (full + full.T)
    evals, evecs = torch.linalg.eigh(full)
    top = evals.abs().max()
    cutoff = top * d * torch.finfo(torch.float64).eps
    keep = evals > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    x = evecs @ (inv[:, None] * (evecs.T @ rhs))
    low = evals[keep].min() if bool(keep.any()) else torch.zeros((), dtype=evals.dtype)
    cond = float((top / low).item()) if low > 0 and bool(keep.all()) else math.inf
    return x, "eigh", cond


# ---------------------------------------------------------------------------------------------
# pinv_refit_dense


@dataclass
class RefitResult:
    """What :func:`pinv_refit_dense` returns.

    Attributes:
        weight: the new weight ``(out_features, in_features)`` (the layer's dtype/device).
        bias: the new bias, or ``None`` for a layer without bias.
        num_samples: samples seen (over all ranks).
        mse: mean squared error ``||H W^T + b - T||^2 / (N k)`` of the new weights on the
            data seen, against the (transformed) targets.
        accuracy: argmax accuracy of the new weights on the data seen (a second pass, only
            with ``evaluate=True`` and class labels), else ``None``.
        solver: ``"cholesky"`` or ``"eigh"``.
        condition: condition estimate of the solved system (see :class:`RidgeSolution`).
        seconds: wall time of the whole call.
        ridge: the penalty used.
        layers: for a stack of dense layers, one result per ``nn.Linear`` (first to last,
            the last being this result's own weights); empty for a single layer.
    """

    weight: Tensor
    bias: Tensor | None
    num_samples: int
    mse: float
    accuracy: float | None
    solver: str
    condition: float
    seconds: float
    ridge: float
    layers: list[RefitResult] = field(default_factory=list)


def _inverse_activation(
    spec: str | Callable[[Tensor], Tensor] | nn.Module | None,
) -> Callable[[Tensor], Tensor]:
    if spec is None or spec == "identity" or isinstance(spec, (nn.Identity, nn.ReLU)):
        # ReLU: the identity on its range (negative targets are kept, INFERRED)
        return lambda t: t
    if spec == "logit" or isinstance(spec, nn.Sigmoid):
        return lambda t: torch.logit(t.clamp(_CLAMP, 1 - _CLAMP))
    if spec == "arcsin":
        return lambda t: torch.asin(t.clamp(-1.0, 1.0))
    if spec == "atanh" or isinstance(spec, nn.Tanh):
        return lambda t: torch.atanh(t.clamp(-1 + _CLAMP, 1 - _CLAMP))
    if callable(spec) and not isinstance(spec, nn.Module):
        return spec
    raise ValueError(
        "pinv_refit_dense: `inverse_activation` must be None, 'identity', 'logit', 'arcsin', "
        f"'atanh' or a callable (and a stack may use Identity/ReLU/Sigmoid/Tanh), got {spec!r}"
    )


def _unpack_stack(layer: nn.Module) -> tuple[list[nn.Linear], list[nn.Module | None]]:
    """Linear layers of a stack and the activation module after each (None = identity)."""
    if isinstance(layer, nn.Linear):
        return [layer], [None]
    if not isinstance(layer, nn.Sequential):
        raise TypeError(
            "pinv_refit_dense: `layer` must be an nn.Linear or an nn.Sequential of nn.Linear "
            f"and elementwise activations, got {type(layer).__name__}"
        )
    linears: list[nn.Linear] = []
    acts: list[nn.Module | None] = []
    for m in layer:
        if isinstance(m, nn.Linear):
            linears.append(m)
            acts.append(None)
        elif isinstance(m, (nn.Identity, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Dropout)):
            if not linears:
                raise ValueError("pinv_refit_dense: a stack must start with an nn.Linear")
            if not isinstance(m, (nn.Identity, nn.Dropout)):
                if acts[-1] is not None:
                    raise ValueError("pinv_refit_dense: two activations in a row in `layer`")
                acts[-1] = m
        else:
            raise ValueError(
                "pinv_refit_dense: a stack may contain only nn.Linear, Identity, ReLU, Sigmoid, "
                f"Tanh and Dropout, got {type(m).__name__}"
            )
    if not linears:
        raise ValueError("pinv_refit_dense: `layer` contains no nn.Linear")
    for a, b in itertools.pairwise(linears):
        if a.out_features != b.in_features:
            raise ValueError(
                f"pinv_refit_dense: stack widths do not chain ({a.out_features} -> {b.in_features})"
            )
    return linears, acts


def _batches(
    loader: Iterable[Any],
    model: nn.Module | None,
    entry: nn.Module,
    device: torch.device,
    progress: bool,
    desc: str,
) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Yield ``(features at entry's input, labels_or_targets)``; hook removed on exit."""
    it: Iterable[Any] = loader
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(loader, desc=desc, leave=False)
        except ImportError:  # progress bars are optional
            pass
    captured: list[Tensor] = []
    handle = None
    if model is not None:

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach())

        handle = entry.register_forward_pre_hook(hook)
    try:
        for item in it:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise TypeError(
                    "pinv_refit_dense: `loader` must yield (inputs_or_features, labels) pairs, "
                    f"got {type(item).__name__}"
                )
            x, y = item
            if model is None:
                h = x
            else:
                captured.clear()
                with torch.no_grad():
                    model(x.to(device) if isinstance(x, Tensor) else x)
                if len(captured) != 1:
                    raise ValueError(
                        f"pinv_refit_dense: `layer` ran {len(captured)} times in one forward "
                        "of `model` (expected once); is it part of the model?"
                    )
                h = captured[0]
            if not isinstance(h, Tensor) or not isinstance(y, Tensor):
                raise TypeError("pinv_refit_dense: features and labels must be tensors")
            yield h.reshape(h.shape[0], -1) if h.ndim > 2 else h, y
    finally:
        if handle is not None:
            handle.remove()


def _make_targets(
    y: Tensor, targets: str, num_classes: int, k: int, n: int, device: torch.device
) -> Tensor:
    if targets == "raw":
        t = y.to(device)
        if t.ndim == 1:
            t = t[:, None]
        if t.shape != (n, k) or not t.is_floating_point():
            raise ValueError(
                f"pinv_refit_dense: with targets='raw', targets must be float of shape "
                f"({n}, {k}), got {tuple(t.shape)} {t.dtype}"
            )
        if not torch.isfinite(t).all():
            raise ValueError("pinv_refit_dense: targets contain inf or nan")
        return t
    if y.ndim != 1 or y.shape[0] != n or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"pinv_refit_dense: labels must be integer class indices of shape ({n},), got "
            f"{tuple(y.shape)} {y.dtype}"
        )
    y = y.to(device)
    if n:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(y)).tolist())  # one host sync
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"pinv_refit_dense: labels must lie in [0, {num_classes}), got range [{lo}, {hi}]"
            )
    t = torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64)
    return 2 * t - 1 if targets == "bipolar" else t


class _PullBack(NamedTuple):
    """A dense layer's ridge pseudo-inverse, built once per pass: the desired input for a
    desired output ``t`` is ``inv_act((t - bias) @ m)`` (``inv_act`` of the activation before
    the layer)."""

    m: Tensor
    bias: Tensor | None
    inv_act: Callable[[Tensor], Tensor]

    def __call__(self, t: Tensor) -> Tensor:
        return self.inv_act((t if self.bias is None else t - self.bias) @ self.m)


def _pull_back_map(
    params: _Dense, act_before: nn.Module | None, ridge: float, device: torch.device
) -> _PullBack:
    w = params[0].to(device, torch.float64)  # (k, d)
    k, d = w.shape
    if d <= k:  # t W (W^T W + r I)^-1, so M = W (W^T W + r I)^-1 = ((W^T W + r I)^-1 W^T)^T
        a = w.T @ w + (ridge + 1e-12) * torch.eye(d, dtype=w.dtype, device=device)
        m = torch.linalg.solve(a, w.T).T
    else:  # dual form: t (W W^T + r I)^-1 W
        a = w @ w.T + (ridge + 1e-12) * torch.eye(k, dtype=w.dtype, device=device)
        m = torch.linalg.solve(a, w)
    bias = None if params[1] is None else params[1].to(device, torch.float64)
    return _PullBack(m, bias, _inverse_activation(act_before))


def pinv_refit_dense(
    layer: nn.Module,
    loader: Iterable[Any],
    *,
    model: nn.Module | None = None,
    ridge: float = 1e-3,
    targets: str = "onehot",
    num_classes: int | None = None,
    inverse_activation: str | Callable[[Tensor], Tensor] | None = None,
    step_size: float = 1.0,
    start: str = "zero",
    evaluate: bool = True,
    assign: bool = True,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> RefitResult:
    """Refit a dense layer in closed form: ``min ||H W^T + b - T||^2 + ridge * ||W||^2``.

    ``H`` are the layer's inputs over the data and ``T`` the targets (one-hot by default).
    The bias is not penalised, so the result equals scikit-learn's
    ``Ridge(alpha=ridge, fit_intercept=True)`` fitted on the materialised features. The data
    is streamed batch by batch into a :class:`NormalEquations` accumulator (float64, memory
    O(d^2 + d k) whatever the number of samples) and solved by Cholesky with an
    eigendecomposition (pseudo-inverse) fallback. Under ``torch.distributed`` the
    accumulators are summed over ranks before the solve, so every rank gets the same weights.

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387 (building on
    https://arxiv.org/abs/1809.05606).

    Args:
        layer: an ``nn.Linear``, or an ``nn.Sequential`` of ``nn.Linear`` layers with
            Identity/ReLU/Sigmoid/Tanh/Dropout between them. A stack is refitted layer by
            layer, first to last, one pass each: the target of an inner layer is the final
            target pulled back through the ridge pseudo-inverse of the layers after it and
            their inverted activations (the papers' scheme; the details are INFERRED).
        loader: an iterable of ``(features, labels_or_targets)`` pairs (``model=None``) or of
            ``(inputs, labels)`` pairs for ``model``. A one-shot iterator works but then
            ``evaluate`` is skipped.
        model: if given, it runs in eval mode under ``torch.no_grad()`` and ``layer``'s input
            is captured with a temporary hook (removed afterwards, also on error); the
            model's train/eval mode is restored.
        ridge: L2 penalty on ``W`` (``1/C`` in the papers); ``0`` = plain pseudo-inverse.
        targets: ``"onehot"`` (0/1 from integer labels), ``"bipolar"`` (``2*onehot - 1``,
            the authors' code) or ``"raw"`` (the loader yields float targets ``(N, k)``).
        num_classes: number of classes for one-hot targets (default: ``out_features``).
        inverse_activation: applied to ``T`` before the solve, for a layer followed by an
            output activation: ``None``/``"identity"``, ``"logit"`` (sigmoid; targets clamped
            to ``[1e-3, 1 - 1e-3]``), ``"arcsin"`` (sine), ``"atanh"`` or a callable.
        step_size: ``eta`` in ``W <- W + eta (W_solved - W)`` (1 = the exact solution; the
            paper's MP learning rate is 0.5).
        start: ``"zero"`` (plain ridge, penalty on ``||W||``) or ``"current"`` (solve on the
            residual of the current weights, penalty on ``||W - W_current||``).
        evaluate: compute :attr:`RefitResult.accuracy` with a second pass over ``loader``
            (class-label targets only).
        assign: write the new weights into ``layer`` (else only return them).
        progress: show a tqdm progress bar (if tqdm is installed).
        device: where features are accumulated (default: the layer's device).

    Returns:
        A :class:`RefitResult`.

    Raises:
        ValueError: empty loader, non-finite features, width mismatch, labels out of range,
            ``ridge < 0`` and other bad arguments; ``layer`` is unchanged after any error.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import pinv_refit_dense
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.randn(512, 16, generator=g)
        >>> y = (h @ torch.randn(16, 4, generator=g)).argmax(1)
        >>> loader = [(h[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
        >>> fc = nn.Linear(16, 4)
        >>> res = pinv_refit_dense(fc, loader, ridge=1e-3)
        >>> res.num_samples, res.solver, res.accuracy > 0.8
        (512, 'cholesky', True)
        >>> torch.equal(fc.weight, res.weight)
        True
    """
    t0 = time.perf_counter()
    linears, acts = _unpack_stack(layer)
    _check_ridge(ridge, "pinv_refit_dense")
    if targets not in _TARGETS:
        raise ValueError(f"pinv_refit_dense: `targets` must be one of {_TARGETS}, got {targets!r}")
    if start not in _STARTS:
        raise ValueError(f"pinv_refit_dense: `start` must be one of {_STARTS}, got {start!r}")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise TypeError(f"pinv_refit_dense: `step_size` must be a float, got {step_size!r}")
    if not 0 < step_size <= 1:
        raise ValueError(f"pinv_refit_dense: `step_size` must be in (0, 1], got {step_size!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"pinv_refit_dense: `model` must be an nn.Module, got {model!r}")
    k_out = linears[-1].out_features
    if num_classes is None:
        num_classes = k_out
    if targets != "raw" and num_classes != k_out:
        raise ValueError(
            f"pinv_refit_dense: `num_classes` ({num_classes}) must equal the layer's "
            f"out_features ({k_out})"
        )
    inv_act = _inverse_activation(inverse_activation)
    dev = torch.device(device) if device is not None else linears[0].weight.device
    entry = layer  # the hook sits on the input of the layer (or of the stack)
    one_shot = isinstance(loader, Iterator)

    if model is not None:  # write to FSDP2's sharded parameters, never to gathered copies
        _dist.reshard_fsdp(model)
    run = _Pass(linears, acts, loader, model, entry, dev, progress, ridge, targets, num_classes,
                inv_act)  # fmt: skip
    backup = [(m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
              for m in linears]  # fmt: skip
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    results: list[RefitResult] = []
    try:
        with torch.no_grad():
            for idx in range(len(linears)):
                if one_shot and idx > 0:
                    raise ValueError(
                        "pinv_refit_dense: a stack needs one pass per layer; `loader` must be "
                        "re-iterable (a list or DataLoader), not a one-shot iterator"
                    )
                final = _refit_one(run, idx, step_size, start, assign or idx < len(linears) - 1)
                results.append(final)
            acc = None
            if evaluate and targets != "raw" and not one_shot:
                acc = _accuracy(run, final)
    except BaseException:
        run.reshard()
        _restore(linears, backup)
        raise
    finally:
        if model is not None:
            model.train(was_training)
    if not assign:  # inner layers of a stack were assigned to chain the passes: undo
        _restore(linears, backup)
    final.accuracy = acc
    final.seconds = time.perf_counter() - t0
    if len(linears) > 1:
        final.layers = results
    return final


def _restore(linears: list[nn.Linear], backup: Sequence[tuple[Tensor, Tensor | None]]) -> None:
    with torch.no_grad():
        for m, (w, b) in zip(linears, backup, strict=True):
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)


_Dense = tuple[Tensor, Tensor | None]


def _dense_params(linears: list[nn.Linear]) -> list[_Dense]:
    """Each layer's whole (weight, bias), detached: FSDP2/DTensor shards are gathered here,
    once per pass, so every rank makes the same collectives whatever its number of batches."""
    return [
        (
            _dist.full_tensor(lin.weight.detach()),
            None if lin.bias is None else _dist.full_tensor(lin.bias.detach()),
        )
        for lin in linears
    ]


def _forward_stack(
    params: list[_Dense], acts: list[nn.Module | None], h: Tensor, upto: int
) -> Tensor:
    """Input of dense layer ``upto`` of the stack given the stack input ``h``."""
    for (w, b), act in zip(params[:upto], acts[:upto], strict=True):
        h = nn.functional.linear(h.to(w.dtype), w, b)
        if act is not None:
            h = act(h)
    return h


@dataclass
class _Pass:
    """What every pass over the data of one :func:`pinv_refit_dense` call shares."""

    linears: list[nn.Linear]
    acts: list[nn.Module | None]
    loader: Iterable[Any]
    model: nn.Module | None
    entry: nn.Module
    dev: torch.device
    progress: bool
    ridge: float
    targets: str
    num_classes: int
    inv_act: Callable[[Tensor], Tensor]

    def reshard(self) -> None:
        """FSDP2 keeps the root's parameters gathered after a no_grad forward: put the shards
        back before reading or writing parameters."""
        if self.model is not None:
            _dist.reshard_fsdp(self.model)

    def each_batch(self, desc: str, fn: Callable[[Tensor, Tensor], None]) -> None:
        """``fn(features, labels)`` for every batch, as a collective: an error on one rank
        (bad data, a failing loader) is raised on every rank instead of leaving the others
        waiting in the next all-reduce."""
        error: Exception | None = None
        try:
            batches = _batches(self.loader, self.model, self.entry, self.dev, self.progress, desc)
            with contextlib.closing(batches):  # the hook goes even when a batch is rejected
                for h, y in batches:
                    fn(h, y)
        except Exception as err:
            error = err
        finally:
            self.reshard()
        _dist.raise_if_any_rank_failed(error, f"pinv_refit_dense ({desc})", self.dev)


def _refit_one(run: _Pass, idx: int, step_size: float, start: str, assign: bool) -> RefitResult:
    lin = run.linears[idx]
    d, k = lin.in_features, lin.out_features
    acc = NormalEquations(d, k, fit_intercept=lin.bias is not None, device=run.dev)
    params = _dense_params(run.linears)
    pull_backs = [
        _pull_back_map(params[j], run.acts[j - 1], run.ridge, run.dev)
        for j in range(idx + 1, len(params))
    ]
    run.each_batch(
        "refit" if len(run.linears) == 1 else f"refit layer {idx}",
        lambda h, y: _accumulate(run, acc, params, pull_backs, idx, h, y),
    )
    acc.all_reduce()
    if acc.count == 0:
        raise ValueError("pinv_refit_dense: `loader` yielded no samples")
    w_cur, b_cur = params[idx]
    if start == "current":
        sol = acc.solve(run.ridge, start=w_cur, start_bias=b_cur)
    else:
        sol = acc.solve(run.ridge)
    weight, bias = sol.weight, sol.bias
    if step_size != 1:
        w64 = w_cur.to(run.dev, torch.float64)
        weight = w64 + step_size * (weight - w64)
        if bias is not None and b_cur is not None:
            b64 = b_cur.to(run.dev, torch.float64)
            bias = b64 + step_size * (bias - b64)
    mse = acc.residual_sum_of_squares(weight, bias) / (acc.count * k)
    weight = weight.to(lin.weight.device, lin.weight.dtype)
    if bias is not None:
        bias = bias.to(lin.bias.device, lin.bias.dtype)
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise ValueError("pinv_refit_dense: the solve gave non-finite weights")
    if assign:  # a DTensor (FSDP2) keeps its own slice of the whole solution
        _dist.copy_full_(lin.weight, weight)
        if bias is not None:
            _dist.copy_full_(lin.bias, bias)
    return RefitResult(
        weight, bias, acc.count, mse, None, sol.solver, sol.condition, 0.0, run.ridge
    )


def _accumulate(
    run: _Pass,
    acc: NormalEquations,
    params: list[_Dense],
    pull_backs: list[_PullBack],
    idx: int,
    h: Tensor,
    y: Tensor,
) -> None:
    """Check one batch and add it to ``acc`` (the input of dense layer ``idx`` and its
    target); ``params`` are the stack's whole weights (:func:`_dense_params`),
    ``pull_backs`` the :func:`_pull_back_map` of the layers after ``idx``."""
    linears = run.linears
    n = h.shape[0]
    if h.ndim != 2 or h.shape[1] != linears[0].in_features:
        raise ValueError(
            f"pinv_refit_dense: features must have shape (n, {linears[0].in_features}) "
            f"(the layer's in_features), got {tuple(h.shape)}"
        )
    if not h.is_floating_point():
        raise ValueError(f"pinv_refit_dense: features must be floating point, got {h.dtype}")
    h = h.to(run.dev)
    t = _make_targets(y, run.targets, run.num_classes, linears[-1].out_features, n, run.dev)
    t = run.inv_act(t.to(torch.float64))
    for pull_back in reversed(pull_backs):  # to the output of linears[idx], last layer first
        t = pull_back(t)
    x = _forward_stack(params, run.acts, h, idx)
    if not torch.isfinite(t).all():
        raise ValueError("pinv_refit_dense: targets are not finite after inverse_activation")
    acc.update(x, t.to(_compute_dtype(x.dtype)) if x.dtype != torch.float64 else t)


def _accuracy(run: _Pass, final: RefitResult) -> float:
    params = _dense_params(run.linears[:-1])  # the last layer's solution is `final`
    correct = torch.zeros((), dtype=torch.float64, device=run.dev)
    total = torch.zeros((), dtype=torch.float64, device=run.dev)

    def count(h: Tensor, y: Tensor) -> None:
        nonlocal correct, total
        x = _forward_stack(params, run.acts, h.to(run.dev), len(run.linears) - 1)
        out = x.to(final.weight.dtype) @ final.weight.T
        if final.bias is not None:
            out = out + final.bias
        correct += (out.argmax(1) == y.to(run.dev)).sum()
        total += y.shape[0]

    run.each_batch("refit eval", count)
    _dist.all_reduce_sum_(correct, total)
    return float((correct / total.clamp_min(1)).item())


# ---------------------------------------------------------------------------------------------
# RandomLayerTraining


class RandomLayerTraining:
    """The paper's random learning strategy: each epoch only some conv layers are trained.

    ``layers`` are the candidate conv layers or blocks, first to last. The choice for the
    current epoch is applied at construction and by every :meth:`step` (call it once per
    epoch, before the epoch's training or after the previous one): frozen layers get
    ``requires_grad=False`` so backward stops early and costs less. Parameters that were
    already frozen at construction stay frozen. Two rules:

    * ``schedule=None``: a uniformly random number ``m`` in ``[min_trainable, n]`` of the
      *last* layers is trainable (backward stops before the first of them).
    * ``schedule=[r_0, r_1, ...]``: the authors' pipeline: in epoch ``e`` a uniformly random
      subset of ``round((1 - r_e) * n)`` layers is frozen (at least ``min_trainable`` stay
      trainable); after the schedule ends its last value is kept. The paper's ResNet-50
      schedule is ``[1, 1, .75, .75, .5, .5, .25, .25]`` (:attr:`PAPER_SCHEDULE`).

    The draw for epoch ``e`` is a pure function of ``(seed, e)``, so it is identical on all
    ranks (with ``seed=None`` a seed is drawn on rank 0 and broadcast) and a resumed run
    (:meth:`load_state_dict`) repeats an uninterrupted one. Under DDP, build the wrapper with
    ``find_unused_parameters=True`` or re-create it when the trainable set changes.

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387

    Args:
        layers: the candidate modules, in forward order.
        min_trainable: the fewest layers that are trainable in any epoch.
        seed: seed of the per-epoch draws.
        schedule: per-epoch fraction of layers trained (see above), or ``None``.

    Example:
        >>> from torch import nn
        >>> from torch_recal import RandomLayerTraining
        >>> convs = [nn.Conv2d(3, 3, 3) for _ in range(4)]
        >>> rlt = RandomLayerTraining(convs, seed=0, schedule=[1.0, 0.5])
        >>> rlt.trainable
        [True, True, True, True]
        >>> rlt.step()
        >>> sum(rlt.trainable), sum(p.requires_grad for c in convs for p in c.parameters())
        (2, 4)
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
        if isinstance(layers, nn.Module) and not isinstance(layers, (nn.Sequential, nn.ModuleList)):
            raise TypeError(
                "RandomLayerTraining: `layers` must be a sequence of modules (a list, "
                "nn.ModuleList or nn.Sequential), got a single "
                f"{type(layers).__name__}"
            )
        layers = list(layers)
        if not layers or not all(isinstance(m, nn.Module) for m in layers):
            raise ValueError("RandomLayerTraining: `layers` must be a non-empty list of modules")
        n = len(layers)
        if isinstance(min_trainable, bool) or not isinstance(min_trainable, int):
            raise TypeError(
                f"RandomLayerTraining: `min_trainable` must be an int, got {min_trainable!r}"
            )
        if not 0 <= min_trainable <= n:
            raise ValueError(
                f"RandomLayerTraining: `min_trainable` must be in [0, {n}] (the number of "
                f"layers), got {min_trainable}"
            )
        if schedule is not None:
            schedule = [float(r) for r in schedule]
            if not schedule or not all(0.0 <= r <= 1.0 for r in schedule):
                raise ValueError(
                    "RandomLayerTraining: `schedule` must be a non-empty list of fractions in "
                    f"[0, 1], got {schedule!r}"
                )
        if seed is None:
            drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
            _dist.broadcast_(drawn, src=0)
            seed = int(drawn.item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"RandomLayerTraining: `seed` must be an int or None, got {seed!r}")
        self.layers = layers
        self.min_trainable = min_trainable
        self.seed = seed
        self.schedule = schedule
        self.epoch = 0
        self._originally_trainable = [[p.requires_grad for p in m.parameters()] for m in layers]
        self.trainable: list[bool] = []
        self._apply()

    def choice(self, epoch: int) -> list[bool]:
        """Which layers are trainable in ``epoch`` (pure function of ``seed`` and ``epoch``)."""
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
        self.trainable = self.choice(self.epoch)
        for module, on, orig in zip(
            self.layers, self.trainable, self._originally_trainable, strict=True
        ):
            for p, was in zip(module.parameters(), orig, strict=True):
                p.requires_grad_(bool(on and was))

    def step(self) -> None:
        """Advance to the next epoch and apply its draw."""
        self.epoch += 1
        self._apply()

    def restore(self) -> None:
        """Give every parameter back the ``requires_grad`` it had at construction."""
        for module, orig in zip(self.layers, self._originally_trainable, strict=True):
            for p, was in zip(module.parameters(), orig, strict=True):
                p.requires_grad_(was)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: ``seed``, ``epoch``, ``min_trainable``, ``schedule``."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "min_trainable": self.min_trainable,
            "schedule": None if self.schedule is None else list(self.schedule),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and re-apply that epoch's choice."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.min_trainable = int(state["min_trainable"])
        sched = state.get("schedule")
        self.schedule = None if sched is None else [float(r) for r in sched]
        self._apply()

    def __repr__(self) -> str:
        return (
            f"RandomLayerTraining(layers={len(self.layers)}, epoch={self.epoch}, "
            f"trainable={sum(self.trainable)})"
        )

"""Streaming ridge regression: the float64 normal-equations accumulator and its solver.

:class:`NormalEquations` holds the sufficient statistics of ``min ||H W^T + b - T||^2 +
ridge * ||W||^2`` (bias not penalised: scikit-learn's ``Ridge(alpha=ridge,
fit_intercept=True)``) in O(d^2 + d k) memory, whatever the number of samples, and solves it.
It is the engine of :func:`torch_recal.pinv_refit_dense` and usable on its own, like a
torchmetrics metric (``update`` / ``merge`` / ``all_reduce`` / ``solve`` / ``reset``).

Paper: Wu, Zhang, Yang, "Deep Networks with Fast Retraining", https://arxiv.org/abs/2008.07387
(the dense-layer solve of fast retraining).

Numerics. Each batch is centred on its own mean and its centred Gram products are merged
into running centred statistics with Chan et al.'s pairwise update (float64). The Gram
product is symmetric, so only its lower block triangle is computed (block rows of
:func:`gram_block_rows` columns) and the upper triangle is mirrored once, when the
statistics are read. The bias is then ``b = mean(T) - W mean(H)``, i.e. the augmented system
with an unpenalised bias row is solved by eliminating the bias exactly, without forming the
ill-conditioned uncentred ``[H 1]^T [H 1]``. The centred system with its ridge,
``S_hh + ridge I``, is Jacobi-scaled (unit diagonal) and solved by Cholesky; when Cholesky
fails or the system looks ill-conditioned, an eigendecomposition of the unscaled system
gives the (minimum-norm) pseudo-inverse solution, and the fallback is logged
(``logging.getLogger("torch_recal")``, ``WARNING``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from torch_recal import _dist
from torch_recal._checks import (
    check_device,
    check_finite_tensor,
    check_flag,
    check_instance,
    check_int,
    check_real,
    check_state_keys,
    check_tensor,
)

__all__ = ["NormalEquations", "RidgeSolution", "gram_block_rows"]

_log = logging.getLogger("torch_recal")

# Above this (lower-bound) condition estimate of the scaled system, Cholesky's answer is not
# trusted and the eigendecomposition is used instead.
_COND_LIMIT = 1e10
_STATE_TENSORS = ("mean_h", "mean_t", "s_hh", "s_ht", "s_tt")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a batch's Gram products run in: float32 for float16/bfloat16 (and for
    integer inputs), else the input's own floating dtype."""
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        return torch.float32
    return dtype


def gram_block_rows(num_features: int) -> int:
    """Rows per block of the lower-triangle Gram product in :meth:`NormalEquations.update`.

    A documented seam for benchmarks and tests: the block size depends on the number of
    features and on torch's thread count (``max(64, d // 8)`` on one thread; 64 up to
    ``d = 256`` and 128 above on more threads), chosen by timing
    ``benchmarks/bench_refit.py --blocks`` (the figures are in ``docs/methods/refit.md``).

    Args:
        num_features: ``d``, the width of the features.

    Example:
        >>> import torch
        >>> from torch_recal.ridge import gram_block_rows
        >>> threads = torch.get_num_threads()
        >>> torch.set_num_threads(1)
        >>> gram_block_rows(256), gram_block_rows(2048)
        (64, 256)
        >>> torch.set_num_threads(threads)
    """
    d = check_int(num_features, "num_features", who="gram_block_rows", minimum=1)
    if torch.get_num_threads() == 1:
        return max(64, d // 8)
    return 64 if d <= 256 else 128


def _lower_gram_blocks(h: Tensor) -> list[tuple[int, Tensor]]:
    """The lower block triangle of ``h^T h`` as ``(first_row, h[:, r0:r1]^T h[:, :r1])``."""
    d = h.shape[1]
    step = gram_block_rows(d)
    return [(r0, h[:, r0 : r0 + step].T @ h[:, : r0 + step]) for r0 in range(0, d, step)]


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

    State (docs/conventions.md, rule 2): :meth:`update` advances it; the counter is
    :attr:`count` (samples, not calls); :meth:`state_dict` is plain data plus the statistics'
    tensors and :meth:`load_state_dict` checks everything before it assigns anything.

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
        who = "NormalEquations"
        self.num_features = check_int(num_features, "num_features", who=who, minimum=1)
        self.num_outputs = check_int(num_outputs, "num_outputs", who=who, minimum=1)
        self.fit_intercept = check_flag(fit_intercept, "fit_intercept", who=who)
        self.device = check_device(device, "device", who=who) or torch.device("cpu")
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
            step = gram_block_rows(d)
            for r0 in range(0, d, step):  # block by block: touches the upper half only
                r1 = min(r0 + step, d)
                diag = s[r0:r1, r0:r1]
                diag.copy_(diag.tril() + diag.tril(-1).T)
                s[r0:r1, r1:].copy_(s[r1:, r0:r1].T)
            self._upper_stale = False
        return self._s_hh

    @property
    def count(self) -> int:
        """Number of samples accumulated (the accumulator's counter)."""
        return int(self._n)

    def update(self, h: Tensor, t: Tensor) -> None:
        """Add a batch: ``h`` of shape ``(n, num_features)``, ``t`` of shape ``(n, num_outputs)``.

        The batch's centred Gram products run in the features' dtype (float32 for
        float16/bfloat16 inputs); the merge into the running statistics is float64. A batch
        with a NaN or inf entry raises ``ValueError`` and adds nothing.
        """
        who = "NormalEquations.update"
        check_tensor(h, "h", who=who)
        check_tensor(t, "t", who=who)
        for name, value in (("h", h), ("t", t)):
            if value.is_complex():
                raise TypeError(f"{who}: `{name}` must be a real tensor, got dtype {value.dtype}")
        if h.ndim != 2 or h.shape[1] != self.num_features:
            raise ValueError(
                f"{who}: `h` must have shape (n, {self.num_features}), got {tuple(h.shape)}"
            )
        if t.ndim != 2 or t.shape != (h.shape[0], self.num_outputs):
            raise ValueError(
                f"{who}: `t` must have shape ({h.shape[0]}, {self.num_outputs}), "
                f"got {tuple(t.shape)}"
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
                f"{who}: `h` or `t` contains inf or nan (or values whose squares overflow "
                f"{cdt}); nothing was accumulated from this batch"
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
        who = "NormalEquations.merge"
        check_instance(other, "other", NormalEquations, who=who)
        mine = (self.num_features, self.num_outputs, self.fit_intercept)
        theirs = (other.num_features, other.num_outputs, other.fit_intercept)
        if theirs != mine:
            raise ValueError(
                f"{who}: `other` must have the same (num_features, num_outputs, fit_intercept) "
                f"{mine}, got {theirs}"
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
            start_bias: ``(num_outputs,)`` bias that goes with ``start`` (needs ``start`` and
                ``fit_intercept=True``).

        Returns:
            A :class:`RidgeSolution` of float64 tensors.

        Raises:
            ValueError: no samples accumulated, non-finite statistics or ``start``, bad
                shapes, ``ridge < 0``.
        """
        who = "NormalEquations.solve"
        ridge = check_real(ridge, "ridge", who=who, minimum=0)
        k, d = self.num_outputs, self.num_features
        w0 = b0 = None
        if start is not None:
            check_tensor(start, "start", who=who, floating=True, shape=(k, d))
            w0 = check_finite_tensor(start.detach(), "start", who=who).to(
                self.device, torch.float64
            )
        if start_bias is not None:
            if w0 is None or not self.fit_intercept:
                raise ValueError(
                    f"{who}: `start_bias` needs `start` and fit_intercept=True "
                    f"(got start={'a tensor' if w0 is not None else None}, "
                    f"fit_intercept={self.fit_intercept})"
                )
            check_tensor(start_bias, "start_bias", who=who, floating=True, shape=(k,))
            b0 = check_finite_tensor(start_bias.detach(), "start_bias", who=who)
            b0 = b0.to(self.device, torch.float64)
        if self._n == 0:
            raise ValueError(f"{who}: no samples accumulated (call update first)")
        s_hh, rhs, mean_t = self.s_hh, self.s_ht, self.mean_t
        for name, value in (("s_hh", s_hh), ("s_ht", rhs), ("mean_h", self.mean_h)):
            check_finite_tensor(value, f"statistics {name}", who=who)
        if w0 is not None:
            rhs = rhs - s_hh @ w0.T
            mean_t = mean_t - self.mean_h @ w0.T
            if b0 is not None:
                mean_t = mean_t - b0
        delta, solver, cond = _solve_spd(s_hh, rhs, ridge)
        weight = delta.T.contiguous()
        bias = None
        if self.fit_intercept:
            bias = mean_t - self.mean_h @ delta
        if w0 is not None:
            weight = weight + w0
            if bias is not None and b0 is not None:
                bias = bias + b0
        return RidgeSolution(weight, bias, solver, cond)

    def residual_sum_of_squares(self, weight: Tensor, bias: Tensor | None = None) -> float:
        """``sum ||H W^T + b - T||^2`` over the accumulated data, from the statistics alone.

        Args:
            weight: ``(num_outputs, num_features)``.
            bias: ``(num_outputs,)``; only with ``fit_intercept=True`` (without it the
                statistics are uncentred and hold no feature sum).
        """
        who = "NormalEquations.residual_sum_of_squares"
        k, d = self.num_outputs, self.num_features
        check_tensor(weight, "weight", who=who, floating=True, shape=(k, d))
        if bias is not None:
            if not self.fit_intercept:
                raise ValueError(f"{who}: `bias` needs fit_intercept=True, got a tensor")
            check_tensor(bias, "bias", who=who, floating=True, shape=(k,))
        a = weight.detach().to(self.device, torch.float64).T  # (d, k)
        rss = self.s_tt.sum() - 2 * (a * self.s_ht).sum() + (a * (self.s_hh @ a)).sum()
        if self.fit_intercept:
            offset = self.mean_h @ a - self.mean_t
            if bias is not None:
                offset = offset + bias.detach().to(self.device, torch.float64)
            rss = rss + self._n * (offset * offset).sum()
        return float(rss.clamp_min(0).item())

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: the configuration (checked on load), ``count`` (an int) and the
        float64 statistics ``mean_h``, ``mean_t``, ``s_hh``, ``s_ht``, ``s_tt`` (CPU)."""
        return {
            "num_features": self.num_features,
            "num_outputs": self.num_outputs,
            "fit_intercept": self.fit_intercept,
            "count": self.count,
            "mean_h": self.mean_h.detach().cpu().clone(),
            "mean_t": self.mean_t.detach().cpu().clone(),
            "s_hh": self.s_hh.detach().cpu().clone(),
            "s_ht": self.s_ht.detach().cpu().clone(),
            "s_tt": self.s_tt.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Checks first, assigns after: the keys, the configuration (it must equal this
        accumulator's), ``count`` (an int >= 0), every statistic's type, floating dtype,
        shape and finiteness, and their consistency (zero statistics when ``count`` is 0,
        zero means without intercept, a symmetric ``s_hh`` with a non-negative diagonal,
        ``s_tt >= 0``). A bad or partial state raises and changes nothing.
        """
        who = "NormalEquations.load_state_dict"
        keys = ("num_features", "num_outputs", "fit_intercept", "count", *_STATE_TENSORS)
        check_state_keys(state, keys, who=who)
        mine = (self.num_features, self.num_outputs, self.fit_intercept)
        theirs = (
            check_int(state["num_features"], "num_features", who=who, minimum=1),
            check_int(state["num_outputs"], "num_outputs", who=who, minimum=1),
            check_flag(state["fit_intercept"], "fit_intercept", who=who),
        )
        if theirs != mine:
            raise ValueError(
                f"{who}: the state is for (`num_features`, `num_outputs`, `fit_intercept`) = "
                f"{theirs}, this accumulator is {mine}"
            )
        count = check_int(state["count"], "count", who=who, minimum=0)
        d, k = self.num_features, self.num_outputs
        shapes = {"mean_h": (d,), "mean_t": (k,), "s_hh": (d, d), "s_ht": (d, k), "s_tt": (k,)}
        new: dict[str, Tensor] = {}
        for name in _STATE_TENSORS:
            value = check_tensor(state[name], name, who=who, floating=True, shape=shapes[name])
            value = check_finite_tensor(value.detach(), name, who=who)
            new[name] = value.to(self.device, torch.float64, copy=True)
        if count == 0 and any(bool(v.any()) for v in new.values()):
            raise ValueError(f"{who}: `count` is 0 but the statistics are not all zero")
        if not self.fit_intercept and (bool(new["mean_h"].any()) or bool(new["mean_t"].any())):
            raise ValueError(f"{who}: `mean_h` and `mean_t` must be zero without intercept")
        s_hh = new["s_hh"]
        scale = float(s_hh.diagonal().abs().max())
        if float((s_hh - s_hh.T).abs().max()) > 1e-10 * scale or bool((s_hh.diagonal() < 0).any()):
            raise ValueError(f"{who}: `s_hh` must be symmetric with a non-negative diagonal")
        if bool((new["s_tt"] < 0).any()):
            raise ValueError(f"{who}: `s_tt` must be >= 0 (sums of squares)")
        self._n = float(count)
        self.mean_h, self.mean_t = new["mean_h"], new["mean_t"]
        self._s_hh, self._upper_stale = s_hh, False
        self.s_ht, self.s_tt = new["s_ht"], new["s_tt"]

    def __repr__(self) -> str:
        return (
            f"NormalEquations(num_features={self.num_features}, num_outputs={self.num_outputs}, "
            f"fit_intercept={self.fit_intercept}, count={self.count})"
        )


def _solve_spd(a: Tensor, rhs: Tensor, ridge: float) -> tuple[Tensor, str, float]:
    """Solve ``(a + ridge I) x = rhs`` for symmetric PSD ``a`` (float64)."""
    d = a.shape[0]
    # Jacobi scaling of the matrix that is factorised, a + ridge I (unit diagonal): scaling
    # by a's own diagonal alone blew a rare feature's ridge term up to ridge / a_ii and the
    # condition estimate with it, so well-posed ridge problems fell back to eigh
    diag = a.diagonal().clamp_min(0) + ridge
    scale = torch.where(diag > 0, diag.rsqrt(), torch.ones_like(diag))
    scaled = a * scale[:, None] * scale[None, :]
    scaled.diagonal().add_(ridge * scale * scale)
    chol, info = torch.linalg.cholesky_ex(scaled)
    if int(info.item()) != 0:
        reason = "Cholesky failed (the system is singular or indefinite in float64)"
    else:
        ld = chol.diagonal()
        cond = float(((ld.max() / ld.min()) ** 2).item()) if ld.min() > 0 else math.inf
        reason = f"condition estimate {cond:.3g} >= {_COND_LIMIT:.0e}"
        if cond < _COND_LIMIT:
            x = torch.cholesky_solve(rhs * scale[:, None], chol) * scale[:, None]
            if torch.isfinite(x).all():
                return x, "cholesky", cond
            reason = "the Cholesky solution was not finite"
    _log.warning(
        "NormalEquations.solve: %s; solving by eigendecomposition (pseudo-inverse) with "
        "ridge=%g, d=%d",
        reason,
        ridge,
        d,
    )
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

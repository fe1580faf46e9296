"""Pure tensor functions behind the modules (the fused, lazily compiled hot paths).

Each function validates its arguments eagerly (cheap type, shape, dtype and device checks that
dynamo treats as constants; values are not checked: NaN in, NaN out, as in PyTorch's own ops)
and then runs one elementwise kernel, compiled under the library's policy
(:mod:`torch_recal._compile`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
from torch import Tensor

from torch_recal._checks import check_choice, check_flag, check_int, check_real, check_tensor
from torch_recal._compile import lazy_compile

__all__ = [
    "coherence_statistics",
    "gradient_discrepancy",
    "group_soft_threshold_",
    "response_calibration",
    "response_calibration_residual",
    "soft_threshold_",
]

# --- response calibration (torch_recal.calibration) ----------------------------------------

Confidence = Literal["cdf", "pdf"]
"""How a standardised response becomes a confidence: ``Phi(-|z|)`` or ``exp(-z^2 / 2)``."""
ChannelDim = Literal[1, -1]
"""Where the channels are: ``1`` for ``(N, C, *spatial)``, ``-1`` for ``(N, *tokens, C)``."""

_CONFIDENCES = ("cdf", "pdf")
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def _check_options(
    eps: Any, confidence: Any, channel_dim: Any, *, who: str
) -> tuple[float, Confidence, ChannelDim]:
    """The options shared by the module and the functional forms, in their canonical types."""
    eps = check_real(eps, "eps", who=who, minimum=0.0, open_low=True)
    confidence = check_choice(confidence, "confidence", _CONFIDENCES, who=who)
    channel_dim = check_int(channel_dim, "channel_dim", who=who)
    if channel_dim not in (1, -1):
        raise ValueError(
            f"{who}: `channel_dim` must be 1 (N, C, *spatial) or -1 (N, *tokens, C), "
            f"got {channel_dim}"
        )
    return eps, cast(Confidence, confidence), cast(ChannelDim, channel_dim)


def _check_response(
    u: Any,
    channel_dim: int,
    *,
    who: str,
    channels: int | None = None,
    device: torch.device | None = None,
) -> int:
    """Check a response tensor ``u``; return its channel dim (1 or ``u.ndim - 1``).

    The module and the functional forms both check their input here, so the same mistake
    gets the same exception and message wherever it is made.
    """
    if not isinstance(u, Tensor):
        raise TypeError(f"{who}: `u` must be a Tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(
            f"{who}: `u` must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got dtype {u.dtype}"
        )
    layout = "(N, C, *spatial)" if channel_dim == 1 else "(N, *tokens, C)"
    if u.ndim < 3:
        raise ValueError(
            f"{who}: `u` must have shape {layout} with at least one spatial/token dim "
            f"(channel_dim={channel_dim}), got shape {tuple(u.shape)}"
        )
    cdim = 1 if channel_dim == 1 else u.ndim - 1
    if channels is not None and u.shape[cdim] != channels:
        raise ValueError(
            f"{who}: `u` must have {channels} channels in dim {channel_dim} {layout}, got "
            f"{u.shape[cdim]} (shape {tuple(u.shape)})"
        )
    if device is not None and u.device != device:
        raise ValueError(
            f"{who}: `u` must be on the module's device {device}, got a tensor on {u.device}"
        )
    return cdim


def _check_statistic(stat: Any, name: str, u: Tensor, cdim: int, *, who: str) -> None:
    if not isinstance(stat, Tensor):
        raise TypeError(f"{who}: `{name}` must be a Tensor, got {type(stat).__name__}")
    if not stat.is_floating_point():
        raise TypeError(f"{who}: `{name}` must be a floating-point tensor, got dtype {stat.dtype}")
    batch, channels = u.shape[0], u.shape[cdim]
    if tuple(stat.shape) not in ((batch, channels), (channels,)):
        raise ValueError(
            f"{who}: `{name}` must have shape (N, C) = ({batch}, {channels}) or (C,) = "
            f"({channels},) for `u` of shape {tuple(u.shape)}, got {tuple(stat.shape)}"
        )
    if stat.device != u.device:
        raise ValueError(f"{who}: `{name}` must be on `u`'s device {u.device}, got {stat.device}")


def _check_shortcut(shortcut: Any, u: Tensor, *, who: str) -> None:
    if not isinstance(shortcut, Tensor):
        raise TypeError(f"{who}: `shortcut` must be a Tensor, got {type(shortcut).__name__}")
    if not shortcut.is_floating_point():
        raise TypeError(
            f"{who}: `shortcut` must be a floating-point tensor, got dtype {shortcut.dtype}"
        )
    if shortcut.shape != u.shape:
        raise ValueError(
            f"{who}: `shortcut` must have `u`'s shape {tuple(u.shape)}, got {tuple(shortcut.shape)}"
        )
    if shortcut.device != u.device:
        raise ValueError(
            f"{who}: `shortcut` must be on `u`'s device {u.device}, got {shortcut.device}"
        )


def _broadcastable(stat: Tensor, ndim: int, cdim: int) -> Tensor:
    """(N, C) or (C,) statistics viewed so they broadcast against a rank-``ndim`` response."""
    shape = [1] * ndim  # (C,) stats are shared by the batch; (N, C) are per sample
    if stat.ndim == 2:
        shape[0] = stat.shape[0]
    shape[cdim] = stat.shape[-1]
    return stat.reshape(shape)


def _standardised(
    u: Tensor, mu: Tensor, sigma: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(uc, sigma + eps, s, t)`` in the compute dtype: ``t = z / sqrt 2 = (uc - mu) s`` with
    ``s = 1 / ((sigma + eps) sqrt 2)`` folded per (sample, channel) before broadcasting."""
    cdt = torch.promote_types(u.dtype, torch.float32)
    uc = u.to(cdt)
    sigma_eps = sigma.to(cdt) + eps
    scale = sigma_eps.reciprocal() * _SQRT_HALF
    return uc, sigma_eps, scale, (uc - mu.to(cdt)) * scale


def _calibrated(u: Tensor, mu: Tensor, sigma: Tensor, eps: float, pdf: bool) -> Tensor:
    """``u + w * u = u * (1 + w)`` in the compute dtype; ``mu``/``sigma`` broadcastable."""
    uc, _, _, t = _standardised(u, mu, sigma, eps)
    if pdf:
        return uc * (1.0 + torch.exp(-(t * t)))  # w = exp(-z^2 / 2)
    # w = Phi(-|z|) = erfc(|t|) / 2, written as 1/2 - erf(|t|)/2: inductor vectorises erf on
    # CPU but not erfc (benchmarks/bench_calibration.py times both forms), and the
    # absolute error of w stays below half an ulp of 1 + w, so u + w*u is unchanged.
    return uc * (1.5 - 0.5 * torch.erf(t.abs()))


def _forward(
    u: Tensor, shortcut: Tensor | None, mu: Tensor, sigma: Tensor, eps: float, pdf: bool, relu: bool
) -> Tensor:
    """The whole chain, ``[relu](shortcut + u + w u)``, on broadcastable statistics.

    Also the documented internal seam of ``benchmarks/bench_calibration.py`` (which compiles
    it with inductor's own autograd as an ablation): keep its signature.
    """
    out = _calibrated(u, mu, sigma, eps, pdf)
    if shortcut is not None:
        out = out + shortcut.to(out.dtype)
    if relu:
        out = torch.relu(out)
    return out.to(u.dtype)


def _backward(
    grad: Tensor,
    u: Tensor,
    mu: Tensor,
    sigma: Tensor,
    out: Tensor | None,
    eps: float,
    pdf: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hand-derived gradients of :func:`_forward` (checked by gradcheck in the tests).

    With ``t = (u - mu) s``, ``s = 1 / ((sigma + eps) sqrt 2)``, ``f = u (1 + w(t))`` and
    ``q = g u w'(t)``: ``df/du = g (1 + w) + q s``, ``df/dmu = -sum(q) s`` and
    ``df/dsigma = -sum(q t) / (sigma + eps)``, summed over the broadcast dims. The ReLU mask
    comes from the saved output, so no boolean mask is stored.
    """
    uc, sigma_eps, scale, t = _standardised(u, mu, sigma, eps)
    g = grad.to(uc.dtype)
    if out is not None:
        g = torch.where(out > 0, g, 0.0)
    gauss = torch.exp(-(t * t))
    if pdf:
        w, dw = gauss, -2.0 * t * gauss
    else:
        w, dw = 0.5 - 0.5 * torch.erf(t.abs()), -torch.sign(t) * _INV_SQRT_PI * gauss
    q = g * uc * dw
    grad_u = g * (1.0 + w) + q * scale
    grad_mu = -(q * scale).sum_to_size(mu.shape)
    grad_sigma = -(q * t).sum_to_size(sigma.shape) / sigma_eps
    return grad_u.to(u.dtype), g, grad_mu.to(mu.dtype), grad_sigma.to(sigma.dtype)


_forward_kernel = lazy_compile(_forward)
_backward_kernel = lazy_compile(_backward)


class _CalibrationFunction(torch.autograd.Function):
    """Fused forward and hand-written fused backward, each one (compiled) kernel.

    Letting inductor differentiate the chain itself is slower on CPU: it stores the ReLU mask
    as a bool tensor, which its CPU backend writes element by element (the ablation rows of
    ``benchmarks/bench_calibration.py``; figures in ``docs/methods/calibration.md``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: Tensor,
        shortcut: Tensor | None,
        mu: Tensor,
        sigma: Tensor,
        eps: float,
        pdf: bool,
        relu: bool,
    ) -> Tensor:
        out = _forward_kernel(u, shortcut, mu, sigma, eps, pdf, relu)
        ctx.save_for_backward(u, mu, sigma, out if relu else None)
        ctx.eps, ctx.pdf = eps, pdf
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        u, mu, sigma, out = ctx.saved_tensors
        # create_graph=True (double backward) needs differentiable eager ops, not a compiled fn
        kernel = _backward if torch.is_grad_enabled() else _backward_kernel
        grad_u, grad_s, grad_mu, grad_sigma = kernel(grad, u, mu, sigma, out, ctx.eps, ctx.pdf)
        shortcut_grad = None if ctx.shortcut_dtype is None else grad_s.to(ctx.shortcut_dtype)
        return grad_u, shortcut_grad, grad_mu, grad_sigma, None, None, None


def _calibrate(
    u: Tensor,
    shortcut: Tensor | None,
    mu: Tensor,
    sigma: Tensor,
    eps: float,
    confidence: str,
    cdim: int,
    relu: bool,
) -> Tensor:
    """The checked arguments' calibration (shared by the module and the functional forms)."""
    mu, sigma = _broadcastable(mu, u.ndim, cdim), _broadcastable(sigma, u.ndim, cdim)
    pdf = confidence == "pdf"
    tensors = (u, mu, sigma) if shortcut is None else (u, shortcut, mu, sigma)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _CalibrationFunction.apply(u, shortcut, mu, sigma, eps, pdf, relu)
    return _forward_kernel(u, shortcut, mu, sigma, eps, pdf, relu)


def response_calibration(
    u: Tensor,
    mu: Tensor,
    sigma: Tensor,
    eps: float = 1e-5,
    *,
    confidence: Confidence = "cdf",
    channel_dim: ChannelDim = 1,
) -> Tensor:
    """Calibrate a response tensor: ``u + w * u`` with a Gaussian confidence ``w``.

    ``z = (u - mu) / (sigma + eps)`` per sample and channel (broadcast over the spatial or
    token dims), ``w = Phi(-|z|) = erfc(|z| / sqrt(2)) / 2`` for ``confidence="cdf"`` (the
    official ResCNet code) or ``w = exp(-z^2 / 2)`` for ``"pdf"``. The chain runs as one fused
    kernel (see :func:`torch_recal.set_compile`), computed in at least float32 and returned
    in ``u``'s dtype. Like a PyTorch op it checks types, shapes, dtypes and devices, not
    values (NaN in, NaN out).

    Paper: Xu et al., "Deep feature response discriminative calibration",
    https://arxiv.org/abs/2411.13582

    Args:
        u: responses, a floating-point tensor of shape ``(N, C, *spatial)``
            (``channel_dim=1``) or ``(N, *tokens, C)`` (``channel_dim=-1``), with at least
            one spatial/token dim.
        mu: means, shape ``(N, C)`` (per sample) or ``(C,)`` (shared), floating point, on
            ``u``'s device (any floating dtype: cast to the compute dtype).
        sigma: standard deviations, same rules as ``mu``; should be non-negative.
        eps: positive constant added to ``sigma``.
        confidence: ``"cdf"`` (default) or ``"pdf"``.
        channel_dim: ``1`` or ``-1``.

    Returns:
        Tensor of ``u``'s shape and dtype.

    Raises:
        TypeError: ``u``, ``mu`` or ``sigma`` is not a floating-point tensor, or an option
            has the wrong type.
        ValueError: a shape or device does not match, or an option is out of range.

    Example:
        >>> import torch
        >>> from torch_recal.functional import response_calibration
        >>> u = torch.randn(2, 8, 4, 4)
        >>> out = response_calibration(u, torch.zeros(2, 8), torch.ones(2, 8))
        >>> out.shape
        torch.Size([2, 8, 4, 4])
    """
    who = "response_calibration"
    eps, confidence, channel_dim = _check_options(eps, confidence, channel_dim, who=who)
    cdim = _check_response(u, channel_dim, who=who)
    _check_statistic(mu, "mu", u, cdim, who=who)
    _check_statistic(sigma, "sigma", u, cdim, who=who)
    return _calibrate(u, None, mu, sigma, eps, confidence, cdim, False)


def response_calibration_residual(
    u: Tensor,
    shortcut: Tensor,
    mu: Tensor,
    sigma: Tensor,
    eps: float = 1e-5,
    *,
    confidence: Confidence = "cdf",
    channel_dim: ChannelDim = 1,
    relu: bool = True,
) -> Tensor:
    """Fused residual-block tail: ``relu(shortcut + u + w * u)``.

    The same calibration as :func:`response_calibration`, with the shortcut add and the
    block's final ReLU fused into the one kernel (what a ResCNet block computes after its
    last norm). ``relu=False`` leaves the ReLU out.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        u: residual-branch responses, as in :func:`response_calibration`.
        shortcut: the identity/projection branch, a floating-point tensor of ``u``'s shape
            on ``u``'s device.
        mu: means, ``(N, C)`` or ``(C,)``.
        sigma: standard deviations, ``(N, C)`` or ``(C,)``.
        eps: positive constant added to ``sigma``.
        confidence: ``"cdf"`` or ``"pdf"``.
        channel_dim: ``1`` or ``-1``.
        relu: apply the final ReLU.

    Returns:
        Tensor of ``u``'s shape and dtype.

    Raises:
        TypeError: a tensor argument is not a floating-point tensor, or an option has the
            wrong type.
        ValueError: a shape or device does not match, or an option is out of range.

    Example:
        >>> import torch
        >>> from torch_recal.functional import response_calibration_residual
        >>> u, x = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
        >>> out = response_calibration_residual(u, x, torch.zeros(2, 8), torch.ones(2, 8))
        >>> bool((out >= 0).all())
        True
    """
    who = "response_calibration_residual"
    eps, confidence, channel_dim = _check_options(eps, confidence, channel_dim, who=who)
    relu = check_flag(relu, "relu", who=who)
    cdim = _check_response(u, channel_dim, who=who)
    _check_shortcut(shortcut, u, who=who)
    _check_statistic(mu, "mu", u, cdim, who=who)
    _check_statistic(sigma, "sigma", u, cdim, who=who)
    return _calibrate(u, shortcut, mu, sigma, eps, confidence, cdim, relu)


# --- gradient-coherent strong regularisation (torch_recal.coherent) -------------------------
# These work on lists of tensors with ``torch._foreach_*`` multi-tensor kernels (one launch
# per op for the whole list on CUDA), so they are not wrapped in ``lazy_compile``: a compiled
# list function would be recompiled for every model's list length for no extra fusion.

_REG_KINDS = ("l1", "l2")


def coherence_statistics(
    grads: list[Tensor], weights: list[Tensor], kind: Literal["l1", "l2"] = "l1"
) -> Tensor:
    """Fused reductions behind the coherence gate: ``<g, r>``, ``||g||^2`` and ``||r||^2``.

    ``g`` is the loss gradient and ``r`` the gradient of the regulariser at unit strength,
    both taken over all tensors of the lists at once (as one long vector): ``r = sign(w)``
    for ``kind="l1"`` and ``r = w`` for ``kind="l2"``. The result stays on the device, in
    float32 (or wider), so the caller decides when to synchronise.

    Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
    https://arxiv.org/abs/1811.08056

    Args:
        grads: loss gradients, one per regularised tensor.
        weights: the regularised tensors, same shapes as ``grads``.
        kind: ``"l1"`` or ``"l2"``.

    Returns:
        Tensor of shape ``(3,)``: ``[dot(g, r), |g|^2, |r|^2]``.

    Example:
        >>> import torch
        >>> from torch_recal.functional import coherence_statistics
        >>> w = [torch.tensor([1.0, -2.0]), torch.tensor([[0.0, 3.0]])]
        >>> g = [torch.tensor([1.0, 1.0]), torch.tensor([[5.0, 1.0]])]
        >>> dot, g2, r2 = coherence_statistics(g, w, "l1").tolist()  # r = sign(w)
        >>> dot, g2, r2
        (1.0, 28.0, 3.0)
    """
    who = "coherence_statistics"
    kind = check_choice(kind, "kind", _REG_KINDS, who=who)  # type: ignore[assignment]
    for name, ts in (("grads", grads), ("weights", weights)):
        if isinstance(ts, Tensor) or not isinstance(ts, (list, tuple)):
            raise TypeError(f"{who}: `{name}` must be a list of tensors, got {type(ts).__name__}")
        for i, t in enumerate(ts):
            check_tensor(t, f"{name}[{i}]", who=who, floating=True)
    if any(g.shape != w.shape for g, w in zip(grads, weights, strict=False)):
        raise ValueError(f"{who}: `grads` and `weights` must have the same shapes, pairwise")
    if len(grads) != len(weights) or not grads:
        raise ValueError(
            "coherence_statistics: `grads` and `weights` must be non-empty lists of equal "
            f"length, got {len(grads)} and {len(weights)}"
        )
    reg = torch._foreach_sign(weights) if kind == "l1" else list(weights)
    dtype = torch.promote_types(grads[0].dtype, torch.float32)
    dots = [
        torch.vdot(g.reshape(-1).to(dtype), r.reshape(-1).to(dtype))
        for g, r in zip(grads, reg, strict=True)
    ]
    g_norms = torch.stack(torch._foreach_norm(grads)).to(dtype)
    r_norms = torch.stack(torch._foreach_norm(reg)).to(dtype)
    return torch.stack([torch.stack(dots).sum(), g_norms.square().sum(), r_norms.square().sum()])


def soft_threshold_(tensors: list[Tensor], threshold: float) -> None:
    """In place, ``w <- sign(w) * max(|w| - threshold, 0)`` on every tensor of the list.

    The proximal operator of ``threshold * ||w||_1``: entries with ``|w| <= threshold``
    become exactly zero.

    Args:
        tensors: floating-point tensors, changed in place.
        threshold: non-negative amount subtracted from every magnitude.

    Example:
        >>> import torch
        >>> from torch_recal.functional import soft_threshold_
        >>> w = [torch.tensor([0.5, -0.05, -2.0])]
        >>> soft_threshold_(w, 0.1)
        >>> torch.allclose(w[0], torch.tensor([0.4, 0.0, -1.9]))
        True
        >>> int(torch.count_nonzero(w[0]))
        2
    """
    threshold = _check_threshold_args(tensors, threshold, "soft_threshold_")
    if not tensors or threshold == 0:
        return
    with torch.no_grad():
        signs = torch._foreach_sign(tensors)
        torch._foreach_abs_(tensors)
        torch._foreach_sub_(tensors, float(threshold))
        torch._foreach_clamp_min_(tensors, 0.0)
        torch._foreach_mul_(tensors, signs)


# --- generative gradient regularisation (torch_recal.generative) ----------------------------

_DISCREPANCIES = ("cosine", "l2", "l1")


def gradient_discrepancy(
    grad: Tensor,
    reference: Tensor,
    kind: Literal["cosine", "l2", "l1"] = "cosine",
    eps: float = 1e-12,
) -> Tensor:
    """The discrepancy ``D(grad, reference)`` that GGR minimises, on the flattened tensors.

    * ``"cosine"`` (default): ``1 - <a, b> / max(|a| |b|, eps)``, in ``[0, 2]``, invariant to
      the scale of either (a zero tensor gives 1);
    * ``"l2"``: ``mean((a - b)^2)``;
    * ``"l1"``: ``mean(|a - b|)``.

    Differentiable (the term of :class:`~torch_recal.GenerativeGradientLoss` is
    ``weight * gradient_discrepancy(g_cls, g_ref, kind)``). Computed in at least float32 and
    returned in the promoted dtype of the inputs. Like a PyTorch op it checks shapes and
    dtypes, not values (NaN in, NaN out).

    Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216

    Args:
        grad: a gradient (e.g. of the task loss with respect to the first conv's weight).
        reference: the reference gradient, same shape as ``grad``.
        kind: ``"cosine"``, ``"l2"`` or ``"l1"``.
        eps: floor of the norm product in the cosine (> 0).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> from torch_recal.functional import gradient_discrepancy
        >>> a = torch.tensor([1.0, 0.0])
        >>> gradient_discrepancy(a, -3 * a).item(), gradient_discrepancy(a, 2 - 2 * a).item()
        (2.0, 1.0)
        >>> gradient_discrepancy(a, torch.tensor([0.0, 2.0]), "l2").item()
        2.5
    """
    fn = "gradient_discrepancy"
    for name, t in (("grad", grad), ("reference", reference)):
        check_tensor(t, name, who=fn, floating=True)
    if reference.shape != grad.shape:
        raise ValueError(
            f"{fn}: `reference` must have the shape of `grad` {tuple(grad.shape)}, got "
            f"{tuple(reference.shape)}"
        )
    if grad.numel() == 0:
        raise ValueError(f"{fn}: `grad` must be non-empty, got shape {tuple(grad.shape)}")
    kind = check_choice(kind, "kind", _DISCREPANCIES, who=fn)  # type: ignore[assignment]
    eps = check_real(eps, "eps", who=fn, minimum=0, open_low=True)
    out_dtype = torch.promote_types(grad.dtype, reference.dtype)
    cdt = torch.promote_types(out_dtype, torch.float32)
    a, b = grad.reshape(-1).to(cdt), reference.reshape(-1).to(cdt)
    if kind == "cosine":
        out = 1.0 - (a * b).sum() / (a.norm() * b.norm()).clamp_min(eps)
    elif kind == "l2":
        out = (a - b).pow(2).mean()
    else:
        out = (a - b).abs().mean()
    return out.to(out_dtype)


def _check_threshold_args(tensors: Any, threshold: Any, who: str, units: bool = False) -> float:
    """The checks of the soft-threshold forms, all before anything is changed: a list of
    floating-point tensors (with a dim of units when ``units``) and a threshold >= 0."""
    threshold = check_real(threshold, "threshold", who=who, minimum=0)
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{who}: `tensors` must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        check_tensor(t, f"tensors[{i}]", who=who, floating=True)
        if units and t.ndim < 1:
            raise ValueError(f"{who}: `tensors[{i}]` must have at least one dim (the units)")
    return threshold


def group_soft_threshold_(tensors: list[Tensor], threshold: float) -> None:
    """In place, the group soft-threshold of every output unit (slice along dim 0):
    ``w_u <- w_u * max(0, 1 - threshold * sqrt(n_u) / ||w_u||)`` with ``n_u`` the unit's
    number of entries.

    The proximal operator of ``threshold * sum_u sqrt(n_u) ||w_u||_2`` (group lasso over the
    rows of a Linear weight, the output channels of a conv weight): a unit whose norm is at
    most ``threshold * sqrt(n_u)`` becomes exactly zero as a whole, the others shrink
    towards zero along their own direction.

    Paper: Park et al., https://arxiv.org/abs/1811.08056 (strong regularisation; the group
    form is this library's, for :func:`torch_recal.shrink`).

    Args:
        tensors: floating-point tensors of at least one dim, changed in place.
        threshold: non-negative amount, per unit entry, taken off each unit's norm.

    Example:
        >>> import torch
        >>> from torch_recal.functional import group_soft_threshold_
        >>> w = [torch.tensor([[3.0, 4.0], [0.3, 0.4]])]  # unit norms 5 and 0.5
        >>> group_soft_threshold_(w, 1.0 / 2**0.5)  # takes 1.0 off each norm
        >>> w[0]
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    threshold = _check_threshold_args(tensors, threshold, "group_soft_threshold_", units=True)
    if not tensors or threshold == 0:
        return
    with torch.no_grad():
        for t in tensors:
            t.mul_(group_shrink_factor(t, threshold).reshape(-1, *([1] * (t.ndim - 1))))


def group_shrink_factor(weight: Tensor, threshold: float) -> Tensor:
    """Per unit (dim 0), ``max(0, 1 - threshold * sqrt(n_u) / ||w_u||)`` (0 for a zero unit):
    the factor :func:`group_soft_threshold_` multiplies each unit by."""
    rows = weight.reshape(weight.shape[0], -1) if weight.ndim else weight.reshape(1, 1)
    norms = torch.linalg.vector_norm(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=1)
    cut = threshold * math.sqrt(rows.shape[1])
    factor = torch.where(norms > cut, 1.0 - cut / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return factor.to(weight.dtype)

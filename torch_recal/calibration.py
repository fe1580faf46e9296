"""ResponseCalibration: per-sample Gaussian calibration of residual-branch responses (ResCNet).

Paper: Xu et al., "Deep feature response discriminative calibration", Neurocomputing 2025,
https://arxiv.org/abs/2411.13582 (official code: https://github.com/tcmyxc/ResCNet).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from typing_extensions import override

from torch_recal import functional as F
from torch_recal._checks import check_choice, check_flag, check_int
from torch_recal.functional import ChannelDim, Confidence

__all__ = ["ResponseCalibration"]

Stats = Literal["predicted", "static", "fixed"]
"""Where ``mu`` and ``sigma`` come from: the method's MLP, or one of the two ablations."""

_STATS = ("predicted", "static", "fixed")
# |logvar| beyond this changes nothing that float arithmetic can see (sigma + eps is eps, or
# z is 0), but exp(logvar / 2) would overflow half precision and give inf * 0 = nan gradients.
LOGVAR_LIMIT = 30.0


def _check_layer_options(
    reduction: Any, eps: Any, confidence: Any, stats: Any, channel_dim: Any, *, who: str
) -> tuple[int, float, Confidence, Stats, ChannelDim]:
    """The layer's options (shared by the constructor and :func:`torch_recal.calibrate`)."""
    reduction = check_int(reduction, "reduction", who=who, minimum=1)
    eps, confidence, channel_dim = F._check_options(eps, confidence, channel_dim, who=who)
    stats = check_choice(stats, "stats", _STATS, who=who)
    return reduction, eps, confidence, cast(Stats, stats), channel_dim


def _check_dtype(dtype: Any, *, who: str) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{who}: `dtype` must be a torch.dtype or None, got {dtype!r} ({type(dtype).__name__})"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"{who}: `dtype` must be a floating-point dtype, got {dtype}")


class ResponseCalibration(nn.Module):
    """Calibrate responses ``U`` with a per-sample, per-channel Gaussian confidence.

    ``out = U + w * U`` where ``w = Phi(-|z|)``, ``z = (U - mu) / (sigma + eps)`` and
    ``mu``, ``log sigma^2`` are predicted from the spatial mean of ``U`` by a small MLP
    (``fc1``: C -> C // reduction, then the two heads ``fc_mu`` and ``fc_logvar``, with no
    activation in between, as in the official code). There are no running buffers: training
    and evaluation compute the same function. Put it after the last norm of a residual
    branch, before the shortcut add (or let :func:`torch_recal.calibrate` do it).

    A residual block can hand it the shortcut too: ``layer(u, shortcut)`` returns the block's
    whole tail ``relu(shortcut + U + w * U)`` as one fused kernel (``relu=False`` leaves the
    ReLU out). Either way the call goes through ``nn.Module.__call__``, so forward hooks on the
    layer fire; with a shortcut, what they see as the output is the block's output.

    Dtypes: the input may be any floating dtype, whatever the layer's parameters are. The
    statistics MLP runs in the parameters' dtype (under autocast, in autocast's), the
    elementwise chain in at least float32, and the output has the input's dtype; so a
    float32 layer accepts float16/bfloat16 responses. The spatial mean is taken so that it
    cannot overflow while the input is finite (every term is scaled before the sum).

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        channels: number of channels ``C``.
        reduction: hidden width is ``max(1, channels // reduction)``; 4 in the paper's CIFAR
            models, 16 in its ImageNet models.
        eps: positive, finite constant added to ``sigma``.
        confidence: ``"cdf"`` (``w = Phi(-|z|)``, the official code) or ``"pdf"``
            (``w = exp(-z^2/2)``).
        stats: ``"predicted"`` (the method), ``"static"`` (learned per-channel ``mu`` and
            ``logvar``, no MLP) or ``"fixed"`` (``mu = 0``, ``sigma = 1``): the ablations.
        channel_dim: ``1`` for ``(N, C, *spatial)`` inputs, ``-1`` for ``(N, *tokens, C)``.
        device: where to create the parameters.
        dtype: parameter dtype (floating point).

    Shape:
        input ``(N, C, *spatial)`` (at least one spatial dim) or ``(N, *tokens, C)``;
        ``shortcut`` (optional) the same shape; output the same shape and dtype as the input.
        ``logvar`` is clamped to ``[-30, 30]`` so that ``exp`` stays finite.

    Raises:
        TypeError: an argument (or the input) of the wrong type: e.g. ``channels="8"``, a
            list, or an integer, bool or complex tensor as input.
        ValueError: a value out of range (``channels=0``, ``eps=inf``, an unknown option),
            or an input of the wrong shape or on another device.

    Example:
        >>> import torch
        >>> from torch_recal import ResponseCalibration
        >>> rc = ResponseCalibration(64, reduction=4)
        >>> u = torch.randn(8, 64, 16, 16)
        >>> rc(u).shape
        torch.Size([8, 64, 16, 16])
        >>> block_out = rc(u, torch.randn(8, 64, 16, 16))  # relu(shortcut + u + w u), fused
        >>> bool((block_out >= 0).all())
        True
        >>> rc(u.bfloat16()).dtype  # computed in float32, returned in the input's dtype
        torch.bfloat16
        >>> ResponseCalibration(192, 16, channel_dim=-1)(torch.randn(2, 197, 192)).shape
        torch.Size([2, 197, 192])
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        *,
        eps: float = 1e-5,
        confidence: Confidence = "cdf",
        stats: Stats = "predicted",
        channel_dim: ChannelDim = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = "ResponseCalibration"
        channels = check_int(channels, "channels", who=who, minimum=1)
        reduction, eps, confidence, stats, channel_dim = _check_layer_options(
            reduction, eps, confidence, stats, channel_dim, who=who
        )
        _check_dtype(dtype, who=who)
        super().__init__()
        self.channels = channels
        self.reduction = reduction
        self.eps = eps
        self.confidence = confidence
        self.stats = stats
        self.channel_dim = channel_dim
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if stats == "predicted":
            hidden = max(1, channels // reduction)
            self.fc1 = nn.Linear(channels, hidden, **factory)
            self.fc_mu = nn.Linear(hidden, channels, **factory)
            self.fc_logvar = nn.Linear(hidden, channels, **factory)
        elif stats == "static":
            self.mu = nn.Parameter(torch.empty(channels, **factory))
            self.logvar = nn.Parameter(torch.empty(channels, **factory))
        else:
            self.register_buffer("mu", torch.zeros(channels, **factory), persistent=False)
            self.register_buffer("sigma", torch.ones(channels, **factory), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the official CIFAR code: Linear weights N(0, 0.01), zero biases."""
        if self.stats == "predicted":
            for fc in (self.fc1, self.fc_mu, self.fc_logvar):
                nn.init.normal_(fc.weight, 0.0, 0.01)
                nn.init.zeros_(fc.bias)
        elif self.stats == "static":
            nn.init.zeros_(self.mu)
            nn.init.zeros_(self.logvar)

    @override
    def forward(self, u: Tensor, shortcut: Tensor | None = None, *, relu: bool = True) -> Tensor:
        """Calibrate ``u``; with ``shortcut``, return ``relu(shortcut + u + w u)`` (fused).

        Args:
            u: responses, ``(N, C, *spatial)`` or ``(N, *tokens, C)``, any floating dtype.
            shortcut: the block's identity/projection branch, ``u``'s shape (optional).
            relu: with ``shortcut``, apply the block's final ReLU (ignored without it).

        Returns:
            Tensor of ``u``'s shape and dtype.
        """
        who = "ResponseCalibration"
        cdim = F._check_response(
            u, self.channel_dim, who=who, channels=self.channels, device=self._device()
        )
        if shortcut is not None:
            F._check_shortcut(shortcut, u, who=who)
            relu = check_flag(relu, "relu", who=who)
        mu, sigma = self._statistics(u)
        return F._calibrate(
            u, shortcut, mu, sigma, self.eps, self.confidence, cdim, shortcut is not None and relu
        )

    def forward_residual(self, u: Tensor, shortcut: Tensor, relu: bool = True) -> Tensor:
        """``relu(shortcut + self(u))`` as one fused kernel: the same as ``self(u, shortcut)``.

        Kept for compatibility; it goes through ``__call__`` too (forward hooks fire).

        Example:
            >>> import torch
            >>> rc = ResponseCalibration(4)
            >>> u, x = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
            >>> torch.equal(rc.forward_residual(u, x), rc(u, x))
            True
        """
        out: Tensor = self(u, shortcut, relu=relu)
        return out

    def statistics(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(mu, sigma)`` for ``u``: shape ``(N, C)`` (predicted) or ``(C,)``.

        Example:
            >>> import torch
            >>> mu, sigma = ResponseCalibration(4).statistics(torch.randn(2, 4, 3, 3))
            >>> mu.shape, sigma.shape
            (torch.Size([2, 4]), torch.Size([2, 4]))
        """
        F._check_response(
            u,
            self.channel_dim,
            who="ResponseCalibration.statistics",
            channels=self.channels,
            device=self._device(),
        )
        return self._statistics(u)

    def _statistics(self, u: Tensor) -> tuple[Tensor, Tensor]:
        mu: Tensor
        logvar: Tensor
        if self.stats == "fixed":
            return self.mu, self.sigma  # type: ignore[return-value]
        if self.stats == "static":
            mu, logvar = self.mu, self.logvar
        else:
            s = _spatial_mean(u, self.channel_dim).to(self.fc1.weight.dtype)
            h = self.fc1(s)
            mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        cdt = torch.promote_types(logvar.dtype, torch.float32)
        logvar = logvar.to(cdt).clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)
        return mu.to(cdt), torch.exp(0.5 * logvar)

    def _device(self) -> torch.device:
        tensor = self.fc1.weight if self.stats == "predicted" else self.mu
        return tensor.device  # type: ignore[union-attr]

    @override
    def extra_repr(self) -> str:
        return (
            f"{self.channels}, reduction={self.reduction}, eps={self.eps}, "
            f"confidence={self.confidence!r}, stats={self.stats!r}, channel_dim={self.channel_dim}"
        )


def _spatial_mean(u: Tensor, channel_dim: int) -> Tensor:
    """Mean over the spatial (or token) dims, shape ``(N, C)``, in at least float32.

    Computed as a matrix-vector product with the weights ``1/n``: each term is scaled before
    it is summed, so the mean of finite responses is finite (a plain float32 sum of a
    thousand values near 1e38 overflows to inf), and ``u`` is still read once, with no
    scaled copy. Autocast is off for this product (its weights are in ``u``'s dtype).
    """
    batch = u.shape[0]
    channels = u.shape[1] if channel_dim == 1 else u.shape[-1]
    spatial = u.shape[2:] if channel_dim == 1 else u.shape[1:-1]
    n = 1
    for size in spatial:
        n = n * size
    weights = torch.full((n,), 1.0 / max(n, 1), dtype=u.dtype, device=u.device)
    with torch.autocast(u.device.type, enabled=False):
        if channel_dim == 1:
            s = u.reshape(batch, channels, n) @ weights
        else:
            s = weights @ u.reshape(batch, n, channels)
    return s.to(torch.promote_types(u.dtype, torch.float32))

"""ResponseCalibration: per-sample Gaussian calibration of residual-branch responses (ResCNet).

Paper: Xu et al., "Deep feature response discriminative calibration", Neurocomputing 2025,
https://arxiv.org/abs/2411.13582 (official code: https://github.com/tcmyxc/ResCNet).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import reduce
from torch import Tensor, nn

from torch_recal import functional as F

__all__ = ["ResponseCalibration"]

_STATS = ("predicted", "static", "fixed")
# |logvar| beyond this changes nothing that float arithmetic can see (sigma + eps is eps, or
# z is 0), but exp(logvar / 2) would overflow half precision and give inf * 0 = nan gradients.
LOGVAR_LIMIT = 30.0


class ResponseCalibration(nn.Module):
    """Calibrate responses ``U`` with a per-sample, per-channel Gaussian confidence.

    ``out = U + w * U`` where ``w = Phi(-|z|)``, ``z = (U - mu) / (sigma + eps)`` and
    ``mu``, ``log sigma^2`` are predicted from the spatial mean of ``U`` by a small MLP
    (``fc1``: C -> C // reduction, then the two heads ``fc_mu`` and ``fc_logvar``, with no
    activation in between, as in the official code). There are no running buffers: training
    and evaluation compute the same function. Put it after the last norm of a residual
    branch, before the shortcut add (or let :func:`torch_recal.calibrate` do it).

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        channels: number of channels ``C``.
        reduction: hidden width is ``max(1, channels // reduction)``; 4 in the paper's CIFAR
            models, 16 in its ImageNet models.
        eps: positive constant added to ``sigma``.
        confidence: ``"cdf"`` (``w = Phi(-|z|)``, the official code) or ``"pdf"``
            (``w = exp(-z^2/2)``).
        stats: ``"predicted"`` (the method), ``"static"`` (learned per-channel ``mu`` and
            ``logvar``, no MLP) or ``"fixed"`` (``mu = 0``, ``sigma = 1``): the ablations.
        channel_dim: ``1`` for ``(N, C, *spatial)`` inputs, ``-1`` for ``(N, *tokens, C)``.
        device: where to create the parameters.
        dtype: parameter dtype.

    Shape:
        input ``(N, C, *spatial)`` (at least one spatial dim) or ``(N, *tokens, C)``;
        output the same shape and dtype. Under autocast ``z`` and ``w`` are computed in
        float32 and ``logvar`` is clamped to ``[-30, 30]``.

    Example:
        >>> import torch
        >>> from torch_recal import ResponseCalibration
        >>> rc = ResponseCalibration(64, reduction=4)
        >>> rc(torch.randn(8, 64, 16, 16)).shape
        torch.Size([8, 64, 16, 16])
        >>> ResponseCalibration(192, 16, channel_dim=-1)(torch.randn(2, 197, 192)).shape
        torch.Size([2, 197, 192])
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        *,
        eps: float = 1e-5,
        confidence: str = "cdf",
        stats: str = "predicted",
        channel_dim: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _positive_int("channels", channels)
        _positive_int("reduction", reduction)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"ResponseCalibration: `eps` must be a positive float, got {eps!r}")
        if confidence not in ("cdf", "pdf"):
            raise ValueError(
                f"ResponseCalibration: `confidence` must be 'cdf' or 'pdf', got {confidence!r}"
            )
        if stats not in _STATS:
            raise ValueError(f"ResponseCalibration: `stats` must be one of {_STATS}, got {stats!r}")
        if channel_dim not in (1, -1):
            raise ValueError(
                f"ResponseCalibration: `channel_dim` must be 1 (N, C, *spatial) or -1 "
                f"(N, *tokens, C), got {channel_dim!r}"
            )
        self.channels = channels
        self.reduction = reduction
        self.eps = float(eps)
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

    def forward(self, u: Tensor) -> Tensor:
        mu, sigma = self.statistics(u)
        return F.response_calibration(
            u, mu, sigma, self.eps, confidence=self.confidence, channel_dim=self.channel_dim
        )

    def forward_residual(self, u: Tensor, shortcut: Tensor, relu: bool = True) -> Tensor:
        """``relu(shortcut + self(u))`` as one fused kernel (used by residual blocks)."""
        mu, sigma = self.statistics(u)
        return F.response_calibration_residual(
            u,
            shortcut,
            mu,
            sigma,
            self.eps,
            confidence=self.confidence,
            channel_dim=self.channel_dim,
            relu=relu,
        )

    def statistics(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(mu, sigma)`` for ``u``: shape ``(N, C)`` (predicted) or ``(C,)``."""
        self._check_input(u)
        mu: Tensor
        logvar: Tensor
        if self.stats == "fixed":
            return self.mu, self.sigma  # type: ignore[return-value]
        if self.stats == "static":
            mu, logvar = self.mu, self.logvar
        else:
            pattern = "n c ... -> n c" if self.channel_dim == 1 else "n ... c -> n c"
            s = reduce(u, pattern, "mean")
            h = self.fc1(s)
            mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        cdt = torch.promote_types(logvar.dtype, torch.float32)
        logvar = logvar.to(cdt).clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)
        return mu.to(cdt), torch.exp(0.5 * logvar)

    def _check_input(self, u: Tensor) -> None:
        if u.ndim < 3:
            layout = "(N, C, *spatial)" if self.channel_dim == 1 else "(N, *tokens, C)"
            raise ValueError(
                f"ResponseCalibration: input must have shape {layout} with at least one "
                f"spatial/token dim, got shape {tuple(u.shape)}"
            )
        got = u.shape[1] if self.channel_dim == 1 else u.shape[-1]
        if got != self.channels:
            raise ValueError(
                f"ResponseCalibration: expected {self.channels} channels in dim "
                f"{self.channel_dim} of the input, got {got} (input shape {tuple(u.shape)})"
            )

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, reduction={self.reduction}, eps={self.eps}, "
            f"confidence={self.confidence!r}, stats={self.stats!r}, channel_dim={self.channel_dim}"
        )


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ResponseCalibration: `{name}` must be a positive int, got {value!r}")

"""Independent numpy/scipy references written from the papers' formulas (not from the code)."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def calibrated_response(
    u: np.ndarray,
    mu: np.ndarray,
    sigma: np.ndarray,
    eps: float = 1e-5,
    confidence: str = "cdf",
    channel_dim: int = 1,
) -> np.ndarray:
    """ResCNet: out = U + w U with w = Phi(-|z|) (or exp(-z^2/2)), z = (U - mu)/(sigma + eps).

    ``mu``/``sigma`` have shape (N, C) or (C,) and are broadcast over all non-channel dims.
    """
    u = np.asarray(u, dtype=np.float64)
    cdim = 1 if channel_dim == 1 else u.ndim - 1

    def bcast(s: np.ndarray) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)
        shape = [1] * u.ndim
        if s.ndim == 2:
            shape[0] = s.shape[0]
        shape[cdim] = s.shape[-1]
        return s.reshape(shape)

    z = (u - bcast(mu)) / (bcast(sigma) + eps)
    w = norm.cdf(-np.abs(z)) if confidence == "cdf" else np.exp(-(z**2) / 2)
    return u + w * u


def predicted_stats(
    u: np.ndarray, fc1: tuple, fc_mu: tuple, fc_logvar: tuple, channel_dim: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma from the spatial mean through fc1 -> (fc_mu, fc_logvar); (weight, bias) pairs."""
    u = np.asarray(u, dtype=np.float64)
    axes = tuple(range(2, u.ndim)) if channel_dim == 1 else tuple(range(1, u.ndim - 1))
    s = u.mean(axis=axes)
    h = s @ fc1[0].T + fc1[1]
    mu = h @ fc_mu[0].T + fc_mu[1]
    logvar = h @ fc_logvar[0].T + fc_logvar[1]
    return mu, np.exp(logvar / 2)


def linear_params(layer) -> tuple[np.ndarray, np.ndarray]:
    return (
        layer.weight.detach().double().numpy(),
        layer.bias.detach().double().numpy(),
    )


def forward_with_reference_calibration(plain, x, positions):
    """Run ``plain`` with each module in ``positions`` followed by the numpy formula.

    ``positions`` maps a module name of ``plain`` to the ResponseCalibration layer whose
    weights define the statistics. Test-only forward hooks replace the module's output by
    ``calibrated_response`` computed in numpy from the paper's formula.
    """
    import torch

    handles = []
    for name, layer in positions.items():

        def hook(_module, _inputs, out, layer=layer):
            u = out.detach().double().numpy()
            mu, sigma = predicted_stats(
                u, linear_params(layer.fc1), linear_params(layer.fc_mu),
                linear_params(layer.fc_logvar), layer.channel_dim,
            )  # fmt: skip
            ref = calibrated_response(u, mu, sigma, layer.eps, layer.confidence, layer.channel_dim)
            return torch.from_numpy(ref).to(out.dtype)

        handles.append(plain.get_submodule(name).register_forward_hook(hook))
    try:
        return plain(x)
    finally:
        for h in handles:
            h.remove()

"""How sparse a model is: zero counts per tensor and the compression ratio.

The compression ratio is the one of Park et al. (https://arxiv.org/abs/1811.08056): dense
parameters / non-zero parameters. :func:`compression_report` counts the weights a model
*uses*: for a module pruned with :mod:`torch.nn.utils.prune` that is ``weight_orig *
weight_mask``, for a parametrized one (:mod:`torch.nn.utils.parametrize`) the parametrized
value, not the stored original.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torch_recal import _dist
from torch_recal._checks import check_flag, check_real

__all__ = ["CompressionReport", "LayerSparsity", "compression_report", "is_weight"]

_PAPER = "https://arxiv.org/abs/1811.08056"


def is_weight(name: str, tensor: Tensor) -> bool:
    """The ``weights_only`` rule: at least 2 dims and a name that does not end in ``bias``
    (conv/linear weights; biases and norm parameters are 1-D).

    Example:
        >>> import torch
        >>> is_weight("fc.weight", torch.zeros(3, 4)), is_weight("bn.weight", torch.zeros(3))
        (True, False)
    """
    return tensor.ndim >= 2 and name.rsplit(".", 1)[-1] != "bias"


@dataclass(frozen=True)
class LayerSparsity:
    """Zero count of one tensor in a :class:`CompressionReport`."""

    name: str
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        """Fraction of zero entries."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class CompressionReport:
    """Per-tensor and total sparsity; ``str(report)`` is a table, :meth:`to_dict` plain data.

    ``compression_ratio`` is dense parameters / non-zero parameters over the reported
    tensors, as Park et al. define it (https://arxiv.org/abs/1811.08056); ``inf`` when every
    reported weight is zero.

    Example:
        >>> from torch_recal import compression_report
        >>> layer = torch.nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     layer.weight[:, :2] = 0.0
        >>> compression_report(layer).to_dict()["compression_ratio"]
        2.0
    """

    layers: tuple[LayerSparsity, ...]
    threshold: float

    @property
    def total(self) -> int:
        """Number of reported entries."""
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        """Number of zero (``|w| <= threshold``) entries."""
        return sum(layer.zeros for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        """Number of non-zero entries."""
        return self.total - self.zeros

    @property
    def sparsity(self) -> float:
        """Fraction of zero entries."""
        return self.zeros / self.total if self.total else 0.0

    @property
    def compression_ratio(self) -> float:
        """Dense / non-zero parameters (``inf`` when all are zero)."""
        return self.total / self.nonzeros if self.nonzeros else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the per-tensor counts and the totals (for logging or JSON)."""
        return {
            "layers": [{**asdict(x), "sparsity": x.sparsity} for x in self.layers],
            "threshold": self.threshold,
            "total": self.total,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "compression_ratio": self.compression_ratio,
        }

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


def _effective_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(name, effective value, tensor holding the storage)`` for every parameter a module
    uses: ``orig * mask`` for pruned tensors, the parametrized value for parametrized ones."""
    for prefix, module in model.named_modules():
        pre = f"{prefix}." if prefix else ""
        pruned = {
            name[: -len("_orig")]
            for name in module._parameters
            if name.endswith("_orig") and hasattr(module, name[: -len("_orig")] + "_mask")
        }
        for name in pruned:
            orig = module._parameters[name + "_orig"]
            mask = getattr(module, name + "_mask")
            yield pre + name, orig.detach() * mask, orig  # type: ignore[union-attr]
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:  # type: ignore[union-attr]
                if name not in pruned:
                    original = module.parametrizations[name].original  # type: ignore[index]
                    yield pre + name, getattr(module, name).detach(), original
        for name, p in module._parameters.items():
            if p is None or (name.endswith("_orig") and name[: -len("_orig")] in pruned):
                continue
            yield pre + name, p.detach(), p


@torch.no_grad()
def compression_report(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    *,
    threshold: float = 0.0,
    weights_only: bool = True,
) -> CompressionReport:
    """Count zero (or ``|w| <= threshold``) weights per tensor and in total.

    For a module, the weights it uses are counted: a tensor pruned with
    :mod:`torch.nn.utils.prune` counts as ``weight_orig * weight_mask`` (reported as
    ``layer.weight``), a parametrized one as its parametrized value. Tied (shared) tensors
    are counted once. Sharded (FSDP2) tensors are counted over all ranks.

    Paper: Park et al., https://arxiv.org/abs/1811.08056 (compression ratio = dense
    parameters / non-zero parameters).

    Args:
        model: a module, or ``(name, tensor)`` pairs.
        threshold: weights with ``|w| <= threshold`` count as zero; ``0.0`` counts exact zeros.
        weights_only: report only tensors with at least 2 dims whose name does not end in
            ``bias`` (the tensors :class:`~torch_recal.CoherentStrongReg` regularises by
            default).

    Returns:
        A :class:`CompressionReport`; print it for a table.

    Raises:
        TypeError: ``model`` is neither a module nor an iterable of ``(name, tensor)`` pairs.
        ValueError: ``threshold`` is negative or not finite; a weight is NaN or inf; no tensor
            is selected.

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
    who = "compression_report"
    threshold = check_real(threshold, "threshold", who=who, minimum=0)
    weights_only = check_flag(weights_only, "weights_only", who=who)
    if isinstance(model, nn.Module):
        triples = list(_effective_tensors(model))
    elif isinstance(model, Tensor) or model is None or not isinstance(model, Iterable):
        raise TypeError(
            f"{who}: `model` must be an nn.Module or (name, tensor) pairs, got "
            f"{type(model).__name__}"
        )
    else:
        triples = []
        for i, item in enumerate(model):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
                raise TypeError(
                    f"{who}: `model` must hold (name, tensor) pairs, got "
                    f"{type(item).__name__} at position {i}"
                )
            triples.append((str(item[0]), item[1].detach(), item[1]))
    layers, seen = [], set()
    for name, value, storage in triples:
        if id(storage) in seen or (weights_only and not is_weight(name, value)):
            continue
        seen.add(id(storage))
        local = _dist.local_tensor(value)  # FSDP2 / DTensor: count this rank's slice
        counts = torch.stack([
            torch.count_nonzero(local.abs() > threshold),
            torch.count_nonzero(~torch.isfinite(local)) if local.is_floating_point()
            else torch.zeros((), dtype=torch.long, device=local.device),
        ])  # fmt: skip
        if _dist.is_dtensor(value):  # ... and add the other slices' counts (a collective)
            _dist.all_reduce_over_shards_(counts, value)
        nonzero, nonfinite = (int(c) for c in counts.tolist())
        if nonfinite:
            raise ValueError(
                f"{who}: tensor `{name}` has {nonfinite} NaN or inf entries; a non-finite "
                "weight is neither zero nor a usable weight"
            )
        layers.append(LayerSparsity(name, value.numel(), value.numel() - nonzero))
    if not layers:
        raise ValueError(
            f"{who}: `model` has no tensor to report (with weights_only={weights_only}, only "
            "tensors with at least 2 dims whose name does not end in 'bias' are counted)"
        )
    return CompressionReport(tuple(layers), threshold)

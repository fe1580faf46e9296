"""Reading batches of any shape (private): ``batch_fn=`` and the default ``(x, y)`` pair.

Shared by the entry points that take a loader (``pinv_refit_dense``): the default accepts a
pair only, and anything else gets a ``TypeError`` that says how to write a ``batch_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batch", "BatchFn", "call_model", "check_batch_fn", "check_loader", "split_batch"]

Batch = tuple[Any, Any]
"""What a ``batch_fn`` returns: ``(inputs_or_features, labels_or_targets)``."""
BatchFn = Callable[[Any], Batch]


def check_loader(loader: Any, *, who: str) -> Iterable[Any]:
    """An iterable of batches (a DataLoader, a list, a generator); ``TypeError`` otherwise."""
    if isinstance(loader, (str, bytes, Mapping)) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{who}: `loader` must be an iterable of batches (a DataLoader, a list), "
            f"got {type(loader).__name__}"
        )
    return loader


def check_batch_fn(batch_fn: Any, *, who: str) -> BatchFn | None:
    """``None`` or a callable (``TypeError`` otherwise)."""
    if batch_fn is not None and not callable(batch_fn):
        raise TypeError(
            f"{who}: `batch_fn` must be a callable or None, got {type(batch_fn).__name__}"
        )
    return batch_fn


def split_batch(item: Any, batch_fn: BatchFn | None, *, who: str) -> Batch:
    """``(inputs, labels)`` of one batch: ``batch_fn(item)``, or ``item`` itself when it is a
    pair; otherwise a ``TypeError`` naming ``batch_fn`` with an example for that batch.

    Example:
        >>> split_batch({"x": 1, "y": 2}, lambda b: (b["x"], b["y"]), who="f")
        (1, 2)
        >>> split_batch((1, 2, 3), None, who="f")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: f: `loader` must yield (inputs, labels) pairs, got a tuple of 3 items; ...
    """
    if batch_fn is not None:
        out = batch_fn(item)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            got = f"a {type(out).__name__}"
            if isinstance(out, (tuple, list)):
                got += f" of {len(out)} items"
            raise TypeError(f"{who}: `batch_fn` must return an (inputs, labels) pair, got {got}")
        return out[0], out[1]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, Mapping):
        got = f"a {type(item).__name__} with keys {sorted(map(str, item))}"
        example = "batch_fn=lambda b: (b['pixel_values'], b['labels'])"
    elif isinstance(item, (tuple, list)):
        got = f"a {type(item).__name__} of {len(item)} items"
        example = "batch_fn=lambda b: (b[0], b[1])"
    else:
        got = f"a {type(item).__name__}"
        example = "batch_fn=lambda b: (b.inputs, b.labels)"
    raise TypeError(
        f"{who}: `loader` must yield (inputs, labels) pairs, got {got}; pass `batch_fn=` to "
        f"map each batch to (inputs, labels), e.g. {example}"
    )


def call_model(model: nn.Module, inputs: Any, device: torch.device) -> Any:
    """``model(inputs)``: a tensor is moved to ``device`` first; a dict is passed as keyword
    arguments (its tensors moved to ``device``), as Hugging Face models take them."""
    if isinstance(inputs, Tensor):
        return model(inputs.to(device))
    if isinstance(inputs, Mapping):
        return model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()})
    return model(inputs)

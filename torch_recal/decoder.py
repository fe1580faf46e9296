"""ReferenceDecoder: the generative network whose last layer gives GGR its reference gradient.

Paper: Reza & Jung, "Generative gradient regularization ...", IEEE Access 2025,
https://doi.org/10.1109/ACCESS.2025.3534216 (see :mod:`torch_recal.generative`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from torch_recal import _dist
from torch_recal._checks import check_choice, check_flag, check_instance, check_int, check_real

__all__ = ["ReferenceDecoder"]

ReconstructionLoss = Literal["mse", "l1"]
_REC_LOSSES: tuple[str, ...] = get_args(ReconstructionLoss)


def _int_pair(value: Any, name: str, who: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each ``>= minimum``, as a pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"{who}: `{name}` must be an int or a pair of ints, got {len(value)} values "
                f"{tuple(value)!r}"
            )
        first, second = (check_int(v, name, who=who, minimum=minimum) for v in value)
        return first, second
    if isinstance(value, str):  # e.g. padding="same": not supported
        raise TypeError(f"{who}: `{name}` must be an int or a pair of ints, got {value!r} (str)")
    v = check_int(value, name, who=who, minimum=minimum)
    return v, v


def _check_images(x: Any, name: str, who: str, channels: int, must: str = "must be") -> Tensor:
    """A non-empty floating-point batch ``(N, channels, H, W)``; ``must`` says how ``name``
    gives it ("must be", "must yield", "must return")."""
    want = f"`{name}` {must} a floating-point image batch (N, {channels}, H, W)"
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: {want}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: {want}, got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{who}: {want}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{who}: {want} with at least one sample, got shape {tuple(x.shape)}")
    return x


class ReferenceDecoder(nn.Module):
    """A small conv autoencoder whose last layer mirrors a classifier's first conv.

    ``encoder``: ``Conv2d(in, hidden, k, stride, padding)`` (the geometry of the mirrored
    conv) + ReLU + ``Conv2d(hidden, hidden, 3, padding=1)`` + ReLU; ``decoder``:
    ``Conv2d(hidden, C1, 3, padding=1)`` + ReLU + ``out = ConvTranspose2d(C1, in, k, stride,
    padding)``. The weight of ``out`` has shape ``(C1, in, k, k)``, the shape of the mirrored
    conv's weight, so the gradient the reconstruction loss gives it (:meth:`gradient`) is the
    reference gradient of :class:`~torch_recal.GenerativeGradientLoss`. The reconstruction
    has the input's spatial size (the transposed conv is told the output size, so odd sizes
    with stride > 1 work). The architecture is INFERRED (the paper's is not public).

    Build it with :meth:`for_layer`, train it with :meth:`fit`.

    Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216

    Args:
        in_channels: image channels (the mirrored conv's input channels).
        out_channels: the mirrored conv's output channels ``C1``.
        kernel_size: the mirrored conv's kernel size (an int >= 1 or a pair).
        stride: its stride (>= 1).
        padding: its padding (an int >= 0 or a pair; string paddings are not supported).
        dilation: its dilation (>= 1).
        hidden: width of the autoencoder's inner layers (default ``out_channels``).
        loss: reconstruction loss, ``"mse"`` (default) or ``"l1"`` (mean over all elements).
        device: where to create the parameters.
        dtype: parameter dtype (floating point).

    Raises:
        TypeError: an argument of the wrong type (e.g. ``padding="same"``).
        ValueError: a value out of range (``kernel_size=0``, ``stride=0``, ``padding=-1``,
            an unknown ``loss``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import ReferenceDecoder
        >>> conv = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
        >>> dec = ReferenceDecoder.for_layer(conv)
        >>> dec.out.weight.shape == conv.weight.shape
        True
        >>> x = torch.randn(2, 3, 33, 33)
        >>> dec(x).shape, dec.gradient(x).shape
        (torch.Size([2, 3, 33, 33]), torch.Size([16, 3, 7, 7]))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        *,
        hidden: int | None = None,
        loss: ReconstructionLoss = "mse",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        who = "ReferenceDecoder"
        in_channels = check_int(in_channels, "in_channels", who=who, minimum=1)
        out_channels = check_int(out_channels, "out_channels", who=who, minimum=1)
        hidden = out_channels if hidden is None else check_int(hidden, "hidden", who=who, minimum=1)
        geometry: dict[str, Any] = {
            "kernel_size": _int_pair(kernel_size, "kernel_size", who, 1),
            "stride": _int_pair(stride, "stride", who, 1),
            "padding": _int_pair(padding, "padding", who, 0),
            "dilation": _int_pair(dilation, "dilation", who, 1),
        }
        loss = check_choice(loss, "loss", _REC_LOSSES, who=who)  # type: ignore[assignment]
        if dtype is not None:
            check_instance(dtype, "dtype", torch.dtype, who=who)
            if not dtype.is_floating_point:
                raise ValueError(f"{who}: `dtype` must be a floating-point dtype, got {dtype}")
        super().__init__()
        self.loss = loss
        f: dict[str, Any] = {"device": device, "dtype": dtype}
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden, **geometry, **f),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, **f),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(nn.Conv2d(hidden, out_channels, 3, padding=1, **f), nn.ReLU())
        self.out = nn.ConvTranspose2d(out_channels, in_channels, **geometry, **f)

    @classmethod
    def for_layer(
        cls,
        conv: nn.Conv2d,
        *,
        hidden: int | None = None,
        loss: ReconstructionLoss = "mse",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ReferenceDecoder:
        """Build a decoder whose last layer mirrors ``conv`` (same weight shape and geometry).

        Args:
            conv: the classifier's first ``nn.Conv2d`` (``groups=1``, numeric padding).
            hidden: width of the inner layers (default ``conv.out_channels``).
            loss: reconstruction loss, ``"mse"`` or ``"l1"``.
            device: default: the device of ``conv.weight``.
            dtype: default: the dtype of ``conv.weight``.

        Example:
            >>> from torch import nn
            >>> from torch_recal import ReferenceDecoder
            >>> ReferenceDecoder.for_layer(nn.Conv2d(1, 8, 3, padding=1)).out
            ConvTranspose2d(8, 1, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
        """
        who = "ReferenceDecoder.for_layer"
        check_instance(conv, "conv", nn.Conv2d, who=who, what="an nn.Conv2d")
        if conv.groups != 1:
            raise ValueError(f"{who}: `conv` must have groups=1, got groups={conv.groups}")
        if isinstance(conv.padding, str):
            raise ValueError(
                f"{who}: `conv` must use numeric padding, got padding={conv.padding!r}"
            )
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            hidden=hidden,
            loss=loss,
            device=conv.weight.device if device is None else device,
            dtype=conv.weight.dtype if dtype is None else dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x`` (a non-empty batch ``(N, in_channels, H, W)``)."""
        _check_images(x, "x", "ReferenceDecoder", self.out.out_channels)
        return self.out(self.decoder(self.encoder(x)), output_size=list(x.shape[-2:]))

    def reconstruction_loss(self, x: Tensor) -> Tensor:
        """The mean reconstruction loss of the batch ``x``."""
        return self._loss(self(x), x)

    def _loss(self, rec: Tensor, x: Tensor) -> Tensor:
        loss_fn = nn.functional.mse_loss if self.loss == "mse" else nn.functional.l1_loss
        return loss_fn(rec, x)

    def gradient(self, x: Tensor) -> Tensor:
        """The reference gradient ``d L_rec(x) / d out.weight`` for the batch ``x`` (detached).

        Only the last layer is differentiated (the rest runs under ``no_grad``); the
        decoder's parameters and their ``.grad`` are not changed. ``x`` is cast to the
        decoder's device and dtype; under ``torch.autocast`` the convolutions run in the
        autocast dtype and the gradient has the weight's dtype.

        Args:
            x: a non-empty batch of images ``(N, in_channels, H, W)``.

        Returns:
            A tensor of the shape of ``out.weight``.
        """
        _check_images(x, "x", "ReferenceDecoder.gradient", self.out.out_channels)
        x = x.to(device=self.out.weight.device, dtype=self.out.weight.dtype)
        with torch.no_grad():
            h = self.decoder(self.encoder(x))
        with torch.enable_grad():
            rec = self.out(h, output_size=list(x.shape[-2:]))
            (grad,) = torch.autograd.grad(self._loss(rec, x), self.out.weight)
        return grad.detach()

    def fit(
        self,
        loader: Iterable[Any],
        epochs: int = 1,
        *,
        lr: float = 1e-3,
        optimizer: torch.optim.Optimizer | None = None,
        progress: bool = False,
        batch_fn: Callable[[Any], Any] | None = None,
    ) -> list[float]:
        """Train the autoencoder to reconstruct the batches of ``loader``.

        Under ``torch.distributed`` the parameters are first broadcast from rank 0 and the
        gradients are averaged over ranks before each step, so every rank ends with the same
        decoder, equal to a single-process fit over the global batches (equal per-rank batch
        sizes assumed).

        A batch whose loss is not finite (NaN or inf, on any rank) is skipped with a
        :class:`RuntimeWarning`: no optimizer step, the weights stay as they were, and it does
        not count in the epoch's mean. On an error (a bad batch, an empty epoch, an epoch
        whose every batch was skipped) the decoder, its gradients and ``optimizer`` are put
        back as they were before the call.

        Args:
            loader: an iterable of image batches ``(N, C, H, W)``, of ``(x,)`` or ``(x, y)``
                pairs (a ``DataLoader`` of ``(x, y)`` works), or of anything ``batch_fn``
                maps. Iterated once per epoch, so with ``epochs > 1`` it must be re-iterable
                (a list, a ``DataLoader``; not a generator).
            epochs: number of passes over ``loader``.
            lr: learning rate of the default Adam optimizer.
            optimizer: use this optimizer instead (over this module's parameters).
            progress: show a ``tqdm`` bar if tqdm is installed (silently none otherwise).
            batch_fn: maps one batch (a dict, a tuple, any object) to its input images: a
                tensor, or an ``(inputs, labels)`` pair as for ``pinv_refit_dense`` (the
                labels are ignored). E.g. ``batch_fn=lambda b: b["pixel_values"]``.

        Returns:
            The mean reconstruction loss of each epoch (floats).

        Raises:
            TypeError: ``loader`` is not an iterable of batches, or an argument has the
                wrong type.
            ValueError: ``epochs > 1`` with a one-shot iterator, a batch of the wrong shape or
                with no samples, an epoch with no batches, or no finite loss in an epoch.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch_recal import ReferenceDecoder
            >>> dec = ReferenceDecoder.for_layer(nn.Conv2d(1, 4, 3, padding=1))
            >>> batches = [{"image": torch.randn(4, 1, 8, 8)} for _ in range(2)]
            >>> losses = dec.fit(batches, epochs=3, lr=3e-2, batch_fn=lambda b: b["image"])
            >>> len(losses), losses[-1] < losses[0]
            (3, True)
        """
        who = "ReferenceDecoder.fit"
        if isinstance(loader, Tensor) or not isinstance(loader, Iterable):
            raise TypeError(
                f"{who}: `loader` must be an iterable of batches (a DataLoader, a list of "
                f"tensors), got {type(loader).__name__}"
                + (" (wrap one batch in a list: [x])" if isinstance(loader, Tensor) else "")
            )
        epochs = check_int(epochs, "epochs", who=who, minimum=1)
        lr = check_real(lr, "lr", who=who, minimum=0, open_low=True)
        progress = check_flag(progress, "progress", who=who)
        if batch_fn is not None and not callable(batch_fn):
            raise TypeError(f"{who}: `batch_fn` must be callable, got {type(batch_fn).__name__}")
        if optimizer is not None:
            check_instance(optimizer, "optimizer", torch.optim.Optimizer, who=who)
            own = {id(p) for p in self.parameters()}
            if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
                raise ValueError(
                    f"{who}: `optimizer` must optimize only this decoder's parameters, but it "
                    "holds others (e.g. the classifier's)"
                )
        if epochs > 1 and isinstance(loader, Iterator):
            raise ValueError(
                f"{who}: `loader` is a one-shot iterator ({type(loader).__name__}), which would "
                f"be empty after the first of epochs={epochs}; pass a list or a DataLoader, "
                "or epochs=1"
            )
        saved = self._save(optimizer)
        was_training = self.training
        bar = None
        try:
            if optimizer is None:
                optimizer = torch.optim.Adam(self.parameters(), lr=lr)
            params = [p for p in self.parameters() if p.requires_grad]
            with torch.no_grad():
                _dist.broadcast_(*params)
            n_batches = _len_or_none(loader)
            bar = _progress(None if n_batches is None else epochs * n_batches, progress)
            self.train()
            history = []
            for epoch in range(epochs):
                history.append(self._epoch(loader, optimizer, params, batch_fn, bar, epoch))
        except Exception:
            self._restore(saved)
            raise
        finally:
            if bar is not None:
                bar.close()
            self.train(was_training)
        return history

    def _epoch(
        self,
        loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        batch_fn: Callable[[Any], Any] | None,
        bar: Any,
        epoch: int,
    ) -> float:
        """One pass over ``loader``; the mean loss of its applied batches."""
        who = "ReferenceDecoder.fit"
        total, count, skipped = 0.0, 0, 0
        for batch in loader:
            x = _inputs(batch, batch_fn, who, self.out.out_channels)
            x = x.to(device=self.out.weight.device, dtype=self.out.weight.dtype)
            loss = self.reconstruction_loss(x)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            # the loss rides along with the gradients' all-reduce: every rank skips alike
            shared = loss.detach().reshape(1).clone()
            _dist.all_reduce_mean_(shared, *(p.grad for p in params if p.grad is not None))
            if not math.isfinite(float(shared)):
                skipped += 1
                optimizer.zero_grad(set_to_none=False)
                warnings.warn(
                    f"{who}: non-finite reconstruction loss ({float(shared)}) in epoch {epoch}: "
                    "that batch is skipped (no update)",
                    RuntimeWarning,
                    stacklevel=3,  # the caller of fit()
                )
                continue
            optimizer.step()
            value = float(loss.detach())
            total += value
            count += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{value:.4g}")
        if count == 0:
            if skipped:
                raise ValueError(
                    f"{who}: every batch of epoch {epoch} ({skipped}) had a non-finite loss; "
                    "check `loader` for NaN or inf inputs"
                )
            raise ValueError(
                f"{who}: `loader` yielded no batches"
                + (f" in epoch {epoch} (is it empty on a second pass?)" if epoch else "")
            )
        return total / count

    def _save(self, optimizer: torch.optim.Optimizer | None) -> tuple[Any, ...]:
        """What :meth:`fit` puts back on an error."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.parameters()]
        opt_state = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
        return state, grads, optimizer, opt_state

    def _restore(self, saved: tuple[Any, ...]) -> None:
        state, grads, optimizer, opt_state = saved
        self.load_state_dict(state)
        for p, g in zip(self.parameters(), grads, strict=True):
            p.grad = g
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)


def _inputs(batch: Any, batch_fn: Callable[[Any], Any] | None, who: str, channels: int) -> Tensor:
    """The image tensor of one batch (checked)."""
    hint = "pass `batch_fn=` mapping a batch to its input images (e.g. batch_fn=lambda b: b[0])"
    name = "loader"
    if batch_fn is not None:
        batch, name = batch_fn(batch), "batch_fn"
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]  # an (inputs, labels) pair, as pinv_refit_dense's batch_fn gives
    elif isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise ValueError(
                f"{who}: `loader` yielded a {type(batch).__name__} of {len(batch)} items; "
                f"without `batch_fn` a batch is a tensor, (x,) or an (x, y) pair: {hint}"
            )
        batch = batch[0]
    elif not isinstance(batch, Tensor):
        raise TypeError(
            f"{who}: `loader` must yield image tensors (N, C, H, W) or (x, y) pairs, got "
            f"{type(batch).__name__}; {hint}"
        )
    must = "must return" if batch_fn is not None else "must yield"
    return _check_images(batch, name, who, channels, must)


def _len_or_none(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _progress(total: int | None, enabled: bool) -> Any:
    if not enabled or _dist.get_rank() != 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc="ReferenceDecoder.fit", leave=False)

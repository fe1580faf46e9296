"""GenerativeGradientLoss (GGR): refine a classifier's first layer with a generative reference.

Paper: Reza & Jung, "Generative gradient regularization ...", IEEE Access 2025,
https://doi.org/10.1109/ACCESS.2025.3534216

What the paper states (abstract): a *pretrained* classifier is refined; the decoder of a
generative network produces a reference gradient; the classifier is trained to reduce the
discrepancy between that reference and the gradient its first-layer filters receive; this
raises the variance of the first-layer filters and improves accuracy. Everything else here
(the decoder's architecture, the reconstruction loss, the discrepancy, the weight, the EMA,
the distributed semantics) is this library's choice, exposed as an option with a default:

.. code-block:: text

    g_cls = d task_loss / d W1            W1: the first conv weight (C1, in, k, k),
                                          create_graph=True (double backprop)
    g_ref = d L_rec(x) / d W_dec          W_dec: the decoder's last ConvTranspose2d
                                          weight, same shape (C1, in, k, k); detached
    term  = weight * D(g_cls, g_ref)      D: "cosine" (1 - cos), "l2" (mean squared
                                          difference) or "l1" (mean absolute difference)

Under ``torch.distributed`` (DDP) the term equals the one a single process computes over
the global batch (see :class:`GenerativeGradientLoss`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from torch_recal import _dist
from torch_recal import _double_backward as _db

__all__ = ["FilterStats", "GenerativeGradientLoss", "ReferenceDecoder", "first_layer_filter_stats"]

_DISCREPANCIES = ("cosine", "l2", "l1")
_REC_LOSSES = ("mse", "l1")


# --------------------------------------------------------------------------------------------
# Diagnostics


class FilterStats(NamedTuple):
    """Per-filter statistics of a conv weight ``(C_out, C_in, *kernel)``.

    Attributes:
        variance: ``(C_out,)`` population variance of each filter's weights.
        norm: ``(C_out,)`` Euclidean norm of each filter.
    """

    variance: Tensor
    norm: Tensor

    @property
    def mean_variance(self) -> float:
        """The mean of the per-filter variances (one number to compare before/after)."""
        return float(self.variance.mean())


def first_layer_filter_stats(layer: nn.Module | Tensor) -> FilterStats:
    """Per-filter variance and norm of a conv layer (by default a model's first ``Conv2d``).

    The paper reports that GGR raises the variance of the first-layer filters; compare
    ``first_layer_filter_stats(model).mean_variance`` before and after refining.

    Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216

    Args:
        layer: a conv module, a weight tensor ``(C_out, C_in, *kernel)``, or any model (its
            first ``nn.Conv2d`` in registration order is used).

    Returns:
        :class:`FilterStats` with detached float tensors: ``variance`` is the population
        variance (divide by ``C_in * prod(kernel)``) of each filter, ``norm`` its L2 norm.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import first_layer_filter_stats
        >>> weight = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 2.0], [0.0, 2.0]]]])
        >>> stats = first_layer_filter_stats(weight)
        >>> stats.variance.tolist(), stats.norm.tolist()
        ([0.0, 1.0], [2.0, 2.8284270763397217])
    """
    if isinstance(layer, Tensor):
        weight = layer
    elif isinstance(layer, nn.Module):
        weight = _first_conv(layer, "first_layer_filter_stats").weight
    else:
        raise TypeError(
            "first_layer_filter_stats: `layer` must be an nn.Module or a weight tensor, got "
            f"{type(layer).__name__}"
        )
    if weight.dim() < 2:
        raise ValueError(
            "first_layer_filter_stats: expected a weight of shape (C_out, C_in, *kernel), got "
            f"shape {tuple(weight.shape)}"
        )
    w = weight.detach().flatten(1).float()
    return FilterStats(w.var(dim=1, unbiased=False), w.norm(dim=1))


def _first_conv(model: nn.Module, who: str) -> nn.Conv2d:
    for module in model.modules():  # the model itself first
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{who}: `{type(model).__name__}` contains no nn.Conv2d")


# --------------------------------------------------------------------------------------------
# Reference decoder


class ReferenceDecoder(nn.Module):
    """A small conv autoencoder whose last layer mirrors a classifier's first conv.

    ``encoder``: ``Conv2d(in, hidden, k, stride, padding)`` (the geometry of the mirrored
    conv) + ReLU + ``Conv2d(hidden, hidden, 3, padding=1)`` + ReLU; ``decoder``:
    ``Conv2d(hidden, C1, 3, padding=1)`` + ReLU + ``out = ConvTranspose2d(C1, in, k, stride,
    padding)``. The weight of ``out`` has shape ``(C1, in, k, k)``, the shape of the mirrored
    conv's weight, so the gradient the reconstruction loss gives it (:meth:`gradient`) is the
    reference gradient of :class:`GenerativeGradientLoss`. The reconstruction has the input's
    spatial size (the transposed conv is told the output size, so odd sizes with stride > 1
    work). The architecture is INFERRED (the paper's is not public).

    Build it with :meth:`for_layer`, train it with :meth:`fit`.

    Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216

    Args:
        in_channels: image channels (the mirrored conv's input channels).
        out_channels: the mirrored conv's output channels ``C1``.
        kernel_size: the mirrored conv's kernel size.
        stride: its stride.
        padding: its padding (an int or a pair; string paddings are not supported).
        dilation: its dilation.
        hidden: width of the autoencoder's inner layers (default ``out_channels``).
        loss: reconstruction loss, ``"mse"`` (default) or ``"l1"`` (mean over all elements).
        device: where to create the parameters.
        dtype: parameter dtype.

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
        loss: str = "mse",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            _check_positive_int("ReferenceDecoder", name, value)
        hidden = out_channels if hidden is None else hidden
        _check_positive_int("ReferenceDecoder", "hidden", hidden)
        if isinstance(padding, str):
            raise ValueError(
                f"ReferenceDecoder: `padding` must be an int or a pair of ints, got {padding!r}"
            )
        if loss not in _REC_LOSSES:
            raise ValueError(f"ReferenceDecoder: `loss` must be one of {_REC_LOSSES}, got {loss!r}")
        self.loss = loss
        f: dict[str, Any] = {"device": device, "dtype": dtype}
        geometry: dict[str, Any] = {"stride": stride, "padding": padding, "dilation": dilation}
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, **geometry, **f),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, **f),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(nn.Conv2d(hidden, out_channels, 3, padding=1, **f), nn.ReLU())
        self.out = nn.ConvTranspose2d(out_channels, in_channels, kernel_size, **geometry, **f)

    @classmethod
    def for_layer(
        cls,
        conv: nn.Conv2d,
        *,
        hidden: int | None = None,
        loss: str = "mse",
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
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                "ReferenceDecoder.for_layer: `conv` must be an nn.Conv2d, got "
                f"{type(conv).__name__}"
            )
        if conv.groups != 1:
            raise ValueError(
                f"ReferenceDecoder.for_layer: `conv` must have groups=1, got groups={conv.groups}"
            )
        if isinstance(conv.padding, str):
            raise ValueError(
                "ReferenceDecoder.for_layer: `conv` must use numeric padding, got "
                f"padding={conv.padding!r}"
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
        """The reconstruction of ``x`` (same shape)."""
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
        decoder's parameters and their ``.grad`` are not changed.
        """
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
    ) -> list[float]:
        """Train the autoencoder to reconstruct the batches of ``loader``.

        Under ``torch.distributed`` the parameters are first broadcast from rank 0 and the
        gradients are averaged over ranks before each step, so every rank ends with the same
        decoder, equal to a single-process fit over the global batches (equal per-rank batch
        sizes assumed).

        Args:
            loader: an iterable of image batches ``(N, C, H, W)``, or of tuples/lists whose
                first element is that batch (a ``DataLoader`` of ``(x, y)`` works). Iterated
                once per epoch.
            epochs: number of passes over ``loader``.
            lr: learning rate of the default Adam optimizer.
            optimizer: use this optimizer instead (over this module's parameters).
            progress: show a ``tqdm`` bar if tqdm is installed (silently none otherwise).

        Returns:
            The mean reconstruction loss of each epoch (floats).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch_recal import ReferenceDecoder
            >>> dec = ReferenceDecoder.for_layer(nn.Conv2d(1, 4, 3, padding=1))
            >>> batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]
            >>> losses = dec.fit(batches, epochs=3, lr=3e-2)
            >>> len(losses), losses[-1] < losses[0]
            (3, True)
        """
        _check_positive_int("ReferenceDecoder.fit", "epochs", epochs)
        if optimizer is None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"ReferenceDecoder.fit: `lr` must be a positive float, got {lr!r}")
            optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.no_grad():
            _dist.broadcast_(*params)
        n_batches = _len_or_none(loader)
        bar = _progress(None if n_batches is None else epochs * n_batches, progress)
        was_training = self.training
        self.train()
        history: list[float] = []
        try:
            for epoch in range(epochs):
                total, count = 0.0, 0
                for batch in loader:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if not isinstance(x, Tensor) or x.dim() != 4:
                        raise ValueError(
                            "ReferenceDecoder.fit: `loader` must yield image batches (N, C, H, W) "
                            f"or (x, ...) tuples, got {type(x).__name__}"
                            + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
                        )
                    x = x.to(device=self.out.weight.device, dtype=self.out.weight.dtype)
                    loss = self.reconstruction_loss(x)
                    optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    _dist.all_reduce_mean_(*(p.grad for p in params if p.grad is not None))
                    optimizer.step()
                    value = float(loss.detach())
                    total += value
                    count += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=epoch, loss=f"{value:.4g}")
                if count == 0:
                    raise ValueError("ReferenceDecoder.fit: `loader` yielded no batches")
                history.append(total / count)
        finally:
            if bar is not None:
                bar.close()
            self.train(was_training)
        return history


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


# --------------------------------------------------------------------------------------------
# The loss term


class GenerativeGradientLoss:
    """Generative gradient regularisation: pull the first layer's gradient to a reference.

    ``term = ggr(task_loss, x)`` computes ``g_cls = d task_loss / d target`` with
    ``create_graph=True``, gets the reference gradient ``g_ref`` for the batch ``x``
    (detached), and returns ``weight * D(g_cls, g_ref)``. Then ``(task_loss + term)
    .backward()`` updates the whole network through double backprop. With ``every=k`` only
    the calls ``0, k, 2k, ...`` compute the term; the others return an exact zero tensor that
    requires no grad and build no graph (no double backprop, no reference computed).

    Discrepancies ``D`` (``a = g_cls``, ``b = g_ref``, flattened): ``"cosine"``:
    ``1 - <a, b> / max(|a| |b|, eps)`` in ``[0, 2]``, invariant to the scale of either
    (default); ``"l2"``: ``mean((a - b)^2)``; ``"l1"``: ``mean(|a - b|)``. For ``"l2"`` and
    ``"l1"`` the scale of the reference matters: a :class:`ReferenceDecoder`'s gradient is
    not on the classifier's scale, so they suit a reference you scaled yourself.

    Reference: a :class:`ReferenceDecoder` (its :meth:`~ReferenceDecoder.gradient` of the
    batch), any callable ``x -> tensor`` of the target's shape, or a fixed tensor of that
    shape. It is detached and cast to the target's device and dtype. With ``ema=beta`` the
    reference used is an exponential moving average over the applied steps,
    ``r <- beta * r + (1 - beta) * g_ref`` (the first applied step sets ``r = g_ref``).

    Distributed (DDP, ``sync=True``, the default when ``torch.distributed`` is initialised;
    FSDP is not supported: a sharded target raises ``TypeError``):
    ``g_cls`` and ``g_ref`` are averaged over ranks before ``D``, so with equal per-rank batch
    sizes and a ``task_loss`` that is a batch mean, the term and the reference
    on every rank equal a single-process run over the global batch. The term's backward
    passes the gradient straight through the average (identity), so after DDP averages the
    parameter gradients over ranks they too equal the single-process ones. Use
    ``sync=False`` for per-rank terms (e.g. several independent runs in one process group).
    Call it on every rank on the same steps (a collective runs on applied steps).

    All of this beyond the abstract's description is INFERRED (see ``docs/methods/
    generative.md``).

    Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216

    Args:
        target: the first conv's weight, a leaf tensor that requires grad (e.g.
            ``model.conv1.weight``; with DDP, ``ddp.module.conv1.weight``).
        reference: a :class:`ReferenceDecoder`, a callable ``x -> tensor`` or a fixed tensor,
            all of the target's shape.
        discrepancy: ``"cosine"`` (default), ``"l2"`` or ``"l1"``.
        weight: the factor ``lambda >= 0`` of the term (default 0.1, INFERRED: on
            Fashion-MNIST 1.0 raised the filter variance but cost accuracy, see the method
            card; may be changed between steps through the attribute ``weight``).
        ema: ``None`` (no averaging, default) or ``beta`` in ``[0, 1)``.
        every: apply on every ``every``-th call (default 1: every call).
        eps: floor of the norm product in the cosine.
        sync: average over ranks under ``torch.distributed`` (default True; a no-op alone).
        fused_double_backward: give train-mode batch norms (PyTorch's native kernel: CPU, or
            CUDA with cuDNN off) and GELUs a fused double backward, one compiled kernel per
            layer instead of PyTorch's eager composite (default True). The values are
            PyTorch's to round-off; the model is not changed. ``False`` keeps PyTorch's
            formulas.

    Attributes:
        step: number of calls so far (applied or skipped); saved by :meth:`state_dict`.
        reference_ema: the running average of the reference (``ema`` set), else ``None``.
        last_reference: the reference used on the last applied step (after sync and EMA).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import GenerativeGradientLoss, ReferenceDecoder
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        ...                       nn.Linear(4 * 8 * 8, 3))
        >>> decoder = ReferenceDecoder.for_layer(model[0])
        >>> ggr = GenerativeGradientLoss(model[0].weight, decoder, weight=0.5, every=2)
        >>> x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> loss = nn.functional.cross_entropy(model(x), y)
        >>> term = ggr(loss, x)
        >>> 0.0 <= term.item() <= 1.0
        True
        >>> (loss + term).backward()
        >>> ggr(nn.functional.cross_entropy(model(x), y), x)  # call 1 of every=2: skipped
        tensor(0.)
        >>> ggr.state_dict()["step"]
        2
    """

    def __init__(
        self,
        target: Tensor,
        reference: ReferenceDecoder | Callable[[Tensor], Tensor] | Tensor,
        *,
        discrepancy: str = "cosine",
        weight: float = 0.1,
        ema: float | None = None,
        every: int = 1,
        eps: float = 1e-12,
        sync: bool = True,
        fused_double_backward: bool = True,
    ) -> None:
        who = "GenerativeGradientLoss"
        if not isinstance(target, Tensor):
            raise TypeError(f"{who}: `target` must be a tensor (e.g. model.conv1.weight), got "
                            f"{type(target).__name__}")  # fmt: skip
        if not (target.is_leaf and target.requires_grad):
            raise ValueError(
                f"{who}: `target` must be a leaf tensor that requires grad (a parameter such as "
                "model.conv1.weight), got a "
                + ("non-leaf tensor" if not target.is_leaf else "tensor with requires_grad=False")
            )
        if not target.is_floating_point():
            raise TypeError(f"{who}: `target` must be floating point, got {target.dtype}")
        if _dist.is_sharded(target):
            raise TypeError(
                f"{who}: `target` is sharded (FSDP / DTensor), which is not supported: the "
                "double backward needs the weight the forward pass uses, and FSDP replaces it "
                "by a gathered copy. Use DDP"
            )
        if isinstance(reference, ReferenceDecoder):
            if tuple(reference.out.weight.shape) != tuple(target.shape):
                raise ValueError(
                    f"{who}: `reference` decoder's last layer has weight shape "
                    f"{tuple(reference.out.weight.shape)}, expected the target's shape "
                    f"{tuple(target.shape)} (build it with ReferenceDecoder.for_layer(conv))"
                )
        elif isinstance(reference, Tensor):
            if tuple(reference.shape) != tuple(target.shape):
                raise ValueError(
                    f"{who}: `reference` tensor has shape {tuple(reference.shape)}, expected the "
                    f"target's shape {tuple(target.shape)}"
                )
        elif not callable(reference):
            raise TypeError(
                f"{who}: `reference` must be a ReferenceDecoder, a callable x -> tensor or a "
                f"tensor, got {type(reference).__name__}"
            )
        _check_options(who, discrepancy, weight, ema, every)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"{who}: `eps` must be a positive float, got {eps!r}")
        for name, flag in (("sync", sync), ("fused_double_backward", fused_double_backward)):
            if not isinstance(flag, bool):
                raise TypeError(f"{who}: `{name}` must be a bool, got {type(flag).__name__}")
        self.target = target
        self.reference = reference
        self.discrepancy = discrepancy
        self._weight = float(weight)
        self.ema = None if ema is None else float(ema)
        self.every = int(every)
        self.eps = float(eps)
        self.sync = sync
        self.fused_double_backward = fused_double_backward
        self.step = 0
        self.reference_ema: Tensor | None = None
        self.last_reference: Tensor | None = None

    @property
    def weight(self) -> float:
        """The factor of the term (a float >= 0)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        _check_weight(value)
        self._weight = float(value)

    def will_apply(self) -> bool:
        """Whether the next call computes the term (``step % every == 0``)."""
        return self.step % self.every == 0

    def __call__(self, task_loss: Tensor, x: Tensor | None = None) -> Tensor:
        """Return the regularisation term for this step (add it to ``task_loss``).

        Args:
            task_loss: the scalar task loss (e.g. cross-entropy), still attached to its graph.
            x: the input batch (needed unless the reference is a fixed tensor).

        Returns:
            A scalar tensor: ``weight * D(g_cls, g_ref)`` on applied steps, an exact zero
            (no grad, no graph) on skipped steps.
        """
        who = "GenerativeGradientLoss"
        if not isinstance(task_loss, Tensor) or task_loss.numel() != 1:
            raise ValueError(
                f"{who}: `task_loss` must be a scalar tensor, got "
                + (
                    f"shape {tuple(task_loss.shape)}"
                    if isinstance(task_loss, Tensor)
                    else type(task_loss).__name__
                )
            )
        if not task_loss.requires_grad:
            raise ValueError(
                f"{who}: `task_loss` does not require grad (computed under no_grad, or "
                "detached?); it must be attached to the graph that uses `target`"
            )
        if not self.will_apply():
            self.step += 1
            return torch.zeros((), device=task_loss.device, dtype=task_loss.dtype)
        ref = self._reference(x)
        fused = self.fused_double_backward
        with _db.fused_double_backward(task_loss) if fused else contextlib.nullcontext():
            (g_cls,) = torch.autograd.grad(
                task_loss.reshape(()), self.target, create_graph=True, allow_unused=True
            )
        if g_cls is None:
            raise ValueError(
                f"{who}: `task_loss` does not depend on `target`; pass the weight of a layer "
                "that the loss's forward pass used (and the model's own parameter, not a copy; "
                "under FSDP the forward uses gathered copies, which is not supported)"
            )
        _db.raise_if_not_twice_differentiable(g_cls, who)
        # Commit state only now: nothing above changed it.
        if self.ema is not None:
            if self.reference_ema is None:
                self.reference_ema = ref.clone()
            else:
                self.reference_ema.mul_(self.ema).add_(ref, alpha=1.0 - self.ema)
            ref = self.reference_ema.clone()
        self.last_reference = ref
        self.step += 1
        if self.sync and _dist.is_distributed():
            g_cls = _mean_over_ranks_straight_through(g_cls)
        return self._weight * discrepancy_fn(g_cls, ref, self.discrepancy, self.eps)

    def _reference(self, x: Tensor | None) -> Tensor:
        who = "GenerativeGradientLoss"
        ref_obj = self.reference
        if isinstance(ref_obj, Tensor):
            ref = ref_obj
        else:
            if not isinstance(x, Tensor):
                raise ValueError(
                    f"{who}: `x` (the input batch) is needed to compute the reference gradient, "
                    f"got {type(x).__name__}"
                )
            ref = ref_obj.gradient(x) if isinstance(ref_obj, ReferenceDecoder) else ref_obj(x)
            if not isinstance(ref, Tensor) or tuple(ref.shape) != tuple(self.target.shape):
                got = tuple(ref.shape) if isinstance(ref, Tensor) else type(ref).__name__
                raise ValueError(
                    f"{who}: `reference` returned {got}, expected a tensor of the target's "
                    f"shape {tuple(self.target.shape)}"
                )
            if self.sync and _dist.is_distributed():
                ref = ref.detach().clone()
                _dist.all_reduce_mean_(ref)
        return ref.detach().to(device=self.target.device, dtype=self.target.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the call counter, the EMA of the reference (or None), the options."""
        return {
            "step": self.step,
            "reference_ema": None if self.reference_ema is None else self.reference_ema.clone(),
            "every": self.every,
            "ema": self.ema,
            "weight": self._weight,
            "discrepancy": self.discrepancy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked first: nothing changes on a bad state)."""
        who = "GenerativeGradientLoss.load_state_dict"
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"{who}: expected a dict from state_dict(), got {state!r:.80}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{who}: `step` must be an int >= 0, got {step!r}")
        ema_t = state.get("reference_ema")
        if ema_t is not None and (
            not isinstance(ema_t, Tensor) or tuple(ema_t.shape) != tuple(self.target.shape)
        ):
            raise ValueError(
                f"{who}: `reference_ema` must be None or a tensor of shape "
                f"{tuple(self.target.shape)}"
            )
        every = state.get("every", self.every)
        weight = state.get("weight", self._weight)
        ema = state.get("ema", self.ema)
        discrepancy = state.get("discrepancy", self.discrepancy)
        _check_options(who, discrepancy, weight, ema, every)
        self.step = step
        self.reference_ema = (
            None
            if ema_t is None
            else ema_t.detach().to(device=self.target.device, dtype=self.target.dtype).clone()
        )
        self.every, self._weight, self.ema, self.discrepancy = (
            every,
            float(weight),
            ema,
            discrepancy,
        )

    def __repr__(self) -> str:
        return (
            f"GenerativeGradientLoss(target={tuple(self.target.shape)}, reference="
            f"{type(self.reference).__name__}, discrepancy={self.discrepancy!r}, "
            f"weight={self._weight}, ema={self.ema}, every={self.every}, step={self.step})"
        )


def discrepancy_fn(a: Tensor, b: Tensor, kind: str = "cosine", eps: float = 1e-12) -> Tensor:
    """``D(a, b)`` of :class:`GenerativeGradientLoss` on flattened tensors (differentiable).

    Example:
        >>> import torch
        >>> from torch_recal.generative import discrepancy_fn
        >>> a = torch.tensor([1.0, 0.0])
        >>> discrepancy_fn(a, -3 * a).item(), discrepancy_fn(a, torch.tensor([0.0, 2.0])).item()
        (2.0, 1.0)
    """
    a, b = a.reshape(-1), b.reshape(-1)
    if kind == "cosine":
        denom = (a.norm() * b.norm()).clamp_min(eps)
        return 1.0 - (a * b).sum() / denom
    if kind == "l2":
        return (a - b).pow(2).mean()
    if kind == "l1":
        return (a - b).abs().mean()
    raise ValueError(f"discrepancy: `kind` must be one of {_DISCREPANCIES}, got {kind!r}")


def _mean_over_ranks_straight_through(g: Tensor) -> Tensor:
    """Value: the mean of ``g`` over ranks. Gradient: identity to the local ``g``.

    The identity (not ``1 / world``) is right because DDP then averages the parameter
    gradients over ranks: ``mean_r dD/dG . dg_r/dtheta`` is the global-batch gradient.
    """
    mean = g.detach().clone()
    _dist.all_reduce_mean_(mean)
    return g + (mean - g.detach())


def _check_options(
    who: str, discrepancy: object, weight: object, ema: object, every: object
) -> None:
    """The options shared by the constructor and ``load_state_dict`` (ValueError if bad)."""
    if discrepancy not in _DISCREPANCIES:
        raise ValueError(
            f"{who}: `discrepancy` must be one of {_DISCREPANCIES}, got {discrepancy!r}"
        )
    _check_weight(weight)
    if ema is not None and (
        isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1
    ):
        raise ValueError(f"{who}: `ema` must be None or a float in [0, 1), got {ema!r}")
    _check_positive_int(who, "every", every)


def _check_positive_int(who: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: `{name}` must be a positive int, got {value!r}")


def _check_weight(weight: object) -> None:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(
            f"GenerativeGradientLoss: `weight` must be a finite float >= 0, got {weight!r}"
        )

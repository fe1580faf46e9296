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
    term  = weight * D(g_cls, g_ref)      D: torch_recal.functional.gradient_discrepancy,
                                          "cosine" (1 - cos), "l2" or "l1"

Under ``torch.distributed`` (DDP) the term equals the one a single process computes over
the global batch; under mixed precision it takes a ``torch.amp.GradScaler`` (see
:class:`GenerativeGradientLoss`). The decoder lives in :mod:`torch_recal.decoder`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from torch_recal import _dist
from torch_recal import _double_backward as _db
from torch_recal._checks import (
    check_choice,
    check_finite_tensor,
    check_flag,
    check_instance,
    check_int,
    check_optional_real,
    check_real,
    check_state_keys,
    check_tensor,
)
from torch_recal.decoder import ReferenceDecoder
from torch_recal.functional import gradient_discrepancy

__all__ = ["FilterStats", "GenerativeGradientLoss", "ReferenceDecoder", "first_layer_filter_stats"]

Discrepancy = Literal["cosine", "l2", "l1"]
_WHO = "GenerativeGradientLoss"
# A sanity bound on the saved call counter (over two billion calls): a larger value in a
# checkpoint is taken as corrupted.
_MAX_STEPS = 2**31 - 1
_STATE_KEYS = ("num_steps", "num_ema_updates", "reference_ema")

# The options that may be set between steps, each checked on every assignment.
_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "discrepancy": lambda v: check_choice(v, "discrepancy", get_args(Discrepancy), who=_WHO),
    "weight": lambda v: check_real(v, "weight", who=_WHO, minimum=0),
    "ema": lambda v: check_optional_real(v, "ema", who=_WHO, minimum=0, maximum=1, open_high=True),
    "every": lambda v: check_int(v, "every", who=_WHO, minimum=1),
    "eps": lambda v: check_real(v, "eps", who=_WHO, minimum=0, open_low=True),
    "sync": lambda v: check_flag(v, "sync", who=_WHO),
    "fused_double_backward": lambda v: check_flag(v, "fused_double_backward", who=_WHO),
}

# Deprecated alias (before 0.1): the discrepancy is the public functional form
# :func:`torch_recal.functional.gradient_discrepancy`.
discrepancy_fn = gradient_discrepancy


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
    who = "first_layer_filter_stats"
    check_instance(layer, "layer", (nn.Module, Tensor), who=who, what="an nn.Module or a Tensor")
    weight = layer if isinstance(layer, Tensor) else _first_conv(layer, who).weight
    if weight.dim() < 2 or weight.numel() == 0:
        raise ValueError(
            f"{who}: `layer` must be a non-empty weight of shape (C_out, C_in, *kernel), got "
            f"shape {tuple(weight.shape)}"
        )
    w = weight.detach().flatten(1).float()
    return FilterStats(w.var(dim=1, unbiased=False), w.norm(dim=1))


def _first_conv(model: nn.Module, who: str) -> nn.Conv2d:
    for module in model.modules():  # the model itself first
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{who}: `layer` ({type(model).__name__}) contains no nn.Conv2d")


# --------------------------------------------------------------------------------------------
# The loss term


class GenerativeGradientLoss:
    """Generative gradient regularisation: pull the first layer's gradient to a reference.

    ``term = ggr(task_loss, x)`` computes ``g_cls = d task_loss / d target`` with
    ``create_graph=True``, gets the reference gradient ``g_ref`` for the batch ``x``
    (detached), and returns ``weight * D(g_cls, g_ref)``. Then ``(task_loss + term)
    .backward()`` updates the whole network through double backprop. With ``every=k`` only
    the calls ``0, k, 2k, ...`` compute the term; the others return an exact zero tensor that
    requires no grad and builds no graph (no double backprop, no reference computed).

    ``D`` is :func:`torch_recal.functional.gradient_discrepancy` (``a = g_cls``,
    ``b = g_ref``, flattened): ``"cosine"``: ``1 - <a, b> / max(|a| |b|, eps)`` in
    ``[0, 2]``, invariant to the scale of either (default); ``"l2"``: ``mean((a - b)^2)``;
    ``"l1"``: ``mean(|a - b|)``. For ``"l2"`` and ``"l1"`` the scale of the reference
    matters: a :class:`ReferenceDecoder`'s gradient is not on the classifier's scale, so they
    suit a reference you scaled yourself.

    Reference: a :class:`ReferenceDecoder` (its :meth:`~ReferenceDecoder.gradient` of the
    batch), any callable ``x -> tensor`` of the target's shape, or a fixed tensor of that
    shape. It is detached and cast to the target's device and dtype. With ``ema=beta`` the
    reference used is an exponential moving average over the applied steps,
    ``r <- beta * r + (1 - beta) * g_ref`` (the first averaged step sets ``r = g_ref``).

    Non-finite values (``docs/conventions.md``): on an applied step whose reference or
    ``g_cls`` holds a NaN or inf (a NaN batch, an overflow), the term is an exact zero, the
    average and ``last_reference`` are not updated, and a :class:`RuntimeWarning` says so;
    the call still counts in ``num_steps``. With a ``scaler``, a non-finite ``g_cls`` is the
    scaler's business (it skips ``optimizer.step()`` on that step): the same zero, no warning.

    Mixed precision: under ``torch.autocast`` with bfloat16 nothing more is needed (the
    target is a float32 parameter, so ``g_cls`` and the term are float32). With float16 and a
    ``torch.amp.GradScaler``, pass it: ``ggr(loss, x, scaler=scaler)`` takes the gradient of
    ``scaler.scale(loss)`` (so small gradients do not underflow) and multiplies it by
    ``1 / scaler.get_scale()`` before ``D``, as in PyTorch's AMP notes ("gradient penalty");
    then ``scaler.scale(loss + term).backward()`` as usual.

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
        target: the first conv's weight, a floating-point leaf tensor that requires grad
            (e.g. ``model.conv1.weight``; with DDP, ``ddp.module.conv1.weight``).
        reference: a :class:`ReferenceDecoder`, a callable ``x -> tensor`` or a fixed
            (finite, floating-point) tensor, all of the target's shape.
        discrepancy: ``"cosine"`` (default), ``"l2"`` or ``"l1"``.
        weight: the factor ``lambda >= 0`` of the term (default 0.003, INFERRED: the
            weight with the best mean validation accuracy of the grid 0.003-0.1 in the
            reproduction suite's exploration, chosen on validation in all 3 seeds; but no
            weight beat plain CE refinement there: mean validation accuracy 0.8126 at 0.003
            against 0.8131 for CE, -0.05 points, falling to 0.8071 at 0.1. It is the least
            harmful weight, not a demonstrated gain; see the method card).
        ema: ``None`` (no averaging, default) or ``beta`` in ``[0, 1)``.
        every: apply on every ``every``-th call (default 1: every call).
        eps: floor of the norm product in the cosine (> 0).
        sync: average over ranks under ``torch.distributed`` (default True; a no-op alone).
        fused_double_backward: give train-mode batch norms (PyTorch's native kernel: CPU, or
            CUDA with cuDNN off) and GELUs a fused double backward, one compiled kernel per
            layer instead of PyTorch's eager composite (default True). The values are
            PyTorch's to round-off; the model is not changed. ``False`` keeps PyTorch's
            formulas.

    Attributes:
        num_steps: number of calls so far (applied or skipped); saved by :meth:`state_dict`.
        num_ema_updates: number of references averaged into ``reference_ema`` (0 without
            ``ema``); saved.
        reference_ema: the running average of the reference (``ema`` set), else ``None``;
            saved.
        last_reference: the reference used on the last applied step (after sync and EMA).
        discrepancy, weight, ema, every, eps, sync, fused_double_backward: the options; each
            may be changed between steps and is checked on assignment (``ggr.every = 0``
            raises ``ValueError``). Setting ``ema = None`` drops the running average.

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
        >>> ggr.num_steps
        2
    """

    discrepancy: Discrepancy
    weight: float
    ema: float | None
    every: int
    eps: float
    sync: bool
    fused_double_backward: bool

    def __init__(
        self,
        target: Tensor,
        reference: ReferenceDecoder | Callable[[Tensor], Tensor] | Tensor,
        *,
        discrepancy: Discrepancy = "cosine",
        weight: float = 0.003,
        ema: float | None = None,
        every: int = 1,
        eps: float = 1e-12,
        sync: bool = True,
        fused_double_backward: bool = True,
    ) -> None:
        who = _WHO
        check_tensor(target, "target", who=who, floating=True)
        if not (target.is_leaf and target.requires_grad):
            raise ValueError(
                f"{who}: `target` must be a leaf tensor that requires grad (a parameter such as "
                "model.conv1.weight), got a "
                + ("non-leaf tensor" if not target.is_leaf else "tensor with requires_grad=False")
            )
        if _dist.is_sharded(target):
            raise TypeError(
                f"{who}: `target` is sharded (FSDP / DTensor), which is not supported: the "
                "double backward needs the weight the forward pass uses, and FSDP replaces it "
                "by a gathered copy. Use DDP"
            )
        shape = tuple(target.shape)
        if isinstance(reference, ReferenceDecoder):
            if tuple(reference.out.weight.shape) != shape:
                raise ValueError(
                    f"{who}: `reference` decoder's last layer has weight shape "
                    f"{tuple(reference.out.weight.shape)}, expected the target's shape "
                    f"{shape} (build it with ReferenceDecoder.for_layer(conv))"
                )
        elif isinstance(reference, Tensor):
            check_tensor(reference, "reference", who=who, floating=True, shape=shape)
            check_finite_tensor(reference, "reference", who=who)
        elif not callable(reference):
            raise TypeError(
                f"{who}: `reference` must be a ReferenceDecoder, a callable x -> tensor or a "
                f"tensor, got {type(reference).__name__}"
            )
        options = {
            "discrepancy": discrepancy,
            "weight": weight,
            "ema": ema,
            "every": every,
            "eps": eps,
            "sync": sync,
            "fused_double_backward": fused_double_backward,
        }
        checked = {name: _OPTIONS[name](value) for name, value in options.items()}
        self.target = target
        self.reference = reference
        self.num_steps = 0
        self.num_ema_updates = 0
        self.reference_ema: Tensor | None = None
        self.last_reference: Tensor | None = None
        for name, value in checked.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        check = _OPTIONS.get(name)
        if check is not None:
            value = check(value)
            if name == "ema" and value is None:  # no average is kept without `ema`
                object.__setattr__(self, "reference_ema", None)
                object.__setattr__(self, "num_ema_updates", 0)
        object.__setattr__(self, name, value)

    @property
    def step(self) -> int:
        """Deprecated alias of :attr:`num_steps` (read-only)."""
        warnings.warn(
            "GenerativeGradientLoss.step is deprecated; use num_steps",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.num_steps

    def will_apply(self) -> bool:
        """Whether the next call computes the term (``num_steps % every == 0``)."""
        return self.num_steps % self.every == 0

    def __call__(
        self,
        task_loss: Tensor,
        x: Tensor | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """Return the regularisation term for this step (add it to ``task_loss``).

        Args:
            task_loss: the scalar task loss (e.g. cross-entropy), still attached to its graph.
            x: the input batch (needed unless the reference is a fixed tensor).
            scaler: the ``torch.amp.GradScaler`` of a float16 mixed-precision loop: the
                gradient is taken of the scaled loss and unscaled before ``D``.

        Returns:
            A scalar tensor: ``weight * D(g_cls, g_ref)`` on applied steps; an exact zero
            (no grad, no graph) on skipped steps and on steps with non-finite gradients.
        """
        who = _WHO
        check_tensor(task_loss, "task_loss", who=who)
        if task_loss.numel() != 1:
            raise ValueError(
                f"{who}: `task_loss` must be a scalar tensor, got shape {tuple(task_loss.shape)}"
            )
        if not task_loss.requires_grad:
            raise ValueError(
                f"{who}: `task_loss` does not require grad (computed under no_grad, or "
                "detached?); it must be attached to the graph that uses `target`"
            )
        if x is not None:
            check_tensor(x, "x", who=who)
            if x.numel() == 0:
                raise ValueError(
                    f"{who}: `x` must be a non-empty batch, got shape {tuple(x.shape)}"
                )
        if scaler is not None:
            check_instance(scaler, "scaler", torch.amp.GradScaler, who=who)
        if not self.will_apply():
            self.num_steps += 1
            return self._zero(task_loss)
        ref = self._reference(x)
        outputs = task_loss.reshape(())
        if scaler is not None:
            outputs = scaler.scale(outputs)
        fused = self.fused_double_backward
        with _db.fused_double_backward(outputs) if fused else contextlib.nullcontext():
            (g_cls,) = torch.autograd.grad(
                outputs, self.target, create_graph=True, allow_unused=True
            )
        if g_cls is None:
            raise ValueError(
                f"{who}: `task_loss` does not depend on `target`; pass the weight of a layer "
                "that the loss's forward pass used (and the model's own parameter, not a copy; "
                "under FSDP the forward uses gathered copies, which is not supported)"
            )
        _db.raise_if_not_twice_differentiable(g_cls, who)
        if scaler is not None:
            g_cls = g_cls * (1.0 / scaler.get_scale())
        if self.sync and _dist.is_distributed():
            g_cls = _mean_over_ranks_straight_through(g_cls)
        ref_finite, grad_finite = torch.stack(
            [torch.isfinite(ref).all(), torch.isfinite(g_cls.detach()).all()]
        ).tolist()
        if not (ref_finite and grad_finite):
            if not ref_finite or scaler is None:
                what = "reference gradient" if not ref_finite else "gradient of `task_loss`"
                warnings.warn(
                    f"{who}: non-finite {what} (NaN or inf) at call {self.num_steps}: the term "
                    "is 0 for this step and the reference average is not updated",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.num_steps += 1
            return self._zero(task_loss)
        # Commit state only now: nothing above changed it.
        if self.ema is not None:
            if self.reference_ema is None:
                self.reference_ema = ref.clone()
            else:
                self.reference_ema.mul_(self.ema).add_(ref, alpha=1.0 - self.ema)
            self.num_ema_updates += 1
            ref = self.reference_ema.clone()
        self.last_reference = ref
        self.num_steps += 1
        return self.weight * gradient_discrepancy(g_cls, ref, self.discrepancy, self.eps)

    @staticmethod
    def _zero(task_loss: Tensor) -> Tensor:
        return torch.zeros((), device=task_loss.device, dtype=task_loss.dtype)

    def _reference(self, x: Tensor | None) -> Tensor:
        who = _WHO
        ref_obj = self.reference
        if isinstance(ref_obj, Tensor):
            ref = ref_obj
        else:
            if x is None:
                raise TypeError(
                    f"{who}: `x` (the input batch) must be a Tensor to compute the reference "
                    "gradient, got None"
                )
            ref = ref_obj.gradient(x) if isinstance(ref_obj, ReferenceDecoder) else ref_obj(x)
            if not isinstance(ref, Tensor):
                raise TypeError(
                    f"{who}: `reference` returned {type(ref).__name__}, expected a tensor of the "
                    f"target's shape {tuple(self.target.shape)}"
                )
            if tuple(ref.shape) != tuple(self.target.shape):
                raise ValueError(
                    f"{who}: `reference` returned shape {tuple(ref.shape)}, expected a tensor of "
                    f"the target's shape {tuple(self.target.shape)}"
                )
            if self.sync and _dist.is_distributed():
                ref = ref.detach().clone()
                _dist.all_reduce_mean_(ref)
        return ref.detach().to(device=self.target.device, dtype=self.target.dtype)

    def state_dict(self) -> dict[str, Any]:
        """What changes during training, as plain data: ``num_steps``, ``num_ema_updates``
        and ``reference_ema`` (a tensor, or ``None``). The options are the constructor's.

        Example:
            >>> import torch
            >>> from torch_recal import GenerativeGradientLoss
            >>> w = torch.zeros(2, 1, 3, 3, requires_grad=True)
            >>> GenerativeGradientLoss(w, torch.ones(2, 1, 3, 3)).state_dict()
            {'num_steps': 0, 'num_ema_updates': 0, 'reference_ema': None}
        """
        return {
            "num_steps": self.num_steps,
            "num_ema_updates": self.num_ema_updates,
            "reference_ema": None if self.reference_ema is None else self.reference_ema.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: everything is checked first (types, the EMA's shape and
        finiteness, consistency with ``ema``, ``num_steps`` at most ``2**31 - 1``: a larger
        counter is taken as a corrupted checkpoint), then assigned at once; a bad or partial
        state raises and changes nothing."""
        who = f"{_WHO}.load_state_dict"
        state = dict(check_state_keys(state, _STATE_KEYS, who=who))
        num_steps = check_int(
            state["num_steps"], "num_steps", who=who, minimum=0, maximum=_MAX_STEPS
        )
        updates = check_int(
            state["num_ema_updates"], "num_ema_updates", who=who, minimum=0, maximum=num_steps
        )
        average = state["reference_ema"]
        if average is not None:
            shape = tuple(self.target.shape)
            check_tensor(average, "reference_ema", who=who, floating=True, shape=shape)
            check_finite_tensor(average, "reference_ema", who=who)
        if self.ema is None and (updates or average is not None):
            raise ValueError(
                f"{who}: this loss has ema=None and keeps no average, got num_ema_updates="
                f"{updates} and a `reference_ema` {'tensor' if average is not None else 'None'}"
            )
        if self.ema is not None and (average is None) != (updates == 0):
            raise ValueError(
                f"{who}: `reference_ema` must be None exactly when `num_ema_updates` is 0, got "
                f"num_ema_updates={updates} and reference_ema="
                f"{'None' if average is None else 'a tensor'}"
            )
        self.num_steps = num_steps
        self.num_ema_updates = updates
        self.reference_ema = (
            None
            if average is None
            else average.detach().to(device=self.target.device, dtype=self.target.dtype).clone()
        )

    def __repr__(self) -> str:
        return (
            f"GenerativeGradientLoss(target={tuple(self.target.shape)}, reference="
            f"{type(self.reference).__name__}, discrepancy={self.discrepancy!r}, "
            f"weight={self.weight}, ema={self.ema}, every={self.every}, "
            f"num_steps={self.num_steps})"
        )


def _mean_over_ranks_straight_through(g: Tensor) -> Tensor:
    """Value: the mean of ``g`` over ranks. Gradient: identity to the local ``g``.

    The identity (not ``1 / world``) is right because DDP then averages the parameter
    gradients over ranks: ``mean_r dD/dG . dg_r/dtheta`` is the global-batch gradient.
    """
    mean = g.detach().clone()
    _dist.all_reduce_mean_(mean)
    return g + (mean - g.detach())

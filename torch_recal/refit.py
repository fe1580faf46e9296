"""Fast retraining: closed-form (MP-inverse / ridge) refit of dense layers, streamed.

:func:`pinv_refit_dense` solves ``min ||H W^T + b - T||^2 + ridge * ||W||^2`` (bias not
penalised) for a trained network's dense layer (or a stack of them), from one pass over the
data, in O(d^2 + d k) memory, with :class:`~torch_recal.NormalEquations`
(:mod:`torch_recal.ridge`). :class:`~torch_recal.RandomLayerTraining`
(:mod:`torch_recal.layer_sampling`) is re-exported here, as ``NormalEquations`` is.

Papers: Wu, Zhang, Yang, "Deep Networks with Fast Retraining", https://arxiv.org/abs/2008.07387;
Yang et al., "Recomputation of the dense layers for the performance improvement of DCNN",
TPAMI 2019, https://arxiv.org/abs/1809.05606.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from torch_recal import _dist
from torch_recal._batches import BatchFn, call_model, check_batch_fn, check_loader, split_batch
from torch_recal._checks import (
    check_choice,
    check_device,
    check_flag,
    check_instance,
    check_optional_int,
    check_real,
)
from torch_recal.layer_sampling import RandomLayerTraining
from torch_recal.ridge import NormalEquations, RidgeSolution, _compute_dtype

__all__ = [
    "NormalEquations",
    "RandomLayerTraining",
    "RefitResult",
    "RidgeSolution",
    "pinv_refit_dense",
]

_WHO = "pinv_refit_dense"
_TARGETS = ("onehot", "bipolar", "raw")
_STARTS = ("zero", "current")
_CLAMP = 1e-3  # targets are clamped this far inside the domain of logit/atanh


@dataclass
class RefitResult:
    """What :func:`pinv_refit_dense` returns.

    Attributes:
        weight: the new weight ``(out_features, in_features)`` (the layer's dtype/device).
        bias: the new bias, or ``None`` for a layer without bias.
        num_samples: samples seen (over all ranks).
        mse: mean squared error ``||H W^T + b - T||^2 / (N k)`` of the new weights on the
            data seen, against the (transformed) targets.
        accuracy: argmax accuracy of the new weights on the data seen (a second pass, only
            with ``evaluate=True`` and class labels), else ``None``.
        solver: ``"cholesky"`` or ``"eigh"``.
        condition: condition estimate of the solved system (see ``RidgeSolution``).
        seconds: wall time of the whole call.
        ridge: the penalty used.
        layers: for a stack of dense layers, one result per ``nn.Linear`` (first to last,
            the last being this result's own weights); empty for a single layer.
    """

    weight: Tensor
    bias: Tensor | None
    num_samples: int
    mse: float
    accuracy: float | None
    solver: str
    condition: float
    seconds: float
    ridge: float
    layers: list[RefitResult] = field(default_factory=list)


_INVERSE_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda t: t,
    "logit": lambda t: torch.logit(t.clamp(_CLAMP, 1 - _CLAMP)),
    "arcsin": lambda t: torch.asin(t.clamp(-1.0, 1.0)),
    "atanh": lambda t: torch.atanh(t.clamp(-1 + _CLAMP, 1 - _CLAMP)),
}
# a stack's activation modules and their inverses (ReLU: the identity on its range, INFERRED)
_MODULE_INVERSES = {nn.Identity: "identity", nn.ReLU: "identity", nn.Sigmoid: "logit",
                    nn.Tanh: "atanh"}  # fmt: skip


def _inverse_activation(spec: Any) -> Callable[[Tensor], Tensor]:
    """The target transform for ``inverse_activation`` or for a stack's activation module."""
    for module_type, name in _MODULE_INVERSES.items():
        spec = name if isinstance(spec, module_type) else spec
    spec = "identity" if spec is None else spec
    if isinstance(spec, str) and spec in _INVERSE_FNS:
        return _INVERSE_FNS[spec]
    if callable(spec) and not isinstance(spec, nn.Module):
        return spec
    expected = (
        f"`inverse_activation` must be None, one of {', '.join(map(repr, _INVERSE_FNS))}, or "
        f"a callable (nn.Identity/ReLU/Sigmoid/Tanh modules are mapped to these)"
    )
    if isinstance(spec, (str, nn.Module)):
        raise ValueError(f"{_WHO}: {expected}, got {spec!r}")
    raise TypeError(f"{_WHO}: {expected}, got {spec!r} ({type(spec).__name__})")


def _unpack_stack(layer: Any) -> tuple[list[nn.Linear], list[nn.Module | None]]:
    """Linear layers of a stack and the activation module after each (None = identity)."""
    if isinstance(layer, nn.Linear):
        return [layer], [None]
    if not isinstance(layer, nn.Sequential):
        raise TypeError(
            f"{_WHO}: `layer` must be an nn.Linear or an nn.Sequential of nn.Linear and "
            f"elementwise activations, got {type(layer).__name__}"
        )
    linears: list[nn.Linear] = []
    acts: list[nn.Module | None] = []
    for m in layer:
        if isinstance(m, nn.Linear):
            linears.append(m)
            acts.append(None)
        elif isinstance(m, (nn.Identity, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Dropout)):
            if not linears:
                raise ValueError(f"{_WHO}: a stack `layer` must start with an nn.Linear")
            if not isinstance(m, (nn.Identity, nn.Dropout)):
                if acts[-1] is not None:
                    raise ValueError(f"{_WHO}: two activations in a row in `layer`")
                acts[-1] = m
        else:
            raise ValueError(
                f"{_WHO}: a stack `layer` may contain only nn.Linear, Identity, ReLU, Sigmoid, "
                f"Tanh and Dropout, got {type(m).__name__}"
            )
    if not linears:
        raise ValueError(f"{_WHO}: `layer` contains no nn.Linear")
    for a, b in itertools.pairwise(linears):
        if a.out_features != b.in_features:
            raise ValueError(
                f"{_WHO}: the widths of the stack `layer` do not chain "
                f"({a.out_features} -> {b.in_features})"
            )
    return linears, acts


def _batches(run: _Pass, desc: str) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Yield ``(features at the entry's input, labels_or_targets)``; hook removed on exit."""
    it: Iterable[Any] = run.loader
    if run.progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(run.loader, desc=desc, leave=False)
        except ImportError:  # progress bars are optional
            pass
    captured: list[Tensor] = []
    handle = None
    if run.model is not None:

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach())

        handle = run.entry.register_forward_pre_hook(hook)
    try:
        for item in it:
            x, y = split_batch(item, run.batch_fn, who=_WHO)
            if run.model is None:
                h = x
            else:
                captured.clear()
                call_model(run.model, x, run.dev)
                if len(captured) != 1:
                    raise ValueError(
                        f"{_WHO}: `layer` ran {len(captured)} times in one forward of `model` "
                        "(expected once); is it part of the model?"
                    )
                h = captured[0]
            if not isinstance(h, Tensor) or not isinstance(y, Tensor):
                raise TypeError(
                    f"{_WHO}: the features and labels of a `loader` batch must be tensors, got "
                    f"{type(h).__name__} and {type(y).__name__}"
                )
            yield h.reshape(h.shape[0], -1) if h.ndim > 2 else h, y
    finally:
        if handle is not None:
            handle.remove()


def _make_targets(
    y: Tensor, targets: str, num_classes: int, k: int, n: int, device: torch.device
) -> Tensor:
    if targets == "raw":
        t = y.to(device)
        if t.ndim == 1:
            t = t[:, None]
        if not t.is_floating_point():
            raise TypeError(
                f"{_WHO}: with targets='raw', the targets of a `loader` batch must be float, "
                f"got {t.dtype}"
            )
        if t.shape != (n, k):
            raise ValueError(
                f"{_WHO}: with targets='raw', the targets of a `loader` batch must have shape "
                f"({n}, {k}), got {tuple(t.shape)}"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{_WHO}: the targets of a `loader` batch contain inf or nan")
        return t
    if y.is_floating_point() or y.is_complex():
        raise TypeError(
            f"{_WHO}: the labels of a `loader` batch must be integer class indices, got dtype "
            f"{y.dtype} (float targets need targets='raw')"
        )
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(
            f"{_WHO}: the labels of a `loader` batch must have shape ({n},), got {tuple(y.shape)}"
        )
    y = y.to(device)
    if n:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(y)).tolist())  # one host sync
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{_WHO}: the labels of a `loader` batch must lie in [0, {num_classes}), got range "
                f"[{lo}, {hi}]"
            )
    t = torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64)
    return 2 * t - 1 if targets == "bipolar" else t


_Dense = tuple[Tensor, Tensor | None]


class _PullBack(NamedTuple):
    """A dense layer's ridge pseudo-inverse, built once per pass: the desired input for a
    desired output ``t`` is ``inv_act((t - bias) @ m)`` (``inv_act`` of the activation before
    the layer)."""

    m: Tensor
    bias: Tensor | None
    inv_act: Callable[[Tensor], Tensor]

    def __call__(self, t: Tensor) -> Tensor:
        return self.inv_act((t if self.bias is None else t - self.bias) @ self.m)


def _pull_back_map(
    params: _Dense, act_before: nn.Module | None, ridge: float, device: torch.device
) -> _PullBack:
    w = params[0].to(device, torch.float64)  # (k, d)
    k, d = w.shape
    if d <= k:  # t W (W^T W + r I)^-1, so M = W (W^T W + r I)^-1 = ((W^T W + r I)^-1 W^T)^T
        a = w.T @ w + (ridge + 1e-12) * torch.eye(d, dtype=w.dtype, device=device)
        m = torch.linalg.solve(a, w.T).T
    else:  # dual form: t (W W^T + r I)^-1 W
        a = w @ w.T + (ridge + 1e-12) * torch.eye(k, dtype=w.dtype, device=device)
        m = torch.linalg.solve(a, w)
    bias = None if params[1] is None else params[1].to(device, torch.float64)
    return _PullBack(m, bias, _inverse_activation(act_before))


def pinv_refit_dense(
    layer: nn.Linear | nn.Sequential,
    loader: Iterable[Any],
    *,
    model: nn.Module | None = None,
    ridge: float = 1e-3,
    targets: Literal["onehot", "bipolar", "raw"] = "onehot",
    num_classes: int | None = None,
    inverse_activation: Literal["identity", "logit", "arcsin", "atanh"]
    | Callable[[Tensor], Tensor]
    | None = None,
    step_size: float = 1.0,
    start: Literal["zero", "current"] = "zero",
    evaluate: bool = True,
    assign: bool = True,
    progress: bool = False,
    device: torch.device | str | None = None,
    batch_fn: BatchFn | None = None,
) -> RefitResult:
    """Refit a dense layer in closed form: ``min ||H W^T + b - T||^2 + ridge * ||W||^2``.

    ``H`` are the layer's inputs over the data and ``T`` the targets (one-hot by default).
    The bias is not penalised, so the result equals scikit-learn's
    ``Ridge(alpha=ridge, fit_intercept=True)`` fitted on the materialised features. The data
    is streamed batch by batch into a :class:`~torch_recal.NormalEquations` accumulator
    (float64, memory O(d^2 + d k) whatever the number of samples) and solved by Cholesky with
    an eigendecomposition (pseudo-inverse) fallback. Under ``torch.distributed`` the
    accumulators are summed over ranks before the solve, so every rank gets the same weights.

    Paper: Wu, Zhang, Yang, https://arxiv.org/abs/2008.07387 (building on
    https://arxiv.org/abs/1809.05606).

    Args:
        layer: an ``nn.Linear``, or an ``nn.Sequential`` of ``nn.Linear`` layers with
            Identity/ReLU/Sigmoid/Tanh/Dropout between them. A stack is refitted layer by
            layer, first to last, one pass each: the target of an inner layer is the final
            target pulled back through the ridge pseudo-inverse of the layers after it and
            their inverted activations (the papers' scheme; the details are INFERRED).
        loader: an iterable of ``(features, labels_or_targets)`` pairs (``model=None``) or of
            ``(inputs, labels)`` pairs for ``model`` (other batches: see ``batch_fn``). A
            one-shot iterator works but then ``evaluate`` is skipped.
        model: if given, it runs in eval mode under ``torch.no_grad()`` and ``layer``'s input
            is captured with a temporary hook (removed afterwards, also on error); the
            model's train/eval mode is restored. Tensor inputs are moved to ``device``; a
            dict of inputs is passed as keyword arguments (``model(**inputs)``).
        ridge: L2 penalty on ``W`` (``1/C`` in the papers); ``0`` = plain pseudo-inverse.
        targets: ``"onehot"`` (0/1 from integer labels), ``"bipolar"`` (``2*onehot - 1``,
            the authors' code) or ``"raw"`` (the loader yields float targets ``(N, k)``).
        num_classes: number of classes for one-hot targets (default and only allowed value:
            the last layer's ``out_features``).
        inverse_activation: applied to ``T`` before the solve, for a layer followed by an
            output activation: ``None``/``"identity"``, ``"logit"`` (sigmoid; targets clamped
            to ``[1e-3, 1 - 1e-3]``), ``"arcsin"`` (sine), ``"atanh"`` or a callable.
        step_size: ``eta`` in ``W <- W + eta (W_solved - W)``, in ``(0, 1]`` (1 = the exact
            solution; the paper's MP learning rate is 0.5).
        start: ``"zero"`` (plain ridge, penalty on ``||W||``) or ``"current"`` (solve on the
            residual of the current weights, penalty on ``||W - W_current||``).
        evaluate: compute :attr:`RefitResult.accuracy` with a second pass over ``loader``
            (class-label targets only).
        assign: write the new weights into ``layer`` (else only return them).
        progress: show a tqdm progress bar (if tqdm is installed).
        device: where features are accumulated (default: the layer's device).
        batch_fn: maps each batch the loader yields (a dict, a longer tuple, an object) to
            an ``(inputs_or_features, labels)`` pair. Default: the batch must be a pair.

    Returns:
        A :class:`RefitResult`.

    Raises:
        TypeError: a wrong type (``loader=None``, a batch that is not a pair and no
            ``batch_fn``, float labels, ...).
        ValueError: a bad value (an empty loader, also on the evaluation pass, NaN features,
            labels out of range, ...). ``layer`` is unchanged after any error.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import pinv_refit_dense
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.randn(512, 16, generator=g)
        >>> y = (h @ torch.randn(16, 4, generator=g)).argmax(1)
        >>> loader = [(h[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
        >>> fc = nn.Linear(16, 4)
        >>> res = pinv_refit_dense(fc, loader, ridge=1e-3)
        >>> res.num_samples, res.solver, res.accuracy > 0.8
        (512, 'cholesky', True)
        >>> torch.equal(fc.weight, res.weight)
        True
        >>> dicts = [{"x": x, "label": t} for x, t in loader]  # e.g. a Hugging Face dataset
        >>> res = pinv_refit_dense(fc, dicts, batch_fn=lambda b: (b["x"], b["label"]))
        >>> res.num_samples
        512
    """
    t0 = time.perf_counter()
    linears, acts = _unpack_stack(layer)
    check_loader(loader, who=_WHO)
    if model is not None:
        check_instance(model, "model", nn.Module, who=_WHO, what="an nn.Module or None")
    ridge = check_real(ridge, "ridge", who=_WHO, minimum=0)
    targets = check_choice(targets, "targets", _TARGETS, who=_WHO)  # type: ignore[assignment]
    num_classes = check_optional_int(num_classes, "num_classes", who=_WHO, minimum=1)
    inv_act = _inverse_activation(inverse_activation)
    step_size = check_real(step_size, "step_size", who=_WHO, minimum=0, maximum=1, open_low=True)
    start = check_choice(start, "start", _STARTS, who=_WHO)  # type: ignore[assignment]
    evaluate = check_flag(evaluate, "evaluate", who=_WHO)
    assign = check_flag(assign, "assign", who=_WHO)
    progress = check_flag(progress, "progress", who=_WHO)
    dev = check_device(device, "device", who=_WHO) or linears[0].weight.device
    batch_fn = check_batch_fn(batch_fn, who=_WHO)
    k_out = linears[-1].out_features
    if num_classes is None:
        num_classes = k_out
    if targets != "raw" and num_classes != k_out:
        raise ValueError(
            f"{_WHO}: `num_classes` must equal the layer's out_features ({k_out}) for "
            f"targets={targets!r}, got {num_classes}"
        )
    one_shot = isinstance(loader, Iterator)
    if one_shot and len(linears) > 1:
        raise ValueError(
            f"{_WHO}: a stack `layer` needs one pass per layer; `loader` must be re-iterable "
            "(a list or DataLoader), not a one-shot iterator"
        )

    if model is not None:  # write to FSDP2's sharded parameters, never to gathered copies
        _dist.reshard_fsdp(model)
    run = _Pass(linears, acts, loader, model, layer, dev, progress, ridge, targets, num_classes,
                inv_act, batch_fn)  # fmt: skip
    backup = [(m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
              for m in linears]  # fmt: skip
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    results: list[RefitResult] = []
    try:
        with torch.no_grad():
            for idx in range(len(linears)):
                final = _refit_one(run, idx, step_size, start, assign or idx < len(linears) - 1)
                results.append(final)
            acc = None
            if evaluate and targets != "raw" and not one_shot:
                acc = _accuracy(run, final)
    except BaseException:
        run.reshard()
        _restore(linears, backup)
        raise
    finally:
        if model is not None:
            model.train(was_training)
    if not assign:  # inner layers of a stack were assigned to chain the passes: undo
        _restore(linears, backup)
    final.accuracy = acc
    final.seconds = time.perf_counter() - t0
    if len(linears) > 1:
        final.layers = results
    return final


def _restore(linears: list[nn.Linear], backup: Sequence[_Dense]) -> None:
    with torch.no_grad():
        for m, (w, b) in zip(linears, backup, strict=True):
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)


def _dense_params(linears: list[nn.Linear]) -> list[_Dense]:
    """Each layer's whole (weight, bias), detached: FSDP2/DTensor shards are gathered here,
    once per pass, so every rank makes the same collectives whatever its number of batches."""
    return [
        (
            _dist.full_tensor(lin.weight.detach()),
            None if lin.bias is None else _dist.full_tensor(lin.bias.detach()),
        )
        for lin in linears
    ]


def _forward_stack(
    params: list[_Dense], acts: list[nn.Module | None], h: Tensor, upto: int
) -> Tensor:
    """Input of dense layer ``upto`` of the stack given the stack input ``h``."""
    for (w, b), act in zip(params[:upto], acts[:upto], strict=True):
        h = nn.functional.linear(h.to(w.dtype), w, b)
        if act is not None:
            h = act(h)
    return h


@dataclass
class _Pass:
    """What every pass over the data of one :func:`pinv_refit_dense` call shares."""

    linears: list[nn.Linear]
    acts: list[nn.Module | None]
    loader: Iterable[Any]
    model: nn.Module | None
    entry: nn.Module  # the hook sits on the input of the layer (or of the stack)
    dev: torch.device
    progress: bool
    ridge: float
    targets: str
    num_classes: int
    inv_act: Callable[[Tensor], Tensor]
    batch_fn: BatchFn | None

    def reshard(self) -> None:
        """FSDP2 keeps the root's parameters gathered after a no_grad forward: put the shards
        back before reading or writing parameters."""
        if self.model is not None:
            _dist.reshard_fsdp(self.model)

    def each_batch(self, desc: str, fn: Callable[[Tensor, Tensor], None]) -> None:
        """``fn(features, labels)`` for every batch, as a collective: an error on one rank
        (bad data, a failing loader) is raised on every rank instead of leaving the others
        waiting in the next all-reduce."""
        error: Exception | None = None
        try:
            batches = _batches(self, desc)
            with contextlib.closing(batches):  # the hook goes even when a batch is rejected
                for h, y in batches:
                    fn(h, y)
        except Exception as err:
            error = err
        finally:
            self.reshard()
        _dist.raise_if_any_rank_failed(error, f"{_WHO} ({desc})", self.dev)


def _refit_one(run: _Pass, idx: int, step_size: float, start: str, assign: bool) -> RefitResult:
    lin = run.linears[idx]
    d, k = lin.in_features, lin.out_features
    acc = NormalEquations(d, k, fit_intercept=lin.bias is not None, device=run.dev)
    params = _dense_params(run.linears)
    pull_backs = [
        _pull_back_map(params[j], run.acts[j - 1], run.ridge, run.dev)
        for j in range(idx + 1, len(params))
    ]
    run.each_batch(
        "refit" if len(run.linears) == 1 else f"refit layer {idx}",
        lambda h, y: _accumulate(run, acc, params, pull_backs, idx, h, y),
    )
    acc.all_reduce()
    if acc.count == 0:
        which = "" if idx == 0 else f" on pass {idx + 1} (a stack needs one pass per layer)"
        raise ValueError(f"{_WHO}: `loader` yielded no samples{which}")
    w_cur, b_cur = params[idx]
    if start == "current":
        sol = acc.solve(run.ridge, start=w_cur, start_bias=b_cur)
    else:
        sol = acc.solve(run.ridge)
    weight, bias = sol.weight, sol.bias
    if step_size != 1:
        w64 = w_cur.to(run.dev, torch.float64)
        weight = w64 + step_size * (weight - w64)
        if bias is not None and b_cur is not None:
            b64 = b_cur.to(run.dev, torch.float64)
            bias = b64 + step_size * (bias - b64)
    mse = acc.residual_sum_of_squares(weight, bias) / (acc.count * k)
    weight = weight.to(lin.weight.device, lin.weight.dtype)
    if bias is not None:
        bias = bias.to(lin.bias.device, lin.bias.dtype)
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise ValueError(f"{_WHO}: the solve gave non-finite weights")
    if assign:  # a DTensor (FSDP2) keeps its own slice of the whole solution
        _dist.copy_full_(lin.weight, weight)
        if bias is not None:
            _dist.copy_full_(lin.bias, bias)
    return RefitResult(
        weight, bias, acc.count, mse, None, sol.solver, sol.condition, 0.0, run.ridge
    )


def _accumulate(
    run: _Pass,
    acc: NormalEquations,
    params: list[_Dense],
    pull_backs: list[_PullBack],
    idx: int,
    h: Tensor,
    y: Tensor,
) -> None:
    """Check one batch and add it to ``acc`` (the input of dense layer ``idx`` and its
    target); ``params`` are the stack's whole weights (:func:`_dense_params`),
    ``pull_backs`` the :func:`_pull_back_map` of the layers after ``idx``."""
    linears = run.linears
    n = h.shape[0]
    if not h.is_floating_point():
        raise TypeError(
            f"{_WHO}: the features of a `loader` batch must be floating point, got {h.dtype}"
        )
    if h.ndim != 2 or h.shape[1] != linears[0].in_features:
        raise ValueError(
            f"{_WHO}: the features of a `loader` batch must have shape "
            f"(n, {linears[0].in_features}) (the layer's in_features), got {tuple(h.shape)}"
        )
    h = h.to(run.dev)
    t = _make_targets(y, run.targets, run.num_classes, linears[-1].out_features, n, run.dev)
    t = run.inv_act(t.to(torch.float64))
    for pull_back in reversed(pull_backs):  # to the output of linears[idx], last layer first
        t = pull_back(t)
    x = _forward_stack(params, run.acts, h, idx)
    if not torch.isfinite(t).all():
        raise ValueError(f"{_WHO}: targets are not finite after `inverse_activation`")
    try:
        acc.update(x, t.to(_compute_dtype(x.dtype)) if x.dtype != torch.float64 else t)
    except ValueError as err:  # shapes are right here: the batch has inf or nan
        raise ValueError(
            f"{_WHO}: a `loader` batch gives features or targets with inf or nan (or values "
            f"whose squares overflow {_compute_dtype(x.dtype)}); the layer is unchanged"
        ) from err


def _accuracy(run: _Pass, final: RefitResult) -> float:
    params = _dense_params(run.linears[:-1])  # the last layer's solution is `final`
    correct = torch.zeros((), dtype=torch.float64, device=run.dev)
    total = torch.zeros((), dtype=torch.float64, device=run.dev)

    def count(h: Tensor, y: Tensor) -> None:
        nonlocal correct, total
        x = _forward_stack(params, run.acts, h.to(run.dev), len(run.linears) - 1)
        out = x.to(final.weight.dtype) @ final.weight.T
        if final.bias is not None:
            out = out + final.bias
        correct += (out.argmax(1) == y.to(run.dev)).sum()
        total += y.shape[0]

    run.each_batch("refit eval", count)
    _dist.all_reduce_sum_(correct, total)
    if float(total.item()) == 0:
        raise ValueError(
            f"{_WHO}: `loader` yielded no samples on its second pass (the evaluation); pass a "
            "loader that can be iterated again (a list or DataLoader) or evaluate=False"
        )
    return float((correct / total).item())

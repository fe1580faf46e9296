"""Turn sparsity into a smaller dense model: :func:`shrink` removes dead and unused units.

A strongly L1-regularised model (Park et al., https://arxiv.org/abs/1811.08056) has many exact
zeros, but a zero weight still costs memory and time in a dense layer. When whole units are
zero, the layer can be made narrower with exactly the same outputs:

* a **dead** unit (a row of a ``Linear``, an output channel of a ``Conv``) has all-zero
  weights, so it outputs a constant (its bias; after a ``BatchNorm`` and an activation, some
  other constant). It is removed when that constant is exactly zero where the next layer reads
  it (``ReLU`` of a non-positive value), or when the constant can be folded exactly into the
  next layer's bias (a ``Linear``; a ``Conv`` without zero padding);
* an **unused** unit has an all-zero column (input channel) in the next layer, so its value
  never matters.

Both remove the unit's row, its ``BatchNorm`` channel and the next layer's column; removing
units can make others dead or unused, so it repeats until nothing changes.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node, symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize, skip_init

from torch_recal._checks import check_choice, check_flag, check_instance

__all__ = ["KeptUnits", "LayerShrink", "ShrinkReport", "shrink"]

_PAPER = "https://arxiv.org/abs/1811.08056"
_WHO = "shrink"
_log = logging.getLogger("torch_recal")

M = TypeVar("M", bound=nn.Module)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear, *_CONVS)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Elementwise ops: the constant output of a dead unit is carried through them.
_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)  # fmt: skip
_ACT_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu,
    F.elu_, F.celu, F.selu, F.gelu, F.silu, F.mish, F.sigmoid, torch.sigmoid, F.tanh,
    torch.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.tanhshrink,
    F.logsigmoid, F.hardshrink, F.softshrink,
}  # fmt: skip
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
# Identity in eval mode.
_IDENTITY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip
_IDENTITY_FUNCTIONS: set[Any] = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_IDENTITY_METHODS = {"contiguous"}
# Channel-preserving pools: a constant channel stays constant (max, adaptive), or only a zero
# one does (average pools whose padding or ceil mode brings other divisors in).
_MAX_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOL_FUNCTIONS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    torch.adaptive_avg_pool1d,
}  # fmt: skip
_AVG_POOL_FUNCTIONS: set[Any] = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d}


# --------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class LayerShrink:
    """One ``Linear``/``Conv``/``BatchNorm`` layer in a :class:`ShrinkReport`.

    ``units`` are output features/channels (``num_features`` for a norm), ``inputs`` input
    features/channels; ``removed_dead`` and ``removed_unused`` count the layer's own units
    removed as dead or unused, ``folded`` the dead ones whose constant output went into the
    next layer's bias; ``bias_added`` says that this layer got a bias to receive such a
    constant (it had none). Paper: Park et al., https://arxiv.org/abs/1811.08056.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import shrink
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> with torch.no_grad():
        ...     model[0].weight[0] = 0.0  # unit 0 outputs relu(bias[0]): folded or zero
        >>> layer = shrink(model)[1].layers[0]
        >>> layer.units_before, layer.units_after, layer.removed_dead, layer.params_after
        (4, 3, 1, 12)
    """

    name: str
    kind: str
    units_before: int
    units_after: int
    inputs_before: int
    inputs_after: int
    params_before: int
    params_after: int
    removed_dead: int = 0
    removed_unused: int = 0
    folded: int = 0
    bias_added: bool = False


@dataclass(frozen=True)
class KeptUnits:
    """Dead units that :func:`shrink` could not remove exactly, and why.

    ``str(kept)`` reads ``"layer1.0.conv2: 3 dead units kept: output feeds an add (residual
    stream)"``. Paper: Park et al., https://arxiv.org/abs/1811.08056.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import shrink
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     model[2].weight[1] = 0.0  # an output unit: never removed
        >>> print(shrink(model)[1].kept[0])
        2: 1 dead unit kept: output is the model output
    """

    layer: str
    count: int
    reason: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.count} dead unit{'s' if self.count != 1 else ''} kept: " + (
            self.reason
        )


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink` did: per-layer units and parameters before/after, what was kept.

    ``str(report)`` is a table; :meth:`to_dict` gives plain data. ``tracer`` says how the
    producer -> consumer chains were found: ``"fx"`` (``torch.fx`` symbolic tracing of the
    whole model), ``"submodules"`` (the model could not be traced, see ``trace_error``: its
    largest traceable submodules were traced and the children of its untraceable
    ``nn.Sequential`` containers walked) or ``"sequential"`` (only walking ``nn.Sequential``
    containers, ``trace="sequential"``). Paper: Park et al., https://arxiv.org/abs/1811.08056
    (compression by strong L1 regularisation).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import shrink
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> with torch.no_grad():
        ...     model[2].weight[:, 1:] = 0.0  # units 1, 2, 3 of the first layer are unused
        >>> _, report = shrink(model)
        >>> report.params_before, report.params_after, report.compression_ratio
        (21, 6, 3.5)
        >>> report.layers[0].units_before, report.layers[0].units_after
        (4, 1)
    """

    layers: tuple[LayerShrink, ...]
    kept: tuple[KeptUnits, ...]
    params_before: int
    params_after: int
    tracer: str
    trace_error: str | None = None
    rounds: int = 0
    max_abs_error: float | None = None

    @property
    def removed_units(self) -> int:
        """Units removed from ``Linear``/``Conv`` layers (dead and unused)."""
        return sum(x.removed_dead + x.removed_unused for x in self.layers)

    @property
    def compression_ratio(self) -> float:
        """Parameters before / after (``inf`` when nothing is left)."""
        return self.params_before / self.params_after if self.params_after else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for logging or JSON)."""
        return {
            "layers": [asdict(x) for x in self.layers],
            "kept": [asdict(x) for x in self.kept],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "compression_ratio": self.compression_ratio,
            "removed_units": self.removed_units,
            "tracer": self.tracer,
            "trace_error": self.trace_error,
            "rounds": self.rounds,
            "max_abs_error": self.max_abs_error,
        }

    def __str__(self) -> str:
        head = ("layer", "kind", "units", "inputs", "params", "removed (dead/unused)")
        rows = [
            (
                x.name,
                x.kind,
                f"{x.units_before} -> {x.units_after}",
                f"{x.inputs_before} -> {x.inputs_after}",
                f"{x.params_before} -> {x.params_after}",
                f"{x.removed_dead}/{x.removed_unused}"
                + (f" ({x.folded} folded)" if x.folded else ""),
            )
            for x in self.layers
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()
        out = [line, "-" * len(line)]
        out += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        out.append(
            f"parameters: {self.params_before} -> {self.params_after} "
            f"({self.compression_ratio:.2f}x smaller; chains found by {self.tracer})"
        )
        out += [str(k) for k in self.kept]
        return "\n".join(out)


# --------------------------------------------------------------------------- chains
@dataclass
class _Op:
    """An op between a producer and its consumer."""

    kind: Literal["bn", "act", "identity", "pool", "flatten"]
    label: str  # for messages
    module: str | None = None  # qualified name (module ops)
    fn: Callable[[Tensor], Tensor] | None = None  # functional elementwise ops
    keeps_constant: bool = True  # pools: False when a non-zero constant changes at borders


@dataclass
class _Chain:
    """``producer -> ops -> consumer``; ``consumer is None`` when ``blocked`` says why."""

    producer: str
    ops: list[_Op] = field(default_factory=list)
    consumer: str | None = None
    blocked: str | None = None
    spatial: int = 1  # consumer columns per unit (a Flatten between Conv and Linear)


def _units(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONVS):
        return module.out_channels
    return int(module.num_features)  # type: ignore[arg-type]


def _inputs(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, _CONVS):
        return module.in_channels
    return int(module.num_features)  # type: ignore[arg-type]


def _weight_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """A Linear's or Conv's ``(weight, bias)``, typed."""
    assert isinstance(module, _LAYERS)
    return module.weight, module.bias


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _zero_padded(conv: nn.Module) -> bool:
    """Does ``conv`` pad with zeros (so a constant input channel is not constant for it)?"""
    assert isinstance(conv, _CONVS)
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding of a constant is that constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


class _Model:
    """The facts about the model that the chain builders share."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.modules = dict(root.named_modules())
        by_id = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        params = Counter(
            id(p) for m in root.modules() for p in m._parameters.values() if p is not None
        )
        self.shared = {name for name, m in self.modules.items() if by_id[id(m)] > 1} | {
            name
            for name, m in self.modules.items()
            if any(p is not None and params[id(p)] > 1 for p in m._parameters.values())
        }
        self.calls: Counter[str] = Counter()
        self.touched: set[str] = set()

    def problem(self, name: str) -> str | None:
        """Why the layer or norm ``name`` cannot be replaced by a narrower one (or ``None``)."""
        module = self.modules[name]
        if type(module) not in (*_LAYERS, *_NORMS):
            return f"`{name}` is a {type(module).__name__}, not a plain Linear/Conv/BatchNorm"
        if isinstance(module, _CONVS) and module.groups != 1:
            return f"`{name}` is a grouped conv (groups={module.groups})"
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or parametrize.is_parametrized(module)
            or any(n.endswith("_orig") for n in module._parameters)
        ):
            return f"`{name}` has hooks, a parametrization or a pruning mask (remove them first)"
        if name in self.shared:
            return f"`{name}` shares its module or parameters with another layer"
        if self.calls[name] > 1:
            return f"`{name}` is called {self.calls[name]} times in forward"
        if name in self.touched:
            return f"`{name}`'s parameters are read directly in forward"
        return None


def _module_op(name: str, module: nn.Module) -> _Op | str:
    """An allowed module op, or the reason it is not one."""
    kind = type(module)
    if kind in _NORMS:
        return _Op("bn", f"`{name}`", module=name)
    if kind in _ACT_MODULES or (kind is nn.PReLU and module.num_parameters == 1):
        return _Op("act", f"`{name}`", module=name)
    if kind in _IDENTITY_MODULES:
        return _Op("identity", f"`{name}`", module=name)
    if kind in _MAX_POOLS and not getattr(module, "return_indices", False):
        return _Op("pool", f"`{name}`", module=name)
    if kind in _AVG_POOLS:
        padded = any(p > 0 for p in _tuple(module.padding))  # type: ignore[arg-type]
        keeps = (
            not module.ceil_mode
            and module.divisor_override is None
            and not (padded and module.count_include_pad)
        )
        return _Op("pool", f"`{name}`", module=name, keeps_constant=keeps)
    if kind is nn.Flatten:
        if module.start_dim == 1 and module.end_dim == -1:
            return _Op("flatten", f"`{name}`", module=name)
        return f"`{name}` (a Flatten from dim {module.start_dim} to {module.end_dim})"
    return f"`{name}` ({kind.__name__})"


def _tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def _describe(node: Node) -> str:
    """A node for a message: ``an add (residual stream)``, ``a concat``, ``\\`view\\```."""
    if node.op == "output":
        return "the model output"
    if node.op == "call_module":
        return f"`{node.target}`"
    if node.op == "call_method":
        return f"`.{node.target}()`"
    target = node.target
    if target in (operator.add, operator.iadd, torch.add, operator.sub, torch.sub):
        return "an add (residual stream)"
    if target in (torch.cat, torch.concat, torch.stack):
        return "a concat"
    if target in (operator.mul, operator.imul, torch.mul):
        return "a multiply"
    return f"`{getattr(target, '__name__', str(target))}`"


def _function_op(node: Node) -> _Op | None:
    """An allowed call_function/call_method op on its first argument, or ``None``."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, Node) for a in (*rest, *kwargs.values())):
        return None
    target = node.target
    if node.op == "call_method":
        name = str(target)
        if name in _ACT_METHODS:
            return _Op("act", f"`.{name}()`", fn=lambda t: getattr(t, name)(*rest, **kwargs))
        if name in _IDENTITY_METHODS:
            return _Op("identity", f"`.{name}()`")
        if name == "flatten" and _flatten_dims(rest, kwargs) == (1, -1):
            return _Op("flatten", "`.flatten()`")
        return None
    label = f"`{getattr(target, '__name__', str(target))}`"
    if target in _ACT_FUNCTIONS:
        fn = target
        return _Op("act", label, fn=lambda t: fn(t, *rest, **kwargs))  # type: ignore[operator]
    if target in _IDENTITY_FUNCTIONS:
        return _Op("identity", label)
    if target in _MAX_POOL_FUNCTIONS and not kwargs.get("return_indices", False):
        return _Op("pool", label)
    if target in _AVG_POOL_FUNCTIONS:  # arguments not parsed: only a zero channel is kept
        return _Op("pool", label, keeps_constant=False)
    if target is torch.flatten and _flatten_dims(rest, kwargs) == (1, -1):
        return _Op("flatten", label)
    return None


def _flatten_dims(rest: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    start = rest[0] if len(rest) > 0 else kwargs.get("start_dim", 0)
    end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
    return start, end


def _shape(node: Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _fx_chains(
    info: _Model, gm: GraphModule, example_inputs: tuple[Any, ...] | None, prefix: str = ""
) -> list[_Chain]:
    """Chains from a ``torch.fx`` trace of ``info.root`` (or of its submodule ``prefix``)."""
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op == "call_module":
            info.calls[prefix + str(node.target)] += 1
        elif node.op == "get_attr":
            parts = (prefix + str(node.target)).split(".")
            info.touched.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    if example_inputs is not None:
        _propagate_shapes(gm, info.root, example_inputs)
    chains, seen = [], set()
    for node in nodes:
        name = prefix + str(node.target)
        if node.op == "call_module" and isinstance(info.modules[name], _LAYERS):
            if name not in seen:  # a layer called twice is blocked at its first call
                chains.append(_fx_walk(node, info, example_inputs is not None, prefix))
            seen.add(name)
    return chains


def _fallback_chains(info: _Model, name: str, module: nn.Module) -> list[_Chain]:
    """Chains inside the largest fx-traceable submodules of the untraceable ``module``, and
    between the children of a plain ``nn.Sequential`` that is not traceable as a whole."""
    pre = f"{name}." if name else ""
    chains = []
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        children = [(pre + n, m) for n, m in module.named_children()]
        for i, (child_name, child) in enumerate(children):
            if isinstance(child, _LAYERS):
                chains.append(_sequential_walk(child_name, children[i + 1 :], info, name))
    for child_name, child in module.named_children():
        if next(child.children(), None) is None:  # a leaf: a layer, an activation, ...
            continue
        try:
            gm = symbolic_trace(child)
        except Exception:
            chains += _fallback_chains(info, pre + child_name, child)
        else:
            chains += _fx_chains(info, gm, None, prefix=f"{pre}{child_name}.")
    return chains


def _propagate_shapes(gm: GraphModule, root: nn.Module, example_inputs: tuple[Any, ...]) -> None:
    modes = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as err:
        raise ValueError(
            f"{_WHO}: the model failed on `example_inputs` ({type(err).__name__}: {err})"
        ) from None
    finally:
        for module, mode in modes:
            module.training = mode


def _fx_walk(start: Node, info: _Model, shapes: bool, prefix: str = "") -> _Chain:
    name = prefix + str(start.target)
    chain = _Chain(name)
    producer = info.modules[name]
    problem = info.problem(name)
    if problem is not None:
        chain.blocked = problem
        return chain
    is_conv = isinstance(producer, _CONVS)
    node, flat_input = start, None
    while True:
        users = list(node.users)
        if not users:
            chain.blocked = "output is not used"
            return chain
        if len(users) > 1:
            listed = ", ".join(_describe(u) for u in users)
            chain.blocked = f"output has {len(users)} users ({listed})"
            return chain
        user = users[0]
        if user.op == "output":
            chain.blocked = (
                f"output leaves `{prefix[:-1]}` (its users are not traced)"
                if prefix
                else "output is the model output"
            )
            return chain
        first_only = (
            len(user.args) >= 1
            and user.args[0] is node
            and not any(a is node for a in (*user.args[1:], *user.kwargs.values()))
        )
        target = prefix + str(user.target)
        if user.op == "call_module" and isinstance(info.modules[target], _LAYERS):
            consumer = info.modules[target]
            if not (first_only and len(user.args) == 1 and not user.kwargs):
                chain.blocked = f"output feeds {_describe(user)} in an unusual call"
            elif isinstance(consumer, nn.Linear) and is_conv and flat_input is None:
                chain.blocked = f"output feeds {_describe(user)} on its last axis, not channels"
            elif isinstance(consumer, _CONVS) and (type(consumer) is not type(producer)):
                chain.blocked = f"output feeds {_describe(user)} on another axis than its units"
            elif (problem := info.problem(target)) is not None:
                chain.blocked = f"output feeds {problem}"
            else:
                chain.consumer = target
                if flat_input is not None:
                    spatial = _spatial(flat_input, producer, consumer, shapes)
                    if isinstance(spatial, str):
                        chain.consumer, chain.blocked = None, spatial
                    else:
                        chain.spatial = spatial
            return chain
        op: _Op | str | None
        if not first_only:
            op = None
        elif user.op == "call_module":
            op = _module_op(target, info.modules[target])
        else:
            op = _function_op(user) if user.op in ("call_function", "call_method") else None
        if not isinstance(op, _Op):
            chain.blocked = f"output feeds {_describe(user)}"
            return chain
        if op.kind == "bn" and (problem := info.problem(target)) is not None:
            chain.blocked = f"output feeds {problem}"
            return chain
        layout = _layout_problem(op, is_conv, flat_input is not None, _shape(start))
        if layout is not None:
            chain.blocked = layout
            return chain
        if op.kind == "flatten":
            flat_input = node
        chain.ops.append(op)
        node = user


def _layout_problem(
    op: _Op, is_conv: bool, flat: bool, shape: tuple[int, ...] | None
) -> str | None:
    """Is ``op`` channel-wise on this producer's units at this point of the chain?"""
    if op.kind in ("act", "identity"):
        return None
    if flat:
        return f"output is flattened, then feeds {op.label}"
    if is_conv:
        return None
    if op.kind == "bn" and (shape is None or len(shape) == 2):
        return None  # a BatchNorm1d on (N, C); without example_inputs this is assumed
    return f"output feeds {op.label}, which does not act on a Linear's features one by one"


def _spatial(
    flat_input: Node | nn.Module, producer: nn.Module, consumer: nn.Module, shapes: bool
) -> int | str:
    """Columns per channel after a Flatten: from the propagated shape, or
    ``in_features / out_channels``."""
    units, features = _units(producer), _inputs(consumer)
    shape = _shape(flat_input) if isinstance(flat_input, Node) and shapes else None
    if shape is not None:
        spatial = math.prod(shape[2:])
        if shape[1] * spatial == features:
            return spatial
    elif features % units == 0:
        return features // units
    return (
        f"the flattened output does not map to {features} input features of the next layer "
        "(pass `example_inputs` for the shapes)"
    )


def _sequential_chains(info: _Model) -> list[_Chain]:
    """Chains inside ``nn.Sequential`` containers (no tracing)."""
    chains = []
    for prefix, seq in info.modules.items():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        pre = f"{prefix}." if prefix else ""
        children = [(pre + n, m) for n, m in seq.named_children()]
        for i, (name, module) in enumerate(children):
            if isinstance(module, _LAYERS):
                chains.append(_sequential_walk(name, children[i + 1 :], info, prefix))
    return chains


def _sequential_walk(
    name: str, rest: list[tuple[str, nn.Module]], info: _Model, container: str
) -> _Chain:
    chain = _Chain(name)
    producer = info.modules[name]
    if (problem := info.problem(name)) is not None:
        chain.blocked = problem
        return chain
    is_conv, flat = isinstance(producer, _CONVS), False
    for target, module in rest:
        if isinstance(module, _LAYERS):
            if isinstance(module, nn.Linear) and is_conv and not flat:
                chain.blocked = f"output feeds `{target}` on its last axis, not channels"
            elif isinstance(module, _CONVS) and type(module) is not type(producer):
                chain.blocked = f"output feeds `{target}` on another axis than its units"
            elif (problem := info.problem(target)) is not None:
                chain.blocked = f"output feeds {problem}"
            else:
                chain.consumer = target
                if flat:
                    spatial = _spatial(module, producer, module, False)
                    if isinstance(spatial, str):
                        chain.consumer, chain.blocked = None, spatial
                    else:
                        chain.spatial = spatial
            return chain
        op = _module_op(target, module)
        if isinstance(op, str):
            chain.blocked = f"output feeds {op}"
            return chain
        if op.kind == "bn" and (problem := info.problem(target)) is not None:
            chain.blocked = f"output feeds {problem}"
            return chain
        if (layout := _layout_problem(op, is_conv, flat, None)) is not None:
            chain.blocked = layout
            return chain
        flat = flat or op.kind == "flatten"
        chain.ops.append(op)
    where = f"`{container}`" if container else "the model"
    chain.blocked = f"output leaves the nn.Sequential {where} (its users are not traced)"
    return chain


# --------------------------------------------------------------------------- decisions
@dataclass
class _Decision:
    remove: Tensor  # bool (units,)
    fold: Tensor  # bool (units,): removed dead units whose constant goes into the bias
    dead: Tensor  # bool (units,)
    unused: Tensor  # bool (units,)
    constants: Tensor  # (units,) the constant each unit would output if dead
    kept: list[tuple[int, str]]  # (count, reason) of dead units kept


@torch.no_grad()
def _decide(root: nn.Module, chain: _Chain) -> _Decision:
    weight, bias = _weight_bias(root.get_submodule(chain.producer))
    units = weight.shape[0]
    dead = (weight.reshape(units, -1) == 0).all(dim=1)
    false = torch.zeros_like(dead)
    if chain.consumer is None:
        count = int(dead.sum())
        blocked = [(count, chain.blocked or "")] if count else []
        return _Decision(false, false, dead, false, weight.new_zeros(units), blocked)
    consumer = root.get_submodule(chain.consumer)
    cw, _ = _weight_bias(consumer)
    if isinstance(consumer, nn.Linear):
        unused = (cw.reshape(cw.shape[0], units, chain.spatial) == 0).all(dim=2).all(dim=0)
    else:
        unused = (cw.transpose(0, 1).reshape(units, -1) == 0).all(dim=1)
    values = bias.detach().clone() if bias is not None else weight.new_zeros(units)
    varying = torch.zeros_like(dead)
    unknown: list[str] = []
    reason_varying = ""
    for op in chain.ops:
        if op.kind == "bn":
            bn = root.get_submodule(op.module or "")
            assert isinstance(bn, _NORMS)
            if bn.running_mean is None or bn.running_var is None:
                unknown.append(f"{op.label} has no running statistics (its output is unknown)")
                continue
            values = F.batch_norm(
                values[None], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                bn.eps,
            )[0]  # fmt: skip
        elif op.kind == "act":
            fn = op.fn if op.fn is not None else root.get_submodule(op.module or "")
            values = fn(values.clone())
        elif op.kind == "pool" and not op.keeps_constant:
            changed = values != 0
            if bool((changed & dead & ~varying).any()):
                reason_varying = f"its constant output is changed at the borders by {op.label}"
            varying |= changed
    finite = torch.isfinite(values)
    zero = values == 0
    foldable = isinstance(consumer, nn.Linear) or not _zero_padded(consumer)
    candidate = dead & ~unused
    ok = false if unknown else candidate & ~varying & finite & (zero | foldable)
    remove = unused | ok
    kept: list[tuple[int, str]] = []
    if unknown:
        kept.append((int(candidate.sum()), unknown[0]))
    else:
        for mask, reason in (
            (candidate & varying, reason_varying),
            (candidate & ~varying & ~finite, "its constant output is not finite"),
            (
                candidate & ~varying & finite & ~zero & ~foldable,
                f"its non-zero constant output feeds the zero-padded conv `{chain.consumer}`",
            ),
        ):
            if int(mask.sum()):
                kept.append((int(mask.sum()), reason))
    if bool(remove.all()):  # a layer keeps at least one unit (no zero-width modules)
        last = int(torch.nonzero(~unused).flatten()[0]) if bool((~unused).any()) else 0
        remove = remove.clone()
        remove[last] = False
        if bool(dead[last]):
            kept.append((1, "the last unit of a layer is kept"))
    fold = remove & candidate & ~zero
    kept = [(c, r) for c, r in kept if c]
    return _Decision(remove, fold, dead, unused, values, kept)


# --------------------------------------------------------------------------- surgery
def _like(old: nn.Module) -> dict[str, Any]:
    tensors = [t for t in (*old.parameters(recurse=False), *old.buffers(recurse=False))]
    floats = [t for t in tensors if t.is_floating_point()]
    ref = floats[0] if floats else None
    return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}


def _copy_param(new: nn.Module, name: str, value: Tensor | None, old: nn.Module) -> None:
    if value is None:
        return
    target = getattr(new, name)
    target.copy_(value)
    source = getattr(old, name, None)
    flag = source.requires_grad if source is not None else old.weight.requires_grad
    target.requires_grad_(flag)


@torch.no_grad()
def _new_layer(old: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    kind = type(old)
    kw = {"device": weight.device, "dtype": weight.dtype, "bias": bias is not None}
    if isinstance(old, nn.Linear):
        new = skip_init(kind, weight.shape[1], weight.shape[0], **kw)
    else:
        assert isinstance(old, _CONVS)
        new = skip_init(
            kind, weight.shape[1], weight.shape[0], old.kernel_size, stride=old.stride,
            padding=old.padding, dilation=old.dilation, padding_mode=old.padding_mode, **kw,
        )  # fmt: skip
    _copy_param(new, "weight", weight, old)
    _copy_param(new, "bias", bias, old)
    new.train(old.training)
    return new


@torch.no_grad()
def _new_norm(old: nn.Module, keep: Tensor) -> nn.Module:
    assert isinstance(old, _NORMS)
    new = skip_init(
        type(old), len(keep), eps=old.eps, momentum=old.momentum, affine=old.affine,
        track_running_stats=old.track_running_stats, **_like(old),
    )  # fmt: skip
    for name in ("weight", "bias"):
        value = getattr(old, name)
        _copy_param(new, name, None if value is None else value[keep], old)
    for name in ("running_mean", "running_var"):
        if getattr(old, name) is not None:
            getattr(new, name).copy_(getattr(old, name)[keep])
    if old.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


@torch.no_grad()
def _apply(root: nn.Module, chain: _Chain, decision: _Decision) -> bool:
    """Replace the chain's modules by narrower ones; returns whether a bias was added."""
    keep = torch.nonzero(~decision.remove).flatten()
    producer = root.get_submodule(chain.producer)
    pw, pb = _weight_bias(producer)
    _set(root, chain.producer, _new_layer(producer, pw[keep], None if pb is None else pb[keep]))
    for op in chain.ops:
        if op.kind == "bn":
            _set(root, op.module or "", _new_norm(root.get_submodule(op.module or ""), keep))
    assert chain.consumer is not None
    consumer = root.get_submodule(chain.consumer)
    cw, cb = _weight_bias(consumer)
    units = pw.shape[0]
    fold = torch.nonzero(decision.fold).flatten()
    if isinstance(consumer, nn.Linear):
        blocks = cw.reshape(cw.shape[0], units, chain.spatial)
        new_weight = blocks[:, keep].reshape(cw.shape[0], -1)
        sums = blocks[:, fold].double().sum(dim=2)  # (out, folded)
    else:
        new_weight = cw[:, keep]
        sums = cw[:, fold].double().flatten(2).sum(dim=2)
    added = False
    if len(fold):
        delta = sums @ decision.constants[fold].double()
        base = cb.double() if cb is not None else torch.zeros_like(delta)
        cb, added = (base + delta).to(cw.dtype), cb is None
    _set(root, chain.consumer, _new_layer(consumer, new_weight, cb))
    return added


# --------------------------------------------------------------------------- shrink
def _check_outputs(model: nn.Module, small: nn.Module, inputs: tuple[Any, ...]) -> float:
    """The largest absolute difference of the eval outputs; ``ValueError`` beyond rounding."""
    reference = copy.deepcopy(model)
    modes = [(m, m.training) for m in small.modules()]
    reference.eval()
    small.eval()
    try:
        with torch.no_grad():
            want = [t for t in _tensors(reference(*inputs)) if t.is_floating_point()]
            got = [t for t in _tensors(small(*inputs)) if t.is_floating_point()]
    finally:
        for module, mode in modes:
            module.training = mode
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got, strict=True)):
        raise ValueError(f"{_WHO}: the shrunk model's outputs have other shapes than the model's")
    error, tolerance = 0.0, 0.0
    for a, b in zip(want, got, strict=True):
        if not a.numel():
            continue
        scale = float(a.abs().max()) if bool(torch.isfinite(a).all()) else 1.0
        tolerance = max(tolerance, 1e3 * torch.finfo(a.dtype).eps * max(1.0, scale))
        same = (a == b) | (a.isnan() & b.isnan())
        diff = torch.where(same, 0.0, (a.double() - b.double()).abs())
        error = max(error, float(diff.nan_to_num(nan=math.inf).max()))
    if error > tolerance:
        raise ValueError(
            f"{_WHO}: the shrunk model's outputs on `example_inputs` differ from the model's by "
            f"up to {error:.3g} (more than float rounding, {tolerance:.3g}); the model probably "
            "uses a layer's parameters outside the forward that was traced (e.g. reads "
            "`self.fc.weight` directly). `model` is unchanged; use trace='sequential' or leave "
            "this model unshrunk"
        )
    return error


def _tensors(out: Any) -> list[Tensor]:
    """The tensors of a forward's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    return []


def _inputs_tuple(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"{_WHO}: `example_inputs` must be a Tensor, a tuple of the forward's arguments or "
        f"None, got {type(example_inputs).__name__}"
    )


def _layer_names(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.named_modules():
        if type(module) in (*_LAYERS, *_NORMS):
            yield name, module


def shrink(
    model: M,
    *,
    example_inputs: Tensor | Sequence[Any] | None = None,
    inplace: bool = False,
    trace: Literal["auto", "fx", "sequential"] = "auto",
) -> tuple[M, ShrinkReport]:
    """Remove dead and unused units: a smaller dense model with the same eval outputs.

    Returns ``(small, report)`` (always a pair, like ``torch.ao`` and ``torch.fx`` passes that
    return a new module with what they found): ``small`` is a copy of ``model`` whose
    ``Linear``/``Conv1d/2d/3d``/``BatchNorm1d/2d/3d`` layers are replaced by narrower dense
    ones (same dtype, device, ``requires_grad`` and train/eval mode) wherever units can go
    exactly; its eval-mode outputs equal the original's up to float rounding (folded biases).

    What goes, for a producer (``Linear``/``Conv``) whose output reaches one consumer
    (``Linear``/``Conv``) through channel-wise ops only (``BatchNorm``, elementwise
    activations as modules or ``F.``/``torch.``/method calls, ``Dropout``, ``Identity``,
    max/average/adaptive pools, and a ``Flatten`` from a conv stage into a ``Linear``):

    * **dead** units (all weights exactly zero): they output a constant; removed when the
      constant is exactly zero at the consumer (e.g. ``ReLU`` of a non-positive ``BatchNorm``
      output), or folded into the consumer's bias when that is exact: always for a
      ``Linear``, for a ``Conv`` only without zero padding (padding makes a constant channel
      non-constant at the borders). ``BatchNorm`` uses its running statistics (eval mode). A
      consumer with no bias gets one when a constant is folded (``LayerShrink.bias_added``);
    * **unused** units (the consumer's column / input channel is all zero);
    * repeated until nothing changes (removing one layer's rows can leave the previous
      layer's units unused).

    What stays, and is listed in ``report.kept`` with the reason: dead units of a producer
    whose output has another user (a residual add, a concat, a second consumer, the model
    output: the final units are never removed) or passes through an op not listed above; dead
    units whose non-zero constant feeds a zero-padded conv; layers that are shared, called
    twice, grouped/depthwise, hooked, parametrized or pruned with ``torch.nn.utils.prune``
    (call ``prune.remove`` first), and subclasses of the layer types; one unit per layer (no
    zero-width layers). Zero weights inside surviving units stay (save them with
    :func:`~torch_recal.save_sparse`).

    How the chains are found: ``torch.fx.symbolic_trace`` of the whole model. If that fails
    (data-dependent control flow, an untraceable library call) and ``trace="auto"``, it warns
    (``UserWarning``) and falls back to the largest submodules that do trace, plus the
    children of untraceable plain ``nn.Sequential`` containers (``report.tracer ==
    "submodules"``, ``report.trace_error``); a submodule's output then counts as used
    elsewhere, and its layers are assumed to be reached only through its own forward.

    Exactness assumes finite inputs (``0 * inf`` is NaN). Train-mode outputs differ where a
    constant was folded through a ``BatchNorm`` (train mode uses batch statistics).

    Paper: Park et al., https://arxiv.org/abs/1811.08056 (strong L1 regularisation leaves
    whole units at zero; this turns them into a smaller, faster model).

    Args:
        model: the model; it is not modified unless ``inplace=True``.
        example_inputs: a tensor or a tuple of the forward's arguments, run once in eval mode
            under ``torch.no_grad()`` to read the shapes (the columns per channel at a
            ``Flatten``, and that a ``BatchNorm1d`` after a ``Linear`` sees ``(N, C)``), and
            again through both models afterwards to check that their eval outputs agree
            (``report.max_abs_error``). Without it, the columns per channel are
            ``in_features / channels`` and nothing is checked: a model that reads a layer's
            weights outside the traced forward (possible with the ``"submodules"`` fallback)
            would be shrunk wrongly without notice, so pass it.
        inplace: replace the layers inside ``model`` itself (after everything was computed on
            a copy, so an error leaves it unchanged) and return it.
        trace: ``"auto"`` (fx; if the whole model does not trace, its traceable submodules
            and ``nn.Sequential`` containers), ``"fx"`` (the whole model or a ``ValueError``)
            or ``"sequential"`` (no tracing: chains inside ``nn.Sequential`` containers).

    Returns:
        ``(small, report)``: the shrunk model and a :class:`ShrinkReport` (print it for a
        table).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``example_inputs`` is not a tensor or a
            tuple; a flag has the wrong type.
        ValueError: ``trace`` is not an option; ``trace="fx"`` and the model cannot be
            traced; the model fails on ``example_inputs``; the shrunk model's outputs on
            ``example_inputs`` differ from the original's by more than float rounding
            (``model`` is left unchanged).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_recal import shrink
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> with torch.no_grad():
        ...     model[0].weight[:3] = 0.0  # 3 units with zero weights ...
        ...     model[0].bias[:3] = -1.0  # ... and a negative bias: ReLU makes them 0
        >>> small, report = shrink(model)
        >>> small[0]
        Linear(in_features=4, out_features=5, bias=True)
        >>> x = torch.randn(16, 4)
        >>> torch.allclose(small(x), model(x), atol=1e-6)
        True
        >>> report.params_before, report.params_after
        (58, 37)
    """
    check_instance(model, "model", nn.Module, who=_WHO, what="an nn.Module")
    inputs = _inputs_tuple(example_inputs)
    inplace = check_flag(inplace, "inplace", who=_WHO)
    trace = check_choice(trace, "trace", ("auto", "fx", "sequential"), who=_WHO)  # type: ignore[assignment]

    root = copy.deepcopy(model)
    before = {name: (m, _units(m), _inputs(m), _own_params(m)) for name, m in _layer_names(root)}
    params_before = sum(p.numel() for p in root.parameters())
    info = _Model(root)
    tracer: str = trace
    trace_error: str | None = None
    if trace == "sequential":
        chains = _sequential_chains(info)
    else:
        try:
            gm = symbolic_trace(root)
        except Exception as err:
            trace_error = f"{type(err).__name__}: {err}"
            if trace == "fx":
                raise ValueError(
                    f"{_WHO}: `model` cannot be traced by torch.fx ({trace_error}); use "
                    "trace='auto' to shrink inside its traceable submodules"
                ) from None
            warnings.warn(
                f"{_WHO}: torch.fx cannot trace the model ({trace_error}); only the layers "
                "inside its traceable submodules and nn.Sequential containers are shrunk",
                UserWarning,
                stacklevel=2,
            )
            tracer, info = "submodules", _Model(root)
            chains = _fallback_chains(info, "", root)
        else:
            tracer, chains = "fx", _fx_chains(info, gm, inputs)

    removed: dict[str, list[int]] = {c.producer: [0, 0, 0] for c in chains}
    added: set[str] = set()
    rounds = 0
    while True:
        changed = False
        for chain in chains:
            if chain.consumer is None:
                continue
            decision = _decide(root, chain)
            if not bool(decision.remove.any()):
                continue
            counts = removed[chain.producer]
            counts[0] += int((decision.remove & ~decision.unused).sum())
            counts[1] += int((decision.remove & decision.unused).sum())
            counts[2] += int(decision.fold.sum())
            if _apply(root, chain, decision):
                added.add(chain.consumer)
            changed = True
        rounds += 1
        if not changed:
            break

    kept = [
        KeptUnits(chain.producer, count, reason)
        for chain in chains
        for count, reason in _decide(root, chain).kept
    ]
    reached = {chain.producer for chain in chains}
    unreached = (
        "not called in the traced forward"
        if tracer == "fx"
        else "not inside a traceable submodule or an nn.Sequential (see `trace_error`)"
    )
    for name, module in _layer_names(root):
        if isinstance(module, _LAYERS) and name not in reached:
            weight, _ = _weight_bias(module)
            count = int((weight.reshape(weight.shape[0], -1) == 0).all(dim=1).sum())
            if count:
                kept.append(KeptUnits(name, count, unreached))
    layers = []
    for name, (old, units, ins, params) in before.items():
        new = root.get_submodule(name)
        dead, unused, folded = removed.get(name, (0, 0, 0))
        layers.append(
            LayerShrink(name, type(old).__name__, units, _units(new), ins, _inputs(new), params,
                        _own_params(new), dead, unused, folded, name in added)
        )  # fmt: skip
    report = ShrinkReport(
        tuple(layers),
        tuple(kept),
        params_before,
        sum(p.numel() for p in root.parameters()),
        tracer,
        trace_error,
        rounds,
        None if inputs is None else _check_outputs(model, root, inputs),
    )
    _log.info("shrink: %d -> %d parameters", report.params_before, report.params_after)
    if not inplace:
        return root, report
    for name, (old, *_) in before.items():
        new = root.get_submodule(name)
        if new is not old:
            _set(model, name, new)
    return model, report

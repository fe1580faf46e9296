"""calibrate()/uncalibrate() on this library's ResNets and on generic models."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import torch_recal
from tests.reference import forward_with_reference_calibration
from torch_recal import ResponseCalibration, calibrate, is_calibrated, register_block, uncalibrate
from torch_recal.functional import response_calibration, response_calibration_residual
from torch_recal.models import BasicBlock, SqueezeExcite, resnet20


def _randomise_calibrations(model: nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ResponseCalibration):
                for p in m.parameters():
                    p.normal_(0.0, scale)


def _blocks(model: nn.Module) -> list[tuple[str, BasicBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BasicBlock)]


def test_calibrate_keeps_pretrained_keys():
    plain = resnet20(num_classes=10)
    checkpoint = plain.state_dict()
    model = calibrate(copy.deepcopy(plain))
    new_keys = set(model.state_dict()) - set(checkpoint)
    assert set(checkpoint) <= set(model.state_dict())
    assert new_keys and all(".calibration." in k for k in new_keys)
    assert len(new_keys) == 6 * 9  # 9 blocks x (fc1, fc_mu, fc_logvar) x (weight, bias)
    fresh = calibrate(resnet20(num_classes=10))
    result = fresh.load_state_dict(checkpoint, strict=False)
    assert set(result.missing_keys) == new_keys
    assert result.unexpected_keys == []
    # a calibrated checkpoint loads strictly into a freshly calibrated model
    calibrate(resnet20(num_classes=10)).load_state_dict(model.state_dict())


@pytest.mark.parametrize("randomise", [False, True])
def test_calibrated_output_matches_formula(randomise):
    plain = resnet20(num_classes=10).double().eval()
    model = calibrate(copy.deepcopy(plain))
    if randomise:  # moderate scale: tiny predicted sigmas would amplify round-off across blocks
        _randomise_calibrations(model, scale=0.1)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    positions = {f"{n}.bn2": m.calibration for n, m in _blocks(model)}
    expected = forward_with_reference_calibration(plain, x, positions)
    with torch.no_grad():
        out = model(x)
        assert not torch.allclose(out, plain(x))  # calibration changes the function at init
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)


def test_calibrate_is_idempotent():
    model = calibrate(resnet20())
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    assert calibrate(model) is model
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params


def test_uncalibrate_restores_exactly():
    plain = resnet20().eval()
    keys = list(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = plain(x)
    model = uncalibrate(calibrate(plain))
    assert model is plain and not is_calibrated(model)
    assert list(model.state_dict()) == keys
    for _, block in _blocks(model):
        assert block.calibration is None and "calibration" not in block._modules
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_inplace_false_returns_a_copy_and_leaves_input_untouched():
    plain = resnet20()
    snapshot = {k: v.clone() for k, v in plain.state_dict().items()}
    model = calibrate(plain, inplace=False)
    assert model is not plain and is_calibrated(model) and not is_calibrated(plain)
    assert list(plain.state_dict()) == list(snapshot)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in snapshot.items())
    uncal = uncalibrate(model, inplace=False)
    assert is_calibrated(model) and not is_calibrated(uncal)


def test_compiles_with_fullgraph_and_no_graph_break():
    model = calibrate(resnet20()).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()


def test_compiled_training_step_matches_eager_gradients():
    model = calibrate(resnet20(num_classes=4))
    x = torch.randn(4, 3, 16, 16)
    torch.compile(model, backend="eager", fullgraph=True)(x).square().sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for a, p in zip(compiled_grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    torch._dynamo.reset()


def test_torch_export():
    model = calibrate(resnet20()).eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_nothing_matched_says_what_it_looked_for():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"no residual block recognised.*torchvision"):
        calibrate(model)
    assert not is_calibrated(model)


def _generic_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.GroupNorm(4, 12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )  # fmt: skip


@pytest.mark.parametrize("by", ["names", "predicate"])
def test_targets_on_a_generic_model(by):
    plain = _generic_cnn().double().eval()
    targets = (
        ["1", "4"]
        if by == "names"
        else (lambda n, m: isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)))
    )
    model = calibrate(copy.deepcopy(plain), targets=targets, reduction=2)
    _randomise_calibrations(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.GroupNorm)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    positions = {"1": model[1].calibration, "4": model[4].calibration}
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), forward_with_reference_calibration(plain, x, positions)
        )
    assert set(model.state_dict()) - set(plain.state_dict()) == {
        f"{i}.calibration.{fc}.{p}"
        for i in (1, 4)
        for fc in ("fc1", "fc_mu", "fc_logvar")
        for p in ("weight", "bias")
    }
    uncalibrate(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.GroupNorm


class _TinyTokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 4)
        return self.head(self.norm(self.proj(x)).mean(1))


def test_targets_layernorm_tokens_use_channel_last():
    plain = _TinyTokenModel().double()
    model = calibrate(copy.deepcopy(plain), targets=["norm"], reduction=2)
    _randomise_calibrations(model)
    assert model.norm.calibration.channel_dim == -1
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    expected = forward_with_reference_calibration(plain, x, {"norm": model.norm.calibration})
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_layer_kwargs_reach_the_inserted_layers():
    model = calibrate(resnet20(), reduction=8, confidence="pdf", stats="static")
    layers = [m for m in model.modules() if isinstance(m, ResponseCalibration)]
    assert len(layers) == 9
    assert all(layer.confidence == "pdf" and layer.stats == "static" for layer in layers)
    assert all(layer.reduction == 8 for layer in layers)


class _SlotBlock(nn.Module):
    def __init__(self, se: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.attn = SqueezeExcite(8, reduction=2) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        if self.attn is not None:
            out = self.attn(out)
        return torch.relu(out + x)


class _AfterBlock(_SlotBlock):
    pass


@pytest.fixture
def registered():
    register_block(_SlotBlock, slot="attn", channels=lambda b: b.norm.num_features)
    register_block(_AfterBlock, after="norm")
    yield
    torch_recal.surgery._REGISTRY.pop(_SlotBlock)
    torch_recal.surgery._REGISTRY.pop(_AfterBlock)


def test_register_block_slot_fills_or_chains(registered):
    plain = nn.Sequential(_SlotBlock(se=False), _SlotBlock(se=True)).double().eval()
    model = calibrate(copy.deepcopy(plain), reduction=2)
    _randomise_calibrations(model)
    assert isinstance(model[0].attn, ResponseCalibration)  # empty slot filled
    assert isinstance(model[1].attn, SqueezeExcite)  # occupied slot: chained after the SE
    assert set(plain.state_dict()) <= set(model.state_dict())
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    positions = {"0.norm": model[0].attn, "1.attn": model[1].attn.calibration}
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), forward_with_reference_calibration(plain, x, positions)
        )
    uncalibrate(model)
    assert model[0].attn is None and type(model[1].attn) is SqueezeExcite
    assert list(model.state_dict()) == list(plain.state_dict())


def test_register_block_after_and_subclass_match(registered):
    # _AfterBlock subclasses _SlotBlock; its own registration ("after") wins via the MRO
    model = calibrate(nn.Sequential(_AfterBlock(se=False)))
    assert isinstance(model[0].norm.calibration, ResponseCalibration)


def test_optimizer_gets_a_param_group_for_new_parameters():
    model = resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calibrate(model, optimizer=opt)
    assert len(opt.param_groups) == 2
    new = {id(p) for p in opt.param_groups[1]["params"]}
    calib = {id(p) for m in model.modules() if isinstance(m, ResponseCalibration)
             for p in m.parameters()}  # fmt: skip
    assert new == calib


def test_new_layers_follow_model_device_and_dtype():
    model = calibrate(resnet20().double())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    generic = calibrate(_generic_cnn().double(), targets=["1"])
    assert generic[1].calibration.fc1.weight.dtype == torch.float64


def test_pickle_and_deepcopy_of_swapped_modules():
    model = calibrate(_generic_cnn(), targets=["1", "4"]).eval()
    x = torch.randn(2, 3, 6, 6)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(clone(x), model(x))
    assert isinstance(loaded[1], nn.BatchNorm2d) and is_calibrated(loaded)
    uncalibrate(loaded)
    assert type(loaded[1]) is nn.BatchNorm2d


def test_calibration_parameters_learn():
    model = calibrate(resnet20(num_classes=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    before = model.layer1[0].calibration.fc_mu.weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for m in model.modules() if isinstance(m, ResponseCalibration)
             for p in m.parameters()]  # fmt: skip
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    opt.step()
    assert not torch.equal(model.layer1[0].calibration.fc_mu.weight, before)


def test_models_builder_calibrated_equals_calibrate():
    torch.manual_seed(1)
    built = resnet20(calibrated=True)
    assert isinstance(built.layer3[2].calibration, ResponseCalibration)
    assert sum(isinstance(m, ResponseCalibration) for m in built.modules()) == 9
    with pytest.raises(ValueError, match="depth"):
        torch_recal.models.CifarResNet(21)


def test_predicate_never_selects_layers_inside_inserted_calibrations():
    model = calibrate(_generic_cnn(), targets=["1"])
    keys = list(model.state_dict())
    calibrate(model, targets=lambda n, m: isinstance(m, nn.BatchNorm2d))  # "1" is done already
    assert list(model.state_dict()) == keys
    calibrate(model, targets=lambda n, m: isinstance(m, nn.Linear) and n == "8")
    assert isinstance(model[1].calibration.fc1, nn.Linear)
    assert not hasattr(model[1].calibration.fc1, "calibration")  # its Linears were skipped
    assert hasattr(model[8], "calibration")


# ------------------------------------------------------------------ blocks call __call__


@pytest.mark.parametrize("how", ["built", "calibrate"])
def test_block_calls_its_calibration_through_call_so_hooks_fire(how):
    model = resnet20(calibrated=True) if how == "built" else calibrate(resnet20())
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    calls = []

    def hook(module, args, kwargs, output):
        u, shortcut = args  # the block hands over its shortcut: the fused tail is used
        expected = torch.relu(shortcut + response_calibration(u, *module.statistics(u)))
        calls.append(torch.allclose(output, expected, rtol=1e-6, atol=1e-6))

    for _, block in _blocks(model):
        block.calibration.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        before = model(x)
    assert calls == [True] * 9
    # a hook's return value replaces the output, as for any module
    last = model.layer3[2].calibration
    last.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, model.fc(torch.zeros(2, 64)).expand_as(after))
    assert not torch.allclose(before, after)


def _graph_ops(fn, *args) -> list[str]:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1  # one graph: no graph break
    return [
        str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")
    ]


@pytest.mark.parametrize("grad", [False, True])
def test_compiled_block_traces_to_the_graph_of_the_fused_functional_tail(grad):
    # calling the calibration through __call__ costs nothing under torch.compile: dynamo traces
    # the same ops as a block that calls the fused functional form by hand
    torch.manual_seed(0)
    block = BasicBlock(8, 8, calibration=ResponseCalibration(8, 4))
    x = torch.randn(2, 8, 6, 6, requires_grad=grad)

    def by_hand(inp):
        out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(inp)))))
        cal = block.calibration
        return response_calibration_residual(out, inp, *cal.statistics(out), cal.eps)

    with torch.set_grad_enabled(grad):
        ours, reference = _graph_ops(block, x), _graph_ops(by_hand, x)
        torch.testing.assert_close(block(x), by_hand(x))
    assert ours == reference  # an unfused tail would add its own `add` and `relu` nodes


# ------------------------------------------------------------------------ SE baseline


def test_se_baseline_is_reduction_4_with_pytorchs_default_init():
    torch.manual_seed(0)
    model = resnet20(se=True)
    se_layers = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(se_layers) == 9
    for se in se_layers:
        channels = se.fc1.in_features
        assert se.fc1.out_features == channels // 4
        for fc in (se.fc1, se.fc2):
            bound = 1.0 / fc.in_features**0.5  # nn.Linear's default: U(-1/sqrt(fan_in), ...)
            for t in (fc.weight, fc.bias):
                assert t.abs().max() <= bound
                assert t.abs().max() > 0.5 * bound  # not N(0, 0.01), not zero
    # the classifier keeps the official code's N(0, 0.01), zero bias
    assert model.fc.weight.std() < 0.02 and torch.all(model.fc.bias == 0)
    assert resnet20(se=True, se_reduction=16).layer3[0].se.fc1.out_features == 4


def test_calibrated_model_keeps_the_official_calibration_init():
    torch.manual_seed(0)
    model = resnet20(calibrated=True)
    weights = torch.cat(
        [fc.weight.reshape(-1) for m in model.modules() if isinstance(m, ResponseCalibration)
         for fc in (m.fc1, m.fc_mu, m.fc_logvar)]
    )  # fmt: skip
    assert abs(weights.std().item() - 0.01) < 0.001 and abs(weights.mean().item()) < 0.001
    biases = [fc.bias for m in model.modules() if isinstance(m, ResponseCalibration)
              for fc in (m.fc1, m.fc_mu, m.fc_logvar)]  # fmt: skip
    assert all(torch.all(b == 0) for b in biases)


# ------------------------------------------------ class swaps of a calibrated norm (SyncBN)


class _TorchvisionLikeBlock(nn.Module):
    """torchvision's BasicBlock as far as calibrate() can tell: its own built-in policy
    (keyed by module and class name) calibrates after `bn2`, with no torchvision import."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


_TorchvisionLikeBlock.__module__ = "torchvision.models.resnet"
_TorchvisionLikeBlock.__name__ = _TorchvisionLikeBlock.__qualname__ = "BasicBlock"


def _torchvision_like() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _TorchvisionLikeBlock(8), _TorchvisionLikeBlock(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


# (how to build, calibrate's arguments, where the calibrated norms are)
def _is_batchnorm(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d)


SWAP_CASES = [
    pytest.param(_generic_cnn, {"targets": ["1"], "reduction": 2}, ["1"], id="targets"),
    pytest.param(_generic_cnn, {"targets": _is_batchnorm, "reduction": 2}, ["1"], id="predicate"),
    pytest.param(_torchvision_like, {"reduction": 2}, ["1.bn2", "2.bn2"], id="torchvision-like"),
]


def _swap_setup(make, kwargs, where):
    torch.manual_seed(0)
    plain = _trained_like(make().double())
    model = calibrate(copy.deepcopy(plain), **kwargs)
    _randomise_calibrations(model, scale=0.1)
    positions = {n: model.get_submodule(n).calibration for n in where}
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    return plain, model, positions, x


@pytest.mark.parametrize(("make", "kwargs", "where"), SWAP_CASES)
def test_sync_batchnorm_conversion_keeps_the_calibration(make, kwargs, where):
    plain, model, positions, x = _swap_setup(make, kwargs, where)
    state = model.state_dict()
    with torch.no_grad():
        before = model(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model and is_calibrated(model)
    for name, layer in positions.items():
        norm = model.get_submodule(name)
        assert isinstance(norm, nn.SyncBatchNorm) and norm.calibration is layer
    after_state = model.state_dict()
    assert list(after_state) == list(state)
    assert all(after_state[k] is v or torch.equal(after_state[k], v) for k, v in state.items())
    # eval, single process: SyncBatchNorm computes what BatchNorm did, then the calibration
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, before, rtol=0, atol=0)
        reference = forward_with_reference_calibration(plain, x, positions)
        torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-10)
        assert not torch.allclose(out, plain(x))
    # training mode runs too (no process group: no sync), through the calibration
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for layer in positions.values() for p in layer.parameters())


def _rebuild(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A converter as Lightning's `TorchSyncBatchNorm.revert` and timm's are written: build a
    `cls` norm, copy parameters and buffers, hand it the old module's children (here through
    setattr; torch's converter uses add_module)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        out = cls(module.num_features, module.eps, module.momentum)
        out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        setattr(out, name, _rebuild(child, cls))
    return out


@pytest.mark.parametrize(("make", "kwargs", "where"), SWAP_CASES)
def test_round_trip_of_class_swaps_keeps_calibration_and_uncalibrate_restores(make, kwargs, where):
    plain, model, positions, x = _swap_setup(make, kwargs, where)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
    model = _rebuild(nn.SyncBatchNorm.convert_sync_batchnorm(model), nn.BatchNorm2d)
    for name, layer in positions.items():
        norm = model.get_submodule(name)
        assert isinstance(norm, nn.BatchNorm2d) and norm.calibration is layer
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # idempotent after the swaps: nothing new
    params = [id(p) for p in model.parameters()]
    calibrate(model, **kwargs)
    assert [id(p) for p in model.parameters()] == params
    # uncalibrate gives the plain converted model back
    converted_plain = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    uncalibrate(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    assert not is_calibrated(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in converted_plain.modules()]
    assert list(model.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), converted_plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", [0, 2])
def test_converted_model_compiles_exports_and_pickles(case):
    _, model, _, x = _swap_setup(*SWAP_CASES[case].values)
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert is_calibrated(model)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), ref)
    if case == 2:
        return  # the torchvision stand-in class cannot be pickled by name
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded[1], nn.SyncBatchNorm) and is_calibrated(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)


def test_a_calibrated_norm_that_is_the_whole_model_is_converted_too():
    norm = _trained_like(nn.BatchNorm2d(4).double())
    model = calibrate(copy.deepcopy(norm), targets=[""], reduction=2)
    _randomise_calibrations(model)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is not model and isinstance(converted, nn.SyncBatchNorm)
    assert converted.calibration is model.calibration and is_calibrated(converted)
    with torch.no_grad():
        expected = forward_with_reference_calibration(norm, x, {"": model.calibration})
        torch.testing.assert_close(converted(x), expected, rtol=1e-9, atol=1e-10)


def test_calibrate_reattaches_a_calibration_that_a_raw_class_swap_left_behind():
    plain, model, _, x = _swap_setup(*SWAP_CASES[0].values)
    with torch.no_grad():
        before = model(x)
    layer = model[1].calibration
    model[1].__class__ = nn.BatchNorm2d  # bypasses add_module/setattr: nothing can follow it
    assert not is_calibrated(model) and model[1].calibration is layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calibrate(model, targets=["1"], optimizer=opt)
    assert model[1].calibration is layer and is_calibrated(model)  # the trained layer, kept
    assert len(opt.param_groups) == 1  # no new parameters
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    model[1].__class__ = nn.BatchNorm2d
    uncalibrate(model)  # removes the layer left behind, too
    assert type(model[1]) is nn.BatchNorm2d and list(model.state_dict()) == list(plain.state_dict())


def test_only_inserted_calibrations_are_followed():
    calibrate(_generic_cnn(), targets=["1"])  # the registration hook exists from here on
    built = resnet20(calibrated=True)  # the block's own slot gets a ResponseCalibration
    assert all(type(m) is BasicBlock for _, m in _blocks(built))
    holder = nn.BatchNorm2d(4)
    holder.calibration = ResponseCalibration(4)  # a user's own layer, not inserted by calibrate
    assert type(holder) is nn.BatchNorm2d and not is_calibrated(holder)


def test_a_target_with_its_own_calibration_attribute_is_refused():
    model = resnet20(calibrated=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"`layer1.0`.*already has a `calibration`"):
        calibrate(model, targets=["layer1.1.bn1", "layer1.0"])
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

"""RifleScheduler and find_classifier (RIFLE, arXiv 2007.03349).

References are written here from the official code (lixingjian/RIFLE ``train.py``), never
taken from the implementation: the schedule loop, the cyclic head lr, PyTorch's default
``nn.Linear`` init under a known RNG state, and weight snapshots.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from tests.distributed import needs_fsdp2, run_distributed
from torch_recal import RifleScheduler, find_classifier
from torch_recal.models import resnet20


# ------------------------------------------------------------------------ references
def official_reinit_epochs(epochs: int, fc_reinit_times: int) -> tuple[list[int], int]:
    """The official loop, literally: returns (epochs after which it re-initialises, the
    rounded number of epochs it trains)."""
    num_periods = fc_reinit_times + 1
    num_epochs = num_periods * (epochs // num_periods)
    fired = []
    for epoch in range(num_epochs):
        if num_periods > 1 and (epoch + 1) % (num_epochs // num_periods) == 0:
            fired.append(epoch)
    return fired, num_epochs


def expected_epochs(total: int, resets: int) -> list[int]:
    """The official epochs, less the re-initialisation after its (rounded) final epoch."""
    fired, rounded = official_reinit_epochs(total, resets)
    return [e for e in fired if e != rounded - 1]


def official_cyclic_fc_factor(epoch: int, num_epochs: int, num_periods: int) -> float:
    u = num_epochs // num_periods
    return 0.5 * (1 + math.cos(math.pi * (epoch % u) / u))


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def differs_everywhere(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(not torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("total", "resets"),
    [(40, 1), (40, 3), (30, 2), (10, 2), (7, 2), (5, 4), (100, 4), (9, 1), (6, 0)],
)
def test_schedule_is_the_official_one_without_the_final_epoch(total, resets):
    expected = expected_epochs(total, resets)
    assert len(expected) == resets
    rifle = RifleScheduler(nn.Linear(3, 2), total_epochs=total, num_resets=resets)
    assert rifle.schedule() == expected
    assert all(e < total - 1 for e in rifle.schedule())


@pytest.mark.parametrize(("total", "resets"), [(12, 2), (10, 3), (8, 1)])
def test_head_changes_exactly_at_the_schedule_and_backbone_never(total, resets):
    model = TinyNet()
    rifle = RifleScheduler(model, total_epochs=total, num_resets=resets)
    expected = expected_epochs(total, resets)
    fired_at = []
    for epoch in range(total + 3):  # extra calls past the end warn once and never fire
        head_before, body_before = snapshot(model.fc), snapshot(model.body)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fired = rifle.step()
        assert len(caught) == (1 if epoch == total else 0)
        if caught:
            assert caught[0].category is UserWarning and "total_epochs" in str(caught[0].message)
        assert same(snapshot(model.body), body_before)
        if epoch in expected:
            assert fired
            assert differs_everywhere(snapshot(model.fc), head_before)
            fired_at.append(epoch)
        else:
            assert not fired
            assert same(snapshot(model.fc), head_before)
        assert rifle.num_steps == min(epoch + 1, total)
        assert rifle.last_epoch == rifle.num_steps - 1
        assert rifle.last_reset == (max(fired_at) if fired_at else None)
    assert fired_at == expected


def test_period_schedule_and_min_epochs_after_last():
    lin = nn.Linear(3, 2)

    def sched(total: int, period: int, min_after: int | None = None) -> list[int]:
        return RifleScheduler(lin, total_epochs=total, period=period,
                              min_epochs_after_last=min_after).schedule()  # fmt: skip

    # every 5 epochs while a full period (the default) remains
    assert sched(23, 5) == [4, 9, 14]
    assert sched(24, 5) == [4, 9, 14]
    assert sched(25, 5) == [4, 9, 14, 19]
    assert sched(23, 5, 5) == [4, 9, 14]
    assert sched(24, 5, 4) == [4, 9, 14, 19]
    assert sched(24, 5, 1) == [4, 9, 14, 19]
    # in optimizer steps: 1000 steps, 4 periods
    steps = RifleScheduler(lin, total_epochs=1000, num_resets=3, unit="step")
    assert steps.schedule() == [249, 499, 749]
    assert steps.unit == "step"


def paddle_port_reinit_epochs(num_epoch: int, cyclic_num: int) -> list[int]:
    """The authors' Paddle port (haozhe-an/RIFLE-Paddle-Implementation, fine_tuning/run.py)."""
    fired = []
    for e_id in range(num_epoch):
        if (e_id + 1) % (num_epoch // cyclic_num) == 0:
            if e_id > num_epoch - 5:
                continue
            fired.append(e_id)
    return fired


@pytest.mark.parametrize("num_epoch", [40, 30, 17, 12, 10])
@pytest.mark.parametrize("cyclic_num", [2, 3, 4])
def test_period_with_min_epochs_after_last_is_the_paddle_port(num_epoch, cyclic_num):
    expected = paddle_port_reinit_epochs(num_epoch, cyclic_num)
    rifle = RifleScheduler(nn.Linear(3, 2), total_epochs=num_epoch,
                           period=num_epoch // cyclic_num, min_epochs_after_last=4)  # fmt: skip
    assert rifle.schedule() == expected


def test_num_resets_zero_never_fires():
    lin = nn.Linear(3, 2)
    rifle = RifleScheduler(lin, total_epochs=5, num_resets=0)
    before = snapshot(lin)
    assert rifle.schedule() == []
    assert not any(rifle.step() for _ in range(5))
    assert same(snapshot(lin), before)
    assert rifle.last_reset is None


@pytest.mark.parametrize(("total", "resets"), [(40, 1), (40, 3), (12, 2), (30, 4)])
def test_head_lr_factor_is_the_official_cyclic_lr(total, resets):
    rifle = RifleScheduler(nn.Linear(3, 2), total_epochs=total, num_resets=resets)
    for epoch in range(total):
        ref = official_cyclic_fc_factor(epoch, total, resets + 1)
        assert rifle.head_lr_factor(epoch) == pytest.approx(ref, abs=1e-12)


def test_head_lr_factor_last_period_absorbs_the_remainder():
    # 11 epochs, 2 resets: periods of 3, 3 and 5 epochs (the official code trains only 9)
    rifle = RifleScheduler(nn.Linear(3, 2), total_epochs=11, num_resets=2)
    lengths = [3, 3, 5]
    ref = [0.5 * (1 + math.cos(math.pi * t / n)) for n in lengths for t in range(n)]
    assert [rifle.head_lr_factor(e) for e in range(11)] == pytest.approx(ref, abs=1e-12)
    assert rifle.head_lr_factor(11) == pytest.approx(0.0, abs=1e-12)  # LambdaLR's extra step
    assert rifle.head_lr_factor(50) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="epoch"):
        rifle.head_lr_factor(-1)
    with pytest.raises(TypeError, match="epoch"):
        rifle.head_lr_factor(2.0)


# ------------------------------------------------------------------------ the reset
def test_default_reinit_is_pytorch_linear_init():
    model = TinyNet()
    rifle = RifleScheduler(model, total_epochs=4, num_resets=1)
    rifle.step()
    torch.manual_seed(123)
    ref = nn.Linear(8, 3)  # default init, drawn from the same RNG state
    torch.manual_seed(123)
    assert rifle.step()
    assert torch.equal(model.fc.weight, ref.weight)
    assert torch.equal(model.fc.bias, ref.bias)


def test_reset_keeps_parameter_identity_dtype_and_requires_grad():
    model = TinyNet().double()
    model.fc.bias.requires_grad_(False)
    ids = [id(p) for p in model.fc.parameters()]
    rifle = RifleScheduler(model.fc, total_epochs=2, num_resets=1)
    assert rifle.step()
    assert [id(p) for p in model.fc.parameters()] == ids
    assert model.fc.weight.dtype == torch.float64
    assert model.fc.weight.requires_grad
    assert not model.fc.bias.requires_grad


def test_seed_makes_values_deterministic_and_leaves_global_rng_alone():
    def run(model_seed: int, global_seed: int) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(model_seed)
        model = TinyNet()
        rifle = RifleScheduler(model, total_epochs=9, num_resets=2, seed=7)
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        heads = []
        for _ in range(9):
            if rifle.step():
                heads.append(snapshot(model.fc))
        assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
        return heads

    a, b = run(0, 1), run(5, 99)
    assert len(a) == 2
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert differs_everywhere(a[0], a[1])  # each reset gets its own values
    torch.manual_seed(0)
    other = RifleScheduler(TinyNet(), total_epochs=9, num_resets=2, seed=8)
    for _ in range(3):
        other.step()
    assert differs_everywhere(snapshot(other.head), a[0])


def test_custom_init_is_used_instead_of_reset_parameters():
    model = TinyNet()
    calls = []

    def init(head: nn.Module) -> None:
        calls.append(head)
        nn.init.constant_(head.weight, 0.25)
        nn.init.zeros_(head.bias)

    rifle = RifleScheduler(model, total_epochs=4, num_resets=1, init=init)
    for _ in range(4):
        rifle.step()
    assert calls == [model.fc]
    assert torch.all(model.fc.weight == 0.25)
    assert torch.all(model.fc.bias == 0)


def test_outermost_reset_parameters_wins_over_its_children():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.out = nn.Linear(4, 2)

        def reset_parameters(self) -> None:
            nn.init.constant_(self.norm.weight, 2.0)
            nn.init.zeros_(self.norm.bias)
            nn.init.constant_(self.out.weight, -1.0)
            nn.init.zeros_(self.out.bias)

    head = Head()
    rifle = RifleScheduler([head], total_epochs=2, num_resets=1)
    rifle.step()
    assert torch.all(head.norm.weight == 2.0)
    assert torch.all(head.out.weight == -1.0)


def test_model_with_its_own_parameters_is_searched_not_reset():
    class TokenModel(nn.Module):  # ViT-like: parameters of its own plus a `head`
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 4))
            self.blocks = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

    model = TokenModel()
    body = snapshot(model.blocks)
    rifle = RifleScheduler(model, total_epochs=2, num_resets=1)
    assert rifle.head is model.head
    rifle.step()
    assert same(snapshot(model.blocks), body)
    assert torch.equal(model.cls_token, torch.zeros(1, 4))


def test_list_target_resets_every_listed_layer_and_nothing_else():
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    first = snapshot(mlp[0])
    heads = [snapshot(mlp[2]), snapshot(mlp[4])]
    rifle = RifleScheduler([mlp[2], mlp[4]], total_epochs=2, num_resets=1)
    assert rifle.step()
    assert same(snapshot(mlp[0]), first)
    assert differs_everywhere(snapshot(mlp[2]), heads[0])
    assert differs_everywhere(snapshot(mlp[4]), heads[1])


# ------------------------------------------------------------------ optimizer state
def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("groups", ["own", "shared"])
def test_optimizer_state_reset_only_for_the_head(groups):
    model = TinyNet()
    if groups == "own":
        params = [{"params": model.fc.parameters()}, {"params": model.body.parameters()}]
    else:
        params = [{"params": model.parameters()}]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    rifle = RifleScheduler(model, total_epochs=2, num_resets=1, optimizer=opt,
                           reset_optimizer_state=True)  # fmt: skip
    _train_steps(model, opt, 3, seed=0)
    body_state = {p: opt.state[p]["momentum_buffer"].clone() for p in model.body.parameters()}
    lrs = [g["lr"] for g in opt.param_groups]
    assert rifle.step()
    for p in model.fc.parameters():
        assert p not in opt.state or not opt.state[p]
    for p, buf in body_state.items():
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    assert [g["lr"] for g in opt.param_groups] == lrs
    # the next step treats the head like a fresh parameter: momentum buffer = its gradient
    head_before = model.fc.weight.detach().clone()
    _train_steps(model, opt, 1, seed=1)
    grad = model.fc.weight.grad
    assert torch.allclose(model.fc.weight, head_before - 0.1 * grad)


def test_adam_state_reset_restarts_the_head_moments():
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rifle = RifleScheduler(model, total_epochs=2, num_resets=1, optimizer=opt,
                           reset_optimizer_state=True, seed=0)  # fmt: skip
    _train_steps(model, opt, 4, seed=0)
    assert rifle.step()
    _train_steps(model, opt, 1, seed=1)
    assert float(opt.state[model.fc.weight]["step"]) == 1
    assert float(opt.state[model.body[0].weight]["step"]) == 5


def test_optimizer_state_kept_by_default_as_the_official_code():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rifle = RifleScheduler(model, total_epochs=2, num_resets=1, optimizer=opt)
    _train_steps(model, opt, 2, seed=0)
    buf = opt.state[model.fc.weight]["momentum_buffer"].clone()
    assert rifle.step()
    assert torch.equal(opt.state[model.fc.weight]["momentum_buffer"], buf)


# ----------------------------------------------------------------- state and resume
def _run(total: int, stop: int | None, ckpt: dict | None) -> tuple[dict, list[int], dict]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rifle = RifleScheduler(model, total_epochs=total, num_resets=3, seed=11, optimizer=opt,
                           reset_optimizer_state=True)  # fmt: skip
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        rifle.load_state_dict(ckpt["rifle"])
        start = rifle.num_steps
    fired = []
    for epoch in range(start, total if stop is None else stop):
        _train_steps(model, opt, 2, seed=epoch)
        if rifle.step():
            fired.append(epoch)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "rifle": rifle.state_dict()}, buf)  # fmt: skip
    buf.seek(0)
    return snapshot(model), fired, torch.load(buf, weights_only=True)


@pytest.mark.parametrize("stop", [3, 4, 9])
def test_resume_equals_uninterrupted_run(stop):
    full, fired_full, _ = _run(12, None, None)
    _, fired_a, ckpt = _run(12, stop, None)
    resumed, fired_b, _ = _run(12, None, ckpt)
    assert fired_full == [2, 5, 8]
    assert fired_a + fired_b == fired_full
    assert same(resumed, full)


def test_state_dict_is_plain_data_and_checked_on_load():
    rifle = RifleScheduler(nn.Linear(3, 2), total_epochs=10, num_resets=2, seed=3)
    for _ in range(4):
        rifle.step()
    state = rifle.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert (state["num_steps"], state["last_reset"]) == (4, 2)
    other = RifleScheduler(nn.Linear(3, 2), total_epochs=10, num_resets=2, seed=3)
    other.load_state_dict(state)
    assert (other.num_steps, other.last_epoch, other.last_reset) == (4, 3, 2)
    wrong = RifleScheduler(nn.Linear(3, 2), total_epochs=10, num_resets=3, seed=3)
    for bad, names in (
        (state, "`schedule`"),
        ({**state, "schedule": [1, 3, 5], "total_epochs": 12}, "`total_epochs`"),
        ({"num_steps": 0}, "missing"),
    ):
        with pytest.raises(ValueError, match=names):
            wrong.load_state_dict(bad)
    with pytest.raises(ValueError, match="seed"):
        RifleScheduler(nn.Linear(3, 2), total_epochs=10, num_resets=2).load_state_dict(state)
    assert (wrong.num_steps, wrong.last_reset) == (0, None)
    with pytest.raises(AttributeError):
        other.last_epoch = 5  # a read-only alias


def test_load_state_dict_rejects_a_position_the_schedule_cannot_reach():
    rifle = RifleScheduler(nn.Linear(3, 2), total_epochs=10, num_resets=2, seed=3)  # [2, 5]
    good = {"num_steps": 4, "last_reset": 2, "schedule": [2, 5], "total_epochs": 10,
            "unit": "epoch", "seed": 3}  # fmt: skip
    for bad, error in (
        ({**good, "num_steps": 10**9}, ValueError),  # far past total_epochs
        ({**good, "num_steps": 11}, ValueError),
        ({**good, "num_steps": 0, "last_reset": 3}, ValueError),  # 3 is not scheduled
        ({**good, "num_steps": 0, "last_reset": 2}, ValueError),  # not fired yet
        ({**good, "last_reset": None}, ValueError),  # epoch 2 has fired
        ({**good, "num_steps": 7}, ValueError),  # epoch 5 has fired too
        ({**good, "num_steps": True}, TypeError),
        ({**good, "last_reset": 2.0}, TypeError),
    ):
        with pytest.raises(error):
            rifle.load_state_dict(bad)
        assert (rifle.num_steps, rifle.last_reset) == (0, None)
    rifle.load_state_dict({**good, "num_steps": 10, "last_reset": 5})  # the end is reachable
    with pytest.warns(UserWarning, match="total_epochs"):
        assert not rifle.step()


# ------------------------------------------------------------------ find_classifier
def test_find_classifier_conventions():
    model = resnet20(num_classes=4)
    assert find_classifier(model) is model.fc  # get_classifier()
    assert find_classifier(nn.DataParallel(model)) is model.fc
    assert find_classifier(TinyNet()).out_features == 3

    net = nn.Module()
    net.features = nn.Linear(4, 4)
    net.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_classifier(net) is net.classifier[3]

    vit = nn.Module()
    vit.blocks = nn.Linear(4, 4)
    vit.head = nn.Linear(4, 7)
    assert find_classifier(vit) is vit.head

    squeeze = nn.Module()
    squeeze.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(4, 3, 1), nn.ReLU())
    assert find_classifier(squeeze) is squeeze.classifier[1]

    tv_vit = nn.Module()  # torchvision's VisionTransformer layout, with pre-logits
    tv_vit.encoder = nn.Linear(4, 4)
    tv_vit.heads = nn.Sequential()
    tv_vit.heads.add_module("pre_logits", nn.Linear(4, 4))
    tv_vit.heads.add_module("act", nn.Tanh())
    tv_vit.heads.add_module("head", nn.Linear(4, 6))
    assert find_classifier(tv_vit) is tv_vit.heads.head


def test_find_classifier_errors_say_how_to_pass_the_head():
    both = nn.Module()
    both.fc = nn.Linear(4, 2)
    both.head = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"ambiguous.*RifleScheduler\(model\."):
        find_classifier(both)
    none = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no get_classifier.*RifleScheduler\(model\."):
        find_classifier(none)
    with pytest.raises(ValueError, match="RifleScheduler"):
        RifleScheduler(none, total_epochs=4, num_resets=1)  # not silently the whole model

    class Headless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.fc = nn.Identity()

        def get_classifier(self) -> nn.Module:
            return self.fc

    with pytest.raises(ValueError, match="no parameters"):
        find_classifier(Headless())

    class TwoHeads(nn.Module):
        def get_classifier(self):
            return nn.Linear(2, 2), nn.Linear(2, 2)

    with pytest.raises(ValueError, match="explicitly"):
        find_classifier(TwoHeads())
    with pytest.raises(TypeError, match="model"):
        find_classifier("resnet")


# ------------------------------------------ tied weights, logging (bad arguments: test_bad_calls)
class TiedLM(nn.Module):
    """A language-model layout: the output layer shares the embedding's weight."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.embed(tokens))))


def test_tied_head_is_refused_at_construction_and_nothing_changes():
    model = TiedLM()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`weight` is also `embed\.weight`.*tied"):
        RifleScheduler(model, total_epochs=4, num_resets=1)
    assert same(snapshot(model), before)
    assert model.head.weight is model.embed.weight
    untied = TiedLM(tie=False)
    embed = snapshot(untied.embed)
    rifle = RifleScheduler(untied, total_epochs=2, num_resets=1, seed=0)
    assert rifle.head is untied.head and rifle.step()
    assert same(snapshot(untied.embed), embed)
    alias = TiedLM(tie=False)
    alias.classifier_alias = alias.head  # the head registered twice is not a tie
    alias.get_classifier = lambda: alias.head
    RifleScheduler(alias, total_epochs=2, num_resets=1)


def test_each_reset_is_logged_at_info(caplog):
    rifle = RifleScheduler(nn.Linear(3, 2), total_epochs=6, num_resets=2)
    with caplog.at_level(logging.INFO, logger="torch_recal"):
        fired = [rifle.step() for _ in range(6)]
    assert fired == [False, True, False, True, False, False]
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    assert all(r.name == "torch_recal" for r in caplog.records)
    assert "after epoch 1 (reset 1 of 2)" in caplog.records[0].getMessage()
    assert "after epoch 3 (reset 2 of 2)" in caplog.records[1].getMessage()


# ---------------------------------------------------------------------- distributed
def _rank_worker(rank: int, world_size: int) -> dict:
    out = {}
    for seed in (None, 5):
        torch.manual_seed(100 + rank)  # different global RNG (and model) on every rank
        model = TinyNet()
        rifle = RifleScheduler(model, total_epochs=4, num_resets=1, seed=seed)
        assert not rifle.step()
        assert rifle.step()
        out[seed] = snapshot(model.fc)
        out[f"body{seed}"] = snapshot(model.body)
    # a different seed on every rank (a common mistake) still gives one head
    model = TinyNet()
    RifleScheduler(model, total_epochs=2, num_resets=1, seed=rank).step()
    out["per_rank_seed"] = snapshot(model.fc)
    return out


@pytest.mark.distributed
def test_reinitialised_head_is_identical_on_every_rank():
    r0, r1 = run_distributed(_rank_worker)
    for key in (None, 5, "per_rank_seed"):
        assert same(r0[key], r1[key])
    assert not same(r0["bodyNone"], r1["bodyNone"])  # backbones are left alone
    # with a seed, the values equal a single-process run's
    torch.manual_seed(3)
    model = TinyNet()
    rifle = RifleScheduler(model, total_epochs=4, num_resets=1, seed=5)
    rifle.step()
    rifle.step()
    assert same(snapshot(model.fc), r0[5])
    # without a seed, rank 0's own draw is kept (broadcast from rank 0)
    torch.manual_seed(100)
    model = TinyNet()  # rank 0 built its model, then reset the head from the global RNG
    ref = copy.deepcopy(model.fc)
    ref.reset_parameters()
    assert same(snapshot(ref), r0[None])


def _fsdp_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(3)
    model = TinyNet()
    fully_shard(model.body)
    fully_shard(model)  # the head is managed by the root
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rifle = RifleScheduler(
        model, total_epochs=4, num_resets=1, seed=5, optimizer=opt, reset_optimizer_state=True
    )
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
    model(x).sum().backward()
    opt.step()
    body = {k: v.full_tensor() for k, v in model.body.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(x)  # FSDP2 leaves the root's parameters (the head's) gathered after this
    fired = [rifle.step(), rifle.step()]
    out = {
        "fired": fired,
        "sharded": all(isinstance(p, DTensor) for p in model.fc.parameters()),
        "fc": {k: v.full_tensor() for k, v in model.fc.state_dict().items()},
        "body_kept": all(
            torch.equal(v.full_tensor(), body[k]) for k, v in model.body.state_dict().items()
        ),
        "head_state_reset": all(p not in opt.state for p in model.fc.parameters()),
        "body_state_kept": all(p in opt.state for p in model.body.parameters()),
    }
    model.train()
    model(x).sum().backward()  # still trains
    opt.step()
    return out


@pytest.mark.distributed
@needs_fsdp2
def test_fsdp2_sharded_head_is_reset_at_full_size_and_sharded_back():
    r0, r1 = run_distributed(_fsdp_worker)
    torch.manual_seed(3)
    model = TinyNet()  # the same values, unsharded, in one process
    rifle = RifleScheduler(model, total_epochs=4, num_resets=1, seed=5)
    rifle.step()
    rifle.step()
    for r in (r0, r1):
        assert r["fired"] == [False, True]
        assert r["sharded"] and r["body_kept"]
        assert r["head_state_reset"] and r["body_state_kept"]
        assert same(r["fc"], snapshot(model.fc))  # each rank's slice of the full-size reset


# --------------------------------------------------------------------------- vision
@pytest.mark.vision
def test_torchvision_and_timm_resnet18_heads():
    import timm
    import torchvision

    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=10)
    for model in (tv, tm):
        assert find_classifier(model) is model.fc
        rifle = RifleScheduler(model, total_epochs=6, num_resets=2, seed=0)
        assert rifle.head is model.fc
        backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
        head = snapshot(model.fc)
        fired = [rifle.step() for _ in range(6)]
        assert fired == [False, True, False, True, False, False]
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in backbone.items())
        assert differs_everywhere(snapshot(model.fc), head)
    # same seed, same head shape -> same values for both libraries' Linear
    assert same(snapshot(tv.fc), snapshot(tm.fc))


@pytest.mark.vision
def test_vision_transformer_heads_of_torchvision_and_timm():
    import timm
    import torchvision

    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=5,
    )  # fmt: skip
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32)
    for model, head in ((tv, tv.heads.head), (tm, tm.head)):
        assert find_classifier(model) is head
        rifle = RifleScheduler(model, total_epochs=4, num_resets=1, seed=0)
        assert rifle.head is head
        before = snapshot(head)
        assert [rifle.step() for _ in range(4)] == [False, True, False, False]
        assert differs_everywhere(snapshot(head), before)
        model(torch.randn(2, 3, 32, 32))  # still runs

"""The RIFLE protocol's helpers (examples/repro/rifle.py) against independent references:
gradient norms, the relative backbone change, the geometric mean, the LP-FT probe phase
(a frozen backbone is a linear model on precomputed features) and the premise checks."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from repro import rifle  # noqa: E402
from repro.common import Context  # noqa: E402
from repro.train import generator, set_stage  # noqa: E402


def test_grad_norm_is_the_total_l2_norm_of_the_gradients():
    torch.manual_seed(0)
    model = rifle.SmallCNN(3)
    model(torch.randn(4, 1, 28, 28)).logsumexp(1).sum().backward()
    head, backbone = rifle._split_params(model)
    for params in (head, backbone, head + backbone):
        ref = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        assert rifle.grad_norm(params) == pytest.approx(float(ref), rel=1e-6)
    flat = np.concatenate([p.grad.numpy().ravel() for p in backbone])
    assert rifle.grad_norm(backbone) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-6)
    assert rifle.grad_norm([nn.Parameter(torch.ones(2))]) == 0.0  # no gradient yet


def test_relative_change_and_geomean_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    start = [torch.tensor(rng.normal(size=s)) for s in ((3, 4), (5,))]
    now = [t + torch.tensor(rng.normal(scale=0.1, size=t.shape)) for t in start]
    a = np.concatenate([t.numpy().ravel() for t in now])
    b = np.concatenate([t.numpy().ravel() for t in start])
    ref = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rifle.relative_change(now, start) == pytest.approx(ref, rel=1e-12)
    values = [0.3, 2.0, 0.05, 1.1]
    assert rifle.geomean(values) == pytest.approx(stats.gmean(values), rel=1e-12)
    assert rifle.geomean([0.5, None, math.inf, -1.0, 2.0]) == pytest.approx(1.0)
    assert rifle.geomean([]) is None


def _ctx(epochs: int = 4) -> Context:
    set_stage("explore")
    proto = rifle.protocol(True, [0])
    proto["stage"] = "explore"
    proto["settings"]["finetune"]["epochs"] = epochs
    return Context(proto, 7, {}, {}, Path("."), None, "explore")


def _data(n: int = 40, classes: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % classes
    return x, y, x[:10], y[:10]


def test_probe_phase_is_a_linear_model_on_the_frozen_pretrained_features():
    ctx = _ctx()
    torch.manual_seed(1)
    model = rifle.SmallCNN(3)
    with torch.no_grad():  # BN statistics that differ from a batch's, so eval mode matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(model)
    x, y, tx, ty = _data()
    run = rifle.Run(ctx, model, x, y, tx, ty, "fashion")
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    run.probe(0, 2)
    # the backbone (weights and BN buffers) is untouched and trainable again
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    assert run.backbone_grad == [0.0, 0.0] and all(h > 0 for h in run.head_grad)
    # reference: the features by hand (eval-mode layers), a plain SGD loop on a Linear
    f = ctx.proto["settings"]["finetune"]
    reference.eval()
    with torch.no_grad():
        feats = reference.features(x).mean(dim=(2, 3))
    head = reference.fc
    opt = torch.optim.SGD(head.parameters(), lr=f["lr"], momentum=0.9, weight_decay=1e-4)
    for epoch in range(2):
        for group in opt.param_groups:
            group["lr"] = 0.5 * f["lr"] * (1 + math.cos(math.pi * epoch / f["epochs"]))
        order = torch.randperm(len(y), generator=generator(7, 30, 0, epoch))
        for i in range(0, len(y), f["batch_size"]):
            idx = order[i : i + f["batch_size"]]
            opt.zero_grad()
            nn.functional.cross_entropy(head(feats[idx]), y[idx]).backward()
            opt.step()
    torch.testing.assert_close(model.fc.weight, head.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.fc.bias, head.bias, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        acc = float((head(reference.features(tx).mean(dim=(2, 3))).argmax(1) == ty).float().mean())
    assert run.probe_stats["probe_eval_acc"] == pytest.approx(acc)
    # then full fine-tuning moves the backbone, and the metrics carry the probe's figures
    run.train(2, 4)
    assert all(g > 0 for g in run.backbone_grad[2:])
    metrics = run.metrics()
    assert metrics["backbone_shift"] > 0 and metrics["probe_epochs"] == 2
    assert not any("test" in k for k in metrics)


def test_fork_records_its_own_gradients_after_the_branch():
    ctx = _ctx()
    torch.manual_seed(2)
    x, y, tx, ty = _data()
    run = rifle.Run(ctx, rifle.SmallCNN(3), x, y, tx, ty, "fashion")
    run.train(0, 2)
    branch = run.fork()
    with torch.no_grad():
        branch.model.fc.weight.mul_(10.0)  # a different head: different gradients
    run.train(2, 3)
    branch.train(2, 3)
    assert branch.backbone_grad[:2] == run.backbone_grad[:2]
    assert len(branch.backbone_grad) == len(run.backbone_grad) == 3
    assert branch.backbone_grad[2] != run.backbone_grad[2]


def _record(seed: int, t: str, reset: int, **over: float) -> dict:
    g_ft = [1.0] * (reset + 3)
    g_ft[reset] = over.get("faded", 0.1)
    g_rifle = list(g_ft)
    g_rifle[reset + 1] = over.get("revived", 3.0) * g_ft[reset + 1]
    return {
        "seed": seed,
        "arms": {
            f"{t}/fine-tune": {"val_acc": 0.9, "train_acc_at_reset": over.get("fit", 1.0),
                               "backbone_grad_curve": g_ft},
            f"{t}/rifle": {"train_acc_final": over.get("refit", 1.0),
                           "backbone_grad_curve": g_rifle},
            f"{t}/lp-ft": {"probe_eval_acc": 0.9 - over.get("gap", 0.05)},
        },
    }  # fmt: skip


def test_premise_checks_compute_the_documented_quantities():
    set_stage("explore")
    proto = rifle.protocol(False, [0, 1, 2])
    proto["stage"] = "explore"
    reset = rifle._reset_epoch(proto["settings"]["finetune"])
    assert reset == 19
    seeds = [
        _record(0, "fashion", reset, faded=0.5, revived=1.5, fit=0.97, gap=0.0),
        _record(1, "fashion", reset, faded=0.05, revived=4.0, fit=0.99, gap=0.02),
        _record(2, "fashion", reset, faded=0.2, revived=2.0, fit=1.0, refit=0.9, gap=0.01),
    ]
    for t in ("mnist", "digits10", "digits20"):
        for s in range(3):
            seeds[s]["arms"].update(_record(s, t, reset)["arms"])
    infos = {f"seed{s}-source": {"source": "fashion5", "source_acc": 0.96 + s / 100}
             for s in range(3)}  # fmt: skip
    infos.update({f"seed{s}-source10": {"source": "fashion10", "source_acc": 0.89 + s / 100}
                  for s in range(3)})  # fmt: skip
    checks = {c["name"]: c for c in rifle.premise(proto, seeds, infos)}
    name = {k: f"fashion: {v[0]}" for k, v in rifle.CHECKS.items()}
    assert checks[name["fit"]]["value"] == pytest.approx(np.mean([0.97, 0.99, 1.0]))
    assert checks[name["faded"]]["value"] == pytest.approx(stats.gmean([0.5, 0.05, 0.2]))
    assert checks[name["revived"]]["value"] == pytest.approx(stats.gmean([1.5, 4.0, 2.0]))
    assert checks[name["refit"]]["value"] == pytest.approx(np.mean([1.0, 1.0, 0.9]))
    assert checks[name["gap"]]["value"] == pytest.approx(0.01)
    assert checks[name["faded"]]["passed"]  # 0.17 <= 0.2
    assert not checks[name["refit"]]["passed"]  # 0.967 < 0.98
    src = checks[f"source fashion10: {rifle.SOURCE_CHECK['explore']}"]
    assert src["value"] == pytest.approx(0.89) and not src["passed"]
    result = {"premise": list(checks.values()), "protocol": proto}
    failed = rifle.premise_by_study(result)
    assert {c["name"] for c in failed["fashion"]} == {name["refit"]}
    assert [c["name"] for c in failed["digits10"]] == [src["name"]]
    assert failed["mnist"] == []


def test_confirm_protocol_has_the_main_transfers_and_the_headline_pairs_only():
    from repro.common import build_protocol
    from repro.train import current_stage

    before = current_stage()
    try:
        proto = build_protocol(rifle, False, [100, 101], "confirm")
        tasks = rifle.tasks(proto)
    finally:
        set_stage(before)
    assert rifle.CONFIRM_PREMISE_STUDY is None
    assert list(proto["studies"]) == ["fashion", "mnist"]
    assert set(proto["settings"]["transfers"]) == {"fashion", "mnist"}
    assert set(proto["settings"]["sources"]) == {"fashion5"}
    assert not any("digits" in t.key or "source10" in t.key for t in tasks)
    pairs = {(s, p["label"]): p for s, st in proto["studies"].items() for p in st["pairs"]}
    assert set(rifle.HEADLINE) <= set(pairs) and len(rifle.HEADLINE) == 4
    for key in rifle.HEADLINE:
        assert pairs[key]["metric"] == "test_acc" and pairs[key]["expected"] == "+"
        assert pairs[key]["b"] == f"{key[0]}/rifle"

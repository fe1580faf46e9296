"""Exploration: does ResCNet's premise (a calibration MLP that predicts per-image statistics)
start to hold with a longer schedule? One seed, one process, one thread; a log per epoch.

    python examples/repro/explore_rescnet_premise.py --run narrow-calibrate   # 80 epochs
    python examples/repro/explore_rescnet_premise.py --run narrow-plain       # no calibration
    python examples/repro/explore_rescnet_premise.py --run wide-calibrate     # 16/32/64, 40 ep
    python examples/repro/explore_rescnet_premise.py --plot                   # the figure only
    python examples/repro/explore_rescnet_premise.py --quick --run narrow-calibrate  # seconds

The reproduction suite (12 epochs) found the premise false: the spread across images of the
predicted mu stayed near (in fact below) its level at initialisation. This script trains the
suite's model with the authors' recipe scaled to 80 epochs (SGD momentum 0.9, lr 0.1, batch
128, weight decay 5e-4, 5 linear warm-up epochs then a per-step cosine to 0, random crop after
padding 2 + horizontal flip, reduction 4) and after every epoch logs, on the validation images,
the premise quantities of ``repro.calibration`` (``calibration_stats``, ``weight_moves``) plus
diagnostics (per-block spreads, the spread of the MLP's input, the norms of its weights).

Data: only the Fashion-MNIST TRAINING files are read (``read_fashion_split(None, "train")``);
the 9,000 training images are the suite's seed-0 training subset and the 1,000 validation
images are drawn disjoint from them out of the same 60,000 (the test split is never loaded).

Every epoch writes a checkpoint (model, optimizer, epoch, initial weights, the log so far) to
``outputs/explore-premise/<run>.pt``, so an interrupted run resumes where it stopped; the log
of every finished epoch is merged into ``docs/results/explore/calibration-premise-long.json``.
CPU seconds are ``time.process_time`` of this process (one torch thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # examples/repro
EXAMPLES = HERE.parent
ROOT = EXAMPLES.parent
sys.path.insert(0, str(ROOT))  # this checkout's torch_recal, as examples/reproduce.py does
sys.path.insert(0, str(EXAMPLES))

import torch
from data import read_fashion_split
from torch import nn

from repro.calibration import (
    SPREAD_THRESHOLD,
    _blocks,
    build,
    calibration_stats,
    weight_moves,
)
from repro.common import seed_torch
from repro.train import (
    accuracy,
    cosine,
    crop_flip,
    generator,
    set_lr,
    sgd,
    split,
    steps_per_epoch,
    train_epoch,
)
from torch_recal import ResponseCalibration, calibrate
from torch_recal.models import resnet20

SEED = 0  # exploration only; a confirmation uses seeds >= 100
OUT_JSON = ROOT / "docs/results/explore/calibration-premise-long.json"
OUT_PNG = ROOT / "docs/img/explore-calibration-premise.png"
CKPT_DIR = ROOT / "outputs/explore-premise"

RUNS: dict[str, dict[str, Any]] = {
    "narrow-calibrate": {"widths": (8, 16, 32), "calibrate": True, "epochs": 80},
    "narrow-plain": {"widths": (8, 16, 32), "calibrate": False, "epochs": 80},
    "wide-calibrate": {"widths": (16, 32, 64), "calibrate": True, "epochs": 40},
}
RECIPE: dict[str, Any] = {
    "n_train": 9_000,
    "n_val": 1_000,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "warmup_epochs": 5,
    "lr_schedule": "per step: linear warm-up, then cosine to 0 at the run's last step",
    "augmentation": "random crop after zero padding 2, horizontal flip (p = 0.5)",
    "reduction": 4,
    "spread_threshold": SPREAD_THRESHOLD,
}


def load_data(n_train: int, n_val: int) -> tuple[torch.Tensor, ...]:
    """Disjoint train and validation subsets of the 60,000 TRAINING images (seed 0).

    The split draws from ``generator(SEED, 1)`` as ``repro.train.fashion_subsets`` does, so the
    training subset is the suite's seed-0 training subset; the validation images follow it in
    the same permutation (the suite's ``n_val`` is 0, so they were never trained on there).
    """
    x, y = read_fashion_split(None, "train")
    tr, va = split(len(y), [n_train, n_val], generator(SEED, 1))
    return x[tr], y[tr], x[va], y[va]


def make_model(spec: dict[str, Any]) -> nn.Module:
    widths = tuple(spec["widths"])
    if widths == (8, 16, 32):  # the suite's own builder (identical base init for both arms)
        return build("calibrate" if spec["calibrate"] else "plain", SEED, RECIPE)
    seed_torch(SEED, 0)
    model = resnet20(widths=widths, in_chans=1, num_classes=10)
    seed_torch(SEED, 1)
    if spec["calibrate"]:
        calibrate(model, reduction=RECIPE["reduction"])
    return model


@torch.no_grad()
def diagnostics(model: nn.Module, probe: torch.Tensor) -> dict[str, Any]:
    """Per-block spreads and the scale of the MLP's input and weights (eval mode)."""
    captured: list[tuple[ResponseCalibration, torch.Tensor]] = []
    handles = []
    for block in _blocks(model):
        layer = block.calibration
        if isinstance(layer, ResponseCalibration):
            handles.append(
                block.bn2.register_forward_hook(
                    lambda _m, _i, out, layer=layer: captured.append((layer, out.detach()))
                )
            )
    was = model.training
    model.eval()
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    mu_b, ls_b, s_b, n1, nmu, nlv = [], [], [], [], [], []
    for layer, u in captured:
        mu, sigma = layer.statistics(u)
        s = u.mean(dim=(2, 3))
        mu_b.append(float(mu.std(0).mean()))
        ls_b.append(float(sigma.log().std(0).mean()))
        s_b.append(float(s.std(0).mean()))
        n1.append(float(layer.fc1.weight.norm()))
        nmu.append(float(layer.fc_mu.weight.norm()))
        nlv.append(float(layer.fc_logvar.weight.norm()))
    k = max(len(captured), 1)
    return {
        "mu_spread_per_block": mu_b,
        "log_sigma_spread_per_block": ls_b,
        "input_spread": sum(s_b) / k,  # sd over images of the spatial mean s (the MLP's input)
        "norm_fc1": sum(n1) / k,
        "norm_fc_mu": sum(nmu) / k,
        "norm_fc_logvar": sum(nlv) / k,
    }


def premise_record(model: nn.Module, probe: torch.Tensor, init: dict[str, torch.Tensor]):
    rec: dict[str, Any] = dict(calibration_stats(model, probe))
    rec.update(weight_moves(model, init))
    rec.update(diagnostics(model, probe))
    return rec


def merge_json(name: str, run: dict[str, Any], quick: bool) -> None:
    path = OUT_JSON if not quick else CKPT_DIR / "quick" / OUT_JSON.name
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("what", "exploration (seed 0 only): does the ResCNet premise hold with a "
                   "longer schedule? Per-epoch log on 1,000 validation images drawn from the "
                   "Fashion-MNIST training split (the test split is never read)")  # fmt: skip
    doc["seed"] = SEED
    doc["recipe"] = RECIPE
    doc["torch"] = torch.__version__
    doc["threads"] = torch.get_num_threads()
    doc.setdefault("runs", {})[name] = run
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def train_run(name: str, quick: bool, stop_after: int | None = None) -> None:
    spec = dict(RUNS[name])
    recipe = dict(RECIPE)
    if quick:
        spec["epochs"] = 2
        recipe.update(n_train=256, n_val=128, warmup_epochs=1)
    x, y, vx, vy = load_data(recipe["n_train"], recipe["n_val"])
    model = make_model(spec)
    opt = sgd(model.parameters(), recipe["lr"], momentum=recipe["momentum"],
              weight_decay=recipe["weight_decay"], nesterov=recipe["nesterov"])  # fmt: skip
    per_epoch = steps_per_epoch(len(y), recipe["batch_size"])
    total, warmup = spec["epochs"] * per_epoch, recipe["warmup_epochs"] * per_epoch
    ckpt = CKPT_DIR / ("quick" if quick else "") / f"{name}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        init, log, start = state["init"], state["log"], state["epoch"]
        print(f"{name}: resumed after epoch {start}", flush=True)
    else:
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t0 = time.process_time()
        log = {
            "spec": {**spec, "widths": list(spec["widths"])},
            "params": sum(p.numel() for p in model.parameters()),
            "n_train": len(y),
            "n_val": len(vy),
            "epochs": [],
        }
        rec: dict[str, Any] = {"epoch": 0, "val_acc": accuracy(model, vx, vy)}
        if spec["calibrate"]:
            rec.update(premise_record(model, vx, init))
        rec["eval_cpu_seconds"] = time.process_time() - t0
        rec["cpu_seconds_total"] = rec["eval_cpu_seconds"]
        log["epochs"].append(rec)
        start = 0
    for epoch in range(start, spec["epochs"]):
        if stop_after is not None and epoch >= stop_after:
            print(f"{name}: stopped after epoch {epoch} (--stop-after)", flush=True)
            return
        aug_gen = generator(SEED, 4, epoch)  # the suite's streams: batches (3), augmentation (4)

        def before_step(i: int, epoch: int = epoch) -> None:
            set_lr(opt, cosine(recipe["lr"], epoch * per_epoch + i, total, warmup))

        stats = train_epoch(
            model,
            opt,
            x,
            y,
            batch_size=recipe["batch_size"],
            gen=generator(SEED, 3, epoch),
            augment=lambda xb, g=aug_gen: crop_flip(xb, 2, g),
            before_step=before_step,
        )
        t0 = time.process_time()
        rec = {
            "epoch": epoch + 1,
            "lr_end": opt.param_groups[0]["lr"],
            "train_loss": stats.loss,
            "train_acc": stats.train_acc,
            "val_acc": accuracy(model, vx, vy),
        }
        if spec["calibrate"]:
            rec.update(premise_record(model, vx, init))
        rec["train_cpu_seconds"] = stats.cpu_seconds
        rec["eval_cpu_seconds"] = time.process_time() - t0
        rec["cpu_seconds_total"] = (
            log["epochs"][-1]["cpu_seconds_total"] + stats.cpu_seconds + rec["eval_cpu_seconds"]
        )
        log["epochs"].append(rec)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                    "init": init, "log": log}, ckpt.with_suffix(".tmp"))  # fmt: skip
        os.replace(ckpt.with_suffix(".tmp"), ckpt)
        merge_json(name, log, quick)
        extra = ""
        if spec["calibrate"]:
            extra = (f" mu_spread {rec['mu_spread']:.2e} ls_spread {rec['log_sigma_spread']:.2e}"
                     f" |mu| {rec['mu_abs']:.3f} move_mu {rec['move_fc_mu']:.2f}")  # fmt: skip
        cpu = f"cpu {rec['train_cpu_seconds']:.1f}+{rec['eval_cpu_seconds']:.1f}s"
        line = f"{name} ep {epoch + 1:3d} loss {stats.loss:.4f} val {rec['val_acc']:.4f}"
        print(f"{line}{extra} {cpu}", flush=True)
    merge_json(name, log, quick)


def decay_only_ratio(epochs: int, per_epoch: int, recipe: dict[str, Any]) -> list[float]:
    """``||W_t|| / ||W_0||`` per epoch if the loss gradient were 0: SGD with momentum and
    weight decay on the run's lr schedule (the weights would only shrink)."""
    total, warmup = epochs * per_epoch, recipe["warmup_epochs"] * per_epoch
    w, buf, out = 1.0, 0.0, [1.0]
    for epoch in range(epochs):
        for i in range(per_epoch):
            lr = cosine(recipe["lr"], epoch * per_epoch + i, total, warmup)
            buf = recipe["momentum"] * buf + recipe["weight_decay"] * w
            w -= lr * buf
        out.append(w)
    return out


def gradient_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The loss gradient on the calibration MLP, averaged over the training set (train mode,
    the epoch-0 batches and augmentation, no step), against the weight-decay pull.

    ``grad_over_decay_<fc>``: ``||mean dL/dW|| / (wd ||W||)`` (mean over blocks); below 1 the
    weight decay outweighs the loss and the weights shrink. ``growth_over_decay``: the largest
    singular value of ``E[dL/dmu (s - mean s)^T]`` (the gradient on the product
    ``W_mu W_1`` that maps the per-image input to mu) over ``wd``, max over blocks: from a
    small initialisation the per-image part of mu can grow only where this exceeds 1
    (two-layer linear dynamics with decay: growth rate ~ sigma_max(G) - wd), and only if G
    is consistent: ``growth_noise_over_decay`` is the same norm of the difference of the
    two halves' sums (the sum's value if the gradient were pure batch noise).
    """
    from torch.nn import functional as F

    layers = [
        b.calibration for b in _blocks(model) if isinstance(b.calibration, ResponseCalibration)
    ]
    store: dict[int, dict[str, list[torch.Tensor]]] = {
        i: {"s": [], "mu": []} for i in range(len(layers))
    }
    handles = []
    for i, layer in enumerate(layers):

        def pre(_m, inp, i=i):
            store[i]["s"].append(inp[0].detach())

        def post(_m, _inp, out, i=i):
            out.retain_grad()
            store[i]["mu"].append(out)

        handles.append(layer.fc1.register_forward_pre_hook(pre))
        handles.append(layer.fc_mu.register_forward_hook(post))
    model.train()
    model.zero_grad(set_to_none=True)
    wd = RECIPE["weight_decay"]
    gen, aug = generator(SEED, 3, 0), generator(SEED, 4, 0)
    order = torch.randperm(len(y), generator=gen)
    gsum: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}  # 2 halves
    n_batches = 0
    try:
        for start in range(0, len(y), RECIPE["batch_size"]):
            idx = order[start : start + RECIPE["batch_size"]]
            xb = crop_flip(x[idx], 2, aug)
            loss = F.cross_entropy(model(xb), y[idx]) * len(idx) / len(y)  # full-set mean
            loss.backward()
            for i in range(len(layers)):
                s_b, mu_b = store[i]["s"].pop(), store[i]["mu"].pop()
                g = mu_b.grad.T @ (s_b - s_b.mean(0))  # (C, C)
                half = int(start >= len(y) // 2)
                if len(gsum[i]) <= half:
                    gsum[i].append(torch.zeros_like(g))
                gsum[i][half] += g
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    out: dict[str, float] = {}
    for fc in ("fc1", "fc_mu", "fc_logvar"):
        r = [float(getattr(m, fc).weight.grad.norm() / (wd * getattr(m, fc).weight.detach().norm()))
             for m in layers]  # fmt: skip
        out[f"grad_over_decay_{fc}"] = sum(r) / len(r)
    sv = torch.linalg.matrix_norm
    out["growth_over_decay"] = max(float(sv(a + b, 2)) / wd for a, b in gsum.values())
    # the same from the difference of the two halves' sums: what batch noise alone gives
    out["growth_noise_over_decay"] = max(float(sv(a - b, 2)) / wd for a, b in gsum.values())
    model.zero_grad(set_to_none=True)
    return out


def probe(quick: bool) -> None:
    """``gradient_probe`` at initialisation and at the end of every finished calibrated run."""
    recipe = dict(RECIPE)
    if quick:
        recipe.update(n_train=256, n_val=128)
    x, y, _, _ = load_data(recipe["n_train"], recipe["n_val"])
    path = OUT_JSON if not quick else CKPT_DIR / "quick" / OUT_JSON.name
    for name, spec in RUNS.items():
        ckpt = CKPT_DIR / ("quick" if quick else "") / f"{name}.pt"
        if not spec["calibrate"] or not ckpt.exists():
            continue
        state = torch.load(ckpt, weights_only=False)
        model = make_model(spec)
        res: dict[str, Any] = {"epoch": state["epoch"]}
        t0 = time.process_time()
        for when, weights in (("init", state["init"]), ("end", state["model"])):
            model.load_state_dict(weights)
            res[when] = gradient_probe(model, x, y)
        res["cpu_seconds"] = time.process_time() - t0
        per_epoch = steps_per_epoch(len(y), recipe["batch_size"])
        epochs = len(state["log"]["epochs"]) - 1
        log = state["log"]
        log["gradient_probe"] = res
        log["decay_only_norm_ratio"] = decay_only_ratio(epochs, per_epoch, recipe)
        doc = json.loads(path.read_text())
        log["epochs"] = doc["runs"][name]["epochs"]
        merge_json(name, log, quick)
        print(name, json.dumps(res), flush=True)


def first_crossing(curve: list[float], threshold: float) -> tuple[int | None, bool]:
    """First epoch at which the curve is >= threshold, and whether it stays there after."""
    for i, v in enumerate(curve):
        if v >= threshold:
            return i, all(w >= threshold for w in curve[i:])
    return None, False


def plot(quick: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = OUT_JSON if not quick else CKPT_DIR / "quick" / OUT_JSON.name
    doc = json.loads(path.read_text())
    runs = doc["runs"]
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(16, 4.2))
    colours = {"narrow-calibrate": "tab:blue", "wide-calibrate": "tab:green",
               "narrow-plain": "tab:gray"}  # fmt: skip
    for name, run in runs.items():
        ep = [r["epoch"] for r in run["epochs"]]
        c = colours.get(name)
        if run["spec"]["calibrate"]:
            a1.plot(ep, [r["mu_spread"] for r in run["epochs"]], color=c,
                    label=f"{name}: sd of mu")  # fmt: skip
            a1.plot(ep, [r["log_sigma_spread"] for r in run["epochs"]], color=c, linestyle="--",
                    label=f"{name}: sd of log sigma")  # fmt: skip
            n0 = run["epochs"][0]
            for fc, ls in (("fc1", "-"), ("fc_mu", "--")):
                a3.plot(ep, [r[f"norm_{fc}"] / n0[f"norm_{fc}"] for r in run["epochs"]],
                        color=c, linestyle=ls, label=f"{name}: ||{fc}.weight||")  # fmt: skip
            if "decay_only_norm_ratio" in run:
                a3.plot(range(len(run["decay_only_norm_ratio"])), run["decay_only_norm_ratio"],
                        color=c, linestyle=":", label=f"{name}: weight decay alone")  # fmt: skip
        a2.plot(ep[1:], [r["val_acc"] for r in run["epochs"][1:]], color=c, label=name)
    a1.axhline(SPREAD_THRESHOLD, color="tab:red", linestyle=":", label="premise threshold 0.05")
    a1.set_yscale("log")
    a1.set_xlabel("epoch (0 = initialisation)")
    a1.set_ylabel("spread across 1,000 validation images")
    a1.set_title("ResCNet premise: per-image statistics (seed 0)", fontsize=9)
    a1.legend(fontsize=7)
    a3.set_xlabel("epoch")
    a3.set_ylabel("weight norm / norm at initialisation (mean over blocks)")
    a3.set_title("calibration MLP weights vs pure weight decay (no loss gradient)", fontsize=9)
    a3.set_ylim(0, 1.05)
    a3.legend(fontsize=7)
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation accuracy (1,000 training-split images)")
    a2.set_title("validation accuracy (one seed: context only)", fontsize=9)
    a2.set_ylim(0.80, 0.95)
    a2.legend(fontsize=7)
    fig.tight_layout()
    out = OUT_PNG if not quick else CKPT_DIR / "quick" / OUT_PNG.name
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", choices=sorted(RUNS), action="append", default=[])
    ap.add_argument("--plot", action="store_true", help="(re)draw the figure from the JSON")
    ap.add_argument("--quick", action="store_true", help="2 epochs on 256 images (smoke run)")
    ap.add_argument(
        "--stop-after", type=int, default=None, help="stop after this epoch (to test resuming)"
    )
    ap.add_argument("--probe", action="store_true", help="gradient vs weight decay, after runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.run:
        train_run(name, args.quick, args.stop_after)
    if args.probe:
        probe(args.quick)
    if args.plot or args.run:
        plot(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

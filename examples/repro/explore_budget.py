"""Exploration (validation only): which compression-budget design should ``CoherentStrongReg``
implement for ``target_sparsity=``?

Every design must end training with exactly the requested share of exact zeros (+-1 %) in the
regularised weights (conv/linear weights, not biases) and keep that zero pattern. Compared on
Fashion-MNIST *training* images only (per seed, disjoint train and validation subsets drawn
from the 60,000 training images; the test split is never read), seeds 0 and 1:

* ``dense``: no pruning (reference; its weights give the survivors' shrinkage metric).
* ``gmp-layer`` / ``gmp-global``: gradual magnitude pruning (Zhu & Gupta 2017) built on
  ``torch.nn.utils.prune`` (``l1_unstructured`` per layer / ``global_unstructured``), the
  cubic schedule of ``torch.ao.pruning.CubicSL.sparsity_compute_fn`` on optimizer steps, then
  fine-tuning with the mask fixed. Its start/end are chosen once on validation (stage
  ``tune``).

The budget prototypes use only what the library sees (no total_steps): the progress
``p = clamp((1 - lr/peak_lr) / 0.9, 0, 1)`` (1 at the freeze, lr < 0.1 peak), the target
``s(p) = s_f (1 - (1 - q)^3)`` with ``q = clamp((p - p0) / (1 - p0), 0, 1)``; at ``p = 1`` a
magnitude top-up to exactly ``s_f`` (the ``round(s_f n)`` smallest |w| become a fixed zero
mask, re-applied after every optimizer step):

* ``prox-ctrl``: proximal L1 after every step, ``w <- sign(w) max(|w| - lr lam, 0)``, with
  ``lam`` steered by a log-space PI controller so that the exact-zero share tracks ``s(p)``.
* ``hard-ctrl`` (ablation of prox-ctrl): the same controller and the same zeroing rule
  (``|w| <= lr lam`` becomes 0) but the survivors are not shrunk.
* ``sel-hard``: after every step the ``floor(s(p) n)`` smallest |w| are set to zero; they may
  regrow (no mask until the freeze); survivors are never shrunk.
* ``sel-decay``: the same candidates are shrunk, ``w <- (1 - gamma) w`` (gamma = 0.1 per step);
  survivors are never shrunk; exact zeros come from the top-up.
* ``mag-lr``: gradual magnitude pruning on the library's clock: every ``dt`` steps the zero
  mask grows (never shrinks) to ``round(s(p) n)``; i.e. GMP without ``total_steps``.
* ``prox-topup``: the library's ``CoherentStrongReg(strength=lam)`` with its defaults (descent
  gate, automatic warm-up, freeze at lr < 0.1 peak) + a global magnitude top-up at its freeze
  (the naive design), three strengths.

``-layer``: every regularised tensor gets ``s_f`` (one controller/quantile per tensor);
``-global``: one share over all of them.

Run: ``PYTHONPATH=. python examples/repro/explore_budget.py --out
docs/results/explore/budget-designs.jsonl`` (``--quick`` for a smoke run). One process, one
thread; each finished run is appended to the JSONL at once, and a rerun skips the finished
``(stage, design, model, level, seed)`` keys. ``--report`` only rewrites the summary
(``<out>.md``, tables generated from the JSONL).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import CubicSL
from torch.nn.utils import prune

from torch_recal import CoherentStrongReg

TRAIN_IMAGES = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
SCRIPT = "examples/repro/explore_budget.py"

MODELS = {  # name: (n_train, epochs, batch)
    "mlp5": (10_000, 15, 128),
    "cnn": (5_000, 15, 128),
    "mlp2w": (10_000, 8, 64),  # the held-out setting of the report: MLP 784-512-512-10
}
N_VAL = 2_000
LR, MOMENTUM = 0.05, 0.9
LEVELS = (0.8, 0.9, 0.9667, 0.98)
SEEDS = (0, 1)
FREEZE = 0.1  # the library's freeze_below
PROX_STRENGTHS = (3e-3, 1e-2, 3e-2)
GMP_TUNE = ((1, 0.5), (1, 0.75), (2, 0.75))  # (start epoch, end as a fraction of the steps)
GMP_TUNE_LEVELS = (0.9, 0.9667)
GMP_PRUNES_PER_EPOCH = 10
SEL_DECAY_GAMMA = 0.1
CTRL_KI, CTRL_KP, CTRL_LAM0 = 1.0, 4.0, 1e-4  # prox-ctrl: log-space PI gains, initial lambda

# designs run at SHORT_LEVELS only (the prox-topup runs differ only in the top-up; sel-decay is a
# variant of sel-hard; hard-ctrl is an ablation)
SHORT_DESIGNS = ("prox-topup", "sel-decay", "hard-ctrl")
SHORT_LEVELS = (0.9, 0.9667)

BASE_DESIGNS = [
    "gmp-layer", "gmp-global",
    "prox-ctrl-layer", "prox-ctrl-global", "hard-ctrl-global",
    "sel-hard-layer", "sel-hard-global",
    "sel-decay-layer", "sel-decay-global",
    "mag-lr-layer", "mag-lr-global",
] + [f"prox-topup-{s:g}" for s in PROX_STRENGTHS]  # fmt: skip


# --------------------------------------------------------------------------- data
_TRAIN: tuple[torch.Tensor, torch.Tensor] | None = None


def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 60,000 Fashion-MNIST training images (normalised as examples/data.py) and labels."""
    global _TRAIN
    if _TRAIN is None:
        from examples.data import read_fashion_split  # reads only the two training IDX files

        _TRAIN = read_fashion_split(os.path.dirname(TRAIN_IMAGES), "train")
    return _TRAIN


def gen(*key: int) -> torch.Generator:
    value = 0
    for k in key:
        value = (value * 1_000_003 + int(k)) % (2**62)
    return torch.Generator().manual_seed(value)


def subsets(seed: int, n_train: int, n_val: int) -> tuple[torch.Tensor, ...]:
    x, y = train_split()
    perm = torch.randperm(len(y), generator=gen(seed, 1))
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    return x[tr], y[tr], x[va], y[va]


# --------------------------------------------------------------------------- models
def make_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(gen(seed, 0, list(MODELS).index(name)).initial_seed())
    if name in ("mlp5", "mlp2w"):
        widths = [256] * 5 if name == "mlp5" else [512, 512]
        layers: list[nn.Module] = [nn.Flatten()]
        w = 784
        for h in widths:
            layers += [nn.Linear(w, h), nn.ReLU()]
            w = h
        return nn.Sequential(*layers, nn.Linear(w, 10))
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
                  for i in range(0, len(y), 1000))  # fmt: skip
    model.train()
    return correct / len(y)


def cosine(t: int, total: int) -> float:
    return 0.5 * LR * (1.0 + math.cos(math.pi * min(t / total, 1.0)))


# --------------------------------------------------------------------------- helpers
def smallest_mask(ws: list[torch.Tensor], share: float, global_: bool) -> list[torch.Tensor]:
    """Boolean keep-masks: the round(share n) smallest |w| (per tensor, or over all) are False."""
    if global_:
        flat = torch.cat([w.detach().abs().flatten() for w in ws])
        k = round(share * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k > 0:
            keep[torch.topk(flat, k, largest=False).indices] = False
        out, i = [], 0
        for w in ws:
            out.append(keep[i : i + w.numel()].view_as(w))
            i += w.numel()
        return out
    out = []
    for w in ws:
        flat = w.detach().abs().flatten()
        k = round(share * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k > 0:
            keep[torch.topk(flat, k, largest=False).indices] = False
        out.append(keep.view_as(w))
    return out


def kth_threshold(flat: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(flat, k).values) if k > 0 else -1.0


def zeros(ws: list[torch.Tensor]) -> tuple[int, int]:
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


class Budget:
    """The library-clock prototypes: ``after_step(lr)`` after every optimizer step."""

    def __init__(self, ws: list[torch.Tensor], s_f: float, mode: str, global_: bool,
                 p0: float = 0.0, dt: int = 1) -> None:  # fmt: skip
        self.ws, self.s_f, self.mode, self.global_, self.p0, self.dt = (
            ws,
            s_f,
            mode,
            global_,
            p0,
            dt,
        )
        self.peak = 0.0
        self.t = 0
        self.keep: list[torch.Tensor] | None = None  # the frozen mask
        self.pmask: list[torch.Tensor] | None = None  # mag-lr's growing mask
        n_ctrl = 1 if global_ else len(ws)
        self.loglam = [math.log(CTRL_LAM0)] * n_ctrl
        self.track: list[float] = []  # |s - s(p)| per step before the freeze
        self.frozen_at: int | None = None
        self.pre_topup: float | None = None
        self.lam_log: list[tuple[int, float]] = []
        self.last_share = 0.0  # exact-zero share left by the previous after_step

    def target(self, p: float) -> float:
        q = min(max((p - self.p0) / (1.0 - self.p0), 0.0), 1.0)
        return self.s_f * (1.0 - (1.0 - q) ** 3)

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        self.t += 1
        self.peak = max(self.peak, lr)
        if self.keep is not None:
            for w, k in zip(self.ws, self.keep, strict=False):
                w.mul_(k)
            return
        p = min(max((1.0 - lr / self.peak) / (1.0 - FREEZE), 0.0), 1.0)
        if p >= 1.0:  # the freeze: top up to exactly s_f by magnitude, fix the zero mask
            self.pre_topup = self.last_share
            self.keep = smallest_mask(self.ws, self.s_f, self.global_)
            self.frozen_at = self.t
            for w, k in zip(self.ws, self.keep, strict=False):
                w.mul_(k)
            return
        s = self.target(p)
        getattr(self, "_" + self.mode.replace("-", "_"))(lr, s)
        z, n = zeros(self.ws)
        self.last_share = z / n
        self.track.append(abs(z / n - s))

    def _groups(self) -> list[list[torch.Tensor]]:
        return [self.ws] if self.global_ else [[w] for w in self.ws]

    def _hard_ctrl(self, lr: float, s: float) -> None:
        self._prox_ctrl(lr, s, hard=True)

    def _prox_ctrl(self, lr: float, s: float, hard: bool = False) -> None:
        for i, grp in enumerate(self._groups()):
            z, n = zeros(grp)
            err = (s - z / n) / self.s_f
            lam = math.exp(self.loglam[i] + CTRL_KP * err)
            for w in grp:
                if hard:  # the ablation: the same zeroing rule, survivors left as they are
                    w.masked_fill_(w.abs() <= lr * lam, 0.0)
                else:
                    w.copy_(w.sign() * (w.abs() - lr * lam).clamp_min_(0.0))
            z, n = zeros(grp)
            err = (s - z / n) / self.s_f
            self.loglam[i] = min(
                max(self.loglam[i] + CTRL_KI * err, math.log(1e-6)), math.log(10.0)
            )
        if self.t % 50 == 0:
            self.lam_log.append((self.t, math.exp(self.loglam[0])))

    def _candidates(self, s: float) -> list[torch.Tensor]:
        """Per tensor, a boolean mask of the weights at or below the s-quantile of |w|."""
        out = []
        for grp in self._groups():
            flat = torch.cat([w.abs().flatten() for w in grp])
            tau = kth_threshold(flat, math.floor(s * flat.numel()))
            out += [w.abs() <= tau for w in grp]
        return out

    def _sel_hard(self, lr: float, s: float) -> None:
        for w, c in zip(self.ws, self._candidates(s), strict=False):
            w.masked_fill_(c, 0.0)

    def _sel_decay(self, lr: float, s: float) -> None:
        for w, c in zip(self.ws, self._candidates(s), strict=False):
            w.mul_(torch.where(c, 1.0 - SEL_DECAY_GAMMA, 1.0))

    def _mag_lr(self, lr: float, s: float) -> None:
        if self.pmask is None:
            self.pmask = [torch.ones_like(w, dtype=torch.bool) for w in self.ws]
        if (self.t - 1) % self.dt == 0:
            # grow the mask: the smallest |w| among the kept ones (pruned ones are exact zeros,
            # so ranking all |w| ranks the pruned ones first)
            new = smallest_mask(self.ws, s, self.global_)
            self.pmask = [a & b for a, b in zip(self.pmask, new, strict=False)]
        for w, k in zip(self.ws, self.pmask, strict=False):
            w.mul_(k)


# --------------------------------------------------------------------------- one run
def gmp_params(stage: str, design: str, spe: int, total: int, gmp_cfg: tuple[int, float]):
    start_ep, end_frac = gmp_cfg
    t0 = start_ep * spe
    dt = max(1, round(spe / GMP_PRUNES_PER_EPOCH))
    n = max(1, round((end_frac * total - t0) / dt))
    return t0, dt, n


@torch.no_grad()
def gmp_update(mods: list[nn.Module], s_t: float, global_: bool) -> None:
    ws = [m.weight for m in mods]
    if global_:
        z, n = zeros(ws)
        k = round(s_t * n) - z
        if k > 0:
            prune.global_unstructured([(m, "weight") for m in mods],
                                      pruning_method=prune.L1Unstructured, amount=k)  # fmt: skip
        return
    for m, w in zip(mods, ws, strict=False):
        k = round(s_t * w.numel()) - int((w == 0).sum())
        if k > 0:
            prune.l1_unstructured(m, "weight", amount=k)


def one_run(model_name: str, design: str, level: float, seed: int, quick: bool,
            gmp_cfg: tuple[int, float], p0: float, cache: Path) -> dict[str, Any]:  # fmt: skip
    n_train, epochs, batch = MODELS[model_name]
    if quick:
        n_train, epochs = 2048, 2
    n_val = 512 if quick else N_VAL
    x, y, vx, vy = subsets(seed, n_train, n_val)
    torch.set_flush_denormal(True)
    model = make_model(model_name, seed)
    mods = [m for _, m in weight_modules(model)]
    names = [n for n, _ in weight_modules(model)]
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    spe = math.ceil(n_train / batch)
    total = epochs * spe
    global_ = design.endswith("-global")
    budget, reg, gmp, topup_keep = None, None, None, None
    extra: dict[str, Any] = {}
    if design.startswith("gmp"):
        gmp = gmp_params("", design, spe, total, gmp_cfg)
        extra["gmp"] = {"start_epoch": gmp_cfg[0], "end_frac": gmp_cfg[1], "t0": gmp[0],
                        "dt": gmp[1], "n": gmp[2], "end_step": gmp[0] + gmp[1] * gmp[2]}  # fmt: skip  # noqa: E501
    elif design.startswith("prox-topup"):
        strength = float(design.rsplit("-", 1)[1])
        reg = CoherentStrongReg(model.named_parameters(), strength=strength, optimizer=opt,
                                history_size=0)  # fmt: skip
        reg.attach()
    elif design != "dense":
        mode = design.rsplit("-", 1)[0]
        budget = Budget([m.weight for m in mods], level, mode, global_, p0=p0,
                        dt=max(1, round(spe / GMP_PRUNES_PER_EPOCH)))  # fmt: skip
    traj: list[tuple[float, float]] = []
    t = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for e in range(epochs):
        g = gen(seed, 3, e)
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            lr = cosine(t, total)
            for grp in opt.param_groups:
                grp["lr"] = lr
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t += 1
            if budget is not None:
                budget.after_step(lr)
            elif gmp is not None:
                t0, dt, n = gmp
                if t0 <= t <= t0 + n * dt and (t - t0) % dt == 0:
                    s_t = CubicSL.sparsity_compute_fn(0.0, level, t, t0, dt, n, True)
                    gmp_update(mods, s_t, global_)
            elif reg is not None and reg.frozen:
                ws = [m.weight for m in mods]
                with torch.no_grad():
                    if topup_keep is None:
                        z, nn_ = zeros(ws)
                        extra["pre_topup"] = z / nn_
                        extra["frozen_at"] = t
                        topup_keep = smallest_mask(ws, level, True)
                    for w, k in zip(ws, topup_keep, strict=False):
                        w.mul_(k)
            if t % max(1, total // 20) == 0:
                z, n = zeros([m.weight for m in mods])
                traj.append((round(t / total, 3), round(z / n, 4)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if gmp is not None:
        for m in mods:
            if prune.is_pruned(m):
                prune.remove(m, "weight")
    if reg is not None:
        extra["strength"] = float(design.rsplit("-", 1)[1])
        if topup_keep is None:
            extra["pre_topup"] = None  # never froze
    if budget is not None:
        extra["pre_topup"] = budget.pre_topup
        extra["frozen_at"] = budget.frozen_at
        extra["tracking_mae"] = sum(budget.track) / max(len(budget.track), 1)
        if budget.lam_log:
            extra["lambda_log"] = budget.lam_log[:: max(1, len(budget.lam_log) // 10)]
    ws = [m.weight.detach() for m in mods]
    z, n = zeros(ws)
    out: dict[str, Any] = {
        "val_acc": accuracy(model, vx, vy),
        "train_acc": accuracy(model, x, y),
        "sparsity": z / n,
        "layer_sparsity": {
            nm: round(float((w == 0).float().mean()), 5) for nm, w in zip(names, ws, strict=False)
        },
        "n_weights": n,
        "total_steps": total,
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "trajectory": traj,
        **extra,
    }
    dense_path = cache / f"dense-{model_name}-{seed}{'-quick' if quick else ''}.pt"
    if design == "dense":
        torch.save([w.abs().flatten().sort(descending=True).values for w in ws], dense_path)
    elif dense_path.exists():
        dense = torch.load(dense_path)
        num, den, per = 0.0, 0.0, {}
        for nm, w, d in zip(names, ws, dense, strict=False):
            surv = w.abs()[w != 0]
            m = surv.numel()
            if m == 0:
                per[nm] = None
                continue
            a, b = float(surv.sum()), float(d[:m].sum())
            num, den = num + a, den + b
            per[nm] = round(a / b, 4)
        out["survivor_ratio"] = (
            num / den if den else None
        )  # mean |w| of survivors / dense same rank
        out["survivor_ratio_layer"] = per
    return out


# --------------------------------------------------------------------------- driver
def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(r: dict[str, Any]) -> tuple:
    return (r["stage"], r["design"], r["model"], r["level"], r["seed"])


def plan(args) -> list[tuple[str, str, str, float, int]]:
    seeds = [0] if args.quick else args.seeds
    levels = [0.9] if args.quick else args.levels
    out = []
    if not args.quick:
        for model in ("mlp5", "cnn"):
            if model not in args.models:
                continue
            for seed in seeds:
                out.append(("tune", "dense", model, 0.0, seed))
                for cfg in GMP_TUNE:
                    for lv in GMP_TUNE_LEVELS:
                        out.append(("tune", f"gmp-layer@{cfg[0]}-{cfg[1]}", model, lv, seed))
    for model in args.models:
        for seed in seeds:
            out.append(("main", "dense", model, 0.0, seed))
    for lv in levels:  # level-major over the models: 0.9 (the key level) finishes first
        for model in args.models:
            for seed in seeds:
                for d in args.designs:
                    if lv in SHORT_LEVELS or not d.startswith(SHORT_DESIGNS) or args.quick:
                        out.append(("main", d, model, lv, seed))
    return out


def chosen_gmp(rows: list[dict[str, Any]]) -> tuple[int, float]:
    """The GMP (start epoch, end fraction) with the best mean validation accuracy over the
    tune stage (all models, levels and seeds); the first of GMP_TUNE when none ran."""
    best, best_acc = GMP_TUNE[1], -1.0
    for cfg in GMP_TUNE:
        accs = [r["val_acc"] for r in rows
                if r["stage"] == "tune" and r["design"] == f"gmp-layer@{cfg[0]}-{cfg[1]}"]  # fmt: skip  # noqa: E501
        if accs and len(accs) == max(1, len(accs)) and sum(accs) / len(accs) > best_acc:
            best, best_acc = cfg, sum(accs) / len(accs)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rewrite the summary")
    ap.add_argument("--models", nargs="+", default=["mlp5", "cnn"])
    ap.add_argument("--designs", nargs="+", default=BASE_DESIGNS)
    ap.add_argument("--levels", nargs="+", type=float, default=[0.9, 0.9667, 0.8, 0.98])
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--p0", type=float, default=0.0, help="ramp start in progress units")
    ap.add_argument("--tag", default="", help="suffix of the design names (variants)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/explore-budget-cache"))
    args = ap.parse_args()
    if any(s >= 100 for s in args.seeds):
        sys.exit("seeds >= 100 are reserved for the confirmation stage")
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        rows = load(args.out)
        done = {key(r) for r in rows}
        todo = plan(args)
        print(
            f"{len(todo)} runs planned, {sum(k in done for k in [(a, b + (args.tag if b != 'dense' and a == 'main' else ''), c, d, e) for a, b, c, d, e in todo])} done",  # noqa: E501
            flush=True,
        )
        for stage, design, model, level, seed in todo:
            name = design + (args.tag if design != "dense" and stage == "main" else "")
            k = (stage, name, model, level, seed)
            if k in done:
                continue
            if stage == "main" and design.startswith("gmp"):
                cfg = chosen_gmp(load(args.out)) if not args.quick else GMP_TUNE[1]
            elif stage == "tune" and design.startswith("gmp"):
                a, b = design.split("@")[1].split("-")
                cfg = (int(a), float(b))
            else:
                cfg = GMP_TUNE[1]
            res = one_run(model, design.split("@")[0], level, seed, args.quick, cfg, args.p0,
                          args.cache)  # fmt: skip
            rec = {"stage": stage, "design": name, "model": model, "level": level, "seed": seed,
                   "p0": args.p0 if budget_design(design) else None, "quick": args.quick,
                   **res}  # fmt: skip
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            done.add(k)
            print(f"{stage} {name} {model} {level} s{seed}: val {res['val_acc']:.4f} "
                  f"sparsity {res['sparsity']:.4f} surv {res.get('survivor_ratio')} "
                  f"cpu {res['cpu_s']:.1f}s", flush=True)  # fmt: skip
    report(args.out)


def budget_design(design: str) -> bool:
    return design.split("-")[0] in ("prox", "sel", "mag", "hard") and not design.startswith(
        "prox-topup"
    )


# --------------------------------------------------------------------------- summary
def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def _f(v: float | None, fmt: str = ".4f", sign: bool = False) -> str:
    if v is None:
        return "-"
    return format(v, ("+" if sign else "") + fmt)


def report(out: Path) -> None:
    rows = load(out)
    if not rows:
        return
    quick = rows[0].get("quick", False)
    cmd = f"PYTHONPATH=. python {SCRIPT} --out {out}" + (" --quick" if quick else "")
    by = {key(r): r for r in rows}
    lines = [
        "# Compression budget for CoherentStrongReg: exploration (validation only)",
        "",
        f"Generated by `{cmd} --report` from `{out.name}` ({len(rows)} runs). "
        "Fashion-MNIST training images only (the test split is never read); per seed disjoint "
        "train/validation subsets; seeds 0 and 1; accuracies are validation accuracies "
        f"({N_VAL if not quick else 512} images). Sparsity = share of exact zeros over the "
        "conv/linear weights. See the script's docstring for the designs.",
        "",
    ]
    tune = [r for r in rows if r["stage"] == "tune"]
    if tune:
        cfg = chosen_gmp(rows)
        lines += ["## GMP schedule, chosen once on validation", "",
                  f"Command: `{cmd}` (stage `tune`). gmp-layer at levels "
                  f"{', '.join(map(str, GMP_TUNE_LEVELS))} on mlp5 and cnn, seeds 0 and 1; "
                  f"pruning every ~1/{GMP_PRUNES_PER_EPOCH} epoch.", "",
                  "| start epoch | end (share of steps) | " + " | ".join(
                      f"{m} {lv}" for m in ("mlp5", "cnn") for lv in GMP_TUNE_LEVELS)
                  + " | mean |", "|---|---|" + "---|" * (2 * len(GMP_TUNE_LEVELS) + 1)]  # fmt: skip
        for c in GMP_TUNE:
            cells, allv = [], []
            for m in ("mlp5", "cnn"):
                for lv in GMP_TUNE_LEVELS:
                    v = [by[k]["val_acc"] for s in SEEDS
                         if (k := ("tune", f"gmp-layer@{c[0]}-{c[1]}", m, lv, s)) in by]  # fmt: skip  # noqa: E501
                    allv += v
                    cells.append(_f(_mean(v)))
            lines.append(f"| {c[0]} | {c[1]} | " + " | ".join(cells) + f" | {_f(_mean(allv))} |")
        lines += ["", f"Chosen: start epoch {cfg[0]}, end at {cfg[1]} of the steps.", ""]
    main_rows = [r for r in rows if r["stage"] == "main"]
    models = [m for m in MODELS if any(r["model"] == m for r in main_rows)]
    designs = sorted({r["design"] for r in main_rows if r["design"] != "dense"},
                     key=lambda d: (BASE_DESIGNS.index(d) if d in BASE_DESIGNS else 99, d))  # fmt: skip  # noqa: E501
    seeds = sorted({r["seed"] for r in main_rows})
    for m in models:
        levels = sorted({r["level"] for r in main_rows if r["model"] == m and r["level"] > 0})
        dense = [by[k] for s in seeds if (k := ("main", "dense", m, 0.0, s)) in by]
        lines += [f"## {m}", "",
                  f"Command: `{cmd} --models {m}`; dense validation accuracy "
                  + ", ".join(f"seed {r['seed']} {r['val_acc']:.4f}" for r in dense)
                  + f" (mean {_f(_mean([r['val_acc'] for r in dense]))}).", "",
                  "Per level: mean validation accuracy over the seeds; paired difference vs GMP "
                  "with the same allocation (`-layer` designs vs gmp-layer, `-global` and "
                  "prox-topup vs gmp-global) per seed and its mean; reached sparsity (mean); "
                  "survivors' mean |w| / the dense run's same-rank weights (mean).", ""]  # fmt: skip  # noqa: E501
        for lv in levels:
            lines += [f"### {m}, target sparsity {lv} ({1 / (1 - lv):.0f}x)", "",
                      "| design | val acc | diff vs GMP per seed | mean diff | sparsity | "
                      "pre-top-up | survivors/dense | train acc | CPU s |",
                      "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for d in designs:
                rs = [by[k] for s in seeds if (k := ("main", d, m, lv, s)) in by]
                if not rs:
                    continue
                ref = "gmp-layer" if d.endswith("-layer") or "-layer" in d else "gmp-global"
                diffs = []
                for r in rs:
                    g = by.get(("main", ref, m, lv, r["seed"]))
                    diffs.append(r["val_acc"] - g["val_acc"] if g and d != ref else None)
                dd = [v for v in diffs if v is not None]
                sp = [r["sparsity"] for r in rs]
                ok = all(abs(s - lv) <= 0.01 for s in sp)
                pre = [r["pre_topup"] for r in rs if r.get("pre_topup") is not None]
                sv = [r["survivor_ratio"] for r in rs if r.get("survivor_ratio") is not None]
                lines.append(
                    f"| {d} | {_f(_mean([r['val_acc'] for r in rs]))} | "
                    + (" / ".join(_f(v, '.4f', True) for v in diffs) if dd else "(ref)")
                    + f" | {_f(_mean(dd), '.4f', True) if dd else '-'} | {_f(_mean(sp))}"
                    + ("" if ok else " (off budget)")
                    + f" | {_f(_mean(pre), '.3f')} | {_f(_mean(sv), '.3f')} | "
                    f"{_f(_mean([r['train_acc'] for r in rs]))} | "
                    f"{_f(_mean([r['cpu_s'] for r in rs]), '.1f')} |")  # fmt: skip
            lines.append("")
    # compact key table: mean val acc (mean paired diff vs GMP of the same allocation)
    if main_rows:
        cols = [
            (m, lv)
            for m in models
            for lv in sorted({r["level"] for r in main_rows if r["model"] == m and r["level"] > 0})
        ]
        lines += ["## Key table", "",
                  f"Command: `{cmd}`. Cell: mean validation accuracy over seeds "
                  f"{', '.join(map(str, seeds))} (mean paired difference vs GMP with the same "
                  "allocation, in points); `*` = some run off the +-1 % budget.", "",
                  "| design | " + " | ".join(f"{m} {lv}" for m, lv in cols) + " |",
                  "|---|" + "---|" * len(cols)]  # fmt: skip
        for d in designs:
            cells = []
            ref = "gmp-layer" if "-layer" in d else "gmp-global"
            for m, lv in cols:
                rs = [by[k] for s in seeds if (k := ("main", d, m, lv, s)) in by]
                if not rs:
                    cells.append("")
                    continue
                acc = _mean([r["val_acc"] for r in rs])
                dd = [r["val_acc"] - by[("main", ref, m, lv, r["seed"])]["val_acc"] for r in rs
                      if ("main", ref, m, lv, r["seed"]) in by and d != ref]  # fmt: skip
                star = "" if all(abs(r["sparsity"] - lv) <= 0.01 for r in rs) else "*"
                cells.append(f"{acc:.4f}" + (f" ({100 * _mean(dd):+.2f})" if dd else "") + star)
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    # summary over levels
    if main_rows:
        lines += ["## Mean paired difference vs GMP over all levels and seeds", "",
                  "| design | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]  # fmt: skip  # noqa: E501
        for d in designs:
            cells = []
            for m in models:
                ref = "gmp-layer" if "-layer" in d else "gmp-global"
                v = [by[k]["val_acc"] - by[("main", ref, m, r_lv, s)]["val_acc"]
                     for (st, dn, mm, r_lv, s) in by if st == "main" and dn == d and mm == m
                     and (k := (st, dn, mm, r_lv, s)) and ("main", ref, m, r_lv, s) in by
                     and d != ref]  # fmt: skip
                cells.append(f"{_f(_mean(v), '.4f', True)} (n={len(v)})" if v else "-")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
        # per-layer sparsity of the allocation at the highest level
        for m in models:
            top = max(r["level"] for r in main_rows if r["model"] == m)
            lines += [f"### Per-layer sparsity, {m} at {top} (seed 0)", "",
                      "| design | " + " | ".join(next(iter(r["layer_sparsity"] for r in main_rows
                                                        if r["model"] == m))) + " |"]  # fmt: skip
            lines.append(
                "|---|"
                + "---|" * len(next(r["layer_sparsity"] for r in main_rows if r["model"] == m))
            )
            for d in ["gmp-global", "sel-hard-global", "mag-lr-global", "prox-ctrl-global",
                      "prox-topup-0.01"]:  # fmt: skip
                r = by.get(("main", d, m, top, 0))
                if r:
                    lines.append(
                        f"| {d} | "
                        + " | ".join(f"{v:.3f}" for v in r["layer_sparsity"].values())
                        + " |"
                    )
            lines.append("")
    cpu = sum(r["cpu_s"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    lines += ["## Compute", "",
              f"{len(rows)} runs; training CPU time {cpu / 60:.1f} CPU-min, training wall time "
              f"{wall / 60:.1f} min (one process, one thread; the evaluation passes are not "
              f"counted). Machine: {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}.", ""]  # fmt: skip
    md = out.with_suffix(".md")
    # a hand-written findings block (between the markers) survives the regeneration
    a, b = "<!-- findings -->", "<!-- /findings -->"
    old = md.read_text() if md.exists() else ""
    if a in old and b in old:
        block = old[old.index(a) : old.index(b) + len(b)]
        lines[4:4] = [block, ""]
    md.write_text("\n".join(lines))


if __name__ == "__main__":
    main()

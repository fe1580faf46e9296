"""Sizing of the GGR protocol's base recipe and refinement length (explore stage only).

Run before ``python examples/reproduce.py ggr`` to choose, on the validation split (the test
split is locked: this script runs in the explore stage), the settings that the protocol
(``examples/repro/ggr.py``) then fixes:

* ``base``: for each candidate (training-subset size, epochs) of the base recipe (SGD, cosine
  to 0, no augmentation), per seed: training accuracy (eval mode), validation accuracy, the
  gap, CPU seconds. Rule: among the candidates whose training accuracy is >= 0.99 on every
  seed (the premise), the best mean validation accuracy.
* ``refine``: from the protocol's base (its current ``N_TRAIN`` / ``BASE``), CE and CE + GGR
  at a few weights for each candidate refinement length (epochs), per seed: validation
  accuracy and conv1 filter variance; the decoder's reconstruction loss per epoch. Rule: the
  shorter length unless the longer one raises the best GGR weight's mean validation accuracy
  over CE by at least 0.1 point more.

    PYTHONPATH=. python examples/repro/ggr_sizing.py base --seeds 0,1
    PYTHONPATH=. python examples/repro/ggr_sizing.py refine --seeds 0,1

Each part prints a table and writes ``outputs/repro/explore/ggr-sizing-<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/: repro, ggr, data
sys.path.insert(0, str(HERE.parent.parent))  # this checkout's torch_recal

from repro import ggr
from repro.train import accuracy, current_stage, fashion_subsets, steps_per_epoch
from torch_recal import GenerativeGradientLoss, first_layer_filter_stats

N_VAL = 5_000


def _base(seeds: list[int], candidates: list[tuple[int, int]], data_dir: str | None) -> dict:
    rows = []
    for seed in seeds:
        for n_train, epochs in candidates:
            x, y, vx, vy, _, _ = fashion_subsets(data_dir, seed, n_train, N_VAL, 0)
            cfg = {**ggr.BASE, "epochs": epochs}
            t0 = time.process_time()
            model, _ = ggr.train_base(seed, x, y, cfg)
            row = {
                "seed": seed,
                "n_train": n_train,
                "epochs": epochs,
                "train_acc": accuracy(model, x, y),
                "val_acc": accuracy(model, vx, vy),
                "cpu_seconds": time.process_time() - t0,
            }
            row["gap_points"] = (row["train_acc"] - row["val_acc"]) * 100
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = []
    for n_train, epochs in candidates:
        mine = [r for r in rows if (r["n_train"], r["epochs"]) == (n_train, epochs)]
        summary.append({
            "n_train": n_train,
            "epochs": epochs,
            "min_train_acc": min(r["train_acc"] for r in mine),
            "mean_val_acc": sum(r["val_acc"] for r in mine) / len(mine),
            "mean_gap_points": sum(r["gap_points"] for r in mine) / len(mine),
            "mean_cpu_seconds": sum(r["cpu_seconds"] for r in mine) / len(mine),
        })  # fmt: skip
    ok = [s for s in summary if s["min_train_acc"] >= ggr.TRAIN_ACC_MIN]
    chosen = max(ok, key=lambda s: s["mean_val_acc"]) if ok else None
    print("| n_train | epochs | min train acc | mean val acc | mean gap (points) | CPU s |")
    for s in summary:
        print(f"| {s['n_train']} | {s['epochs']} | {s['min_train_acc']:.4f} | "
              f"{s['mean_val_acc']:.4f} | {s['mean_gap_points']:.2f} | "
              f"{s['mean_cpu_seconds']:.0f} |")  # fmt: skip
    print("chosen:", chosen)
    return {"rows": rows, "summary": summary, "chosen": chosen}


def _refine(
    seeds: list[int], lengths: list[int], weights: list[float], data_dir: str | None
) -> dict:
    rows = []
    for seed in seeds:
        x, y, vx, vy, _, _ = fashion_subsets(data_dir, seed, ggr.N_TRAIN, N_VAL, 0)
        base, _ = ggr.train_base(seed, x, y, ggr.BASE)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        decoder, history, decoder_cpu = ggr.fit_decoder(seed, base, x, y, ggr.DECODER)
        rows.append({"seed": seed, "arm": "base", "val_acc": accuracy(base, vx, vy),
                     "train_acc": accuracy(base, x, y), "decoder_loss": history,
                     "decoder_cpu_seconds": decoder_cpu})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        for length in lengths:
            for w in [0.0, *weights]:
                model = ggr.SmallCNN()
                model.load_state_dict(state)
                cfg = {**ggr.REFINE, "epochs": length}
                total = length * steps_per_epoch(len(y), cfg["batch_size"])
                loss_fn = None
                if w > 0:
                    term = GenerativeGradientLoss(model.conv1.weight, decoder, weight=w)
                    loss_fn = ggr.ggr_loss(term)
                out = ggr.sgd_run(model, x, y, cfg, total, (seed, 8), loss_fn)
                rows.append({
                    "seed": seed,
                    "arm": "ce" if w == 0 else ggr.wname(w),
                    "epochs": length,
                    "val_acc": accuracy(model, vx, vy),
                    "train_acc": accuracy(model, x, y),
                    "conv1_filter_var": first_layer_filter_stats(model.conv1).mean_variance,
                    "cpu_seconds": out["cpu"],
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    summary = []
    for length in lengths:
        for arm in ["ce", *[ggr.wname(w) for w in weights]]:
            mine = [r for r in rows if r.get("epochs") == length and r["arm"] == arm]
            val = sum(r["val_acc"] for r in mine) / len(mine)
            summary.append({"epochs": length, "arm": arm, "mean_val_acc": val})
    print("| refine epochs | arm | mean val acc |")
    for s in summary:
        print(f"| {s['epochs']} | {s['arm']} | {s['mean_val_acc']:.4f} |")
    return {"rows": rows, "summary": summary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("base", "refine"))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--candidates", default="1000:100,2000:100,2000:150",
                   help="base recipes n_train:epochs")  # fmt: skip
    p.add_argument("--lengths", default="10,20", help="refinement lengths (epochs)")
    p.add_argument("--weights", default="0.01,0.1", help="GGR weights of the refine part")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="outputs/repro/explore")
    args = p.parse_args()
    torch.set_num_threads(1)
    assert current_stage() == "explore"  # the test split stays locked
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.part == "base":
        cands = [tuple(int(v) for v in c.split(":")) for c in args.candidates.split(",")]
        result = _base(seeds, cands, args.data_dir)  # type: ignore[arg-type]
    else:
        lengths = [int(v) for v in args.lengths.split(",")]
        weights = [float(v) for v in args.weights.split(",")]
        result = _refine(seeds, lengths, weights, args.data_dir)
    result["command"] = "python examples/repro/ggr_sizing.py " + " ".join(sys.argv[1:])
    out = Path(args.out) / f"ggr-sizing-{args.part}.json"
    os.makedirs(out.parent, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

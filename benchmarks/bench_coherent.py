"""Step overhead of CoherentStrongReg relative to a plain SGD training step.

One run prints, side by side, the median time of a plain training step (forward, backward,
SGD with momentum) on a CIFAR-style ResNet batch and the median time of the regulariser's
own work per step (``reg.step()`` + ``reg.after_step()`` on that batch's gradients), for
L2, L1 subgradient and L1 prox kept on (``criterion="always"``, so the full update is timed)
and for the default descent gate (its three inner products per tensor, the one host sync
and the proximal step) and for its last phase, the zero pattern frozen at the end of a
decayed schedule (``freeze_below``: a mask of the zeros before the optimizer's step, the
re-zeroing after it), and the overhead = regulariser / plain step (target: <= 5 %).
Timing the regulariser separately keeps the measure usable on a busy machine, where
whole-step times vary by more than the overhead itself.

    PYTHONPATH=. python benchmarks/bench_coherent.py --model resnet20 --batch 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import sync

from torch_recal import CoherentStrongReg, models


def _plain_step_times(model, x, y, device, steps, warmup):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


ALWAYS = {"criterion": "always", "warmup": 0}


FROZEN = {"num_steps": 1, "frozen_at": 0, "is_active": False, "peak_lr": 0.1}


def _reg_times(model, x, y, device, reg_kwargs, repeats):
    """Time reg.step() + reg.after_step() alone, on real gradients of one backward."""
    reg_kwargs = dict(reg_kwargs)
    frozen = reg_kwargs.pop("frozen", False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reg = CoherentStrongReg(model.named_parameters(), **reg_kwargs, optimizer=opt)
    if frozen:  # as after the lr fell below freeze_below x its peak (0.01 < 0.1 x 0.1)
        reg.load_state_dict({**reg.state_dict(), **FROZEN})
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        reg.step()
        reg.after_step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed plain steps per round")
    p.add_argument("--repeats", type=int, default=20, help="timed regulariser calls per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: stable timings on a busy machine)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = getattr(models, args.model)(num_classes=10).to(args.device)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    variants = {
        "L2 (always on)": {"kind": "l2", "strength": 1e-3, **ALWAYS},
        "L1 subgradient (always on)": {"strength": 1e-4, "l1_mode": "subgradient", **ALWAYS},
        "L1 prox (always on)": {"strength": 1e-4, **ALWAYS},
        "L1 prox, descent gate (default)": {"strength": 1e-4, "warmup": 0},
        "default, zero pattern frozen (end of schedule)": {
            "strength": 1e-4,
            "warmup": 0,
            "frozen": True,
        },
    }
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain: list[float] = []
    extra: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):  # interleave, so machine noise hits every variant alike
        model.load_state_dict(state)
        plain += _plain_step_times(model, x, y, args.device, args.steps, args.warmup)
        for name, kw in variants.items():
            model.load_state_dict(state)
            extra[name] += _reg_times(model, x, y, args.device, kw, args.repeats)
    base = statistics.median(plain)
    n_weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2)
    print(
        f"{args.model}, batch {args.batch}, device {args.device}, threads "
        f"{torch.get_num_threads()}, {n_weights} regularised weights; medians of "
        f"{len(plain)} plain steps and {args.rounds * args.repeats} regulariser calls"
    )
    print("| variant | plain SGD step ms | reg.step()+after_step() ms | overhead |")
    print("|---|---|---|---|")
    for name, ts in extra.items():
        med = statistics.median(ts)
        print(f"| {name} | {base * 1e3:.1f} | {med * 1e3:.2f} | {100 * med / base:.2f}% |")
    print("target: overhead <= 5%")


if __name__ == "__main__":
    main()

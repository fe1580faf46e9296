"""Cost of GenerativeGradientLoss: a CE + GGR step vs a plain CE step on the same model.

Prints the mean step time (forward, backward, SGD step; over whole ``every`` cycles, with the
modes interleaved) of plain cross-entropy and of CE + GGR at ``every=1`` and ``every=4`` (the
reference decoder's gradient included), the same with ``fused_double_backward=False``
(PyTorch's own batch-norm and GELU double backwards, i.e. the library before its fused
kernels), their ratio to the plain step, and the ratio of peak memory: on CUDA
``max_memory_allocated``; on
CPU the peak bytes of tensors saved for backward (the autograd graph, which is what double
backprop enlarges), measured with ``torch.autograd.graph.saved_tensors_hooks``.

Targets (issue #7, ResNet-20): <= 2.5x at every=1, <= 1.4x at every=4.

``--model vit`` times a small ViT instead (patch-4 convolution on 1x28x28, 6 pre-norm blocks
of width 192, 3 heads, GELU MLPs of width 768, attention written out so that it can be
differentiated twice): its double backward goes through GELU and LayerNorm, not batch norm.

The warm-up steps include the one-off ``torch.compile`` of the fused kernels (once per
process; ``TORCH_RECAL_COMPILE=0`` runs them eagerly instead).

``--profile`` also attributes the time of a plain step and of every=1 steps (fused and
PyTorch's double backwards) to the autograd nodes (backward functions) and forward
ops that run them, with ``torch.profiler``: it shows which double-backward formulas the extra
time goes to.

    python benchmarks/bench_ggr.py                    # ResNet-20, 1x28x28, batch 128, CPU
    python benchmarks/bench_ggr.py --model vit        # the small ViT
    python benchmarks/bench_ggr.py --profile          # + where the time of a GGR step goes
    python benchmarks/bench_ggr.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import sync

from torch_recal import GenerativeGradientLoss, ReferenceDecoder
from torch_recal.models import resnet20


class _SavedBytes:
    """Peak bytes of distinct storages saved for backward while active (CPU memory proxy)."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.live[storage.data_ptr()] = storage.nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return t

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t


class _ViTBlock(nn.Module):
    """Pre-norm transformer block; attention written out (differentiable twice)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    """ViT for 1x28x28 inputs: 4x4 patches (49 tokens and a class token)."""

    def __init__(self, dim: int = 192, depth: int = 6, heads: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 50, dim))
        self.blocks = nn.Sequential(*(_ViTBlock(dim, heads, 4 * dim) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def make_step(mode: str, args: argparse.Namespace):
    """A closure running one training step of ``mode``, and its GGR object (or None)."""
    torch.manual_seed(0)
    device = args.device
    model = (SmallViT() if args.model == "vit" else resnet20(in_chans=1)).to(device)
    first = model.patch_embed if args.model == "vit" else model.conv1
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    ggr = None
    if mode != "plain":  # "every=K", or "every=K pytorch": PyTorch's double backwards
        every = int(mode.split()[0].split("=")[1])
        decoder = ReferenceDecoder.for_layer(first)
        ggr = GenerativeGradientLoss(
            first.weight,
            decoder,
            weight=1.0,
            every=every,
            fused_double_backward=not mode.endswith("pytorch"),
        )

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if ggr is not None:
            loss = loss + ggr(loss, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, ggr


def peak_memory(step, ggr, device: str) -> float:
    """Peak over one full ``every`` cycle."""
    cycle = 1 if ggr is None else ggr.every
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        for _ in range(cycle):
            step()
        return float(torch.cuda.max_memory_allocated())
    peak = 0.0
    for _ in range(cycle):
        meter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            step()
        peak = max(peak, float(meter.peak))
    return peak


def profile_steps(args: argparse.Namespace, n: int = 3) -> None:
    """Print, for plain CE and CE + GGR (every=1), the CPU time per step of each autograd
    node (``...Backward0`` and the double-backward ``...BackwardBackward0``, the ops they call
    included; the engine runs nodes one at a time, so they do not overlap) and of the rest
    (the forward pass, the reference gradient, the optimizer step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    rest = "everything else (forward, reference, optimizer)"
    totals: dict[str, dict[str, float]] = {}
    wall: dict[str, float] = {}
    modes = ("plain", "every=1", "every=1 pytorch")
    for mode in modes:
        step, _ = make_step(mode, args)
        for _ in range(args.warmup):
            step()
        with profile(activities=activities):  # a profiled warm-up step, not measured:
            step()  # the first profiled steps ran slower in trials
        sync(args.device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(n):
                step()
            sync(args.device)
        wall[mode] = 1e3 * (time.perf_counter() - t0) / n
        per: dict[str, float] = {}
        for evt in prof.key_averages():
            if evt.key.startswith("autograd::engine::evaluate_function: "):
                per[evt.key.split(": ", 1)[1]] = evt.cpu_time_total / n / 1e3
        per[rest] = wall[mode] - sum(per.values())
        totals[mode] = per
    names = sorted(totals["every=1"], key=lambda k: -totals["every=1"][k])[:10]
    print(f"\nwhere the time goes (ms per step under the profiler, mean of {n} steps)")
    print(
        "| autograd node | CE | CE + GGR (every=1) | share of the GGR step "
        "| CE + GGR, PyTorch's double backwards |"
    )
    print("|---|---|---|---|---|")
    names += [n for n in totals[modes[2]] if n not in names and totals[modes[2]][n] > 10.0]
    for name in names:
        plain, ggr = (totals[m].get(name, 0.0) for m in modes[:2])
        unfused = totals[modes[2]].get(name, 0.0)
        share = 100 * ggr / wall["every=1"]
        print(f"| {name} | {plain:.1f} | {ggr:.1f} | {share:.0f} % | {unfused:.1f} |")
    print(
        f"| whole step | {wall['plain']:.1f} | {wall['every=1']:.1f} | 100 % "
        f"| {wall[modes[2]]:.1f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=("resnet20", "vit"), default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=24, help="timed steps per mode (a multiple of 4)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--profile", action="store_true", help="also attribute step time to ops")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vit = "small ViT (patch 4, depth 6, width 192, 3 heads)"
    name = vit if args.model == "vit" else "ResNet-20 (in_chans=1)"
    print(
        f"{name}, batch {args.batch} x 1x28x28, device {args.device}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, mean of {args.steps} steps"
    )
    modes = ["plain", "every=1", "every=4", "every=1 pytorch", "every=4 pytorch"]
    steps = {m: make_step(m, args) for m in modes}
    for step, _ in steps.values():
        for _ in range(args.warmup):
            step()
    # Interleaved (round robin), so drifting machine load hits every mode alike.
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.steps):
        for m in modes:
            sync(args.device)
            t0 = time.perf_counter()
            steps[m][0]()
            sync(args.device)
            times[m].append(time.perf_counter() - t0)
    results = {m: (statistics.fmean(times[m]), peak_memory(*steps[m], args.device)) for m in modes}
    base_t, base_m = results["plain"]
    mem = "peak CUDA memory" if args.device.startswith("cuda") else "peak saved-for-backward"
    print(f"| step | time (ms) | time ratio | {mem} (MiB) | memory ratio |")
    print("|---|---|---|---|---|")
    for m in modes:
        t, mb = results[m]
        name = "CE" if m == "plain" else f"CE + GGR ({m.replace(' pytorch', '')})"
        if m.endswith("pytorch"):
            name += ", PyTorch's double backwards"
        print(
            f"| {name} | {1e3 * t:.1f} | {t / base_t:.2f}x | {mb / 2**20:.1f} | "
            f"{mb / base_m:.2f}x |"
        )
    if args.profile:
        profile_steps(args)


if __name__ == "__main__":
    main()

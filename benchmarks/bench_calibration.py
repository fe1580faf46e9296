"""ResponseCalibration speed: fused chain vs the memory-bound limit vs naive eager ops.

Prints, per device (CPU, and CUDA when available), in one run:
  * fused  : torch_recal.functional.response_calibration_residual (compiled by the library)
  * limit  : torch.compile(lambda u, s: relu(u + s)) on the same shapes: the same bytes moved
             minus the small (N, C) statistics, i.e. the memory-bound floor
  * naive  : the formula op by op in eager PyTorch (z, erfc, multiply, add, shortcut, relu)
  * block  : ResCNet BasicBlock vs plain BasicBlock, forward + backward (torch_recal.models)
and the ratios fused/limit (targets: <= 1.15 CUDA, <= 1.5 CPU), naive/fused (target >= 8),
block overhead (target <= 1.15).

    python benchmarks/bench_calibration.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, table

import torch_recal
from torch_recal.functional import response_calibration_residual
from torch_recal.models import BasicBlock


def naive(u, s, mu, sigma, eps=1e-5):
    z = (u - mu[:, :, None, None]) / (sigma[:, :, None, None] + eps)
    w = 0.5 * torch.erfc(z.abs() / math.sqrt(2.0))
    return torch.relu(u + w * u + s)


def bench_device(
    device: str, shape: tuple[int, ...], block_shape: tuple[int, ...]
) -> list[list[object]]:
    torch.manual_seed(0)
    u = torch.randn(shape, device=device)
    s = torch.randn(shape, device=device)
    mu = torch.randn(shape[:2], device=device)
    sigma = torch.rand(shape[:2], device=device) + 0.5
    limit_fn = torch.compile(lambda a, b: torch.relu(a + b), fullgraph=True)
    with torch.no_grad():
        t = interleaved(
            {
                "fused": lambda: response_calibration_residual(u, s, mu, sigma),
                "limit": lambda: limit_fn(u, s),
                "naive": lambda: naive(u, s, mu, sigma),
            },
            device,
        )
    t_fused, t_limit, t_naive = t["fused"], t["limit"], t["naive"]
    gbytes = 3 * u.numel() * u.element_size() / 1e9  # read u, s; write out

    c = block_shape[1]
    plain = BasicBlock(c, c).to(device)
    rescnet = BasicBlock(c, c, calibration=torch_recal.ResponseCalibration(c, 4)).to(device)
    rescnet.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(block_shape, device=device, requires_grad=True)

    def step(block):
        def run():
            block(x).sum().backward()

        return run

    t = interleaved({"plain": step(plain), "rescnet": step(rescnet)}, device, calls=3)
    t_plain, t_rc = t["plain"], t["rescnet"]
    return [
        [device, "fused chain (ours)", f"{t_fused * 1e3:.2f}", f"{gbytes / t_fused:.1f}", ""],
        [
            device,
            "relu(u + s) compiled (limit)",
            f"{t_limit * 1e3:.2f}",
            f"{gbytes / t_limit:.1f}",
            "",
        ],
        [device, "naive eager op-by-op", f"{t_naive * 1e3:.2f}", f"{gbytes / t_naive:.1f}", ""],
        [device, "fused / limit", "", "", f"{t_fused / t_limit:.2f}x"],
        [device, "naive / fused", "", "", f"{t_naive / t_fused:.1f}x"],
        [device, f"plain BasicBlock fwd+bwd {block_shape}", f"{t_plain * 1e3:.2f}", "", ""],
        [device, f"ResCNet BasicBlock fwd+bwd {block_shape}", f"{t_rc * 1e3:.2f}", "", ""],
        [device, "block overhead (ResCNet / plain)", "", "", f"{t_rc / t_plain:.2f}x"],
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    args = p.parse_args()
    torch_recal.set_compile(True)
    rows: list[list[object]] = []
    cpu_shape = (8, 16, 8, 8) if args.quick else (64, 64, 32, 32)
    cpu_block = (4, 16, 8, 8) if args.quick else (64, 64, 16, 16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rows += bench_device("cpu", cpu_shape, cpu_block)
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name()}")
        rows += bench_device("cuda", (256, 64, 56, 56), (128, 64, 56, 56))
    print(f"elementwise shape {cpu_shape} float32")
    print(table(["device", "what", "ms", "GB/s", "ratio"], rows))


if __name__ == "__main__":
    main()

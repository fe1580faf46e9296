"""ResponseCalibration speed: fused chain vs the memory-bound limit vs naive eager ops.

Prints, per device (CPU, and CUDA when available), in one run:
  * fused  : torch_recal.functional.response_calibration_residual (compiled by the library)
  * limit  : torch.compile(lambda u, s: relu(u + s)) on the same shapes: the same bytes moved
             minus the small (N, C) statistics, i.e. the memory-bound floor
  * naive  : the formula op by op in eager PyTorch (z, erfc, multiply, add, shortcut, relu)
  * erfc   : the same chain written with erfc, compiled (the ablation for the erf form)
  * a&s    : the same chain with erfc(x) written out as Abramowitz-Stegun 7.1.26 (the
             polynomial times exp(-x^2) that ATen's vectorised float32 erf evaluates, without
             erf's sign handling), compiled
  * train  : forward and forward+backward with grad, ours (hand-written fused backward) vs
             inductor's own derivative of the same forward
  * block  : ResCNet BasicBlock vs plain BasicBlock, forward + backward (torch_recal.models)
  * step   : a whole ResNet-20 training step (forward, cross-entropy, backward, SGD step),
             ``calibrate()``-ed vs plain, the same weights, timed interleaved: what a user pays
  * cold   : the first call, which compiles the forward kernel
and the ratios fused/limit (targets: <= 1.15 CUDA, <= 1.5 CPU), naive/fused (target >= 8),
block overhead (target <= 1.15), training step calibrated/plain (target <= 1.10 on CPU).

    python benchmarks/bench_calibration.py [--quick] [--threads N] [--step-only]

The "inductor's own autograd" ablation compiles ``torch_recal.functional._forward``, the
library's pure chain (a documented internal seam, see its docstring).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, sync, table

import torch_recal
from torch_recal.functional import _forward, response_calibration_residual
from torch_recal.models import BasicBlock, resnet20


def naive(u, s, mu, sigma, eps=1e-5):
    z = (u - mu[:, :, None, None]) / (sigma[:, :, None, None] + eps)
    w = 0.5 * torch.erfc(z.abs() / math.sqrt(2.0))
    return torch.relu(u + w * u + s)


def erfc_chain(u, s, mu, sigma, eps=1e-5):
    """Our chain written with erfc instead of erf (the ablation for the erf form)."""
    t = (u - mu[:, :, None, None]) * ((sigma[:, :, None, None] + eps).reciprocal() * math.sqrt(0.5))
    return torch.relu(u + 0.5 * torch.erfc(t.abs()) * u + s)


_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def as_chain(u, s, mu, sigma, eps=1e-5):
    """Our chain with erfc(|t|) ~ k P(k) exp(-t^2), k = 1 / (1 + p |t|) (A&S 7.1.26)."""
    t = (u - mu[:, :, None, None]) * ((sigma[:, :, None, None] + eps).reciprocal() * math.sqrt(0.5))
    k = 1.0 / (1.0 + _AS_P * t.abs())
    a1, a2, a3, a4, a5 = _AS_A
    erfc = k * (a1 + k * (a2 + k * (a3 + k * (a4 + k * a5)))) * torch.exp(-(t * t))
    return torch.relu(u * (1.0 + 0.5 * erfc) + s)


def bench_device(
    device: str, shape: tuple[int, ...], block_shape: tuple[int, ...]
) -> list[list[object]]:
    torch.manual_seed(0)
    u = torch.randn(shape, device=device)
    s = torch.randn(shape, device=device)
    mu = torch.randn(shape[:2], device=device)
    sigma = torch.rand(shape[:2], device=device) + 0.5
    limit_fn = torch.compile(lambda a, b: torch.relu(a + b), fullgraph=True)
    erfc_fn = torch.compile(erfc_chain, fullgraph=True)
    as_fn = torch.compile(as_chain, fullgraph=True)
    with torch.no_grad():
        start = time.perf_counter()
        response_calibration_residual(u, s, mu, sigma)  # cold: compiles the forward kernel
        sync(device)
        t_cold = time.perf_counter() - start
        t = interleaved(
            {
                "fused": lambda: response_calibration_residual(u, s, mu, sigma),
                "limit": lambda: limit_fn(u, s),
                "naive": lambda: naive(u, s, mu, sigma),
                "erfc": lambda: erfc_fn(u, s, mu, sigma),
                "a&s": lambda: as_fn(u, s, mu, sigma),
            },
            device,
        )
    t_fused, t_limit, t_naive, t_erfc, t_as = (
        t[k] for k in ("fused", "limit", "naive", "erfc", "a&s")
    )

    # training: our autograd.Function (fused hand-written backward) vs inductor's own
    # derivative of the same forward (torch.compile of the pure chain with grad inputs)
    leaves = [t.clone().requires_grad_() for t in (u, s, mu, sigma)]
    g = torch.ones_like(u)
    inductor_fn = torch.compile(
        lambda a, b, m, sg: _forward(a, b, m[:, :, None, None], sg[:, :, None, None], 1e-5,
                                     False, True),
        fullgraph=True,
    )  # fmt: skip
    tt = interleaved(
        {
            "ours_fwd": lambda: response_calibration_residual(*leaves),
            "ours_step": lambda: response_calibration_residual(*leaves).backward(g),
            "ind_fwd": lambda: inductor_fn(*leaves),
            "ind_step": lambda: inductor_fn(*leaves).backward(g),
        },
        device,
        calls=5,
    )
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
        [
            device,
            "first call (compiles the kernel, or loads it from inductor's cache)",
            f"{t_cold * 1e3:.0f}",
            "",
            "",
        ],
        [device, "fused chain (ours)", f"{t_fused * 1e3:.2f}", f"{gbytes / t_fused:.1f}", ""],
        [
            device,
            "same chain with erfc, compiled",
            f"{t_erfc * 1e3:.2f}",
            f"{gbytes / t_erfc:.1f}",
            "",
        ],
        [device, "erfc chain / limit", "", "", f"{t_erfc / t_limit:.2f}x"],
        [
            device,
            "same chain with A&S 7.1.26 erfc written out, compiled",
            f"{t_as * 1e3:.2f}",
            f"{gbytes / t_as:.1f}",
            "",
        ],
        [device, "train fwd, ours (autograd.Function)", f"{tt['ours_fwd'] * 1e3:.2f}", "", ""],
        [device, "train fwd, inductor's own autograd", f"{tt['ind_fwd'] * 1e3:.2f}", "", ""],
        [device, "train fwd+bwd, ours", f"{tt['ours_step'] * 1e3:.2f}", "", ""],
        [device, "train fwd+bwd, inductor's own autograd", f"{tt['ind_step'] * 1e3:.2f}", "", ""],
        [
            device,
            "train fwd+bwd: inductor / ours",
            "",
            "",
            f"{tt['ind_step'] / tt['ours_step']:.2f}x",
        ],
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


def bench_train_step(device: str, batch: int, size: int) -> list[list[object]]:
    """ResNet-20 training step (forward, loss, backward, SGD), calibrated vs plain."""
    torch.manual_seed(0)
    plain = resnet20(num_classes=10).to(device)
    calibrated = torch_recal.calibrate(copy.deepcopy(plain))  # same weights + calibrations
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(model: torch.nn.Module):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        return run

    t = interleaved({"plain": step(plain), "calibrated": step(calibrated)}, device, calls=3)
    shape = f"batch {batch}, {size}x{size}"
    return [
        [device, f"ResNet-20 training step, plain ({shape})", f"{t['plain'] * 1e3:.1f}", "", ""],
        [device, "ResNet-20 training step, calibrate()-ed", f"{t['calibrated'] * 1e3:.1f}", "", ""],
        [
            device,
            "training step: calibrated / plain",
            "",
            "",
            f"{t['calibrated'] / t['plain']:.3f}x",
        ],
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--step-only", action="store_true", help="only the training-step rows")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch_recal.set_compile(True)
    rows: list[list[object]] = []
    cpu_shape = (8, 16, 8, 8) if args.quick else (64, 64, 32, 32)
    cpu_block = (4, 16, 8, 8) if args.quick else (64, 64, 16, 16)
    step_batch, step_size = (8, 16) if args.quick else (128, 32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.step_only:
        rows += bench_device("cpu", cpu_shape, cpu_block)
    rows += bench_train_step("cpu", step_batch, step_size)
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name()}")
        if not args.step_only:
            rows += bench_device("cuda", (256, 64, 56, 56), (128, 64, 56, 56))
        rows += bench_train_step("cuda", step_batch, step_size)
    print(f"elementwise shape {cpu_shape} float32")
    print(table(["device", "what", "ms", "GB/s", "ratio"], rows))


if __name__ == "__main__":
    main()

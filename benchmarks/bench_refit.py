"""Benchmark pinv_refit_dense: what a user pays, the bare-GEMM limit, memory vs N, end to end.

Side by side in one run:

1. what a user pays (target: <= 1.3x): ``pinv_refit_dense(model.fc, loader, model=model,
   evaluate=False)`` (one feature pass with the capture hook + the streamed statistics + the
   solve) vs one ``torch.no_grad()`` eval-mode forward pass of the same model over the same
   loader, interleaved, for a CNN (ResNet-20, a 64-wide head) and an MLP with a 1024-wide
   head, a stress case: there the Gram product alone costs d^2/2 = 0.5M multiply-adds a
   sample against the forward pass's 784*1024 + 1024*1024 = 1.85M, before the d x d solve;
2. time on in-memory float32 features (target: <= 1.2x the bare GEMM): ``pinv_refit_dense``
   streaming over batches vs the bare float32 ``H^T H`` GEMM over the whole matrix, and, as
   limits and information, numpy's ``H.T @ H`` (BLAS ``syrk``: half the flops of the GEMM;
   ours computes the lower block triangle with GEMMs instead) and scikit-learn
   ``Ridge(solver="cholesky")`` on the materialised features (not a target: it gets ``syrk``
   and a float32 solve, the library streams in float64 with O(d^2) memory);
3. memory: peak RSS of a streamed refit (features generated batch by batch) for growing N,
   each in a fresh subprocess, next to the O(d^2 + d k) float64 statistics;
4. end to end (information): refit of a CNN's classifier vs one SGD epoch.

``--blocks`` instead times the pieces behind two choices in ``NormalEquations.update``, over
1024-row float32 batches: the lower block triangle of ``h^T h`` for several block sizes vs
the full per-batch GEMM and vs numpy's ``syrk`` batch by batch, and ``t^T h`` vs ``h^T t``
for the (k = 10)-column targets.

The thread count is one unless ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
``MKL_NUM_THREADS`` are set (set all three, e.g. to 2, to time the default setting of a
2-core machine).

Usage::

    PYTHONPATH=. python benchmarks/bench_refit.py            # full (a few minutes, 1 thread)
    PYTHONPATH=. python benchmarks/bench_refit.py --quick    # seconds
    PYTHONPATH=. python benchmarks/bench_refit.py --blocks   # block sizes, GEMM orientation
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# one BLAS thread everywhere (numpy/scikit-learn included), set before numpy is imported:
# the box is shared, and the comparison must give every contender the same cores
_THREADS = "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, table

from torch_recal import pinv_refit_dense
from torch_recal.ridge import gram_block_rows


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def features(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, d, generator=g)) + 0.1  # post-ReLU pooled features
    y = torch.randint(0, k, (n,), generator=g)
    return h, y


def bench_time(n: int, d: int, k: int, batch: int, repeats: int) -> dict:
    from sklearn.linear_model import Ridge

    h, y = features(n, d, k)
    loader = [(h[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    fc = nn.Linear(d, k)
    ours = best_of(
        lambda: pinv_refit_dense(fc, loader, ridge=1e-3, evaluate=False, assign=False), repeats
    )
    gemm = best_of(lambda: h.T @ h, repeats)
    hn, tn = h.numpy(), np.eye(k, dtype=np.float32)[y.numpy()]
    syrk = best_of(lambda: hn.T @ hn, repeats)  # numpy calls BLAS syrk for X.T @ X
    sk = best_of(lambda: Ridge(alpha=1e-3, solver="cholesky").fit(hn, tn), repeats)
    return {"n": n, "d": d, "ours": ours, "sklearn": sk, "gemm": gemm, "syrk": syrk}


def _memory_child(n: int, d: int, k: int, batch: int) -> None:
    """Runs in a subprocess: stream n generated samples, print the peak RSS in MiB."""
    torch.set_num_threads(1)

    def loader_of(total: int):
        g = torch.Generator().manual_seed(0)
        for i in range(0, total, batch):
            m = min(batch, total - i)
            yield torch.relu(torch.randn(m, d, generator=g)), torch.randint(0, k, (m,), generator=g)

    def rss_mib(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024

    pinv_refit_dense(nn.Linear(d, k), loader_of(2 * batch), ridge=1e-3, evaluate=False)  # warm
    try:  # reset the high-water mark so the peak is that of the refit alone (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = rss_mib("VmRSS")
    pinv_refit_dense(nn.Linear(d, k), loader_of(n), ridge=1e-3, evaluate=False)
    peak = rss_mib("VmHWM")
    print(json.dumps({"n": n, "peak_mib": peak - base, "base_mib": base}))


def bench_memory(ns: list[int], d: int, k: int, batch: int) -> list[dict]:
    out = []
    for n in ns:
        code = (
            "import sys; sys.path.insert(0, '.'); from benchmarks.bench_refit import _memory_child;"
            f"_memory_child({n}, {d}, {k}, {batch})"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def _cnn() -> tuple[nn.Module, nn.Linear, tuple[int, ...]]:
    from torch_recal.models import resnet20

    model = resnet20(in_chans=1)
    return model, model.fc, (1, 28, 28)


def _wide_mlp() -> tuple[nn.Module, nn.Linear, tuple[int, ...]]:
    fc = nn.Linear(1024, 10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                          nn.ReLU(), fc)  # fmt: skip
    return model, fc, (1, 28, 28)


def bench_user_pays(n: int, batch: int, rounds: int) -> list[list[object]]:
    """Refit of the head (features pass + solve) vs one no-grad forward pass, interleaved."""
    rows: list[list[object]] = []
    models = (("resnet20 (fc 64 -> 10)", _cnn), ("MLP 784-1024-1024 (fc 1024 -> 10)", _wide_mlp))
    for name, build in models:
        torch.manual_seed(0)
        model, fc, shape = build()
        x = torch.randn(n, *shape)
        y = torch.randint(0, 10, (n,))
        loader = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]

        def forward(model: nn.Module = model, loader: list = loader) -> None:
            model.eval()
            with torch.no_grad():
                for xb, _ in loader:
                    model(xb)

        def refit(model: nn.Module = model, fc: nn.Linear = fc, loader: list = loader) -> None:
            pinv_refit_dense(fc, loader, model=model, ridge=1e-3, evaluate=False)

        t = interleaved({"forward": forward, "refit": refit}, "cpu", rounds=rounds, calls=1)
        ratio = t["refit"] / t["forward"]
        rows.append([name, f"{t['forward']:.3f}", f"{t['refit']:.3f}", f"{ratio:.2f}",
                     "yes" if ratio <= 1.3 else "NO"])  # fmt: skip
    return rows


def bench_end_to_end(n: int, batch: int) -> dict:
    from torch_recal.models import resnet20

    torch.manual_seed(0)
    model = resnet20(in_chans=1)
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    loader = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def sgd_epoch():
        model.train()
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    t0 = time.perf_counter()
    sgd_epoch()
    sgd = time.perf_counter() - t0
    t0 = time.perf_counter()
    pinv_refit_dense(model.fc, loader, model=model, ridge=1e-3, evaluate=False)
    refit = time.perf_counter() - t0
    return {"n": n, "sgd_epoch": sgd, "refit": refit}


_BLOCK_SIZES = (64, 128, 256)


def _lower_triangle(batches: list[torch.Tensor], step: int) -> None:
    d = batches[0].shape[1]
    for b in batches:
        for r0 in range(0, d, step):
            b[:, r0 : r0 + step].T @ b[:, : r0 + step]


def _block_row(n: int, d: int, repeats: int) -> list[str]:
    h, y = features(n, d, 10)
    hs = list(h.split(1024))
    ts = [torch.nn.functional.one_hot(yb, 10).float() for yb in y.split(1024)]
    pairs = list(zip(hs, ts, strict=True))
    cells = [f"{best_of(lambda: [b.T @ b for b in hs], repeats):.3f}"]
    for step in _BLOCK_SIZES:
        if step >= d:
            cells.append("-")
            continue
        t = best_of(lambda: _lower_triangle(hs, step), repeats)  # noqa: B023 (called here)
        cells.append(f"{t:.3f}{'*' if step == gram_block_rows(d) else ''}")
    cells.append(f"{best_of(lambda: [t.T @ b for b, t in pairs], repeats):.3f}")
    cells.append(f"{best_of(lambda: [b.T @ t for b, t in pairs], repeats):.3f}")
    hn = [b.numpy() for b in hs]  # numpy's syrk, batch by batch (what a stream could use)
    cells.append(f"{best_of(lambda: [b.T @ b for b in hn], repeats):.3f}")
    return cells


def bench_blocks(repeats: int = 3) -> None:
    """Per-batch Gram pieces: block sizes of the lower triangle, and the target product."""
    print(f"\nblock sizes (best of {repeats}, s), 1024-row float32 batches; library's choice *")
    print(
        "| N x d | full GEMM per batch | " + " | ".join(f"block {b}" for b in _BLOCK_SIZES), end=""
    )
    print(" | t^T h | h^T t | numpy syrk per batch |")
    print("|---|---|" + "---|" * len(_BLOCK_SIZES) + "---|---|---|")
    for n, d in [(60000, 256), (60000, 512), (30000, 1024), (20000, 2048)]:
        print(f"| {n} x {d} | " + " | ".join(_block_row(n, d, repeats)) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, seconds")
    p.add_argument("--blocks", action="store_true", help="only the per-batch Gram pieces")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    threads = os.environ["OMP_NUM_THREADS"]
    print(f"torch {torch.__version__}, numpy {np.__version__}, {threads} BLAS thread(s), CPU")
    if args.blocks:
        bench_blocks()
        return
    k = 10
    if args.quick:
        sizes, repeats, mem_ns, e2e_n, rounds = [(6000, 256), (3000, 1024)], 1, [2000, 8000], 256, 3
    else:
        sizes, repeats, mem_ns, e2e_n, rounds = (
            [(60000, 512), (20000, 2048)],
            3,
            [20000, 80000, 320000],
            2048,
            7,
        )

    print("\n1. what a user pays: refit of the head (features pass + solve, evaluate=False) vs")
    print(f"   one no-grad forward pass over the same {e2e_n} random 28x28 images, batch 128;")
    print(f"   median of {rounds} interleaved rounds; target: refit/forward <= 1.3")
    rows = bench_user_pays(e2e_n, 128, rounds)
    print(table(["model", "forward pass (s)", "refit (s)", "refit/forward", "<= 1.3"], rows))

    print(f"\n2. time (best of {repeats}), float32 features, k=10, batches of 1024;")
    print("   target: ours/GEMM <= 1.2; syrk is the arithmetic limit; scikit-learn is information,")
    print("   not a target (syrk + float32 solve on materialised features)")
    print(
        "| N x d | ours (s) | bare H^T H GEMM (s) | numpy syrk (s) | ours/GEMM | ours/syrk |",
        end="",
    )
    print(" sklearn cholesky (s), not a target |")
    print("|---|---|---|---|---|---|---|")
    for n, d in sizes:
        r = bench_time(n, d, k, 1024, repeats)
        print(
            f"| {n} x {d} | {r['ours']:.3f} | {r['gemm']:.3f} | {r['syrk']:.3f} | "
            f"{r['ours'] / r['gemm']:.2f} | {r['ours'] / r['syrk']:.2f} | {r['sklearn']:.3f} |"
        )

    d = 512
    stats_mib = (d * d + d * k + 2 * d + 2 * k) * 8 / 2**20
    print(f"\n3. peak RSS, streamed refit, d={d}, batches of 1024", end="")
    print(f" (float64 statistics: {stats_mib:.1f} MiB)")
    print("| N | materialised H (MiB) | peak RSS above start (MiB) | RSS at start (MiB) |")
    print("|---|---|---|---|")
    for r in bench_memory(mem_ns, d, k, 1024):
        mat = r["n"] * d * 4 / 2**20
        print(f"| {r['n']} | {mat:.0f} | {r['peak_mib']:.0f} | {r['base_mib']:.0f} |")

    print(f"\n4. end to end, resnet20(in_chans=1), {e2e_n} random 28x28 images, batch 128")
    r = bench_end_to_end(e2e_n, 128)
    print("| one SGD epoch (s) | refit fc: inference pass + solve (s) | refit/SGD |")
    print("|---|---|---|")
    print(f"| {r['sgd_epoch']:.2f} | {r['refit']:.2f} | {r['refit'] / r['sgd_epoch']:.2f} |")


if __name__ == "__main__":
    main()

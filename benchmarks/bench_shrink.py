"""What a compressed model costs to ship: checkpoint size and CPU inference latency.

An MLP (784-512-512-10) is trained on a Fashion-MNIST subset (from the training images; the
accuracy column is measured on held-out training images, so no test image is read), then
shipped five ways, each printed with its accuracy so that equal accuracy can be read off:

* ``dense``: plain training, ``torch.save`` of the state dict;
* ``sparse (budget 0.9)``: ``CoherentStrongReg(target_sparsity=0.9)``, unstructured;
  ``save_sparse`` (bitmask + values) and, for latency, the Linear layers run as
  ``torch.sparse`` CSR matrix products;
* ``shrunk (group budget)``: ``CoherentStrongReg(target_sparsity=s, group="unit")``, then
  ``shrink()``: a smaller dense model;
* ``ln_structured``: what a user would do instead: the dense model pruned with
  ``torch.nn.utils.prune.ln_structured`` (L2 norm of the hidden units' rows, the same number
  of units as the group budget removed), fine-tuned for ``--finetune`` epochs; its masks keep
  the dense shapes (latency as dense), and ``+ shrink`` shows it shipped small;
* the latency limit: a dense model with exactly the shrunk model's shapes (the floor any
  unit removal can reach).

Ratios (shipped / dense) are printed side by side from one run; latency is the median of
interleaved rounds (``_timing.interleaved``) at ``--threads`` threads.

    PYTHONPATH=. python benchmarks/bench_shrink.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
)
from _timing import interleaved, table
from data import read_fashion_split

from torch_recal import CoherentStrongReg, save_sparse, shrink


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )  # fmt: skip


def train(model, x, y, epochs, *, lr=0.05, seed=0, **budget) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * ((len(y) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    handle = None
    params = list(model.named_parameters())
    if budget.get("group") == "unit":  # the output layer's units are the classes: keep them
        params = params[:-2]
    if budget:
        handle = CoherentStrongReg(params, optimizer=opt, **budget).attach()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = order[i : i + 128]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    if handle is not None:
        handle.remove()
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def nbytes(state, sparse=False) -> int:
    buffer = io.BytesIO()
    (save_sparse if sparse else torch.save)(state, buffer)
    return buffer.getbuffer().nbytes


class CsrLinear(nn.Module):
    """A Linear layer whose weight is a torch.sparse CSR matrix (``y = x W^T + b``)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = layer.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias[:, None], self.weight, x.T).T


def csr(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[CsrLinear(m) if isinstance(m, nn.Linear) else m for m in model])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--finetune", type=int, default=2, help="epochs after ln_structured")
    p.add_argument("--unit-sparsity", type=float, default=0.75)
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=256, help="inference batch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    x_all, y_all = read_fashion_split(args.data_dir, "train")
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    tr, ho = perm[: args.n_train], perm[args.n_train : args.n_train + 5_000]
    x, y, hx, hy = x_all[tr], y_all[tr], x_all[ho], y_all[ho]

    torch.manual_seed(1)
    init = make_model()
    dense = train(copy.deepcopy(init), x, y, args.epochs)
    sparse = train(copy.deepcopy(init), x, y, args.epochs, target_sparsity=0.9)
    grouped = train(copy.deepcopy(init), x, y, args.epochs, target_sparsity=args.unit_sparsity,
                    group="unit")  # fmt: skip
    small, report = shrink(grouped)
    removed = [layer.units_before - layer.units_after for layer in report.layers][:2]

    baseline = copy.deepcopy(dense)  # ln_structured: the same number of hidden units removed
    for layer, k in zip([baseline[1], baseline[3]], removed, strict=True):
        if k:
            prune.ln_structured(layer, "weight", amount=k, n=2, dim=0)
    train(baseline, x, y, args.finetune, lr=0.01)
    for layer in (baseline[1], baseline[3]):
        if prune.is_pruned(layer):
            prune.remove(layer, "weight")
    with torch.no_grad():  # a pruned unit's bias stays trained: zero it so the unit is dead
        for layer in (baseline[1], baseline[3]):
            layer.bias[(layer.weight == 0).all(1)] = 0.0
    baseline_small, _ = shrink(baseline)
    limit = make_model()
    limit[1], limit[3], limit[5] = (nn.Linear(m.in_features, m.out_features)
                                    for m in (small[1], small[3], small[5]))  # fmt: skip

    torch.set_num_threads(args.threads)
    xb = hx[: args.batch]
    shipped = {
        "dense": (dense, dense, nbytes(dense.state_dict())),
        "sparse (budget 0.9, CSR)": (sparse, csr(sparse), nbytes(sparse.state_dict(), True)),
        f"shrunk (group budget {args.unit_sparsity:g})": (grouped, small,
                                                          nbytes(small.state_dict())),
        "ln_structured (masks)": (baseline, baseline, nbytes(baseline.state_dict())),
        "ln_structured + shrink": (baseline, baseline_small, nbytes(baseline_small.state_dict())),
        "limit: dense at the shrunk shapes": (None, limit, nbytes(limit.state_dict())),
    }  # fmt: skip
    for _, model, _ in shipped.values():
        model.eval()
    with torch.no_grad():
        times = interleaved({k: (lambda m=m: m(xb)) for k, (_, m, _) in shipped.items()}, "cpu")
    base_t, base_b = times["dense"], shipped["dense"][2]
    rows = []
    for name, (trained, model, size) in shipped.items():
        params = sum(int((p != 0).sum()) if not p.is_sparse_csr else p.values().numel()
                     for p in model.parameters()) if name != "sparse (budget 0.9, CSR)" else sum(
            int((q != 0).sum()) for q in trained.parameters())  # fmt: skip
        acc = accuracy(trained, hx, hy) if trained is not None else float("nan")
        rows.append([name, f"{acc:.4f}" if trained is not None else "-", f"{params:,}",
                     f"{size / 1e6:.2f} MB", f"{size / base_b:.2f}x",
                     f"{times[name] * 1e3:.3f} ms", f"{times[name] / base_t:.2f}x"])  # fmt: skip
    print(f"MLP 784-512-512-10, {args.epochs} epochs on {args.n_train:,} Fashion-MNIST training "
          f"images; accuracy on 5,000 held-out training images; latency: batch {args.batch}, "
          f"{args.threads} thread(s), torch {torch.__version__}")  # fmt: skip
    print(f"units removed by shrink (hidden layers): {removed}; shrink: "
          f"{report.params_before:,} -> {report.params_after:,} parameters")  # fmt: skip
    print(table(["shipped as", "accuracy", "non-zero params", "file", "file / dense",
                 "latency", "latency / dense"], rows))  # fmt: skip


if __name__ == "__main__":
    main()

"""The GGR protocol's helpers (examples/repro/ggr.py) against independent references: the
weight chosen on validation, the compute-matched step count, one cosine schedule over a run
that crosses epochs (the ``longer`` and ``ce-matched`` arms), and the stages' protocols."""

from __future__ import annotations

import itertools
import math
import random
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from repro import ggr  # noqa: E402
from repro.common import build_protocol  # noqa: E402
from repro.train import set_stage  # noqa: E402


def test_select_weight_takes_the_best_validation_accuracy_ties_to_the_smaller():
    rng = random.Random(0)
    grid = [0.003, 0.01, 0.03, 0.1]
    for _ in range(500):
        # accuracies on a 1/20 lattice, so that ties are frequent
        vals = {w: rng.randrange(15, 20) / 20 for w in rng.sample(grid, rng.randint(1, 4))}
        best = max(vals.values())
        reference = min(w for w, v in vals.items() if v == best)  # by hand: smallest of the best
        assert ggr.select_weight(vals) == reference
        shuffled = dict(rng.sample(list(vals.items()), len(vals)))  # order does not matter
        assert ggr.select_weight(shuffled) == reference
    with pytest.raises(ValueError, match="no weights"):
        ggr.select_weight({})


def test_matched_steps_spends_the_ggr_runs_cpu_time_in_ce_steps():
    for steps, ce, gg, dec in itertools.product((0, 1, 160, 1000), (0.05, 0.07), (0.18, 0.2),
                                                (0.0, 3.3, 12.0)):  # fmt: skip
        # exact rational arithmetic, rounding half to even like round()
        exact = (Fraction(steps) * Fraction(gg) + Fraction(dec)) / Fraction(ce)
        assert ggr.matched_steps(steps, ce, gg, dec) == round(exact)
    assert ggr.matched_steps(100, 0.05, 0.1, 1.0) == 220  # 100 * 2 + 1.0 / 0.05
    with pytest.raises(ValueError):
        ggr.matched_steps(10, 0.0, 0.1, 1.0)


def test_sgd_run_is_one_cosine_over_all_its_steps_across_epochs():
    """The lr of step t of a T-step run is lr/2 (1 + cos(pi t / T)), epochs included, and the
    run stops after exactly T steps (mid-epoch)."""
    torch.manual_seed(0)
    x, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    model = nn.Linear(3, 2)
    seen: list[float] = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    cfg = {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 8}  # 7 steps/epoch
    total = 17
    torch.optim.SGD.step = spy  # type: ignore[method-assign]
    try:
        out = ggr.sgd_run(model, x, y, cfg, total, (0, 3))
    finally:
        torch.optim.SGD.step = original  # type: ignore[method-assign]
    reference = [0.5 * 0.2 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert seen == pytest.approx(reference, rel=1e-12, abs=1e-15)
    assert out["epochs"] == 3 and len(out["curve"]) == 3


def test_protocols_of_both_stages():
    try:
        explore = build_protocol(ggr, False, None, "explore")
        confirm = build_protocol(ggr, False, [100, 101], "confirm")
        quick = build_protocol(ggr, True, None, "explore")
    finally:
        set_stage("explore")
    assert explore["studies"]["fashion"]["seeds"] == [0, 1, 2]
    assert explore["settings"]["ggr"]["weights"] == list(ggr.WEIGHTS_EXPLORE)
    assert confirm["settings"]["ggr"]["weights"] == list(ggr.WEIGHTS_CONFIRM)
    for proto in (explore, quick):
        metrics = {p["metric"] for p in proto["studies"]["fashion"]["pairs"]}
        metrics |= {c[0] for c in proto["studies"]["fashion"]["columns"]}
        assert not any("test" in m for m in metrics)
    assert confirm["studies"]["fashion"]["pairs"][0]["metric"] == "test_acc"
    labels = {p["label"] for p in confirm["studies"]["fashion"]["pairs"]}
    assert {label for _, label in ggr.HEADLINE} <= labels
    arms = quick["studies"]["fashion"]["arms"]
    for arm in ("base", "ce", "ggr-val", "ce-matched", "longer"):
        assert f"fashion/{arm}" in arms
    keys = [t.key for t in ggr.tasks(quick)]
    assert len(keys) == len(set(keys)) == 2 * (1 + len(ggr.WEIGHTS_QUICK) + 3)

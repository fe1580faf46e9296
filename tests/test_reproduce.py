"""The reproduction suite (examples/reproduce.py): statistics, schema, cards, quick runs.

The statistics are checked against independent references (scipy's paired t-test and
t-interval, a Monte Carlo power estimate); the quick run checks the JSON schema and that every
premise check is present and computed (not that it passes, nor any effect size); the
committed results must match the schema and the cards' generated regions.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from repro import METHODS, cards  # noqa: E402
from repro.common import (  # noqa: E402
    load_method,
    minimum_detectable_effect,
    paired_summary,
    protocol_hash,
    validate,
)

ENV = {**os.environ, "TORCH_RECAL_COMPILE": "0", "PYTHONPATH": str(ROOT)}


def _run(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "reproduce.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd,
    )


# --------------------------------------------------------------------------- statistics
def test_paired_summary_matches_scipy_t_test():
    rng = np.random.default_rng(0)
    a = rng.normal(0.80, 0.02, 7)
    b = a + rng.normal(0.01, 0.004, 7)
    out = paired_summary(list(b - a), expected="+")
    ref = stats.ttest_rel(b, a)
    lo, hi = stats.t.interval(0.95, 6, loc=np.mean(b - a), scale=stats.sem(b - a))
    assert out["n"] == 7
    assert out["mean"] == pytest.approx(np.mean(b - a), abs=1e-15)
    assert out["sd"] == pytest.approx(np.std(b - a, ddof=1), rel=1e-12)
    assert out["ci95"] == pytest.approx([lo, hi], rel=1e-10)
    assert ref.pvalue < 0.05 and out["resolved"] and out["direction"] == "+"
    assert out["direction_reproduced"] and out["mde80"] is None
    flipped = paired_summary(list(a - b), expected="+")
    assert flipped["resolved"] and flipped["direction"] == "-"
    assert not flipped["direction_reproduced"]


def test_unresolved_difference_reports_its_detectable_effect():
    diffs = [0.01, -0.012, 0.004, -0.003, 0.002]
    out = paired_summary(diffs, expected="+")
    assert stats.ttest_1samp(diffs, 0.0).pvalue > 0.05
    assert not out["resolved"] and out["direction"] is None and not out["direction_reproduced"]
    assert out["mde80"] > abs(out["mean"])


@pytest.mark.parametrize("n", [3, 5, 10])
def test_minimum_detectable_effect_has_80_percent_power(n: int):
    sd = 1.7
    delta = minimum_detectable_effect(n, sd)
    rng = np.random.default_rng(n)
    x = rng.normal(delta, sd, (200_000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    power = float((np.abs(t) > stats.t.ppf(0.975, n - 1)).mean())
    assert power == pytest.approx(0.80, abs=0.006)


def test_minimum_detectable_effect_known_value():
    # paired t-test, two-sided alpha 0.05, power 0.8, n = 30: dz = 0.5292 (G*Power)
    assert minimum_detectable_effect(30, 1.0) == pytest.approx(0.5292, abs=5e-4)


def test_protocol_hash_ignores_seed_lists_and_presentation_only():
    proto = load_method("rifle").protocol(quick=True, seeds=2)
    more = load_method("rifle").protocol(quick=True, seeds=5)
    assert protocol_hash(proto) == protocol_hash(more)
    changed = copy.deepcopy(proto)
    changed["settings"]["finetune"]["lr"] = 0.02
    assert protocol_hash(changed) != protocol_hash(proto)
    relabelled = copy.deepcopy(proto)
    relabelled["studies"]["fashion"]["labels"]["fashion/rifle"] = "RIFLE"
    relabelled["studies"]["fashion"]["columns"].append(["loss", "loss", ""])
    assert protocol_hash(relabelled) == protocol_hash(proto)


# --------------------------------------------------------------------------- schema, cards
def _fake_result(method: str = "refit") -> dict:
    """A schema-valid result built by hand for ``method``'s quick protocol."""
    module = load_method(method)
    proto = module.protocol(quick=True, seeds=2)
    proto["quick"] = True
    rng = np.random.default_rng(1)
    seeds = []
    for s in (0, 1):
        arms = {}
        for study in proto["studies"].values():
            if s in study["seeds"]:
                for arm in study["arms"]:
                    arms[arm] = {
                        k: float(rng.uniform(0.5, 0.9))
                        for k in (
                            "test_acc",
                            "val_acc",
                            "cpu_seconds",
                            "time_to_target",
                            "backward_cpu_seconds",
                        )
                    }
        seeds.append({"seed": s, "arms": arms})
    summary = []
    for name, study in proto["studies"].items():
        for pair in study["pairs"]:
            diffs = [
                r["arms"][pair["b"]][pair["metric"]] - r["arms"][pair["a"]][pair["metric"]]
                for r in seeds
                if r["seed"] in study["seeds"]
            ]
            summary.append({"study": name, **pair, **paired_summary(diffs, pair["expected"])})
    return {
        "schema_version": 1,
        "method": method,
        "command": f"python examples/reproduce.py {method}",
        "protocol": proto,
        "premise": [
            {
                "name": "p",
                "value": 1.0,
                "comparison": ">=",
                "threshold": 0.5,
                "passed": True,
                "detail": "",
            }
        ],
        "arms": [a for st in proto["studies"].values() for a in st["arms"]],
        "seeds": seeds,
        "summary": summary,
        "wall_seconds": 12.0,
        "task_cpu_seconds": 20.0,
        "torch": "x",
        "threads": 1,
        "workers": 2,
        "machine": {},
    }


def test_validate_accepts_a_complete_result_and_names_what_is_missing():
    result = _fake_result()
    assert validate(result) == []
    broken = copy.deepcopy(result)
    broken["premise"][0]["value"] = None
    del broken["torch"]
    broken["seeds"][1]["arms"].pop("final/sgd")
    errors = validate(broken)
    assert any("missing `torch`" in e for e in errors)
    assert any("value not computed" in e for e in errors)
    assert any("seed 1: no result for arm 'final/sgd'" in e for e in errors)
    unresolved = copy.deepcopy(result)
    unresolved["summary"][0].update(resolved=False, mde80=None)
    assert any("unresolved without mde80" in e for e in validate(unresolved))


def test_cards_region_is_rewritten_from_json_and_detected_when_stale(tmp_path: Path):
    result = _fake_result("refit")
    results, card_dir = tmp_path / "results", tmp_path / "methods"
    results.mkdir()
    card_dir.mkdir()
    (results / "refit.json").write_text(json.dumps(result))
    card = card_dir / load_method("refit").CARD
    card.write_text(
        "# Card\n\nbefore\n<!-- repro:refit:begin -->\nOLD TABLE\n<!-- repro:refit:end -->\nafter\n"
    )
    assert cards.stale_cards(results, card_dir) == ["refit"]
    assert cards.update_cards(results, card_dir, tmp_path / "img") == ["refit"]
    text = card.read_text()
    assert text.startswith("# Card\n\nbefore\n") and text.endswith("after\n")
    assert "OLD TABLE" not in text and result["command"] in text
    assert "| refit - SGD |" in text
    assert cards.stale_cards(results, card_dir) == []
    assert (tmp_path / "img" / "repro-refit.png").stat().st_size > 0
    result["summary"][0]["mean"] += 0.01
    (results / "refit.json").write_text(json.dumps(result))
    assert cards.stale_cards(results, card_dir) == ["refit"]


def test_readme_evidence_table_lists_each_headline_pair_from_the_json(tmp_path: Path):
    result = _fake_result("refit")
    results = tmp_path / "results"
    results.mkdir()
    (results / "refit.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- repro:summary:begin -->\n<!-- repro:summary:end -->\nend\n")
    assert cards.summary_stale(results, readme)
    assert cards.update_summary(results, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n")
    rows = [line for line in text.splitlines() if line.startswith("| [refit]")]
    wanted = load_method("refit").HEADLINE
    assert len(rows) == len(wanted)
    first = next(p for p in result["summary"] if (p["study"], p["label"]) == wanted[0])
    lo, hi = first["ci95"]
    # hand-formatted: accuracy differences in points with a sign, two decimals
    assert f"| {first['n']} | {first['mean'] * 100:+.2f} points | " in rows[0]
    assert f"[{lo * 100:+.2f}, {hi * 100:+.2f}]" in rows[0]
    assert not cards.summary_stale(results, readme)
    first["mean"] += 0.01
    (results / "refit.json").write_text(json.dumps(result))
    assert cards.summary_stale(results, readme)
    result["summary"] = [p for p in result["summary"] if p["label"] != wanted[0][1]]
    (results / "refit.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="HEADLINE"):
        cards.update_summary(results, readme)


def test_committed_results_match_schema_and_cards():
    results = ROOT / "docs" / "results"
    found = sorted(p.stem for p in results.glob("*.json"))
    for name in found:
        errors = validate(json.loads((results / f"{name}.json").read_text()))
        assert errors == [], f"docs/results/{name}.json: {errors}"
    assert cards.stale_cards(results, ROOT / "docs" / "methods") == [], (
        "a card's generated region differs from its JSON: run `python examples/reproduce.py cards`"
    )
    assert not cards.summary_stale(results, ROOT / "README.md"), (
        "README evidence table differs from the JSON: run `python examples/reproduce.py cards`"
    )
    for name in METHODS:
        text = cards.card_path(ROOT / "docs" / "methods", name).read_text()
        assert cards.region(text, name) is not None, f"no repro region in the {name} card"


# --------------------------------------------------------------------------- quick runs
@pytest.mark.slow
def test_all_quick_writes_valid_json_with_every_premise_check(tmp_path: Path):
    out = tmp_path / "out"
    proc = _run("all", "--quick", "--out", str(out), "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected_checks = {"calibration": 3, "rifle": 3, "ggr": 2, "refit": 2, "coherent": 7}
    for name in METHODS:
        result = json.loads((out / f"{name}.json").read_text())
        assert validate(result) == [], name
        assert result["protocol"]["quick"] is True
        assert len(result["premise"]) >= expected_checks.get(name, 1), name
        for c in result["premise"]:
            assert isinstance(c["value"], float) and math.isfinite(c["value"]), (name, c)
            assert isinstance(c["passed"], bool)
        assert (out / f"{name}.png").stat().st_size > 0
        assert list((out / name / "parts").glob("*.json"))
    # an interrupted run resumes: drop one part, rerun, only that task runs again, and the
    # task gives the same accuracies in a fresh process (the seed fixes everything but timing)
    parts = sorted((out / "refit" / "parts").glob("*.json"))
    before = json.loads((out / "refit.json").read_text())
    parts[0].unlink()
    proc = _run("refit", "--quick", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(parts) - 1} done, 1 to run" in proc.stdout
    after = json.loads((out / "refit.json").read_text())
    for old, new in zip(before["seeds"], after["seeds"], strict=True):
        assert {a: m["test_acc"] for a, m in old["arms"].items()} == {
            a: m["test_acc"] for a, m in new["arms"].items()
        }


# --------------------------------------------------------------------------- helpers
def test_time_to_target_interpolates_between_epochs():
    from repro.refit import time_to

    curve = [{"cpu": 10.0, "test_acc": 0.5}, {"cpu": 20.0, "test_acc": 0.9}]
    assert time_to(curve, 0.7) == pytest.approx(15.0)
    assert time_to(curve, 0.25) == pytest.approx(5.0)  # from (0 s, accuracy 0)
    assert time_to(curve, 0.95) is None


def test_crop_flip_takes_a_window_of_the_padded_image():
    import torch
    from repro.train import crop_flip, generator
    from torch.nn import functional as F

    x = torch.randn(16, 2, 6, 5)
    assert torch.equal(crop_flip(x, 0, generator(0), flip=False), x)
    out = crop_flip(x, 2, generator(1))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, dy : dy + 6, dx : dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)

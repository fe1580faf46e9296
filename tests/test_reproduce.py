"""The reproduction suite (examples/reproduce.py): stages, pre-registration, schema, cards,
quick runs.

The statistics themselves are tested against scipy/statsmodels in tests/test_repro_stats.py.
Here: the explore stage never reads a test split (the loaders raise, and a quick run over
every protocol passes with the test files replaced by garbage); the confirm stage runs only
under a committed, unchanged pre-registration whose protocol it matches, on seeds disjoint
from exploration's; the committed results match the schema, their pre-registrations and the
cards.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from repro import METHODS, cards, prereg  # noqa: E402
from repro.common import (  # noqa: E402
    build_protocol,
    leaked_test_figures,
    load_method,
    pair_values,
    protocol_hash,
    result_path,
    summarize_pairs,
    validate,
)
from repro.train import (  # noqa: E402
    LockedSplitError,
    current_stage,
    eval_key,
    fashion_subsets,
    fashion_test,
    mnist5k_test,
    set_stage,
)

ENV = {**os.environ, "TORCH_RECAL_COMPILE": "0", "PYTHONPATH": str(ROOT)}
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _run(*args: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "reproduce.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd,
    )


@pytest.fixture
def explore_stage():
    before = current_stage()
    set_stage("explore")
    yield
    set_stage(before)


# --------------------------------------------------------------------------- stages
def test_test_split_loaders_raise_outside_the_confirm_stage(explore_stage):
    with pytest.raises(LockedSplitError, match="confirm stage"):
        fashion_test(None)
    with pytest.raises(LockedSplitError, match="confirm stage"):
        mnist5k_test()
    assert eval_key() == "val_acc"
    with pytest.raises(ValueError, match="stage"):
        set_stage("test")


@pytest.mark.skipif(not FASHION.exists(), reason="needs the Fashion-MNIST IDX files")
def test_explore_subsets_report_on_the_validation_split(explore_stage):
    x, _, vx, vy, ex, ey = fashion_subsets(None, 3, 100, 50, 400)
    assert ex is vx and ey is vy and len(vy) == 50
    _, _, vx0, _, ex0, _ = fashion_subsets(None, 3, 100, 0, 40)  # no val asked: n_test of them
    assert len(vx0) == 40 and ex0 is vx0
    set_stage("confirm")
    x2, _, vx2, _, tx, _ = fashion_subsets(None, 3, 100, 50, 400)
    assert torch_equal(x, x2) and torch_equal(vx, vx2) and len(tx) == 400  # same draw


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_exploration_results_may_hold_no_test_figure():
    result = _fake_result("refit", stage="explore")
    assert leaked_test_figures(result) == [] and validate(result) == []
    leaked = copy.deepcopy(result)
    leaked["seeds"][0]["arms"]["final/sgd"]["test_acc"] = 0.9
    leaked["infos"] = {"x": {"source_test_acc": 0.9}}
    found = leaked_test_figures(leaked)
    assert len(found) == 2 and any("source_test_acc" in f for f in found)
    assert any("test-split figure" in e for e in validate(leaked))


# --------------------------------------------------------------------------- pairs
def test_pair_values_list_missing_seeds_and_take_ratios():
    seeds = [
        {"seed": 100, "arms": {"s/a": {"m": 2.0}, "s/b": {"m": 3.0}}},
        {"seed": 101, "arms": {"s/a": {"m": 4.0}, "s/b": {"m": None}}},
        {"seed": 103, "arms": {"s/a": {"m": 1.0}, "s/b": {"m": 1.5}}},
    ]
    diff = {"a": "s/a", "b": "s/b", "metric": "m"}
    assert pair_values(diff, seeds, [100, 101, 102, 103]) == [1.0, None, None, 0.5]
    ratio = {**diff, "scale": "log_ratio"}
    assert pair_values(ratio, seeds, [100, 103]) == [1.5, 1.5]


def test_headline_family_is_holm_adjusted_and_only_confirm_reproduces():
    from scipy import stats as st

    rng = np.random.default_rng(0)
    proto = {"stage": "confirm", "studies": {"s": {"seeds": list(range(100, 108)),
             "arms": ["s/a", "s/b", "s/c"], "pairs": [
                 {"label": "b - a", "a": "s/a", "b": "s/b", "metric": "m", "unit": "",
                  "expected": "+"},
                 {"label": "c - a", "a": "s/a", "b": "s/c", "metric": "m", "unit": "",
                  "expected": "+"},
                 {"label": "c / b", "a": "s/b", "b": "s/c", "metric": "m", "unit": "x",
                  "expected": "+", "scale": "log_ratio"}]}}}  # fmt: skip
    seeds = [
        {"seed": s, "arms": {"s/a": {"m": 1.0}, "s/b": {"m": 1.0 + 0.3 + 0.1 * rng.normal()},
                             "s/c": {"m": 1.0 + 0.02 + 0.1 * rng.normal()}}}
        for s in range(100, 108)
    ]  # fmt: skip
    out = summarize_pairs(proto, seeds, [("s", "b - a"), ("s", "c - a")], "confirm")
    raw = [st.ttest_1samp(pair_values(p, seeds, proto["studies"]["s"]["seeds"]), 0).pvalue
           for p in proto["studies"]["s"]["pairs"][:2]]  # fmt: skip
    holm = sorted(raw)
    holm = [min(1.0, 2 * holm[0]), min(1.0, max(2 * holm[0], holm[1]))]
    holm = holm if raw[0] <= raw[1] else holm[::-1]
    assert [p["p_holm"] for p in out[:2]] == pytest.approx(holm, rel=1e-9)
    assert out[0]["headline"] and out[0]["verdict"]["reproduced"]
    assert not out[2]["headline"] and not out[2]["verdict"]["reproduced"]
    logs = np.log([seeds[i]["arms"]["s/c"]["m"] / seeds[i]["arms"]["s/b"]["m"] for i in range(8)])
    assert out[2]["geomean"] == pytest.approx(math.exp(logs.mean()), rel=1e-12)
    explored = summarize_pairs({**proto, "stage": "explore"}, seeds, [("s", "b - a")], "explore")
    assert explored[0]["verdict"]["resolved"] and not explored[0]["verdict"]["reproduced"]
    with pytest.raises(ValueError, match="headline"):
        summarize_pairs(proto, seeds, [("s", "nope")], "confirm")


# --------------------------------------------------------------------------- schema, cards
def _fake_result(method: str = "refit", stage: str = "explore") -> dict:
    """A schema-valid result built by hand for ``method``'s quick protocol."""
    module = load_method(method)
    seeds_ids = [0, 1] if stage == "explore" else [100, 101]
    proto = build_protocol(module, True, seeds_ids, stage)
    set_stage("explore")
    rng = np.random.default_rng(1)
    metric_names = {p["metric"] for st in proto["studies"].values() for p in st["pairs"]}
    metric_names |= {c[0] for st in proto["studies"].values() for c in st.get("columns", [])}
    seeds = []
    for s in seeds_ids:
        arms = {}
        for study in proto["studies"].values():
            if s in study["seeds"]:
                for arm in study["arms"]:
                    arms[arm] = {k: float(rng.uniform(0.5, 0.9)) for k in sorted(metric_names)}
        seeds.append({"seed": s, "arms": arms})
    headline = [list(h) for h in module.HEADLINE]
    summary = summarize_pairs(proto, seeds, [tuple(h) for h in headline], stage)
    result = {
        "schema_version": 2,
        "method": method,
        "stage": stage,
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
        "headline": headline,
        "summary": summary,
        "infos": {},
        "wall_seconds": 12.0,
        "task_cpu_seconds": 20.0,
        "torch": "x",
        "threads": 1,
        "workers": 2,
        "machine": {},
    }
    if stage == "confirm":
        result["preregistration"] = {"path": "p.json", "sha256": "0" * 64, "commit": "a" * 40}
    return result


def test_validate_accepts_a_complete_result_and_names_what_is_missing():
    result = _fake_result()
    assert validate(result) == []
    assert validate(_fake_result(stage="confirm")) == []
    broken = copy.deepcopy(result)
    broken["premise"][0]["value"] = None
    del broken["torch"]
    broken["seeds"][1]["arms"].pop("final/sgd")
    errors = validate(broken)
    assert any("missing `torch`" in e for e in errors)
    assert any("value not computed" in e for e in errors)
    assert any("seed 1: no result for arm 'final/sgd'" in e for e in errors)
    claimed = copy.deepcopy(result)
    claimed["summary"][0]["verdict"]["reproduced"] = True
    assert any("reproduced outside" in e for e in validate(claimed))
    unregistered = _fake_result(stage="confirm")
    del unregistered["preregistration"]
    assert any("preregistration" in e for e in validate(unregistered))


def _card_skeleton(path: Path, name: str) -> None:
    path.write_text(
        f"# Card\n\nbefore\n<!-- repro:{name}:begin -->\nOLD\n<!-- repro:{name}:end -->\n"
        f"middle\n<!-- repro:{name}-explore:begin -->\nOLD\n<!-- repro:{name}-explore:end -->\n"
        "after\n"
    )


def test_cards_regions_are_rewritten_from_json_and_detected_when_stale(tmp_path: Path):
    results, card_dir = tmp_path / "results", tmp_path / "methods"
    (results / "explore").mkdir(parents=True)
    card_dir.mkdir()
    for name in METHODS:
        _card_skeleton(cards.card_path(card_dir, name), name)
    explored = _fake_result("refit", "explore")
    (results / "explore" / "refit.json").write_text(json.dumps(explored))
    assert "refit" in cards.stale_cards(results, card_dir)
    assert cards.update_cards(results, card_dir, tmp_path / "img") == ["refit"]
    text = cards.card_path(card_dir, "refit").read_text()
    assert text.startswith("# Card\n\nbefore\n") and text.endswith("after\n")
    assert "OLD" not in text and "No confirm run yet" in text and "**Exploratory**" in text
    assert "reproduced" not in text.split("middle")[1]
    assert cards.stale_cards(results, card_dir) == []
    assert (tmp_path / "img" / "explore-refit.png").stat().st_size > 0
    explored["summary"][0]["mean"] += 0.01
    (results / "explore" / "refit.json").write_text(json.dumps(explored))
    assert cards.stale_cards(results, card_dir) == ["refit"]


def test_readme_evidence_table_shows_confirm_headline_pairs_only(tmp_path: Path):
    results = tmp_path / "results"
    (results / "explore").mkdir(parents=True)
    (results / "explore" / "refit.json").write_text(json.dumps(_fake_result("refit")))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- repro:summary:begin -->\n<!-- repro:summary:end -->\nend\n")
    cards.update_summary(results, readme)
    text = readme.read_text()
    assert "| [refit]" in text and "no confirm run yet" in text  # exploration stays out
    confirmed = _fake_result("refit", "confirm")
    (results / "refit.json").write_text(json.dumps(confirmed))
    assert cards.summary_stale(results, readme)
    cards.update_summary(results, readme)
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| [refit]")]
    headline = [p for p in confirmed["summary"] if p["headline"]]
    assert len(rows) == len(headline)
    first = headline[0]
    lo, hi = first["ci_holm"]
    # hand-formatted: accuracy differences in points with a sign, two decimals
    assert f"| {first['mean'] * 100:+.2f} points |" in rows[0]
    assert f"[{lo * 100:+.2f}, {hi * 100:+.2f}]" in rows[0]
    assert "| held |" in rows[0]
    assert not cards.summary_stale(results, readme)


# --------------------------------------------------------------------------- pre-registration
def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _repo_with_prereg(tmp_path: Path, name: str = "refit", seeds=(100, 101)) -> Path:
    repo = tmp_path / "repo"
    (repo / "docs" / "results" / "preregistered").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    data = prereg.build(name, list(seeds), [0, 1], root=repo, quick=True)
    path = prereg.write(data, root=repo)
    set_stage("explore")
    return path


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_confirm_refuses_an_uncommitted_changed_or_mismatching_preregistration(tmp_path):
    path = _repo_with_prereg(tmp_path)
    repo = path.parents[3]
    with pytest.raises(prereg.PreregistrationError, match="not committed"):
        prereg.checked("refit", path)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "register")
    ok = prereg.checked("refit", path)
    import hashlib

    assert ok["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(ok["commit"]) == 40 and ok["path"] == "docs/results/preregistered/refit.json"
    data = json.loads(path.read_text())
    proto = build_protocol(load_method("refit"), True, data["seeds"], "confirm")
    set_stage("explore")
    prereg.match(ok, proto, protocol_hash(proto))  # the code's protocol is the registered one
    changed = copy.deepcopy(proto)
    changed["settings"]["lr"] = 0.5
    with pytest.raises(prereg.PreregistrationError, match="settings: \\['lr'\\]"):
        prereg.match(ok, changed, protocol_hash(changed))
    data["notes"] = "edited after the commit"
    path.write_text(json.dumps(data))
    with pytest.raises(prereg.PreregistrationError, match="changed since"):
        prereg.checked("refit", path)


def test_preregistration_seeds_must_avoid_exploration(tmp_path: Path):
    with pytest.raises(prereg.PreregistrationError, match=">= 100"):
        prereg.build("refit", [5, 100], root=tmp_path, quick=True)
    with pytest.raises(prereg.PreregistrationError, match="used in exploration"):
        prereg.build("refit", [100, 101], [101], root=tmp_path, quick=True)
    explored = _fake_result("refit")
    for rec, s in zip(explored["seeds"], (100, 7), strict=True):
        rec["seed"] = s
    (tmp_path / "docs" / "results" / "explore").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "explore" / "refit.json").write_text(json.dumps(explored))
    with pytest.raises(prereg.PreregistrationError, match=r"\[100\] were used"):
        prereg.build("refit", [100, 102], root=tmp_path, quick=True)
    set_stage("explore")


def test_committed_results_match_schema_preregistrations_and_cards():
    results = ROOT / "docs" / "results"
    for stage in ("explore", "confirm"):
        for name in METHODS:
            path = result_path(results, name, stage)
            if not path.exists():
                continue
            result = json.loads(path.read_text())
            assert validate(result) == [], f"{path}: {validate(result)}"
            assert result["stage"] == stage and not result["protocol"].get("quick"), path
            if stage == "confirm":
                reg = result["preregistration"]
                raw = (ROOT / reg["path"]).read_bytes()
                import hashlib

                assert hashlib.sha256(raw).hexdigest() == reg["sha256"], (
                    f"{reg['path']} changed after it governed {path.name}"
                )
                data = json.loads(raw)
                assert data["protocol_hash"] == result["protocol_hash"]
                assert not set(data["seeds"]) & set(data["explore_seeds"])
                explored = result_path(results, name, "explore")
                if explored.exists():
                    ex = {r["seed"] for r in json.loads(explored.read_text())["seeds"]}
                    assert not ex & {r["seed"] for r in result["seeds"]}
                if (ROOT / ".git").exists():  # registered in an earlier commit than the run
                    run = result["torch_recal"].split("commit ")[-1].split(",")[0].rstrip(")")
                    anc = subprocess.run(
                        ["git", "-C", str(ROOT), "merge-base", "--is-ancestor", reg["commit"],
                         run], capture_output=True, check=False,
                    )  # fmt: skip
                    assert anc.returncode == 0, f"{path.name}: run {run} precedes its registration"
    assert cards.stale_cards(results, ROOT / "docs" / "methods") == [], (
        "a card's generated region differs from its JSON: run `python examples/reproduce.py cards`"
    )
    assert not cards.summary_stale(results, ROOT / "README.md"), (
        "README evidence table differs from the JSON: run `python examples/reproduce.py cards`"
    )


# --------------------------------------------------------------------------- quick runs
def _data_dir_without_test_split(tmp_path: Path) -> Path:
    """A copy of the training IDX files beside test files that are not IDX files: any read of
    the test split fails."""
    d = tmp_path / "fashion"
    d.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(FASHION / f"{stem}.gz", d / f"{stem}.gz")
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(d / f"{stem}.gz", "wb") as f:
            f.write(b"poisoned: the explore stage must not read the test split")
    return d


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs the Fashion-MNIST IDX files")
def test_explore_quick_runs_every_protocol_without_the_test_split(tmp_path: Path):
    out = tmp_path / "out"
    data = _data_dir_without_test_split(tmp_path)
    proc = _run("all", "--quick", "--out", str(out), "--data-dir", str(data), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in METHODS:
        result = json.loads(result_path(out, name, "explore").read_text())
        assert validate(result) == [], name
        assert result["stage"] == "explore" and result["protocol"]["quick"] is True
        assert leaked_test_figures(result) == [], name
        assert result["premise"], name
        for c in result["premise"]:
            assert isinstance(c["value"], float) and math.isfinite(c["value"]), (name, c)
        assert result_path(out, name, "explore").with_suffix(".png").stat().st_size > 0
    # an interrupted run resumes: drop one part, rerun, only that task runs again, and the
    # task gives the same accuracies in a fresh process (the seed fixes everything but timing)
    parts = sorted((out / "explore" / "refit" / "parts").glob("*.json"))
    before = json.loads(result_path(out, "refit", "explore").read_text())
    parts[0].unlink()
    proc = _run("refit", "--quick", "--out", str(out), "--data-dir", str(data), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(parts) - 1} done, 1 to run" in proc.stdout
    after = json.loads(result_path(out, "refit", "explore").read_text())
    for old, new in zip(before["seeds"], after["seeds"], strict=True):
        assert {a: m["val_acc"] for a, m in old["arms"].items()} == {
            a: m["val_acc"] for a, m in new["arms"].items()
        }


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("git") is None or not FASHION.exists(), reason="needs git and Fashion-MNIST"
)
def test_confirm_quick_run_follows_its_committed_preregistration(tmp_path: Path):
    path = _repo_with_prereg(tmp_path, "refit", seeds=(100, 101))
    repo = path.parents[3]
    out = tmp_path / "out"
    proc = _run("refit", "--stage", "confirm", "--prereg", str(path), "--out", str(out), cwd=repo)
    assert proc.returncode != 0 and "not committed" in proc.stderr
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "register")
    proc = _run("refit", "--stage", "confirm", "--prereg", str(path), "--out", str(out), cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_path(out, "refit", "confirm").read_text())
    assert validate(result) == []
    assert result["stage"] == "confirm" and [r["seed"] for r in result["seeds"]] == [100, 101]
    assert result["preregistration"]["path"] == "docs/results/preregistered/refit.json"
    assert "test_acc" in result["seeds"][0]["arms"]["final/sgd"]
    registered = json.loads(path.read_text())
    assert [p["label"] for p in result["summary"] if p["headline"]] == [
        p["label"] for p in registered["headline"]
    ]


# --------------------------------------------------------------------------- helpers
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

"""The reproduction suite's statistics (examples/repro/stats.py) against independent references.

References: scipy's one-sample and paired t-tests and t-interval; scipy's geometric mean and a
t-interval computed by hand on the logs; statsmodels' Holm correction and a hand-checked
example; a Monte Carlo estimate of power and the G*Power value for the detectable effect.
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from repro.stats import holm, holm_family, summarize, verdict  # noqa: E402


@pytest.fixture
def statsmodels_holm(monkeypatch: pytest.MonkeyPatch):
    """statsmodels' Holm: ``(reject, corrected)`` at alpha 0.05 (the test skips without it).

    ``multipletests(method="holm")`` runs ``gc.collect()`` on every call (50-200 ms here);
    collection changes no result, so it is skipped while the test runs.
    """
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    monkeypatch.setattr(gc, "collect", lambda *args: 0)

    def reference(pvalues):
        reject, corrected, _, _ = multitest.multipletests(pvalues, alpha=0.05, method="holm")
        return list(reject), list(corrected)

    return reference


def _with_p(p: float, n: int = 6, sign: float = 1.0, sd: float = 1.0) -> list[float]:
    """``n`` values whose one-sample t-test against 0 has two-sided p-value ``p``."""
    z = np.arange(n, dtype=float)
    z = (z - z.mean()) / z.std(ddof=1) * sd
    mean = sign * stats.t.isf(p / 2, n - 1) * sd / math.sqrt(n)
    return list(mean + z)


# --------------------------------------------------------------------------- summarize
def test_difference_summary_matches_scipy_paired_t_test():
    rng = np.random.default_rng(0)
    a = rng.normal(0.80, 0.02, 7)
    b = a + rng.normal(0.004, 0.006, 7)
    d = b - a
    out = summarize(list(d))
    assert out["scale"] == "difference" and out["n"] == out["n_planned"] == 7
    assert out["missing_seeds"] == [] and out["values"] == list(d)
    assert out["mean"] == pytest.approx(np.mean(d), rel=1e-14)
    assert out["sd"] == pytest.approx(np.std(d, ddof=1), rel=1e-12)
    assert out["se"] == pytest.approx(stats.sem(d), rel=1e-12)
    assert out["df"] == 6
    assert out["ci"] == pytest.approx(
        list(stats.t.interval(0.95, 6, loc=np.mean(d), scale=stats.sem(d))), rel=1e-10
    )
    assert out["p"] == pytest.approx(stats.ttest_rel(b, a).pvalue, rel=1e-10)
    assert out["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-10)
    assert out["geomean"] is None and out["ratio_ci"] is None
    assert out["mde_note"] == "" and out["mde_plugin_sd"] > 0


def test_difference_summary_other_alpha_matches_scipy_interval():
    d = [0.3, -0.1, 0.45, 0.2, 0.05, 0.6, -0.2, 0.35, 0.1]
    out = summarize(d, alpha=0.1)
    ref = stats.ttest_1samp(d, 0.0)
    assert out["alpha"] == 0.1
    assert out["ci"] == pytest.approx(list(ref.confidence_interval(0.9)), rel=1e-10)
    assert out["p"] == pytest.approx(ref.pvalue, rel=1e-10)


def test_log_ratio_summary_is_geometric_mean_and_t_interval_on_logs():
    rng = np.random.default_rng(1)
    a = rng.uniform(10.0, 12.0, 8)  # e.g. seconds per epoch
    b = a * rng.lognormal(0.05, 0.04, 8)
    ratios = b / a
    out = summarize(list(ratios), scale="log_ratio")
    logs = np.log(ratios)
    half = stats.t.ppf(0.975, 7) * np.std(logs, ddof=1) / math.sqrt(8)  # by hand
    assert out["scale"] == "log_ratio" and out["values"] == pytest.approx(list(ratios))
    assert out["geomean"] == pytest.approx(stats.gmean(ratios), rel=1e-12)
    assert out["mean"] == pytest.approx(np.mean(logs), rel=1e-12)
    assert out["sd"] == pytest.approx(np.std(logs, ddof=1), rel=1e-12)
    assert out["ci"] == pytest.approx([np.mean(logs) - half, np.mean(logs) + half], rel=1e-10)
    assert out["ratio_ci"] == pytest.approx(list(np.exp(out["ci"])), rel=1e-14)
    assert out["ratio_ci"][0] < out["geomean"] < out["ratio_ci"][1]
    assert out["p"] == pytest.approx(stats.ttest_rel(np.log(b), np.log(a)).pvalue, rel=1e-10)


def test_log_ratio_summary_is_symmetric_in_the_two_arms():
    ratios = [1.08, 0.97, 1.12, 1.05, 1.01]
    forward = summarize(ratios, scale="log_ratio")
    backward = summarize([1 / r for r in ratios], scale="log_ratio")
    assert forward["geomean"] * backward["geomean"] == pytest.approx(1.0, rel=1e-14)
    assert forward["ratio_ci"][0] * backward["ratio_ci"][1] == pytest.approx(1.0, rel=1e-12)
    assert forward["p"] == pytest.approx(backward["p"], rel=1e-12)


def test_missing_values_are_listed_by_seed_and_excluded():
    values = [0.02, None, 0.01, math.nan, 0.03, math.inf, -0.005, -math.inf]
    seeds = [10, 11, 12, 13, 14, 15, 16, 17]
    out = summarize(values, seeds=seeds)
    finite = [0.02, 0.01, 0.03, -0.005]
    assert out["missing_seeds"] == [11, 13, 15, 17]
    assert out["n"] == 4 and out["n_planned"] == 8 and out["values"] == finite
    ref = summarize(finite)
    for key in ("mean", "sd", "se", "df", "ci", "p", "mde_plugin_sd"):
        assert out[key] == ref[key]
    assert out["p"] == pytest.approx(stats.ttest_1samp(finite, 0.0).pvalue, rel=1e-10)


def test_missing_ratios_include_non_positive_ones_and_default_to_indices():
    values = [1.1, -1.05, 1.2, 0.0, None, 1.15, math.nan]
    out = summarize(values, scale="log_ratio")
    assert out["missing_seeds"] == [1, 3, 4, 6]
    assert out["n"] == 3 and out["n_planned"] == 7 and out["values"] == [1.1, 1.2, 1.15]
    assert out["geomean"] == pytest.approx(stats.gmean([1.1, 1.2, 1.15]), rel=1e-12)


def test_summary_with_no_values_is_all_none():
    out = summarize([None, math.nan], seeds=[4, 5])
    assert out["n"] == 0 and out["n_planned"] == 2 and out["missing_seeds"] == [4, 5]
    for key in ("mean", "sd", "se", "df", "ci", "p", "mde_plugin_sd"):
        assert out[key] is None
    assert out["mde_note"]
    ratios = summarize([], scale="log_ratio")
    assert ratios["geomean"] is None and ratios["ratio_ci"] is None and ratios["n_planned"] == 0


def test_summary_with_one_value_has_the_mean_only():
    out = summarize([None, 0.7], scale="log_ratio")
    assert out["n"] == 1 and out["mean"] == pytest.approx(math.log(0.7))
    assert out["geomean"] == pytest.approx(0.7)
    for key in ("sd", "se", "df", "ci", "p", "ratio_ci", "mde_plugin_sd"):
        assert out[key] is None
    assert "n = 1" in out["mde_note"]


@pytest.mark.parametrize(("value", "p"), [(0.1, 0.0), (0.0, 1.0), (-0.3, 0.0)])
def test_constant_values_have_a_point_interval_and_no_power(value: float, p: float):
    out = summarize([value] * 4)
    assert out["sd"] == 0.0 and out["se"] == 0.0 and out["df"] == 3
    assert out["mean"] == value and out["ci"] == [value, value] and out["p"] == p
    assert out["mde_plugin_sd"] is None and "sd = 0" in out["mde_note"]


def test_summarize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        summarize([1.0, 2.0], scale="ratio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        summarize([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="power"):
        summarize([1.0, 2.0], power=0.01)
    with pytest.raises(ValueError, match="seeds"):
        summarize([1.0, 2.0], seeds=[0])


# --------------------------------------------------------------------------- power
def _monte_carlo_power(delta: float, sd: float, n: int, alpha: float) -> float:
    rng = np.random.default_rng(n)
    x = rng.normal(delta, sd, (200_000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    return float((np.abs(t) > stats.t.isf(alpha / 2, n - 1)).mean())


@pytest.mark.parametrize(
    ("n", "alpha", "power"),
    [(2, 0.05, 0.8), (3, 0.05, 0.8), (5, 0.05, 0.8), (10, 0.05, 0.8), (10, 0.01, 0.9)],
)
def test_detectable_effect_has_the_stated_power_at_the_observed_sd(
    n: int, alpha: float, power: float
):
    values = list(np.random.default_rng(100 + n).normal(0.2, 1.7, n))
    out = summarize(values, alpha=alpha, power=power)
    assert out["mde_note"] == "" and out["mde_plugin_sd"] > 0
    estimate = _monte_carlo_power(out["mde_plugin_sd"], out["sd"], n, alpha)
    assert estimate == pytest.approx(power, abs=0.006)


def test_detectable_effect_matches_g_power():
    # one-sample/paired t-test, two-sided alpha 0.05, power 0.8, n = 30: dz = 0.5292 (G*Power)
    out = summarize(_with_p(0.3, n=30, sd=2.5))
    assert out["sd"] == pytest.approx(2.5, rel=1e-12)
    assert out["mde_plugin_sd"] / out["sd"] == pytest.approx(0.5292, abs=5e-4)


def test_detectable_effect_on_log_scale_uses_the_sd_of_the_logs():
    ratios = [1.08, 0.97, 1.12, 1.05, 1.01]
    out = summarize(ratios, scale="log_ratio")
    same = summarize(list(np.log(ratios)))
    assert out["mde_plugin_sd"] == pytest.approx(same["mde_plugin_sd"], rel=1e-12)


def test_nan_power_is_not_computed_never_one(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(stats.nct, "sf", lambda *args, **kwargs: math.nan)
    out = summarize([0.01, -0.02, 0.015, 0.003])
    assert out["p"] is not None and out["ci"] is not None  # the t-test itself is fine
    assert out["mde_plugin_sd"] is None and "power not computable" in out["mde_note"]
    assert "nan" in out["mde_note"]


def test_nan_while_widening_the_bracket_is_not_computed(monkeypatch: pytest.MonkeyPatch):
    real_sf = stats.nct.sf

    def sf(x, df, nc, *args, **kwargs):  # NaN only for large noncentrality, as scipy's cdf does
        return math.nan if abs(nc) > 5.0 else real_sf(x, df, nc, *args, **kwargs)

    monkeypatch.setattr(stats.nct, "sf", sf)
    # n = 3: the bracket starts at ncp = t_crit = 4.30 (power 0.6) and widens to 6.45; the
    # root is at ncp = 5.65
    out = summarize([0.01, -0.02, 0.015])
    assert out["mde_plugin_sd"] is None and "nan" in out["mde_note"]


def test_unreachable_power_is_not_computed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(stats.nct, "sf", lambda *args, **kwargs: 0.0)
    out = summarize([0.01, -0.02, 0.015, 0.003])
    assert out["mde_plugin_sd"] is None and "not bracketed" in out["mde_note"]


# --------------------------------------------------------------------------- holm
def test_holm_hand_checked_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 * 0.005, 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)


def test_holm_caps_at_one_and_keeps_none_out_of_the_family():
    assert holm([0.5, None, 0.4, None]) == [0.8, None, 0.8, None]  # m = 2
    assert holm([0.9, 0.6, 0.01]) == [1.0, 1.0, 0.03]
    assert holm([]) == [] and holm([None]) == [None]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 20])
def test_holm_matches_statsmodels(m: int, statsmodels_holm):
    rng = np.random.default_rng(m)
    for _ in range(50):
        p = rng.uniform(0, 0.2, m) ** rng.uniform(0.5, 3)
        p[rng.random(m) < 0.2] = p[0]  # ties
        _, ref = statsmodels_holm(p)
        assert holm(list(p)) == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_holm_rejects_invalid_p_values():
    with pytest.raises(ValueError, match="p-value 1"):
        holm([0.1, math.nan])
    with pytest.raises(ValueError, match="p-value 0"):
        holm([1.2])


def test_holm_family_levels_follow_the_step_down():
    # raw p 0.001, 0.03, 0.012, 0.04: steps at 0.05/4 (0.001 rejected), 0.05/3 (0.012
    # rejected), then 0.05/2: 0.03 > 0.025 stops, so 0.03 and 0.04 are drawn at 0.025.
    family = [summarize(_with_p(p)) for p in (0.001, 0.03, 0.012, 0.04)]
    holm_family(family)
    assert [s["level_holm"] for s in family] == pytest.approx([0.0125, 0.025, 0.05 / 3, 0.025])
    assert [s["rejected_holm"] for s in family] == [True, False, True, False]
    assert [s["m_holm"] for s in family] == [4] * 4
    assert [s["p_holm"] for s in family] == pytest.approx([0.004, 0.06, 0.036, 0.06])
    for s in family:
        ref = stats.t.interval(1 - s["level_holm"], s["df"], loc=s["mean"], scale=s["se"])
        assert s["ci_holm"] == pytest.approx(list(ref), rel=1e-10)
        assert (s["ci_holm"][0] > 0) == s["rejected_holm"]
    all_rejected = [summarize(_with_p(p)) for p in (0.001, 0.02, 0.012)]
    holm_family(all_rejected)
    assert [s["level_holm"] for s in all_rejected] == pytest.approx([0.05 / 3, 0.05, 0.025])
    assert all(s["rejected_holm"] for s in all_rejected)


def test_holm_family_ties_keep_input_order():
    family = [summarize(_with_p(0.02)), summarize(_with_p(0.02)), summarize(_with_p(0.001))]
    holm_family(family)
    assert [s["level_holm"] for s in family] == pytest.approx([0.025, 0.05, 0.05 / 3])


def test_holm_family_interval_excludes_zero_iff_holm_rejects(statsmodels_holm):
    rng = np.random.default_rng(7)
    families = 0
    for _ in range(120):
        m = int(rng.integers(1, 7))
        family = []
        for _ in range(m):
            n = int(rng.integers(2, 9))
            scale = "log_ratio" if rng.random() < 0.3 else "difference"
            x = rng.normal(rng.normal(0, 0.8), 1.0, n)
            family.append(summarize(list(np.exp(x) if scale == "log_ratio" else x), scale=scale))
        holm_family(family)
        reject, corrected = statsmodels_holm([s["p"] for s in family])
        assert [s["rejected_holm"] for s in family] == reject
        assert [s["p_holm"] for s in family] == pytest.approx(corrected, rel=1e-12)
        for s in family:
            lo, hi = s["ci_holm"]
            assert (lo > 0 or hi < 0) == s["rejected_holm"]
            assert s["alpha"] / m <= s["level_holm"] <= s["alpha"]
            if s["scale"] == "log_ratio":
                assert s["ratio_ci_holm"] == pytest.approx([math.exp(lo), math.exp(hi)])
        families += any(s["rejected_holm"] for s in family) and not all(
            s["rejected_holm"] for s in family
        )
    assert families >= 10  # the mixed case (some rejected, some not) was exercised


def test_holm_family_skips_summaries_without_p():
    family = [summarize(_with_p(0.01)), summarize([0.3]), summarize(_with_p(0.03))]
    holm_family(family)
    assert family[1]["p_holm"] is None and family[1]["ci_holm"] is None
    assert family[1]["level_holm"] is None and family[1]["rejected_holm"] is False
    assert [family[0]["m_holm"], family[0]["p_holm"], family[2]["p_holm"]] == pytest.approx(
        [2, 0.02, 0.03]
    )


def test_holm_family_needs_one_alpha():
    family = [summarize(_with_p(0.01)), summarize(_with_p(0.01), alpha=0.1)]
    with pytest.raises(ValueError, match="alpha"):
        holm_family(family)


def test_holm_family_detectable_effect_is_at_the_holm_level():
    family = [summarize(_with_p(0.2)), summarize(_with_p(0.3))]
    holm_family(family)
    for s in family:
        assert s["level_holm"] == 0.025 and s["mde_note_holm"] == ""
        assert s["mde_plugin_sd_holm"] > s["mde_plugin_sd"]


def test_holm_family_difference_has_no_ratio_interval_and_empty_family_is_fine():
    family = [summarize(_with_p(0.01)), summarize(list(np.exp(_with_p(0.02))), scale="log_ratio")]
    holm_family(family)
    assert family[0]["ratio_ci_holm"] is None
    assert family[1]["ratio_ci_holm"] == pytest.approx(list(np.exp(family[1]["ci_holm"])))
    holm_family([])


def test_holm_family_keeps_the_callers_extra_keys():
    s = {"study": "main", "label": "ggr - ce", "expected": "+", **summarize(_with_p(0.001))}
    holm_family([s])
    assert s["study"] == "main" and s["label"] == "ggr - ce" and s["rejected_holm"]


# --------------------------------------------------------------------------- verdict
def test_verdict_reproduced_and_opposite_in_the_family():
    up, down = summarize(_with_p(0.001)), summarize(_with_p(0.002, sign=-1))
    holm_family([up, down])
    assert verdict(up, "+", family=True) == {
        "resolved": True,
        "direction": "+",
        "reproduced": True,
        "interval": "holm",
    }
    assert verdict(down, "-", family=True)["reproduced"]
    opposite = verdict(down, "+", family=True)
    assert opposite["resolved"] and opposite["direction"] == "-" and not opposite["reproduced"]
    assert verdict(down, "", family=True) == {
        "resolved": True,
        "direction": "-",
        "reproduced": False,
        "interval": "holm",
    }


def test_verdict_outside_the_family_never_reproduces_and_needs_no_holm_keys():
    out = summarize(_with_p(0.001))
    assert "ci_holm" not in out
    assert verdict(out, "+", family=False) == {
        "resolved": True,
        "direction": "+",
        "reproduced": False,
        "interval": "raw",
    }
    assert verdict(out, "-", family=False)["direction"] == "+"


def test_verdict_in_the_family_uses_the_holm_interval():
    family = [summarize(_with_p(p)) for p in (0.03, 0.04, 0.2)]  # raw 0.03 < 0.05 < 3 * 0.03
    holm_family(family)
    raw = verdict(family[0], "+", family=False)
    held = verdict(family[0], "+", family=True)
    assert raw["resolved"] and raw["direction"] == "+" and raw["interval"] == "raw"
    assert held == {"resolved": False, "direction": None, "reproduced": False, "interval": "holm"}


def test_verdict_without_an_interval_resolves_nothing():
    unresolved = {"resolved": False, "direction": None, "reproduced": False, "interval": "raw"}
    assert verdict(summarize([0.01, -0.012, 0.004, -0.003, 0.002]), "+", family=False) == (
        unresolved
    )
    assert verdict(summarize([0.4]), "+", family=False) == unresolved  # n = 1: no interval
    assert verdict(summarize([None, math.nan]), "", family=False) == unresolved
    one = [summarize([0.4])]
    holm_family(one)  # p None: not in the family, ci_holm None
    assert verdict(one[0], "+", family=True) == {**unresolved, "interval": "holm"}
    constant = verdict(summarize([0.2, 0.2, 0.2]), "+", family=False)  # sd = 0: ci [0.2, 0.2]
    assert constant["resolved"] and constant["direction"] == "+"
    assert not verdict(summarize([0.0, 0.0, 0.0]), "+", family=False)["resolved"]


def test_verdict_rejects_bad_calls():
    out = summarize(_with_p(0.01))
    with pytest.raises(ValueError, match="holm_family"):
        verdict(out, "+", family=True)
    with pytest.raises(ValueError, match="expected"):
        verdict(out, "up", family=False)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- imports
def test_importing_the_module_loads_neither_scipy_nor_torch():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import repro.stats; "
        "print(sorted(m for m in ('scipy', 'torch', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "examples")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"

"""Paired statistics of the reproduction suite: summaries, Holm's correction, power, verdicts.

A comparison is a list of per-seed paired quantities (a seed fixes the data subset and the
initialisation of both arms):

* ``scale="difference"``: the differences ``b - a`` (e.g. accuracy points);
* ``scale="log_ratio"``: the ratios ``b / a`` (e.g. wall time), summarised on the natural log
  scale, so the reported centre is the geometric mean ratio and the interval is a ratio
  interval (an arithmetic mean of ratios is biased upwards and not symmetric in ``a``/``b``).

:func:`summarize` gives the mean, sd, two-sided t-interval and one-sample t-test p-value of one
comparison and the smallest effect it could have detected (a planning figure with the observed
sd plugged in, never a guarantee); seeds whose value is missing or not finite are listed, not
silently dropped. :func:`holm_family` applies Holm's (1979) step-down correction to the declared
headline comparisons of a method and adds intervals whose exclusion of 0 agrees with Holm's
decisions. :func:`verdict` reads a summary's interval: resolved or not, which direction, and
whether a headline claim is reproduced (the method cards word it).

Reference: S. Holm, "A simple sequentially rejective multiple test procedure", Scandinavian
Journal of Statistics 6 (1979) 65-70, https://www.jstor.org/stable/4615733.

scipy is imported inside the functions: the suite's worker processes import this module but
do not all need it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["holm", "holm_family", "summarize", "verdict"]

Scale = Literal["difference", "log_ratio"]
_SCALES = ("difference", "log_ratio")
_MAX_WIDENINGS = 200  # the bracket grows by 1.5x per step: 1.5**200 ~ 1e35 standard errors


class _NotFinite(ArithmeticError):
    """The noncentral t distribution returned NaN or inf."""


def summarize(
    values: Sequence[float | None],
    *,
    seeds: Sequence[int] | None = None,
    scale: Scale = "difference",
    alpha: float = 0.05,
    power: float = 0.8,
) -> dict[str, Any]:
    """Summarise one paired comparison: mean, sd, t-interval, t-test, detectable effect.

    Missing entries (``None``, NaN, ±inf and, for ``"log_ratio"``, ratios ``<= 0``) are
    excluded from every statistic and listed in ``"missing_seeds"``.

    Degenerate samples: with ``n = 0`` every statistic is ``None``; with ``n = 1`` only the
    mean (and the geometric mean) is given. With ``n >= 2`` and all values equal (``sd = 0``)
    the t statistic is ±inf or undefined, so this function sets ``ci = [mean, mean]`` and
    ``p = 0.0`` if ``mean != 0`` else ``1.0`` (the limits as the spread goes to 0), and gives
    no detectable effect.

    ``mde_plugin_sd`` is the smallest true mean (on the summary's scale) that a two-sided
    one-sample t-test at level ``alpha`` with this ``n`` detects with probability ``power``,
    computed exactly from the noncentral t distribution **with the observed sd taken as the
    true sd**. The observed sd of a few seeds is itself very uncertain, so this is a planning
    figure ("an effect of about this size would usually have been seen"), not a guarantee that
    an effect this large would have been detected. It is ``None``, with the reason in
    ``"mde_note"``, whenever it cannot be computed honestly: ``n < 2``, ``sd = 0``, a NaN or
    inf from the noncentral t distribution anywhere while bracketing or solving, or a root
    that cannot be bracketed. A NaN power is never read as 1.

    Args:
        values: Per-seed paired quantities, in seed order: differences ``b - a`` for
            ``"difference"``, positive ratios ``b / a`` for ``"log_ratio"``.
        seeds: The seed of each entry of ``values`` (same length), used to name missing
            entries; by default their indices.
        scale: ``"difference"`` or ``"log_ratio"`` (summarised as ``log(b / a)``).
        alpha: Two-sided level of the test; the interval has coverage ``1 - alpha``.
        power: Target power of the detectable effect, in ``(alpha, 1)``.

    Returns:
        A dict with ``n`` (values used), ``n_planned`` (``len(values)``), ``missing_seeds``,
        ``scale``, ``mean``, ``sd`` (ddof 1), ``se``, ``df``, ``ci`` (``[lo, hi]``), ``p``
        (two-sided one-sample t-test against 0), ``values`` (the finite values used, on the
        input scale), ``alpha``, ``power``, ``mde_plugin_sd``, ``mde_note`` (``""`` when the
        detectable effect was computed, else why not), ``geomean`` and ``ratio_ci``. For
        ``"log_ratio"`` ``mean``, ``sd``, ``se``, ``ci`` and ``mde_plugin_sd`` are on the log
        scale, ``geomean`` is ``exp(mean)`` and ``ratio_ci`` is ``exp(ci)``; for
        ``"difference"`` those two are ``None``. Statistics that cannot be computed are
        ``None``.

    Raises:
        ValueError: For an unknown ``scale``, ``alpha`` outside ``(0, 1)``, ``power`` outside
            ``(alpha, 1)`` or ``seeds`` of another length than ``values``.

    Example:
        >>> out = summarize([0.012, 0.008, None, 0.010], seeds=[0, 1, 2, 3])
        >>> out["n"], out["missing_seeds"], round(out["mean"], 4)
        (3, [2], 0.01)
    """
    from scipy import stats

    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not alpha < power < 1.0:
        raise ValueError(f"power must be in (alpha, 1) = ({alpha}, 1), got {power!r}")
    labels: list[int] = list(range(len(values))) if seeds is None else [int(s) for s in seeds]
    if len(labels) != len(values):
        raise ValueError(f"seeds has {len(labels)} entries but values has {len(values)}")

    used: list[float] = []  # input scale
    missing: list[int] = []
    for label, value in zip(labels, values, strict=True):
        number = None if value is None else float(value)
        if number is None or not math.isfinite(number) or (scale == "log_ratio" and number <= 0):
            missing.append(label)
        else:
            used.append(number)
    x = [math.log(v) for v in used] if scale == "log_ratio" else used
    n = len(x)

    out: dict[str, Any] = {
        "n": n,
        "n_planned": len(values),
        "missing_seeds": missing,
        "scale": scale,
        "mean": None,
        "sd": None,
        "se": None,
        "df": None,
        "ci": None,
        "p": None,
        "values": used,
        "alpha": alpha,
        "power": power,
        "mde_plugin_sd": None,
        "mde_note": "",
        "geomean": None,
        "ratio_ci": None,
    }
    if n == 0:
        out["mde_note"] = "no values (n = 0)"
        return out

    constant = min(x) == max(x)
    mean = x[0] if constant else math.fsum(x) / n
    out["mean"] = mean
    if scale == "log_ratio":
        out["geomean"] = math.exp(mean)
    if n == 1:
        out["mde_note"] = "one value (n = 1): no sd"
        return out

    df = n - 1
    sd = 0.0 if constant else math.sqrt(math.fsum((v - mean) ** 2 for v in x) / df)
    se = sd / math.sqrt(n)
    out.update(sd=sd, se=se, df=df)
    if sd == 0.0:
        out.update(ci=[mean, mean], p=0.0 if mean != 0 else 1.0)
        out["mde_note"] = "sd = 0 (all values equal)"
    else:
        half = float(stats.t.isf(alpha / 2, df)) * se
        out["ci"] = [mean - half, mean + half]
        out["p"] = min(1.0, 2.0 * float(stats.t.sf(abs(mean) / se, df)))
        out["mde_plugin_sd"], out["mde_note"] = _detectable_effect(n, sd, alpha, power)
    if scale == "log_ratio":
        out["ratio_ci"] = [math.exp(c) for c in out["ci"]]
    return out


def _power(ncp: float, df: int, tcrit: float) -> float:
    """Power of the two-sided t-test with critical value ``tcrit`` at noncentrality ``ncp``.

    The lower tail ``P(T < -tcrit)`` is evaluated as ``P(-T > tcrit)`` with ``-T`` noncentral
    t at ``-ncp`` (the same number; scipy's ``nct.cdf`` returns NaN for large ``ncp``, e.g.
    ``nct.cdf(-2, 4, 20)`` in scipy 1.17, where ``nct.sf(2, 4, -20)`` gives 0).

    Raises:
        _NotFinite: When either tail is NaN or inf.
    """
    from scipy import stats

    upper = float(stats.nct.sf(tcrit, df, ncp))
    lower = float(stats.nct.sf(tcrit, df, -ncp))
    if not (math.isfinite(upper) and math.isfinite(lower)):
        raise _NotFinite(f"noncentral t gave {upper} + {lower} at ncp = {ncp:.6g}, df = {df}")
    return upper + lower


def _detectable_effect(n: int, sd: float, alpha: float, power: float) -> tuple[float | None, str]:
    """The plug-in-sd minimum detectable effect and ``""``, or ``None`` and the reason."""
    from scipy import optimize, stats

    df, se = n - 1, sd / math.sqrt(n)
    tcrit = float(stats.t.isf(alpha / 2, df))

    def gap(ncp: float) -> float:
        return _power(ncp, df, tcrit) - power

    try:
        lo, hi = 0.0, tcrit  # gap(0) = alpha - power < 0; power(tcrit) is about 1/2
        if gap(lo) >= 0:
            return None, f"power at 0 is not below {power} (noncentral t inaccurate)"
        for _ in range(_MAX_WIDENINGS):
            if gap(hi) >= 0:
                break
            lo, hi = hi, hi * 1.5  # power grows with the effect: widen until it brackets
        else:
            return None, f"power {power} not reached below ncp = {hi:.3g} (root not bracketed)"
        ncp = float(optimize.brentq(gap, lo, hi, xtol=1e-12, rtol=1e-14))
    except _NotFinite as err:
        return None, f"power not computable: {err}"
    except RuntimeError as err:  # brentq did not converge
        return None, f"power not computable: {err}"
    return ncp * se, ""


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's (1979) step-down adjusted p-values.

    With the ``m`` p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value of
    ``p_(j)`` is ``max_{k <= j} min(1, (m - k + 1) p_(k))``: monotone in ``p`` and at most 1.
    Holm rejects exactly the hypotheses whose adjusted p-value is ``<= alpha``; this controls
    the family-wise error rate at ``alpha`` under any dependence between the tests.

    Args:
        pvalues: Raw p-values in ``[0, 1]``; ``None`` entries stay ``None`` and do not count
            in the family size ``m``.

    Returns:
        The adjusted p-values, in the input order.

    Raises:
        ValueError: For a p-value that is NaN or outside ``[0, 1]``.

    Example:
        >>> [round(p, 10) for p in holm([0.01, 0.04, 0.03, 0.005])]
        [0.03, 0.06, 0.06, 0.02]
    """
    order = _sorted_pvalues(pvalues)
    m = len(order)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for j, (i, p) in enumerate(order):
        running = max(running, min(1.0, (m - j) * p))
        adjusted[i] = running
    return adjusted


def _sorted_pvalues(pvalues: Sequence[float | None]) -> list[tuple[int, float]]:
    """``(index, p)`` of the non-``None`` p-values by ascending p (ties keep the input order),
    after checking that they are in ``[0, 1]``."""
    present = []
    for i, p in enumerate(pvalues):
        if p is None:
            continue
        if not 0.0 <= float(p) <= 1.0:  # also catches NaN
            raise ValueError(f"p-value {i} is {p!r}; expected a number in [0, 1] or None")
        present.append((i, float(p)))
    return sorted(present, key=lambda item: item[1])  # stable


def holm_family(summaries: list[dict[str, Any]], *, alpha: float = 0.05) -> None:
    """Add Holm-adjusted p-values, decisions and intervals to one declared family, in place.

    The family is the headline comparisons of one method, declared before the run; every
    summary must come from :func:`summarize` with this ``alpha``. Summaries whose ``p`` is
    ``None`` are not part of the family size ``m`` and get ``None`` fields and
    ``rejected_holm = False``.

    Intervals: the hypotheses are ordered by raw p ascending (ties keep the input order).
    Step ``j`` (1-based) is drawn at the per-comparison level ``alpha / (m - j + 1)`` while all
    earlier steps were rejected; from the first step ``j*`` that is not rejected on, every
    interval is drawn at ``alpha / (m - j* + 1)``. So ``ci_holm`` excludes 0 exactly when
    Holm rejects (up to rounding when a p-value equals its step's level: Holm then rejects and
    the interval ends at 0). They are the intervals consistent with Holm's decisions, not
    simultaneous intervals with joint coverage ``1 - alpha`` (the Bonferroni intervals at
    ``alpha / m`` have that coverage, but are wider and can contain 0 where Holm rejects).

    Adds to each summary: ``p_holm``, ``rejected_holm`` (Holm's decision: ``p <= alpha /
    (m - j + 1)`` at its own step ``j`` and every earlier one, i.e. ``p_holm <= alpha``),
    ``level_holm`` (the per-comparison alpha of its interval), ``m_holm`` (the family
    size), ``ci_holm``, ``ratio_ci_holm`` (``exp(ci_holm)`` for ``"log_ratio"``, else
    ``None``), ``mde_plugin_sd_holm`` and ``mde_note_holm`` (the detectable effect of
    :func:`summarize` at ``level_holm``). An empty list is a no-op.

    Args:
        summaries: The family's summaries from :func:`summarize` (modified in place).
        alpha: The family-wise error rate; must equal every summary's ``alpha``.

    Raises:
        ValueError: When a summary's ``alpha`` differs from ``alpha``.
    """
    from scipy import stats

    for k, summary in enumerate(summaries):
        if summary.get("alpha") != alpha:
            raise ValueError(
                f"summary {k} has alpha {summary.get('alpha')!r}; a Holm family needs all its "
                f"summaries at the family's alpha {alpha!r}"
            )
    pvalues = [s["p"] for s in summaries]
    adjusted = holm(pvalues)
    order = _sorted_pvalues(pvalues)
    m = len(order)

    levels: dict[int, float] = {}
    rejected: dict[int, bool] = {}
    stopped_at: float | None = None  # the level frozen at the first non-rejected step
    for j, (i, p) in enumerate(order):  # j is 0-based: step j + 1 tests at alpha / (m - j)
        level = alpha / (m - j)
        if stopped_at is None and p > level:
            stopped_at = level
        levels[i] = level if stopped_at is None else stopped_at
        rejected[i] = stopped_at is None

    for i, summary in enumerate(summaries):
        log_ratio = summary["scale"] == "log_ratio"
        fields: dict[str, Any] = {
            "p_holm": adjusted[i],
            "rejected_holm": rejected.get(i, False),
            "level_holm": levels.get(i),
            "m_holm": m,
            "ci_holm": None,
            "mde_plugin_sd_holm": None,
            "mde_note_holm": "no p-value: not in the family",
        }
        if i in levels:
            level, mean, sd, n = levels[i], summary["mean"], summary["sd"], summary["n"]
            if sd == 0:
                fields["ci_holm"] = [mean, mean]
                fields["mde_note_holm"] = "sd = 0 (all values equal)"
            else:
                half = float(stats.t.isf(level / 2, summary["df"])) * summary["se"]
                fields["ci_holm"] = [mean - half, mean + half]
                mde, note = _detectable_effect(n, sd, level, summary["power"])
                fields.update(mde_plugin_sd_holm=mde, mde_note_holm=note)
        ci = fields["ci_holm"]
        fields["ratio_ci_holm"] = None if ci is None or not log_ratio else [math.exp(c) for c in ci]
        summary.update(fields)


def verdict(
    summary: dict[str, Any], expected: Literal["+", "-", ""], *, family: bool
) -> dict[str, Any]:
    """The verdict on one comparison, from its interval (the caller words it).

    Args:
        summary: From :func:`summarize`; for ``family=True`` also passed through
            :func:`holm_family`. A summary outside any family needs no Holm fields.
        expected: The direction the paper claims (``"+"``: ``b`` higher than ``a``, ``"-"``:
            lower) or ``""`` for a comparison without a claimed direction.
        family: Whether the comparison is in the method's declared headline family; then its
            Holm interval ``ci_holm`` decides, otherwise its raw interval ``ci`` does.

    Returns:
        ``{"resolved", "direction", "reproduced", "interval"}``: ``resolved`` when the
        interval used excludes 0 (a missing interval resolves nothing); ``direction`` the sign
        of the mean (``"+"``/``"-"``) when resolved, else ``None``; ``reproduced`` only for a
        resolved family comparison in its non-empty ``expected`` direction; ``interval``
        ``"holm"`` or ``"raw"``, the interval used.

    Raises:
        ValueError: For an unknown ``expected``, or ``family=True`` on a summary without Holm
            fields (:func:`holm_family` was not called on its family).

    Example:
        >>> verdict(summarize([0.3, 0.5, 0.4, 0.6]), "+", family=False)["direction"]
        '+'
    """
    if expected not in ("+", "-", ""):
        raise ValueError(f"expected must be '+', '-' or '', got {expected!r}")
    if family and "ci_holm" not in summary:
        raise ValueError("family=True needs the Holm fields: call holm_family() on the family")
    interval = summary.get("ci_holm") if family else summary.get("ci")
    resolved = interval is not None and (interval[0] > 0 or interval[1] < 0)
    direction = ("+" if summary["mean"] > 0 else "-") if resolved else None
    reproduced = resolved and family and expected != "" and direction == expected
    return {
        "resolved": resolved,
        "direction": direction,
        "reproduced": reproduced,
        "interval": "holm" if family else "raw",
    }

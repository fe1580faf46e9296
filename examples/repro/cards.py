"""Tables and plots from a result JSON, and the generated regions of the method cards.

A card holds two generated regions per method: ``<!-- repro:<method>:begin -->`` ...
``<!-- repro:<method>:end -->`` for the confirm result ``<results>/<method>.json`` and
``<!-- repro:<method>-explore:begin -->`` ... ``end`` for the exploration result
``<results>/explore/<method>.json``; :func:`update_cards` rewrites them and
:func:`stale_cards` says which differ from what would be generated (the test uses it, so
tables and JSON cannot drift apart). The README's evidence table (:func:`render_summary`)
shows confirm results only.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repro import METHODS
from repro.common import ROOT, _number, load_method, result_path, validate

BEGIN = "<!-- repro:{name}:begin -->"
END = "<!-- repro:{name}:end -->"


# --------------------------------------------------------------------------- formatting
def _scale(unit: str) -> tuple[float, str]:
    """Differences of accuracies are shown in points (x100)."""
    return (100.0, " points") if unit == "accuracy" else (1.0, "" if unit == "" else f" {unit}")


def fmt_value(value: Any, unit: str) -> str:
    if not _number(value):
        return "-"
    if unit == "accuracy":
        return f"{value:.4f}"
    if unit == "s":
        return f"{value:.1f}"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.3g}x"
    return f"{value:.4g}"


def fmt_diff(value: Any, unit: str) -> str:
    if not _number(value):
        return "-"
    if unit == "accuracy":
        return f"{value * 100:+.2f}"
    if unit == "s":
        return f"{value:+.1f}"
    return f"{value:+.3g}"


def mean_sd(values: Sequence[Any], unit: str) -> str:
    """Mean ± sd of an arm's per-seed values; ratios (unit ``"x"``) as a geometric mean ×/÷ the
    geometric sd."""
    vals = [v for v in values if _number(v)]
    if not vals:
        return "-"
    if unit == "x":
        if any(v <= 0 for v in vals):
            return "-"
        logs = [math.log(v) for v in vals]
        m = sum(logs) / len(logs)
        if len(set(vals)) == 1:
            return fmt_value(math.exp(m), unit)
        sd = math.sqrt(sum((v - m) ** 2 for v in logs) / (len(logs) - 1))
        return f"{fmt_value(math.exp(m), unit)} ×/÷ {math.exp(sd):.2f}"
    m = sum(vals) / len(vals)
    if len(set(vals)) == 1:
        return fmt_value(m, unit)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{fmt_value(m, unit)} ± {fmt_value(sd, unit)}"


def _is_ratio(p: dict[str, Any]) -> bool:
    return p.get("scale") == "log_ratio"


def fmt_estimate(p: dict[str, Any]) -> str:
    """The pair's estimate: a mean difference, or a geometric-mean ratio b / a."""
    if _is_ratio(p):
        return "-" if not _number(p.get("geomean")) else f"{p['geomean']:.3g}x"
    _, suffix = _scale(p["unit"])
    return "-" if not _number(p.get("mean")) else f"{fmt_diff(p['mean'], p['unit'])}{suffix}"


def fmt_interval(p: dict[str, Any], holm: bool = False) -> str:
    if _is_ratio(p):
        ci = p.get("ratio_ci_holm" if holm else "ratio_ci")
        return "-" if not ci else f"[{ci[0]:.3g}x, {ci[1]:.3g}x]"
    ci = p.get("ci_holm" if holm else "ci")
    return "-" if not ci else f"[{fmt_diff(ci[0], p['unit'])}, {fmt_diff(ci[1], p['unit'])}]"


def fmt_seeds(p: dict[str, Any]) -> str:
    missing = p.get("missing_seeds") or []
    return str(p["n"]) + (f" (missing: {', '.join(map(str, missing))})" if missing else "")


def fmt_mde(p: dict[str, Any]) -> str:
    """The smallest effect the run could detect at 80 % power (at the pair's Holm level for a
    headline pair), the observed sd taken as the true one."""
    holm = "_holm" if p.get("headline") and "mde_plugin_sd_holm" in p else ""
    mde = p.get(f"mde_plugin_sd{holm}")
    if not _number(mde):
        return f"power not computed ({p.get(f'mde_note{holm}') or 'too few values'})"
    if _is_ratio(p):
        return f"smallest detectable ratio ×/÷{math.exp(mde):.3g} (plug-in sd)"
    _, suffix = _scale(p["unit"])
    return f"smallest detectable effect ±{fmt_diff(mde, p['unit'])[1:]}{suffix} (plug-in sd)"


def verdict(p: dict[str, Any], stage: str) -> str:
    """The pair's verdict in words; exploration's are labelled exploratory."""
    v = p["verdict"]
    if p["n"] < 2:
        return "too few seeds"
    prefix = "" if stage == "confirm" else "exploratory: "
    if not v["resolved"]:
        return f"{prefix}not resolved; {fmt_mde(p)}"
    word = "higher" if v["direction"] == "+" else "lower"
    if p.get("expected") not in ("+", "-"):  # a measured cost, no direction claimed
        return f"{prefix}**{word}** (resolved)"
    if v["reproduced"]:
        return f"**reproduced** ({word})"
    if v["direction"] == p["expected"]:
        return f"{prefix}**{word}**, as expected" + (
            "" if p["headline"] else " (not a headline pair)"
        )
    return f"{prefix}**opposite direction** ({word})"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(headers), "|" + "|".join("---" for _ in headers) + "|"]
    lines += [row(r) for r in rows]
    return lines


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def premise_state(result: dict[str, Any]) -> str:
    """``held`` (every check passed), ``failed: <names>``, or ``not checked``."""
    checks = result.get("premise") or []
    if not checks:
        return "not checked"
    failed = [c["name"].split(":")[0] for c in checks if not c["passed"]]
    return "held" if not failed else f"failed ({len(failed)} of {len(checks)} checks)"


def render(result: dict[str, Any], img: str | None = None) -> str:
    """The card region for one result (deterministic in the JSON)."""
    name, stage = result["method"], result["stage"]
    module = load_method(name)
    proto = result["protocol"]
    where = (
        f"docs/results/{name}.json" if stage == "confirm" else f"docs/results/explore/{name}.json"
    )
    lines = [
        f"<!-- generated by `python examples/reproduce.py cards` from {where}; "
        "edit the protocol, not this text -->",
        "",
    ]
    if stage == "confirm":
        reg = result["preregistration"]
        lines += [
            f"**Confirm stage**, pre-registered in `{reg['path']}` (commit `{reg['commit'][:10]}`, "
            f"sha256 `{reg['sha256'][:12]}`) before the run; these numbers are final.",
            "",
        ]
    else:
        lines += [
            "**Exploratory** (validation split only; the test split was never read; every "
            "choice of the protocol was made here, so these figures are optimistic for the "
            "chosen settings and decide nothing by themselves).",
            "",
        ]
    lines += ["```bash", result["command"], "```", ""]
    machine = result.get("machine", {})
    load0, load1 = machine.get("load_average_start"), machine.get("load_average_end")
    workers = result.get("workers", 2)
    text = (
        f"Wall time **{_minutes(result['wall_seconds'])}** with {workers} processes of "
        f"{result['threads']} thread"
        + (f" on {machine['cpu_count']} CPU cores" if machine.get("cpu_count") else "")
        + (f" (load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end; the "
           f"suite itself adds up to {workers})" if load0 and load1 else "")
        + f"; {_minutes(result.get('task_cpu_seconds', 0.0))} of CPU time in the tasks; torch "
        f"{result['torch']}; library {result.get('torch_recal', '?')}"
        + (f"; {result['sessions']} sessions (resumed)" if result.get("sessions", 1) > 1 else "")
        + "."
        + (" **Quick mode** (`--quick`): a smoke run, not evidence." if proto.get("quick") else "")
    )  # fmt: skip
    lines.append(text)
    lines.append("")
    lines += module.describe(proto)
    lines.append("")
    for study_name, study in proto["studies"].items():
        seeds = study["seeds"]
        if len(proto["studies"]) > 1:
            lines += [f"**{study.get('title', study_name)}** ({len(seeds)} seeds)", ""]
        columns = study.get("columns", [])
        rows = []
        for arm in study["arms"]:
            cells = [study.get("labels", {}).get(arm, arm.split("/", 1)[-1])]
            for metric, _header, unit in columns:
                values = [
                    rec["arms"].get(arm, {}).get(metric)
                    for rec in result["seeds"]
                    if rec["seed"] in seeds
                ]
                cells.append(mean_sd(values, unit))
            rows.append(cells)
        stat = "mean ± sd; ratios: geometric mean ×/÷ sd"
        headers = [f"arm ({len(seeds)} seeds; {stat})"] + [h for _, h, _ in columns]
        lines += _table(headers, rows)
        lines.append("")
        pairs = [p for p in result["summary"] if p["study"] == study_name]
        if pairs:
            rows = []
            for p in pairs:
                rows.append(
                    [
                        ("**headline:** " if p["headline"] else "") + p["label"],
                        fmt_estimate(p),
                        fmt_interval(p),
                        fmt_interval(p, holm=True) if p["headline"] else "",
                        fmt_seeds(p),
                        verdict(p, stage),
                    ]
                )
            lines += _table(
                ["paired comparison (b - a; b / a for ratios)", "estimate", "95 % interval",
                 "Holm-adjusted interval", "seeds", "verdict"],
                rows,
            )  # fmt: skip
            lines.append("")
    if hasattr(module, "extra_tables"):
        lines += module.extra_tables(result)
    lines += [f"Premise checks (is the setting one where the method can work?): "
              f"**{premise_state(result)}**", ""]  # fmt: skip
    rows = [
        [
            c["name"],
            fmt_check(c["value"]),
            f"{c['comparison']} {c['threshold']:g}",
            "yes" if c["passed"] else "**no**",
        ]
        for c in result["premise"]
    ]
    lines += _table(["check", "value", "needed", "holds"], rows)
    notes = [c for c in result["premise"] if c.get("detail")]
    if notes:
        lines.append("")
        lines += [f"* {c['name']}: {c['detail']}" for c in notes]
    if hasattr(module, "notes"):  # the method's reading of its own numbers
        extra = module.notes(result)
        if extra:
            lines += ["", *extra]
    if img:
        lines += ["", f"![{name} ({stage}): paired differences per seed]({img})"]
    return "\n".join(lines)


def fmt_check(value: Any) -> str:
    if not _number(value):
        return "-"
    return f"{value:.4g}"


# --------------------------------------------------------------------------- cards
def card_path(cards_dir: Path, name: str) -> Path:
    return cards_dir / load_method(name).CARD


def region(text: str, name: str) -> tuple[int, int] | None:
    """Start and end offsets of the region's body (between the two markers), or ``None``."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    i = text.find(begin)
    j = text.find(end)
    if i < 0 or j < 0 or j < i:
        return None
    return i + len(begin), j


def _region_name(name: str, stage: str) -> str:
    return name if stage == "confirm" else f"{name}-explore"


def _img_name(name: str, stage: str) -> str:
    return f"repro-{name}.png" if stage == "confirm" else f"explore-{name}.png"


def generated(results_dir: Path, name: str, stage: str, img_rel_dir: str | None) -> str:
    """The body of a card region: the rendered result, or a line saying there is none."""
    path = result_path(results_dir, name, stage)
    if not path.exists():
        if stage == "confirm":
            reg = results_dir / "preregistered" / f"{name}.json"  # named from the repo root
            shown = Path(relative_to_root(reg)).as_posix()
            return ("\n" + (f"No confirm run yet; its pre-registration is `{shown}`."
                            if reg.exists() else "No confirm run yet.") + "\n")  # fmt: skip
        return "\nNo exploration result yet.\n"
    result = json.loads(path.read_text())
    errors = validate(result)
    if errors:
        raise ValueError(f"{path}: {errors[:5]}")
    if result["stage"] != stage:
        raise ValueError(f"{path}: a {result['stage']} result where a {stage} one belongs")
    img = None if img_rel_dir is None else f"{img_rel_dir}/{_img_name(name, stage)}"
    return "\n" + render(result, img) + "\n"


def _methods() -> list[str]:
    return list(METHODS)


STAGES = ("explore", "confirm")


def stale_cards(results_dir: Path, cards_dir: Path, img_rel_dir: str = "../img") -> list[str]:
    """The methods with a card region that differs from what the JSON generates."""
    stale = []
    for name in _methods():
        text = card_path(cards_dir, name).read_text()
        for stage in STAGES:
            body = generated(results_dir, name, stage, img_rel_dir)
            span = region(text, _region_name(name, stage))
            if span is None or text[span[0] : span[1]] != body:
                stale.append(name)
                break
    return stale


def update_cards(
    results_dir: Path, cards_dir: Path, img_dir: Path | None, img_rel_dir: str = "../img"
) -> list[str]:
    """Rewrite every card's two regions (and plots); returns the methods with a result."""
    updated = []
    for name in _methods():
        path = card_path(cards_dir, name)
        text = path.read_text()
        found = False
        for stage in STAGES:
            rname = _region_name(name, stage)
            span = region(text, rname)
            if span is None:
                raise ValueError(
                    f"{path}: no region {BEGIN.format(name=rname)} ... {END.format(name=rname)}; "
                    "add the two markers where the results belong"
                )
            body = generated(results_dir, name, stage, img_rel_dir)
            text = text[: span[0]] + body + text[span[1] :]
            rpath = result_path(results_dir, name, stage)
            if rpath.exists():
                found = True
                if img_dir is not None:
                    plot(json.loads(rpath.read_text()), img_dir / _img_name(name, stage))
        path.write_text(text)
        if found:
            updated.append(name)
    return updated


# --------------------------------------------------------------------------- README summary
SUMMARY = "summary"  # the README's region: <!-- repro:summary:begin --> ... end


def render_summary(results_dir: Path, cards_rel_dir: str = "docs/methods") -> str:
    """The README's evidence table: each confirm result's headline family (the
    pre-registered pairs), from the JSON; methods without a confirm run say so."""
    rows = []
    for name in _methods():
        card = f"{cards_rel_dir}/{load_method(name).CARD}"
        path = result_path(results_dir, name, "confirm")
        if not path.exists():
            rows.append([f"[{name}]({card})", "no confirm run yet", "", "", "", "", "", ""])
            continue
        result = json.loads(path.read_text())
        titles = {k: v.get("title", k) for k, v in result["protocol"]["studies"].items()}
        for p in result["summary"]:
            if not p["headline"]:
                continue
            rows.append(
                [
                    f"[{name}]({card})",
                    f"{p['label']} ({titles[p['study']]})",
                    fmt_seeds(p),
                    fmt_estimate(p),
                    fmt_interval(p),
                    fmt_interval(p, holm=True),
                    premise_state(result),
                    verdict(p, "confirm"),
                ]
            )
    lines = [
        "<!-- generated by `python examples/reproduce.py cards` from docs/results/*.json "
        "(confirm stage only) -->",
        "",
        *_table(
            ["method", "pre-registered comparison (b - a; b / a for ratios)", "seeds",
             "estimate", "95 % interval", "Holm-adjusted interval", "premise", "verdict"],
            rows,
        ),
    ]  # fmt: skip
    return "\n" + "\n".join(lines) + "\n"


def _summary_target(readme: Path) -> tuple[str, tuple[int, int]]:
    text = readme.read_text()
    span = region(text, SUMMARY)
    if span is None:
        raise ValueError(
            f"{readme}: no region {BEGIN.format(name=SUMMARY)} ... {END.format(name=SUMMARY)}"
        )
    return text, span


def summary_stale(results_dir: Path, readme: Path) -> bool:
    """Whether the README's evidence table differs from what the JSON generates."""
    body = render_summary(results_dir)
    text, span = _summary_target(readme)
    return text[span[0] : span[1]] != body


def update_summary(results_dir: Path, readme: Path) -> bool:
    """Rewrite the README's evidence table."""
    body = render_summary(results_dir)
    text, span = _summary_target(readme)
    readme.write_text(text[: span[0]] + body + text[span[1] :])
    return True


# --------------------------------------------------------------------------- plots
def plot(result: dict[str, Any], path: Path) -> Path:
    """Paired differences per seed (dots), their mean and 95 % interval, one panel per study;
    plus the method's own panels (``extra_panels``), if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    module = load_method(result["method"])
    proto = result["protocol"]
    groups: list[tuple[str, str, list[dict[str, Any]]]] = []  # (title, unit, pairs)
    for study_name, study in proto["studies"].items():
        here = [p for p in result["summary"] if p["study"] == study_name]
        for key in dict.fromkeys((p["unit"], _is_ratio(p)) for p in here):
            pairs = [p for p in here if (p["unit"], _is_ratio(p)) == key]
            groups.append((study.get("title", study_name), key[0], pairs))
    extras = module.extra_panels(result) if hasattr(module, "extra_panels") else []
    n_panels = len(groups) + len(extras)
    rows = 2 if n_panels > 3 else 1
    cols = math.ceil(n_panels / rows)
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n_panels:]:
        ax.axis("off")
    for ax, (title, unit, pairs) in zip(axes, groups, strict=False):
        ratio = _is_ratio(pairs[0])
        k = 1.0 if ratio else _scale(unit)[0]
        for i, p in enumerate(pairs):
            ys = [d * k for d in p["values"]]
            ax.plot([i] * len(ys), ys, "o", color="tab:gray", alpha=0.6, markersize=4)
            ci = p.get("ratio_ci" if ratio else "ci")
            if ci:
                m = (p["geomean"] if ratio else p["mean"]) * k
                lo, hi = ci[0] * k, ci[1] * k
                v = p["verdict"]
                color = (
                    "tab:green" if v["reproduced"] else ("tab:red" if v["resolved"] else "tab:blue")
                )
                ax.errorbar(
                    [i + 0.15], [m], yerr=[[m - lo], [hi - m]], fmt="s", color=color, capsize=4
                )
                holm = p.get("ratio_ci_holm" if ratio else "ci_holm")
                if p["headline"] and holm:
                    ax.plot([i + 0.3, i + 0.3], [holm[0] * k, holm[1] * k], color=color, lw=1)
        ax.axhline(1.0 if ratio else 0.0, color="black", linewidth=0.8)
        if ratio:
            ax.set_yscale("log")
        ax.set_xlim(-0.5, len(pairs) - 0.3)
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels([p["label"] for p in pairs], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(
            "b / a" if ratio
            else "b - a" + (" (points)" if unit == "accuracy" else f" ({unit})" if unit else "")
        )  # fmt: skip
        ax.set_title(textwrap.fill(title, 48), fontsize=9)
    for ax, draw in zip(axes[len(groups) : n_panels], extras, strict=True):
        draw(ax)
    fig.suptitle(
        f"{result['method']} ({result['stage']}): dots = seeds, squares = mean with 95 % "
        "interval, thin line = Holm-adjusted interval (headline pairs)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def relative_to_root(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)

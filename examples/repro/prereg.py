"""Pre-registration of a confirm run: written before the run, committed, then enforced.

``python examples/reproduce.py register <method> --seeds 100-107`` writes
``docs/results/preregistered/<method>.json`` from the code's confirm protocol: the protocol
itself (every arm with its fixed hyper-parameters, the data, the statistic), its hash, the
confirm seeds, the exploration seeds they must avoid (``explore_seeds``: those of
``docs/results/explore/<method>.json`` plus any given), and the headline pairs (the Holm
family, each with its arms, metric, level and expected direction). Commit it; then
``python examples/reproduce.py <method> --stage confirm`` runs only if

* the file is tracked by git and unchanged in the working tree and the index,
* the code's confirm protocol hashes to the registered ``protocol_hash``,
* the seeds are disjoint from ``explore_seeds`` and from the exploration result's seeds, and
  at least :data:`CONFIRM_SEEDS_FROM`,

and the result records the file's sha256 and the commit that last changed it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repro.common import ROOT, build_protocol, load_method, protocol_hash, result_path

FORMAT = 1
CONFIRM_SEEDS_FROM = 100  # exploration uses seeds 0, 1, ...; confirmation 100 and up
STATISTIC = (
    "per seed the paired difference b - a (log ratio b / a for ratios such as compression or "
    "CPU time); mean, sd and the two-sided 95 % t-interval over seeds; Holm-adjusted p-values "
    "and step-down intervals over the headline family (alpha 0.05); a headline pair is "
    "reproduced when its Holm interval excludes 0 in the expected direction; seeds without a "
    "value are listed as missing, never imputed"
)


class PreregistrationError(RuntimeError):
    """The confirm stage refuses to run (no, changed or mismatching pre-registration)."""


def path_for(name: str, root: Path = ROOT) -> Path:
    return root / "docs" / "results" / "preregistered" / f"{name}.json"


def explored_seeds(name: str, root: Path = ROOT) -> list[int]:
    """The seeds of the committed exploration result of ``name`` (empty if there is none)."""
    path = result_path(root / "docs" / "results", name, "explore")
    if not path.exists():
        return []
    return sorted({int(rec["seed"]) for rec in json.loads(path.read_text())["seeds"]})


def build(
    name: str,
    seeds: Sequence[int],
    explore_seeds: Sequence[int] = (),
    *,
    root: Path = ROOT,
    quick: bool = False,
    notes: str = "",
) -> dict[str, Any]:
    """The pre-registration of ``name``'s confirm run on ``seeds`` (not written)."""
    module = load_method(name)
    seeds = sorted(int(s) for s in seeds)
    explore = sorted(set(int(s) for s in explore_seeds) | set(explored_seeds(name, root)))
    _check_seeds(name, seeds, explore)
    proto = build_protocol(module, quick, seeds, "confirm")
    pairs = {(study, p["label"]): p for study, st in proto["studies"].items() for p in st["pairs"]}
    headline = []
    for key in module.HEADLINE:
        if key not in pairs:
            raise PreregistrationError(f"{name}: HEADLINE pair {key} is not in the protocol")
        headline.append({"study": key[0], **pairs[key]})
    return {
        "format": FORMAT,
        "method": name,
        "registered": datetime.date.today().isoformat(),
        "seeds": seeds,
        "explore_seeds": explore,
        "headline": headline,
        "alpha": 0.05,
        "statistic": STATISTIC,
        "notes": notes,
        "protocol_hash": protocol_hash(proto),
        "protocol": proto,
    }


def write(prereg: dict[str, Any], root: Path = ROOT) -> Path:
    path = path_for(prereg["method"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prereg, indent=1) + "\n")
    return path


def _check_seeds(name: str, seeds: Sequence[int], explore: Sequence[int]) -> None:
    if not seeds:
        raise PreregistrationError(f"{name}: no confirm seeds")
    low = [s for s in seeds if s < CONFIRM_SEEDS_FROM]
    if low:
        raise PreregistrationError(
            f"{name}: confirm seeds must be >= {CONFIRM_SEEDS_FROM} (exploration's are below), "
            f"got {low}"
        )
    shared = sorted(set(seeds) & set(explore))
    if shared:
        raise PreregistrationError(f"{name}: confirm seeds {shared} were used in exploration")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False
    )


def checked(name: str, path: Path | None = None) -> dict[str, Any]:
    """The pre-registration of ``name``, after checking that it may govern a confirm run:
    ``{"path", "sha256", "commit", "data"}``. Raises :class:`PreregistrationError`."""
    path = (path or path_for(name)).resolve()
    if not path.exists():
        raise PreregistrationError(
            f"{name}: no pre-registration at {path}; write one with `python "
            f"examples/reproduce.py register {name} --seeds ...`, commit it, then run"
        )
    top = _git(path.parent, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise PreregistrationError(f"{path}: not inside a git repository ({top.stderr.strip()})")
    root = Path(top.stdout.strip())
    rel = str(path.relative_to(root))
    if _git(root, "ls-files", "--error-unmatch", "--", rel).returncode != 0:
        raise PreregistrationError(f"{rel}: not committed; commit the pre-registration first")
    status = _git(root, "status", "--porcelain", "--", rel).stdout.strip()
    if status:
        raise PreregistrationError(
            f"{rel}: changed since its last commit ({status}); a confirm run follows the "
            "committed pre-registration only"
        )
    commit = _git(root, "log", "-1", "--format=%H", "--", rel).stdout.strip()
    raw = path.read_bytes()
    data = json.loads(raw)
    if data.get("format") != FORMAT or data.get("method") != name:
        raise PreregistrationError(f"{rel}: not a format-{FORMAT} pre-registration of {name}")
    explore = sorted(set(data.get("explore_seeds", [])) | set(explored_seeds(name, root)))
    _check_seeds(name, data["seeds"], explore)
    return {"path": rel, "sha256": hashlib.sha256(raw).hexdigest(), "commit": commit,
            "data": data}  # fmt: skip


def match(registered: dict[str, Any], proto: dict[str, Any], phash: str) -> None:
    """Refuse a confirm run whose protocol is not the registered one."""
    data = registered["data"]
    if phash == data["protocol_hash"]:
        return
    reg = data["protocol"]
    diff = [k for k in sorted(set(reg) | set(proto)) if reg.get(k) != proto.get(k)]
    settings = reg.get("settings", {}), proto.get("settings", {})
    detail = [k for k in sorted(set(settings[0]) | set(settings[1]))
              if settings[0].get(k) != settings[1].get(k)]  # fmt: skip
    raise PreregistrationError(
        f"{registered['path']}: the code's confirm protocol (hash {phash}) is not the registered "
        f"one ({data['protocol_hash']}); differing keys: {diff}, settings: {detail}"
    )

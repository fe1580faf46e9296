"""The suite's machinery: tasks in two one-thread processes, resumable parts, statistics, schema.

A method module (``repro/<method>.py``) provides

* ``protocol(quick, seeds) -> dict``: every setting; ``"studies"`` maps a study name to its
  ``"seeds"``, its ``"arms"`` (qualified ``"<study>/<arm>"`` names) and its ``"pairs"``
  (``{"label", "a", "b", "metric", "unit", "expected"}``: the difference ``b - a`` per seed);
* ``tasks(proto) -> list[Task]``: each task is a function of the module, run in a worker
  process; a task returns ``{"arms": {arm: {metric: value}}, "info": {...}}`` and may save
  artefacts under ``ctx.cache_path(...)``; ``deps`` are the keys of tasks whose results (and
  cached artefacts) it needs;
* ``premise(proto, seeds, infos) -> list[dict]``: the checks that the protocol's premise holds
  (use :func:`check`);
* optionally ``finish(proto, seeds, infos)``: adds derived arms (e.g. a variant chosen on the
  validation split) to the per-seed records.

:func:`run_method` runs the tasks (each finished task is written to
``<out>/<method>/parts/<key>.json`` at once, so an interrupted run resumes where it stopped),
then writes ``<out>/<method>.json`` (checked by :func:`validate`) and the plot.

Statistics: for each pair, the per-seed differences ``b - a`` (paired: a seed fixes the data
subset and the initialisation of every arm), their mean and sd, the 95 % t-interval, and,
where the interval contains 0, the minimum detectable effect: the true mean difference that a
two-sided paired t-test at level 0.05 with this ``n`` and this sd would detect with 80 %
power (exact, from the noncentral t distribution).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SCHEMA_VERSION = 1
EXAMPLES = Path(__file__).resolve().parents[1]
ROOT = EXAMPLES.parent


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One unit of work: ``func`` of the method module, for one seed."""

    key: str
    seed: int
    func: str
    args: dict[str, Any] = field(default_factory=dict)
    deps: tuple[str, ...] = ()


@dataclass
class Context:
    """What a task function receives."""

    proto: dict[str, Any]
    seed: int
    args: dict[str, Any]
    deps: dict[str, dict[str, Any]]  # key -> the dependency's returned dict
    cache_dir: Path
    data_dir: str | None

    def cache_path(self, name: str, seed: int | None = None) -> Path:
        seed = self.seed if seed is None else seed
        return self.cache_dir / f"seed{seed}-{name}"


def seed_torch(*key: int) -> None:
    """Seed torch's global RNG from a tuple of ints (model initialisation)."""
    value = 0
    for k in key:
        value = (value * 1_000_003 + int(k)) % (2**62)
    torch.manual_seed(value)


_UNHASHED = ("seeds", "title", "labels", "columns")  # seed lists and presentation


def protocol_hash(proto: dict[str, Any]) -> str:
    """Hash of the protocol without its seed lists (adding seeds keeps the finished parts)
    and without its presentation (titles, labels, table columns)."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in _UNHASHED}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    text = json.dumps(strip(proto), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _legacy_hash(proto: dict[str, Any]) -> str:
    """The first suite's hash (presentation included): parts written with it still count."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "seeds"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    text = json.dumps(strip(proto), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _init_worker(path: list[str]) -> None:
    for p in reversed(path):
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def _execute(
    method: str,
    task: Task,
    proto: dict[str, Any],
    deps: dict[str, dict[str, Any]],
    cache_dir: str,
    data_dir: str | None,
) -> dict[str, Any]:
    """Run one task in this (worker) process; returns the part record."""
    torch.set_num_threads(1)
    module = importlib.import_module(f"repro.{method}")
    ctx = Context(proto, task.seed, task.args, deps, Path(cache_dir), data_dir)
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = getattr(module, task.func)(ctx)
    return {
        "key": task.key,
        "seed": task.seed,
        "func": task.func,
        "result": _jsonable(result),
        "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load_method(name: str) -> ModuleType:
    return importlib.import_module(f"repro.{name}")


# --------------------------------------------------------------------------- run
def run_method(
    name: str,
    *,
    out: Path,
    quick: bool,
    seeds: int | None,
    workers: int,
    data_dir: str | None,
    command: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) one method's protocol; write and return its result JSON."""
    module = load_method(name)
    start_wall = time.perf_counter()
    load_start = _load_average()
    version = _library_version()
    proto = module.protocol(quick, seeds)
    proto["quick"] = quick
    phash, legacy = protocol_hash(proto), _legacy_hash(proto)
    parts_dir = out / name / "parts"
    cache_dir = out / "cache" / f"{name}-{phash}"
    tasks: list[Task] = module.tasks(proto)
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"{name}: duplicate task keys")
    done: dict[str, dict[str, Any]] = {}
    for task in tasks:
        path = parts_dir / f"{task.key}.json"
        if path.exists():
            part = json.loads(path.read_text())
            if part.get("protocol_hash") in (phash, legacy):
                done[task.key] = part
    todo = [t for t in tasks if t.key not in done]
    log(
        f"[{name}] protocol {phash}: {len(tasks)} tasks, {len(done)} done, {len(todo)} to run "
        f"on {workers} process(es) of 1 thread"
    )
    sessions_path = out / name / "sessions.json"
    sessions = json.loads(sessions_path.read_text()) if sessions_path.exists() else []
    sessions = [s for s in sessions if s.get("protocol_hash") in (phash, legacy)]
    if todo:  # recorded before the run, so that an interrupted session still counts
        sessions.append({"protocol_hash": phash, "started_at": time.time(), "wall_seconds": None,
                         "tasks_run": len(todo), "load_start": load_start,
                         "torch_recal": version})  # fmt: skip
        _write_json(sessions_path, sessions)
        _run_tasks(name, todo, done, proto, phash, parts_dir, cache_dir, data_dir, workers, log)
        sessions[-1]["wall_seconds"] = round(time.perf_counter() - start_wall, 1)
        sessions[-1]["load_end"] = _load_average()
    _close_interrupted(sessions, done)
    _write_json(sessions_path, sessions)
    if sessions:  # the code of the sessions that ran the tasks, read when each started
        version = "; ".join(dict.fromkeys(str(s.get("torch_recal", version)) for s in sessions))
    result = assemble(
        name, module, proto, tasks, done, command=command, workers=workers, version=version
    )
    result["wall_seconds"] = round(sum(s["wall_seconds"] for s in sessions), 1)
    result["sessions"] = len(sessions)
    if sessions:  # the load during the runs, not during a later re-assembly
        load_start = sessions[0].get("load_start", load_start)
    result["machine"]["load_average_start"] = load_start
    result["machine"]["load_average_end"] = (
        sessions[-1].get("load_end") if sessions else None
    ) or _load_average()
    errors = validate(result)
    _write_json(out / f"{name}.json", result)
    if errors:
        raise RuntimeError(f"{name}: {out / name}.json does not match the schema: {errors}")
    from repro import cards

    cards.plot(result, out / f"{name}.png")
    log(
        f"[{name}] wrote {out / (name + '.json')} and {out / (name + '.png')} "
        f"(wall {result['wall_seconds']:.0f} s over {result['sessions']} session(s))"
    )
    return result


def _close_interrupted(sessions: list[dict[str, Any]], done: dict[str, dict[str, Any]]) -> None:
    """An interrupted session lasted until the last part it finished (or counts 0 s)."""
    for i, session in enumerate(sessions):
        if session.get("wall_seconds") is not None:
            continue
        start = session["started_at"]
        stop = sessions[i + 1]["started_at"] if i + 1 < len(sessions) else float("inf")
        ends = [p["finished_at"] for p in done.values() if start <= p.get("finished_at", -1) < stop]
        session["wall_seconds"] = round(max(ends) - start, 1) if ends else 0.0
        session["interrupted"] = True


def _run_tasks(
    name: str,
    todo: list[Task],
    done: dict[str, dict[str, Any]],
    proto: dict[str, Any],
    phash: str,
    parts_dir: Path,
    cache_dir: Path,
    data_dir: str | None,
    workers: int,
    log: Callable[[str], None],
) -> None:
    total = len(todo) + len(done)
    pending = list(todo)
    context = multiprocessing.get_context("spawn")
    failures: list[str] = []
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(sys.path,)
    ) as pool:
        running: dict[cf.Future, Task] = {}
        try:
            while pending or running:
                ready = [t for t in pending if all(d in done for d in t.deps)]
                while ready and len(running) < workers and not failures:
                    task = ready.pop(0)
                    pending.remove(task)
                    deps = {d: done[d]["result"] for d in task.deps}
                    fut = pool.submit(_execute, name, task, proto, deps, str(cache_dir), data_dir)
                    running[fut] = task
                if not running:
                    if failures:
                        break
                    missing = {d for t in pending for d in t.deps if d not in done}
                    raise RuntimeError(f"{name}: tasks wait for unknown or failed {missing}")
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    task = running.pop(fut)
                    try:
                        part = fut.result()
                    except Exception:
                        failures.append(task.key)
                        log(f"[{name}] task {task.key} FAILED:\n{traceback.format_exc()}")
                        continue
                    part["protocol_hash"] = phash
                    _write_json(parts_dir / f"{task.key}.json", part)
                    done[task.key] = part
                    log(
                        f"[{name}] {len(done)}/{total} {task.key}: {part['wall_seconds']:.0f} s "
                        f"wall, {part['cpu_seconds']:.0f} s CPU  {_brief(part['result'])}"
                    )
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if failures:
        raise RuntimeError(f"{name}: {len(failures)} task(s) failed: {failures}; rerun to resume")


def _brief(result: dict[str, Any]) -> str:
    out = []
    for arm, metrics in (result.get("arms") or {}).items():
        value = metrics.get("test_acc")
        if isinstance(value, (int, float)):
            out.append(f"{arm} {value:.4f}")
    return ", ".join(out)


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- assembly
def assemble(
    name: str,
    module: ModuleType,
    proto: dict[str, Any],
    tasks: list[Task],
    done: dict[str, dict[str, Any]],
    *,
    command: str,
    workers: int,
    version: str = "",
) -> dict[str, Any]:
    """The result JSON from the finished parts (``version``: the library's, at the start)."""
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    infos: dict[str, dict[str, Any]] = {}
    for task in tasks:
        result = done[task.key]["result"] or {}
        infos[task.key] = result.get("info") or {}
        for arm, metrics in (result.get("arms") or {}).items():
            by_seed.setdefault(task.seed, {})[arm] = metrics
    seeds = [{"seed": s, "arms": by_seed[s]} for s in sorted(by_seed)]
    if hasattr(module, "finish"):
        module.finish(proto, seeds, infos)
    arms = [a for study in proto["studies"].values() for a in study["arms"]]
    summary = []
    for study_name, study in proto["studies"].items():
        for pair in study["pairs"]:
            diffs = [
                rec["arms"][pair["b"]][pair["metric"]] - rec["arms"][pair["a"]][pair["metric"]]
                for rec in seeds
                if rec["seed"] in study["seeds"]
                and _number(rec["arms"].get(pair["a"], {}).get(pair["metric"]))
                and _number(rec["arms"].get(pair["b"], {}).get(pair["metric"]))
            ]
            summary.append({"study": study_name, **pair, **paired_summary(diffs, pair["expected"])})
    cpu = sum(done[t.key]["cpu_seconds"] for t in tasks)
    return {
        "schema_version": SCHEMA_VERSION,
        "method": name,
        "command": command,
        "protocol": proto,
        "protocol_hash": protocol_hash(proto),
        "premise": module.premise(proto, seeds, infos),
        "arms": arms,
        "seeds": seeds,
        "summary": summary,
        "infos": infos,
        "wall_seconds": 0.0,
        "task_cpu_seconds": round(cpu, 1),
        "torch": torch.__version__,
        "torch_recal": version,
        "threads": 1,
        "workers": workers,
        "compile": os.environ.get("TORCH_RECAL_COMPILE", "1") != "0",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
    }


def _library_version() -> str:
    import subprocess

    import torch_recal

    version = getattr(torch_recal, "__version__", "?")
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return f"{version} (commit {commit}{', modified' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        return version


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- statistics
def paired_summary(diffs: Sequence[float], expected: str, alpha: float = 0.05) -> dict[str, Any]:
    """Mean, sd, 95 % t-interval of paired differences; verdict; MDE at 80 % power."""
    from scipy import stats

    n = len(diffs)
    out: dict[str, Any] = {
        "n": n,
        "mean": None,
        "sd": None,
        "ci95": None,
        "resolved": False,
        "direction": None,
        "direction_reproduced": False,
        "mde80": None,
        "diffs": [float(d) for d in diffs],
    }
    if n == 0:
        return out
    mean = sum(diffs) / n
    out["mean"] = mean
    if n < 2:
        return out
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    tcrit = float(stats.t.ppf(1 - alpha / 2, n - 1))
    lo, hi = mean - tcrit * se, mean + tcrit * se
    out.update(sd=sd, ci95=[lo, hi])
    resolved = lo > 0 or hi < 0
    out["resolved"] = resolved
    if resolved:
        out["direction"] = "+" if mean > 0 else "-"
        out["direction_reproduced"] = out["direction"] == expected
    else:
        out["mde80"] = minimum_detectable_effect(n, sd, alpha=alpha)
    return out


def minimum_detectable_effect(
    n: int, sd: float, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """Smallest true mean difference a two-sided paired t-test detects with ``power``."""
    from scipy import optimize, stats

    if sd == 0:
        return 0.0
    df, se = n - 1, sd / math.sqrt(n)
    tcrit = float(stats.t.ppf(1 - alpha / 2, df))

    def gap(delta: float) -> float:
        ncp = delta / se
        p = float(stats.nct.sf(tcrit, df, ncp) + stats.nct.cdf(-tcrit, df, ncp))
        return (1.0 if math.isnan(p) else p) - power  # NaN only far in the tail: power ~ 1

    hi = se * tcrit
    while gap(hi) < 0:  # power grows with delta: widen until the bracket holds the root
        hi *= 1.5
    return float(optimize.brentq(gap, 0.0, hi))


def check(
    name: str, value: float | None, comparison: str, threshold: float, detail: str = ""
) -> dict[str, Any]:
    """A premise check: ``value <comparison> threshold``."""
    ops: dict[str, Callable[[float, float], bool]] = {
        ">=": lambda a, b: a >= b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b,
    }
    ok = _number(value)
    return {
        "name": name,
        "value": float(value) if ok else None,  # type: ignore[arg-type]
        "comparison": comparison,
        "threshold": threshold,
        "passed": bool(ok and ops[comparison](float(value), threshold)),  # type: ignore[arg-type]
        "detail": detail,
    }


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if _number(v)]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- schema
_TOP = {
    "schema_version": int,
    "method": str,
    "command": str,
    "protocol": dict,
    "premise": list,
    "arms": list,
    "seeds": list,
    "summary": list,
    "wall_seconds": (int, float),
    "torch": str,
    "threads": int,
}
_CHECK = {"name": str, "comparison": str, "threshold": (int, float), "passed": bool}
_PAIR = {
    "study": str,
    "label": str,
    "a": str,
    "b": str,
    "metric": str,
    "unit": str,
    "expected": str,
    "n": int,
    "resolved": bool,
    "direction_reproduced": bool,
}


def validate(result: Any) -> list[str]:
    """Errors of a result JSON against the suite's schema (empty when it is valid)."""
    errors: list[str] = []

    def need(obj: Any, spec: dict[str, Any], where: str) -> bool:
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected an object, got {type(obj).__name__}")
            return False
        for key, typ in spec.items():
            if key not in obj:
                errors.append(f"{where}: missing `{key}`")
            elif not isinstance(obj[key], typ) or (isinstance(obj[key], bool) and typ is not bool):
                errors.append(f"{where}.{key}: expected {typ}, got {type(obj[key]).__name__}")
        return True

    if not need(result, _TOP, "result"):
        return errors
    proto = result.get("protocol", {})
    studies = proto.get("studies") if isinstance(proto, dict) else None
    if not isinstance(studies, dict) or not studies:
        errors.append("protocol.studies: expected a non-empty object")
        studies = {}
    arms = result.get("arms", [])
    if not arms or not all(isinstance(a, str) for a in arms):
        errors.append("arms: expected a non-empty list of names")
    for name, study in studies.items():
        for key in ("seeds", "arms", "pairs"):
            if not isinstance(study.get(key), list):
                errors.append(f"protocol.studies.{name}.{key}: expected a list")
    if not result.get("premise"):
        errors.append("premise: expected at least one check")
    for i, c in enumerate(result.get("premise", [])):
        if need(c, _CHECK, f"premise[{i}]"):
            if c.get("comparison") not in (">=", ">", "<=", "<"):
                errors.append(f"premise[{i}].comparison: {c.get('comparison')!r}")
            if not _number(c.get("value")):
                errors.append(f"premise[{i}] ({c.get('name')}): value not computed")
    for i, rec in enumerate(result.get("seeds", [])):
        if not isinstance(rec, dict) or not isinstance(rec.get("seed"), int):
            errors.append(f"seeds[{i}]: expected {{'seed': int, 'arms': {{...}}}}")
            continue
        for arm, metrics in (rec.get("arms") or {}).items():
            if arm not in arms:
                errors.append(f"seeds[{i}].arms: unknown arm {arm!r}")
            if not isinstance(metrics, dict):
                errors.append(f"seeds[{i}].arms.{arm}: expected an object of metrics")
    for study in studies.values():
        for seed in study.get("seeds", []):
            rec = next((r for r in result.get("seeds", []) if r.get("seed") == seed), None)
            for arm in study.get("arms", []):
                if rec is None or arm not in (rec.get("arms") or {}):
                    errors.append(f"seed {seed}: no result for arm {arm!r}")
    n_pairs = sum(len(s.get("pairs", [])) for s in studies.values())
    if len(result.get("summary", [])) != n_pairs:
        errors.append(f"summary: expected {n_pairs} pairs, got {len(result.get('summary', []))}")
    for i, p in enumerate(result.get("summary", [])):
        if not need(p, _PAIR, f"summary[{i}]"):
            continue
        if p["n"] >= 2:
            if not (_number(p.get("mean")) and _number(p.get("sd"))):
                errors.append(f"summary[{i}]: mean/sd not computed")
            ci = p.get("ci95")
            if not (isinstance(ci, list) and len(ci) == 2 and all(_number(v) for v in ci)):
                errors.append(f"summary[{i}]: ci95 not computed")
            if not p["resolved"] and not _number(p.get("mde80")):
                errors.append(f"summary[{i}]: unresolved without mde80")
        if p["direction_reproduced"] and not p["resolved"]:
            errors.append(f"summary[{i}]: direction_reproduced without a resolved interval")
    return errors

"""The suite's machinery: stages, tasks in one-thread processes, resumable parts, statistics,
schema.

A method module (``repro/<method>.py``) provides

* ``protocol(quick, seeds) -> dict``: every setting, for the process's stage
  (:func:`repro.train.current_stage`; the figure a protocol reports is
  :func:`repro.train.eval_key`: ``"val_acc"`` in exploration, ``"test_acc"`` in confirmation);
  ``seeds`` is a list of seed ids or ``None`` for the protocol's default count; ``"studies"``
  maps a study name to its ``"seeds"``, its ``"arms"`` (qualified ``"<study>/<arm>"`` names)
  and its ``"pairs"`` (``{"label", "a", "b", "metric", "unit", "expected"}`` and optionally
  ``"scale": "log_ratio"`` for ratios such as compression or CPU time: the per-seed ratio
  ``b / a`` is summarised on the log scale; otherwise the difference ``b - a``);
* ``HEADLINE``: the ``(study, label)`` pairs of its headline family (Holm-adjusted together;
  in the confirm stage the pre-registration's list governs);
* ``tasks(proto) -> list[Task]``: each task is a function of the module, run in a worker
  process; a task returns ``{"arms": {arm: {metric: value}}, "info": {...}}`` and may save
  artefacts under ``ctx.cache_path(...)``; ``deps`` are the keys of tasks whose results (and
  cached artefacts) it needs;
* ``premise(proto, seeds, infos) -> list[dict]``: the checks that the protocol's premise holds
  (use :func:`check`);
* optionally ``finish(proto, seeds, infos)``: adds derived arms (e.g. a variant chosen on the
  validation split) to the per-seed records.

Stages. ``explore`` (the default) never reads a test split (the loaders raise in the worker
processes) and writes ``<out>/explore/<method>.json``; every choice is made there.
``confirm`` runs only under a committed, unchanged pre-registration
(``docs/results/preregistered/<method>.json``, see :mod:`repro.prereg`) whose protocol hash
the code's confirm protocol must equal, on seeds disjoint from exploration's, and writes
``<out>/<method>.json`` with the pre-registration's sha256 and commit.

:func:`run_method` runs the tasks (each finished task is written to
``<out>/<stage>/<method>/parts/<key>.json`` at once, so an interrupted run resumes where it
stopped), then writes the result JSON (checked by :func:`validate`) and the plot.

Statistics (:mod:`repro.stats`): per pair, the per-seed differences ``b - a`` (or log ratios),
their mean, sd, 95 % t-interval and p-value, seeds without a value listed as missing; over the
headline family, Holm-adjusted p-values and step-down intervals; a verdict says "reproduced"
only for a confirm-stage headline pair whose Holm interval excludes 0 in the expected direction.
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

SCHEMA_VERSION = 2
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
    stage: str = "explore"

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


def _init_worker(path: list[str], stage: str) -> None:
    for p in reversed(path):
        if p not in sys.path:
            sys.path.insert(0, p)
    from repro.train import set_stage

    set_stage(stage)
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
    from repro.train import set_stage

    torch.set_num_threads(1)
    set_stage(proto["stage"])
    module = importlib.import_module(f"repro.{method}")
    ctx = Context(proto, task.seed, task.args, deps, Path(cache_dir), data_dir, proto["stage"])
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
def result_path(out: Path, name: str, stage: str) -> Path:
    """Where a stage's result JSON goes: ``<out>/<method>.json`` (confirm) or
    ``<out>/explore/<method>.json`` (explore); the plot sits beside it as ``.png``."""
    return out / f"{name}.json" if stage == "confirm" else out / "explore" / f"{name}.json"


def build_protocol(
    module: ModuleType, quick: bool, seeds: Sequence[int] | None, stage: str
) -> dict[str, Any]:
    """The module's protocol for ``stage`` (this process is switched to that stage)."""
    from repro.train import set_stage

    set_stage(stage)
    proto = module.protocol(quick, None if seeds is None else list(seeds))
    proto["quick"] = quick
    proto["stage"] = stage
    return proto


def run_method(
    name: str,
    *,
    out: Path,
    quick: bool,
    seeds: Sequence[int] | None,
    workers: int,
    data_dir: str | None,
    command: str,
    stage: str = "explore",
    prereg: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) one method's protocol in ``stage``; write and return its result JSON.

    ``confirm``: the seeds are the pre-registration's (``seeds`` must be ``None``), which must
    be committed and unchanged (:func:`repro.prereg.checked`), and the code's protocol must
    hash to the registered one; anything else raises before a task runs.
    """
    from repro import prereg as preregistration

    module = load_method(name)
    start_wall = time.perf_counter()
    load_start = _load_average()
    version = _library_version()
    registered = None
    if stage == "confirm":
        if seeds is not None:
            raise ValueError(f"{name}: the confirm stage runs the pre-registered seeds only")
        registered = preregistration.checked(name, prereg)
        seeds = registered["data"]["seeds"]
        quick = bool(registered["data"]["protocol"].get("quick", False))
    elif stage != "explore":
        raise ValueError(f"stage must be 'explore' or 'confirm', got {stage!r}")
    proto = build_protocol(module, quick, seeds, stage)
    phash = protocol_hash(proto)
    if registered is not None:
        preregistration.match(registered, proto, phash)
    parts_dir = out / stage / name / "parts"
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
            if part.get("protocol_hash") == phash:
                done[task.key] = part
    todo = [t for t in tasks if t.key not in done]
    log(
        f"[{name}] {stage} stage, protocol {phash}: {len(tasks)} tasks, {len(done)} done, "
        f"{len(todo)} to run on {workers} process(es) of 1 thread"
    )
    sessions_path = out / stage / name / "sessions.json"
    sessions = json.loads(sessions_path.read_text()) if sessions_path.exists() else []
    sessions = [s for s in sessions if s.get("protocol_hash") == phash]
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
    headline = (
        [(p["study"], p["label"]) for p in registered["data"]["headline"]]
        if registered is not None
        else list(getattr(module, "HEADLINE", ()))
    )
    result = assemble(
        name, module, proto, tasks, done, command=command, workers=workers, version=version,
        headline=headline,
    )  # fmt: skip
    if registered is not None:
        result["preregistration"] = {k: registered[k] for k in ("path", "sha256", "commit")}
    result["wall_seconds"] = round(sum(s["wall_seconds"] for s in sessions), 1)
    result["sessions"] = len(sessions)
    if sessions:  # the load during the runs, not during a later re-assembly
        load_start = sessions[0].get("load_start", load_start)
    result["machine"]["load_average_start"] = load_start
    result["machine"]["load_average_end"] = (
        sessions[-1].get("load_end") if sessions else None
    ) or _load_average()
    errors = validate(result)
    path = result_path(out, name, stage)
    _write_json(path, result)
    if errors:
        raise RuntimeError(f"{name}: {path} does not match the schema: {errors}")
    from repro import cards

    cards.plot(result, path.with_suffix(".png"))
    log(
        f"[{name}] wrote {path} and {path.with_suffix('.png')} "
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
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(sys.path, proto["stage"]),
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
        value = metrics.get("test_acc", metrics.get("val_acc"))
        if isinstance(value, (int, float)):
            out.append(f"{arm} {value:.4f}")
    return ", ".join(out)


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- assembly
def pair_values(
    pair: dict[str, Any], seeds: list[dict[str, Any]], study_seeds: Sequence[int]
) -> list[float | None]:
    """Per planned seed of the study, the pair's paired quantity: ``b - a``, or ``b / a`` for
    ``"scale": "log_ratio"``; ``None`` where a seed has no finite value for either arm."""
    by_seed = {rec["seed"]: rec["arms"] for rec in seeds}
    out: list[float | None] = []
    for seed in study_seeds:
        arms = by_seed.get(seed, {})
        a = arms.get(pair["a"], {}).get(pair["metric"])
        b = arms.get(pair["b"], {}).get(pair["metric"])
        if not (_number(a) and _number(b)):
            out.append(None)
        elif pair.get("scale") == "log_ratio":
            out.append(b / a if a > 0 and b > 0 else None)
        else:
            out.append(b - a)
    return out


def summarize_pairs(
    proto: dict[str, Any],
    seeds: list[dict[str, Any]],
    headline: Sequence[tuple[str, str]],
    stage: str,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """Every declared pair's summary; the headline pairs are one Holm family. Verdicts: only a
    confirm-stage headline pair can be "reproduced"."""
    from repro import stats

    summary = []
    for study_name, study in proto["studies"].items():
        for pair in study["pairs"]:
            values = pair_values(pair, seeds, study["seeds"])
            s = stats.summarize(
                values, seeds=study["seeds"], scale=pair.get("scale", "difference"), alpha=alpha
            )
            summary.append({"study": study_name, **pair, **s})
    wanted = set(headline)
    known = {(p["study"], p["label"]) for p in summary}
    if wanted - known:
        raise ValueError(f"headline pairs not declared by the protocol: {sorted(wanted - known)}")
    family = [p for p in summary if (p["study"], p["label"]) in wanted]
    stats.holm_family(family, alpha=alpha)
    for p in summary:
        p["headline"] = (p["study"], p["label"]) in wanted
        p["verdict"] = stats.verdict(p, p["expected"], family=p["headline"])
        if stage != "confirm":  # exploration resolves nothing for good
            p["verdict"]["reproduced"] = False
    return summary


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
    headline: Sequence[tuple[str, str]] = (),
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
    stage = proto["stage"]
    summary = summarize_pairs(proto, seeds, headline, stage)
    cpu = sum(done[t.key]["cpu_seconds"] for t in tasks)
    return {
        "schema_version": SCHEMA_VERSION,
        "method": name,
        "stage": stage,
        "command": command,
        "protocol": proto,
        "protocol_hash": protocol_hash(proto),
        "premise": module.premise(proto, seeds, infos),
        "arms": arms,
        "seeds": seeds,
        "headline": [list(h) for h in headline],
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
    "stage": str,
    "command": str,
    "protocol": dict,
    "premise": list,
    "arms": list,
    "seeds": list,
    "headline": list,
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
    "n_planned": int,
    "missing_seeds": list,
    "headline": bool,
    "verdict": dict,
}
_PREREG = {"path": str, "sha256": str, "commit": str}


def leaked_test_figures(result: dict[str, Any]) -> list[str]:
    """Where an exploration result holds a figure named after the test split (a metric or
    info key containing ``test``): it must hold none."""
    found: list[str] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if "test" in str(k).lower():
                    found.append(f"{where}.{k}")
                walk(v, f"{where}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")

    walk(result.get("seeds", []), "seeds")
    walk(result.get("infos", {}), "infos")
    for i, p in enumerate(result.get("summary", [])):
        if "test" in str(p.get("metric", "")).lower():
            found.append(f"summary[{i}].metric")
    return found


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
    if result.get("schema_version") != SCHEMA_VERSION:
        errors.append(
            f"schema_version: expected {SCHEMA_VERSION}, got {result.get('schema_version')}"
        )
    stage = result.get("stage")
    if stage not in ("explore", "confirm"):
        errors.append(f"stage: expected 'explore' or 'confirm', got {stage!r}")
    proto = result.get("protocol", {})
    if isinstance(proto, dict) and proto.get("stage") != stage:
        errors.append(f"protocol.stage {proto.get('stage')!r} differs from stage {stage!r}")
    if stage == "confirm":
        need(result.get("preregistration"), _PREREG, "preregistration")
    if stage == "explore":
        errors += [
            f"{w}: a test-split figure in an exploration result"
            for w in leaked_test_figures(result)
        ]
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
    headline = {tuple(h) for h in result.get("headline", [])}
    for i, p in enumerate(result.get("summary", [])):
        if not need(p, _PAIR, f"summary[{i}]") or any(k not in p for k in _PAIR):
            continue
        if p["headline"] != ((p["study"], p["label"]) in headline):
            errors.append(f"summary[{i}]: `headline` disagrees with the result's headline list")
        v = p["verdict"]
        if not all(isinstance(v.get(k), bool) for k in ("resolved", "reproduced")):
            errors.append(f"summary[{i}].verdict: expected booleans `resolved`, `reproduced`")
            continue
        if v["reproduced"] and not (stage == "confirm" and p["headline"] and v["resolved"]):
            errors.append(f"summary[{i}]: reproduced outside a resolved confirm headline pair")
        if p["n"] >= 2 and not (_number(p.get("mean")) and _number(p.get("sd"))):
            errors.append(f"summary[{i}]: mean/sd not computed")
        if p["n"] >= 2:
            ci = p.get("ci")
            if not (isinstance(ci, list) and len(ci) == 2 and all(_number(x) for x in ci)):
                errors.append(f"summary[{i}]: ci not computed")
        if p["headline"] and p["n"] >= 2 and p.get("ci_holm") is None:
            errors.append(f"summary[{i}]: headline pair without a Holm interval")
        if len(p["missing_seeds"]) + p["n"] != p["n_planned"]:
            errors.append(f"summary[{i}]: n + missing seeds != planned seeds")
    return errors

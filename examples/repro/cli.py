"""Command line of ``examples/reproduce.py`` (see its docstring)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from repro import METHODS
from repro.common import run_method


def _seed_list(text: str) -> list[int]:
    """``"100-107"`` or ``"100,101,105"`` -> a list of seed ids."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python examples/reproduce.py",
        description="Reproduction suite: paired-seed experiments for each method, JSON + plots; "
        "explore (validation only) and confirm (pre-registered, test split) stages.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in (*METHODS, "all"):
        r = sub.add_parser(
            name, help=f"run the {name} protocol" if name != "all" else "run every protocol"
        )
        r.add_argument(
            "--stage",
            choices=("explore", "confirm"),
            default="explore",
            help="explore (default: train/validation only, the test split is never read) or "
            "confirm (the committed pre-registration's seeds and protocol, the test split)",
        )
        r.add_argument(
            "--seeds",
            type=int,
            default=None,
            help="explore: number of seeds 0..N-1 (default: each protocol's own)",
        )
        r.add_argument("--quick", action="store_true", help="tiny smoke run (minutes, for CI)")
        r.add_argument(
            "--out",
            default="outputs/repro",
            help="where results go: <out>/explore/<method>.json or <out>/<method>.json "
            "(confirm), with the plot, parts and cache",
        )
        r.add_argument("--workers", type=int, default=2, help="processes (1 torch thread each)")
        r.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
        r.add_argument(
            "--prereg",
            default=None,
            help="confirm: the pre-registration file (default "
            "docs/results/preregistered/<method>.json)",
        )
    g = sub.add_parser(
        "register", help="write docs/results/preregistered/<method>.json for a confirm run"
    )
    g.add_argument("method", choices=METHODS)
    g.add_argument("--seeds", required=True, help="confirm seeds, e.g. 100-107 (>= 100)")
    g.add_argument(
        "--explore-seeds",
        default="",
        help="seeds used in exploration outside the explore JSON (e.g. 0-2 of a side study)",
    )
    g.add_argument("--notes", default="", help="what the registration decides, in a sentence")
    g.add_argument("--quick", action="store_true", help="register the quick protocol (tests)")
    g.add_argument("--force", action="store_true", help="overwrite an existing file")
    c = sub.add_parser("cards", help="regenerate the method cards' results regions and plots")
    c.add_argument("--results", default="docs/results", help="directory of <method>.json")
    c.add_argument("--cards", default="docs/methods", help="directory of the method cards")
    c.add_argument("--img", default="docs/img", help="where repro-<method>.png are written")
    c.add_argument("--readme", default="README.md", help="the README with the evidence table")
    c.add_argument(
        "--check",
        action="store_true",
        help="only report regions that differ from their JSON (exit 1 if any)",
    )
    return p


def _command(args: argparse.Namespace, name: str) -> str:
    parts = ["python", "examples/reproduce.py", name]
    if args.stage != "explore":
        parts += ["--stage", args.stage]
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.quick:
        parts.append("--quick")
    parts += ["--out", args.out]
    if args.workers != 2:
        parts += ["--workers", str(args.workers)]
    if args.prereg:
        parts += ["--prereg", args.prereg]
    return shlex.join(parts)


def _cards(args: argparse.Namespace) -> int:
    from repro import cards

    results, card_dir = Path(args.results), Path(args.cards)
    if args.check:
        stale = cards.stale_cards(results, card_dir)
        for name in stale:
            print(f"{cards.card_path(card_dir, name)}: a region differs from {results}")
        readme = Path(args.readme)
        if cards.summary_stale(results, readme):
            print(f"{readme}: the evidence table differs from {results}/*.json")
            return 1
        return 1 if stale else 0
    done = cards.update_cards(results, card_dir, Path(args.img))
    print(f"updated the cards of: {', '.join(done) or 'nothing (no JSON found)'}")
    if cards.update_summary(results, Path(args.readme)):
        print(f"updated the evidence table in {args.readme}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from repro import prereg

    path = prereg.path_for(args.method)
    if path.exists() and not args.force:
        raise SystemExit(f"{path} exists (a registration is not rewritten; --force to replace)")
    data = prereg.build(
        args.method,
        _seed_list(args.seeds),
        _seed_list(args.explore_seeds) if args.explore_seeds else (),
        quick=args.quick,
        notes=args.notes,
    )
    written = prereg.write(data)
    print(
        f"wrote {written}: {len(data['seeds'])} seeds {data['seeds'][0]}..{data['seeds'][-1]}, "
        f"{len(data['headline'])} headline pairs, protocol {data['protocol_hash']}; commit it, "
        f"then run `python examples/reproduce.py {args.method} --stage confirm`"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "cards":
        return _cards(args)
    if args.command == "register":
        return _register(args)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.stage == "confirm" and args.seeds is not None:
        raise SystemExit("--seeds: the confirm stage runs the pre-registration's seeds")
    names = list(METHODS) if args.command == "all" else [args.command]
    out = Path(args.out)
    t0 = time.perf_counter()
    for name in names:
        run_method(
            name,
            out=out,
            quick=args.quick,
            seeds=None if args.seeds is None else list(range(args.seeds)),
            workers=args.workers,
            data_dir=args.data_dir,
            command=_command(args, name),
            stage=args.stage,
            prereg=Path(args.prereg) if args.prereg else None,
        )
    if len(names) > 1:
        print(f"all done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())

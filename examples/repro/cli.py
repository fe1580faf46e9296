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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python examples/reproduce.py",
        description="Reproduction suite: paired-seed experiments for each method, JSON + plots.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in (*METHODS, "all"):
        r = sub.add_parser(
            name,
            help=f"run the {name} protocol"
            if name != "all"
            else "run every protocol (the coherent one only once it is written)",
        )
        r.add_argument(
            "--seeds", type=int, default=None, help="number of seeds (default: each protocol's own)"
        )
        r.add_argument("--quick", action="store_true", help="tiny smoke run (minutes, for CI)")
        r.add_argument(
            "--out",
            default="outputs/repro",
            help="where <method>.json, <method>.png, parts and cache go",
        )
        r.add_argument("--workers", type=int, default=2, help="processes (1 torch thread each)")
        r.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
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
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.quick:
        parts.append("--quick")
    parts += ["--out", args.out]
    if args.workers != 2:
        parts += ["--workers", str(args.workers)]
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "cards":
        from repro import cards

        results, card_dir = Path(args.results), Path(args.cards)
        if args.check:
            stale = cards.stale_cards(results, card_dir)
            for name in stale:
                print(
                    f"{cards.card_path(card_dir, name)}: region differs from {results}/{name}.json"
                )
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
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    names = list(METHODS) if args.command == "all" else [args.command]
    out = Path(args.out)
    t0 = time.perf_counter()
    for name in names:
        run_method(
            name,
            out=out,
            quick=args.quick,
            seeds=args.seeds,
            workers=args.workers,
            data_dir=args.data_dir,
            command=_command(args, name),
        )
    if len(names) > 1:
        print(f"all done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())

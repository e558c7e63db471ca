"""`dapdee bench NAME [ARGS...]`: run a benchmark script from bench/ (e.g. plan_speed, paper)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "commands")


def cmd_bench(args: argparse.Namespace) -> int:
    names = available()
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    sys.argv = [str(BENCH_DIR / f"{args.name}.py"), *args.args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:  # argparse inside the script (it printed its usage), or a message
        if isinstance(exc.code, str):
            raise ValueError(exc.code) from None  # printed as one `dapdee: error:` line, exit 2
        return int(exc.code or 0)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (prints ratios vs baselines/limits)")
    p.add_argument("name", help="benchmark name: " + ", ".join(available()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_bench)

"""`dapdee` command line: one front for every tool.

Each command family lives next to its implementation and registers itself through an
`add_commands(subparsers)` function listed in COMMAND_MODULES; handlers import heavy
dependencies (torch models, web frameworks) only when they run. User errors
(ValueError, OSError, KeyError) end in one `dapdee: error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence

from dapdee.names import MAX_INPUT_ELEMENTS

MAX_THREADS = 256  # torch threads a command may ask for
MAX_SLOWDOWN = 1e4  # K: a device this much slower than the host is not a device any more
ARTIFACT_MODEL_HELP = (  # --model of the commands that load an artifact (a manifest alone builds zoo: specs only)
    "the model spec the artifact's weights belong to; needed when its manifest names a "
    "package.module:factory spec (only zoo: specs are built from a manifest alone)"
)
COMMAND_MODULES = (
    "dapdee.commands",  # graph, profile
    "dapdee.planning.commands",  # plan
    "dapdee.training.commands",  # train, eval, calibrate
    "dapdee.serve",  # serve planner|edge
    "dapdee.device.commands",  # device run, up
    "dapdee.bench.commands",  # bench ...
)


def shape_arg(text: str) -> tuple[int, ...]:
    """Parse `1,3,32,32` into a shape tuple."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r}: expected integers like 1,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"input shape {text!r}: dimensions must be positive")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise argparse.ArgumentTypeError(f"input shape {text!r}: more than {MAX_INPUT_ELEMENTS} elements")
    return shape


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return v


def thread_count(text: str) -> int:
    """argparse type: a number of torch threads, 1 to MAX_THREADS (torch refuses fewer, and a
    huge count crashes the process)."""
    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {text!r}")
    return v


def check_slowdown(slowdown: float) -> None:
    """ValueError naming --slowdown unless it is a number in [1, MAX_SLOWDOWN] (K: the device is
    K x slower than this machine)."""
    if not 1 <= slowdown <= MAX_SLOWDOWN:  # nan fails this too
        raise ValueError(f"--slowdown: expected a number in [1, {MAX_SLOWDOWN:g}], got {slowdown!r}")


def slowdown(text: str) -> float:
    """argparse type: a device slowdown K (`check_slowdown`)."""
    try:
        v = float(text)
        check_slowdown(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [1, {MAX_SLOWDOWN:g}], got {text!r}") from None
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in [low, high] (`low_open`: in (low, high])."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < v if low_open else low <= v) or not v <= high:  # nan fails too
            span = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text!r}")
        return v

    return parse


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def package_version() -> str:
    """The installed distribution's version (pyproject's `version`), or "unknown" from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dapdee")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapdee", description="Edge-device collaborative DNN inference.")
    parser.add_argument("--version", action="version", version=f"dapdee {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for modname in COMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name):
                continue  # a command family not installed in this build
            raise
        mod.add_commands(sub)
    return parser


class Terminated(Exception):
    """A command stopped by SIGTERM after closing what it holds (exit 143, as the signal's own)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("dapdee: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"dapdee: {exc}", file=sys.stderr)
        return 143
    except (ValueError, OSError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dapdee: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    # `python -m dapdee.cli` runs this file as `__main__`, a second copy of the module: run the
    # imported one, so that the exceptions commands raise (`Terminated`) are the ones caught
    from dapdee.cli import main as imported_main

    sys.exit(imported_main())

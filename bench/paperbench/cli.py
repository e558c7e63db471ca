"""`python bench/paper.py [--quick | --smoke] [...]` and `dapdee bench paper`: run the bench,
score it, write `OUT/paper.json`, `OUT/paper.md` and the plots, print the report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dapdee.bench.paperbench.experiments import Bench
from dapdee.bench.paperbench.options import Options, build_options
from dapdee.bench.paperbench.plans import PLANNERS
from dapdee.bench.paperbench.plots import make_plots
from dapdee.bench.paperbench.report import markdown
from dapdee.bench.paperbench.runner import run_all
from dapdee.bench.paperbench.scoring import targets

QUIET_LOGGERS = ("dapdee.device", "dapdee.client", "httpx", "dapdee.planner", "uvicorn.error")


def _plots(res: dict[str, Any], o: Options) -> list[str]:
    if not o.plots:
        return []
    try:
        return make_plots(res, Path(o.out), o.slowdown)
    except Exception as exc:  # plots are a convenience: never lose the numbers
        print(f"warning: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []


def document(b: Bench, res: dict[str, Any], lines: list[dict[str, Any]], info: dict[str, Any],
             plots: list[str], wall_s: float) -> dict[str, Any]:  # fmt: skip
    """`paper.json`: the setup, every cell's results, fidelity, the targets, cache counts."""
    noise = {k: v for k, v in info.items() if k not in ("fidelity", "throughput_fidelity")}
    return {"setup": {**asdict(b.o), "planners": list(PLANNERS), "noise": noise}, "skipped": b.skipped,
            "results": res, "fidelity": info["fidelity"], "throughput_fidelity": info["throughput_fidelity"],
            "targets": lines, "plots": plots, "cells_cached": b.cache.hits, "cells_measured": b.cache.measured,
            "wall_s": wall_s}  # fmt: skip


def keep_to(cpus: tuple[int, ...]) -> None:
    """Moves every thread of this process onto `cpus`; threads started later inherit the mask of
    the thread that starts them. O(threads)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def main(argv: list[str] | None = None) -> int:
    o = build_options(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    torch.set_num_threads(1)  # the emulated device computes on one thread (its K x clock is its CPU time)
    if o.cpu_split is not None:  # the emulated device (this process) off the edge worker's CPU
        keep_to(o.cpu_split[1])
    cmd = "python bench/paper.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.monotonic()
    b = Bench(o)
    if not b.models:
        print(f"no artifacts found for {', '.join(o.models)}", file=sys.stderr)
        return 2
    res = asyncio.run(run_all(b))
    lines, info = targets(res, o)
    out = Path(o.out)
    plots = _plots(res, o)
    (out / "paper.json").write_text(json.dumps(document(b, res, lines, info, plots, time.monotonic() - t0), indent=1))
    md = markdown(res, lines, info, o, b.skipped, plots, cmd.strip())
    (out / "paper.md").write_text(md)
    print(md)
    print(f"{b.cache.measured} cells measured, {b.cache.hits} from cache; {time.monotonic() - t0:.0f} s; "
          f"wrote {out / 'paper.json'}, {out / 'paper.md'}", file=sys.stderr)  # fmt: skip
    return 0

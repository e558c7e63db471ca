"""`dapdee graph` and `dapdee profile`: cost graphs and measured timings from models."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dapdee.costgraph import CostGraph
    from dapdee.models import LoadedModel


def _model_args(p: argparse.ArgumentParser) -> None:
    from dapdee.cli import shape_arg

    p.add_argument("model", nargs="?", help="zoo:NAME[?opt=v&...] or package.module:factory (optional with --weights)")
    p.add_argument("--input-shape", type=shape_arg, help="e.g. 1,3,32,32 (default: the artifact's or the zoo's)")
    p.add_argument("--weights", metavar="ARTIFACT", help="artifact directory (weights.safetensors + manifest.json)")
    p.add_argument("--name", help="model name in the cost graph (default: zoo name, factory name or artifact name)")
    p.add_argument("--out", help="output file (default: stdout)")


def _load(args: argparse.Namespace) -> LoadedModel:
    from dapdee.models import load_model

    if not args.model and not args.weights:
        raise ValueError("give a MODEL (zoo:NAME or package.module:factory) or --weights ARTIFACT")
    return load_model(args.model or "", input_shape=args.input_shape, weights=args.weights, name=args.name)


def _check_out(out: str | None) -> None:
    """ValueError naming --out when it cannot be a file to write (a folder, or in a folder that
    does not exist), checked before any model is loaded or measured."""
    if not out:
        return
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r}: is a folder; name the file to write")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out!r}: the folder {folder!r} does not exist")


def _write(graph: CostGraph, out: str | None) -> None:
    """The graph's JSON to `out` (atomically: a failed write leaves the file as it was), else
    to stdout."""
    if out:
        graph.save(out)
    else:
        sys.stdout.write(graph.to_json() + "\n")


def cmd_graph(args: argparse.Namespace) -> int:
    _check_out(args.out)
    _write(_load(args).graph, args.out)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from dapdee.costgraph import CostGraph

    _check_out(args.out)
    if args.merge:
        from dapdee.profiler import merge_profiles

        if args.model or args.weights:
            raise ValueError("--merge takes two profile files and no MODEL")
        merged = merge_profiles(CostGraph.load(args.merge[0]), CostGraph.load(args.merge[1]))
        _write(merged, args.out)
        return 0
    if not args.tier:
        raise ValueError("--tier device|edge is required (or use --merge DEVICE.json EDGE.json)")
    from tqdm import tqdm

    from dapdee.profiler import profile_model

    loaded = _load(args)
    with tqdm(total=len(loaded.graph.nodes), desc=f"profile {loaded.name} ({args.tier})", file=sys.stderr) as bar:
        graph = profile_model(
            loaded,
            args.tier,
            slowdown=args.slowdown,
            threads=args.threads,
            repeats=args.repeats,
            progress=lambda i, n: bar.update(1),
        )
    _write(graph, args.out)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from dapdee.cli import positive_int, slowdown, thread_count

    g = sub.add_parser("graph", help="write a model's cost graph JSON (DESIGN.md format)")
    _model_args(g)
    g.set_defaults(func=cmd_graph)

    p = sub.add_parser("profile", help="measure per-node latency into a cost graph, or merge two tiers")
    _model_args(p)
    p.add_argument("--tier", choices=("device", "edge"))
    p.add_argument("--slowdown", type=slowdown, default=1.0, help="emulate a device K x slower than this machine")
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads while measuring (default 1)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed runs per node (default 20)")
    p.add_argument("--merge", nargs=2, metavar=("DEVICE_JSON", "EDGE_JSON"), help="combine two tiers' profiles")
    p.set_defaults(func=cmd_profile)

"""`dapdee serve planner|edge`: each service registers its own sub-command (imported lazily, so
the core library never imports a web framework)."""

from __future__ import annotations

import argparse
import importlib


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a service (planner or edge worker) under uvicorn")
    services = p.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for modname in ("dapdee.planner.cli", "dapdee.edge_worker.cli"):
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        mod.add_serve_command(services)

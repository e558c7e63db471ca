"""The cache of finished cells (`OUT/paper_cells.json`): each cell is keyed by its whole
configuration, so a rerun measures only what is missing and `--fresh` measures everything."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

# 3: device runtime package, services as subprocesses, baselines from POST /plan, cost model v2
# 4: the edge worker on a CPU of its own (`--no-pin`: shared, keyed "pin0")
CELLS_SCHEMA = 4


class CellCache:
    """Finished cells on disk; `put` writes the file at once (atomic replace), so an
    interrupted run keeps what it measured."""

    def __init__(self, out: Path, fresh: bool) -> None:
        self.path = out / "paper_cells.json"
        self.cells: dict[str, Any] = {}
        self.hits = 0
        self.measured = 0
        if self.path.is_file() and not fresh:
            with contextlib.suppress(ValueError, OSError):
                d = json.loads(self.path.read_text())
                if d.get("schema") == CELLS_SCHEMA:
                    self.cells = d.get("cells", {})

    def get(self, key: str) -> dict[str, Any] | None:
        hit = self.cells.get(key)
        if hit is not None:
            self.hits += 1
        return hit

    def put(self, key: str, result: dict[str, Any]) -> None:
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.cells[key] = result
        self.measured += 1
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": CELLS_SCHEMA, "cells": self.cells}, indent=1))
        tmp.replace(self.path)

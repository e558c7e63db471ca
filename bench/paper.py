"""The paper's evaluation through the real services: `python bench/paper.py [--quick | --smoke]`.
The bench itself is the package `dapdee.bench.paperbench` (see its docstring)."""

from __future__ import annotations

from dapdee.bench.paperbench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

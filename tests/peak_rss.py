"""A library call's peak memory, measured in a fresh process (a test process's own high-water
mark is whatever its earlier tests left)."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """\
import importlib, resource, sys
module, name, arg = sys.argv[1:]
fn = getattr(importlib.import_module(module), name)
try:
    fn(arg)
    print("ok")
except ValueError as exc:
    print("refused", exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib(function: str, arg: str) -> tuple[str, int]:
    """`module:function(arg)` run in a fresh Python: ("ok" or "refused MESSAGE" for a ValueError,
    the process's peak RSS in KiB, Linux)."""
    module, name = function.split(":")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, module, name, arg], capture_output=True, text=True, check=True)
    verdict, peak = out.stdout.strip().rsplit("\n", 1)
    return verdict, int(peak)

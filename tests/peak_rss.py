"""A library call's peak memory, measured in a fresh process (a test process's own high-water
mark is whatever its earlier tests left): the child's `VmHWM`, which starts anew at exec
(`ru_maxrss` of a child spawned by vfork starts at its parent's peak)."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """\
import importlib, sys
module, name, arg = sys.argv[1:]
fn = getattr(importlib.import_module(module), name)
try:
    fn(arg)
    print("ok")
except ValueError as exc:
    print("refused", exc)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(int(hwm.split()[1]))
"""


def peak_kib(function: str, arg: str) -> tuple[str, int]:
    """`module:function(arg)` run in a fresh Python: ("ok" or "refused MESSAGE" for a ValueError,
    the process's peak RSS in KiB, Linux)."""
    module, name = function.split(":")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, module, name, arg], capture_output=True, text=True, check=True)
    verdict, peak = out.stdout.strip().rsplit("\n", 1)
    return verdict, int(peak)

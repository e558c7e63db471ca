"""The GIL switch interval the services run with; their command lines set it, no library does.

A service runs compute beside its event loop in threads (the edge worker's torch executor, the
planner's min-cuts and rebalances). Such a thread needs the GIL back between operations, and the
event loop needs it back to answer anything; at CPython's default 5 ms switch interval either
may wait up to 5 ms for each hand-over, which stretches a 3 ms frame several times over on a busy
edge worker and puts 5 ms steps into the planner's plan latency while a min-cut runs. 0.5 ms
makes the hand-overs ten times shorter for a few more switches per second.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def shorten_switch_interval() -> None:
    """Set this process's GIL switch interval to SWITCH_INTERVAL_S (process-wide: call it from
    a command line's entry point only)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)

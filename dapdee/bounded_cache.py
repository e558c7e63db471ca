"""A least-recently-used cache bounded by what its entries hold, not by their count.

The executor's step plans and the edge worker's per-cut figures are keyed by the cut a request
names, which a client chooses freely; an entry holds O(nodes) names, so a count cap alone would
let a large model's entries add up to hundreds of megabytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """Entries each with a cost (say, the names they hold), `budget` in all at most: putting one
    drops the entries used longest ago until it fits; an entry that alone costs more than the
    budget is not kept. Safe to share between threads (the executor's is used by the event loop
    and the compute threads): each call holds a lock. `get` and `put` are O(1) amortised."""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"budget: must be at least 1, got {budget!r}")
        self.budget = budget
        self.total = 0  # Σ cost of the entries held
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value held for `key` (now the most recently used), else None."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key: K, value: V, cost: int) -> None:
        """Hold `value` for `key` at `cost` (≥ 0), replacing what `key` held."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.total -= old[1]
            if cost > self.budget:
                return
            while self.total + cost > self.budget:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.total -= dropped
            self._entries[key] = (value, cost)
            self.total += cost

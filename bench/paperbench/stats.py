"""Small statistics of measured frames: quantiles, pooled rounds, steady-state throughput."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# per-frame terms a round records: medians of its frames, and each process's CPU per frame
TERMS = ("device_ms", "edge_compute_ms", "edge_queue_ms", "device_cpu_ms", "edge_cpu_ms")


def pct(xs: Sequence[float], q: float) -> float | None:
    """The q-quantile (nearest rank, q in [0, 1]) of xs; None when empty. O(n log n)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def med(xs: Sequence[float]) -> float | None:
    """The median of xs; None when empty. O(n log n)."""
    return statistics.median(xs) if xs else None


def steady_throughput(starts: Sequence[float], ends: Sequence[float], inflight: int) -> float | None:
    """Frames per second of a stream whose frames started at `starts` and finished at `ends` (s),
    at most `inflight` at a time. With at least two pipeline-fulls of frames: the completions
    after the `inflight`-th over the time from it to the last, so the pipeline fill is not
    counted whether completions come staggered (one per bottleneck time) or in clusters (frames
    sharing one shaped uplink advance together and finish together: counting from the first
    completion would then credit a whole cluster to almost no time). With fewer: all frames
    over the time from the first start to the last end. None without frames. O(n log n)."""
    if not ends:
        return None
    ends = sorted(ends)
    k = max(1, inflight)
    if len(ends) >= 2 * k and ends[-1] > ends[k - 1]:
        return (len(ends) - k) / (ends[-1] - ends[k - 1])
    first = min(starts)
    return len(ends) / (ends[-1] - first) if ends[-1] > first else None


def rounds_disagree(values: Sequence[float | None], ratio: float) -> bool:
    """Whether a plan's per-round numbers (None: a round without one) differ by more than the
    factor `ratio`: the largest over the smallest. O(n)."""
    xs = [x for x in values if x]
    return len(xs) >= 2 and max(xs) > ratio * min(xs)


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool repeated measurements of one plan: the frames' latencies pooled, the throughput the
    median of the rounds' (two rounds: their mean; a tie-break third: the middle one, so one
    round caught in a slow spell of the host does not decide it); per-round medians and
    throughputs kept for the noise band. O(frames)."""
    meas = [x for r in rounds for x in r["measured_ms"]]
    tputs = [r["throughput_fps"] for r in rounds if r["throughput_fps"]]
    correct = sum(r["correct"] for r in rounds)
    labelled = sum(r["labelled"] for r in rounds)
    return {
        "frames": sum(r["frames"] for r in rounds),
        "requested": sum(r["requested"] for r in rounds),
        "capped": any(r["capped"] for r in rounds),
        "median_ms": med(meas),
        "p90_ms": pct(meas, 0.9),
        "throughput_fps": statistics.median(tputs) if tputs else None,
        "round_median_ms": [r["median_ms"] for r in rounds],
        "round_throughput_fps": [r["throughput_fps"] for r in rounds],
        "where": {w: sum(r["where"][w] for r in rounds) for w in ("edge", "local", "fallback")},
        "errors": sorted({e for r in rounds for e in r["errors"]}),
        "frame_accuracy": correct / labelled if labelled else None,
        "measured_ms": meas,
        "terms_ms": {t: med([r[t] for r in rounds if r.get(t) is not None]) for t in TERMS},
    }


def skipped_measurement(pred_ms: float, cap_s: float) -> dict[str, Any]:
    """The record of a plan not run because one frame is predicted to take longer than the cap."""
    return {
        "frames": 0,
        "capped": True,
        "not_run": f"predicted {pred_ms / 1000:.1f} s/frame > cap {cap_s:g} s",
        "median_ms": None,
        "p90_ms": None,
        "throughput_fps": None,
        "round_median_ms": [],
        "round_throughput_fps": [],
        "where": {},
        "errors": [],
        "frame_accuracy": None,
        "measured_ms": [],
        "terms_ms": {t: None for t in TERMS},
    }

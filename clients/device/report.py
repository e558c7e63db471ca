"""Reporting a run: aggregates, a per-frame table, JSON lines, and the per-frame log record
(which exit the frame left at, and on which side)."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import IO, Any

from dapdee.device.types import FrameRecord

frame_log = logging.getLogger("dapdee.device.frame")


def summarize(records: Sequence[FrameRecord], wall_s: float | None = None, frames: int | None = None) -> dict[str, Any]:
    """Aggregates of a run: counts by place and exit, mean / p50 / p95 latencies, bytes, cut,
    accuracy over labelled frames, and frames/s over `wall_s`. `frames`: the run's frame count
    when `records` hold only its last frames (a stream that keeps none, whose runtime keeps the
    most recent `MAX_RECORDS`): `frames` and the throughput then count the whole run, and
    `frames_summarised` says how many records the other aggregates cover. O(n log n)."""
    total = len(records) if frames is None else max(frames, len(records))
    if not records:
        return {"frames": total}
    meas = [r.measured_ms for r in records]
    pred = [r.predicted_ms for r in records if r.predicted_ms is not None]
    labelled = [r for r in records if r.correct is not None]
    out: dict[str, Any] = {
        "frames": total,
        "frames_summarised": len(records),
        "where": dict(Counter(r.where for r in records)),
        "exits": dict(Counter(r.exit for r in records)),
        "predicted_ms_mean": statistics.fmean(pred) if pred else None,
        "measured_ms_mean": statistics.fmean(meas),
        "measured_ms_p50": statistics.median(meas),
        "measured_ms_p95": sorted(meas)[max(0, math.ceil(0.95 * len(meas)) - 1)],
        "bytes_sent_mean": statistics.fmean(r.bytes_sent for r in records),
        "device_nodes_mean": statistics.fmean(r.device_nodes for r in records),
        "accuracy": (sum(bool(r.correct) for r in labelled) / len(labelled)) if labelled else None,
        "rate_mbps": records[-1].rate_mbps,
        "slowdown": records[-1].slowdown,
    }
    if wall_s:
        out["throughput_fps"] = total / wall_s
    return out


def format_records_table(records: Sequence[FrameRecord], limit: int = 40) -> str:
    """A per-frame table of the last `limit` frames. O(limit)."""
    head = (
        f"{'#':>4} {'where':<8} {'exit':<6} {'dev':>4} {'bytes':>7} {'pred ms':>8} {'meas ms':>8} {'cls':>3} {'y':>3}"
    )
    lines = [head]
    for r in records[-limit:]:
        pred = f"{r.predicted_ms:8.1f}" if r.predicted_ms is not None else f"{'-':>8}"
        y = "" if r.label is None else str(r.label)
        lines.append(
            f"{r.index:>4} {r.where:<8} {r.exit:<6} {r.device_nodes:>4} {r.bytes_sent:>7} {pred} "
            f"{r.measured_ms:8.1f} {r.pred_class:>3} {y:>3}"
        )
    return "\n".join(lines)


def open_log(path: str) -> IO[str]:
    """The --log file (one JSON line per frame), opened for writing (truncated); ValueError
    naming --log when it cannot be, so a run does not go on only to lose its records. O(1)."""
    try:
        return open(path, "w")  # the caller's with-block closes it
    except OSError as exc:
        raise ValueError(f"--log {path!r}: cannot write the file ({exc.strerror or exc})") from None


def jsonl_line(rec: FrameRecord) -> str:
    """One frame as a JSON line (every FrameRecord field)."""
    return json.dumps(rec.as_dict()) + "\n"


def write_jsonl(records: Sequence[FrameRecord], path: str) -> None:
    """One JSON object per frame. O(n)."""
    with open(path, "w") as f:
        f.writelines(jsonl_line(r) for r in records)


def log_frame(rec: FrameRecord) -> None:
    """The frame's log record (INFO on `dapdee.device.frame`): the message says at which exit
    the frame left and on which side; the record's fields (`extra`) carry the numbers, so the
    JSON log format writes them as keys."""
    if not frame_log.isEnabledFor(logging.INFO):
        return
    side = {"edge": "on the edge", "local": "on the device", "fallback": "on the device (fallback)"}[rec.where]
    frame_log.info(
        "frame %d left at exit %s %s",
        rec.index,
        rec.exit,
        side,
        extra={
            "frame": rec.index,
            "exit": rec.exit,
            "side": "edge" if rec.where == "edge" else "device",
            "where": rec.where,
            "cut": rec.device_nodes,
            "bytes_sent": rec.bytes_sent,
            "predicted_ms": rec.predicted_ms,
            "measured_ms": round(rec.measured_ms, 3),
            "plan_id": rec.plan_id,
            "error": rec.error,
        },
    )

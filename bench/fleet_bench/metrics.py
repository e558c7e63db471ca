"""The figures of one fleet run, computed from its raw result (`runner.run_scenario`): every
number comes from frames that were really released, answered or dropped. Pure functions.

- goodput: frames/s, over the whole fleet, answered within the latency budget (a dropped or
  unanswered frame missed it); `offered` is the frames/s released; `goodput_se` its standard
  error from the per-second counts of the window (the noise the comparisons allow);
- SLO attainment: the share of devices whose p95 latency is within the budget, dropped frames
  counted as infinitely late;
- p50 / p99: latency of the answered frames (release to answer);
- worker utilisation: compute-busy seconds / (window x slots), from the worker's
  `dapdee_edge_compute_busy_seconds_total`; and the worker process's CPU seconds per second;
- worker capacity and leases booked: the median capacity the worker advertised (ms/s, its
  nominal 1000 / κ) and the largest share of it the leases booked, polled in the window;
  `booking_series` keeps every poll from the cameras' start (warm-up included) as (s since
  the start, booked share, capacity);
- plan changes per device-minute: changes of a device's plan (exit, device part or worker)
  put in use during the window;
- prediction error, latency: the median over answered frames of |predicted − measured| /
  measured, predicted = the latency of the plan the frame ran (as the planner priced it: for a
  leased plan, at the load the other leases put on the worker), measured = release to answer;
- prediction error, throughput: the median over devices of |predicted − measured| / measured,
  predicted = min(frame rate, the throughput of the plan most of its frames ran), measured =
  its answered frames per second;
- stages (frames that went to the edge): median predicted device / transfer / edge ms next to
  the measured device compute, edge queue + compute, and the rest (uplink, round trip and both
  sides' HTTP work: latency − device − edge queue − edge compute).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

# frame fields (devices.device_result)
T, LAT, PRED, WHERE, EXIT, DEV, SERVER, PLAN = range(8)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values. O(n log n)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def plan_changes(plans: Sequence[Sequence[Any]], window_s: float) -> int:
    """Changes of plan (exit, device nodes, worker) put in use within [0, window_s). O(plans)."""
    changes, last = 0, None
    for t, exit_name, cut, worker, _ in sorted(plans, key=lambda p: p[0]):
        key = (exit_name, cut, worker)
        if last is not None and key != last and 0 <= t < window_s:
            changes += 1
        last = key
    return changes


def _device_throughput_error(dev: dict[str, Any], frame_rate: float, window_s: float) -> float | None:
    answered = [f for f in dev["frames"] if f[LAT] is not None]
    if not answered:
        return None
    main_plan = Counter(f[PLAN] for f in answered).most_common(1)[0][0]
    pred = dev["predicted"].get(main_plan, {})
    fps = pred.get("throughput_fps")
    predicted = frame_rate if fps is None else min(frame_rate, float(fps))
    measured = len(answered) / window_s
    return abs(predicted - measured) / measured


def _stages(frames: list[list[Any]], devices: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Median predicted and measured stage times of the frames answered by the edge."""
    pred_of = {pid: p for d in devices for pid, p in d["predicted"].items()}
    edge = [f for f in frames if f[WHERE] == "edge" and f[SERVER] is not None and f[PLAN] in pred_of]
    if not edge:
        return {}
    out: dict[str, float | None] = {"frames": float(len(edge))}
    for key in ("device_ms", "transfer_ms", "edge_ms", "latency_ms"):
        out[f"pred_{key}"] = _median([pred_of[f[PLAN]][key] for f in edge])
    out["meas_device_ms"] = _median([f[DEV] for f in edge])
    out["meas_edge_server_ms"] = _median([f[SERVER] for f in edge])
    out["meas_link_http_ms"] = _median([f[LAT] - f[DEV] - f[SERVER] for f in edge])
    out["meas_latency_ms"] = _median([f[LAT] for f in edge])
    return out


def goodput_se(frames: Sequence[Sequence[Any]], budget_ms: float, window_s: float) -> float:
    """Standard error of the goodput (frames/s) from its per-second counts. O(frames)."""
    bins = [0] * max(1, int(window_s))
    for f in frames:
        if f[LAT] is not None and f[LAT] <= budget_ms and 0 <= f[T] < len(bins):
            bins[int(f[T])] += 1
    return statistics.stdev(bins) / math.sqrt(len(bins)) if len(bins) > 1 else 0.0


def _device_ok(dev: dict[str, Any], budget_ms: float) -> bool:
    lat = [math.inf if f[LAT] is None else f[LAT] for f in dev["frames"]]
    p95 = percentile(lat, 0.95)
    return p95 is not None and p95 <= budget_ms


def summarize(raw: dict[str, Any], accuracy: dict[str, float] | None = None) -> dict[str, Any]:
    """The run's figures (module docstring); `accuracy` maps exit names to held-out accuracy
    (for the mean accuracy of the answered frames). O(frames log frames)."""
    sc, win = raw["scenario"], raw["window"]
    window_s, budget = sc["window_s"], sc["budget_ms"]
    devices = raw["devices"]
    frames = [f for d in devices for f in d["frames"]]
    answered = [f for f in frames if f[LAT] is not None]
    good = sum(1 for f in answered if f[LAT] <= budget)
    lat = [f[LAT] for f in answered]
    lat_err = [abs(f[PRED] - f[LAT]) / f[LAT] for f in answered if f[PRED] is not None and f[LAT] > 0]
    fps_err = [e for d in devices if (e := _device_throughput_error(d, sc["frame_rate"], window_s)) is not None]
    cpu = win["cpu_per_s"]
    clients_cpu = [v for k, v in cpu.items() if k.startswith("client-")]
    edge = win["edge"]
    n = max(1, len(devices))
    acc = [accuracy[f[EXIT]] for f in answered if accuracy and f[EXIT] in accuracy]
    changes = sum(plan_changes(d["plans"], window_s) for d in devices)
    return {
        "system": raw["system"],
        "n": sc["n"],
        "k": sc["k"],
        "model": sc["model"],
        "budget_ms": budget,
        "frame_rate": sc["frame_rate"],
        "window_s": window_s,
        "devices": len(devices),
        "released": len(frames),
        "offered_fps": len(frames) / window_s,
        "goodput_fps": good / window_s,
        "goodput_se": goodput_se(frames, budget, window_s),
        "goodput_per_device": good / window_s / n,
        "answered_fps": len(answered) / window_s,
        "dropped_share": 1 - len(answered) / len(frames) if frames else None,
        "slo_attainment": sum(_device_ok(d, budget) for d in devices) / n,
        "p50_ms": percentile(lat, 0.5),
        "p99_ms": percentile(lat, 0.99),
        "where": dict(Counter(f[WHERE] for f in answered)),
        "exits": dict(Counter(f[EXIT] for f in answered)),
        "accuracy": statistics.fmean(acc) if acc else None,
        "utilisation": edge["busy_s"] / (win["wall_s"] * edge["slots"]),
        "worker_cpu": cpu.get("edge"),
        "planner_cpu": cpu.get("planner"),
        "clients_cpu": sum(clients_cpu),
        "client_cpu_max": max(clients_cpu, default=None),
        "edge_requests": edge["requests"],
        "edge_rejected": edge["rejected"],
        "booked_max": win["booked_max"],
        "capacity_ms_per_s": win.get("capacity_ms_per_s"),
        "booking_series": win.get("booking_series", []),
        "planner_counts": win.get("planner", {}),
        "planner_run_counts": win.get("planner_run", {}),
        "plan_changes_per_device_min": changes / (n * window_s / 60.0),
        "pred_err_latency": _median(lat_err),
        "pred_err_throughput": _median(fps_err),
        "stages": _stages(frames, devices),
        "costs": raw["costs"],
        "errors": raw["errors"],
    }

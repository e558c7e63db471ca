"""The figures of one fleet run, computed from its raw result (`runner.run_scenario`): every
number comes from frames that were really released, answered or dropped. Pure functions.

- goodput: frames/s, over the whole fleet, answered within the latency budget (a dropped or
  unanswered frame missed it); `offered` is the frames/s the scenario's N cameras release;
  `goodput_se` its standard error by batch means over blocks of about BLOCK_S seconds (the
  noise the comparisons allow: shortfalls come in episodes of seconds, back-off rests,
  re-plans, capacity drops, so per-second counts are not independent);
- failed devices: a device of the scenario that did not open (`errors`) is still one of its N:
  it misses the SLO, and the frames its camera would have released (frame rate x window) count
  as offered and dropped; `failed_devices` says how many;
- SLO attainment: the share of the scenario's N devices whose p95 latency is within the budget,
  dropped frames counted as infinitely late;
- p50 / p99: latency (release to answer) over every frame offered in the window, a dropped or
  unanswered frame (and each frame a failed device's camera would have released) as +inf, as
  the SLO counts it: a system that drops more than 1 % of its frames has an infinite p99
  (`math.inf`; `json` writes it as `Infinity` and reads it back);
- worker utilisation: compute-busy seconds / (window x slots), from the worker's
  `dapdee_edge_compute_busy_seconds_total`; and the worker, planner and client processes' CPU
  seconds per second (cores);
- worker capacity and leases booked: the median capacity the worker advertised (ms/s, its
  nominal 1000 / κ) and the largest share of it the leases booked, polled in the window;
  `booking_series` keeps every poll from the cameras' start (warm-up included) as (s since
  the start, booked share, capacity);
- plan changes per device-minute: changes of a device's plan (exit, device part: its set of
  nodes, or worker) put in use during the window, in the order the device put them in use, per
  device that ran;
- prediction error, latency: the median over answered frames of |predicted − measured| /
  measured, predicted = the latency of the plan the frame ran (as the planner priced it: for a
  leased plan, at the load the other leases put on the worker), measured = release to answer;
- prediction error, throughput: the median over devices of |predicted − measured| / measured,
  predicted = the throughput of the plan most of its frames ran (the planner's, or for a plan
  the runtime priced itself, e.g. Device-Only after a lease lapsed, 1000 / its bottleneck),
  measured = its answered frames per second; only devices whose plan predicts less than the
  frame rate count (`pred_err_throughput_devices` says how many): where it predicts more, the
  camera sets the rate and the error would be 0 by construction (a device whose plan has no
  prediction is left out too);
- stages (frames that went to the edge): median predicted device / transfer / edge ms next to
  the measured wait before the device took the frame (camera buffer, previous frame's device
  part), device compute, edge queue + compute, and the rest (uplink, round trip and both sides'
  HTTP work: latency − wait − device − edge queue − edge compute).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

# frame fields (devices.device_result); WAIT is absent from results written before it was recorded
T, LAT, PRED, WHERE, EXIT, DEV, SERVER, PLAN, ERROR, WAIT = range(10)
# plan fields (devices.device_result); USED is absent from results written before it was recorded
REQUESTED, USED = 0, 5
BLOCK_S = 5.0  # goodput_se: the batch-means block length (s), longer than a typical shortfall episode


def rank(q: float, n: int) -> int:
    """The 0-based index of the q-quantile (0..1) by nearest rank among n > 0 sorted values. O(1)."""
    return min(n - 1, max(0, math.ceil(q * n) - 1))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values. O(n log n)."""
    if not values:
        return None
    return sorted(values)[rank(q, len(values))]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def plan_changes(plans: Sequence[Sequence[Any]], window_s: float) -> int:
    """Changes of plan (exit, device part, worker) put in use within [0, window_s), in the order
    the device put the plans in use (the order of `plans`, as `devices.device_result` writes
    them), not the order they were asked for: a renewal asked before a lease lapsed and answered
    after the device switched to its own plan is a change back. The device part as
    `devices.device_part` writes it (its nodes, not only their count). A plan's time is when it
    was put in use (`USED`); results written before that was recorded give the latest request
    time so far, a lower bound of it. O(plans)."""
    changes, last, used = 0, None, -math.inf
    for p in plans:
        used = p[USED] if len(p) > USED and p[USED] is not None else max(used, p[REQUESTED])
        key = (p[1], tuple(p[2]) if isinstance(p[2], list) else p[2], p[3])
        if last is not None and key != last and 0 <= used < window_s:
            changes += 1
        last = key
    return changes


def _device_throughput_error(dev: dict[str, Any], frame_rate: float, window_s: float) -> float | None:
    """|predicted − measured| / measured frames/s of one device (module docstring); None when
    its main plan has no prediction or predicts at least the frame rate. O(frames)."""
    answered = [f for f in dev["frames"] if f[LAT] is not None]
    if not answered:
        return None
    main_plan = Counter(f[PLAN] for f in answered).most_common(1)[0][0]
    pred = dev["predicted"].get(main_plan)
    if pred is None:
        return None  # a plan nobody priced: no prediction to compare
    fps = pred.get("throughput_fps")
    if fps is None and pred.get("bottleneck_ms"):
        fps = 1000.0 / pred["bottleneck_ms"]
    if fps is None or float(fps) >= frame_rate:
        return None
    predicted = float(fps)
    measured = len(answered) / window_s
    return abs(predicted - measured) / measured


def _stages(frames: list[list[Any]], devices: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Median predicted and measured stage times of the frames answered by the edge. The rest
    (link + HTTP) leaves out the frame's wait before the device took it; frames without a
    recorded wait (results written before it was) give no wait and no rest."""
    pred_of = {pid: p for d in devices for pid, p in d["predicted"].items()}
    edge = [f for f in frames if f[WHERE] == "edge" and f[SERVER] is not None and f[PLAN] in pred_of]
    if not edge:
        return {}
    out: dict[str, float | None] = {"frames": float(len(edge))}
    for key in ("device_ms", "transfer_ms", "edge_ms", "latency_ms"):
        out[f"pred_{key}"] = _median([v for f in edge if (v := pred_of[f[PLAN]].get(key)) is not None])
    waited = [f for f in edge if len(f) > WAIT and f[WAIT] is not None]
    out["meas_wait_ms"] = _median([f[WAIT] for f in waited])
    out["meas_device_ms"] = _median([f[DEV] for f in edge])
    out["meas_edge_server_ms"] = _median([f[SERVER] for f in edge])
    out["meas_link_http_ms"] = _median([f[LAT] - f[WAIT] - f[DEV] - f[SERVER] for f in waited])
    out["meas_latency_ms"] = _median([f[LAT] for f in edge])
    return out


def goodput_se(frames: Sequence[Sequence[Any]], budget_ms: float, window_s: float) -> float:
    """Standard error of the goodput (frames/s over [0, window_s)) by batch means.

    The window is cut into k = max(2, round(window_s / BLOCK_S)) blocks of equal length
    L = window_s / k (about BLOCK_S s each); block i with c_i good frames has the rate
    r_i = c_i / L, the goodput G is their mean, and SE(G) = sd(r_1..r_k) / sqrt(k) (sample
    standard deviation, k - 1 degrees of freedom). Blocks of seconds keep a shortfall episode
    (a back-off rest, a re-plan, a capacity drop) within one block, so the blocks' rates are
    close to independent where per-second counts are not (those understate the noise of
    episodic shortfalls by about the square root of the episodes' length in seconds). With few blocks the estimate is
    itself noisy (a 20 s window gives 4 blocks, 3 degrees of freedom); `report._noise` floors
    the noise it allows. 0 for an empty window. O(frames + k)."""
    if not window_s > 0:
        return 0.0
    k = max(2, round(window_s / BLOCK_S))
    length = window_s / k
    counts = [0] * k
    for f in frames:
        if f[LAT] is not None and f[LAT] <= budget_ms and 0 <= f[T] < window_s:
            counts[min(int(f[T] / length), k - 1)] += 1
    return statistics.stdev(c / length for c in counts) / math.sqrt(k)


def latencies(frames: Sequence[Sequence[Any]], missing: int = 0) -> list[float]:
    """Every frame's latency (ms), a dropped or unanswered frame as +inf, and `missing` more
    frames as +inf (those a failed device's camera would have released). O(frames + missing)."""
    return [math.inf if f[LAT] is None else f[LAT] for f in frames] + [math.inf] * missing


def _device_ok(dev: dict[str, Any], budget_ms: float) -> bool:
    p95 = percentile(latencies(dev["frames"]), 0.95)
    return p95 is not None and p95 <= budget_ms


def _window_figures(win: dict[str, Any]) -> dict[str, Any]:
    """What the services did in the window: the worker's utilisation and requests, each
    process's CPU (cores; Redis's too, the bench's own server) and the host's cores
    (`host_cores`, None where the raw result has none), the bookings and the planner's counters.
    O(processes + polls)."""
    cpu = win["cpu_per_s"]
    clients_cpu = [v for k, v in cpu.items() if k.startswith("client-")]
    edge = win["edge"]
    return {
        "utilisation": edge["busy_s"] / (win["wall_s"] * edge["slots"]),
        "worker_cpu": cpu.get("edge"),
        "planner_cpu": cpu.get("planner"),
        "redis_cpu": cpu.get("redis"),
        "clients_cpu": sum(clients_cpu),
        "client_cpu_max": max(clients_cpu, default=None),
        "host_cores": win.get("host_cores"),
        "edge_requests": edge["requests"],
        "edge_rejected": edge["rejected"],
        "booked_max": win["booked_max"],
        "capacity_ms_per_s": win.get("capacity_ms_per_s"),
        "booking_series": win.get("booking_series", []),
        "planner_counts": win.get("planner", {}),
        "planner_run_counts": win.get("planner_run", {}),
    }


def summarize(raw: dict[str, Any], accuracy: dict[str, float] | None = None) -> dict[str, Any]:
    """The run's figures (module docstring); `accuracy` maps exit names to held-out accuracy
    (for the mean accuracy of the answered frames). O(frames log frames)."""
    sc, win = raw["scenario"], raw["window"]
    window_s, budget = sc["window_s"], sc["budget_ms"]
    devices = raw["devices"]
    n = max(1, sc["n"], len(devices))  # the scenario's devices, those that failed to open included
    failed = n - len(devices)
    frames = [f for d in devices for f in d["frames"]]
    offered = len(frames) + failed * sc["frame_rate"] * window_s  # a failed camera's frames: all dropped
    answered = [f for f in frames if f[LAT] is not None]
    good = sum(1 for f in answered if f[LAT] <= budget)
    lat = latencies(frames, round(offered) - len(frames))
    lat_err = [abs(f[PRED] - f[LAT]) / f[LAT] for f in answered if f[PRED] is not None and f[LAT] > 0]
    fps_err = [e for d in devices if (e := _device_throughput_error(d, sc["frame_rate"], window_s)) is not None]
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
        "failed_devices": failed,
        "released": len(frames),
        "offered_fps": offered / window_s,
        "goodput_fps": good / window_s,
        "goodput_se": goodput_se(frames, budget, window_s),
        "goodput_per_device": good / window_s / n,
        "answered_fps": len(answered) / window_s,
        "dropped_share": 1 - len(answered) / offered if offered else None,
        "slo_attainment": sum(_device_ok(d, budget) for d in devices) / n,
        "p50_ms": percentile(lat, 0.5),
        "p99_ms": percentile(lat, 0.99),
        "where": dict(Counter(f[WHERE] for f in answered)),
        "exits": dict(Counter(f[EXIT] for f in answered)),
        "accuracy": statistics.fmean(acc) if acc else None,
        **_window_figures(win),
        "plan_changes_per_device_min": changes / (max(1, len(devices)) * window_s / 60.0),
        "pred_err_latency": _median(lat_err),
        "pred_err_throughput": _median(fps_err),
        "pred_err_throughput_devices": len(fps_err),
        "stages": _stages(frames, devices),
        "costs": raw["costs"],
        "errors": raw["errors"],
    }

"""Per-node latency profiling, tier merging, and a FLOPs-based latency predictor.

`profile_model` times every node of a traced model in isolation (inputs from one real
forward pass, warm-up, fixed threads, `torch.inference_mode`, median of R runs) and writes
`device_ms` or `edge_ms` into its cost graph. `--slowdown K` multiplies the measurements to
emulate a device K x slower than this machine; the factor is recorded in the graph's meta.
"""

from __future__ import annotations

import logging
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.models import LoadedModel

ProgressFn = Callable[[int, int], None]
log = logging.getLogger("dapdee.profiler")


class ProfileCacheError(ValueError):
    """A cached profile that cannot stand in for a measurement; the message names the file."""


class ProfileStopped(Exception):
    """Profiling was asked to stop (its `stop` event was set) before it finished."""


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int, stop: threading.Event | None = None) -> float:
    """Median wall ms of `fn()` over `repeats` runs after `warmup` unmeasured ones; raises
    ProfileStopped as soon as `stop` is set (checked before every run). O(warmup + repeats) runs."""
    samples = []
    for i in range(warmup + repeats):
        if stop is not None and stop.is_set():
            raise ProfileStopped("profiling stopped")
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples)


def profile_model(
    loaded: LoadedModel,
    tier: str,
    slowdown: float = 1.0,
    threads: int | None = None,
    repeats: int = 20,
    warmup: int = 3,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
) -> CostGraph:
    """Median latency (ms) of each node run alone, times `slowdown`, as the `tier` timings of
    `loaded.graph`. Setting `stop` (from another thread) ends it with ProfileStopped before the
    next node run. Cost: (warmup + repeats) x one forward pass, plus one forward to collect inputs."""
    if tier not in ("device", "edge"):
        raise ValueError(f"tier: expected 'device' or 'edge', got {tier!r}")
    if not slowdown >= 1.0:
        raise ValueError(f"slowdown: must be >= 1 (a device K x slower than this machine), got {slowdown}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ex = loaded.executor
        graph = loaded.graph
        x = loaded.example_input(torch.Generator().manual_seed(0))
        names = [n.name for n in graph.nodes]
        timings: dict[str, float] = {}
        with torch.inference_mode():
            env = {loaded.input_name: x, **ex.compute({loaded.input_name: x}, names)}
            for i, name in enumerate(names):
                node: fx.Node = ex.nodes[name]
                timings[name] = slowdown * _median_ms(lambda n=node: ex.run_node(n, env), repeats, warmup, stop)
                if progress:
                    progress(i + 1, len(names))
    finally:
        torch.set_num_threads(old_threads)
    meta = {
        "hardware": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": threads or old_threads,
        "slowdown": slowdown,
        "repeats": repeats,
        "warmup": warmup,
        "torch": torch.__version__,
        "method": "median of isolated per-node runs, torch.inference_mode, batch of the input shape",
    }
    return graph.with_timings(tier, timings, meta)


class ProfileSettingsError(ProfileCacheError):
    """A cached profile of the model measured under other settings (slowdown, threads) than
    asked: stale, not broken; the message names the file and the setting."""


def read_cached_profile(
    path: str | Path,
    graph: CostGraph,
    tier: str,
    *,
    slowdown: float | None = None,
    threads: int | None = None,
) -> CostGraph:
    """The profile cached at `path` when it describes `graph` (same structure) and times every
    node for `tier`; else ProfileCacheError naming the file and why. With `slowdown` (and
    `threads`), the profile's recorded `meta.<tier>` settings must be those
    (ProfileSettingsError naming the setting otherwise; a setting the file does not record is
    not checked). The cache holds timings: the exits' accuracies and the calibrated confidence
    exits are `graph`'s (an artifact calibrated after its profile was cached keeps its
    thresholds). O(file size)."""
    try:
        cached = CostGraph.load(str(path))
    except CostGraphError as exc:
        raise ProfileCacheError(f"profile {str(path)!r}: {exc}") from None
    if cached.structure_key() != graph.structure_key() or not cached.has_timings(tier):
        raise ProfileCacheError(
            f"profile {str(path)!r} does not match model {graph.model!r} (other nodes or no {tier}_ms)"
        )
    recorded = cached.meta.get(tier)
    recorded = recorded if isinstance(recorded, dict) else {}
    for key, want in (("slowdown", slowdown), ("threads", threads)):
        have = recorded.get(key)
        if want is not None and have is not None and have != want:
            raise ProfileSettingsError(f"profile {str(path)!r} was measured at {key} {have!r}, not {want!r}")
    return replace(cached, exits=graph.exits, progressive=graph.progressive)


def load_or_measure(
    loaded: LoadedModel,
    tier: str,
    path: str | Path | None,
    measure: Callable[[], CostGraph] | None = None,
    *,
    strict: bool = False,
    slowdown: float | None = None,
    threads: int | None = None,
) -> CostGraph:
    """`loaded`'s `tier` profile: the one cached at `path` when it matches the model and the
    settings asked (`read_cached_profile` with `slowdown`, `threads`), else `measure()`
    (default `profile_model(loaded, tier)` at those settings), then written to `path`
    (atomically; a failed write is logged, not raised). An unusable cache is measured again
    with a warning, or with `strict` raises ProfileCacheError; a cache of the model measured
    under other settings is always measured again (with a warning) and replaced. `path` None:
    no cache. O(file size) from the cache, else the measurement's cost."""
    if path is not None and Path(path).is_file():
        try:
            cached = read_cached_profile(path, loaded.graph, tier, slowdown=slowdown, threads=threads)
            log.info("model %s: %s profile from %s", loaded.name, tier, path)
            return cached
        except ProfileSettingsError as exc:
            log.warning("%s; measuring again", exc)
        except ProfileCacheError as exc:
            if strict:
                raise ProfileCacheError(f"{exc}; delete it to measure again") from None
            log.warning("%s; measuring again", exc)
    log.info("model %s: measuring %s timings", loaded.name, tier)
    if measure is None:
        graph = profile_model(loaded, tier, slowdown=1.0 if slowdown is None else slowdown, threads=threads)
    else:
        graph = measure()
    if path is not None:
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            graph.save(str(target))  # atomic
        except OSError as exc:
            log.warning("model %s: cannot write profile cache %s: %s", loaded.name, target, exc)
    return graph


def measure_forward_ms(
    loaded: LoadedModel, repeats: int = 20, warmup: int = 3, threads: int | None = None, via_executor: bool = False
) -> float:
    """Median latency of one whole-model forward (all exits), through nn.Module or through the
    split executor, for checking the additive cost model."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = loaded.example_input()
        with torch.inference_mode():
            if via_executor:
                targets = [e.node for e in loaded.graph.exits]
                return _median_ms(lambda: loaded.executor.compute({loaded.input_name: x}, targets), repeats, warmup)
            return _median_ms(lambda: loaded.gm(x), repeats, warmup)
    finally:
        torch.set_num_threads(old)


def merge_profiles(device: CostGraph, edge: CostGraph) -> CostGraph:
    """Device timings and `device_request_ms` from `device`, edge timings and
    `edge_request_ms` from `edge` (each tier's own measurements); refuses graphs of different
    models, shapes or structure. O(V)."""
    if device.model != edge.model:
        raise CostGraphError(f"merge: different models ({device.model!r} vs {edge.model!r})")
    if device.input.shape != edge.input.shape:
        raise CostGraphError(f"merge: different input shapes ({list(device.input.shape)} vs {list(edge.input.shape)})")
    if device.structure_key() != edge.structure_key():
        raise CostGraphError("merge: the two profiles describe different graphs (nodes, sizes or exits differ)")
    if not device.has_timings("device"):
        raise CostGraphError("merge: the first profile has no device_ms timings")
    if not edge.has_timings("edge"):
        raise CostGraphError("merge: the second profile has no edge_ms timings")
    merged = device.with_timings("edge", {n.name: n.edge_ms for n in edge.nodes}, edge.meta.get("edge"))
    return merged.with_overheads(edge_request_ms=edge.overheads.edge_request_ms)


@dataclass
class FlopsPredictor:
    """Neurosurgeon-style latency model: per op type, ms = a * flops + b (least squares),
    with a global fit for op types not seen in training."""

    tier: str = "device"
    coef: dict[str, tuple[float, float]] = field(default_factory=dict)
    fallback: tuple[float, float] = (0.0, 0.0)

    @staticmethod
    def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
        if len(points) == 1 or len({f for f, _ in points}) == 1:
            return 0.0, statistics.median(ms for _, ms in points)
        xs = torch.tensor([f for f, _ in points], dtype=torch.float64)
        ys = torch.tensor([ms for _, ms in points], dtype=torch.float64)
        a_mat = torch.stack([xs, torch.ones_like(xs)], 1)
        sol = torch.linalg.lstsq(a_mat, ys.unsqueeze(1)).solution.squeeze(1)
        a, b = float(sol[0]), float(sol[1])
        return max(a, 0.0), max(b, 0.0)

    @classmethod
    def fit(cls, graphs: list[CostGraph], tier: str = "device") -> FlopsPredictor:
        """Fit on measured profiles. O(V) per graph."""
        by_op: dict[str, list[tuple[float, float]]] = {}
        for g in graphs:
            for n in g.nodes:
                ms = getattr(n, f"{tier}_ms")
                if ms is None:
                    raise CostGraphError(f"predictor: {g.model}.{n.name} has no {tier}_ms")
                by_op.setdefault(n.op, []).append((float(n.flops), ms))
        coef = {op: cls._fit(pts) for op, pts in by_op.items()}
        everything = [p for pts in by_op.values() for p in pts]
        return cls(tier, coef, cls._fit(everything))

    def predict(self, graph: CostGraph) -> dict[str, float]:
        out = {}
        for n in graph.nodes:
            a, b = self.coef.get(n.op, self.fallback)
            out[n.name] = a * n.flops + b
        return out

    def errors(self, graph: CostGraph) -> dict[str, float]:
        """Median relative error per node, and relative error of the whole-model sum."""
        pred = self.predict(graph)
        actual = {n.name: getattr(n, f"{self.tier}_ms") for n in graph.nodes}
        rel = [abs(pred[k] - v) / v for k, v in actual.items() if v and v > 0]
        total_a, total_p = sum(actual.values()), sum(pred.values())
        return {
            "node_median_rel_error": statistics.median(rel) if rel else 0.0,
            "sum_rel_error": abs(total_p - total_a) / total_a if total_a else 0.0,
        }

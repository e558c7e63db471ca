"""Prometheus exposition of the services: the runtime collectors, and the metrics of a server
run as several processes merged into one answer.

**One process** (the default, and how the tests run several apps in one interpreter): an app
keeps its metrics in its own `CollectorRegistry`, and `add_runtime_collectors(registry)`
registers the standard `process_*` (ProcessCollector), `python_gc_*` (GCCollector) and
`python_info` (PlatformCollector) collectors to that registry, so every app's /metrics has them
and two apps never clash. /metrics renders the registry.

**Several processes** (`dapdee serve planner --workers N`): prometheus_client's multiprocess
mode. It is on when `PROMETHEUS_MULTIPROC_DIR` names a directory before the process imports
prometheus_client (the client reads the variable once, at import; `multiprocess_dir()` refuses
a variable set later): every metric value of the process then lives in an mmap file of that
directory, one file per process and metric type, and `SharedExposition.render()` merges all the
files, whichever process answers the scrape:

- counters and histograms are summed over every process that wrote them, those that have exited
  too, so a total never goes back when a worker process is replaced;
- a gauge is merged by the `multiprocess_mode` it declares (`livesum`, `livemax`, ...: over the
  live processes); before each scrape the files of live-mode gauges whose process no longer
  exists are removed (`remove_dead`);
- *view* gauges (named by the service) hold state every process reads from a shared store, such
  as Redis, including labelled series that must disappear, which no file can do: they come from
  the answering process's own registry, not from the files;
- runtime metrics: each process copies its own `process_*` and `python_gc_*` samples into
  shared metrics (`RuntimeMirror.sync`, which the service calls periodically and before a
  scrape): CPU seconds and GC counts are counters (summed over all processes), memory and open
  file descriptors are summed over the live processes, `process_max_fds` and
  `process_start_time_seconds` are their minimum; `python_info` is the answering process's
  (every worker runs the same interpreter).

The directory must hold no earlier run's files when the first process starts
(`shared_directory` prepares it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, values
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# the OpenAPI answer of a /metrics route: the text exposition (FastAPI's default would declare a
# body-less 200, so a generated client would drop the text)
METRICS_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "Prometheus text exposition format 0.0.4",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
# how a runtime gauge is merged over the live processes (every other one: summed)
_RUNTIME_GAUGE_MODES = {"process_max_fds": "livemin", "process_start_time_seconds": "livemin"}


def add_runtime_collectors(registry: CollectorRegistry) -> None:
    """Register `process_*`, `python_gc_*` and `python_info` to `registry` (one set per
    registry, so apps sharing a process do not clash). O(1); each scrape reads /proc/self."""
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)


def multiprocess_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The shared directory of multiprocess mode: `PROMETHEUS_MULTIPROC_DIR`, or None when it is
    unset or empty (one process). ValueError when it is not a directory, or when it was set
    after prometheus_client was imported (this process's metrics would not be shared). O(1)."""
    env = os.environ if environ is None else environ
    path = env.get(MULTIPROC_ENV, "").strip()
    if not path:
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{MULTIPROC_ENV}={path!r} is not a directory")
    if not values.ValueClass._multiprocess:
        raise ValueError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported, so this process's metrics "
            "are not written there: set it before the process starts"
        )
    return path


def shared_directory(path: str | None) -> tuple[str, bool]:
    """The directory for a multi-process server's metrics, ready for its first process: `path`
    (an existing directory; the `*.db` files an earlier run left there are deleted, nothing
    else) or, when None or empty, a fresh temporary one. Returns (directory, created here: the
    caller removes it at exit). ValueError when `path` is not a directory. O(files)."""
    if not path:
        return tempfile.mkdtemp(prefix="dapdee-metrics-"), True
    if not os.path.isdir(path):
        raise ValueError(f"{MULTIPROC_ENV}={path!r} is not a directory")
    for name in glob.glob(os.path.join(path, "*.db")):
        os.remove(name)
    return path, False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_dead(path: str) -> list[int]:
    """Remove the live-mode gauge files of processes that no longer exist (so `livesum` and the
    like count live processes only); the pids whose files were found dead. Counter and histogram
    files stay: their counts are part of the totals. Safe to run concurrently (two processes
    answering two scrapes at once): a file another call removed first is skipped. O(files)."""
    dead: dict[int, list[str]] = {}
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = os.path.basename(name)[: -len(".db")].rsplit("_", 1)[-1]
        if pid.isascii() and pid.isdigit() and (int(pid) in dead or not _alive(int(pid))):
            dead.setdefault(int(pid), []).append(name)
    for names in dead.values():
        for name in names:  # prometheus_client's mark_process_dead, but tolerating a file already gone
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)
    return sorted(dead)


class RuntimeMirror:
    """This process's `process_*` and `python_gc_*` samples copied into shared (file-backed)
    metrics: counters advance by what the process counted since the last `sync`, gauges are
    set (merged as the module docstring says). For multiprocess mode only. Thread-safe."""

    def __init__(self) -> None:
        self._sources: tuple[Collector, ...] = (
            ProcessCollector(registry=None),
            GCCollector(registry=CollectorRegistry()),  # it insists on registering somewhere
        )
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self.sync()

    def sync(self) -> None:
        """Copy the current samples (reads /proc/self and the GC statistics: ~0.1 ms)."""
        with self._lock:
            for source in self._sources:
                for family in source.collect():
                    if family.type == "counter":
                        self._count(family)
                    elif family.type == "gauge":
                        self._set(family)

    def _count(self, family: Metric) -> None:
        """Advance the shared counter of each `_total` sample of `family` by what it counted
        since the last sync; a series is created the first time it is seen, even at 0 (e.g.
        `python_gc_objects_uncollectable_total`, which stays 0 in a healthy process, is
        exported as in one process). O(samples)."""
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue
            counter = self._counters.get(family.name)
            if counter is None:
                counter = Counter(family.name, family.documentation, sorted(s.labels), registry=None)
                self._counters[family.name] = counter
            series = counter.labels(**s.labels) if s.labels else counter  # labels(): the series exists
            key = (family.name, tuple(sorted(s.labels.items())))
            delta = s.value - self._last.get(key, 0.0)
            self._last[key] = s.value
            if delta > 0:
                series.inc(delta)

    def _set(self, family: Metric) -> None:
        gauge = self._gauges.get(family.name)
        if gauge is None:
            mode = _RUNTIME_GAUGE_MODES.get(family.name, "livesum")
            gauge = Gauge(family.name, family.documentation, registry=None, multiprocess_mode=mode)  # type: ignore[arg-type]
            self._gauges[family.name] = gauge
        for s in family.samples:
            gauge.set(s.value)


class _Select:
    """The families of `source` whose names are in `names` (`keep=True`) or not in them."""

    def __init__(self, source: Collector, names: frozenset[str], keep: bool) -> None:
        self.source, self.names, self.keep = source, names, keep

    def collect(self) -> Iterable[Metric]:
        return [m for m in self.source.collect() if (m.name in self.names) == self.keep]


class SharedExposition:
    """/metrics of one process of a multi-process server (module docstring): the files in
    `path` merged, except the `views` (family names: a counter's without `_total`), which come
    from this process's registry `own`; plus `python_info`."""

    def __init__(self, path: str, own: CollectorRegistry, views: Iterable[str]) -> None:
        self.path = path
        views = frozenset(views)
        self.registry = CollectorRegistry()
        self.registry.register(_Select(MultiProcessCollector(None, path), views, keep=False))
        self.registry.register(_Select(own, views, keep=True))
        PlatformCollector(registry=self.registry)

    def render(self) -> bytes:
        """The text exposition. O(files × series): every process's files are read."""
        remove_dead(self.path)
        return generate_latest(self.registry)

"""The services' Prometheus metrics in one process (real apps under uvicorn on 127.0.0.1): a
scrape after known traffic shows the expected counts and histograms with the fitted buckets;
every app has the standard process_* / python_gc_* / python_info series on its own registry,
so apps sharing a process do not clash; the multiprocess helpers refuse what would be wrong;
the edge worker refuses prometheus_client's multiprocess mode (one process per pod)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dapdee.client import EdgeClient, PlannerClient
from dapdee.edge_worker.app import create_app as create_edge
from dapdee.edge_worker.config import Settings as EdgeSettings
from dapdee.edge_worker.metrics import BATCH_BUCKETS, TIME_BUCKETS, EdgeMetrics
from dapdee.models import load_model
from dapdee.planner.app import create_app as create_planner
from dapdee.planner.config import Settings as PlannerSettings
from dapdee.planner.metrics import BUILD_BUCKETS, PLAN_BUCKETS, PlannerMetrics
from dapdee.testing import ServerThread
from dapdee.web.prometheus import MULTIPROC_ENV, SharedExposition, multiprocess_dir, remove_dead, shared_directory
from tests.metrics_scrape import check_histogram, parse, tiny_graph, value

RUNTIME = ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info")


def test_planner_scrape_after_known_traffic() -> None:
    """5 plans, 2 bodies that fail validation, 1 unknown model: the counters by mode and outcome,
    the plan-duration histogram (fitted buckets, 8 observations) and the plan-map build."""
    with ServerThread(create_planner(PlannerSettings(redis_url=None))) as planner, PlannerClient(planner.url) as c:
        c.put_graph(tiny_graph("tiny"))
        for bw in (1.0, 5.0, 20.0, 50.0, 100.0):
            c.plan({"model": "tiny", "bandwidth_mbps": bw, "mode": "latency"})
        for bad in ({"model": "tiny"}, {"model": "tiny", "bandwidth_mbps": -1}):
            assert httpx.post(f"{planner.url}/plan", json=bad).status_code == 422
        assert httpx.post(f"{planner.url}/plan", json={"model": "nope", "bandwidth_mbps": 5}).status_code == 404
        s = parse(httpx.get(f"{planner.url}/metrics").text)
    assert value(s, "dapdee_planner_plans_total", mode="latency", outcome="ok") == 5
    assert value(s, "dapdee_planner_plans_total", mode="auto", outcome="invalid") == 2
    assert value(s, "dapdee_planner_plans_total", mode="auto", outcome="unknown_model") == 1
    rows = check_histogram(s, "dapdee_planner_plan_duration_seconds", PLAN_BUCKETS, 8)
    assert rows[0] == (0.000005, rows[0][1]) and rows[-1][1] == 8
    check_histogram(s, "dapdee_planner_planmap_build_seconds", BUILD_BUCKETS, 1)  # one map, built once
    assert value(s, "dapdee_planner_cache_misses_total") == 1
    assert value(s, "dapdee_planner_models") == 1
    for name in RUNTIME:
        assert s[name], name
    assert value(s, "process_resident_memory_bytes") > 10e6
    assert value(s, "python_gc_collections_total", generation="0") > 0


def test_error_series_are_zero_before_the_first_error() -> None:
    """A fresh planner and edge show each error outcome and refusal reason at 0, so an error
    rate sees its first error as a step (a series that appears mid-window hides it)."""
    planner = parse(PlannerMetrics().exposition().decode())
    for mode in ("auto", "latency", "throughput"):
        for outcome in ("invalid", "unknown_model", "over_budget", "lease_cap", "unavailable", "error"):
            assert value(planner, "dapdee_planner_plans_total", mode=mode, outcome=outcome) == 0, (mode, outcome)
    assert value(planner, "dapdee_planner_plans_total", mode="throughput", outcome="constraints_unmet") == 0
    edge = parse(generate_latest(EdgeMetrics().registry).decode())
    for reason in ("unauthenticated", "forbidden", "not_found", "too_large", "timeout", "overloaded"):
        assert value(edge, "dapdee_edge_rejected_total", reason=reason) == 0, reason


def test_each_app_has_its_own_runtime_collectors() -> None:
    """Two planners' and an edge's metrics in one process: created without a clash, each
    exposition with the process_* / python_gc_* / python_info series once."""
    texts = [PlannerMetrics().exposition().decode(), PlannerMetrics().exposition().decode()]
    texts.append(generate_latest(EdgeMetrics().registry).decode())
    for text in texts:
        s = parse(text)
        for name in RUNTIME:
            assert len(s[name]) == 1, (name, s.get(name))
        assert len(s["python_gc_collections_total"]) == 3  # generations 0, 1, 2


EDGE_SPEC = "zoo:alexnet?width=0.25&in_channels=1"


@pytest.fixture(scope="module")
def edge_url() -> Any:
    model = load_model(EDGE_SPEC)
    with ServerThread(create_edge(EdgeSettings(models=EDGE_SPEC, batch_wait_ms=0.0), [model])) as edge:
        yield edge.url, model


def test_edge_scrape_after_known_traffic(edge_url: Any) -> None:
    """6 sequential infer requests (3 exits x 2) and one for an unknown exit: requests by model,
    exit and status; queue, compute and request durations (fitted buckets), batch sizes, bytes."""
    url, model = edge_url
    exits = [e.name for e in model.graph.exits][-2:]
    x = model.example_input()
    sent = 0
    with EdgeClient(url) as c:
        for exit_name in exits * 3:
            sent += c.infer(model.name, {model.graph.input.name: x}, exit=exit_name).request_bytes
    refused = httpx.post(f"{url}/v2/models/{model.name}/infer", json={"inputs": [], "parameters": {"exit": "e"}})
    assert refused.status_code == 400
    s = parse(httpx.get(f"{url}/metrics").text)
    for exit_name in exits:
        assert value(s, "dapdee_edge_requests_total", model=model.name, exit=exit_name, status="200") == 3
    assert value(s, "dapdee_edge_received_bytes_total", model=model.name) == sent + len(refused.request.content)
    for name in ("queue_duration_seconds", "compute_duration_seconds", "request_duration_seconds"):
        n = 6 if name != "request_duration_seconds" else 7  # the refused request has a duration too
        check_histogram(s, f"dapdee_edge_{name}", TIME_BUCKETS, n, model=model.name)
    rows = check_histogram(s, "dapdee_edge_batch_size", tuple(float(b) for b in BATCH_BUCKETS), 6, model=model.name)
    assert rows[0] == (1.0, 6)  # sequential: every batch held one request
    assert value(s, "dapdee_edge_compute_busy_seconds_total") > 0
    for name in RUNTIME:
        assert s[name], name


def test_multiprocess_dir_is_refused_when_it_cannot_work(tmp_path: Path) -> None:
    assert multiprocess_dir({}) is None and multiprocess_dir({MULTIPROC_ENV: " "}) is None
    with pytest.raises(ValueError, match="not a directory"):
        multiprocess_dir({MULTIPROC_ENV: str(tmp_path / "missing")})
    # this test process imported prometheus_client without the variable: its metrics are private
    with pytest.raises(ValueError, match="set after prometheus_client was imported"):
        multiprocess_dir({MULTIPROC_ENV: str(tmp_path)})


def test_shared_directory_starts_clean(tmp_path: Path) -> None:
    path, created = shared_directory(None)
    try:
        assert created and os.path.isdir(path) and os.listdir(path) == []
    finally:
        os.rmdir(path)
    (tmp_path / "counter_123.db").write_bytes(b"old run")
    (tmp_path / "notes.txt").write_text("not ours")
    assert shared_directory(str(tmp_path)) == (str(tmp_path), False)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with pytest.raises(ValueError, match="not a directory"):
        shared_directory(str(tmp_path / "notes.txt"))


def test_remove_dead_drops_only_the_live_gauges_of_exited_processes(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid no longer exists
    names = [f"gauge_livesum_{gone.pid}.db", f"gauge_livemax_{gone.pid}.db", f"counter_{gone.pid}.db"]
    names += [f"gauge_livesum_{os.getpid()}.db", f"gauge_max_{gone.pid}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert remove_dead(str(tmp_path)) == [gone.pid]
    left = sorted(os.listdir(tmp_path))
    assert left == sorted([f"counter_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db", f"gauge_max_{gone.pid}.db"])


# a process of multiprocess mode writing live gauges of every merge and a counter, then exiting
_WRITER = """
from prometheus_client import Counter, Gauge
Counter("dapdee_test_requests", "requests").inc(3)
for mode in ("livesum", "livemax", "livemin"):
    Gauge(f"dapdee_test_{mode}", mode, multiprocess_mode=mode).set(7)
"""
PID_MAX_LIMIT = 1 << 22  # Linux: no pid reaches this


def test_concurrent_scrapes_remove_a_dead_process_s_files_without_failing(tmp_path: Path) -> None:
    """Two processes answering two scrapes at once after a worker process died: both remove the
    dead process's live-gauge files; the one that finds a file already gone goes on (it used to
    raise FileNotFoundError: /metrics 500). Real files of a real exited process, copied under
    more dead pids so that the two removals overlap."""
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    gone = subprocess.run([sys.executable, "-c", _WRITER], env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 0 and gone.stderr == "", gone.stderr
    written = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    live = [n for n in written if n.startswith("gauge_live")]
    assert len(live) == 3 and len(written) == 4, sorted(written)
    own = tmp_path / f"gauge_livesum_{os.getpid()}.db"  # a live process's file: kept
    own.write_bytes(written[live[0]])
    scrapes = [SharedExposition(str(tmp_path), CollectorRegistry(), ()) for _ in range(2)]
    for round_ in range(100):
        for i in range(40):
            for name in live:
                pid = name[: -len(".db")].rsplit("_", 1)[1]
                (tmp_path / name.replace(f"_{pid}.db", f"_{PID_MAX_LIMIT + i}.db")).write_bytes(written[name])
        errors, texts = _render_at_once(scrapes)
        assert not errors, f"round {round_}: {errors!r}"
        assert sorted(os.listdir(tmp_path)) == sorted([f"counter_{gone_pid(written)}.db", own.name])
        for text in texts:
            assert value(parse(text.decode()), "dapdee_test_requests_total") == 3


def _render_at_once(scrapes: list[SharedExposition]) -> tuple[list[Exception], list[bytes]]:
    """Render every one of `scrapes` at once, each in its own thread: what each raised, and
    the texts rendered."""
    barrier = threading.Barrier(len(scrapes))
    errors: list[Exception] = []
    texts: list[bytes] = []

    def scrape(shared: SharedExposition) -> None:
        barrier.wait()
        try:
            texts.append(shared.render())
        except Exception as e:  # what /metrics would have answered 500 for
            errors.append(e)

    threads = [threading.Thread(target=scrape, args=(shared,)) for shared in scrapes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors, texts


def gone_pid(written: dict[str, bytes]) -> int:
    """The pid of the exited writer process, read from its counter file's name."""
    (name,) = [n for n in written if n.startswith("counter_")]
    return int(name[: -len(".db")].rsplit("_", 1)[1])


WORKER_FAMILIES = (
    "dapdee_planner_worker_capacity_ms_per_second",
    "dapdee_planner_worker_leased_ms_per_second",
    "dapdee_planner_worker_leases",
)
# a planner process of multiprocess mode: its fleet gauges as the worker set changes, and
# (argv[1] == "race") scrapes rendered while another thread keeps refreshing the fleet;
# argv[2:]: the per-worker families
_FLEET = """
import json, sys, threading, warnings
if sys.argv[1] == "race":
    warnings.simplefilter("ignore")  # the race alone: the warnings are the other test's
from dapdee.planner.metrics import PlannerMetrics
FAMILIES = sys.argv[2:]
live = {"http://edge-a:8000": (1000.0, 400.0, 2), "http://edge-b:8000": (600.0, 100.0, 1)}
with_gone = {**live, "http://edge-gone:8000": (800.0, 0.0, 0)}
m = PlannerMetrics()
m.bind(lambda: 2, lambda: 1)
m.set_fleet(3, with_gone)
if sys.argv[1] == "race":
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    stop = threading.Event()
    def refresh():
        while not stop.is_set():
            m.set_fleet(3, with_gone)
            m.set_fleet(2, live)
    refresher = threading.Thread(target=refresh)
    refresher.start()
    bad = 0
    for _ in range(1500):
        lines = m.exposition().decode().splitlines()
        for name in FAMILIES:
            series = [l for l in lines if l.startswith(name + "{")]
            bad += not all(any(url in l for l in series) for url in live) or len(series) not in (2, 3)
    stop.set()
    refresher.join()
    print(json.dumps({"bad": bad}))
else:
    m.set_fleet(2, live)
    print(json.dumps({"text": m.exposition().decode()}))
"""


def _planner_process(tmp_path: Path, mode: str) -> dict[str, Any]:
    """Run `_FLEET` in `mode` in a fresh planner process of multiprocess mode (files under
    `tmp_path`, Python's default warning filters); what it printed. Asserts it exited cleanly
    with nothing on stderr: no warning (prometheus_client's `clear()` and `remove()` warn in
    multiprocess mode), which would land in the planner's JSON log stream as raw text."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default filters
    env[MULTIPROC_ENV] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", _FLEET, mode, *WORKER_FAMILIES], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    return json.loads(r.stdout)


def test_set_fleet_drops_gone_workers_without_warnings_in_multiprocess_mode(tmp_path: Path) -> None:
    """Under --workers N, a fleet refresh with a changed worker set: the gone worker's series
    are no longer exported, the live workers' are, with their new values, and prometheus_client
    warns nothing (its `clear()` and `remove()` warn in multiprocess mode)."""
    out = _planner_process(tmp_path, "change")
    s = parse(out["text"])
    for name in WORKER_FAMILIES:
        assert sorted(labels["worker"] for labels, _ in s[name]) == ["http://edge-a:8000", "http://edge-b:8000"]
    assert value(s, "dapdee_planner_worker_leased_ms_per_second", worker="http://edge-a:8000") == 400
    assert value(s, "dapdee_planner_worker_leases", worker="http://edge-b:8000") == 1
    assert value(s, "dapdee_planner_worker_capacity_ms_per_second", worker="http://edge-b:8000") == 600
    assert value(s, "dapdee_planner_leases") == 2


def test_a_scrape_during_set_fleet_always_sees_the_live_workers(tmp_path: Path) -> None:
    """Under --workers N /metrics renders in a thread while the event loop refreshes the fleet:
    1,500 renders against a thread that keeps changing the worker set (threads switched as
    often as possible) each show both live workers in all three per-worker families."""
    out = _planner_process(tmp_path, "race")
    assert out["bad"] == 0, f"{out['bad']} family renders missed a live worker"


def test_edge_worker_refuses_multiprocess_mode(tmp_path: Path) -> None:
    """One process per pod, enforced: `dapdee serve edge` with PROMETHEUS_MULTIPROC_DIR set
    exits 2 naming the variable (before loading any model)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    env[MULTIPROC_ENV] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "dapdee.cli", "serve", "edge", "--models", EDGE_SPEC, "--port", "1"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert MULTIPROC_ENV in r.stderr and "one process" in r.stderr
    assert os.listdir(tmp_path) == []


def test_plan_buckets_resolve_the_measured_fast_path() -> None:
    """The fitted layouts: plan durations from 5 µs (a cached plan takes tens of µs, so p50 and
    p99 fall between distinct bounds), edge times from 0.1 ms, both up to 10 s."""
    assert PLAN_BUCKETS[0] == 5e-6 and PLAN_BUCKETS[-1] == 10.0
    assert sum(1 for b in PLAN_BUCKETS if b <= 200e-6) >= 6  # 5, 10, 20, 50, 100, 200 µs
    assert TIME_BUCKETS[0] == 1e-4 and TIME_BUCKETS[-1] == 10.0
    for layout in (PLAN_BUCKETS, BUILD_BUCKETS, TIME_BUCKETS):
        assert list(layout) == sorted(set(layout))
        assert max(b / a for a, b in zip(layout, layout[1:], strict=False)) <= 3.0  # no coarse gaps

"""`dapdee serve planner --workers 2` (a real subprocess, the shared Redis on 127.0.0.1, a fresh
key prefix): prometheus_client's multiprocess mode. Known traffic over fresh connections reaches
both worker processes; every scrape, whichever process answers it, shows the summed counts and
histogram buckets, no per-process `pid` label, the runtime metrics of both processes summed,
and, after a worker is killed and replaced, the dead worker's counts kept and its live gauges
gone. The shared directory is a fresh temporary one (under TMPDIR), removed at exit."""

from __future__ import annotations

import glob
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector

from dapdee.client import PlannerClient
from dapdee.planner.metrics import PLAN_BUCKETS
from dapdee.testing import ServiceProcess
from tests.conftest import SHARED_REDIS, proc_rss_kib
from tests.metrics_scrape import Samples, check_histogram, parse, tiny_graph, value

OK_BODY = {"model": "tiny", "bandwidth_mbps": 8.0, "mode": "latency"}
BAD_BODY = {"model": "tiny", "bandwidth_mbps": -1}  # 422: invalid


def pids(directory: str) -> set[int]:
    """The processes that wrote counters to the shared directory."""
    return {int(Path(f).stem.rsplit("_", 1)[1]) for f in glob.glob(os.path.join(directory, "counter_*.db"))}


def plans_of(directory: str, pid: int) -> float:
    """POST /plan requests process `pid` has counted (read from its own file)."""
    for metric in MultiProcessCollector.merge(glob.glob(os.path.join(directory, f"counter_{pid}.db"))):
        if metric.name == "dapdee_planner_plans":
            return sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return 0.0


def scrape(url: str) -> Samples:
    r = httpx.get(f"{url}/metrics", headers={"Connection": "close"})
    assert r.status_code == 200
    samples = parse(r.text)
    pid_labelled = [n for n, rows in samples.items() for labels, _ in rows if "pid" in labels]
    assert not pid_labelled, f"per-process series leaked: {pid_labelled}"
    return samples


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def check_scrape(s: Samples, ok: int, bad: int) -> None:
    assert value(s, "dapdee_planner_plans_total", mode="latency", outcome="ok") == ok
    assert value(s, "dapdee_planner_plans_total", mode="auto", outcome="invalid") == bad
    check_histogram(s, "dapdee_planner_plan_duration_seconds", PLAN_BUCKETS, ok + bad)
    assert value(s, "dapdee_planner_redis_up") == 1 and value(s, "dapdee_planner_workers") == 0  # views
    assert value(s, "dapdee_planner_pending_writes") == 0
    assert len(s["python_info"]) == 1
    # every python_gc_* counter per generation, as in one process: one that stays 0 (uncollectable
    # objects, in a healthy process) too
    for name in (
        "python_gc_collections_total",
        "python_gc_objects_collected_total",
        "python_gc_objects_uncollectable_total",
    ):
        assert sorted(labels["generation"] for labels, _ in s.get(name, [])) == ["0", "1", "2"], name


def test_workers_2_scrape_sums_both_processes(tmp_path: Path, planner_prefix: str) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"DAPDEE_REDIS_URL": SHARED_REDIS, "DAPDEE_KEY_PREFIX": planner_prefix, "TMPDIR": str(tmp)}
    svc = ServiceProcess("planner", ["--workers", "2"], "/readyz", env)
    with svc.start(120):
        (directory,) = glob.glob(str(tmp / "dapdee-metrics-*"))
        wait_for("both worker processes", lambda: len(pids(directory)) == 2)
        with PlannerClient(svc.url) as client:
            client.put_graph(tiny_graph("tiny"))
        ok = bad = 0
        while min(plans_of(directory, p) for p in pids(directory)) == 0:  # until both have served
            assert ok < 400, f"one process served everything: {[plans_of(directory, p) for p in pids(directory)]}"
            for _ in range(10):  # a fresh connection each: the kernel hands it to either process
                assert httpx.post(f"{svc.url}/plan", json=OK_BODY, headers={"Connection": "close"}).status_code == 200
                ok += 1
            assert httpx.post(f"{svc.url}/plan", json=BAD_BODY, headers={"Connection": "close"}).status_code == 422
            bad += 1
        workers = sorted(pids(directory))
        assert sum(plans_of(directory, p) for p in workers) == ok + bad
        time.sleep(1.5)  # every process has written its own gauges and runtime metrics (fleet refresh: 1 s)
        for _ in range(6):  # whichever process answers, the same totals
            s = scrape(svc.url)
            check_scrape(s, ok, bad)
            assert value(s, "dapdee_planner_models") == 1  # the most any process caches
        rss = [proc_rss_kib(p) * 1024 for p in workers]
        assert abs(value(s, "process_resident_memory_bytes") - sum(rss)) < 0.25 * sum(rss), (rss, s)
        assert value(s, "process_cpu_seconds_total") > 0

        # a worker dies and is replaced: its counts stay in the totals, its live gauges go
        os.kill(workers[0], signal.SIGKILL)
        wait_for("the replacement worker", lambda: len(pids(directory) - set(workers)) == 1)
        wait_for("the replacement's readiness", lambda: httpx.get(f"{svc.url}/readyz").status_code == 200)
        time.sleep(1.5)
        live = sorted(pids(directory) - {workers[0]})
        for _ in range(4):
            s = scrape(svc.url)
            check_scrape(s, ok, bad)
        assert not glob.glob(os.path.join(directory, f"gauge_live*_{workers[0]}.db"))  # removed at scrape
        assert glob.glob(os.path.join(directory, f"counter_{workers[0]}.db"))  # kept: part of the totals
        rss = [proc_rss_kib(p) * 1024 for p in live]
        assert abs(value(s, "process_resident_memory_bytes") - sum(rss)) < 0.25 * sum(rss), (rss, s)
    assert not os.path.exists(directory)  # the temporary directory went with the server

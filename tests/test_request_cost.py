"""The edge worker's per-request cost (cost model v2): measured on itself when it registers,
published in its edge profile's meta, and priced by the planner's plans."""

from __future__ import annotations

import time

import pytest

from dapdee.client import PlannerClient
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.config import Settings
from dapdee.models import load_model
from dapdee.planner.app import create_app as create_planner
from dapdee.planner.config import Settings as PlannerSettings
from dapdee.testing import ServerThread, bind_free_socket, serve_app_in_thread, wait_registered


def test_the_worker_measures_and_publishes_its_request_cost_and_plans_pay_it() -> None:
    model = load_model("zoo:alexnet?width=0.25")
    planner_settings = PlannerSettings(redis_url=None)
    with serve_app_in_thread(create_planner(planner_settings)) as purl, PlannerClient(purl) as planner:
        sock = bind_free_socket()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = Settings(
            planner_url=purl,
            public_url=url,
            self_url=url,
            tier="cpu-test",
            heartbeat_s=0.2,
            profile_repeats=1,
            profile_warmup=0,
            request_samples=20,
            capacity_min_ms=1.0,
        )
        with ServerThread(create_app(settings, [model]), sock=sock):
            wait_registered(purl, "alexnet", [url], timeout_s=90, tier="cpu-test")
            meta = planner.list_profiles("alexnet").profiles["cpu-test"].meta
            cost = meta["edge_request_ms"]
            # an HTTP request through the guard, decode, batcher and encode costs the server CPU
            # time; on any machine it is more than 0.05 ms and far less than a second
            assert 0.05 < cost < 1000.0, meta
            # its measuring requests, priced before it knew their cost, do not lower its capacity:
            # not in the heartbeat that registered it, nor in the ones after it
            time.sleep(3 * settings.heartbeat_s)
            (worker,) = planner.workers().workers
            assert worker.capacity_ms_per_s == 1000.0
            graph = planner.get_model("alexnet").graph
            planner.put_profile("alexnet", "slow", "device", {n.name: 5.0 for n in graph.nodes})
            body = {"model": "alexnet", "device_tier": "slow", "bandwidth_mbps": 1000.0, "mode": "latency"}
            plan = planner.plan(body)
            assert plan.edge_nodes  # 5 ms a node on the device: the edge wins
            node_ms = sum(n.edge_ms or 0.0 for n in graph.nodes if n.name in plan.edge_nodes)
            assert plan.predicted.edge_ms == pytest.approx(node_ms + cost, rel=1e-6)


def test_with_several_passes_the_worker_keeps_the_median_burst_of_each_measurement() -> None:
    """A worker measuring in 3 bursts registers each burst's whole-frame compute and request
    cost, keeps the middle one of each as `edge_request_ms`, and calibrates its timings so
    that a whole frame's nodes add up to the middle whole-frame burst."""
    model = load_model("zoo:alexnet?width=0.25")
    with serve_app_in_thread(create_planner(PlannerSettings(redis_url=None))) as purl, PlannerClient(purl) as planner:
        sock = bind_free_socket()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = Settings(
            planner_url=purl, public_url=url, self_url=url, tier="cpu-test", heartbeat_s=0.2,
            profile_repeats=1, profile_warmup=0, request_samples=10, request_passes=3, request_pass_pause_s=0.0,
        )  # fmt: skip
        with ServerThread(create_app(settings, [model]), sock=sock):
            wait_registered(purl, "alexnet", [url], timeout_s=90, tier="cpu-test")
            profile = planner.list_profiles("alexnet").profiles["cpu-test"]
    meta = profile.meta
    frames, requests = meta["frame_ms_passes"], meta["edge_request_ms_passes"]
    assert meta["request_passes"] == 3 and len(frames) == len(requests) == 3, meta
    assert meta["edge_request_ms"] == pytest.approx(sorted(requests)[1], abs=1e-4)
    assert 0.5 < meta["calibration"] < 4.0, meta  # not clamped: the timings are scaled to the frame
    exit_nodes = model.graph.ancestors(model.graph.exits[-1].node)
    frame_sum = sum(profile.timings_ms[n] for n in exit_nodes)
    assert frame_sum == pytest.approx(sorted(frames)[1], rel=2e-3), (frame_sum, frames)


def test_the_median_of_passes_is_a_value_one_pass_measured_and_skips_failed_passes() -> None:
    """Passes run in order, each handed a stop event; failed ones (None) are left out; of an
    even count the lower middle is kept (a value measured, not an average); none: None."""
    import asyncio
    import threading

    from dapdee.edge_worker.registration import median_of_passes

    def run(values: list[float | None]) -> tuple[float | None, list[float]]:
        todo = iter(values)

        def measure(stop: threading.Event) -> float | None:
            assert not stop.is_set()
            return next(todo)

        return asyncio.run(median_of_passes(measure, len(values), 0.0))

    assert run([5.0, 1.0, 3.0]) == (3.0, [5.0, 1.0, 3.0])
    assert run([4.0, None, 1.0, 2.0, 8.0]) == (2.0, [4.0, 1.0, 2.0, 8.0])
    assert run([7.123456]) == (7.123456, [7.1235])
    assert run([None, None]) == (None, [])

"""The edge worker's per-request cost (cost model v2): measured on itself when it registers,
published in its edge profile's meta, and priced by the planner's plans."""

from __future__ import annotations

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
            # its measuring requests, priced before it knew their cost, do not lower its capacity
            (worker,) = planner.workers().workers
            assert worker.capacity_ms_per_s == 1000.0
            graph = planner.get_model("alexnet").graph
            planner.put_profile("alexnet", "slow", "device", {n.name: 5.0 for n in graph.nodes})
            body = {"model": "alexnet", "device_tier": "slow", "bandwidth_mbps": 1000.0, "mode": "latency"}
            plan = planner.plan(body)
            assert plan.edge_nodes  # 5 ms a node on the device: the edge wins
            node_ms = sum(n.edge_ms or 0.0 for n in graph.nodes if n.name in plan.edge_nodes)
            assert plan.predicted.edge_ms == pytest.approx(node_ms + cost, rel=1e-6)

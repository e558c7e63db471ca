"""The edge worker's advertised capacity: the meter's arithmetic on a fake clock, the profiled
compute of a request checked against the real executor, and a live worker whose compute runs
slower than its profile advertising less (and its nominal capacity once it does not)."""

from __future__ import annotations

import math
import time

import httpx
import pytest
import torch

from dapdee.calibration import single_tensor_cuts
from dapdee.client import EdgeClient
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.capacity import CapacityMeter
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.deps import ModelEntry
from dapdee.edge_worker.registration import heartbeat_body
from dapdee.models import load_model
from dapdee.testing import ServerThread, bind_free_socket


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_meter_divides_the_nominal_capacity_by_the_measured_slowdown() -> None:
    clock = FakeClock()
    m = CapacityMeter(window_s=10.0, min_ms=100.0, max_factor=4.0, raise_after_s=0.0, clock=clock)
    assert m.capacity(1000.0) == 1000.0  # idle: nominal
    for _ in range(9):
        m.record(10.0, 25.0)
    assert m.factor() == 1.0  # 90 ms predicted < min_ms: not yet a measurement
    m.record(10.0, 25.0)
    assert m.factor() == pytest.approx(2.5) and m.capacity(1000.0) == pytest.approx(400.0)
    m.record(10.0, 35.0)
    assert m.factor() == pytest.approx(285.0 / 110.0)  # 2.59: within 20 % of the advertised 2.5
    assert m.capacity(1000.0) == pytest.approx(400.0)
    m.record(10.0, 100.0)  # one slow request moves the ratio, not to its own 10x
    assert m.factor() == pytest.approx(385.0 / 120.0)  # 3.21: more than 20 % away, followed
    assert m.capacity(1000.0) == pytest.approx(1000.0 * 120.0 / 385.0)
    m.record(math.nan, 1.0)
    m.record(1.0, -1.0)  # not measurements
    assert m.factor() == pytest.approx(385.0 / 120.0)
    clock.t = 10.5  # the window moves on: only later requests count
    for _ in range(20):
        m.record(10.0, 100.0)
    assert m.factor() == 4.0  # clamped
    clock.t = 21.0
    for _ in range(20):
        m.record(10.0, 4.0)  # faster than profiled (batching): never above nominal
    assert m.capacity(1000.0) == 1000.0
    clock.t = 40.0
    assert m.factor() == 1.0
    with pytest.raises(ValueError):
        CapacityMeter(max_factor=0.5)
    with pytest.raises(ValueError):
        CapacityMeter(raise_after_s=-1.0)


def test_capacity_drops_at_once_and_comes_back_only_after_a_lasting_relief() -> None:
    clock = FakeClock()
    m = CapacityMeter(window_s=10.0, min_ms=100.0, max_factor=4.0, hysteresis=0.2, raise_after_s=30.0, clock=clock)
    for _ in range(10):
        m.record(10.0, 20.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # slower: down at once
    clock.t = 11.0
    for _ in range(10):
        m.record(10.0, 10.0)  # relief: κ back to 1
    assert m.capacity(1000.0) == pytest.approx(500.0)  # held
    clock.t = 30.0
    for _ in range(10):
        m.record(10.0, 10.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # 19 s of relief: still held
    clock.t = 35.0
    for _ in range(10):
        m.record(10.0, 22.0)  # slow again, within the band of the advertised 2: the relief ends
    assert m.factor() == pytest.approx(320.0 / 200.0) and m.capacity(1000.0) == pytest.approx(500.0)
    clock.t = 46.0
    for _ in range(10):
        m.record(10.0, 10.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # a new relief starts here
    clock.t = 75.0
    for _ in range(10):
        m.record(10.0, 10.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # 29 s
    clock.t = 76.5
    assert m.capacity(1000.0) == pytest.approx(1000.0)  # 30.5 s of relief: back up


@pytest.mark.parametrize("spec", ["zoo:alexnet?width=0.25", "zoo:resnet18?width=0.25"])
def test_a_requests_profiled_compute_is_what_the_executor_runs(spec: str) -> None:
    """For every single-tensor cut given, the nodes summed are exactly the nodes the executor
    computes: it runs with them allowed and refuses with any one of them taken away."""
    loaded = load_model(spec)
    g = loaded.graph.with_timings("edge", {n.name: float(i + 1) for i, n in enumerate(loaded.graph.nodes)})
    entry = ModelEntry.of(loaded, 4, 1 << 24)
    entry.graph = g
    x = loaded.example_input()
    target = g.exits[-1].node
    ex = loaded.executor
    for cut in [g.input.name, *single_tensor_cuts(g)[:-1]]:
        with torch.inference_mode():
            given = {cut: x} if cut == g.input.name else {cut: ex.compute({g.input.name: x}, [cut])[cut]}
        ms = entry.compute_ms(frozenset(given), target)
        needed = set(g.ancestors(target))
        if cut != g.input.name:
            needed -= set(g.ancestors(cut))
        assert ms == pytest.approx(sum(g.node(n).edge_ms or 0.0 for n in needed))
        with torch.inference_mode():
            ex.compute(given, [target], allowed=needed)
            for drop in sorted(needed)[:3]:
                with pytest.raises(ValueError):
                    ex.compute(given, [target], allowed=needed - {drop})


def test_a_worker_slower_than_its_profile_advertises_less() -> None:
    loaded = load_model("zoo:alexnet?width=0.25")
    sock = bind_free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(
        capacity_window_s=1.0, capacity_min_ms=0.01, capacity_max_factor=4.0, capacity_raise_after_s=0.5
    )
    app = create_app(settings, [loaded])
    with ServerThread(app, sock=sock), EdgeClient(url) as edge:
        state = app.state.worker
        entry = state.models["alexnet"]
        assert heartbeat_body(state, url)["capacity_ms_per_s"] == 1000.0
        # a profile that says each node takes a microsecond: the real compute is far slower
        entry.graph = loaded.graph.with_timings("edge", {n.name: 0.001 for n in loaded.graph.nodes})
        x = loaded.example_input()
        for _ in range(5):
            edge.infer("alexnet", {loaded.graph.input.name: x})
        assert heartbeat_body(state, url)["capacity_ms_per_s"] == pytest.approx(250.0)  # clamped at 4x
        # a profile that says a node takes a second: faster than profiled, nominal again
        entry.graph = loaded.graph.with_timings("edge", {n.name: 1000.0 for n in loaded.graph.nodes})
        time.sleep(1.1)
        for _ in range(3):
            edge.infer("alexnet", {loaded.graph.input.name: x})
        assert heartbeat_body(state, url)["capacity_ms_per_s"] == pytest.approx(250.0)  # the relief just began
        time.sleep(0.6)
        edge.infer("alexnet", {loaded.graph.input.name: x})
        assert heartbeat_body(state, url)["capacity_ms_per_s"] == 1000.0  # it lasted raise_after_s
        assert httpx.get(f"{url}/v2/health/live").status_code == 200

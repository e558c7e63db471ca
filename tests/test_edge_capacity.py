"""The edge worker's advertised capacity: the meter's arithmetic on a fake clock (its event-loop
CPU clock included), the per-thread CPU clock on real threads, the profiled compute of a request
checked against the real executor, a live worker whose compute runs slower than its profile
advertising less (and its nominal capacity once it does not), and live workers with their own
measured request cost keeping their nominal capacity under deep-cut requests and under the
light, probe-heavy traffic of devices joining."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx
import pytest
import torch

from dapdee.calibration import single_tensor_cuts
from dapdee.client import EdgeClient
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.capacity import CapacityMeter, thread_cpu_clock
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.deps import ModelEntry
from dapdee.edge_worker.registration import heartbeat_body
from dapdee.edge_worker.request_cost import exit_node_inputs, measure_request_ms
from dapdee.models import load_model
from dapdee.profiler import profile_model
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
        m.record(10.0, 0.0, 25.0)
    assert m.factor() == 1.0  # 90 ms predicted < min_ms: not yet a measurement
    m.record(10.0, 0.0, 25.0)
    assert m.factor() == pytest.approx(2.5) and m.capacity(1000.0) == pytest.approx(400.0)
    m.record(10.0, 0.0, 35.0)
    assert m.factor() == pytest.approx(285.0 / 110.0)  # 2.59: within 20 % of the advertised 2.5
    assert m.capacity(1000.0) == pytest.approx(400.0)
    m.record(10.0, 0.0, 100.0)  # one slow request moves the ratio, not to its own 10x
    assert m.factor() == pytest.approx(385.0 / 120.0)  # 3.21: more than 20 % away, followed
    assert m.capacity(1000.0) == pytest.approx(1000.0 * 120.0 / 385.0)
    m.record(math.nan, 0.0, 1.0)
    m.record(1.0, 0.0, -1.0)  # not measurements
    assert m.factor() == pytest.approx(385.0 / 120.0)
    clock.t = 10.5  # the window moves on: only later requests count
    for _ in range(20):
        m.record(10.0, 0.0, 100.0)
    assert m.factor() == 4.0  # clamped
    clock.t = 21.0
    for _ in range(20):
        m.record(10.0, 0.0, 4.0)  # faster than profiled (batching): never above nominal
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
        m.record(10.0, 0.0, 20.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # slower: down at once
    clock.t = 11.0
    for _ in range(10):
        m.record(10.0, 0.0, 10.0)  # relief: κ back to 1
    assert m.capacity(1000.0) == pytest.approx(500.0)  # held
    clock.t = 30.0
    for _ in range(10):
        m.record(10.0, 0.0, 10.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # 19 s of relief: still held
    clock.t = 35.0
    for _ in range(10):
        m.record(10.0, 0.0, 22.0)  # slow again, within the band of the advertised 2: the relief ends
    assert m.factor() == pytest.approx(320.0 / 200.0) and m.capacity(1000.0) == pytest.approx(500.0)
    clock.t = 46.0
    for _ in range(10):
        m.record(10.0, 0.0, 10.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # a new relief starts here
    clock.t = 75.0
    for _ in range(10):
        m.record(10.0, 0.0, 10.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)  # 29 s
    clock.t = 76.5
    assert m.capacity(1000.0) == pytest.approx(1000.0)  # 30.5 s of relief: back up


def test_an_advertised_factor_within_the_band_of_1_comes_back_to_nominal() -> None:
    """κ advertised at 1.22 (just above the band of 1, so taken at once) or at 1.1 (reached from
    2 on a lighter load) lies under 1 + hysteresis: no measured κ, clamped at 1, is more than
    the band below it. An idle worker (κ 1) still gets its nominal capacity back after
    `raise_after_s` of relief; before, it advertised 820 or 909 of 1000 ms/s for good."""
    clock = FakeClock()
    m = CapacityMeter(window_s=10.0, min_ms=100.0, max_factor=4.0, hysteresis=0.2, raise_after_s=30.0, clock=clock)
    for _ in range(10):
        m.record(10.0, 0.0, 12.2)
    assert m.capacity(1000.0) == pytest.approx(1000.0 / 1.22)  # slower: down at once
    for t in (11.0, 25.0, 40.0):  # idle: the window empties, κ reads 1
        clock.t = t
        assert m.factor() == 1.0 and m.capacity(1000.0) == pytest.approx(1000.0 / 1.22)  # held < 30 s
    clock.t = 41.5
    assert m.capacity(1000.0) == pytest.approx(1000.0)  # 30.5 s of relief: back to nominal
    for _ in range(10):
        m.record(10.0, 0.0, 20.0)
    assert m.capacity(1000.0) == pytest.approx(500.0)
    clock.t = 52.0
    for t in (52.0, 70.0, 82.5):  # a lighter load, κ 1.1, for 30.5 s: down to 1.1
        clock.t = t
        for _ in range(10):
            m.record(10.0, 0.0, 11.0)
        got = m.capacity(1000.0)
    assert got == pytest.approx(1000.0 / 1.1)
    clock.t = 95.0  # then idle
    assert m.capacity(1000.0) == pytest.approx(1000.0 / 1.1)
    clock.t = 126.0
    assert m.capacity(1000.0) == pytest.approx(1000.0)


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
        beat = heartbeat_body(state, url)
        assert beat["capacity_ms_per_s"] == pytest.approx(250.0)  # clamped at 4x
        assert beat["nominal_ms_per_s"] == 1000.0  # what the edge load is taken over stays
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


def test_the_event_loops_cpu_is_taken_time_and_the_request_cost_is_priced() -> None:
    """With the event loop timed, a request is priced at its nodes + the request cost and takes
    its slot time + the loop's CPU; without, the slot is compared with the nodes alone."""
    clock, cpu = FakeClock(), FakeClock()  # cpu: the loop thread's CPU seconds
    m = CapacityMeter(window_s=10.0, min_ms=100.0, raise_after_s=0.0, clock=clock, outside=cpu)
    slot_only = CapacityMeter(window_s=10.0, min_ms=5.0, raise_after_s=0.0, clock=clock)
    for _ in range(50):  # a deep cut: 0.2 ms of nodes, 3 ms request cost; slot 1 ms, loop 2.2 ms
        m.record(0.2, 3.0, 1.0)
        slot_only.record(0.2, 3.0, 1.0)
        cpu.t += 0.0022
    assert m.factor() == pytest.approx(1.0)  # (50 + 110) / (10 + 150): as priced
    assert slot_only.factor() == 4.0  # 1 ms of slot against 0.2 ms of nodes: 5x, clamped
    assert m.capacity(1000.0) == 1000.0
    for _ in range(50):  # the loop now takes 5.2 ms a request: the worker is slower than priced
        m.record(0.2, 3.0, 1.0)
        cpu.t += 0.0052
    assert m.factor() == pytest.approx((100.0 + 110.0 + 260.0) / 320.0)
    assert m.capacity(1000.0) == pytest.approx(1000.0 * 320.0 / 470.0)
    cpu.t += 0.1  # loop work between requests (heartbeats, scrapes) is taken too
    assert m.factor() == pytest.approx(570.0 / 320.0)
    m.record(1.0, math.nan, 1.0)
    m.record(1.0, -1.0, 1.0)  # not measurements
    assert m.factor() == pytest.approx(570.0 / 320.0)
    # a reading long after the last one counts only the window's share of the loop's CPU
    clock.t, cpu.t = 100.0, cpu.t + 1.0
    assert m.factor() == 1.0  # the requests left the window
    for _ in range(50):
        m.record(0.2, 3.0, 3.0)
    assert m.factor() == pytest.approx((150.0 + 100.0) / 160.0)  # 1000 ms x 10 s / 100 s, not 1000 ms
    m.reset()  # forgets everything, the loop's CPU before it included
    cpu.t += 5.0
    assert m.capacity(1000.0) == 1000.0 and m.factor() == 1.0


def test_the_thread_cpu_clock_reads_one_threads_cpu_from_another() -> None:
    import threading

    got: list[Callable[[], float] | None] = []
    burn, done = threading.Event(), threading.Event()

    def worker() -> None:
        got.append(thread_cpu_clock())
        burn.wait()
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.05:  # 50 ms of CPU
            pass
        done.set()
        time.sleep(0.3)  # asleep: no CPU

    t = threading.Thread(target=worker)
    t.start()
    while not got:
        time.sleep(0.01)
    clock = got[0]
    assert clock is not None  # Linux has per-thread CPU clocks
    before = clock()
    x = 0
    for i in range(200_000):  # this thread's work is not the other thread's
        x += i
    assert clock() - before < 0.01
    burn.set()
    done.wait()
    burned = clock() - before
    assert 0.05 <= burned < 0.09
    time.sleep(0.2)
    assert clock() - before - burned < 0.01  # a sleeping thread takes no CPU
    t.join()


def test_a_deep_cut_at_idle_is_not_read_as_a_slowdown() -> None:
    """A real worker with a real profile and its own measured request cost: requests that run
    one small node (most of their cost is the request itself) leave the capacity nominal. The
    slot's time alone against the node's profiled time reads several times slower."""
    loaded = load_model("zoo:resnet18?width=0.25&in_channels=1")
    sock = bind_free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # no cap on the factor: capped (4 by default) a slot-only reading would pass any bound above it
    settings = Settings(capacity_window_s=60.0, capacity_min_ms=1.0, capacity_max_factor=1000.0)
    app = create_app(settings, [loaded])
    with ServerThread(app, sock=sock), EdgeClient(url) as edge:
        state = app.state.worker
        entry = state.models[loaded.name]
        _price_requests(state, url, loaded)
        inputs = exit_node_inputs(entry)
        node_ms = entry.compute_ms(frozenset(inputs), entry.graph.exits[-1].node)
        state.capacity.reset()
        slot_ms = [edge.infer(loaded.name, inputs).compute_ms for _ in range(200)]
        slot_only = statistics.median(slot_ms) / node_ms  # the slot-only ratio that booked requests twice
        assert slot_only > 2.0
        # like with like stays near 1; the request cost measured at start-up and the 200 requests
        # after it each move with the host by tens of percent (a run in CI read 1.53, one in a
        # loaded full suite 2.28 against a slot-only 18.2), so the bound leaves room for that
        # while staying well below what the slot-only ratio reads
        bound = min(slot_only, max(2.0, slot_only / 3))
        assert state.capacity.factor() < bound, (state.capacity.factor(), slot_only)
        assert heartbeat_body(state, url)["capacity_ms_per_s"] > 1000.0 / bound


def _trickled(body: bytes, chunk: int = 512, gap_s: float = 0.0005) -> Iterator[bytes]:
    """`body` as a slow uplink delivers it: in small pieces, each its own read on the worker."""
    for i in range(0, len(body), chunk):
        yield body[i : i + chunk]
        time.sleep(gap_s)


def _start_up_traffic(url: str, loaded: Any, devices: int, pairs: int) -> None:
    """What a worker sees while devices join: from each device at once, bandwidth probe pairs
    at the shallowest exit (the input alone, then with a node tensor of up to 64 KB as filler)
    arriving through a slow uplink: large bodies, next to no compute."""
    g = loaded.graph
    x = {g.input.name: loaded.example_input()}
    filler = max((n for n in g.nodes if n.shape and n.out_bytes <= 65536), key=lambda n: n.out_bytes)
    large = {**x, filler.name: torch.zeros(filler.shape)}

    def device() -> None:
        with EdgeClient(url) as edge:
            for _ in range(pairs):
                edge.infer(loaded.name, x, exit=g.exits[0].name, uplink=_trickled)
                edge.infer(loaded.name, large, exit=g.exits[0].name, uplink=_trickled)

    with ThreadPoolExecutor(devices) as pool:
        for done in [pool.submit(device) for _ in range(devices)]:
            done.result()


def _price_requests(state: Any, url: str, loaded: Any, request_ms: float | None = None) -> float:
    """Give a running worker's model a real edge profile and a request cost, as start-up does:
    `request_ms`, or (None) the one it measures; the request cost (ms)."""
    entry = state.models[loaded.name]
    entry.graph = profile_model(loaded, tier="edge", repeats=10)
    if request_ms is None:
        request_ms = measure_request_ms(url, None, entry, samples=50)
    assert request_ms is not None and request_ms > 0
    meta = {**entry.graph.meta, "edge": {**entry.graph.meta.get("edge", {}), "edge_request_ms": request_ms}}
    entry.graph = replace(entry.graph, meta=meta)
    assert entry.request_ms == request_ms
    return request_ms


def test_light_start_up_traffic_does_not_set_the_capacity() -> None:
    """While devices join, a worker's window holds their bandwidth probes: little priced work
    next to much event-loop work (a large body read in small pieces), a ratio that reads as a
    slowdown a loaded worker does not have. Two real workers get the same such traffic: one
    counting from 200 priced ms measures a slowdown (how large depends on the host and on what
    else runs: 2.2-3.0 on one host, once within the 20 % hysteresis band in a full suite), one at
    the default (a tenth of a slot over the window) measures none and keeps its nominal
    capacity. The request cost is set to 1 ms (what loaded workers measure here: 0.9-1.5 ms), not
    measured at whatever moment of the suite this test runs: in one full suite the 200 ms meter
    read no slowdown at all (κ = 1.0; a high measured request cost would explain it, fewer and
    larger reads of the trickled bodies too)."""
    loaded = load_model("zoo:resnet18?width=0.25&in_channels=1")
    measured, advertised = {}, {}
    for min_ms in (200.0, Settings().capacity_min_ms):
        sock = bind_free_socket()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(Settings(capacity_min_ms=min_ms), [loaded])
        with ServerThread(app, sock=sock):
            state = app.state.worker
            _price_requests(state, url, loaded, request_ms=1.0)
            state.capacity.reset()
            _start_up_traffic(url, loaded, 4, 30)
            priced_ms = state.capacity.priced_ms
            measured[min_ms] = state.capacity.factor()
            advertised[min_ms] = heartbeat_body(state, url)["capacity_ms_per_s"]
        assert 200.0 < priced_ms < 2000.0, priced_ms  # the light window the test is about
    assert measured[200.0] > 1.0, measured
    assert measured[2000.0] == 1.0 and advertised[2000.0] == 1000.0, (measured, advertised)


def test_the_request_cost_of_a_slowed_down_worker_is_its_own_cpu_not_its_stretched_compute() -> None:
    """A worker emulating a K x slower edge sleeps the rest of each compute (no CPU), and its
    profile says K x the node's time: the measurement subtracts that / K, so the request cost
    it finds is its HTTP work's CPU. Subtracting the stretched time read 0 at K = 4 on a model
    whose exit node is a few ms. Here K = 10, and the case is checked on the run's own numbers:
    the stretched node outweighs all the CPU a request took, node included, so the old
    subtraction would have read 0. (A comparison with the same worker at K = 1 was dropped: on
    a host with steal the K = 1 value, a difference of two noisy ms-sized times, read 0.25-7.2
    ms.) Torch on one thread, as the benches run the worker, each value the median of three."""
    with contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)
        found, node_ms = _request_cost_at(10.0)
    server_ms = found + node_ms / 10  # the worker's CPU per request, its node included
    assert node_ms > server_ms, (node_ms, found)
    # an HTTP request through the worker's stack takes more than 0.1 ms of CPU on any host
    assert found > 0.1, (node_ms, found)


def _request_cost_at(k: float) -> tuple[float, float]:
    """(the request cost a worker at slowdown K measures on itself, the median of three; its
    profiled exit node's ms) for the heavy-head model."""
    loaded = load_model("tests.edge_models:heavy_head", input_shape=(1, 64))
    sock = bind_free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(Settings(slowdown=k, workers=1), [loaded])
    with ServerThread(app, sock=sock):
        entry = app.state.worker.models[loaded.name]
        entry.graph = profile_model(loaded, tier="edge", slowdown=k, repeats=10)
        node_ms = entry.graph.node(entry.graph.exits[-1].node).edge_ms
        runs = [measure_request_ms(url, None, entry, samples=40, slowdown=k) for _ in range(3)]
    assert None not in runs and node_ms is not None, (runs, node_ms)
    return statistics.median(runs), node_ms


def test_a_big_body_decoded_in_a_thread_is_taken_time() -> None:
    """A body over THREAD_DECODE_BYTES is decoded in a thread, whose CPU the event loop's clock
    does not see: the meter counts it as taken (a malformed one too); a small body, decoded on
    the event loop, is not counted twice."""
    import asyncio

    from dapdee import wire
    from dapdee.edge_worker.deps import ApiError
    from dapdee.edge_worker.infer import THREAD_DECODE_BYTES, decode

    loaded = load_model("zoo:alexnet?width=0.25")
    app = create_app(Settings(max_batch_rows=32), [loaded])
    with ServerThread(app, sock=bind_free_socket()):
        entry = app.state.worker.models["alexnet"]
    x = loaded.example_input()
    big, headers = wire.encode_request({loaded.graph.input.name: x.repeat(32, 1, 1, 1)})
    small, small_headers = wire.encode_request({loaded.graph.input.name: x})
    assert len(big) > THREAD_DECODE_BYTES > len(small), (len(big), len(small))

    def meter() -> CapacityMeter:
        m = CapacityMeter(window_s=60.0, min_ms=0.0, clock=FakeClock(), outside=lambda: 0.0)
        m.record(1.0, 0.0, 1.0)  # priced 1 ms, taken 1 ms: κ = 1 until something else is taken
        return m

    on_loop = meter()
    asyncio.run(decode(entry, small, small_headers.get(wire.HEADER_LENGTH), on_loop))
    assert on_loop.factor() == 1.0
    in_thread = meter()
    got = asyncio.run(decode(entry, big, headers.get(wire.HEADER_LENGTH), in_thread))
    assert next(iter(got.inputs.values())).shape[0] == 32
    assert in_thread.factor() > 1.0  # (1 ms + the decode's CPU) / 1 ms
    refused = meter()
    with pytest.raises(ApiError):
        asyncio.run(decode(entry, big[:-4], headers.get(wire.HEADER_LENGTH), refused))
    assert refused.factor() > 1.0

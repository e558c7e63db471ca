"""The edge worker's batches, caches and start-up, against real uvicorn servers on 127.0.0.1 and real torch models:
parameter-only values a cut sends (fx `get_attr` nodes) are no batch data, a request whose data
fails inside a batch fails alone (its compute time still reported), the compute-ms cache is
bounded, profiling stops at shutdown, a cached profile is reused only at the worker's thread
count, IPv6 hosts give bracketed URLs, and an infer to an unknown model is 404 before its body
is read."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from dapdee import wire
from dapdee.client import PlannerClient
from dapdee.costmodel import Conditions, partition
from dapdee.device.compute import TorchCompute
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
from dapdee.device.plan_source import FixedPlanSource
from dapdee.device.plans import fixed_plan
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import Frame
from dapdee.edge_worker import deps
from dapdee.edge_worker.app import create_app, load_models
from dapdee.edge_worker.batching import Batcher
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.deps import ModelEntry, WorkerState
from dapdee.edge_worker.registration import profile_entry, profile_path
from dapdee.models import LoadedModel, load_model
from dapdee.planner.app import create_app as create_planner
from dapdee.planner.config import Settings as PlannerSettings
from dapdee.profiler import profile_model
from dapdee.testing import ServerThread, free_port, serve_app_in_thread
from tests import metrics_scrape
from tests.test_baselines import synthetic_timings

ATOL = 1e-5
POISON = 13.0  # `picky` raises on a row holding this value
ABORT = threading.Event()  # `spinning` raises while set: ends a profiling run the test left behind


class Scaled(nn.Module):
    """conv -> times a learned per-channel gain (a parameter read in forward: an fx `get_attr`
    node, no batch dimension) -> pool, flatten, linear: one exit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, 4).reshape(4, 1, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) * self.gain)


def scaled() -> nn.Module:
    torch.manual_seed(0)
    return Scaled()


def refuse_poison(x: torch.Tensor) -> torch.Tensor:
    """`x`, unless a value of it is POISON (a traced leaf: it runs at inference time)."""
    if bool((x == POISON).any()):
        raise ValueError("poisoned row")
    return x


def spin(x: torch.Tensor) -> torch.Tensor:
    """`x`, unless ABORT is set (a traced leaf)."""
    if ABORT.is_set():
        raise RuntimeError("aborted by the test")
    return x


torch.fx.wrap("refuse_poison")
torch.fx.wrap("spin")


class Picky(nn.Module):
    """refuse_poison -> Linear(8, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(refuse_poison(x))


def picky() -> nn.Module:
    return Picky()


class Spinning(nn.Module):
    """spin -> Linear(8, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(spin(x))


def spinning() -> nn.Module:
    return Spinning()


@pytest.fixture(scope="module")
def scaled_model() -> LoadedModel:
    return load_model("tests.test_edge_batches_and_start_up:scaled", input_shape=(1, 1, 8, 8))


@pytest.fixture(scope="module")
def scaled_worker(scaled_model: LoadedModel) -> Iterator[str]:
    """A worker serving `scaled` whose batches of 4 requests wait up to 1 s to fill (concurrent
    requests batch)."""
    settings = Settings(models="", batch_max=4, batch_wait_ms=1000.0)
    with serve_app_in_thread(create_app(settings, [scaled_model])) as url:
        yield url


def _device_values(m: LoadedModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the device sends for the planner's cut {conv, gain} (its transfer): its part run
    locally with the split executor, as the device runtime does."""
    part = partition(m.graph, "final", ["conv", "gain"])
    names = [u for u, _ in part.transfer]
    assert names == ["conv", "gain"]
    with torch.inference_mode():
        return m.executor.compute({m.input_name: x}, names, allowed=set(part.device_nodes))


def _local(m: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return m.gm(x)


async def _post(client: httpx.AsyncClient, model: str, inputs: dict[str, torch.Tensor]) -> httpx.Response:
    body, headers = wire.encode_request(inputs)
    return await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def test_parameter_values_are_not_batch_data(scaled_model: LoadedModel) -> None:
    """A get_attr node has its whole traced shape (no rows) and counts once, not per row, in the
    request limits."""
    entry = ModelEntry.of(scaled_model, 16, 1 << 24)
    assert entry.fixed_shapes == {"gain": (4, 1, 1)}
    assert "gain" not in entry.sample_shapes and entry.sample_shapes["conv"] == (4, 8, 8)
    assert entry.limits.max_values == 16 * entry.limits.row_values + 4


def test_a_cut_with_a_parameter_node_answers_at_batch_1(scaled_model: LoadedModel, scaled_worker: str) -> None:
    """The device's values for the cut {conv, gain} at batch 1 (conv [1, 4, 8, 8], gain
    [4, 1, 1]: no batch dimension) get what the whole model computes locally."""
    x = torch.randn(1, 1, 8, 8)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(base_url=scaled_worker, timeout=30) as c:
            return await _post(c, scaled_model.name, _device_values(scaled_model, x))

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    answer = wire.decode_response(r.content, r.headers)
    assert torch.allclose(answer.outputs["logits"], _local(scaled_model, x), atol=ATOL)


def test_a_cut_with_a_parameter_node_batches(scaled_model: LoadedModel, scaled_worker: str) -> None:
    """Concurrent requests for the cut {conv, gain} of 4 rows each (gain [4, 1, 1] looks like
    4 rows), one of which does not send gain, are computed as one batch, each getting what the
    whole model computes locally for its rows."""
    torch.manual_seed(1)
    xs = [torch.randn(4, 1, 8, 8) for _ in range(4)]
    sent = [_device_values(scaled_model, x) for x in xs]
    del sent[3]["gain"]  # the worker computes it either way

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=scaled_worker, timeout=30) as c:
            return list(await asyncio.gather(*(_post(c, scaled_model.name, v) for v in sent)))

    for x, r in zip(xs, asyncio.run(go()), strict=True):
        assert r.status_code == 200, r.text
        answer = wire.decode_response(r.content, r.headers)
        assert answer.parameters["batch_size"] == 4  # all four in one batch
        assert torch.allclose(answer.outputs["logits"], _local(scaled_model, x), atol=ATOL)


def test_parameter_values_are_checked_against_their_whole_shape(scaled_model: LoadedModel, scaled_worker: str) -> None:
    """A parameter value at another shape is 400 naming it; one sent alone (no batch data) is
    400 asking for the boundary tensors."""
    x = torch.randn(2, 1, 8, 8)
    sent = _device_values(scaled_model, x)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=scaled_worker, timeout=30) as c:
            return [
                await _post(c, scaled_model.name, {**sent, "gain": sent["gain"].expand(2, 4, 1, 1)}),
                await _post(c, scaled_model.name, {"gain": sent["gain"]}),
            ]

    wrong, alone = asyncio.run(go())
    assert wrong.status_code == 400 and "'gain': wrong shape; expected [4, 1, 1]" in wrong.json()["error"]
    assert alone.status_code == 400 and "boundary tensors" in alone.json()["error"]


def test_a_failed_batch_reports_its_compute_time() -> None:
    """A request that fails alone still spent compute: the batch is reported (the callback that
    feeds the compute-busy counter and histogram), and the caller gets the model's error."""
    m = load_model("tests.test_edge_batches_and_start_up:picky", input_shape=(1, 8))
    reported: list[tuple[str, int, float]] = []

    async def go() -> BaseException | object:
        batcher = Batcher(1, 0.0, max_rows=16, on_batch=lambda *a: reported.append(a))
        key = (m.name, frozenset({m.input_name}), "final")
        try:
            job = batcher.submit(key, m.executor, m.exit_node(), {m.input_name: torch.full((1, 8), POISON)})
            return (await asyncio.wait_for(asyncio.gather(job, return_exceptions=True), 30))[0]
        finally:
            batcher.close()

    failed = asyncio.run(go())
    assert isinstance(failed, ValueError) and "poisoned" in str(failed)
    assert len(reported) == 1 and reported[0][:2] == (m.name, 1) and reported[0][2] > 0


def test_a_request_that_fails_in_a_batch_fails_alone() -> None:
    """Two requests batched together, one whose data makes the model raise: the other gets its
    own rows of the answer, the failing one its error."""
    m = load_model("tests.test_edge_batches_and_start_up:picky", input_shape=(1, 8))
    good, bad = torch.randn(2, 8), torch.full((1, 8), POISON)

    async def go() -> list[object]:
        batcher = Batcher(batch_max=2, batch_wait_ms=10_000.0, max_rows=16)
        key = (m.name, frozenset({m.input_name}), "final")
        try:
            jobs = [batcher.submit(key, m.executor, m.exit_node(), {m.input_name: x}) for x in (good, bad)]
            return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 30)
        finally:
            batcher.close()

    ok, failed = asyncio.run(go())
    assert isinstance(failed, ValueError) and "poisoned" in str(failed)
    assert not isinstance(ok, BaseException)
    assert ok.batch_size == 2 and torch.allclose(ok.output, _local(m, good), atol=ATOL)


def test_the_compute_ms_cache_is_bounded(scaled_model: LoadedModel) -> None:
    """Distinct sets of input names past the bound keep the names the cache holds within it
    (COMPUTE_CACHE_NAMES), the most recently used kept."""
    bound = deps.COMPUTE_CACHE_NAMES
    entry = ModelEntry.of(scaled_model, 16, 1 << 24)
    hot = frozenset({"conv"})
    for i in range(2 * bound // 1000):  # 1,000 names a set
        entry.compute_ms(frozenset({"conv", *(f"sent-{i}-{j}" for j in range(999))}), "head_2")
        entry.compute_ms(hot, "head_2")
    cache = entry._compute_ms[1]
    assert bound - 1001 < cache.total <= bound
    assert cache.get((hot, "head_2")) is not None


def _spinning_worker(planner_url: str, repeats: int) -> ServerThread:
    m = load_model("tests.test_edge_batches_and_start_up:spinning", input_shape=(1, 8))
    settings = Settings(models="", planner_url=planner_url, port=8000, profile_repeats=repeats, request_samples=0)
    return ServerThread(create_app(settings, [m]))


def test_shutdown_stops_profiling(caplog: pytest.LogCaptureFixture) -> None:
    """A worker stopped while it profiles (a billion repeats per node) stops within seconds."""
    caplog.set_level(logging.INFO, logger="dapdee.edge.registration")
    ABORT.clear()
    server = _spinning_worker(f"http://127.0.0.1:{free_port()}", 10**9).start()
    try:
        deadline = time.monotonic() + 30
        while "profiling edge timings" not in caplog.text:
            assert time.monotonic() < deadline, "profiling never started"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the repeats of the first node
        t0 = time.monotonic()
        server.stop(timeout_s=10)
        assert time.monotonic() - t0 < 5
    finally:
        ABORT.set()  # a profiling run that did not stop ends at its next node run


def test_a_cached_profile_is_reused_only_at_the_workers_thread_count(scaled_model: LoadedModel, tmp_path: Path) -> None:
    """A profile cached at 1 thread is reused by a worker of 1 thread and measured again (and
    replaced) by a worker of 2."""
    cache = profile_path(str(tmp_path), scaled_model.name, "edge")
    profile_model(scaled_model, "edge", threads=1, repeats=1, warmup=0).save(str(cache))
    entry = ModelEntry.of(scaled_model, 16, 1 << 24)

    def profiled(threads: int) -> dict[str, object]:
        settings = Settings(models="", profile_cache=str(tmp_path), threads=threads, profile_repeats=1)
        return profile_entry(WorkerState(settings, {}, None, None), entry).meta["edge"]  # type: ignore[arg-type]

    assert profiled(1)["threads"] == 1
    assert profiled(2)["threads"] == 2
    assert profiled(2)["threads"] == 2  # replaced in the cache


def test_an_ipv6_host_is_advertised_bracketed() -> None:
    """With host ::1 and no public_url, the worker registers http://[::1]:PORT (a real planner
    takes its heartbeat; the worker itself serves on 127.0.0.1: no IPv6 traffic), and reaches
    itself at http://[::1]:PORT; a host that gives no URL is refused at start-up."""
    from dapdee.edge_worker.config import http_url, self_url_for

    port = free_port()
    assert self_url_for("::1", port) == f"http://[::1]:{port}"
    assert self_url_for("::", port) == f"http://[::1]:{port}"
    assert self_url_for("0.0.0.0", port) == f"http://127.0.0.1:{port}"
    assert http_url("fe80::1", port) == f"http://[fe80::1]:{port}"
    with pytest.raises(ValueError, match="public_url"):
        Settings(models="", host="bad host", port=port, planner_url="http://127.0.0.1:9")
    m = load_model("tests.test_edge_batches_and_start_up:picky", input_shape=(1, 8))
    with serve_app_in_thread(create_planner(PlannerSettings(redis_url=None))) as purl:
        settings = Settings(models="", host="::1", port=port, planner_url=purl, profile=False, heartbeat_s=0.1)
        with serve_app_in_thread(create_app(settings, [m])), PlannerClient(purl) as planner:
            deadline = time.monotonic() + 15
            while not planner.workers().workers:
                assert time.monotonic() < deadline, "the worker never registered"
                time.sleep(0.1)
            assert [w.url for w in planner.workers().workers] == [f"http://[::1]:{port}"]


@pytest.mark.parametrize("tier", ["gpu..a100", "-gpu", "gpu/a100", "g" * 65, "gpu\n"])
def test_a_tier_the_planner_would_refuse_is_refused_at_start_up(tier: str) -> None:
    """The worker's tier names its profile (a URL segment and Redis key part at the planner):
    one the planner's name rule refuses ("..", a leading '-', a '/', 65 characters, a newline)
    is refused by the worker's settings, naming `tier`, rather than passing at start-up and
    failing every heartbeat after it; a valid one passes."""
    with pytest.raises(ValueError, match="tier"):
        Settings(models="", tier=tier)
    assert Settings(models="", tier="gpu.a100-x_2").tier == "gpu.a100-x_2"


def test_two_models_of_one_name_are_refused_by_the_app_and_by_the_settings() -> None:
    """Each route serves one model per name: two of the same name, given to the app or named
    in the settings, are a ValueError naming it (the first one was silently dropped)."""
    a, b = (load_model("tests.edge_models:squares", input_shape=(1, 8)) for _ in range(2))
    with pytest.raises(ValueError, match="two models are named 'squares'"):
        create_app(Settings(models=""), [a, b])
    with pytest.raises(ValueError, match="two models are named"):
        load_models(Settings(models="zoo:alexnet?width=0.125,zoo:alexnet?width=0.25"))


def test_an_infer_to_an_unknown_model_is_404_before_its_body() -> None:
    """A mistyped model with a real tensor (1 MiB) is 404 naming the served models, with
    Connection: close; without the device role the guard's 401/403 come first."""
    tokens = {"device": "device-" + "d" * 20, "worker": "worker-" + "w" * 20}
    m = load_model("tests.test_edge_batches_and_start_up:picky", input_shape=(1, 8))
    settings = Settings(models="", device_token=tokens["device"], worker_token=tokens["worker"])
    body, headers = wire.encode_request({m.input_name: torch.randn(16, 8)})
    big, big_headers = wire.encode_request({"x": torch.randn(1, 1 << 18)})
    assert len(big) > 1 << 20
    with serve_app_in_thread(create_app(settings, [m])) as url, httpx.Client(base_url=url, timeout=30) as c:
        auth = {"Authorization": f"Bearer {tokens['device']}"}
        r = c.post(f"/v2/models/{m.name}x/infer", content=big, headers={**big_headers, **auth})
        assert r.status_code == 404, r.text
        assert r.json()["error"] == f"unknown model '{m.name}x'; this worker serves ['{m.name}']"
        assert r.headers["connection"] == "close"
        assert c.post(f"/v2/models/{m.name}x/infer", content=big, headers=big_headers).status_code == 401
        other = {"Authorization": f"Bearer {tokens['worker']}"}
        assert c.post(f"/v2/models/{m.name}x/infer", content=big, headers={**big_headers, **other}).status_code == 403
        ok = c.post(f"/v2/models/{m.name}/infer", content=body, headers={**headers, **auth})
        assert ok.status_code == 200, ok.text
        scrape = metrics_scrape.parse(c.get("/metrics").text)
        assert metrics_scrape.value(scrape, "dapdee_edge_requests_total", model="_unknown", status="404") == 1


def test_a_device_splitting_at_a_parameter_node_sends_only_frame_data(scaled_model: LoadedModel) -> None:
    """The whole path, device runtime to worker, on the cut {conv, gain}: the plan's transfer
    names gain, a value computed from parameters alone (no batch dimension: the SDK refused to
    send it next to conv's one row, and every frame fell back). The device sends only frame
    data (conv) and the worker computes gain itself: every frame is answered by the edge with
    what the whole model computes locally."""
    with serve_app_in_thread(create_app(Settings(models=""), [scaled_model])) as url:
        records = _split_frames(scaled_model, url)
    assert [r.where for r in records] == ["edge"] * 3, [r.error for r in records]
    torch.manual_seed(2)
    expected = [int(_local(scaled_model, torch.randn(1, 1, 8, 8)).argmax()) for _ in range(3)]
    assert [r.pred_class for r in records] == expected


def _split_frames(scaled_model: LoadedModel, scaled_worker: str) -> list[Any]:
    """Three frames (seed 2) through a device runtime on the plan {conv, gain} | rest to the worker."""
    graph = synthetic_timings(scaled_model.graph)
    assert graph.input_dependent() == {n.name for n in graph.nodes} - {"gain"}
    plan = fixed_plan(graph, "final", ["conv", "gain"], scaled_worker, Conditions(5.0), "test-gain")
    assert set(plan.transfer_nodes) == {"conv", "gain"}
    sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
    edge = EdgeLink(graph, WorkerTrust(None, [scaled_worker]), sensing, backoff=Backoff(0.5, 8.0))
    config = RuntimeConfig(Requirements(mode="latency"))
    runtime = DeviceRuntime(graph, TorchCompute(scaled_model, 1.0), FixedPlanSource(plan), config=config,
                            sensing=sensing, edge=edge, edge_url=scaled_worker)  # fmt: skip
    torch.manual_seed(2)
    frames = [Frame(torch.randn(1, 1, 8, 8)) for _ in range(3)]

    async def go() -> list[Any]:
        async with runtime:
            records = await runtime.run(frames)
        await edge.aclose()
        runtime.compute.close()
        return records

    return asyncio.run(go())

"""The device trusts nothing an edge sends, and sends its token only where the planner says:

- a real proxy in front of a real edge worker rewrites answers (a timing that is a string,
  negative, NaN; logits of another shape; an output missing): each such frame falls back to the
  device with the right class, the run never aborts, and no such answer moves the bandwidth
  estimate;
- a probe pair whose worker states a queue time longer than the upload itself gives no
  bandwidth sample (as a lone upload with it gives none);
- real recording servers: the one the planner lists gets the device token, the one it does
  not list is never contacted, and is not rested for it (the planner's list failed, not it);
- a frame whose upload failed records the bytes that left the device (`bytes_sent`);
- pipelined frames to a worker not yet read from the planner's list wait for the read under way;
- frames in flight take a slow uplink in turn, so each body reaches a worker within its body
  timeout (sharing the link, every one would take as long as all of them together), and a body
  that waited for its turn is booked from where the one before it ended: a late hand-over
  does not idle the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from typing import Any

import httpx
import pytest
import torch

from dapdee import wire
from dapdee.client import AsyncPlannerClient
from dapdee.costmodel import Conditions
from dapdee.device import edge as edge_module
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.edge import EdgeLink, Upload, WorkerTrust
from dapdee.device.plan_source import listed_workers
from dapdee.device.plans import fixed_plan
from dapdee.device.probe import LinkProber
from dapdee.device.sensing import Sensing
from dapdee.device.types import EdgeFailure, FrameRecord
from dapdee.netem import ShapedUplink
from dapdee.testing import bind_free_socket, serve_app_in_thread
from tests.device_stack import ForwardingProxy, HangingProxy, Stack, fixed_runtime, running, start_edge
from tests.standin import Standin

HEADER = wire.HEADER_LENGTH


def _rewrite(body: bytes, headers: dict[str, str], lie: str) -> tuple[bytes, dict[str, str]]:
    """The edge's binary answer with one lie told in it."""
    decoded = wire.decode_response(body, headers)
    params = dict(decoded.parameters)
    outputs = dict(decoded.outputs)
    if lie == "logits 1000 wide":
        outputs["logits"] = torch.zeros(1, 1000)
    elif lie == "class missing":
        del outputs["class"]
    new_body, new_headers = wire.encode_response(decoded.model_name or "", outputs, request_id=decoded.id,
                                                 parameters=params, model_version="1")  # fmt: skip
    if lie.startswith("queue_ms") or lie.startswith("compute_ms"):
        key, value = {"queue_ms x": ("queue_ms", "x"), "queue_ms -1e9": ("queue_ms", -1e9),
                      "compute_ms NaN": ("compute_ms", float("nan")),
                      "queue_ms 60000": ("queue_ms", 60000.0), "queue_ms 400": ("queue_ms", 400.0)}[lie]  # fmt: skip
        hlen = int(new_headers[HEADER])
        head = json.loads(new_body[:hlen])
        head["parameters"][key] = value
        text = json.dumps(head).encode()  # NaN spelt as JSON cannot: `NaN`
        new_body, new_headers[HEADER] = text + new_body[hlen:], str(len(text))
    return new_body, new_headers


class LyingProxy(ForwardingProxy):
    """Forwards to `target`; the i-th infer answer carries the lie `lies[i % len(lies)]`
    (`honest` = unchanged)."""

    def __init__(self, target: str, lies: list[str]) -> None:
        super().__init__(target)
        self.lies = lies
        self.told: list[str] = []

    async def answer(
        self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: httpx.Response
    ) -> tuple[int, dict[str, str], bytes]:
        status, out_headers, out = await super().answer(scope, headers, body, response)
        if scope["path"].endswith("/infer") and status == 200:
            lie = self.lies[len(self.told) % len(self.lies)]
            self.told.append(lie)
            if lie != "honest":
                out, changed = _rewrite(out, dict(response.headers), lie)
                out_headers.update({k.lower(): v for k, v in changed.items()})
        return status, out_headers, out


LIES = ["honest", "queue_ms x", "queue_ms -1e9", "compute_ms NaN", "logits 1000 wide", "class missing"]


def test_answers_off_contract_become_that_frames_fallback(stack: Stack) -> None:
    proxy = LyingProxy(stack.edge.url, LIES)
    frames = stack.frames(2 * len(LIES), seed=11)
    # no rest after a failure: every frame tries the edge
    cfg = RuntimeConfig(Requirements(mode="latency"), backoff_initial_s=0.001, backoff_max_s=0.001)

    with serve_app_in_thread(proxy) as url:

        async def go() -> tuple[list[FrameRecord], list[int]]:
            sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
            async with running(fixed_runtime(stack, stack.mid_cut(url), url, config=cfg, sensing=sensing)) as rt:
                records, samples = [], []
                for frame in frames:
                    await asyncio.sleep(0.01)  # past the (tiny) rest
                    records.append(await rt.infer(frame))
                    samples.append(sensing.bandwidth.samples)
                return records, samples

        records, samples = asyncio.run(go())
    assert proxy.told == LIES * 2
    assert len(records) == len(frames)
    whole = records[0].bytes_sent  # an honest answer's request
    for frame, rec, lie in zip(frames, records, proxy.told, strict=True):
        assert rec.pred_class == stack.local_class(frame.x, rec.exit), (lie, rec)
        if lie == "honest":
            assert rec.where == "edge", (lie, rec.error)
        else:
            assert rec.where == "fallback" and rec.error and rec.error.startswith("bad answer"), (lie, rec.error)
        assert whole <= rec.bytes_sent <= whole + 1, (lie, rec.bytes_sent, whole)  # sent whole (ids "0" to "11")
    gained = [b - a for a, b in zip([0, *samples], samples, strict=False)]
    assert all(g == 0 for g, lie in zip(gained, proxy.told, strict=True) if lie != "honest"), gained


def test_a_failed_upload_records_the_bytes_that_left_the_device(stack: Stack) -> None:
    """`bytes_sent` counts what a frame put on its uplink, answered or not. Edge-Only frames
    (the input, ~4 KB), timeout 0.5 s: answered, the whole request; timed out on a 0.02 Mbit/s
    link, the part the link had carried (1 KB of the shaper's chunks: the next one was due
    after the timeout); timed out on a fast link at a worker that never answers, the whole
    request; refused a connection, nothing."""
    cfg = RuntimeConfig(Requirements(mode="latency"), timeout_floor_ms=500.0, timeout_factor=0.001)
    frame = stack.frames(1, seed=23)[0]
    proxy = HangingProxy(stack.edge.url)
    proxy.hanging = True
    closed = bind_free_socket()  # bound, never listening: connection refused

    async def one(url: str, rate_mbps: float | None) -> FrameRecord:
        plan = fixed_plan(stack.graph, "final", [], url, Conditions(5.0), "test-edge-only")
        async with running(fixed_runtime(stack, plan, url, rate_mbps=rate_mbps, config=cfg)) as rt:
            return await rt.infer(frame)

    try:
        with serve_app_in_thread(proxy) as hanging:
            answered = asyncio.run(one(stack.edge.url, None))
            cut_off = asyncio.run(one(stack.edge.url, 0.02))
            unanswered = asyncio.run(one(hanging, None))
            proxy.hanging = False
        refused = asyncio.run(one(f"http://127.0.0.1:{closed.getsockname()[1]}", None))
    finally:
        proxy.hanging = False
        closed.close()
    whole = answered.bytes_sent
    assert answered.where == "edge" and whole > stack.graph.input.bytes, (answered.error, whole)
    for rec in (cut_off, unanswered):
        assert (rec.where, rec.error) == ("fallback", "timeout after 500 ms"), rec
    assert 0 < cut_off.bytes_sent < whole, (cut_off.bytes_sent, whole)
    assert unanswered.bytes_sent == whole
    assert refused.where == "fallback" and "Connect" in (refused.error or "") and refused.bytes_sent == 0, refused


async def answer_lifespan(receive: Any, send: Any) -> None:
    """An ASGI app's lifespan: start-up and shut-down, each acknowledged."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


class Recorder:
    """An ASGI app that records each request's path and Authorization header and answers 503."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await answer_lifespan(receive, send)
        while (await receive()).get("more_body"):
            pass
        auth = dict(scope["headers"]).get(b"authorization")
        self.requests.append((scope["path"], auth.decode() if auth else None))
        body = b'{"error": "recorder"}'
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def test_the_token_goes_only_to_workers_the_planner_lists(stack: Stack) -> None:
    listed, unlisted = Recorder(), Recorder()
    x = {stack.graph.input.name: stack.loaded.example_input()}
    with serve_app_in_thread(listed) as listed_url, serve_app_in_thread(unlisted) as unlisted_url:
        beat = {"url": listed_url, "models": [stack.loaded.name], "tier": "edge", "load": 0.0}
        assert httpx.post(f"{stack.planner.url}/workers/heartbeat", json=beat, timeout=5).status_code == 200

        async def go() -> list[str]:
            async with AsyncPlannerClient(stack.planner.url) as planner:
                trust = WorkerTrust(functools.partial(listed_workers, planner), refresh_s=0.5)
                edge = EdgeLink(stack.graph, trust, Sensing(fixed_load=0.0), token="device-secret")
                reasons = []
                for url in (unlisted_url, listed_url, stack.edge.url):
                    try:
                        await edge.infer(url, x, "final", 5.0)
                        reasons.append("answered")
                    except EdgeFailure as exc:
                        reasons.append(exc.reason)
                await edge.aclose()
                return reasons

        reasons = asyncio.run(go())
    assert "not listed by the planner" in reasons[0] and unlisted.requests == []
    assert reasons[1].startswith("HTTP 503") and reasons[2] == "answered"
    assert listed.requests == [(f"/v2/models/{stack.loaded.name}/infer", "Bearer device-secret")]


def test_pipelined_frames_wait_for_the_list_read_under_way(stack: Stack) -> None:
    """Three frames in flight to a worker the planner lists but the device has not read yet:
    the first reads the planner's list; the others wait for that read instead of finding the
    worker not (yet) listed. Every frame is answered by the worker, which never rests."""
    url = stack.edge.url
    plan = fixed_plan(stack.graph, "final", [], url, Conditions(5.0), "test-edge-only")
    config = RuntimeConfig(Requirements(mode="throughput"), max_inflight=3)

    async def go() -> tuple[list[FrameRecord], int]:
        async with AsyncPlannerClient(stack.planner.url) as planner:
            trust = WorkerTrust(functools.partial(listed_workers, planner), refresh_s=5.0)
            async with running(fixed_runtime(stack, plan, url, config=config, trust=trust)) as rt:
                assert rt.edge is not None
                records = await rt.run(stack.frames(6, seed=21))
                return records, rt.edge.backoff_of(url).rests

    records, rests = asyncio.run(go())
    assert [r.where for r in records] == ["edge"] * 6, [r.error for r in records]
    assert rests == 0


def test_a_worker_the_planner_does_not_list_is_not_rested(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A plan names a worker the planner does not list: each frame falls back without
    contacting it and asks for a new plan, but the worker is not rested (the planner's list
    failed, not the worker): the next frame still asks the list, not the back-off. Told once
    (an event, a warning) while that request for a plan waits, not once per frame."""
    unlisted = Recorder()
    with serve_app_in_thread(unlisted) as url:
        plan = fixed_plan(stack.graph, "final", [], url, Conditions(5.0), "test-unlisted")

        async def go() -> tuple[list[FrameRecord], bool, int, list[str]]:
            async with AsyncPlannerClient(stack.planner.url) as planner:
                trust = WorkerTrust(functools.partial(listed_workers, planner), refresh_s=5.0)
                async with running(fixed_runtime(stack, plan, url, trust=trust)) as rt:
                    assert rt.edge is not None
                    records = [await rt.infer(frame) for frame in stack.frames(4, seed=22)]
                    return records, rt.edge.resting(url), rt.edge.backoff_of(url).rests, rt.events

        with caplog.at_level(logging.WARNING):
            records, resting, rests, events = asyncio.run(go())
    assert [r.where for r in records] == ["fallback"] * 4
    assert all(r.error is not None and "not listed by the planner" in r.error for r in records), records
    assert not resting and rests == 0 and unlisted.requests == []
    assert len(events) == 1 and "asking for a new plan" in events[0], events
    assert [r.getMessage() for r in caplog.records].count(f"edge refused: {records[0].error}") == 1, caplog.text


def test_a_frame_cancelled_mid_upload_leaves_no_open_bandwidth_ticket(stack: Stack) -> None:
    """A frame cancelled while its tensors are on a shaped 2 Mbit/s uplink (a caller's deadline,
    or a pipelined stream cancelling its frames in flight) drops its upload from the bandwidth
    estimator: the uploads after it become samples, the estimate moves from the 8 Mbit/s prior
    towards the link, and no upload is left open."""
    url = stack.edge.url
    frames = stack.frames(7, seed=12)

    async def go() -> tuple[list[FrameRecord], Sensing, int]:
        sensing = Sensing(prior_mbps=8.0, fixed_load=0.0)
        async with running(fixed_runtime(stack, stack.mid_cut(url), url, rate_mbps=2.0, sensing=sensing)) as rt:
            assert rt.edge is not None
            task = asyncio.create_task(rt.infer(frames[0]))
            while rt.edge.uploads_active == 0:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            before = sensing.bandwidth.samples
            records = [await rt.infer(frame) for frame in frames[1:]]
            return records, sensing, sensing.bandwidth.samples - before

    records, sensing, gained = asyncio.run(go())
    assert [r.where for r in records] == ["edge"] * len(records), [r.error for r in records]
    assert gained >= len(records) - 1, gained
    assert sensing.bandwidth.open_uploads == 0
    assert sensing.bandwidth.estimate_mbps < 5.0  # moved from the 8 Mbit/s prior towards the 2 Mbit/s link


def test_a_probe_pair_with_a_server_time_beyond_its_upload_gives_no_sample(stack: Stack) -> None:
    """The small upload of a probe pair comes back saying it queued 60 s, longer than the whole
    upload took: the pair is dropped (the estimate stays at the prior, no pair counted); the
    next, honest pair over the same shaped 10 Mbit/s link is a sample."""
    lies = ["queue_ms 60000", "honest", "honest", "honest"]  # the first pair's small upload lies
    proxy = LyingProxy(stack.edge.url, lies)

    with serve_app_in_thread(proxy) as url:

        async def go() -> tuple[float | None, float, int, float | None]:
            sensing = Sensing(prior_mbps=10.0, fixed_load=0.0)
            edge = EdgeLink(stack.graph, WorkerTrust(None, [url]), sensing, shaper=ShapedUplink(10.0))
            prober = LinkProber(edge, stack.graph, sensing)
            try:
                lied = await prober.probe(url)
                estimate, pairs = sensing.bandwidth.estimate_mbps, sensing.bandwidth.pairs
                return lied, estimate, pairs, await prober.probe(url)
            finally:
                await edge.aclose()

        lied, estimate, pairs, honest = asyncio.run(go())
    assert proxy.told == lies
    assert lied is None and estimate == 10.0 and pairs == 0, (lied, estimate, pairs)
    assert honest is not None and honest > 0.0


def test_an_upload_timing_out_alone_on_a_slow_link_bounds_the_estimate(stack: Stack) -> None:
    """The link drops far below the estimate (5 Mbit/s believed, 0.02 Mbit/s real): the input's
    4 KB need 1.6 s, more than the 0.5 s timeout, so the upload gives no timing, yet the timeout
    itself proves the link carries at most about 4 KB / 0.5 s: the estimate falls to that
    bound (instead of staying at 5 Mbit/s while every upload times out)."""

    async def go() -> tuple[str, float, bool]:
        sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
        edge = EdgeLink(stack.graph, WorkerTrust(None, [stack.edge.url]), sensing, shaper=ShapedUplink(0.02))
        x = stack.frames(1, seed=4)[0].x
        try:
            with pytest.raises(EdgeFailure) as failed:
                await edge.infer(stack.edge.url, {stack.graph.input.name: x}, "final", 0.5)
            return failed.value.reason, sensing.bandwidth.estimate_mbps, sensing.bandwidth.suspect_change
        finally:
            await edge.aclose()

    reason, estimate, suspect = asyncio.run(go())
    assert reason.startswith("timeout"), reason
    bound = stack.graph.input.bytes * 8 / 0.5e6  # 0.066 Mbit/s: the bytes over the whole wait
    assert 0.02 <= estimate <= 1.5 * bound, estimate
    assert suspect  # a step down: the idle link is probed soon


def test_a_frame_that_shares_the_link_with_a_probe_gives_no_sample(stack: Stack) -> None:
    """A probe (an unobserved upload, timed by its caller) is on a 0.1 Mbit/s link when a frame
    starts: the frame's body waits for the probe's to leave, so its own timing would read the
    link about half as fast as it is. It gives no sample; a frame alone on the link gives one.
    Before, the probe's bytes were invisible to the estimate and the frame's slow sample
    counted."""

    async def go() -> tuple[float | None, float | None, int]:
        sensing = Sensing(prior_mbps=0.1, fixed_load=0.0)
        edge = EdgeLink(stack.graph, WorkerTrust(None, [stack.edge.url]), sensing, shaper=ShapedUplink(0.1))
        x = {stack.graph.input.name: stack.frames(1, seed=5)[0].x}
        try:
            probe = asyncio.create_task(edge.infer(stack.edge.url, x, "final", 10.0, observe=False))
            await asyncio.sleep(0.01)
            shared = await edge.infer(stack.edge.url, x, "final", 10.0)
            await probe
            alone = await edge.infer(stack.edge.url, x, "final", 10.0)
            return shared.sample_mbps, alone.sample_mbps, sensing.bandwidth.samples
        finally:
            await edge.aclose()

    shared, alone, samples = asyncio.run(go())
    assert shared is None and samples == 1, (shared, samples)
    assert alone is not None and 0.05 < alone <= 0.11, alone


def test_a_timeout_after_the_worker_reported_a_long_queue_leaves_the_estimate(stack: Stack) -> None:
    """The worker's last answer spent 400 ms in its queue: a later upload timing out after 0.5 s
    may have waited on the worker, not the link, so it bounds nothing (the estimate stays)."""
    proxy = LyingProxy(stack.edge.url, ["queue_ms 400"])

    with serve_app_in_thread(proxy) as url:

        async def go() -> float:
            sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
            edge = EdgeLink(stack.graph, WorkerTrust(None, [url]), sensing, shaper=ShapedUplink(0.02))
            x = {stack.graph.input.name: stack.frames(1, seed=4)[0].x}
            try:
                await edge.infer(url, x, "final", 10.0, observe=False)  # answered, "queued 400 ms"
                with pytest.raises(EdgeFailure):
                    await edge.infer(url, x, "final", 0.5)
                return sensing.bandwidth.estimate_mbps
            finally:
                await edge.aclose()

        assert asyncio.run(go()) == 5.0
    assert proxy.told == ["queue_ms 400"]


def test_after_a_failed_probe_a_slow_link_is_still_measured(stack: Stack) -> None:
    """An idle link dropped to 0.05 Mbit/s while the estimate says 5: the probe pair does not
    finish within the probe timeout (0.5 s; the input alone takes ~0.7 s). The next probe is
    the input alone with a longer timeout, so it finishes and the estimate reaches the link
    (where a pair sized from a stale estimate would time out for ever)."""

    async def go() -> tuple[list[float | None], float]:
        sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
        url = stack.edge.url
        edge = EdgeLink(stack.graph, WorkerTrust(None, [url]), sensing, shaper=ShapedUplink(0.05))
        prober = LinkProber(edge, stack.graph, sensing, timeout_s=0.5)
        try:
            samples = [await prober.probe(url) for _ in range(2)]
            return samples, sensing.bandwidth.estimate_mbps
        finally:
            await edge.aclose()

    samples, estimate = asyncio.run(go())
    assert samples[0] is None and samples[1] is not None, samples
    assert 0.025 <= samples[1] <= 0.1 and 0.025 <= estimate <= 0.1, (samples, estimate)


def test_a_busy_workers_retry_after_rests_it_and_is_no_sign_of_a_slow_link(stack: Stack) -> None:
    """A worker answers a probe 503 with `Retry-After: 3`: the device rests it about 3 s (the
    sensing loop probes no worker that rests, and frames skip it), and the next probe is a pair
    again, not the lone upload that follows a link too slow for a pair."""
    standin = Standin()
    busy = {"error": "busy"}
    standin.answer(json.dumps(busy), status=503, retry_after="3")

    async def go(url: str) -> tuple[float | None, bool, float, int]:
        sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
        edge = EdgeLink(stack.graph, WorkerTrust(None, [url]), sensing)
        prober = LinkProber(edge, stack.graph, sensing)
        try:
            t0 = time.monotonic()
            sample = await prober.probe(url)
            return sample, edge.resting(url, t0 + 2.5), edge.backoff_of(url).until - t0, prober.failures
        finally:
            await edge.aclose()

    with serve_app_in_thread(standin.app) as url:
        sample, resting, until, failures = asyncio.run(go(url))
    assert sample is None and len(standin.requests) == 1
    assert resting and 2.9 <= until <= 3.5, until
    assert failures == 0


def test_frames_in_flight_take_a_slow_uplink_in_turn_each_within_the_workers_body_timeout(stack: Stack) -> None:
    """Four frames in flight on a 0.064 Mbit/s uplink, to a worker that reads a body for at
    most 1.2 s. One input's bytes take about 0.5 s of link; four bodies sharing the link would
    each take about 2 s and all be refused (408). Taken in turn, every frame is answered, the
    first after about one body's time, in the order they were sent."""
    rate = 0.064
    body_s = stack.graph.input.bytes * 8 / (rate * 1e6)
    assert 0.3 < body_s < 0.8, body_s  # the input is a few kB: 4 bodies > 1.2 s > 1 body
    frames = stack.frames(4, seed=31)
    worker = start_edge(stack.artifact, None, stack.edge_loaded, settings_kw={"body_timeout_s": 1.2})

    async def go() -> list[tuple[int, float]]:
        sensing = Sensing(prior_mbps=rate, fixed_load=0.0)
        edge = EdgeLink(stack.graph, WorkerTrust(None, [worker.url]), sensing, shaper=ShapedUplink(rate))
        done: list[tuple[int, float]] = []
        t0 = time.monotonic()

        async def one(i: int) -> None:
            await edge.infer(worker.url, {stack.graph.input.name: frames[i].x}, "final", 10.0)
            done.append((i, time.monotonic() - t0))

        try:
            await asyncio.gather(*(one(i) for i in range(len(frames))))
        finally:
            await edge.aclose()
        return done

    try:
        done = asyncio.run(go())
    finally:
        worker.stop()
    assert [i for i, _ in done] == [0, 1, 2, 3], done
    assert done[0][1] < 2 * body_s, (done, body_s)  # shared, the first would finish after ~4 bodies
    assert done[-1][1] >= 3.5 * body_s, (done, body_s)  # and the link's rate still holds


def test_a_body_that_waited_for_its_turn_is_booked_from_where_the_one_ahead_ended() -> None:
    """Two one-chunk bodies (1,024 bytes: 20 ms each) on a 51.2 kB/s uplink already booked 50 ms
    ahead; the second waits for its turn, and the first hands the link over 2 ms late (a busy
    event loop's wake-up). The second body's chunk is booked to end exactly 50 + 20 + 20 ms
    after that first booking: it paced on from the first one's end. (Booked from its own late
    start, it would end 2 ms later or more: on a fast stream that gap came on every body.) The
    booking is read from the shaper (`reserve(0)`: how long the link is still booked) while the
    chunk still waits to leave, and the wall-clock readings that enter bracket calls that do
    not wait."""
    rate = 51_200  # bytes/s: a chunk is MIN_CHUNK (1,024 bytes), 20 ms of link

    async def go() -> tuple[float, float, float, bool, bool]:
        shaper = ShapedUplink(rate * 8 / 1e6, burst_bytes=0)
        link = asyncio.Lock()
        ahead, behind = Upload(shaper, link), Upload(shaper, link)
        assert shaper.chunk_bytes() == 1024
        t_a = time.monotonic()
        shaper.reserve(2_560)  # the link is busy for 50 ms from t in [t_a, t_b]
        t_b = time.monotonic()
        await ahead.take_turn(5.0)
        turn = asyncio.create_task(behind.take_turn(5.0))
        await asyncio.sleep(0)  # it now waits for the link
        chunks = ahead.body(b"a" * 1024).__aiter__()
        assert len(await chunks.__anext__()) == 1024
        await asyncio.sleep(0.002)  # the late hand-over
        with pytest.raises(StopAsyncIteration):
            await chunks.__anext__()  # its body is done: the link passes on
        await turn
        leaving = asyncio.create_task(behind.body(b"b" * 1024).__aiter__().__anext__())
        while shaper.bytes_sent < 2_560 + 2 * 1024:  # until its chunk is booked
            await asyncio.sleep(0)
        t_c = time.monotonic()
        booked_until = t_c + shaper.reserve(0)
        assert len(await leaving) == 1024
        return t_a, t_b, booked_until, ahead.queued, behind.queued

    t_a, t_b, booked_until, ahead_queued, behind_queued = asyncio.run(go())
    assert not ahead_queued and behind_queued
    end = (2_560 + 2 * 1024) / rate
    assert t_a + end - 5e-4 <= booked_until <= t_b + end + 5e-4, (booked_until - t_a, end)


def test_a_frame_whose_turn_on_the_uplink_comes_too_late_fails_sending_nothing(stack: Stack) -> None:
    """A frame with a 0.2 s timeout waits behind a body that holds a 0.064 Mbit/s uplink for
    about 0.5 s: it fails naming the wait, with no byte sent and the worker not at fault (it was
    never contacted), and the frame ahead of it is still answered."""
    rate = 0.064
    frames = stack.frames(2, seed=32)
    name = stack.graph.input.name

    async def go() -> tuple[EdgeFailure, int]:
        edge = EdgeLink(stack.graph, WorkerTrust(None, [stack.edge.url]), Sensing(rate, fixed_load=0.0),
                        shaper=ShapedUplink(rate))  # fmt: skip
        try:
            ahead = asyncio.create_task(edge.infer(stack.edge.url, {name: frames[0].x}, "final", 10.0))
            await asyncio.sleep(0.05)
            with pytest.raises(EdgeFailure) as late:
                await edge.infer(stack.edge.url, {name: frames[1].x}, "final", 0.2)
            return late.value, (await ahead).logits.shape[0]
        finally:
            await edge.aclose()

    late, rows = asyncio.run(go())
    assert "waiting for the uplink" in late.reason, late.reason
    assert late.bytes_sent == 0 and not late.worker_fault
    assert rows == 1


def test_a_client_in_use_stays_open_while_workers_past_the_cap_are_contacted(stack: Stack) -> None:
    """A frame in flight to one worker (a proxy that holds it) while the device contacts
    MAX_CLIENTS other workers (closed ports, each refused at once): opening their clients
    closes only idle ones, the least recently used first, so the held frame is answered when
    the proxy lets it go (its client was the least recently used); never more than MAX_CLIENTS
    are open."""
    x = {stack.graph.input.name: stack.loaded.example_input()}
    proxy = HangingProxy(stack.edge.url)
    others = []
    for _ in range(edge_module.MAX_CLIENTS + 1):
        sock = bind_free_socket()
        others.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
        sock.close()
    with serve_app_in_thread(proxy) as held_url:

        async def go() -> tuple[torch.Tensor, list[str], list[int]]:
            edge = EdgeLink(stack.graph, WorkerTrust(None, [held_url, *others]), Sensing(fixed_load=0.0))
            proxy.hanging = True
            held = asyncio.create_task(edge.infer(held_url, x, "final", 30.0))
            while proxy.held == 0:
                await asyncio.sleep(0.01)
            reasons, open_clients = [], []
            for url in others:
                if url == others[-1]:
                    proxy.hanging = False
                    logits = (await held).logits
                try:
                    await edge.infer(url, x, "final", 5.0)
                except EdgeFailure as exc:
                    reasons.append(exc.reason)
                open_clients.append(len(edge._clients))
            await edge.aclose()
            return logits, reasons, open_clients

        logits, reasons, open_clients = asyncio.run(go())
    assert logits.shape[0] == 1
    assert len(reasons) == len(others) and all("HTTP" not in r for r in reasons), reasons
    assert open_clients == [min(i + 2, edge_module.MAX_CLIENTS) for i in range(len(others))]


class HeldLive:
    """An ASGI app answering every request 200 with an empty body, once `hold` is clear."""

    def __init__(self, hold: threading.Event) -> None:
        self.hold = hold

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await answer_lifespan(receive, send)
        while self.hold.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def test_clients_closed_past_the_cap_leave_the_cache_before_any_is_awaited(stack: Stack) -> None:
    """MAX_CLIENTS + 2 workers probed at once (held until all are in flight) leave that many
    idle clients with open connections; then two new workers and one of the least recently used
    are probed at once. Each opening closes idle clients past the cap, and while one close is
    awaited the others must neither take the same clients again (a KeyError escaped the probe)
    nor pick up one being closed (its probe failed): every probe answers, and MAX_CLIENTS
    clients are left open."""
    cap = edge_module.MAX_CLIENTS
    hold = threading.Event()
    with contextlib.ExitStack() as servers:
        urls = [servers.enter_context(serve_app_in_thread(HeldLive(hold))) for _ in range(cap + 4)]
        held, new = urls[: cap + 2], urls[cap + 2 :]

        async def go() -> tuple[list[Any], list[Any], int]:
            edge = EdgeLink(stack.graph, WorkerTrust(None, urls), Sensing(fixed_load=0.0))
            hold.set()
            first = [asyncio.create_task(edge.round_trip_ms(u)) for u in held]
            while len(edge._clients) < len(held):
                await asyncio.sleep(0.01)
            hold.clear()
            firsts = await asyncio.gather(*first, return_exceptions=True)
            then = await asyncio.gather(*(edge.round_trip_ms(u) for u in (*new, held[1])), return_exceptions=True)
            left = len(edge._clients)
            await edge.aclose()
            return firsts, then, left

        firsts, then, left = asyncio.run(go())
    assert all(isinstance(r, float) for r in firsts), firsts
    assert all(isinstance(r, float) for r in then), then
    assert left == cap


def test_a_frame_cancelled_while_clients_close_leaves_none_open(stack: Stack) -> None:
    """MAX_CLIENTS + 2 idle clients with open connections; a frame to a new worker starts
    closing the three past the cap and is cancelled meanwhile (as the runtime cancels frames
    at shutdown): every client is closed once the link is, none left open outside the cache."""
    cap = edge_module.MAX_CLIENTS
    hold = threading.Event()
    with contextlib.ExitStack() as servers:
        urls = [servers.enter_context(serve_app_in_thread(HeldLive(hold))) for _ in range(cap + 3)]

        async def go() -> list[bool]:
            edge = EdgeLink(stack.graph, WorkerTrust(None, urls), Sensing(fixed_load=0.0))
            hold.set()
            first = [asyncio.create_task(edge.round_trip_ms(u)) for u in urls[:-1]]
            while len(edge._clients) < len(first):
                await asyncio.sleep(0.01)
            hold.clear()
            assert all(isinstance(r, float) for r in await asyncio.gather(*first))
            opened = list(edge._clients.values())
            frame = asyncio.create_task(edge.round_trip_ms(urls[-1]))
            while len(edge._clients) > cap:  # the frame has taken the clients it closes
                await asyncio.sleep(0)
            frame.cancel()
            await asyncio.gather(frame, return_exceptions=True)
            await edge.aclose()
            await asyncio.sleep(0.5)  # the closes run on, shielded from the frame's cancellation
            return [c._http.is_closed for c in opened]

        closed = asyncio.run(go())
    assert all(closed), closed

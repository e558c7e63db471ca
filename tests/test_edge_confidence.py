"""The edge worker's `confidence: true`: a real uvicorn server on loopback serving the shipped
ResNet-18 artifact (calibrated thresholds) and a zoo model (none), real Fashion-MNIST test frames,
the device part run locally, requests through the SDK (`dapdee.client`).

Each answered row must be what the core progressive run (`dapdee.progressive_run`) gives for the
same cut: the exit that answered (`exits_taken`) and that exit's logits, for multi-row requests
whose rows leave at different heads and for concurrent one-row requests batched together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import torch

from dapdee import data as D
from dapdee import wire
from dapdee.client import ApiError, AsyncEdgeClient, EdgeClient
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.config import Settings
from dapdee.models import LoadedModel, load_model
from dapdee.progressive_run import Sides, run_part, split_sides
from dapdee.testing import serve_app_in_thread
from tests.test_progressive_run import RESNET


@pytest.fixture(scope="module")
def resnet() -> LoadedModel:
    return load_model("", weights=RESNET)


@pytest.fixture(scope="module")
def plain() -> LoadedModel:
    return load_model("zoo:alexnet?width=0.25")


@pytest.fixture(scope="module")
def url(resnet: LoadedModel, plain: LoadedModel) -> Iterator[str]:
    settings = Settings(batch_max=8, batch_wait_ms=150.0, max_batch_rows=64)
    with serve_app_in_thread(create_app(settings, [resnet, plain])) as base:
        yield base


@pytest.fixture(scope="module")
def frames(resnet: LoadedModel) -> torch.Tensor:
    images, _ = D.load_raw("fashion-mnist", "test", limit=96)
    return D.capture_frames(images, resnet.input_shape, resnet.manifest["preprocess"])


def split_cut(m: LoadedModel) -> Sides:
    """The cut after layer1: exit1's head on the device, exit2 and exit3 on the edge."""
    g = m.graph
    dev = set(g.ancestors(g.exit("exit1").node)) & set(g.ancestors(g.exit("final").node))
    return split_sides(g, "final", dev)


def sent_values(m: LoadedModel, sides: Sides, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The device part, every row (no device head checked): the tensors it sends."""
    inp = m.graph.input.name
    with torch.inference_mode():
        out = m.executor.compute({inp: x}, list(sides.device_targets), allowed=set(sides.device.nodes))
    return {n: (x if n == inp else out[n]) for n in sides.transfer}


def reference(m: LoadedModel, sides: Sides, sent: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """The core progressive run of the edge side on the same tensors."""
    with torch.inference_mode():
        run = run_part(m.executor, sent, sides.edge, [sides.exit_node])
    return run.answers(sides.exit, sides.exit_node)


def test_rows_of_one_request_leave_at_their_first_confident_head(
    url: str, resnet: LoadedModel, frames: torch.Tensor
) -> None:
    sides = split_cut(resnet)
    sent = sent_values(resnet, sides, frames[:48])
    want_exits, want_logits = reference(resnet, sides, sent)
    assert {"exit2", "exit3", "final"} <= set(want_exits)
    with EdgeClient(url, timeout=60) as edge:
        got = edge.infer(resnet.name, sent, exit="final", confidence=True)
        plain = edge.infer(resnet.name, sent, exit="final")
    assert got.exit == "final" and got.exits_taken is not None
    assert list(got.exits_taken) == want_exits
    torch.testing.assert_close(got.logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got.classes.tolist() == want_logits.argmax(1).tolist()
    # without the parameter: the planned exit for every row, no exits_taken
    assert plain.exits_taken is None and "exits_taken" not in plain.parameters.model_dump(exclude_none=True)
    with torch.inference_mode():
        whole = resnet.run_exit(frames[:48])
    torch.testing.assert_close(plain.logits, whole, rtol=1e-4, atol=1e-4)
    for r, e in enumerate(want_exits):  # a row that left early carries that head's logits
        with torch.inference_mode():
            head = resnet.run_exit(frames[r : r + 1], e)
        torch.testing.assert_close(got.logits[r : r + 1], head, rtol=1e-4, atol=1e-4)


def test_concurrent_rows_batched_together_each_get_their_own_exit(
    url: str, resnet: LoadedModel, frames: torch.Tensor
) -> None:
    """Eight one-row requests at once (edge-only: every head on the edge) share batches; each
    answer is its own row's."""
    inp = resnet.graph.input.name
    x = frames[48:56]
    everything_edge = split_sides(resnet.graph, "final", [])
    assert [h.exit for h in everything_edge.edge.heads] == ["exit1", "exit2", "exit3"]
    want_exits, want_logits = reference(resnet, everything_edge, {inp: x})

    async def go() -> list:
        async with AsyncEdgeClient(url, timeout=60) as edge:
            return await asyncio.gather(
                *(edge.infer(resnet.name, {inp: x[i : i + 1]}, confidence=True) for i in range(len(x)))
            )

    answers = asyncio.run(go())
    assert [a.exits_taken[0] for a in answers] == want_exits
    torch.testing.assert_close(torch.cat([a.logits for a in answers]), want_logits, rtol=1e-4, atol=1e-4)
    assert max(a.parameters.batch_size for a in answers) > 1


def test_bad_confidence_requests_are_refused_and_the_worker_stays_up(
    url: str, resnet: LoadedModel, plain: LoadedModel, frames: torch.Tensor
) -> None:
    with EdgeClient(url, timeout=60) as edge:
        x = torch.randn(1, *plain.input_shape[1:])
        with pytest.raises(ApiError) as exc:
            edge.infer(plain.name, {plain.graph.input.name: x}, confidence=True)
        assert exc.value.status == 400
        detail = exc.value.problem["detail"]
        assert "confidence" in detail and plain.name in detail and "calibrate" in detail
        assert edge.infer(plain.name, {plain.graph.input.name: x}).logits.shape[0] == 1
        ok = edge.infer(resnet.name, {resnet.graph.input.name: frames[:1]}, confidence=True)
        assert ok.exits_taken is not None and len(ok.exits_taken) == 1
    # a value that is not a boolean (the SDK only sends true)
    body, headers = wire.encode_request({resnet.graph.input.name: frames[:1]}, parameters={"confidence": "yes"})
    r = httpx.post(f"{url}/v2/models/{resnet.name}/infer", content=body, headers=headers, timeout=60)
    assert r.status_code == 400 and "confidence" in r.json()["error"]


def test_a_confidence_request_is_priced_at_the_nodes_each_row_ran(resnet: LoadedModel, frames: torch.Tensor) -> None:
    """The worker's capacity meter prices a confidence request as the walk ran it: per row, the
    edge side's nodes (the planner's split, in the cost graph's order) up to where the head it
    left at is checked, all of them for a row no head answered; plus the request cost. (It used
    to price none of it, while its event-loop time still counted as taken: κ rose, capacity
    fell.) Edge timings 1, 2, 3, ... ms per node make every node's share visible."""
    g = resnet.graph.with_timings("edge", {n.name: float(i + 1) for i, n in enumerate(resnet.graph.nodes)})
    sides = split_cut(resnet)
    sent = sent_values(resnet, sides, frames[:48])
    want_exits, _ = reference(resnet, sides, sent)
    app = create_app(Settings(batch_max=1, max_batch_rows=64), [resnet])
    with serve_app_in_thread(app) as base:
        state = app.state.worker
        entry = state.models[resnet.name]
        entry.graph = g
        before = state.capacity.priced_ms
        with EdgeClient(base, timeout=60) as edge:
            got = edge.infer(resnet.name, sent, exit="final", confidence=True)
        priced = state.capacity.priced_ms - before
    assert list(got.exits_taken or ()) == want_exits and len(set(want_exits)) >= 3
    order = {n.name: i for i, n in enumerate(g.nodes)}
    checked_at = {h.exit: order[h.after] for h in sides.edge.heads}

    def row_ms(exit_name: str) -> float:
        limit = checked_at.get(exit_name, len(order))
        return sum(g.node(n).edge_ms or 0.0 for n in sides.edge.nodes if order[n] <= limit)

    assert priced == pytest.approx(sum(row_ms(e) for e in want_exits) + entry.request_ms)

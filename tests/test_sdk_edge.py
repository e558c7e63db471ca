"""The SDK's edge client (`dapdee.client.EdgeClient`, `AsyncEdgeClient`) against a real edge
worker (uvicorn on 127.0.0.1, role tokens, a real width-0.25 AlexNet): binary and JSON bodies,
FP32 / FP16 / INT8 on the wire, a real cut from the device's own executor, every exit, health
and metadata, errors with status and message, and answers off the contract (wrong types,
negative or non-finite timings, outputs of an unexpected shape) refused as ProtocolError."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import torch

from dapdee import wire
from dapdee.client import (
    ApiError,
    AsyncEdgeClient,
    EdgeClient,
    ProtocolError,
    RequestError,
    TransportError,
    infer_call,
)
from dapdee.costmodel import partition
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.config import Settings
from dapdee.models import LoadedModel, load_model
from dapdee.netem import ShapedUplink
from dapdee.testing import serve_app_in_thread
from tests.standin import Standin, answer_bytes

SPEC = "zoo:alexnet?width=0.25"
MODEL = "alexnet"
TOKENS = {"device": "sdk-edge-device-" + "d" * 12, "worker": "sdk-edge-worker-" + "w" * 12}
# |logits - fp32 logits| <= TOL * (1 + max|logit|) per wire dtype (FP32: float rounding only)
TOL = {"FP32": 1e-4, "FP16": 2e-2, "INT8": 1e-1}


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(SPEC)


@pytest.fixture(scope="module")
def url(model: LoadedModel) -> Iterator[str]:
    settings = Settings(device_token=TOKENS["device"], worker_token=TOKENS["worker"], batch_max=4)
    with serve_app_in_thread(create_app(settings, [model])) as base:
        yield base


def local(model: LoadedModel, x: torch.Tensor, exit_name: str) -> torch.Tensor:
    """The exit's logits computed here, whole."""
    node = model.exit_node(exit_name)
    with torch.inference_mode():
        return model.executor.compute({model.input_name: x}, [node])[node]


def close(got: torch.Tensor, want: torch.Tensor, wire_dtype: str) -> bool:
    return float((got - want).abs().max()) <= TOL[wire_dtype] * (1 + float(want.abs().max()))


def test_infer_json_and_binary_in_each_wire_dtype(url: str, model: LoadedModel) -> None:
    x = model.example_input(torch.Generator().manual_seed(1))
    want = local(model, x, "final")
    sizes: dict[tuple[str, bool], int] = {}
    with EdgeClient(url, TOKENS["device"], timeout=30.0) as edge:
        for wire_dtype in ("FP32", "FP16", "INT8"):
            for binary in (True, False):
                res = edge.infer(MODEL, {"x": x}, exit="final", wire_dtype=wire_dtype, binary=binary, request_id="f7")
                assert res.model == MODEL and res.exit == "final" and res.id == "f7"
                assert res.logits.dtype == torch.float32 and close(res.logits, want, wire_dtype), wire_dtype
                assert torch.equal(res.classes, res.logits.argmax(dim=1))
                assert res.parameters.batch_size >= 1 and res.parameters.batch_rows >= 1
                assert all(math.isfinite(v) and v >= 0 for v in (res.queue_ms, res.compute_ms, res.server_ms))
                assert res.elapsed_ms > 0 and res.response_bytes > 0
                sizes[wire_dtype, binary] = res.request_bytes
    assert sizes["INT8", True] < sizes["FP16", True] < sizes["FP32", True] < sizes["FP32", False]


def test_a_real_cut_and_every_exit(url: str, model: LoadedModel) -> None:
    """The device half of the final exit's A(exit) runs here; its boundary tensors (3 rows)
    finish on the worker to the same logits; each exit answers from the input alone."""
    x = torch.stack([model.example_input(torch.Generator().manual_seed(s))[0] for s in range(3)])
    needed = model.graph.ancestors(model.exit_node("final"))
    part = partition(model.graph, "final", needed[: len(needed) // 2])
    names = [u for u, _ in part.transfer]
    with torch.inference_mode():
        out = model.executor.compute({"x": x}, [n for n in names if n != "x"], allowed=set(part.device_nodes))
    sent = {n: (x if n == "x" else out[n]) for n in names}
    assert "x" not in sent  # a real cut: the device ran the first half
    with EdgeClient(url, TOKENS["device"], timeout=30.0) as edge:
        res = edge.infer(MODEL, sent, exit="final", wire_dtype="FP16")
        assert res.logits.shape == (3, 10) and res.parameters.batch_rows >= 3
        assert close(res.logits, local(model, x, "final"), "FP16")
        for e in model.graph.exits:
            got = edge.infer(MODEL, {"x": x}, exit=e.name, version="1")
            assert got.exit == e.name and close(got.logits, local(model, x, e.name), "FP32")
        assert edge.infer(MODEL, {"x": x}).exit == model.graph.exits[-1].name  # default: the deepest


def test_health_and_metadata(url: str, model: LoadedModel) -> None:
    with EdgeClient(url) as public:
        assert public.live() and public.ready()
        assert public_error(public.metadata, MODEL).status == 401
    with EdgeClient(url, TOKENS["worker"]) as reader:
        assert reader.ready(MODEL) and reader.ready(MODEL, version="1")
        meta = reader.metadata(MODEL)
        assert meta.parameters.exits == [e.name for e in model.graph.exits]
        assert meta.inputs[0].name == "x" and meta.inputs[0].shape == [-1, *model.input_shape[1:]]
        assert reader.metadata(MODEL, version="1") == meta
        assert reader.server_metadata().models == [MODEL]
        err = public_error(reader.ready, "nope")
        assert err.status == 404 and "nope" in err.detail
        assert public_error(reader.metadata, MODEL, version="2").status == 404


def public_error(call: Any, *args: Any, **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args, **kw)
    return err.value


def test_edge_errors_carry_status_and_message(url: str, model: LoadedModel) -> None:
    x = model.example_input()
    with EdgeClient(url) as anonymous:
        err = public_error(anonymous.infer, MODEL, {"x": x})
        assert err.status == 401 and err.headers["www-authenticate"] == "Bearer" and '"error"' in err.body
    with EdgeClient(url, TOKENS["worker"]) as worker:
        assert public_error(worker.infer, MODEL, {"x": x}).status == 403
    with EdgeClient(url, TOKENS["device"]) as edge:
        err = public_error(edge.infer, MODEL, {"nope": x})
        assert err.status == 400 and "'nope'" in err.detail and err.problem == {"detail": err.detail}
        err = public_error(edge.infer, MODEL, {"x": x}, exit="exit9")
        assert err.status == 400 and "exit9" in err.detail
        assert public_error(edge.infer, "nope", {"x": x}).status == 404
        for bad in (
            lambda: edge.infer(MODEL, {}),
            lambda: edge.infer(MODEL, {"x": torch.tensor(1.0)}),
            lambda: edge.infer(MODEL, {"x": x, "y": torch.zeros(2, 3)}),
            lambda: edge.infer(MODEL, {"x": x}, wire_dtype="BF16"),
            lambda: edge.infer(MODEL, {"x": torch.full_like(x, float("nan"))}, binary=False),
            lambda: edge.infer("../v2", {"x": x}),
            lambda: edge.infer(MODEL, {"x": x}, timeout=float("inf")),
            lambda: edge.infer(MODEL, {"x": x}, exits="final"),  # type: ignore[call-arg]
        ):
            with pytest.raises(RequestError):
                bad()
        # INT8 cannot carry NaN or Inf (they would arrive as ordinary numbers); FP16 makes Inf of 1e5
        for value, wire_dtype, binary in ((math.nan, "INT8", True), (math.inf, "INT8", False), (1e5, "FP16", True)):
            with pytest.raises(RequestError, match=f"inputs 'x': .*{wire_dtype}"):
                edge.infer(MODEL, {"x": torch.full_like(x, value)}, wire_dtype=wire_dtype, binary=binary)
        assert edge.live()  # still serving
    with EdgeClient(url, TOKENS["device"]) as edge:
        err = public_error(edge.infer, MODEL, {"x": torch.full_like(x, float("nan"))}, wire_dtype="FP16")
        assert err.status == 400 and "NaN or Inf" in err.detail  # FP16 carries NaN: the worker refuses it


# ---- answers off the contract ----------------------------------------------------------------------


def _answer(**change: Any) -> bytes:
    """An infer answer for 1 row of 10 classes (JSON outputs), with `change` applied to its
    parameters (`params`), outputs (`logits`, `cls`) or header fields."""
    params = {"exit": "final", "queue_ms": 0.5, "compute_ms": 1.0, "server_ms": 2.0, "batch_size": 1, "batch_rows": 1}
    params.update(change.pop("params", {}))
    logits = change.pop("logits", torch.zeros(1, 10))
    cls = change.pop("cls", torch.zeros(1, dtype=torch.int64))
    body, _ = wire.encode_response("alexnet", {"logits": logits, "class": cls}, binary=False, request_id="r1")
    return answer_bytes({**json.loads(body), "parameters": params, **change})


OFF_CONTRACT: dict[str, dict[str, Any]] = {
    "negative queue_ms": {"params": {"queue_ms": -1.0}},
    "NaN compute_ms": {"params": {"compute_ms": float("nan")}},
    "infinite server_ms": {"params": {"server_ms": float("inf")}},
    "queue_ms as a string": {"params": {"queue_ms": "0.5"}},
    "batch_size as a bool": {"params": {"batch_size": True}},
    "batch_rows as a float": {"params": {"batch_rows": 1.0}},
    "no exit": {"params": {"exit": None}},
    "another exit": {"params": {"exit": "exit1"}},
    "fewer batch rows than sent": {"params": {"batch_rows": 0}},
    "two rows for one": {"logits": torch.zeros(2, 10), "cls": torch.zeros(2, dtype=torch.int64)},
    "1-D logits": {"logits": torch.zeros(10)},
    "integer logits": {"logits": torch.zeros(1, 10, dtype=torch.int64)},
    "FP64 logits beyond FP32": {  # finite as sent, Inf as the FP32 the client returns
        "outputs": [
            {"name": "logits", "shape": [1, 10], "datatype": "FP64", "data": [1e300] * 10},
            {"name": "class", "shape": [1], "datatype": "INT64", "data": [0]},
        ]
    },
    "class out of range": {"cls": torch.tensor([10])},
    "class as floats": {"cls": torch.zeros(1)},
    "another model": {"model_name": "vgg16"},
    "another id": {"id": "r2"},
}


@pytest.mark.parametrize("case", sorted(OFF_CONTRACT))
def test_answers_off_the_contract_are_protocol_errors(
    case: str, model: LoadedModel, standin_url: tuple[Standin, str]
) -> None:
    standin, base = standin_url
    with EdgeClient(base) as edge:
        standin.answer(_answer())  # the untouched answer is accepted
        ok = edge.infer(MODEL, {"x": model.example_input()}, exit="final", request_id="r1")
        assert ok.queue_ms == 0.5 and ok.classes.tolist() == [0]
        standin.answer(_answer(**OFF_CONTRACT[case]))
        with pytest.raises(ProtocolError) as err:
            edge.infer(MODEL, {"x": model.example_input()}, exit="final", request_id="r1")
        assert err.value.status == 200 and err.value.detail


@pytest.fixture(scope="module")
def standin_url() -> Iterator[tuple[Standin, str]]:
    standin = Standin()
    with serve_app_in_thread(standin.app) as base:
        yield standin, base


def test_missing_outputs_and_garbage_are_protocol_errors(model: LoadedModel, standin_url: tuple[Standin, str]) -> None:
    standin, base = standin_url
    only_logits, _ = wire.encode_response("alexnet", {"logits": torch.zeros(1, 10)}, binary=False)
    with EdgeClient(base) as edge:
        for body in (only_logits, b"{not json", b'{"outputs": 3}'):
            standin.answer(body)
            with pytest.raises(ProtocolError):
                edge.infer(MODEL, {"x": model.example_input()})


def test_a_calls_timeout_goes_to_the_worker_as_parameter_timeout(
    url: str, model: LoadedModel, standin_url: tuple[Standin, str]
) -> None:
    """An infer call's timeout is sent as parameter `timeout`, in microseconds rounded up (the
    worker never gives up on a request before its client does); a call built without one
    sends none, and the clients send their own timeout when the call gives none. The worker
    takes it: the answer is 200."""
    for timeout, want in ((0.25, 250_000), (1e-7, 1), (None, None)):
        call = infer_call(MODEL, {"x": model.example_input()}, timeout=timeout)
        header = json.loads(call.content[: int(call.headers[wire.HEADER_LENGTH])])
        assert header.get("parameters", {}).get("timeout") == want, (timeout, header)
    standin, base = standin_url

    def sent_timeout() -> Any:
        body = standin.requests[-1].body
        return json.loads(body[: int(standin.requests[-1].headers[wire.HEADER_LENGTH.lower()])])["parameters"][
            "timeout"
        ]

    async def in_async() -> None:
        async with AsyncEdgeClient(base, timeout=3.0) as edge:
            await edge.infer(MODEL, {"x": model.example_input()})

    standin.answer(_answer())
    with EdgeClient(base, timeout=7.0) as edge:
        edge.infer(MODEL, {"x": model.example_input()})
        assert sent_timeout() == 7_000_000
        edge.infer(MODEL, {"x": model.example_input()}, timeout=2.0)
        assert sent_timeout() == 2_000_000
    asyncio.run(in_async())
    assert sent_timeout() == 3_000_000
    with EdgeClient(url, TOKENS["device"]) as edge:
        assert edge.infer(MODEL, {"x": model.example_input()}, timeout=30.0).exit == "final"


# ---- async, a shaped uplink, total deadlines --------------------------------------------------------


def test_async_infer_through_a_shaped_uplink_and_deadlines(url: str, model: LoadedModel) -> None:
    x = model.example_input(torch.Generator().manual_seed(3))
    want = local(model, x, "exit2")

    async def stalled(body: bytes) -> AsyncIterator[bytes]:
        yield body[:10]
        await asyncio.sleep(3600)  # an uplink that stops: only the total deadline ends the call
        yield body[10:]

    async def main() -> None:
        async with AsyncEdgeClient(url, TOKENS["device"], timeout=30.0) as edge:
            assert await edge.live() and await edge.ready(MODEL)
            uplink = ShapedUplink(200.0, rtt_ms=1.0)
            res = await edge.infer(MODEL, {"x": x}, exit="exit2", wire_dtype="INT8", uplink=uplink.shaped_body)
            assert res.exit == "exit2" and close(res.logits, want, "INT8")
            many = await asyncio.gather(*(edge.infer(MODEL, {"x": x}, exit="exit2") for _ in range(4)))
            assert all(close(r.logits, want, "FP32") for r in many)
            assert (await edge.metadata(MODEL)).name == MODEL and (await edge.server_metadata()).models == [MODEL]
            with pytest.raises(TransportError) as err:
                await edge.infer(MODEL, {"x": x}, timeout=0.5, uplink=stalled)
            assert err.value.timeout
            with pytest.raises(ApiError) as api:
                await edge.infer(MODEL, {"x": x}, exit="nope")
            assert api.value.status == 400

    asyncio.run(main())


def test_sync_infer_streams_through_an_uplink(url: str, model: LoadedModel) -> None:
    x = model.example_input()

    def chunks(body: bytes) -> Iterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    with EdgeClient(url, TOKENS["device"], timeout=30.0) as edge:
        res = edge.infer(MODEL, {"x": x}, uplink=chunks)
        assert close(res.logits, local(model, x, "final"), "FP32")

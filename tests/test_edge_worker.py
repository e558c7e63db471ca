"""Edge worker end to end: a real uvicorn server on loopback, real zoo models (width 0.25),
device parts run locally with the split executor, boundary tensors sent over the v2 protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dapdee import wire
from dapdee.api.oip import InferRequest
from dapdee.client import PlannerClient
from dapdee.costgraph import CostGraph
from dapdee.costmodel import Partition, partition
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.config import Settings
from dapdee.models import LoadedModel, load_model
from dapdee.planner.app import create_app as create_planner
from dapdee.planner.config import Settings as PlannerSettings
from dapdee.testing import ServerThread, free_port, serve_app_in_thread, wait_registered
from dapdee.web import scrape

ZOO_MODELS = ("alexnet", "vgg16", "resnet18", "inception")
FP16_TOL = 2e-2  # |fp16-sent logits - fp32 logits| <= FP16_TOL * (1 + max|logit|)


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return {n: load_model(f"zoo:{n}?width=0.25") for n in ZOO_MODELS}


@pytest.fixture(scope="module")
def worker(models: dict[str, LoadedModel]) -> Any:
    settings = Settings(batch_max=8, batch_wait_ms=5.0, max_body_bytes=4 << 20, max_elements=1 << 22)
    with serve_app_in_thread(create_app(settings, list(models.values()))) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def cuts(m: LoadedModel, exit_name: str) -> list[Partition]:
    """Edge-only, a third and two thirds of A(exit) on the device (topological prefixes are
    downward closed)."""
    needed = m.graph.ancestors(m.exit_node(exit_name))
    return [partition(m.graph, exit_name, needed[:k]) for k in (0, len(needed) // 3, 2 * len(needed) // 3)]


def device_part(m: LoadedModel, part: Partition, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the partition's device side locally; the boundary tensors it sends, by node name."""
    names = [u for u, _ in part.transfer]
    nodes = [n for n in names if n != m.input_name]
    with torch.inference_mode():
        out = m.executor.compute({m.input_name: x}, nodes, allowed=set(part.device_nodes)) if nodes else {}
    return {n: (x if n == m.input_name else out[n]) for n in names}


def infer(
    client: httpx.Client, model: str, inputs: dict[str, torch.Tensor], exit_name: str | None = None, **kw: Any
) -> httpx.Response:
    params = {"exit": exit_name} if exit_name else {}
    body, headers = wire.encode_request(inputs, parameters=params, **kw)
    return client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def logits_of(r: httpx.Response) -> wire.DecodedResponse:
    assert r.status_code == 200, r.text
    return wire.decode_response(r.content, r.headers)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return scrape.total(scrape.parse(text), name, **labels)


# ---- metadata and health ------------------------------------------------------------------


def test_health_and_metadata(worker: httpx.Client, models: dict[str, LoadedModel]) -> None:
    assert worker.get("/v2/health/live").status_code == 200
    assert worker.get("/v2/health/ready").status_code == 200
    meta = worker.get("/v2").json()
    assert meta["name"] == "dapdee-edge" and "binary_tensor_data" in meta["extensions"]
    for name, m in models.items():
        assert worker.get(f"/v2/models/{name}/ready").status_code == 200
        md = worker.get(f"/v2/models/{name}").json()
        assert md["name"] == name and md["platform"] == "pytorch"
        assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
        assert [o["name"] for o in md["outputs"]] == ["logits", "class"]
        assert md["parameters"]["exits"] == [e.name for e in m.graph.exits]
    r = worker.get("/v2/models/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert worker.get("/v2/models/nope/ready").status_code == 404


# ---- correctness over models, exits, cuts and encodings ------------------------------------------


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_any_cut_any_exit_matches_whole_model(worker: httpx.Client, models: dict[str, LoadedModel], name: str) -> None:
    m = models[name]
    exits = [e.name for e in m.graph.exits]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for exit_name in dict.fromkeys([exits[0], exits[len(exits) // 2], exits[-1]]):
        ref = m.run_exit(x, exit_name)
        for part in cuts(m, exit_name):
            sent = device_part(m, part, x)
            for binary in (True, False):
                r = logits_of(infer(worker, name, sent, exit_name, binary=binary, binary_output=binary))
                assert r.parameters["exit"] == exit_name and r.parameters["compute_ms"] >= 0
                assert r.parameters["queue_ms"] >= 0
                assert torch.allclose(r.outputs["logits"], ref, atol=1e-5, rtol=0), (exit_name, part.transfer)
                assert torch.equal(r.outputs["class"], ref.argmax(1))
                r16 = logits_of(infer(worker, name, sent, exit_name, binary=binary, wire_dtype="FP16"))
                err = (r16.outputs["logits"] - ref).abs().max().item()
                assert err <= FP16_TOL * (1 + ref.abs().max().item()), (exit_name, part.transfer, err)
                top2 = ref.topk(2, dim=1).values
                clear = (top2[:, 0] - top2[:, 1]) > 2 * err  # argmax must agree where the margin exceeds the error
                assert torch.equal(r16.outputs["class"][clear], ref.argmax(1)[clear])


def test_raw_uint8_frames_from_any_cut_match_the_local_model() -> None:
    """A shipped artifact's graph takes the uint8 camera frame: Edge-Only ships it as UINT8 (1
    byte per pixel; the worker upcasts it and runs node `frame` itself), later cuts ship float
    tensors, and every cut answers what the whole model answers locally."""
    from dapdee import data as D

    art = Path(__file__).resolve().parent.parent / "artifacts" / "fmnist-alexnet"
    m = load_model("", weights=art)
    edge = load_model("", weights=art)
    assert m.graph.input.dtype == "uint8" and m.graph.input.bytes == 32 * 32
    images, labels = D.load_raw("fashion-mnist", "test", 16)
    frames = D.capture_frames(images, m.input_shape, m.manifest["preprocess"])
    ref = m.run_exit(frames)
    assert int((ref.argmax(1) == torch.as_tensor(labels)).sum()) >= 12  # a trained model
    with serve_app_in_thread(create_app(Settings(), [edge])) as url, httpx.Client(base_url=url, timeout=60) as client:
        for part in cuts(m, "final"):
            sent = device_part(m, part, frames)
            body, headers = wire.encode_request(sent, parameters={"exit": "final"})
            if not part.device_nodes:
                assert sent[m.input_name].dtype == torch.uint8
                assert len(body) < m.graph.input.bytes * len(frames) + 512
            r = logits_of(client.post(f"/v2/models/{m.name}/infer", content=body, headers=headers))
            assert torch.allclose(r.outputs["logits"], ref, atol=1e-4, rtol=0), part.transfer
            assert torch.equal(r.outputs["class"], ref.argmax(1))


def test_an_app_started_in_process_leaves_the_torch_thread_count_alone(models: dict[str, LoadedModel]) -> None:
    """`threads` is the process's setting: `dapdee serve edge` applies it, an app made in another
    process's code (`dapdee up`, a test) changes nothing process-wide."""
    before = fresh_thread_torch_threads()
    other = 2 if before == 1 else 1
    with serve_app_in_thread(create_app(Settings(threads=other), [models["alexnet"]])) as url:
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        assert fresh_thread_torch_threads() == before


def fresh_thread_torch_threads() -> int:
    """The torch thread count a new thread starts with: the process-wide setting (a thread that
    has computed keeps the count it started with, so the calling thread's own would not tell)."""
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


def test_default_exit_int8_and_all_on_device(worker: httpx.Client, models: dict[str, LoadedModel]) -> None:
    m = models["resnet18"]
    x = torch.randn(3, 3, 32, 32)
    ref = m.run_exit(x)
    r = logits_of(infer(worker, "resnet18", {"x": x}))  # no exit parameter: the final exit
    assert r.parameters["exit"] == "final" and torch.allclose(r.outputs["logits"], ref, atol=1e-5, rtol=0)
    r8 = logits_of(infer(worker, "resnet18", {"x": x}, wire_dtype="INT8"))
    assert r8.outputs["logits"].shape == ref.shape  # int8 is lossy; shape and sanity only
    assert (r8.outputs["logits"] - ref).abs().max() < 0.5 * (1 + ref.abs().max())
    node = m.exit_node("exit1")  # the exit itself sent: nothing left to compute
    out = m.run_exit(x, "exit1")
    r = logits_of(infer(worker, "resnet18", {node: out}, "exit1"))
    assert torch.equal(r.outputs["logits"], out)


def test_requested_outputs_and_id_echo(worker: httpx.Client) -> None:
    x = torch.randn(1, 3, 32, 32)
    header = {
        "id": "req-42",
        "parameters": {"exit": "exit1"},
        "inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x.flatten().tolist()}],
        "outputs": [{"name": "class"}],
    }
    r = worker.post("/v2/models/alexnet/infer", json=header)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["id"] == "req-42" and [o["name"] for o in body["outputs"]] == ["class"]
    assert body["outputs"][0]["datatype"] == "INT64"
    # per-output binary_data (the Triton / KServe key): a binary response holding only the logits
    header["outputs"] = [{"name": "logits", "parameters": {"binary_data": True}}]
    r = worker.post("/v2/models/alexnet/infer", json=header)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert int(r.headers[wire.HEADER_LENGTH]) < len(r.content)
    d = wire.decode_response(r.content, r.headers)
    assert list(d.outputs) == ["logits"] and d.id == "req-42" and d.outputs["logits"].shape == (1, 10)
    # a per-output binary_data false beats the request-level binary_data_output
    header["parameters"] = {"exit": "exit1", "binary_data_output": True}
    header["outputs"] = [{"name": "logits", "parameters": {"binary_data": False}}, {"name": "class"}]
    r = worker.post("/v2/models/alexnet/infer", json=header)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in _json_header(r)["outputs"]}
    assert "data" in outs["logits"] and outs["class"]["parameters"]["binary_data_size"] == 8
    # the request-level key on an output is refused, naming the standard one
    header["outputs"] = [{"name": "logits", "parameters": {"binary_data_output": True}}]
    r = worker.post("/v2/models/alexnet/infer", json=header)
    assert r.status_code == 400 and "'binary_data'" in r.json()["error"]


def test_null_parameters_mean_their_defaults(worker: httpx.Client) -> None:
    """Every optional parameter the OpenAPI schema lets be null (`InferRequest`): null is the
    default, as absent is: the deepest exit, no confidence heads, JSON outputs."""
    x = torch.randn(2, 3, 32, 32)
    plain = {"inputs": [{"name": "x", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": x.flatten().tolist()}]}
    nulls = {
        **plain,
        "parameters": {"exit": None, "confidence": None, "binary_data_output": None},
        "outputs": [{"name": "logits", "parameters": {"binary_data": None, "classification": None}}, {"name": "class"}],
    }
    InferRequest.model_validate(nulls)
    want = worker.post("/v2/models/alexnet/infer", json=plain)
    got = worker.post("/v2/models/alexnet/infer", json=nulls)
    assert want.status_code == 200 and got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("application/json")
    assert got.json()["parameters"]["exit"] == "final" and "exits_taken" not in got.json()["parameters"]
    assert {o["name"]: o["data"] for o in got.json()["outputs"]} == {
        o["name"]: o["data"] for o in want.json()["outputs"]
    }


def _json_header(r: httpx.Response) -> dict[str, Any]:
    """The JSON header of a v2 response (binary or not)."""
    n = int(r.headers.get(wire.HEADER_LENGTH, len(r.content)))
    return json.loads(r.content[:n])


# ---- batching and concurrency ------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_answered_individually(
    worker: httpx.Client, models: dict[str, LoadedModel]
) -> None:
    m = models["resnet18"]
    part = cuts(m, "final")[1]
    base = str(worker.base_url)
    n = 32
    xs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]
    sent = [device_part(m, part, x) for x in xs]
    refs = [m.run_exit(x) for x in xs]
    before = worker.get("/metrics").text

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:

            async def one(i: int) -> httpx.Response:
                body, headers = wire.encode_request(sent[i], request_id=f"c{i}")
                return await c.post("/v2/models/resnet18/infer", content=body, headers=headers)

            return await asyncio.gather(*(one(i) for i in range(n)))

    responses = asyncio.run(go())
    for i, r in enumerate(responses):
        d = logits_of(r)
        assert d.id == f"c{i}"
        assert torch.allclose(d.outputs["logits"], refs[i], atol=1e-4, rtol=1e-4), i
        assert 1 <= d.parameters["batch_size"] <= 8 and 1 <= d.parameters["batch_rows"] <= 16
    after = worker.get("/metrics").text
    # every request was computed in exactly one batch (how they grouped depends on timing:
    # tests/test_edge_security.py checks the grouping itself on the batcher, by counts)
    requests_in_batches = metric(after, "dapdee_edge_batch_size_sum", model="resnet18") - metric(
        before, "dapdee_edge_batch_size_sum", model="resnet18"
    )
    assert requests_in_batches == n


def test_a_request_cancelled_by_a_shutdown_past_its_grace_is_counted_499_not_500() -> None:
    """A request still computing (about 4 s: an edge emulated that much slower) when the server
    shuts down past its grace period (2 s here) has its handler cancelled. Nothing was answered:
    it is counted with status 499, not as a server error (500)."""
    model = load_model("zoo:alexnet?width=0.25")
    x = model.example_input()
    node = model.graph.exits[-1].node
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.executor.compute({model.input_name: x}, [node])
        times.append((time.perf_counter() - t0) * 1000.0)
    app = create_app(Settings(slowdown=4000.0 / min(times)), [model])
    server = ServerThread(app).start()
    state = app.state.worker
    body, headers = wire.encode_request({model.input_name: x})

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server goes away without an answer
            httpx.post(f"{server.url}/v2/models/{model.name}/infer", content=body, headers=headers, timeout=60)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 30.0
    while state.inflight < 1:
        assert time.monotonic() < deadline, "the request never reached the handler"
        time.sleep(0.01)
    server.stop(timeout_s=60.0)
    sender.join(60.0)

    def counted(status: str) -> float | None:
        labels = {"model": model.name, "exit": "_unknown", "status": status}
        return state.metrics.registry.get_sample_value("dapdee_edge_requests_total", labels)

    assert counted("499") == 1.0 and counted("500") is None


def test_a_request_the_closed_batcher_refuses_is_503_with_retry_after() -> None:
    """A request reaching a worker whose batcher has closed (it is shutting down) is answered
    503 with Retry-After, the device's cue to retry or go elsewhere, not 500; it is counted
    under its exit (known by then), not `_unknown`."""
    model = load_model("tests.edge_models:squares", input_shape=(1, 8))
    app = create_app(Settings(), [model])
    server = ServerThread(app).start()
    state = app.state.worker
    try:
        state.batcher.close()  # nothing is pending: no future to resolve on the loop
        body, headers = wire.encode_request({model.input_name: torch.randn(1, 8)})
        r = httpx.post(f"{server.url}/v2/models/{model.name}/infer", content=body, headers=headers, timeout=30)
    finally:
        server.stop()
    assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
    assert "shutting down" in r.json()["error"]
    labels = {"model": model.name, "exit": model.graph.exits[-1].name, "status": "503"}
    assert state.metrics.registry.get_sample_value("dapdee_edge_requests_total", labels) == 1.0


def test_metrics_move(worker: httpx.Client) -> None:
    before = worker.get("/metrics").text
    x = torch.randn(1, 3, 32, 32)
    logits_of(infer(worker, "vgg16", {"x": x}, "exit2"))
    assert infer(worker, "vgg16", {"zzz": x}, "exit2").status_code == 400
    assert infer(worker, "no-such-model", {"x": x}).status_code == 404
    after = worker.get("/metrics").text
    ok = dict(model="vgg16", exit="exit2", status="200")
    assert metric(after, "dapdee_edge_requests_total", **ok) == metric(before, "dapdee_edge_requests_total", **ok) + 1
    bad = dict(model="vgg16", exit="_unknown", status="400")  # refused while decoding, before the exit is read
    assert metric(after, "dapdee_edge_requests_total", **bad) == metric(before, "dapdee_edge_requests_total", **bad) + 1
    assert metric(after, "dapdee_edge_requests_total", model="_unknown", status="404") >= 1
    assert "no-such-model" not in after  # unknown names never become label values
    for name in (
        "received_bytes_total",
        "request_duration_seconds_count",
        "compute_duration_seconds_count",
        "queue_duration_seconds_count",
    ):
        assert metric(after, f"dapdee_edge_{name}", model="vgg16") > metric(
            before, f"dapdee_edge_{name}", model="vgg16"
        )
    assert 'dapdee_edge_model_info{exits="exit1,exit2,exit3,exit4,final"' in after
    assert "dapdee_edge_inflight_requests 0.0" in after


# ---- bad input ------------------------------------------------------------------------------------


def _raw(header: dict, payload: bytes = b"") -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + payload, {wire.HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def _x(shape: list[int], size: int | None = None, name: str = "x", dtype: str = "FP32") -> dict:
    n = 1
    for s in shape:
        n *= s
    return {
        "name": name,
        "shape": shape,
        "datatype": dtype,
        "parameters": {"binary_data_size": n * 4 if size is None else size},
    }


def _json_x(dtype: str, data: list[Any], **params: Any) -> bytes:
    """A JSON infer body with one input `x` of shape [1, 3, 32, 32]: `dtype`, `data`, `params`."""
    entry = {"name": "x", "shape": [1, 3, 32, 32], "datatype": dtype, "data": data, "parameters": params}
    return json.dumps({"inputs": [entry]}).encode()


def bad_cases(m: LoadedModel) -> list[tuple[str, bytes, dict[str, str], int, str]]:
    """(case, body, headers, status, text the error must contain) for resnet18 at width 0.25."""
    x = torch.randn(1, 3, 32, 32)
    good = x.numpy().tobytes()
    part = partition(m.graph, "final", m.graph.ancestors("layer1_0_conv2"))  # inside a residual block
    boundary = device_part(m, part, x)
    assert len(boundary) == 2  # the block's input and the conv2 output
    first, second = list(boundary)
    only_one = wire.encode_request({second: boundary[second]})  # the block's input is missing
    cases = [
        ("missing", *only_one, 400, f"boundary nodes {first}"),
        ("unknown node", *wire.encode_request({"nosuch": x}), 400, "unknown node"),
        ("wrong shape", *wire.encode_request({"x": torch.randn(1, 3, 16, 16)}), 400, "[batch, 3, 32, 32]"),
        ("wrong shape of a node", *wire.encode_request({"stem_2": torch.randn(1, 3, 32, 32)}), 400, "stem_2"),
        (
            "batch mismatch",
            *wire.encode_request({first: boundary[first].repeat(2, 1, 1, 1), second: boundary[second]}),
            400,
            "batch size",
        ),
        ("empty batch", *wire.encode_request({"x": torch.zeros(0, 3, 32, 32)}), 400, "at least 1"),
        ("nan", *wire.encode_request({"x": torch.full((1, 3, 32, 32), float("nan"))}), 400, "NaN"),
        ("unknown exit", *wire.encode_request({"x": x}, parameters={"exit": "exit9"}), 400, "unknown exit"),
        ("exit not a string", *wire.encode_request({"x": x}, parameters={"exit": 3}), 400, "unknown exit"),
        (
            "unknown output",
            json.dumps(
                {
                    "inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}],
                    "outputs": [{"name": "nope"}],
                }
            ).encode(),
            {},
            400,
            "unknown output",
        ),
        (
            "bad datatype",
            *_raw({"inputs": [{**_x([1, 3, 32, 32]), "datatype": "BYTES"}]}, good),
            400,
            "BYTES",
        ),
        ("truncated", *_raw({"inputs": [_x([1, 3, 32, 32])]}, good[:100]), 400, "truncated"),
        ("size mismatch", *_raw({"inputs": [_x([1, 3, 32, 32], size=100)]}, good), 400, "binary_data_size"),
        ("negative size", *_raw({"inputs": [_x([1, 3, 32, 32], size=-4)]}, good), 400, "binary_data_size"),
        ("overflow", *_raw({"inputs": [_x([2**31, 2**31, 2**31], size=0)]}), 400, "wrong shape"),
        ("too many rows", *_raw({"inputs": [_x([2**40, 3, 32, 32], size=0)]}), 413, "max_batch_rows=16"),
        (
            "duplicate",
            *_raw({"inputs": [_x([1, 3, 32, 32]), _x([1, 3, 32, 32])]}, good + good),
            400,
            "duplicate",
        ),
        ("non-object header", *_raw([1, 2]), 400, "JSON object"),  # type: ignore[arg-type]
        ("scale no float holds", _json_x("INT8", [1] * 3072, scale=10**400), {}, 400, "tensor 'x': scale"),
        ("int64 2**63 as a float", _json_x("INT64", [2.0**63] * 3072), {}, 400, "tensor 'x': values out of INT64"),
        ("not json", b"\xff\xfe garbage", {}, 400, "JSON"),
        ("header length > body", good[:10], {wire.HEADER_LENGTH: "1000"}, 400, "exceeds"),
        ("header length not a number", good, {wire.HEADER_LENGTH: "ten"}, 400, wire.HEADER_LENGTH),
        ("too big", b"0" * ((4 << 20) + 1), {}, 413, "limit"),
    ]
    return cases


def test_bad_requests_get_4xx_and_worker_keeps_serving(worker: httpx.Client, models: dict[str, LoadedModel]) -> None:
    m = models["resnet18"]
    x = torch.randn(1, 3, 32, 32)
    ref = m.run_exit(x)
    for case, body, headers, status, text in bad_cases(m):
        r = worker.post("/v2/models/resnet18/infer", content=body, headers=headers)
        assert r.status_code == status, (case, r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err, str) and text in err, (case, err)
        ok = logits_of(infer(worker, "resnet18", {"x": x}))  # the next valid request succeeds
        assert torch.allclose(ok.outputs["logits"], ref, atol=1e-5, rtol=0), case
    r = worker.post("/v2/models/nope/infer", content=b"{}")
    assert r.status_code == 404 and "nope" in r.json()["error"]


@pytest.mark.parametrize("second", ["same", "-1", "3"])
def test_an_inference_header_length_given_twice_is_400(worker: httpx.Client, second: str) -> None:
    """Two `Inference-Header-Content-Length` headers are refused whatever they say (the first
    was taken and the second ignored, even an invalid one): a proxy that took another would
    split the body elsewhere."""
    body, headers = wire.encode_request({"x": torch.randn(1, 3, 32, 32)})
    length = headers[wire.HEADER_LENGTH]
    pairs = [*headers.items(), (wire.HEADER_LENGTH, length if second == "same" else second)]
    r = worker.post("/v2/models/resnet18/infer", content=body, headers=pairs)
    assert r.status_code == 400 and wire.HEADER_LENGTH in r.json()["error"], r.text
    assert worker.post("/v2/models/resnet18/infer", content=body, headers=headers).status_code == 200


def test_streamed_body_over_limit(worker: httpx.Client) -> None:
    def chunks() -> Any:
        for _ in range(5):
            yield b"0" * (1 << 20)

    r = worker.post("/v2/models/resnet18/infer", content=chunks())  # chunked: no Content-Length
    assert r.status_code == 413
    assert worker.get("/v2/health/ready").status_code == 200


# auth, limits and overload: tests/test_edge_security.py; stock v2 clients: tests/test_oip_conformance.py


# ---- planner registration ---------------------------------------------------------------------------


def _register_with(planner_url: str, model: LoadedModel, cache: Path) -> tuple[dict[str, Any], Any]:
    """Run a worker (tier cpu-test, public URL http://edge-1:8000, profile cache `cache`) until
    the planner at `planner_url` holds its model, edge profile and two of its heartbeats; its
    registration status, and the planner's worker list read before the worker stopped."""
    settings = Settings(
        planner_url=planner_url,
        tier="cpu-test",
        public_url="http://edge-1:8000",
        heartbeat_s=0.2,
        profile_repeats=1,
        profile_warmup=0,
        profile_cache=str(cache),
    )
    app = create_app(settings, [model])
    with serve_app_in_thread(app) as url:
        wait_registered(planner_url, model.name, ["http://edge-1:8000"], timeout_s=60, tier="cpu-test")
        deadline = time.monotonic() + 30
        while app.state.worker.registration["heartbeats"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=url) as c:
            assert c.get("/v2/health/ready").status_code == 200
        with PlannerClient(planner_url) as planner:
            live = planner.workers().workers
        return dict(app.state.worker.registration), live


def test_registers_profile_and_heartbeats(models: dict[str, LoadedModel], tmp_path: Path) -> None:
    """Against a real planner: the graph with edge timings, the tier's edge profile (meta names
    tier and worker) and heartbeats (URL, models, tier, load, capacity) arrive; the measured
    profile is cached and a restarted worker registers the cached one."""
    planner_settings = PlannerSettings(redis_url=None, worker_url_pattern=r"http://edge-1:8000")
    with serve_app_in_thread(create_planner(planner_settings)) as purl, PlannerClient(purl) as planner:
        status, live = _register_with(purl, models["alexnet"], tmp_path)
        assert status["heartbeats"] >= 2 and status["registered"] == ["alexnet"]
        graph = planner.get_model("alexnet").graph
        assert all(n.edge_ms is not None for n in graph.nodes)
        prof = planner.list_profiles("alexnet").profiles["cpu-test"]
        assert prof.kind == "edge" and set(prof.timings_ms) == {n.name for n in graph.nodes}
        assert prof.meta["tier"] == "cpu-test" and prof.meta["worker"] == "http://edge-1:8000"
        (beat,) = live
        assert beat.url == "http://edge-1:8000" and beat.models == ["alexnet"]
        assert beat.tier == "cpu-test" and 0 <= beat.load < 1
        assert beat.inflight == 0 and beat.queue_depth == 0
        assert beat.capacity_ms_per_s == 1000.0  # one compute thread
        (left,) = planner.workers().workers  # the stopped worker's last heartbeat serves nothing
        assert left.url == beat.url and left.models == []
        cache = tmp_path / "alexnet.cpu-test.edge.json"
        cached = CostGraph.load(str(cache))  # cached for the next start
        assert {n.name: n.edge_ms for n in cached.nodes} == prof.timings_ms
        planner.delete_model("alexnet")
        _register_with(purl, models["alexnet"], tmp_path)  # the restarted worker reads the cache
        assert planner.list_profiles("alexnet").profiles["cpu-test"].timings_ms == prof.timings_ms


def test_unreachable_planner_never_stops_the_worker(models: dict[str, LoadedModel]) -> None:
    settings = Settings(
        planner_url=f"http://127.0.0.1:{free_port()}", heartbeat_s=0.1, profile=False, planner_timeout_s=0.5
    )
    with (
        serve_app_in_thread(create_app(settings, [models["alexnet"]])) as url,
        httpx.Client(base_url=url) as c,
    ):
        time.sleep(0.5)  # a few failed registrations / heartbeats
        body, headers = wire.encode_request({"x": torch.randn(1, 3, 32, 32)})
        assert c.post("/v2/models/alexnet/infer", content=body, headers=headers).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200


# ---- settings and CLI ------------------------------------------------------------------------------


def test_settings_from_env_and_cli_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAPDEE_EDGE_MODELS", "zoo:resnet18@artifacts/x, zoo:vgg16?width=0.25")
    monkeypatch.setenv("DAPDEE_EDGE_BATCH_MAX", "16")
    monkeypatch.setenv("DAPDEE_API_TOKEN", "tok-0123456789abcdef")
    s = Settings()
    assert s.model_entries() == [("zoo:resnet18", "artifacts/x"), ("zoo:vgg16?width=0.25", None)]
    assert s.batch_max == 16 and s.api_token is not None and s.api_token.get_secret_value() == "tok-0123456789abcdef"
    from dapdee.cli import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "edge",
            "--models",
            "zoo:alexnet?width=0.25",
            "--tier",
            "t1",
            "--batch-max",
            "4",
            "--port",
            "0",
        ]
    )
    assert args.models == "zoo:alexnet?width=0.25" and args.batch_max == 4 and callable(args.func)


def test_cli_rejects_bad_model_spec() -> None:
    from dapdee.cli import main

    assert main(["serve", "edge", "--models", "zoo:nosuchnet", "--port", "0"]) == 2
    assert main(["serve", "edge", "--models", "zoo:alexnet@/nonexistent/dir", "--port", "0"]) == 2


def test_lifespan_loads_models_from_settings() -> None:
    settings = Settings(models="zoo:alexnet?width=0.25&in_channels=1", batch_max=1)
    with serve_app_in_thread(create_app(settings)) as url, httpx.Client(base_url=url) as c:
        assert c.get("/v2/health/ready").status_code == 200
        md = c.get("/v2/models/alexnet").json()
        assert md["inputs"][0]["shape"] == [-1, 1, 32, 32]
        body, headers = wire.encode_request({"x": torch.randn(2, 1, 32, 32)}, wire_dtype="INT8")
        r = c.post("/v2/models/alexnet/infer", content=body, headers=headers)
        assert r.status_code == 200 and wire.decode_response(r.content, r.headers).outputs["class"].shape == (2,)


def test_artifact_spec_pins_options() -> None:
    from pathlib import Path

    from dapdee.edge_worker.app import load_models

    art = Path(__file__).resolve().parent.parent / "artifacts" / "fmnist-alexnet"
    if not (art / "manifest.json").is_file():
        pytest.skip("no shipped alexnet artifact")
    (m,) = load_models(Settings(models=f"zoo:alexnet@{art}"))
    assert m.manifest is not None and m.graph.exits[-1].accuracy is not None
    with pytest.raises(ValueError, match="trained for"):
        load_models(Settings(models=f"zoo:alexnet?width=0.25@{art}"))

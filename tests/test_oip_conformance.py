"""Open Inference Protocol v2 conformance of the edge worker, checked with a stock client:
NVIDIA's `tritonclient.http` against a real uvicorn server on 127.0.0.1 (role tokens on).

Health (200 true / 400 false, as the KServe v2 REST spec's health section says), server and
model metadata (the graph's real input datatype and shape), versioned and unversioned routes,
JSON and binary tensors both ways (the per-output `binary_data` flag and the request-level
`binary_data_output`), a whole-model infer with the shipped artifact's UINT8 frame, a real cut
(boundary tensors + the `exit` parameter), and `{"error": ...}` answers raised by the client
with their status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient  # the dev extra installs tritonclient[http]
from fastapi import FastAPI
from tritonclient.utils import InferenceServerException

from dapdee import wire
from dapdee.costmodel import partition
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.config import Settings
from dapdee.models import LoadedModel, load_model
from tests.conftest import serve_app_in_thread

ART = Path(__file__).resolve().parent.parent / "artifacts" / "fmnist-alexnet"
ZOO_SPEC = "zoo:resnet18?width=0.25"
DEVICE_TOKEN, READER_TOKEN = "dev-" + "d" * 20, "wrk-" + "w" * 20


def _bearer(token: str) -> dict[str, str]:
    """Fresh headers for every call: tritonclient adds Inference-Header-Content-Length to the
    dict it is given."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    frame = load_model("", weights=ART)  # takes the raw uint8 frame
    with torch.random.fork_rng():  # fixed random weights, whatever ran before in this process
        torch.manual_seed(0)
        zoo = load_model(ZOO_SPEC)
    return {frame.name: frame, zoo.name: zoo}


@pytest.fixture(scope="module")
def served(models: dict[str, LoadedModel]) -> Iterator[tuple[Any, FastAPI, str]]:
    """The worker serving both models, with a device and a worker token."""
    settings = Settings(device_token=DEVICE_TOKEN, worker_token=READER_TOKEN)
    app = create_app(settings, list(models.values()))  # the same weights the tests run locally
    with serve_app_in_thread(app) as url:
        client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        try:
            yield client, app, url
        finally:
            client.close()


def _frame_model(models: dict[str, LoadedModel]) -> LoadedModel:
    return next(m for m in models.values() if m.graph.input.dtype == "uint8")


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


def test_health_answers_200_or_400(served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel]) -> None:
    client, app, url = served
    name = _frame_model(models).name
    assert client.is_server_live() and client.is_server_ready()
    for version in ("", "1"):
        assert client.is_model_ready(name, version, headers=_bearer(READER_TOKEN))
    assert not client.is_model_ready(name, "2", headers=_bearer(READER_TOKEN))  # unknown version: 404
    state = app.state.worker
    state.ready = False  # what the worker does while it drains at shutdown
    try:
        assert not client.is_server_ready() and not client.is_model_ready(name, headers=_bearer(READER_TOKEN))
        r = httpx.get(f"{url}/v2/health/ready")
        assert r.status_code == 400 and r.content == b""
        assert httpx.get(f"{url}/v2/models/{name}/versions/1/ready", headers=_bearer(READER_TOKEN)).status_code == 400
        assert client.is_server_live()
    finally:
        state.ready = True


def test_metadata_reports_the_graph_input(served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel]) -> None:
    client, _, _ = served
    meta = client.get_server_metadata(headers=_bearer(READER_TOKEN))
    assert meta["name"] == "dapdee-edge" and "binary_tensor_data" in meta["extensions"]
    for m in models.values():
        for version in ("", "1"):
            md = client.get_model_metadata(m.name, version, headers=_bearer(READER_TOKEN))
            assert md["name"] == m.name and md["versions"] == ["1"]
            want = "UINT8" if m.graph.input.dtype == "uint8" else "FP32"
            assert md["inputs"] == [{"name": m.input_name, "datatype": want, "shape": [-1, *m.input_shape[1:]]}]
            assert [(o["name"], o["datatype"]) for o in md["outputs"]] == [("logits", "FP32"), ("class", "INT64")]
    assert _frame_model(models).graph.input.dtype == "uint8"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata(_frame_model(models).name, "2", headers=_bearer(READER_TOKEN))
    assert _status(exc) == "404" and "version" in exc.value.message()


@pytest.mark.parametrize("version", ["", "1"])
@pytest.mark.parametrize("binary_in", [True, False])
def test_whole_model_infer_with_the_uint8_frame(
    served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel], version: str, binary_in: bool
) -> None:
    """The frame goes in as UINT8 (binary or JSON); outputs come back as each requested output's
    `binary_data` says, or all binary when no outputs are listed (`binary_data_output`)."""
    client, _, _ = served
    m = _frame_model(models)
    shape = (3, *m.input_shape[1:])
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ref = m.run_exit(frames)
    inp = httpclient.InferInput(m.input_name, list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames.numpy(), binary_data=binary_in)
    for binary_out in (True, False, None):
        outputs = None
        if binary_out is not None:
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("logits", "class")]
        result = client.infer(m.name, [inp], model_version=version, outputs=outputs, headers=_bearer(DEVICE_TOKEN))
        for out in result.get_response()["outputs"]:
            sent_binary = "binary_data_size" in (out.get("parameters") or {})
            assert sent_binary == (binary_out is not False) and ("data" in out) != sent_binary, out
        logits = torch.tensor(result.as_numpy("logits"))
        assert torch.allclose(logits, ref, atol=1e-4, rtol=0)
        assert np.array_equal(result.as_numpy("class"), ref.argmax(1).numpy())
        assert result.get_response()["model_version"] == "1"


def test_a_raw_binary_request_is_the_model_inputs_bytes_at_batch_1(
    served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel]
) -> None:
    """Triton's raw binary request (binary data extension): `Inference-Header-Content-Length: 0`
    and a body that is the one input's bytes alone: answered as that input at batch 1, every
    output binary. A body of another size is a 400 naming the input's size."""
    _, _, url = served
    m = _frame_model(models)
    frame = torch.randint(
        0, 256, (1, *m.input_shape[1:]), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    headers = {**_bearer(DEVICE_TOKEN), wire.HEADER_LENGTH: "0", "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post(f"/v2/models/{m.name}/infer", content=frame.numpy().tobytes(), headers=headers)
        short = http.post(f"/v2/models/{m.name}/infer", content=frame.numpy().tobytes()[1:], headers=headers)
    assert r.status_code == 200, r.text
    answer = wire.decode_response(r.content, dict(r.headers))
    assert torch.allclose(answer.outputs["logits"], m.run_exit(frame), atol=1e-4, rtol=0)
    assert int(answer.outputs["class"][0]) == int(m.run_exit(frame).argmax(1)[0])
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"], short.text


@pytest.mark.parametrize("version", ["", "1"])
def test_a_real_cut_boundary_tensors_and_the_exit_parameter(
    served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel], version: str
) -> None:
    """The device runs a third of exit1's sub-graph locally; tritonclient ships every boundary
    tensor (FP32, binary and JSON) with parameters={"exit": "exit1"}; the worker finishes it."""
    client, _, _ = served
    m = models["resnet18"]
    x = torch.randn(2, *m.input_shape[1:], generator=torch.Generator().manual_seed(5))
    needed = m.graph.ancestors(m.exit_node("exit1"))
    part = partition(m.graph, "exit1", needed[: len(needed) // 3])
    names = [u for u, _ in part.transfer]
    assert m.input_name not in names and len(names) >= 1
    with torch.inference_mode():
        sent = m.executor.compute({m.input_name: x}, names, allowed=set(part.device_nodes))
    ref = m.run_exit(x, "exit1")
    for binary in (True, False):
        inputs = []
        for n in names:
            t = httpclient.InferInput(n, list(sent[n].shape), "FP32")
            t.set_data_from_numpy(sent[n].numpy(), binary_data=binary)
            inputs.append(t)
        outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
        params, headers = {"exit": "exit1"}, _bearer(DEVICE_TOKEN)
        result = client.infer(m.name, inputs, version, outputs, parameters=params, headers=headers)
        assert result.get_response()["parameters"]["exit"] == "exit1"
        assert torch.allclose(torch.tensor(result.as_numpy("logits")), ref, atol=1e-4, rtol=0)
        assert result.as_numpy("class") is None  # only what was requested


def test_errors_reach_the_client_with_their_status(
    served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel]
) -> None:
    client, _, _ = served
    m = models["resnet18"]
    x = httpclient.InferInput(m.input_name, [1, *m.input_shape[1:]], "FP32")
    x.set_data_from_numpy(np.full((1, *m.input_shape[1:]), 3e38, dtype=np.float32))
    cases = [
        ({}, "", 401, "bearer token"),
        (_bearer(READER_TOKEN), "", 403, "device"),
        (_bearer(DEVICE_TOKEN), "2", 404, "version"),
        (_bearer(DEVICE_TOKEN), "1", 422, "not finite"),
    ]
    for headers, version, status, text in cases:
        with pytest.raises(InferenceServerException) as exc:
            client.infer(m.name, [x], model_version=version, headers=headers)
        assert _status(exc) == str(status) and text in exc.value.message(), (status, exc.value.message())
    bad = httpclient.InferInput("no_such_node", [1, 4], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer(m.name, [bad], headers=_bearer(DEVICE_TOKEN))
    assert _status(exc) == "400" and "unknown node" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        classify = [httpclient.InferRequestedOutput("class", class_count=3)]
        client.infer(m.name, [x], outputs=classify, headers=_bearer(DEVICE_TOKEN))
    assert _status(exc) == "400" and "classification" in exc.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_is_415_naming_the_coding(
    served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel], algorithm: str
) -> None:
    """tritonclient's request compression: refused with 415 naming Content-Encoding (bodies are
    taken uncompressed), not a 400 about JSON; the same request uncompressed is answered."""
    client, _, _ = served
    m = _frame_model(models)
    frames = torch.zeros((1, *m.input_shape[1:]), dtype=torch.uint8)
    inp = httpclient.InferInput(m.input_name, list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames.numpy())
    with pytest.raises(InferenceServerException) as exc:
        client.infer(m.name, [inp], headers=_bearer(DEVICE_TOKEN), request_compression_algorithm=algorithm)
    assert _status(exc) == "415" and f"Content-Encoding '{algorithm}'" in exc.value.message()
    assert client.infer(m.name, [inp], headers=_bearer(DEVICE_TOKEN)).as_numpy("class").shape == (1,)


def test_the_openapi_document_declares_every_error_each_route_answers(
    served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel]
) -> None:
    """Every operation declares the `4XX` and `5XX` ranges and types every error body as OIP's
    `{"error": ...}` (no FastAPI `HTTPValidationError`); and what the request guard answers on
    GET routes that take a token (a body over the limit, a compressed body) is a declared status
    with such a body. (The GET routes once declared only their own codes: the guard's 413 and
    415 were not.) A public route reads no body: it answers as it would, with `Connection: close`."""
    import jsonschema

    _, _, url = served
    spec = httpx.get(f"{url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
            assert "4XX" in errors and "5XX" in errors, (method, path)
            assert all(r.get("content", error_ref) == error_ref for r in errors.values()), (method, path)
    name = _frame_model(models).name
    auth = _bearer(READER_TOKEN)
    for path, item in spec["paths"].items():
        if "get" not in item:
            continue
        target = url + path.replace("{model}", name).replace("{version}", "1")
        for headers in ({"Content-Length": str(300_000)}, {"Content-Encoding": "gzip", "Content-Length": "3"}):
            body = b"x" * int(headers["Content-Length"])
            answer = httpx.request("GET", target, headers={**auth, **headers}, content=body)
            declared = item["get"]["responses"]
            assert str(answer.status_code) in declared or f"{answer.status_code // 100}XX" in declared, (path, answer)
            if not item["get"].get("security"):  # public: passed on unread
                assert answer.headers.get("connection") == "close", (path, answer.headers)
                continue
            assert answer.status_code in (413, 415), (path, answer.status_code)
            jsonschema.validate(answer.json(), schemas["ErrorResponse"])


def test_the_openapi_document_types_the_metrics_text_and_only_the_decoded_datatypes(
    served: tuple[Any, FastAPI, str], models: dict[str, LoadedModel]
) -> None:
    """What a generated client reads from the document matches what the worker does: /metrics
    declares its text body (the default would be a 200 without one), which the answer is; an
    infer input's datatype enum is exactly what the decoder takes (`dapdee.wire.DATATYPES`, the
    metadata's `accepted_datatypes`), so a datatype the schema admits is never a 400 "not
    supported"; and the planner's /metrics declares its text too."""
    from dapdee import wire
    from dapdee.planner.app import create_app as create_planner
    from dapdee.planner.config import Settings as PlannerSettings

    _, _, url = served
    spec = httpx.get(f"{url}/openapi.json").json()
    for doc in (spec, create_planner(PlannerSettings()).openapi()):
        ok = doc["paths"]["/metrics"]["get"]["responses"]["200"]
        assert ok["content"] == {"text/plain": {"schema": {"type": "string"}}}, ok
    answer = httpx.get(f"{url}/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in answer.text
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]["application/json"]
    enum = infer["schema"]["properties"]["inputs"]["items"]["properties"]["datatype"]["enum"]
    name = _frame_model(models).name
    meta = httpx.get(f"{url}/v2/models/{name}", headers=_bearer(READER_TOKEN)).json()
    assert set(enum) == set(wire.DATATYPES) == set(meta["parameters"]["accepted_datatypes"]), enum

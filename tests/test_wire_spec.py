"""The OIP v2 codec against the binary tensor extension itself, not against its own output.

1. Bodies written byte by byte here (JSON header, then each binary tensor's little-endian bytes in
   input order, `Inference-Header-Content-Length` = the header's length): the encoder must produce
   them (its JSON header compared as JSON, its binary part byte for byte) and the decoder must read
   them, for FP32, FP16, INT8 and UINT8.
2. tritonclient (Triton's own Python client) as an outside codec: requests it encodes are decoded
   by ours; responses ours encodes are decoded by it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dapdee import wire

# ---- hand-written bytes -----------------------------------------------------------------------------

# FP32 1.0 = 0x3F800000, -2.0 = 0xC0000000, 0.5 = 0x3F000000, little-endian
FP32_BYTES = b"\x00\x00\x80\x3f" + b"\x00\x00\x00\xc0" + b"\x00\x00\x00\x3f"
# FP16 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 65504 = 0x7BFF (the largest finite half)
FP16_BYTES = b"\x00\x3c" + b"\x00\xc0" + b"\x00\x38" + b"\xff\x7b"
# INT8 127, -64 (0xC0 in two's complement), 1, 0
INT8_BYTES = b"\x7f\xc0\x01\x00"
# UINT8 0, 1, 127, 128, 255
UINT8_BYTES = b"\x00\x01\x7f\x80\xff"
# INT64 2 = 0x0000000000000002
INT64_BYTES = b"\x02\x00\x00\x00\x00\x00\x00\x00"

REQUEST_HEADER = (
    b'{"id":"spec-1","parameters":{"exit":"exit2","binary_data_output":true},"inputs":['
    b'{"name":"a","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}},'
    b'{"name":"h","shape":[2,2],"datatype":"FP16","parameters":{"binary_data_size":8}},'
    b'{"name":"q","shape":[4],"datatype":"INT8","parameters":{"binary_data_size":4,"scale":0.5}},'
    b'{"name":"u","shape":[5],"datatype":"UINT8","parameters":{"binary_data_size":5}}]}'
)
REQUEST_BODY = REQUEST_HEADER + FP32_BYTES + FP16_BYTES + INT8_BYTES + UINT8_BYTES

A = [[1.0, -2.0, 0.5]]
H = [[1.0, -2.0], [0.5, 65504.0]]
Q = [127, -64, 1, 0]
U = [0, 1, 127, 128, 255]


def test_decoder_reads_hand_built_request() -> None:
    r = wire.decode_request(REQUEST_BODY, len(REQUEST_HEADER))
    assert r.id == "spec-1" and r.parameters["exit"] == "exit2" and r.binary_output is True
    assert r.input_datatypes == {"a": "FP32", "h": "FP16", "q": "INT8", "u": "UINT8"}
    assert list(r.inputs) == ["a", "h", "q", "u"]
    assert all(t.dtype == torch.float32 for t in r.inputs.values())  # request inputs are upcast
    assert r.inputs["a"].tolist() == A
    assert r.inputs["h"].tolist() == H
    assert r.inputs["q"].tolist() == [63.5, -32.0, 0.5, 0.0]  # int8 · scale 0.5
    assert r.inputs["u"].tolist() == [float(v) for v in U]


def test_decoder_reads_hand_built_json_request() -> None:
    body = (
        b'{"inputs":[{"name":"a","shape":[1,3],"datatype":"FP32","data":[[1.0,-2.0,0.5]]},'
        b'{"name":"u","shape":[5],"datatype":"UINT8","data":[0,1,127,128,255]}]}'
    )
    r = wire.decode_request(body, None)
    assert r.inputs["a"].tolist() == A and r.inputs["u"].tolist() == [float(v) for v in U]
    assert r.binary_output is False and r.outputs is None


def test_binary_data_follows_input_order() -> None:
    """The same bytes under a header naming the inputs in the other order are other tensors."""
    head = (
        b'{"inputs":[{"name":"u","shape":[5],"datatype":"UINT8","parameters":{"binary_data_size":5}},'
        b'{"name":"q","shape":[4],"datatype":"INT8","parameters":{"binary_data_size":4}}]}'
    )
    r = wire.decode_request(head + UINT8_BYTES + INT8_BYTES, len(head))
    assert r.inputs["u"].tolist() == [float(v) for v in U] and r.inputs["q"].tolist() == [float(v) for v in Q]


def _split(body: bytes, headers: dict[str, str]) -> tuple[dict, bytes]:
    n = int(headers[wire.HEADER_LENGTH])
    return json.loads(body[:n]), body[n:]


def _entry(name: str, shape: list[int], dtype: str, size: int, **params: float) -> dict:
    return {"name": name, "shape": shape, "datatype": dtype, "parameters": {"binary_data_size": size, **params}}


def test_encoder_writes_the_spec_bytes() -> None:
    inputs = {"a": torch.tensor(A), "u": torch.tensor(U, dtype=torch.uint8), "q8": torch.tensor(Q, dtype=torch.int8)}
    body, headers = wire.encode_request(inputs, request_id="spec-1", parameters={"exit": "exit2"})
    assert headers["Content-Type"] == "application/octet-stream"
    head, data = _split(body, headers)
    assert head == {
        "id": "spec-1",
        "parameters": {"exit": "exit2", "binary_data_output": True},
        "inputs": [_entry("a", [1, 3], "FP32", 12), _entry("u", [5], "UINT8", 5), _entry("q8", [4], "INT8", 4)],
    }
    assert data == FP32_BYTES + UINT8_BYTES + INT8_BYTES  # integer tensors keep their type
    # floats sent as FP16
    body, headers = wire.encode_request({"h": torch.tensor(H)}, wire_dtype="FP16", binary_output=False)
    head, data = _split(body, headers)
    assert head == {"inputs": [_entry("h", [2, 2], "FP16", 8)]} and data == FP16_BYTES
    # floats quantised to INT8: max |x| = 127 gives scale 127/127 = 1, so q = x exactly
    body, headers = wire.encode_request({"q": torch.tensor(Q, dtype=torch.float32)}, wire_dtype="INT8")
    head, data = _split(body, headers)
    assert head["inputs"] == [_entry("q", [4], "INT8", 4, scale=1.0)] and data == INT8_BYTES


def test_encoder_json_body() -> None:
    body, headers = wire.encode_request({"a": torch.tensor(A)}, binary=False, binary_output=False)
    assert wire.HEADER_LENGTH not in headers and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP32", "data": A[0]}]}


RESPONSE_HEADER = (
    b'{"model_name":"m","id":"r-9","outputs":['
    b'{"name":"logits","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}},'
    b'{"name":"half","shape":[2,2],"datatype":"FP16","parameters":{"binary_data_size":8}},'
    b'{"name":"class","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}}]}'
)


def test_response_decoder_reads_hand_built_bytes() -> None:
    body = RESPONSE_HEADER + FP32_BYTES + FP16_BYTES + INT64_BYTES
    r = wire.decode_response(body, {wire.HEADER_LENGTH: str(len(RESPONSE_HEADER))})
    assert r.model_name == "m" and r.id == "r-9"
    assert r.outputs["logits"].dtype == torch.float32 and r.outputs["logits"].tolist() == A
    assert r.outputs["half"].dtype == torch.float16 and r.outputs["half"].tolist() == H  # dtype kept
    assert r.outputs["class"].dtype == torch.int64 and r.outputs["class"].tolist() == [2]


def test_response_encoder_writes_the_spec_bytes() -> None:
    outs = {"logits": torch.tensor(A), "class": torch.tensor([2])}
    body, headers = wire.encode_response("m", outs, request_id="r-9")
    head, data = _split(body, headers)
    assert head == {
        "model_name": "m",
        "id": "r-9",
        "outputs": [_entry("logits", [1, 3], "FP32", 12), _entry("class", [1], "INT64", 8)],
    }
    assert data == FP32_BYTES + INT64_BYTES


# ---- tritonclient as the outside codec -------------------------------------------------------------

httpclient = pytest.importorskip("tritonclient.http", reason="pip install tritonclient[http] (the dev extra)")

ARRAYS = {
    "FP32": np.array(A, dtype=np.float32),
    "FP16": np.array(H, dtype=np.float16),
    "INT8": np.array([Q], dtype=np.int8),
    "UINT8": np.array([U], dtype=np.uint8),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_requests_decode(binary: bool) -> None:
    inputs = []
    for dtype, arr in ARRAYS.items():
        inp = httpclient.InferInput(f"in_{dtype.lower()}", list(arr.shape), dtype)
        inputs.append(inp.set_data_from_numpy(arr, binary_data=binary))
    outputs = [
        httpclient.InferRequestedOutput("logits", binary_data=True),
        httpclient.InferRequestedOutput("class", binary_data=False),
    ]
    body, hlen = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="t-1", parameters={"exit": "exit2"}
    )
    assert (hlen is not None) == binary
    r = wire.decode_request(body, hlen)
    assert r.id == "t-1" and r.parameters["exit"] == "exit2"
    for dtype, arr in ARRAYS.items():
        name = f"in_{dtype.lower()}"
        assert r.input_datatypes[name] == dtype
        assert r.inputs[name].tolist() == arr.astype(np.float32).tolist(), name
    # each requested output's own `binary_data` flag (the standard per-output key)
    assert r.outputs == {"logits": True, "class": False}
    assert r.binary_output is True


def test_tritonclient_request_without_outputs_asks_for_binary() -> None:
    inp = httpclient.InferInput("x", [1, 3], "FP32").set_data_from_numpy(ARRAYS["FP32"])
    body, hlen = httpclient.InferenceServerClient.generate_request_body([inp])
    r = wire.decode_request(body, hlen)
    assert r.binary_output is True and r.outputs is None and r.inputs["x"].tolist() == A


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_our_responses_decode_in_tritonclient(binary: bool) -> None:
    outs = {  # (responses send floating outputs as FP32, so no FP16 here)
        "logits": torch.tensor(A),
        "class": torch.tensor([2, 7]),
        "u8": torch.tensor(U, dtype=torch.uint8),
    }
    body, headers = wire.encode_response("m", outs, request_id="r-9", binary=binary)
    hlen = headers.get(wire.HEADER_LENGTH)
    result = httpclient.InferResult.from_response_body(body, header_length=None if hlen is None else int(hlen))
    assert result.get_response()["model_name"] == "m" and result.get_response()["id"] == "r-9"
    for name, t in outs.items():
        got = result.as_numpy(name)
        assert got.dtype == t.numpy().dtype and got.tolist() == t.tolist(), name


def test_per_output_binary_choice_decodes_in_tritonclient() -> None:
    outs = {"logits": torch.tensor(A), "class": torch.tensor([2])}
    body, headers = wire.encode_response("m", outs, binary={"logits": True, "class": False})
    result = httpclient.InferResult.from_response_body(body, header_length=int(headers[wire.HEADER_LENGTH]))
    assert result.as_numpy("logits").tolist() == A and result.as_numpy("class").tolist() == [2]
    assert "data" in result.get_output("class") and "data" not in result.get_output("logits")

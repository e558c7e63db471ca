"""Tensor wire codec: the Open Inference Protocol v2 (KServe / Triton) REST body, with the
binary tensor data extension.

A request or response is a JSON header, optionally followed by raw little-endian tensor bytes
(`Inference-Header-Content-Length` gives the header's length; each tensor's
`parameters.binary_data_size` its byte count, in order). A requested output comes back binary
when its `binary_data` parameter says so, else when the request's `binary_data_output` does
(the keys stock Triton / KServe clients send). Tensors travel as FP32, FP16 or INT8
(symmetric per-tensor quantisation, `parameters.scale`: value = int8 * scale) to compress the
uplink; the decoder upcasts request inputs to FP32. Everything is bounded (element counts,
byte counts) and nothing is ever unpickled. Pure Python + numpy + torch: no web imports.

Binary data is read with `numpy.frombuffer` (no per-element Python loops); encode + decode of
1 MB costs well under a millisecond.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

# v2 datatype -> (torch dtype, little-endian numpy dtype)
DATATYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "FP32": (torch.float32, np.dtype("<f4")),
    "FP16": (torch.float16, np.dtype("<f2")),
    "FP64": (torch.float64, np.dtype("<f8")),
    "INT8": (torch.int8, np.dtype("i1")),
    "UINT8": (torch.uint8, np.dtype("u1")),
    "INT16": (torch.int16, np.dtype("<i2")),
    "INT32": (torch.int32, np.dtype("<i4")),
    "INT64": (torch.int64, np.dtype("<i8")),
}
TORCH_TO_V2: dict[torch.dtype, str] = {t: name for name, (t, _) in DATATYPES.items()}
WIRE_DTYPES = ("FP32", "FP16", "INT8")
DEFAULT_MAX_ELEMENTS = 1 << 26
OUTPUT_BINARY_KEY = "binary_data"  # per requested output (Triton / KServe binary tensor extension)
REQUEST_BINARY_KEY = "binary_data_output"  # request-level default for every output
# (name, shape, datatype) of one tensor, before its data is read: raises WireError to refuse it
TensorCheck = Callable[[str, list[int], str], None]


class WireError(ValueError):
    """A malformed body or tensor; the message names the tensor and the problem."""


class WireLimitError(WireError):
    """A well-formed body that holds more than the decoder was allowed to accept."""


JSON_SEPARATOR_SLACK = 4096  # commas a JSON header may hold besides those between values


@dataclass
class DecodedRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, torch.Tensor]  # upcast to float32
    binary_output: bool
    outputs: dict[str, bool] | None = None  # requested output name -> binary, when the request lists outputs
    input_datatypes: dict[str, str] = field(default_factory=dict)  # wire datatype per input


@dataclass
class DecodedResponse:
    id: str | None
    parameters: dict[str, Any]
    outputs: dict[str, torch.Tensor]
    model_name: str | None = None


# ---- encoding -------------------------------------------------------------------------------


FP16_MAX = 65504.0  # the largest finite half-precision value
FP32_MAX = float(np.finfo(np.float32).max)  # the largest finite single-precision value


def _abs_max(a: np.ndarray) -> float:
    """max |a| (0 for an empty array; NaN or inf when `a` holds them). O(n)."""
    return float(np.abs(a).max()) if a.size else 0.0


def _within(a: np.ndarray, wire: str) -> None:
    """WireError when `a` holds a finite value beyond the range of `wire` ("FP16" or "FP32"): it
    would arrive as Inf, refused as if sent so (NaN and Inf themselves go on, refused where
    decoded); the message names the narrowest datatype that holds it. O(n)."""
    amax = _abs_max(a)
    limit = FP16_MAX if wire == "FP16" else FP32_MAX
    if math.isfinite(amax) and amax > limit:
        instead = "FP32" if amax <= FP32_MAX else "FP64"
        raise WireError(f"holds {amax:.6g}, beyond {wire}'s range (±{limit:g}); send it as {instead}")


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor int8 quantisation: (q, scale) with t ~= q * scale; WireError when `t`
    holds NaN or Inf (int8 cannot carry them: they would arrive as ordinary numbers). O(n)."""
    a = t.detach().cpu().to(torch.float32).numpy()
    amax = _abs_max(a)
    if not math.isfinite(amax):
        raise WireError("holds NaN or Inf, which INT8 cannot carry")
    scale = float(np.float32(amax / 127.0))  # the scale sent is the one divided by
    if scale == 0.0:  # all zeros, or so small that the scale underflows float32: zeros are sent
        scale = 1.0
    q = np.clip(np.rint(a / np.float32(scale)), -127, 127).astype(np.int8)
    return torch.from_numpy(q), scale


def _to_wire(t: torch.Tensor, wire_dtype: str) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """Convert a tensor to the wire datatype: floats follow `wire_dtype`, integers keep theirs."""
    if t.is_meta or t.layout != torch.strided:  # no values here, or not one block of them
        raise WireError(f"a {'meta' if t.is_meta else str(t.layout).removeprefix('torch.')} tensor cannot be sent")
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if not t.is_floating_point():
        if t.dtype not in TORCH_TO_V2:
            raise WireError(f"tensor dtype {t.dtype} cannot be sent")
        return t.contiguous(), TORCH_TO_V2[t.dtype], {}
    if wire_dtype == "FP32":
        if t.dtype == torch.float64:
            _within(t.contiguous().numpy(), "FP32")
        return t.to(torch.float32).contiguous(), "FP32", {}
    if wire_dtype == "FP16":  # numpy: no intra-op thread start-up on small tensors
        # the range is checked on the values as they are: float64 past float32's would be Inf first
        a = t.contiguous().numpy() if t.dtype == torch.float64 else t.contiguous().to(torch.float32).numpy()
        _within(a, "FP16")
        return torch.from_numpy(a.astype(np.float16)), "FP16", {}
    if wire_dtype == "INT8":
        q, scale = quantize_int8(t)
        return q.contiguous(), "INT8", {"scale": scale}
    if wire_dtype == "FP64":
        return t.to(torch.float64).contiguous(), "FP64", {}
    raise WireError(f"wire dtype {wire_dtype!r}: expected one of {', '.join(WIRE_DTYPES)}")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's values as the binary extension's little-endian bytes. O(1) on a
    little-endian host (a view), O(n) on a big-endian one (swapped)."""
    # numpy has float16, but go through int16 to be dtype-agnostic
    return little_endian_bytes(t.view(torch.int16).numpy() if t.dtype == torch.float16 else t.numpy())


def little_endian_bytes(a: np.ndarray) -> memoryview:
    """The bytes of contiguous `a` in little-endian order, whatever its own or the host's byte
    order (no copy when they are little-endian already). O(1) or O(n)."""
    return memoryview(a.astype(a.dtype.newbyteorder("<"), copy=False)).cast("B")


def _encode(
    header: dict[str, Any],
    key: str,
    tensors: Mapping[str, torch.Tensor],
    wire_dtype: str,
    binary: bool | Mapping[str, bool],
) -> tuple[bytes, int | None]:
    entries = []
    chunks: list[memoryview] = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise WireError(f"{key} {name!r}: expected a tensor, got {type(t).__name__}")
        try:
            w, dtype, params = _to_wire(t, wire_dtype)
        except WireError as exc:
            raise WireError(f"{key} {name!r}: {exc}") from None
        entry: dict[str, Any] = {"name": name, "shape": list(w.shape), "datatype": dtype}
        as_binary = binary.get(name, False) if isinstance(binary, Mapping) else binary
        if as_binary:
            buf = _tensor_bytes(w.reshape(-1))
            params = {**params, "binary_data_size": buf.nbytes}
            chunks.append(buf)
        else:
            entry["data"] = w.reshape(-1).tolist()
        if params:
            entry["parameters"] = params
        entries.append(entry)
    header[key] = entries
    try:
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # NaN or Inf in JSON data: JSON has no spelling for them
        bad = [e["name"] for e in entries if "data" in e and not all(map(math.isfinite, e["data"]))]
        raise WireError(f"{key} {', '.join(map(repr, bad)) or '?'}: NaN or Inf cannot be sent as JSON") from None
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def encode_request(
    inputs: Mapping[str, torch.Tensor],
    *,
    parameters: dict[str, Any] | None = None,
    request_id: str | None = None,
    binary: bool = True,
    wire_dtype: str = "FP32",
    binary_output: bool = True,
) -> tuple[bytes, dict[str, str]]:
    """A v2 infer request body and its headers. Floating tensors are sent as `wire_dtype`
    (FP32, FP16 or INT8 with a per-tensor scale); integer tensors as their own type.
    `binary_output` asks the server for binary outputs. O(total bytes)."""
    if wire_dtype not in WIRE_DTYPES + ("FP64",):
        raise WireError(f"wire dtype {wire_dtype!r}: expected one of {', '.join(WIRE_DTYPES)}")
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = str(request_id)
    params = dict(parameters or {})
    if binary_output:
        params[REQUEST_BINARY_KEY] = True
    if params:
        header["parameters"] = params
    body, hlen = _encode(header, "inputs", inputs, wire_dtype, binary)
    headers = {"Content-Type": BINARY_CONTENT_TYPE if hlen is not None else JSON_CONTENT_TYPE}
    if hlen is not None:
        headers[HEADER_LENGTH] = str(hlen)
    return body, headers


def encode_response(
    model_name: str,
    outputs: Mapping[str, torch.Tensor],
    *,
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
    binary: bool | Mapping[str, bool] = True,
    model_version: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A v2 infer response body and headers; tensors keep their dtype (float32 logits, int64
    classes). `binary` may be per output name. O(total bytes)."""
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    body, hlen = _encode(header, "outputs", outputs, "FP32", binary)
    headers = {"Content-Type": BINARY_CONTENT_TYPE if hlen is not None else JSON_CONTENT_TYPE}
    if hlen is not None:
        headers[HEADER_LENGTH] = str(hlen)
    return body, headers


# ---- decoding -------------------------------------------------------------------------------


def _split(body: bytes, header_length: int | None, max_values: int | None = None) -> tuple[dict[str, Any], memoryview]:
    """(JSON header, binary part). With `max_values`, a header with more commas than that many
    values could hold (flat or nested data) is refused before it is parsed, so parsing never
    builds more Python objects than a valid request would. O(body bytes)."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise WireError("body: expected bytes")
    view = memoryview(body)
    if header_length is None:
        head, rest = view, view[len(view) :]
    else:
        if isinstance(header_length, bool) or not isinstance(header_length, int) or header_length < 0:
            raise WireError(f"{HEADER_LENGTH}: expected a non-negative integer, got {header_length!r}")
        if header_length > len(view):
            raise WireError(f"{HEADER_LENGTH} {header_length} exceeds the body length {len(view)}")
        head, rest = view[:header_length], view[header_length:]
    text = bytes(head)
    if max_values is not None and text.count(b",") > 2 * max_values + JSON_SEPARATOR_SLACK:
        raise WireLimitError(f"header: holds more than the {max_values} tensor values a request may carry")
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError(f"header: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError(f"header: expected a JSON object, got {type(header).__name__}")
    return header, rest


def parse_header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header as an int (None when absent)."""
    if value is None:
        return None
    v = value.strip()
    if not (v.isascii() and v.isdigit()) or len(v) > 18:  # str.isdigit admits '²' and '١'
        raise WireError(f"{HEADER_LENGTH}: expected a non-negative integer, got {value[:40]!r}")
    return int(v)


def _params(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The `parameters` object of a request, tensor or requested output (null or absent: empty)
    without its null values: a parameter that is null takes its default, as an absent one does
    (the edge's OpenAPI schema admits null for every request and output parameter). O(#parameters)."""
    p = d.get("parameters", {})
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise WireError(f"{where}.parameters: expected an object")
    return {k: v for k, v in p.items() if v is not None}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_array(data: Any, name: str, dtype: str, np_dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """JSON `data` as a flat numpy array of `np_dtype`: flat (row-major), or nested exactly as
    `shape` (OIP v2 allows both; nesting that disagrees with the shape is refused, not
    flattened). O(elements)."""
    if not isinstance(data, list):
        raise WireError(f"tensor {name!r}: data must be a list")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise WireError(f"tensor {name!r}: data is ragged or not numeric") from None
    count = math.prod(shape)
    if arr.ndim > 1 and list(arr.shape) != shape:
        raise WireError(f"tensor {name!r}: data is nested as {list(arr.shape)}, shape is {shape}")
    if arr.size != count:
        raise WireError(f"tensor {name!r}: data has {arr.size} elements, shape needs {count}")
    if count == 0:
        return np.zeros(0, dtype=np_dtype)
    if arr.dtype.kind not in "biuf":
        raise WireError(f"tensor {name!r}: data must be numbers, got {arr.dtype.kind!r} values")
    if np_dtype.kind in "iu":
        _check_integer_values(arr, name, dtype, np_dtype)
    with np.errstate(over="ignore"):  # a float that overflows the type is refused by name later
        return arr.reshape(-1).astype(np_dtype)


def _check_integer_values(arr: np.ndarray, name: str, dtype: str, np_dtype: np.dtype) -> None:
    """WireError naming the tensor unless every value of `arr` (numbers) casts to the integer
    `np_dtype` exactly: floats must be finite integers, and all in range. Floats are compared
    with float bounds, the top one max + 1 (a power of two, exact as a float): max itself may
    round up to it (float(2**63 - 1) == 2**63), so `hi <= max` would pass 2**63, which wraps to
    -2**63 on the cast. O(n)."""
    info = np.iinfo(np_dtype)
    lo, hi = arr.min(), arr.max()
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise WireError(f"tensor {name!r}: {dtype} data must be integers")
        in_range = float(lo) >= float(info.min) and float(hi) < float(info.max + 1)
    else:
        in_range = lo >= info.min and hi <= info.max
    if not in_range:
        raise WireError(f"tensor {name!r}: values out of {dtype} range [{info.min}, {info.max}]")


def shown_value(value: Any, limit: int = 64) -> str:
    """A client's value as a message shows it: a string quoted, at most `limit` characters; an
    array or an object by its kind only (as text, a deeply nested one would exhaust the stack,
    a long one fill the message); anything else by its repr, cut the same. O(limit)."""
    if isinstance(value, (list, dict)):
        return "a JSON " + ("array" if isinstance(value, list) else "object")
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _entry_header(e: Any, i: int, key: str, seen: Mapping[str, Any]) -> tuple[str, str, list[int]]:
    """(name, datatype, shape) of tensor entry `e` (`key[i]`), each checked; WireError naming it."""
    if not isinstance(e, dict):
        raise WireError(f"{key}[{i}]: expected an object")
    name = e.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise WireError(f"{key}[{i}].name: expected a non-empty string")
    if name in seen:
        raise WireError(f"tensor {name!r}: duplicate name in {key}")
    dtype = e.get("datatype")
    if not isinstance(dtype, str) or dtype not in DATATYPES:
        raise WireError(
            f"tensor {name!r}: datatype {shown_value(dtype)} not supported; use one of {', '.join(DATATYPES)}"
        )
    shape = e.get("shape")
    if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(s) and s >= 0 for s in shape):
        raise WireError(f"tensor {name!r}: shape must be a list of at most 16 non-negative integers")
    return name, dtype, shape


def _element_count(name: str, shape: list[int], max_elements: int) -> int:
    """Π shape, refused (WireLimitError) as soon as a partial product or one dimension passes
    `max_elements`, so a product never grows large. O(len(shape))."""
    count = 1
    for s in shape:
        count *= s
        if count > max_elements:
            raise WireLimitError(f"tensor {name!r}: shape {shape} has more than {max_elements} elements")
        if s > max_elements:  # after a 0, which keeps the product 0: reshape needs int64 sizes
            raise WireLimitError(f"tensor {name!r}: shape {shape} has a dimension over {max_elements}")
    return count


def _binary_values(
    e: dict[str, Any], name: str, shape: list[int], dtype: str, count: int, size: Any, binary: memoryview, offset: int
) -> np.ndarray:
    """The entry's `size` bytes at `offset` of the binary part, checked against its shape and
    datatype and the bytes left (a view, no copy)."""
    np_dtype = DATATYPES[dtype][1]
    if not _is_int(size) or size < 0:
        raise WireError(f"tensor {name!r}: binary_data_size must be a non-negative integer, got {shown_value(size)}")
    want = count * np_dtype.itemsize
    if size != want:
        raise WireError(f"tensor {name!r}: binary_data_size {size} does not match shape {shape} {dtype} ({want} bytes)")
    if offset + size > len(binary):
        raise WireError(
            f"tensor {name!r}: body truncated (needs {size} bytes at offset {offset}, {len(binary) - offset} left)"
        )
    if "data" in e:
        raise WireError(f"tensor {name!r}: both data and binary_data_size given")
    return np.frombuffer(binary, dtype=np_dtype, count=count, offset=offset)


def _checked_scale(params: Mapping[str, Any], name: str, dtype: str) -> float | None:
    """The entry's `scale` parameter (INT8/UINT8 only, finite, > 0), or None."""
    scale = params.get("scale")
    if scale is None:
        return None
    if dtype not in ("INT8", "UINT8"):
        raise WireError(f"tensor {name!r}: parameter scale applies to INT8/UINT8 only, not {dtype}")
    value = math.nan
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        try:
            value = float(scale)
        except OverflowError:  # a JSON integer of hundreds of digits: no float holds it
            value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise WireError(f"tensor {name!r}: scale must be a finite number > 0, got {shown_value(scale, 40)}")
    if not 0.0 < float(np.float32(value)) < math.inf:  # the values are scaled in float32
        raise WireError(
            f"tensor {name!r}: scale {shown_value(scale, 40)} is beyond float32's range (0 or infinite there)"
        )
    return value


def _decode_tensors(
    entries: Any,
    binary: memoryview,
    max_elements: int,
    key: str,
    upcast: bool,
    check_finite: bool,
    check: TensorCheck | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of `key` (a JSON list of v2 tensor entries) with their datatypes; binary data
    is read from `binary` in entry order and must be used up exactly. Every entry is checked
    (name, datatype, shape, element limits in all, data size) before anything is allocated.
    O(total elements)."""
    if not isinstance(entries, list) or not entries:
        raise WireError(f"{key}: expected a non-empty list of tensors")
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    offset = total = 0
    for i, e in enumerate(entries):
        name, dtype, shape = _entry_header(e, i, key, out)
        if check is not None:
            check(name, shape, dtype)
        count = _element_count(name, shape, max_elements)
        total += count
        if total > max_elements:
            raise WireLimitError(f"{key}: more than {max_elements} elements in all")
        params = _params(e, f"tensor {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            arr = _binary_values(e, name, shape, dtype, count, size, binary, offset)
            offset += size
        elif "data" not in e:
            raise WireError(f"tensor {name!r}: no data and no binary_data_size")
        else:
            arr = _json_array(e["data"], name, dtype, DATATYPES[dtype][1], shape)
        scale = _checked_scale(params, name, dtype)
        # numpy, single-threaded: torch's intra-op threads only add latency at these sizes
        if upcast:
            with np.errstate(over="ignore"):  # overflow is refused by name just below
                arr = arr.astype(np.float32)  # always a fresh, aligned, writable copy
                if scale is not None:
                    arr *= np.float32(scale)
        else:
            arr = arr.astype(DATATYPES[dtype][1].newbyteorder("="), copy=True)
        if check_finite and arr.dtype.kind == "f" and count and not np.isfinite(arr).all():
            # finite values sent can overflow the type they are held in: name that range too
            held = "FP16" if dtype == "FP16" else ("FP32" if upcast else dtype)
            raise WireError(f"tensor {name!r}: contains NaN or Inf, or values beyond the range of {held}")
        out[name] = torch.from_numpy(arr).reshape(shape)
        dtypes[name] = dtype
    if offset != len(binary):
        raise WireError(f"body: {len(binary) - offset} bytes after the last binary tensor are not described")
    return out, dtypes


def decode_request(
    body: bytes,
    header_length: int | None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    check: TensorCheck | None = None,
) -> DecodedRequest:
    """Parse a v2 infer request (JSON or binary extension). Inputs come back as float32
    (INT8/UINT8 times their `scale` when given); NaN/Inf are refused. `check(name, shape,
    datatype)` vets each input before its data is read (a refusal costs no tensor memory).
    Requested outputs are binary when their `binary_data` parameter says so, else when the
    request's `binary_data_output` does. O(body bytes)."""
    header, binary = _split(body, header_length, max_elements)
    rid = header.get("id")
    if rid is not None and not isinstance(rid, str):
        raise WireError("id: expected a string")
    params = _params(header, "request")
    inputs, dtypes = _decode_tensors(header.get("inputs"), binary, max_elements, "inputs", True, True, check)
    binary_output = params.get(REQUEST_BINARY_KEY, False)
    if not isinstance(binary_output, bool):
        raise WireError(f"parameters.{REQUEST_BINARY_KEY}: expected true or false")
    outputs = _requested_outputs(header.get("outputs"), binary_output)
    if outputs is not None:
        binary_output = binary_output or any(outputs.values())
    return DecodedRequest(rid, params, inputs, binary_output, outputs, dtypes)


def _requested_outputs(raw: Any, default_binary: bool) -> dict[str, bool] | None:
    """The request's `outputs` as name -> binary (None: not given). Per output, `binary_data`
    (the standard key) overrides the request-level default; `classification` (Triton's
    classification extension) is not supported. O(#outputs)."""
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > 64:
        raise WireError("outputs: expected a list of at most 64 requested outputs")
    outputs: dict[str, bool] = {}
    for i, o in enumerate(raw):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise WireError(f"outputs[{i}]: expected an object with a name")
        p = _params(o, f"outputs[{i}]")
        if REQUEST_BINARY_KEY in p:
            raise WireError(
                f"outputs[{i}].parameters.{REQUEST_BINARY_KEY}: per output the key is "
                f"{OUTPUT_BINARY_KEY!r} ({REQUEST_BINARY_KEY!r} belongs in the request's parameters)"
            )
        ob = p.get(OUTPUT_BINARY_KEY, default_binary)
        if not isinstance(ob, bool):
            raise WireError(f"outputs[{i}].parameters.{OUTPUT_BINARY_KEY}: expected true or false")
        classes = p.get("classification", 0)
        if classes not in (0, None) or isinstance(classes, bool):
            raise WireError(f"outputs[{i}].parameters.classification: the classification extension is not supported")
        outputs[o["name"]] = ob
    return outputs


def decode_response(
    body: bytes, headers: Mapping[str, str], max_elements: int = DEFAULT_MAX_ELEMENTS
) -> DecodedResponse:
    """Parse a v2 infer response; tensors keep their wire dtype (INT8 or UINT8 with a scale is
    dequantised to float32, as requests are). An `{"error": ...}` body raises WireError with
    its message."""
    lower = {k.lower(): v for k, v in headers.items()}
    header, binary = _split(body, parse_header_length(lower.get(HEADER_LENGTH.lower())))
    if "outputs" not in header and isinstance(header.get("error"), str):
        raise WireError(f"server error: {header['error']}")
    outputs, dtypes = _decode_tensors(header.get("outputs"), binary, max_elements, "outputs", False, False)
    for name, t in outputs.items():
        if dtypes[name] in ("INT8", "UINT8"):
            entry = next(e for e in header["outputs"] if e["name"] == name)
            scale = _checked_scale(_params(entry, f"tensor {name!r}"), name, dtypes[name])
            if scale is not None:
                outputs[name] = t.to(torch.float32) * scale
    rid = header.get("id")
    params = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
    return DecodedResponse(rid if isinstance(rid, str) else None, params, outputs, header.get("model_name"))

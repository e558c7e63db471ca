"""The Open Inference Protocol v2 (KServe / Triton) REST JSON shapes the edge worker speaks.

Pydantic models of the JSON objects of the v2 REST API: server and model metadata, the infer
request and response (their JSON part; with the binary tensor extension the tensor bytes follow
the JSON header and `parameters.binary_data_size` gives each tensor's length), and the error
object `{"error": "..."}` every 4xx/5xx carries. The edge decodes infer bodies with
`dapdee.wire` (it reads binary tensors without a JSON detour); these models document that body
in OpenAPI and type what the worker answers. Every number is finite.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]
# the datatypes the worker decodes (`dapdee.wire.DATATYPES`; a test keeps the two equal): an
# input of another v2 datatype is a 400
InputDatatype = Literal["FP32", "FP16", "FP64", "INT8", "UINT8", "INT16", "INT32", "INT64"]
Scalar = str | float | int | bool  # a v2 parameter value ($string | $number | $boolean)


class _Model(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)


class ErrorResponse(_Model):
    """The body of every edge 4xx/5xx answer."""

    error: str = Field(description="what went wrong, naming the field, tensor or limit")


class ServerMetadata(_Model):
    """`GET /v2`. `models` and `tier` are this server's additions."""

    name: str
    version: str
    extensions: list[str]
    models: list[str] = Field(default_factory=list, description="the models this worker serves")
    tier: str | None = Field(None, description="hardware tier of the worker's edge profile")


class TensorMetadata(_Model):
    """One input or output of a model; variable-size dimensions are -1."""

    name: str
    datatype: Datatype
    shape: list[int]


class ModelParameters(_Model):
    """This server's model parameters: the early exits and how to send a cut's boundary tensors."""

    exits: list[str] = Field(description="exit names, shallow to deep")
    exit_nodes: dict[str, str] = Field(description="graph node of each exit")
    exit_accuracy: dict[str, float | None] = Field(description="measured accuracy of each exit (null: unknown)")
    default_exit: str = Field(description="the exit an infer request without parameter `exit` gets")
    spec: str = Field(description="the model spec the worker loaded")
    node_count: int = Field(ge=0)
    max_batch_rows: int = Field(ge=1, description="the most rows (first dimension) a request or a batch may hold")
    max_body_bytes: int = Field(ge=1, description="the largest infer body this model accepts")
    accepted_datatypes: list[InputDatatype]
    inputs_note: str


class ModelMetadata(_Model):
    """`GET /v2/models/{model}[/versions/{version}]`: the graph input with its real datatype and
    shape, and the outputs every exit answers with."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters


class RequestInput(_Model):
    """One input tensor of an infer request: JSON `data`, or `parameters.binary_data_size` bytes
    after the JSON header (binary tensor extension)."""

    name: str = Field(description="a graph node name (a boundary tensor) or the graph input")
    shape: list[int] = Field(description="first dimension = rows (batch)")
    datatype: InputDatatype
    parameters: dict[str, Scalar] | None = Field(
        None, description="binary_data_size (binary extension); scale (INT8/UINT8 dequantisation)"
    )
    data: list[Any] | None = Field(None, description="row-major values, flat or nested")


class RequestedOutputParameters(_Model):
    """Per-output parameters: `binary_data` (binary tensor extension; null or absent: the
    request's `binary_data_output`) and `classification` (not supported: 0, null or absent)."""

    binary_data: bool | None = None
    classification: int | None = None


class RequestedOutput(_Model):
    name: Literal["logits", "class"]
    parameters: RequestedOutputParameters | None = None


class InferParameters(_Model):
    """Request parameters: `exit` picks the early exit (default: the deepest); `confidence`
    turns on the calibrated confidence heads the worker computes on the way to it (a row leaves
    at the first confident one); `timeout` (microseconds, Triton's schedule-policy parameter;
    0: none) is how long after its arrival the request may still start: one still queued then
    is not computed (503); `binary_data_output` asks for every output in binary unless an
    output says otherwise. A null parameter takes its default, as an absent one does."""

    exit: str | None = None
    confidence: bool | None = None
    timeout: int | None = Field(None, ge=0, le=(1 << 63) - 1, description="microseconds; 0: none")
    binary_data_output: bool | None = None


class InferRequest(_Model):
    """`POST /v2/models/{model}[/versions/{version}]/infer` (the JSON part)."""

    id: str | None = None
    parameters: InferParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class InferResponseParameters(_Model):
    """What the worker reports about one answer; every number is finite and non-negative."""

    exit: str = Field(description="the exit that answered")
    queue_ms: float = Field(ge=0, description="time the request waited for its batch to start")
    compute_ms: float = Field(ge=0, description="compute time of the request's batch")
    server_ms: float = Field(ge=0, description="time in the worker from receipt to the answer")
    batch_size: int = Field(ge=1, description="requests in the batch that computed this answer")
    batch_rows: int = Field(ge=1, description="rows in that batch")
    exits_taken: list[str] | None = Field(
        None, description="with `confidence`: per row, the exit that answered it (its logits are that row's)"
    )


class ResponseOutput(_Model):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Scalar] | None = None
    data: list[Any] | None = None


class InferResponse(_Model):
    """The infer answer (its JSON part): `logits` (FP32, [rows, classes]) and `class` (INT64, [rows])."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: InferResponseParameters
    outputs: list[ResponseOutput]

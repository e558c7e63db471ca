"""The planner's JSON contract as pydantic models: every request body, every answer, the error.

Request models forbid unknown fields (a misspelt `min_acc` is a 422 naming it, not a silently
ignored requirement), are strict (no "5" for 5, no `true` for 1) and refuse NaN and infinities;
their bounds are those of docs/DESIGN.md ("Numbers in plans"), so every number a plan is made
from is finite and so is every number it carries. Answer models describe what the planner
sends; they ignore fields they do not know, so a client built on them keeps working when the
planner adds one. Each model carries an example (shown in /docs).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from dapdee.costgraph import INPUT_DTYPES, MAX_BYTES, MAX_FLOPS, MAX_MS, OVERHEAD_KEYS
from dapdee.names import MODEL_NAME_PATTERN, check_model_name
from dapdee.planning.baselines import BASELINES
from dapdee.planning.request import MAX_BANDWIDTH_MBPS, MAX_BUDGET_MS, MAX_FRAME_RATE, MAX_RTT_MS, MIN_BANDWIDTH_MBPS

PROBLEM_MEDIA_TYPE = "application/problem+json"
MAX_META_BYTES = 65536


Name = Annotated[
    str,
    Field(min_length=1, max_length=64, json_schema_extra={"pattern": MODEL_NAME_PATTERN}),
    AfterValidator(check_model_name),
]
"""A model or tier name: 1-64 of letters, digits, '_', '.', '-', starting with a letter or digit,
no '..' (names become URL segments and Redis key parts)."""


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate escape)") from None
    return value


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("must hold only finite numbers and valid Unicode text") from None
    if size > MAX_META_BYTES:
        raise ValueError(f"{size} bytes of JSON exceed the limit of {MAX_META_BYTES}")
    return value


Text = Annotated[str, AfterValidator(_unicode)]
"""Any string that is valid Unicode (JSON allows lone surrogate escapes; storage does not)."""

Meta = Annotated[dict[str, Any], AfterValidator(_json_object), Field(description="free-form JSON, <= 64 KiB")]
"""A free-form JSON object: finite numbers, valid Unicode, at most MAX_META_BYTES as JSON."""


Ms = Annotated[float, Field(ge=0, le=MAX_MS, description="milliseconds, finite")]
ByteCount = Annotated[int, Field(ge=0, le=MAX_BYTES)]


def _invalid(model: str, errors: list[tuple[tuple[str, ...], str, Any]]) -> ValidationError:
    """A ValidationError of `model` holding one `value_error` per (path, message, value). Raised
    from a validator, pydantic keeps each error's path, placed under where the validator runs (a
    model validator: the model; a field validator: the field), so a check that reads several
    fields reports the field to change, as a single-field check does."""
    line_errors: list[InitErrorDetails] = [
        {"type": "value_error", "loc": loc, "input": v, "ctx": {"error": msg}} for loc, msg, v in errors
    ]
    return ValidationError.from_exception_data(model, line_errors)


def _request(example: dict[str, Any]) -> ConfigDict:
    return ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra={"examples": [example]})


def _answer(example: dict[str, Any]) -> ConfigDict:
    return ConfigDict(extra="ignore", allow_inf_nan=False, json_schema_extra={"examples": [example]})


# ---- plan ------------------------------------------------------------------------------------------

PLAN_REQUEST_EXAMPLE = {
    "model": "resnet18",
    "bandwidth_mbps": 5.85,
    "rtt_ms": 20.0,
    "device_load": 0.3,
    "device_tier": "phone",
    "latency_budget_ms": 50.0,
    "min_accuracy": 0.9,
    "mode": "auto",
}


MAX_AVOIDED_WORKERS = 16
AvoidedWorker = Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^https?://\S+$")]
"""A worker URL in a plan request's `avoid_workers`: http(s), no whitespace, as the planner names
workers (a trailing '/' is not told apart)."""


class PlanRequestBody(BaseModel):
    """One device's run-time conditions and requirements (DESIGN.md, "Planning semantics")."""

    model_config = _request(PLAN_REQUEST_EXAMPLE)

    model: Name
    bandwidth_mbps: float = Field(ge=MIN_BANDWIDTH_MBPS, le=MAX_BANDWIDTH_MBPS, description="uplink Mbit/s")
    rtt_ms: float = Field(0.0, ge=0, le=MAX_RTT_MS, description="round trip to the edge (ms)")
    device_load: float = Field(0.0, ge=0, lt=1, description="fraction of the device's compute already busy")
    device_tier: Name | None = Field(None, description="device profile to time the device part with")
    edge_load: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="ℓe; default: the load the other devices' leases put on the chosen worker, "
        "min(0.95, their reserved ms/s / its nominal_ms_per_s); with fleet planning off "
        "(DAPDEE_FLEET_PLANNING=false), the chosen worker's heartbeat load",
    )
    latency_budget_ms: float | None = Field(None, gt=0, le=MAX_BUDGET_MS)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    frame_rate: float | None = Field(None, gt=0, le=MAX_FRAME_RATE, description="frames/s the device offers")
    mode: Literal["auto", "latency", "throughput"] = "auto"
    device_id: Name | None = Field(
        None, description="names the device: the plan comes with a lease on the edge (needs frame_rate)"
    )
    confidence_exits: bool = Field(
        False, description="plan for calibrated progressive exits (prices predicted.expected_latency_ms)"
    )
    baseline: Literal[BASELINES] | None = Field(  # type: ignore[valid-type]
        None, description="plan with a baseline planner over the same cost model (for comparisons; no lease)"
    )
    avoid_workers: list[AvoidedWorker] = Field(
        default_factory=list,
        max_length=MAX_AVOIDED_WORKERS,
        description="workers this device could not use lately (its requests there were refused, went "
        "unanswered or failed): the plan takes another live worker serving the model when there is one "
        "(every live one avoided: the list is ignored); a lease keeps the list, so a rebalance does not "
        "bring the device onto them either",
    )

    @model_validator(mode="after")
    def _combinations(self) -> PlanRequestBody:
        """The fields that must or must not come together (`_combination_errors`), each refusal
        at the field to change. O(1)."""
        if self.device_id is None:
            if self.baseline is None or not self.confidence_exits:
                return self
        elif self.frame_rate is not None and self.baseline is None and not self.confidence_exits:
            return self
        raise _invalid(type(self).__name__, self._combination_errors())

    def _combination_errors(self) -> list[tuple[tuple[str, ...], str, Any]]:
        """(path, message, value) per combination refused: `device_id` needs `frame_rate`; a
        leased plan (`device_id`) takes neither `baseline` nor `confidence_exits`; a baseline
        does not plan for confidence exits. O(1)."""
        if self.device_id is None:
            return [(("baseline",), "baseline: baselines do not plan for confidence exits", self.baseline)]
        errors: list[tuple[tuple[str, ...], str, Any]] = []
        if self.frame_rate is None:
            msg = "frame_rate: required with device_id (the lease reserves frame_rate x the edge cost)"
            errors.append((("frame_rate",), msg, None))
        for name, value in (("baseline", self.baseline), ("confidence_exits", self.confidence_exits)):
            if value not in (None, False):
                msg = f"{name}: not with device_id (a leased plan is DAPDEE's static plan); drop {name} or device_id"
                errors.append(((name,), msg, value))
        return errors


# A plan answer's parts are read strictly (numbers JSON numbers, booleans JSON booleans, as
# plan.schema.json says), as the lease is: a planner that sends "true" or "32768" breaks the
# contract, and the SDK says so (ProtocolError) instead of reading it as something it is not.
_STRICT_PART = ConfigDict(strict=True, allow_inf_nan=False)
NodeName = Annotated[str, Field(min_length=1)]


class PlanExit(BaseModel):
    model_config = _STRICT_PART

    name: str = Field(min_length=1)
    accuracy: float | None = Field(ge=0, le=1)  # required, null for an exit without one


class PlanTransfer(BaseModel):
    model_config = _STRICT_PART

    node: NodeName
    bytes: int = Field(ge=0)


class PlanPredicted(BaseModel):
    """The cost model's prediction for one frame; `throughput_fps` is null when `bottleneck_ms`
    is 0 (no stage takes any time; or so near 0 that 1000 / bottleneck_ms overflows)."""

    model_config = _STRICT_PART

    latency_ms: float = Field(ge=0)
    device_ms: float = Field(ge=0)
    transfer_ms: float = Field(ge=0)
    edge_ms: float = Field(ge=0)
    bottleneck_ms: float = Field(ge=0)
    throughput_fps: float | None = Field(gt=0)
    accuracy: float | None = Field(ge=0, le=1)
    # a default None is not validated: absent reads as None, an explicit null is refused
    expected_latency_ms: float = Field(  # type: ignore[assignment]
        None, ge=0, description="with confidence_exits: the latency averaged over where frames leave"
    )
    expected_device_ms: float = Field(None, ge=0, description="with confidence_exits")  # type: ignore[assignment]
    expected_transfer_ms: float = Field(None, ge=0, description="with confidence_exits")  # type: ignore[assignment]
    expected_edge_ms: float = Field(None, ge=0, description="with confidence_exits")  # type: ignore[assignment]
    expected_bottleneck_ms: float = Field(None, ge=0, description="with confidence_exits")  # type: ignore[assignment]
    expected_throughput_fps: float | None = Field(None, gt=0, description="with confidence_exits")


LEASE_EXAMPLE = {
    "device_id": "cam-17",
    "model": "resnet18",
    "worker": "http://127.0.0.1:8000",
    "frames_per_s": 10.0,
    "edge_ms_per_frame": 5.6,
    "expires_in_s": 30.0,
    "replan_after_s": 5.0,
    "assigned": False,
}


WorkerUrl = Annotated[str, Field(pattern=r"^https?://\S+$")]
"""A worker's base URL as a lease names it: http(s), no whitespace (`$` is the end of the text:
no trailing newline either, as JSON Schema reads the pattern)."""


class LeaseInfo(BaseModel):
    """A device's lease on the shared edge: it reserves frames_per_s x edge_ms_per_frame ms per
    second of `worker` (none: Device-Only) until it expires; come back within replan_after_s.
    Its bounds are lease.schema.json's: `device_id` and `model` names, each optional but never
    null (the planner always sends them), `worker` null or a URL, numbers JSON numbers and
    `assigned` a JSON boolean (strict), `expires_in_s` 0 when the lease could not be stored
    (Redis away) and `replan_after_s` 0 allowed (ask again at once). Unknown fields are ignored
    as in every answer model."""

    model_config = ConfigDict(**_answer(LEASE_EXAMPLE), strict=True)

    # a default None is not validated: absent reads as None, an explicit null is refused
    device_id: Name = None  # type: ignore[assignment]
    model: Name = None  # type: ignore[assignment]
    worker: WorkerUrl | None
    frames_per_s: float = Field(gt=0)
    edge_ms_per_frame: float = Field(ge=0, description="the plan's zero-load edge cost per frame")
    expires_in_s: float = Field(
        ge=0,
        description="0: the lease was not stored, or not confirmed (the planner's Redis is away or timed out: a "
        "reservation sent before the timeout may still land, and lapses at its TTL)",
    )
    replan_after_s: float = Field(ge=0)
    assigned: bool = Field(False, description="the plan comes from a fleet rebalance")


PLAN_EXAMPLE = {
    "plan_id": "3f2c9a7e51b0d4c8",
    "model": "resnet18",
    "mode": "latency",
    "planner": "dapdee",
    "exit": {"name": "exit2", "accuracy": 0.921},
    "device_nodes": ["conv1", "layer1_0_conv1"],
    "edge_nodes": ["layer1_0_conv2", "fc"],
    "transfer": [{"node": "layer1_0_conv1", "bytes": 32768}],
    "predicted": {
        "latency_ms": 41.2,
        "device_ms": 20.1,
        "transfer_ms": 15.0,
        "edge_ms": 6.1,
        "bottleneck_ms": 20.1,
        "throughput_fps": 49.75,
        "accuracy": 0.921,
    },
    "constraints_met": True,
    "approximate": False,
    "edge_worker": "http://127.0.0.1:8000",
}


PLANNERS = ("dapdee", *BASELINES)  # plan.schema.json's `planner`


class ProgressiveHead(BaseModel):
    """One active exit head of a progressive plan: where it is computed and checked."""

    model_config = _STRICT_PART

    exit: str
    node: str
    threshold: float = Field(ge=0, le=1)
    fraction: float = Field(ge=0, le=1)
    side: Literal["device", "edge"]
    nodes: list[str]


class ProgressiveAnswer(BaseModel):
    """With confidence_exits: the outcome's accuracy, the fractions leaving at the planned exit
    and reaching the edge, and each active head (exit order)."""

    model_config = _STRICT_PART

    rule: str | None = None
    split: str | None = None
    accuracy: float | None = Field(ge=0, le=1)
    exit_fraction: float = Field(ge=0, le=1)
    edge_fraction: float = Field(ge=0, le=1)
    heads: list[ProgressiveHead]


class PlanAnswer(BaseModel):
    """The plan JSON of DESIGN.md: where to cut, which exit, the prediction, the worker to use.
    Read strictly, within plan.schema.json's bounds (unknown fields ignored, as in every answer
    model)."""

    model_config = ConfigDict(**_answer(PLAN_EXAMPLE), strict=True)

    plan_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    model: Name
    mode: Literal["latency", "throughput"]
    planner: Literal[PLANNERS]  # type: ignore[valid-type]
    exit: PlanExit
    device_nodes: list[NodeName]
    edge_nodes: list[NodeName]
    transfer: list[PlanTransfer]
    predicted: PlanPredicted
    constraints_met: bool
    approximate: bool = Field(description="true when a throughput search met an exit too large to enumerate")
    edge_worker: WorkerUrl | None = Field(description="base URL of the edge worker; null when none serves the model")
    lease: LeaseInfo | None = Field(None, description="with device_id: the lease the plan holds")
    progressive: ProgressiveAnswer | None = Field(
        None, description="with confidence_exits: where each exit head runs and its calibrated share"
    )

    @field_validator("device_nodes", "edge_nodes")
    @classmethod
    def _unique(cls, nodes: list[str]) -> list[str]:
        if len(set(nodes)) != len(nodes):
            raise ValueError("names a node twice")
        return nodes


DEVICE_EXAMPLE = {"device_id": "cam-17", "model": "resnet18", "lease": LEASE_EXAMPLE, "plan": PLAN_EXAMPLE}


class DeviceState(BaseModel):
    """GET /devices/{device_id}: the device's lease and the plan now assigned to it."""

    model_config = ConfigDict(**_answer({**DEVICE_EXAMPLE, "assigned": False}), strict=True)

    device_id: Name
    model: Name
    lease: LeaseInfo
    plan: PlanAnswer
    assigned: bool = Field(description="the plan was assigned by a fleet rebalance")


class OptionValue(BaseModel):
    """One device's plan as the rebalance values it: `met` priced at edge load
    min(0.95, ρ_max·C_w/N_w) (capacity over nominal capacity), `objective_ms` at its worker's
    `time_load`, without the switching credit."""

    model_config = _STRICT_PART

    exit: str
    device_nodes: int
    edge_ms_per_frame: float
    met: bool
    accuracy: float | None
    objective_ms: float = Field(description="latency_ms or bottleneck_ms, by the device's mode")


class FleetTotals(BaseModel):
    model_config = _STRICT_PART

    devices_met: int
    accuracy_frames_per_s: float = Field(description="Σ f_i·accuracy_i")
    frame_ms_per_s: float = Field(description="Σ f_i·t_i: the fleet's frame time per second")
    leased_ms_per_s: float


class DeviceChange(BaseModel):
    model_config = _STRICT_PART

    device_id: str
    old: OptionValue | None
    new: OptionValue


class WorkerRebalance(BaseModel):
    model_config = _STRICT_PART

    worker: str
    leases: int = Field(description="the leases solved: the worker's own and the Device-Only leases it may take in")
    exact: bool = Field(
        description="false: more than 64 leases, more than 20,000 DP states, or a plan map that is not exact "
        "(solved approximately)"
    )
    time_load: float = Field(
        ge=0.0,
        le=0.95,
        description="the edge load the objective_ms values are priced at: the share ρ_max·k/8 of the worker's "
        "capacity the chosen plans were solved within (they book at most that share), times capacity / nominal",
    )
    applied: bool = Field(description="false: leases changed meanwhile; the next period tries again")
    before: FleetTotals
    after: FleetTotals
    devices: list[DeviceChange]


class RebalanceAnswer(BaseModel):
    model_config = ConfigDict(**_answer({"approximate": False, "workers": []}), strict=True)

    approximate: bool = Field(description="true when some worker was solved approximately (exact: false)")
    workers: list[WorkerRebalance]
    over_budget: list[str] = Field(
        default_factory=list,
        description="workers whose solve ran past DAPDEE_REBALANCE_BUDGET_S: left as they were (not in `workers`)",
    )


# ---- cost graphs ------------------------------------------------------------------------------------


class InputBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: Text = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=1, le=MAX_BYTES)]] = Field(min_length=1, description="batch 1 first")
    dtype: Literal[INPUT_DTYPES] = "float32"  # type: ignore[valid-type]
    bytes: ByteCount = Field(0, description="bytes sent uplink when the edge consumes the input")

    @field_validator("shape")
    @classmethod
    def _batch_one(cls, shape: list[int]) -> list[int]:
        if shape and shape[0] != 1:  # the shape of one frame, as the cost graph prices one frame
            raise ValueError(f"the first entry is the batch and must be 1, got {shape[0]}")
        return shape


class NodeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: Text = Field(min_length=1)
    op: Text = ""
    inputs: list[Text] = Field(description="producers: the input's name or earlier nodes' names")
    out_bytes: ByteCount
    flops: int = Field(0, ge=0, le=MAX_FLOPS)
    device_ms: Ms | None = None
    edge_ms: Ms | None = None
    shape: list[Annotated[int, Field(ge=0, le=MAX_BYTES)]] | None = None
    sendable: bool = Field(
        True,
        description="false: the value cannot cross the network (not a tensor, e.g. a traced x.size(0)); "
        "no plan computes it on the device for an edge-side consumer",
    )


class ExitBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: Text = Field(min_length=1)
    node: Text = Field(min_length=1)
    accuracy: float | None = Field(None, ge=0, le=1)


class OverheadsBody(BaseModel):
    """Cost model v2: per-request costs paid by every partition that uses the edge."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    device_request_ms: Ms = 0.0
    edge_request_ms: Ms = 0.0


Unit = Annotated[float, Field(ge=0, le=1)]


class ExitOutcomeBody(BaseModel):
    """Where frames planned for one exit leave (calibrated shares per active exit, summing to 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    fractions: dict[Text, Unit]
    accuracy: Unit | None = None


class ProgressiveBody(BaseModel):
    """Calibrated confidence exits: per exit a max-softmax threshold (null: never early) and, per
    planned exit, the measured outcome. Matched to the graph's exits when it is stored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    rule: Literal["max_softmax"] = "max_softmax"  # the one rule implemented
    split: Text | None = None
    thresholds: dict[Text, Unit | None]
    by_exit: dict[Text, ExitOutcomeBody]


COST_GRAPH_EXAMPLE = {
    "model": "tiny",
    "input": {"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32", "bytes": 12288},
    "nodes": [
        {
            "name": "conv1",
            "op": "conv2d",
            "inputs": ["x"],
            "out_bytes": 65536,
            "flops": 1769472,
            "device_ms": 1.2,
            "edge_ms": 0.11,
        },
        {
            "name": "fc",
            "op": "linear",
            "inputs": ["conv1"],
            "out_bytes": 40,
            "flops": 163840,
            "device_ms": 0.3,
            "edge_ms": 0.02,
        },
    ],
    "exits": [{"name": "final", "node": "fc", "accuracy": 0.93}],
    "overheads": {"device_request_ms": 0.8, "edge_request_ms": 3.1},
}


class CostGraphBody(BaseModel):
    """A cost graph (DESIGN.md, "Cost graph"): nodes in topological order, exits shallow to deep.
    Structure rules (unique names, known producers, the planner's size caps) are checked when
    it is stored and reported as 422 naming the node."""

    model_config = _request(COST_GRAPH_EXAMPLE)

    model: Name
    input: InputBody
    nodes: list[NodeBody] = Field(min_length=1)
    exits: list[ExitBody] = Field(min_length=1)
    overheads: OverheadsBody | None = None
    progressive: ProgressiveBody | None = None
    meta: Meta | None = Field(None, description="free-form provenance (JSON, <= 64 KiB); absent or null: none")


# ---- profiles -----------------------------------------------------------------------------------------

PROFILE_EXAMPLE = {"kind": "device", "timings_ms": {"conv1": 1.31, "fc": 0.29}, "meta": {"hardware": "phone"}}


class ProfileBody(BaseModel):
    """Measured timings of one hardware tier; `kind` says which column (device_ms or edge_ms)
    they fill. `meta` (at most 64 KiB of JSON) may carry device_request_ms / edge_request_ms."""

    model_config = _request(PROFILE_EXAMPLE)

    kind: Literal["device", "edge"]
    timings_ms: dict[Text, Ms] = Field(max_length=1_000_000)
    meta: Meta = Field(default_factory=dict)

    @field_validator("meta")
    @classmethod
    def _request_costs_are_ms(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """The per-request costs a profile may carry (cost model v2) are milliseconds: checked
        here, where they are uploaded, not first where a plan uses them."""
        for key in OVERHEAD_KEYS:
            v = meta.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_MS):
                msg = f"meta.{key}: expected a finite number of ms in [0, {MAX_MS:g}], got {v!r}"
                raise _invalid(cls.__name__, [((key,), msg, v)])
        return meta


class StoredProfile(BaseModel):
    model_config = _answer(PROFILE_EXAMPLE)

    kind: Literal["device", "edge"]
    timings_ms: dict[str, float]
    meta: dict[str, Any]


class ProfileList(BaseModel):
    model_config = _answer({"model": "tiny", "version": 3, "profiles": {"phone": PROFILE_EXAMPLE}})

    model: str
    version: int
    profiles: dict[str, StoredProfile]


# where an acknowledged write is: a pending one is written when Redis returns, unless the model
# changed meanwhile (another replica's write): then it is dropped and counted as a conflict
StoredIn = Annotated[
    Literal["redis", "pending", "memory"],
    Field(
        description="redis: written; pending: Redis is away, written when it returns unless the model "
        "changed meanwhile; memory: no Redis"
    ),
]


class ProfileWritten(BaseModel):
    """Answer of PUT /models/{model}/profiles/{tier}."""

    model_config = _answer(
        {
            "model": "tiny",
            "tier": "phone",
            "kind": "device",
            "version": 3,
            "created": True,
            "profile_hash": "9b1c0e...",
            "nodes_timed": 2,
            "nodes_missing": [],
            "stored": "redis",
        }
    )

    model: str
    tier: str
    kind: Literal["device", "edge"]
    version: int
    created: bool
    profile_hash: str
    nodes_timed: int
    nodes_missing: list[str] = Field(description="nodes the profile does not time (first 20)")
    stored: StoredIn


# ---- models -----------------------------------------------------------------------------------------


class TierTimings(BaseModel):
    device: bool
    edge: bool


MODEL_SUMMARY_EXAMPLE = {
    "model": "tiny",
    "version": 3,
    "graph_hash": "5d41402abc4b2a76b9719d911017c592",
    "nodes": 2,
    "exits": ["final"],
    "timings": {"device": True, "edge": True},
    "profiles": {"phone": "device"},
}


class ModelSummary(BaseModel):
    model_config = _answer(MODEL_SUMMARY_EXAMPLE)

    model: str
    version: int
    graph_hash: str
    nodes: int
    exits: list[str]
    timings: TierTimings = Field(description="whether the cost graph itself times every node, per tier")
    profiles: dict[str, Literal["device", "edge"]] = Field(description="uploaded profiles: tier -> kind")


class ModelList(BaseModel):
    model_config = _answer({"models": [MODEL_SUMMARY_EXAMPLE]})

    models: list[ModelSummary]


class ModelWritten(BaseModel):
    """Answer of PUT /models/{model}: 201 when created, 200 when replaced."""

    model_config = _answer(
        {
            "model": "tiny",
            "version": 4,
            "graph_hash": "5d41402abc4b2a76b9719d911017c592",
            "created": False,
            "dropped_profiles": [],
            "stored": "redis",
        }
    )

    model: str
    version: int
    graph_hash: str
    created: bool
    dropped_profiles: list[str] = Field(description="profiles dropped because the structure changed")
    stored: StoredIn


# ---- workers ---------------------------------------------------------------------------------------------

HEARTBEAT_EXAMPLE = {
    "url": "http://127.0.0.1:8000",
    "models": ["resnet18"],
    "tier": "gpu",
    "load": 0.25,
    "inflight": 3,
    "queue_depth": 0,
    "capacity_ms_per_s": 800.0,
    "nominal_ms_per_s": 1000.0,
}


class HeartbeatBody(BaseModel):
    """An edge worker's periodic report; it stays live for the planner's worker TTL after it.
    The URL must match the planner's `worker_url_pattern`."""

    model_config = _request(HEARTBEAT_EXAMPLE)

    url: Text = Field(min_length=1, max_length=2048, description="base URL devices reach the worker at")
    models: list[Name] = Field(max_length=1000)
    tier: Name = Field(description="hardware tier: its edge profile times the plan")
    load: float = Field(ge=0, lt=1)
    inflight: int = Field(0, ge=0, le=10**9)
    queue_depth: int = Field(0, ge=0, le=10**9)
    capacity_ms_per_s: float = Field(
        1000.0,
        gt=0,
        le=1e9,
        description="profiled ms per second the leases may book: 1000 x its compute slots / its measured slowdown",
    )
    nominal_ms_per_s: float | None = Field(
        None,
        gt=0,
        le=1e9,
        description="1000 x its compute slots: the capacity the edge load ℓe is taken over (absent: capacity_ms_per_s)",
    )

    @model_validator(mode="after")
    def _nominal_holds_capacity(self) -> HeartbeatBody:
        """`nominal_ms_per_s`, when given, is at least `capacity_ms_per_s`; a refusal is at
        `nominal_ms_per_s`. O(1)."""
        if self.nominal_ms_per_s is not None and self.nominal_ms_per_s < self.capacity_ms_per_s:
            msg = (
                f"nominal_ms_per_s: {self.nominal_ms_per_s} is below capacity_ms_per_s {self.capacity_ms_per_s} "
                "(a measured slowdown only lowers the capacity)"
            )
            raise _invalid(type(self).__name__, [(("nominal_ms_per_s",), msg, self.nominal_ms_per_s)])
        return self


class HeartbeatAnswer(BaseModel):
    model_config = _answer({"url": "http://127.0.0.1:8000", "ttl_s": 10.0, "shared": True})

    url: str
    ttl_s: float
    shared: bool = Field(description="true when Redis holds the heartbeat (every replica sees the worker)")


class WorkerInfo(BaseModel):
    model_config = _answer({**HEARTBEAT_EXAMPLE, "expires_in_s": 8.7})

    url: str
    models: list[str]
    tier: str
    load: float
    inflight: int
    queue_depth: int
    capacity_ms_per_s: float = Field(1000.0, description="what the leases may book (ms/s): ρ_max of it at most")
    nominal_ms_per_s: float = Field(1000.0, description="1000 x its compute slots: ℓe = others' leases / this")
    expires_in_s: float
    leased_ms_per_s: float = Field(0.0, description="Σ f_j·e_j over the worker's live leases")
    leases: int = Field(0, description="live leases reserving on the worker")


class WorkerList(BaseModel):
    model_config = _answer({"workers": [{**HEARTBEAT_EXAMPLE, "expires_in_s": 8.7}]})

    workers: list[WorkerInfo] = Field(description="live workers, least loaded first")


# ---- operations -------------------------------------------------------------------------------------------


class Health(BaseModel):
    model_config = _answer({"status": "ok"})

    status: Literal["ok"]


class Readiness(BaseModel):
    model_config = _answer({"ready": True, "redis": "up", "pending_writes": 0})

    ready: bool
    redis: str = Field(description="up | down | disabled (down does not make the planner unready)")
    pending_writes: int = Field(description="changes made while Redis was away, not yet written")


# ---- errors ------------------------------------------------------------------------------------------------


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description='path to the offending value, e.g. ["body", "bandwidth_mbps"]')
    msg: str
    type: str


PROBLEM_EXAMPLE = {
    "type": "urn:dapdee:problem:validation",
    "title": "Unprocessable Content",
    "status": 422,
    "detail": "body.min_acc: Extra inputs are not permitted",
    "errors": [{"loc": ["body", "min_acc"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}],
}


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every 4xx/5xx answer (`application/problem+json`).
    `type` is "about:blank" (then `title` is the HTTP reason phrase) or a URN naming the kind;
    a 422 lists every invalid field in `errors`."""

    model_config = _answer(PROBLEM_EXAMPLE)

    type: str = "about:blank"
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    errors: list[ValidationIssue] | None = None

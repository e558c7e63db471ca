"""The cost graph ("profile"): the public JSON contract of DESIGN.md as small dataclasses.

A cost graph is a DAG of layers in topological order, one input placeholder, and a list
of exits (shallow -> deep). It carries everything the planner needs and nothing from
torch, so hand-written JSON plans exactly like a traced model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from dapdee.atomic_file import write_text_atomically
from dapdee.names import ModelError, check_model_name

SCHEMA_VERSION = 1
CONFIDENCE_RULE = "max_softmax"  # a row leaves at a head whose max softmax probability reaches its threshold
# Bounds on every number of a cost graph, so that every prediction made from it is finite
# (sums over at most max_nodes nodes, divided by a bandwidth >= 1e-3 Mbit/s, stay far below 1e308).
MAX_BYTES = 2**40  # node out_bytes, input bytes, shape entries
MAX_FLOPS = 2**63 - 1
MAX_MS = 1e7  # node timings and overheads (ms)
# the input tensor's element types (torch names) a graph may declare: what the wire codec carries
INPUT_DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64")
# a profile's `meta` keys that carry cost model v2's per-request costs (ms)
OVERHEAD_KEYS = ("device_request_ms", "edge_request_ms")


class CostGraphError(ValueError):
    """A cost graph that violates the contract; the message names the offending field."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    bytes: int = 0


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    out_bytes: int
    flops: int = 0
    device_ms: float | None = None
    edge_ms: float | None = None
    shape: tuple[int, ...] | None = None  # output shape (batch 1); informative, not required
    # False: the value cannot cross the network (not a tensor: a Python number such as a traced
    # `x.size(0)`, a torch.Size, a tuple); a plan never has it computed on the device and read on the edge
    sendable: bool = True


@dataclass(frozen=True)
class Exit:
    name: str
    node: str
    accuracy: float | None = None


@dataclass(frozen=True)
class Overheads:
    """Cost model v2: fixed costs of one request, paid only by partitions that use the edge.

    `device_request_ms`: the device's CPU time to encode a request, send it and decode the answer
    (not the wire time); `edge_request_ms`: the edge's time for a request outside node compute
    (HTTP, decode, dispatch, encode). Both zero: the cost model is exactly v1."""

    device_request_ms: float = 0.0
    edge_request_ms: float = 0.0

    @property
    def zero(self) -> bool:
        return self.device_request_ms == 0.0 and self.edge_request_ms == 0.0

    def to_dict(self) -> dict[str, float]:
        return {"device_request_ms": self.device_request_ms, "edge_request_ms": self.edge_request_ms}


NO_OVERHEADS = Overheads()
FRACTION_SUM_TOL = 1e-6  # a planned exit's fractions must sum to 1 within this


@dataclass(frozen=True)
class ExitOutcome:
    """Progressive inference planned to stop at exit e: `fractions` pairs each active shallower
    exit k (threshold not null) and e itself with the fraction of frames leaving there (k: the
    first confident active exit; e: every other frame); `accuracy` of the answers."""

    fractions: tuple[tuple[str, float], ...]
    accuracy: float | None = None


@dataclass(frozen=True)
class Progressive:
    """Calibrated confidence exits (the optional `progressive` field): per exit its max-softmax
    threshold (None: the exit never answers early) and, per planned exit, the `ExitOutcome`
    measured on the `split` named. Absent: the graph has no confidence exits."""

    thresholds: tuple[tuple[str, float | None], ...]
    by_exit: tuple[tuple[str, ExitOutcome], ...]
    rule: str = "max_softmax"  # CONFIDENCE_RULE, the one rule there is
    split: str | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> Progressive:
        """Parse the JSON object (types and ranges; `check` matches it to a graph's exits)."""
        got = _progressive(raw)
        if got is None:
            raise CostGraphError("progressive: expected an object")
        return got

    def threshold(self, exit_name: str) -> float | None:
        return dict(self.thresholds).get(exit_name)

    def outcome(self, exit_name: str) -> ExitOutcome:
        return dict(self.by_exit)[exit_name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "split": self.split,
            "thresholds": dict(self.thresholds),
            "by_exit": {e: {"fractions": dict(o.fractions), "accuracy": o.accuracy} for e, o in self.by_exit},
        }

    def check(self, exit_names: list[str]) -> None:
        """CostGraphError unless thresholds name known exits and every exit e has an outcome whose
        fractions name exactly the active exits before e and e, summing to 1. O(exits²)."""
        unknown = [k for k, _ in self.thresholds if k not in exit_names]
        if unknown:
            raise CostGraphError(f"progressive.thresholds: unknown exits {unknown[:5]}")
        if sorted(e for e, _ in self.by_exit) != sorted(exit_names):
            raise CostGraphError(f"progressive.by_exit: expected one entry per exit {exit_names}")
        for i, e in enumerate(exit_names):
            want = [k for k in exit_names[:i] if self.threshold(k) is not None] + [e]
            fr = self.outcome(e).fractions
            if sorted(k for k, _ in fr) != sorted(want):
                raise CostGraphError(f"progressive.by_exit.{e}.fractions: expected the exits {want}")
            if abs(math.fsum(q for _, q in fr) - 1.0) > FRACTION_SUM_TOL:
                raise CostGraphError(f"progressive.by_exit.{e}.fractions: must sum to 1")


@dataclass(frozen=True)
class GraphLimits:
    """Size caps of one cost graph: nodes, exits and producers per node (in-degree)."""

    max_nodes: int = 4096
    max_exits: int = 64
    max_in_degree: int = 256

    def check_counts(self, nodes: int, exits: int) -> None:
        """CostGraphError when `nodes` or `exits` exceed the caps. O(1)."""
        if nodes > self.max_nodes:
            raise CostGraphError(f"nodes: {nodes} nodes exceed the limit of {self.max_nodes}")
        if exits > self.max_exits:
            raise CostGraphError(f"exits: {exits} exits exceed the limit of {self.max_exits}")


DEFAULT_LIMITS = GraphLimits()


@dataclass(frozen=True)
class CostGraph:
    model: str
    input: InputSpec
    nodes: tuple[Node, ...]
    exits: tuple[Exit, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    overheads: Overheads = NO_OVERHEADS
    progressive: Progressive | None = None  # calibrated confidence exits (optional)

    # ---- lookups -------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self._index()[name]

    def _index(self) -> dict[str, Node]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {n.name: n for n in self.nodes}
            object.__setattr__(self, "_idx", idx)
        return idx

    def exit(self, name: str | None) -> Exit:
        """The named exit; None means the final (deepest) exit."""
        if name is None:
            return self.exits[-1]
        for e in self.exits:
            if e.name == name:
                return e
        raise KeyError(f"unknown exit {name!r}; exits are {[e.name for e in self.exits]}")

    def consumers(self) -> dict[str, list[str]]:
        """Map producer name (input or node) -> names of nodes consuming it, in topological order."""
        out: dict[str, list[str]] = {self.input.name: []}
        for n in self.nodes:
            out.setdefault(n.name, [])
            for u in n.inputs:
                if n.name not in out[u]:
                    out[u].append(n.name)
        return out

    def ancestors(self, node: str) -> list[str]:
        """`node` and every node it depends on (not the input), in topological order. O(V + E)."""
        idx = self._index()
        keep = {node}
        stack = [node]
        while stack:
            for u in idx[stack.pop()].inputs:
                if u in idx and u not in keep:
                    keep.add(u)
                    stack.append(u)
        return [n.name for n in self.nodes if n.name in keep]

    def input_dependent(self) -> frozenset[str]:
        """The nodes whose value depends on the graph input (per-frame data); the others are
        computed from parameters alone (e.g. a traced `get_attr`), the same for every frame, so
        the edge computes them itself and a device never sends them. O(V + E)."""
        data = {self.input.name}
        for n in self.nodes:  # topological order
            if any(u in data for u in n.inputs):
                data.add(n.name)
        return frozenset(data - {self.input.name})

    def has_timings(self, tier: str) -> bool:
        attr = f"{tier}_ms"
        return all(getattr(n, attr) is not None for n in self.nodes)

    # ---- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "input": {
                "name": self.input.name,
                "shape": list(self.input.shape),
                "dtype": self.input.dtype,
                "bytes": self.input.bytes,
            },
            "nodes": [],
            "exits": [{"name": e.name, "node": e.node, "accuracy": e.accuracy} for e in self.exits],
        }
        for n in self.nodes:
            nd: dict[str, Any] = {
                "name": n.name,
                "op": n.op,
                "inputs": list(n.inputs),
                "out_bytes": n.out_bytes,
                "flops": n.flops,
                "device_ms": n.device_ms,
                "edge_ms": n.edge_ms,
            }
            if n.shape is not None:
                nd["shape"] = list(n.shape)
            if not n.sendable:  # written only when false: graphs without such nodes serialise (and hash) as before
                nd["sendable"] = False
            d["nodes"].append(nd)
        if not self.overheads.zero:  # v1 graphs serialise (and hash) exactly as before
            d["overheads"] = self.overheads.to_dict()
        if self.progressive is not None:
            d["progressive"] = self.progressive.to_dict()
        if self.meta:
            d["meta"] = self.meta
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def content_hash(self) -> str:
        """sha256 of the canonical JSON; changes whenever anything the planner reads changes.
        O(V + E) the first time, then cached on the graph (it is frozen)."""
        cached = self.__dict__.get("_content_hash")
        if cached is None:
            canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
            cached = hashlib.sha256(canon.encode()).hexdigest()
            object.__setattr__(self, "_content_hash", cached)
        return cached

    @classmethod
    def from_dict(cls, d: Any, limits: GraphLimits | None = None) -> CostGraph:
        """Parse and validate (see `validate`, and `check_limits` under `limits`, default
        `DEFAULT_LIMITS`); raises CostGraphError naming the bad field, among them a `model` that
        is not a model name (`check_model_name`), a `meta` that is neither an object nor null,
        and an exit with fields other than name, node and accuracy. O(V + E)."""
        if not isinstance(d, dict):
            raise CostGraphError("cost graph: expected a JSON object")
        model = _req(d, "model", str, "model")
        try:
            check_model_name(model)
        except ModelError:
            shown = repr(model[:40]) + ("..." if len(model) > 40 else "")
            raise CostGraphError(
                f"model: expected a model name (1-64 letters, digits, '_', '.', '-', starting with a letter or "
                f"digit, no '..'), got {shown}"
            ) from None
        input_spec = _parse_input(_req(d, "input", dict, "input"))
        raw_nodes = _req(d, "nodes", list, "nodes")
        raw_exits = _req(d, "exits", list, "exits")
        (limits or DEFAULT_LIMITS).check_counts(len(raw_nodes), len(raw_exits))
        nodes = tuple(_parse_node(i, nd) for i, nd in enumerate(raw_nodes))
        exits = tuple(_parse_exit(i, ed) for i, ed in enumerate(raw_exits))
        meta = d.get("meta")
        if meta is None:  # absent or null: no provenance
            meta = {}
        if not isinstance(meta, dict):
            raise CostGraphError(f"meta: expected an object, got {type(meta).__name__}")
        overheads = _overheads(d.get("overheads"))
        progressive = _progressive(d.get("progressive"))
        g = cls(model, input_spec, nodes, exits, meta=meta, overheads=overheads, progressive=progressive)
        g.validate()
        g.check_limits(limits or DEFAULT_LIMITS)
        return g

    @classmethod
    def from_json(cls, text: str | bytes) -> CostGraph:
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # nested past the stack: not a graph
            raise CostGraphError(f"cost graph: not valid JSON ({str(exc)[:200]})") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str) -> CostGraph:
        """The cost graph in file `path`; CostGraphError naming the file (and the field)."""
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise CostGraphError(f"cannot read cost graph {path!r}: {exc.strerror}") from None
        try:
            return cls.from_json(text)
        except CostGraphError as exc:
            raise CostGraphError(f"{path}: {exc}") from None

    def save(self, path: str) -> None:
        """Write the graph's JSON to `path` atomically (a temporary file of a unique name in the
        same folder, renamed over it): a failed write leaves what was there and no temporary
        file, and raises OSError naming `path`. The file gets the mode a plain open() would give
        it: the replaced file's, else 0o666 less the umask (`write_text_atomically`)."""
        try:
            write_text_atomically(path, self.to_json() + "\n")
        except OSError as exc:
            raise OSError(f"cannot write cost graph {path!r}: {exc.strerror or exc}") from None

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        """Check the contract: unique names, topological order (hence acyclic), known producers,
        exits naming nodes, unique exit names. O(V + E)."""
        if not self.nodes:
            raise CostGraphError("nodes: a cost graph needs at least one node")
        if not self.exits:
            raise CostGraphError("exits: a cost graph needs at least one exit")
        seen = {self.input.name}
        all_names = {n.name for n in self.nodes}
        if self.input.name in all_names:
            raise CostGraphError(f"input.name {self.input.name!r} is also a node name")
        for i, n in enumerate(self.nodes):
            if n.name in seen:
                raise CostGraphError(f"nodes[{i}].name: duplicate name {n.name!r}")
            for u in n.inputs:
                if u not in seen:
                    if u in all_names:
                        raise CostGraphError(
                            f"nodes[{i}] ({n.name}).inputs: {u!r} comes later; nodes must be in "
                            "topological order (or the graph has a cycle)"
                        )
                    raise CostGraphError(f"nodes[{i}] ({n.name}).inputs: unknown producer {u!r}")
            seen.add(n.name)
        names = set()
        for i, e in enumerate(self.exits):
            if e.node not in all_names:
                raise CostGraphError(f"exits[{i}].node: unknown node {e.node!r}")
            if e.name in names:
                raise CostGraphError(f"exits[{i}].name: duplicate exit {e.name!r}")
            names.add(e.name)
        if self.progressive is not None:
            self.progressive.check([e.name for e in self.exits])

    def check_limits(self, limits: GraphLimits = DEFAULT_LIMITS) -> None:
        """CostGraphError when the graph exceeds `limits` (nodes, exits, in-degree). O(V)."""
        limits.check_counts(len(self.nodes), len(self.exits))
        for i, n in enumerate(self.nodes):
            if len(n.inputs) > limits.max_in_degree:
                raise CostGraphError(
                    f"nodes[{i}] ({n.name}).inputs: {len(n.inputs)} producers exceed the limit of "
                    f"{limits.max_in_degree}"
                )

    def require_timings(self) -> None:
        """Planning needs both tiers' timings on every node."""
        for i, n in enumerate(self.nodes):
            for key in ("device_ms", "edge_ms"):
                if getattr(n, key) is None:
                    raise CostGraphError(f"nodes[{i}] ({n.name}).{key}: missing timing (run `dapdee profile`)")

    def with_timings(self, tier: str, timings: dict[str, float], meta: dict[str, Any] | None = None) -> CostGraph:
        """A copy with `{tier}_ms` replaced for every node in `timings` (tier: device|edge)."""
        if tier not in ("device", "edge"):
            raise CostGraphError(f"tier: expected 'device' or 'edge', got {tier!r}")
        unknown = set(timings) - {n.name for n in self.nodes}
        if unknown:
            raise CostGraphError(f"timings: unknown nodes {sorted(unknown)[:5]}")
        for name, v in timings.items():
            _check_ms(v, f"timings[{name!r}]")
        nodes = tuple(
            replace(n, **{f"{tier}_ms": float(timings[n.name])}) if n.name in timings else n for n in self.nodes
        )
        new_meta = dict(self.meta)
        if meta:
            new_meta[tier] = meta
        return replace(self, nodes=nodes, meta=new_meta)

    def with_overheads(self, device_request_ms: float | None = None, edge_request_ms: float | None = None) -> CostGraph:
        """A copy with the named per-request overheads replaced (None keeps the current value)."""
        ov = Overheads(
            self.overheads.device_request_ms if device_request_ms is None else float(device_request_ms),
            self.overheads.edge_request_ms if edge_request_ms is None else float(edge_request_ms),
        )
        _overheads(ov.to_dict())  # validate
        return replace(self, overheads=ov)

    def with_accuracies(self, acc: dict[str, float | None]) -> CostGraph:
        return replace(self, exits=tuple(replace(e, accuracy=acc.get(e.name, e.accuracy)) for e in self.exits))

    def structure_key(self) -> str:
        """Hash of what must match for two tiers' profiles to be merged: model, input, nodes, exits.
        O(V + E) the first time, then cached on the graph (it is frozen)."""
        cached = self.__dict__.get("_structure_key")
        if cached is None:
            cached = self._structure_key()
            object.__setattr__(self, "_structure_key", cached)
        return cached

    def _structure_key(self) -> str:
        d = self.to_dict()
        d.pop("meta", None)
        d.pop("overheads", None)
        d.pop("progressive", None)
        for nd in d["nodes"]:
            nd.pop("device_ms", None)
            nd.pop("edge_ms", None)
        for e in d["exits"]:
            e.pop("accuracy", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _parse_input(inp: dict[str, Any]) -> InputSpec:
    shape = _req(inp, "shape", list, "input.shape")
    if not shape or not all(_is_int(s) and 0 < s <= MAX_BYTES for s in shape):
        raise CostGraphError(f"input.shape: expected a non-empty list of integers in [1, {MAX_BYTES}]")
    if shape[0] != 1:  # the shape of one frame: batch first, and a cost graph prices one frame
        raise CostGraphError(f"input.shape: the first entry is the batch and must be 1, got {shape[0]}")
    in_bytes = inp.get("bytes", 0)
    if not _is_int(in_bytes) or not 0 <= in_bytes <= MAX_BYTES:
        raise CostGraphError(f"input.bytes: expected an integer in [0, {MAX_BYTES}], got {in_bytes!r}")
    dtype = inp.get("dtype", "float32")
    if dtype not in INPUT_DTYPES:
        raise CostGraphError(f"input.dtype: expected one of {', '.join(INPUT_DTYPES)}, got {dtype!r}")
    return InputSpec(name=_req(inp, "name", str, "input.name"), shape=tuple(shape), dtype=dtype, bytes=in_bytes)


def _parse_node(i: int, nd: Any) -> Node:
    """One entry of `nodes`, every number bounded and `sendable` (absent: true) a boolean;
    CostGraphError names the field. O(in-degree)."""
    if not isinstance(nd, dict):
        raise CostGraphError(f"nodes[{i}]: expected an object")
    name = _req(nd, "name", str, f"nodes[{i}].name")
    where = f"nodes[{i}] ({name})"
    inputs = _req(nd, "inputs", list, f"{where}.inputs")
    if not all(isinstance(u, str) for u in inputs):
        raise CostGraphError(f"{where}.inputs: expected a list of names")
    out_bytes = _req(nd, "out_bytes", int, f"{where}.out_bytes")
    if not 0 <= out_bytes <= MAX_BYTES:
        raise CostGraphError(f"{where}.out_bytes: expected an integer in [0, {MAX_BYTES}], got {out_bytes}")
    flops = nd.get("flops", 0)
    if not _is_int(flops) or not 0 <= flops <= MAX_FLOPS:
        raise CostGraphError(f"{where}.flops: expected an integer in [0, {MAX_FLOPS}]")
    timings = {}
    for key in ("device_ms", "edge_ms"):
        v = nd.get(key)
        timings[key] = None if v is None else _check_ms(v, f"{where}.{key}")
    nshape = nd.get("shape")
    if nshape is not None and (
        not isinstance(nshape, list) or not all(_is_int(s) and 0 <= s <= MAX_BYTES for s in nshape)
    ):
        raise CostGraphError(f"{where}.shape: expected a list of integers in [0, {MAX_BYTES}]")
    sendable = nd.get("sendable", True)
    if not isinstance(sendable, bool):
        raise CostGraphError(f"{where}.sendable: expected true or false, got {repr(sendable)[:40]}")
    return Node(
        name=name,
        op=str(nd.get("op", "")),
        inputs=tuple(inputs),
        out_bytes=out_bytes,
        flops=flops,
        shape=tuple(nshape) if nshape is not None else None,
        sendable=sendable,
        **timings,
    )


EXIT_FIELDS = ("name", "node", "accuracy")


def _parse_exit(i: int, ed: Any) -> Exit:
    """One entry of `exits`: name, node and accuracy (null or in [0, 1]), nothing else (a
    calibrated confidence exit is described by the graph's `progressive` field, not per exit);
    CostGraphError naming the field. O(fields)."""
    if not isinstance(ed, dict):
        raise CostGraphError(f"exits[{i}]: expected an object")
    unknown = sorted(str(k) for k in ed if k not in EXIT_FIELDS)
    if unknown:
        hint = "; calibrated confidence exits are the graph's `progressive` field" if "confidence" in unknown else ""
        raise CostGraphError(f"exits[{i}]: unknown fields {unknown[:5]} (expected {', '.join(EXIT_FIELDS)}){hint}")
    acc = ed.get("accuracy")
    if acc is not None and (not _is_num(acc) or not 0.0 <= acc <= 1.0):
        raise CostGraphError(f"exits[{i}].accuracy: expected null or a number in [0, 1]")
    return Exit(
        name=_req(ed, "name", str, f"exits[{i}].name"),
        node=_req(ed, "node", str, f"exits[{i}].node"),
        accuracy=None if acc is None else float(acc),
    )


def _check_ms(v: Any, where: str) -> float:
    """`v` as a float when it is a finite number in [0, MAX_MS], else CostGraphError naming `where`."""
    if not is_finite_number(v) or not 0 <= v <= MAX_MS:
        raise CostGraphError(f"{where}: expected a finite number in [0, {MAX_MS:g}], got {v!r}")
    return float(v)


def _overheads(raw: Any) -> Overheads:
    """Parse the optional `overheads` object (absent or null: zeros); CostGraphError names the field."""
    if raw is None:
        return NO_OVERHEADS
    if not isinstance(raw, dict):
        raise CostGraphError("overheads: expected an object")
    unknown = set(raw) - set(OVERHEAD_KEYS)
    if unknown:
        raise CostGraphError(f"overheads: unknown fields {sorted(unknown)}")
    values = {}
    for key in OVERHEAD_KEYS:
        values[key] = _check_ms(raw.get(key, 0.0), f"overheads.{key}")
    return Overheads(**values)


def _progressive(raw: Any) -> Progressive | None:
    """Parse the optional `progressive` object (absent or null: None); types and ranges only,
    `Progressive.check` matches it to the exits. CostGraphError names the field. O(exits²)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CostGraphError("progressive: expected an object")
    unknown = set(raw) - {"rule", "split", "thresholds", "by_exit"}
    if unknown:
        raise CostGraphError(f"progressive: unknown fields {sorted(unknown)}")
    rule, split = raw.get("rule", CONFIDENCE_RULE), raw.get("split")
    if not isinstance(rule, str) or not (split is None or isinstance(split, str)):
        raise CostGraphError("progressive.rule/split: expected strings")
    if rule != CONFIDENCE_RULE:  # the thresholds mean nothing under another rule
        raise CostGraphError(f"progressive.rule: only {CONFIDENCE_RULE!r} is implemented, got {rule[:40]!r}")
    thresholds = _req(raw, "thresholds", dict, "progressive.thresholds")
    by_exit = _req(raw, "by_exit", dict, "progressive.by_exit")
    outcomes = []
    for e, o in by_exit.items():
        where = f"progressive.by_exit.{e}"
        fr = _req(o, "fractions", dict, f"{where}.fractions") if isinstance(o, dict) else None
        if fr is None or set(o) - {"fractions", "accuracy"}:
            raise CostGraphError(f"{where}: expected an object with fractions and accuracy")
        fractions = tuple((k, _unit(q, f"{where}.fractions.{k}")) for k, q in fr.items())
        acc = o.get("accuracy")
        outcomes.append((e, ExitOutcome(fractions, None if acc is None else _unit(acc, f"{where}.accuracy"))))
    return Progressive(
        thresholds=tuple(
            (k, None if t is None else _unit(t, f"progressive.thresholds.{k}")) for k, t in thresholds.items()
        ),
        by_exit=tuple(outcomes),
        rule=rule,
        split=split,
    )


def _unit(v: Any, where: str) -> float:
    """`v` as a float when it is a number in [0, 1], else CostGraphError naming `where`."""
    if not _is_num(v) or not 0.0 <= v <= 1.0:
        raise CostGraphError(f"{where}: expected a number in [0, 1], got {v!r}")
    return float(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """Whether `v` is an int or float (not a bool) that a float holds finitely: an integer of
    hundreds of digits (JSON allows it) is not, and must not reach `math.isfinite`, which raises
    OverflowError for it. O(digits)."""
    if not _is_num(v):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _req(d: dict, key: str, typ: type, where: str) -> Any:
    if key not in d:
        raise CostGraphError(f"{where}: missing")
    v = d[key]
    ok = _is_int(v) if typ is int else isinstance(v, typ)
    if not ok:
        raise CostGraphError(f"{where}: expected {typ.__name__}, got {type(v).__name__}")
    return v

"""A stored model as the planner holds it: cost graph, profiles by tier, version; and how a
model is decoded from what Redis holds."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from dapdee.costgraph import CostGraph, CostGraphError, GraphLimits

log = logging.getLogger("dapdee.planner")

PARSE_INLINE_BYTES = 64 * 1024  # larger stored graphs are parsed in a worker thread


def _hash_json(obj: Any) -> str:
    """Short sha256 of canonical JSON (32 hex digits). O(size)."""
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Profile:
    """Measured timings of one hardware tier for one model's nodes."""

    tier: str
    kind: str  # "device" | "edge"
    timings_ms: dict[str, float]
    meta: dict[str, Any]
    hash: str

    @classmethod
    def make(cls, tier: str, kind: str, timings_ms: dict[str, float], meta: dict[str, Any]) -> Profile:
        body = {"kind": kind, "timings_ms": timings_ms, "meta": meta}
        return cls(tier=tier, kind=kind, timings_ms=timings_ms, meta=meta, hash=_hash_json(body))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "timings_ms": self.timings_ms, "meta": self.meta}

    def to_json(self) -> str:
        """The stored form (a field of the model's profiles hash). O(size)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, tier: str, raw: bytes | str) -> Profile:
        """Parse a stored profile; ValueError when it is not one. O(size)."""
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("kind") not in ("device", "edge"):
            raise ValueError(f"profile {tier!r}: bad kind")
        t = d.get("timings_ms")
        if not isinstance(t, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in t.values()
        ):
            raise ValueError(f"profile {tier!r}: bad timings_ms")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):  # what the API stores is an object: read as one
            raise ValueError(f"profile {tier!r}: meta is not an object")
        return cls.make(tier, d["kind"], {str(k): float(v) for k, v in t.items()}, meta)


@dataclass(frozen=True)
class ModelState:
    """A model's cost graph (as PUT), its content hash, its uploaded profiles by tier and its
    version (1 when created, +1 with every change of the graph or a profile; shared by all
    replicas through Redis), and the id of the last write Redis applied to it ('' when not
    known). Versions restart at 1 when a model is deleted and created again, so a replica tells
    its cached state from the stored one by all three of version, hash and that id."""

    graph: CostGraph
    graph_hash: str
    profiles: dict[str, Profile]
    version: int = 1
    last_op: str = ""


@dataclass(frozen=True)
class PutResult:
    """The outcome of a put: the model as it is now, whether the model (put_graph) or the tier
    (put_profile) is new, the profiles a structure change dropped, and where the change lives:
    "redis" (written), "pending" (queued while Redis is unavailable; replayed when it is back
    if no other replica changed the model meanwhile) or "memory" (no Redis configured)."""

    state: ModelState
    created: bool
    dropped_profiles: list[str] = field(default_factory=list)
    stored: str = "redis"


async def parse_graph(raw: bytes, limits: GraphLimits) -> CostGraph:
    """A stored cost graph, parsed and checked against `limits` (CostGraphError if it is not
    one); graphs over PARSE_INLINE_BYTES are parsed in a worker thread, which also computes their
    structure key (cached on the graph: a write of the model compares it). O(size)."""

    def parse() -> CostGraph:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CostGraphError(f"cost graph: not valid JSON ({exc})") from None
        return CostGraph.from_dict(d, limits)

    def parse_large() -> CostGraph:
        graph = parse()
        graph.structure_key()
        return graph

    if len(raw) > PARSE_INLINE_BYTES:
        return await asyncio.to_thread(parse_large)
    return parse()


def decode_profiles(model: str, raw: dict[bytes, bytes]) -> tuple[dict[str, Profile], int]:
    """The stored profiles of `model` by tier, and how many fields were unreadable (skipped,
    logged). O(size)."""
    profiles: dict[str, Profile] = {}
    bad = 0
    for tier_b, js in raw.items():
        tier = tier_b.decode()
        try:
            profiles[tier] = Profile.from_json(tier, js)
        except (ValueError, TypeError) as exc:
            bad += 1
            log.warning("stored profile %r of model %r unreadable (%s); ignored", tier, model, exc)
    return profiles, bad

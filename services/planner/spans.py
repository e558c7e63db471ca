"""The planner's span of one POST /plan: `planner.plan`, a child of the request's server span,
around the planning itself, with the plan's attributes once it is made. Only used when tracing
records (`dapdee.web.otel.recording()`), so an untraced request pays nothing here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dapdee.web import otel


def request_attributes(model: str, mode: str) -> dict[str, Any]:
    """What the span knows before planning: the model and the mode asked for. O(1)."""
    return {otel.ATTR_MODEL: model, otel.ATTR_MODE: mode}


def plan_attributes(plan: Mapping[str, Any]) -> dict[str, Any]:
    """A plan JSON's span attributes: the mode used, exit, cut (the number of device nodes),
    predicted latency (ms), the transfer's bytes and the edge worker named (its lease's when
    there is a lease; omitted when none). O(transfer tensors)."""
    attributes: dict[str, Any] = {
        otel.ATTR_MODE: plan["mode"],
        otel.ATTR_EXIT: plan["exit"]["name"],
        otel.ATTR_CUT: len(plan["device_nodes"]),
        otel.ATTR_PREDICTED_MS: plan["predicted"]["latency_ms"],
        otel.ATTR_TRANSFER_BYTES: sum(t["bytes"] for t in plan["transfer"]),
    }
    lease = plan.get("lease") or {}
    worker = lease.get("worker", plan.get("edge_worker"))
    if worker:
        attributes[otel.ATTR_WORKER] = worker
    return attributes

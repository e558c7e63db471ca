"""The DAPDEE SDK: typed clients of the planner and the edge workers, on httpx.

    from dapdee.client import PlannerClient, EdgeClient, ApiError

    with PlannerClient("http://127.0.0.1:8080", token) as planner:
        plan = planner.plan({"model": "resnet18", "bandwidth_mbps": 5.85, "device_tier": "phone"})
    with EdgeClient(plan.edge_worker, token) as edge:
        result = edge.infer("resnet18", {node: tensor}, exit=plan.exit.name, wire_dtype="FP16")

`AsyncPlannerClient` and `AsyncEdgeClient` have the same methods for asyncio. Every 4xx/5xx is
an `ApiError` carrying `.status` and `.problem`; see `dapdee.client.errors`.
"""

from dapdee.client.edge import AsyncEdgeClient, EdgeClient, InferResult, infer_call
from dapdee.client.errors import ApiError, ClientError, ProtocolError, RequestError, TransportError
from dapdee.client.planner import AsyncPlannerClient, PlannerClient, StoredGraph, plan_call, profile_body

__all__ = [
    "ApiError",
    "AsyncEdgeClient",
    "AsyncPlannerClient",
    "ClientError",
    "EdgeClient",
    "InferResult",
    "PlannerClient",
    "ProtocolError",
    "RequestError",
    "StoredGraph",
    "TransportError",
    "infer_call",
    "plan_call",
    "profile_body",
]

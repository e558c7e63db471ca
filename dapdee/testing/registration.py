"""Waiting for edge workers to register with a planner (through the SDK)."""

from __future__ import annotations

import time

from dapdee.client import ClientError, PlannerClient


def registered(planner: PlannerClient, model: str, worker_urls: list[str], tier: str | None = None) -> bool:
    """Whether the planner lists every worker in `worker_urls` live and serving `model` (a
    worker restarted under its URL is listed serving nothing after its predecessor's departing
    heartbeat, until its own first one) and holds an edge profile of `model` (of `tier` when
    given). False while the model is unknown or the planner is away."""
    try:
        live = {w.url for w in planner.workers().workers if model in w.models}
        profiles = planner.list_profiles(model).profiles
    except ClientError:
        return False
    edge = {t for t, p in profiles.items() if p.kind == "edge"}
    return set(worker_urls) <= live and (tier in edge if tier is not None else bool(edge))


def wait_registered(
    planner_url: str,
    model: str,
    worker_urls: list[str],
    timeout_s: float = 60.0,
    token: str | None = None,
    tier: str | None = None,
) -> None:
    """Poll (every 0.2 s) until `registered`; TimeoutError after `timeout_s`. `token`: any
    role's, when the planner has tokens."""
    deadline = time.monotonic() + timeout_s
    with PlannerClient(planner_url, token, timeout=2.0) as planner:
        while not registered(planner, model, worker_urls, tier):
            if time.monotonic() > deadline:
                raise TimeoutError(f"edge workers {worker_urls} did not register {model!r} with {planner_url}")
            time.sleep(0.2)

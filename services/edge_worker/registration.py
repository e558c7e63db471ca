"""Registration with the planner: the cost graph, this tier's edge timings, and heartbeats.

Profiles come from a cache file when one matches the model's structure, else from
`dapdee.profiler.profile_model` (then cached). The planner being away never stops the worker:
every call is retried with backoff and failures are only logged.

Tokens: registering graphs and profiles is an admin action (`DAPDEE_ADMIN_TOKEN`), heartbeats
are the worker role's (`DAPDEE_WORKER_TOKEN`); `DAPDEE_API_TOKEN` stands in for either. With
only a worker token the worker heartbeats and logs that registration needs the admin token;
with no token at all it talks to an open planner without one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.edge_worker.deps import ModelEntry, WorkerState
from dapdee.web.tracecontext import ainject_traceparent

log = logging.getLogger("dapdee.edge.registration")


def profile_path(cache_dir: str, model: str, tier: str) -> Path:
    """`{cache_dir}/{model}.{tier}.edge.json` (model and tier are validated names, not paths)."""
    return Path(cache_dir) / f"{model}.{tier}.edge.json"


def profile_entry(state: WorkerState, entry: ModelEntry) -> CostGraph:
    """The model's graph with `edge_ms` filled: from the cache when it matches, else measured.
    Runs in a worker thread (blocking). O(repeats x one forward pass) when measuring."""
    s = state.settings
    path = profile_path(s.profile_cache, entry.name, s.tier) if s.profile_cache else None
    if path is not None and path.is_file():
        try:
            cached = CostGraph.load(str(path))
            if cached.structure_key() == entry.graph.structure_key() and cached.has_timings("edge"):
                log.info("model %s: edge profile from %s", entry.name, path)
                return cached
            log.warning(
                "model %s: cached profile %s does not match the model; re-profiling", entry.name, path
            )
        except CostGraphError as exc:
            log.warning("model %s: cannot use cached profile: %s", entry.name, exc)
    from dapdee.profiler import profile_model

    log.info("model %s: profiling edge timings (%d repeats)", entry.name, s.profile_repeats)
    graph = profile_model(
        entry.loaded, tier="edge", slowdown=s.slowdown, repeats=s.profile_repeats, warmup=s.profile_warmup
    )
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            graph.save(str(tmp))
            tmp.replace(path)
        except OSError as exc:
            log.warning("model %s: cannot write profile cache %s: %s", entry.name, path, exc)
    return graph


def heartbeat_body(state: WorkerState, public_url: str) -> dict[str, Any]:
    """The worker's heartbeat: URL, models, tier, load, queue and its compute capacity
    (`capacity_ms_per_s`: compute milliseconds it can spend per second, 1000 per pool thread)."""
    return {
        "url": public_url,
        "models": sorted(state.models),
        "tier": state.settings.tier,
        "load": state.batcher.load(),
        "inflight": state.inflight,
        "queue_depth": state.batcher.queued,
        "capacity_ms_per_s": 1000.0 * state.settings.workers,
    }


@dataclass(frozen=True)
class PlannerAuth:
    """The Authorization headers of each kind of planner call (None: the call is not made)."""

    admin: dict[str, str] | None  # PUT models and profiles
    worker: dict[str, str]  # heartbeats and the reads that check registration

    @classmethod
    def of(cls, admin: str | None, worker: str | None, any_role: str | None) -> PlannerAuth:
        """From the configured tokens; an open setup (no token at all) sends none."""

        def bearer(token: str | None) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"} if token else {}

        admin, worker = admin or any_role, worker or any_role
        if not admin and not worker:
            return cls({}, {})
        return cls(bearer(admin) if admin else None, bearer(worker or admin))


def planner_auth(state: WorkerState) -> PlannerAuth:
    s = state.settings

    def raw(secret: Any) -> str | None:
        return secret.get_secret_value() if secret is not None else None

    return PlannerAuth.of(raw(s.admin_token), raw(s.worker_token), raw(s.api_token))


async def _call(
    client: httpx.AsyncClient, method: str, url: str, body: dict[str, Any], headers: dict[str, str]
) -> bool:
    try:
        r = await client.request(method, url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("planner %s %s failed: %s", method, url, exc.__class__.__name__)
        return False
    if r.status_code >= 300:
        hint = ""
        if r.status_code == 422 and "capacity_ms_per_s" in r.text:
            hint = " (this planner does not know the heartbeat field capacity_ms_per_s yet)"
        log.warning("planner %s %s answered %d: %s%s", method, url, r.status_code, r.text[:200], hint)
        return False
    return True


async def _still_registered(
    client: httpx.AsyncClient, base: str, model: str, tier: str, with_profile: bool, headers: dict[str, str]
) -> bool:
    """False only when the planner answers that it lacks the model (or this tier's edge
    profile); errors count as registered (the next heartbeat asks again)."""
    try:
        r = await client.get(f"{base}/models/{model}/profiles", headers=headers)
    except httpx.HTTPError:
        return True
    if r.status_code == 404:
        return False
    if r.status_code != 200 or not with_profile:
        return True
    try:
        return tier in r.json().get("profiles", {})
    except (ValueError, AttributeError):
        return True


async def _edge_graphs(state: WorkerState) -> dict[str, CostGraph]:
    """Each model's graph with this tier's edge timings (profiled or cached) when profiling is
    on; a profiling failure registers the graph without timings rather than stopping."""
    graphs: dict[str, CostGraph] = {}
    for name, entry in state.models.items():
        graphs[name] = entry.graph
        if not state.settings.profile:
            continue
        try:
            graphs[name] = entry.graph = await asyncio.to_thread(profile_entry, state, entry)
            state.registration["profiled"].append(name)
        except Exception as exc:  # a profiling failure must not take the worker down
            why = f"{type(exc).__name__}: {exc}"
            log.error("model %s: profiling failed (%s); registering without edge timings", name, why)
    return graphs


async def _register(
    client: httpx.AsyncClient,
    base: str,
    state: WorkerState,
    name: str,
    graph: CostGraph,
    public_url: str,
    headers: dict[str, str],
) -> bool:
    """PUT the model's graph, then this tier's edge profile (when timed). True when both took."""
    tier = state.settings.tier
    ok = await _call(client, "PUT", f"{base}/models/{name}", graph.to_dict(), headers)
    if ok and graph.has_timings("edge"):
        timings = {n.name: n.edge_ms for n in graph.nodes}
        meta = {**graph.meta.get("edge", {}), "tier": tier, "worker": public_url}
        body = {"kind": "edge", "timings_ms": timings, "meta": meta}
        ok = await _call(client, "PUT", f"{base}/models/{name}/profiles/{tier}", body, headers)
    if ok:
        log.info("model %s registered with planner %s (tier %s)", name, base, tier)
    return ok


async def run_registration(state: WorkerState, public_url: str) -> None:
    """Profile (or load) each model's edge timings, register graph and profile with the planner
    until it accepts them (admin token), and heartbeat every `heartbeat_s` seconds (worker
    token) until cancelled."""
    s = state.settings
    assert s.planner_url is not None
    base = s.planner_url.rstrip("/")
    auth = planner_auth(state)
    reg = state.registration
    reg.update({"planner": base, "registered": [], "heartbeats": 0, "profiled": []})
    graphs = await _edge_graphs(state)
    if auth.admin is None:
        log.warning(
            "planner %s: registering models and edge profiles needs DAPDEE_ADMIN_TOKEN; "
            "heartbeating only (the models must already be on the planner)",
            base,
        )
    pending = dict(graphs) if auth.admin is not None else {}
    delay = 0.5
    # each planner call carries a traceparent (a trace of its own: the loop runs outside requests)
    async with httpx.AsyncClient(timeout=s.planner_timeout_s, event_hooks={"request": [ainject_traceparent]}) as client:
        while True:
            for name, graph in list(pending.items()):
                if auth.admin is not None and await _register(client, base, state, name, graph, public_url, auth.admin):
                    pending.pop(name)
                    reg["registered"].append(name)
            body = heartbeat_body(state, public_url)
            hb_ok = await _call(client, "POST", f"{base}/workers/heartbeat", body, auth.worker)
            if hb_ok:
                reg["heartbeats"] += 1
            if hb_ok and not pending and auth.admin is not None:
                # a restarted planner without Redis forgot everything: register again
                for name, graph in graphs.items():
                    timed = graph.has_timings("edge")
                    if not await _still_registered(client, base, name, s.tier, timed, auth.worker):
                        log.warning("planner %s lost model %s; registering it again", base, name)
                        pending[name] = graph
            if hb_ok and not pending:
                delay = 0.5
                await asyncio.sleep(s.heartbeat_s)
            else:
                await asyncio.sleep(min(delay, s.heartbeat_s))
                delay = min(delay * 2, s.heartbeat_s)

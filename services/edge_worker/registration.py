"""Registration with the planner: the cost graph, this tier's edge timings, and heartbeats.

Profiles come from a cache file when one matches the model's structure, else from
`dapdee.profiler.profile_model` (then cached). The planner being away never stops the worker:
every call is retried with backoff and failures are only logged.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.edge_worker.deps import ModelEntry, WorkerState

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
    return {
        "url": public_url,
        "models": sorted(state.models),
        "tier": state.settings.tier,
        "load": state.batcher.load(),
        "inflight": state.inflight,
        "queue_depth": state.batcher.queued,
    }


async def _call(client: httpx.AsyncClient, method: str, url: str, body: dict[str, Any]) -> bool:
    try:
        r = await client.request(method, url, json=body)
    except httpx.HTTPError as exc:
        log.warning("planner %s %s failed: %s", method, url, exc.__class__.__name__)
        return False
    if r.status_code >= 300:
        log.warning("planner %s %s answered %d: %s", method, url, r.status_code, r.text[:200])
        return False
    return True


async def _still_registered(
    client: httpx.AsyncClient, base: str, model: str, tier: str, with_profile: bool
) -> bool:
    """False only when the planner answers that it lacks the model (or this tier's edge
    profile); errors count as registered (the next heartbeat asks again)."""
    try:
        r = await client.get(f"{base}/models/{model}/profiles")
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


async def run_registration(state: WorkerState, public_url: str) -> None:
    """Profile (or load) each model's edge timings, register graph and profile with the planner
    until it accepts them, and heartbeat every `heartbeat_s` seconds until cancelled."""
    s = state.settings
    assert s.planner_url is not None
    base = s.planner_url.rstrip("/")
    headers = {"Authorization": f"Bearer {s.api_token.get_secret_value()}"} if s.api_token else {}
    reg = state.registration
    reg.update({"planner": base, "registered": [], "heartbeats": 0, "profiled": []})
    graphs: dict[str, CostGraph] = {}
    for name, entry in state.models.items():
        if s.profile:
            try:
                graphs[name] = await asyncio.to_thread(profile_entry, state, entry)
                entry.graph = graphs[name]
                reg["profiled"].append(name)
            except Exception as exc:  # a profiling failure must not take the worker down
                log.error(
                    "model %s: profiling failed (%s: %s); registering without edge timings",
                    name,
                    type(exc).__name__,
                    exc,
                )
                graphs[name] = entry.graph
        else:
            graphs[name] = entry.graph
    pending = dict(graphs)
    delay = 0.5
    async with httpx.AsyncClient(timeout=s.planner_timeout_s, headers=headers) as client:
        while True:
            for name, graph in list(pending.items()):
                ok = await _call(client, "PUT", f"{base}/models/{name}", graph.to_dict())
                if ok and graph.has_timings("edge"):
                    timings = {n.name: n.edge_ms for n in graph.nodes}
                    meta = {**graph.meta.get("edge", {}), "tier": s.tier, "worker": public_url}
                    ok = await _call(
                        client,
                        "PUT",
                        f"{base}/models/{name}/profiles/{s.tier}",
                        {"kind": "edge", "timings_ms": timings, "meta": meta},
                    )
                if ok:
                    pending.pop(name)
                    reg["registered"].append(name)
                    log.info("model %s registered with planner %s (tier %s)", name, base, s.tier)
            hb_ok = await _call(
                client, "POST", f"{base}/workers/heartbeat", heartbeat_body(state, public_url)
            )
            if hb_ok:
                reg["heartbeats"] += 1
            if hb_ok and not pending:
                # a restarted planner without Redis forgot everything: register again
                for name, graph in graphs.items():
                    if not await _still_registered(client, base, name, s.tier, graph.has_timings("edge")):
                        log.warning("planner %s lost model %s; registering it again", base, name)
                        pending[name] = graph
            if hb_ok and not pending:
                delay = 0.5
                await asyncio.sleep(s.heartbeat_s)
            else:
                await asyncio.sleep(min(delay, s.heartbeat_s))
                delay = min(delay * 2, s.heartbeat_s)

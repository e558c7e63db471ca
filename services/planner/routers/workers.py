"""Edge-worker registry: heartbeats in (worker role), live workers out (any role)."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import urlsplit

from fastapi import APIRouter

from dapdee.api.planner import HeartbeatAnswer, HeartbeatBody, WorkerInfo, WorkerList
from dapdee.planner.deps import SettingsDep, StoreDep
from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.json_body import PydanticJsonRoute
from dapdee.planner.plan_choice import load_order
from dapdee.planner.problems import ApiProblem
from dapdee.planner.store import Worker
from dapdee.web.security import ANY_ROLE, WORKER, require

router = APIRouter(prefix="/workers", tags=["workers"], route_class=PydanticJsonRoute)


def allowed_url(url: str, pattern: str) -> str:
    """`url` without a trailing slash when it is an http(s) URL, its port (if any) written as one
    URL per worker (1..65535, no leading zeros), that fullmatches the planner's
    `worker_url_pattern`, else 422 naming the problem (devices send their frames and token to
    it). O(len(url))."""
    url = url.rstrip("/")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range
    except ValueError as exc:  # e.g. an unclosed or non-IP bracketed host
        raise ApiProblem(422, f"url: not a valid URL ({exc})", loc=("body", "url")) from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ApiProblem(422, f"url: expected an http(s) URL, got {url!r}", loc=("body", "url"))
    if port is not None and (port == 0 or parts.netloc.rsplit(":", 1)[1] != str(port)):
        # one worker, one URL: ":080" and ":80" would register it twice, its capacity counted twice
        raise ApiProblem(422, f"url: port must be 1..65535 without leading zeros, got {url!r}", loc=("body", "url"))
    if re.fullmatch(pattern, url) is None:
        raise ApiProblem(
            422,
            f"url: {url!r} does not match the planner's worker_url_pattern {pattern!r} "
            "(set DAPDEE_WORKER_URL_PATTERN to allow it)",
            loc=("body", "url"),
        )
    return url


@router.post("/heartbeat", response_model=HeartbeatAnswer, dependencies=[require(WORKER)])
async def heartbeat(hb: HeartbeatBody, store: StoreDep, settings: SettingsDep) -> HeartbeatAnswer:
    """Register or refresh a worker; it stays live for DAPDEE_WORKER_TTL_S after this."""
    w = Worker(
        url=allowed_url(hb.url, settings.worker_url_pattern),
        models=tuple(dict.fromkeys(hb.models)),
        tier=hb.tier,
        load=hb.load,
        inflight=hb.inflight,
        queue_depth=hb.queue_depth,
        capacity_ms_per_s=hb.capacity_ms_per_s,
        nominal_ms_per_s=hb.nominal_ms_per_s,
    )
    shared = await store.heartbeats.record(w)
    if settings.fleet_planning:
        store.rebalancer.note_capacity(w.url, w.capacity_ms_per_s)
    return HeartbeatAnswer(url=w.url, ttl_s=settings.worker_ttl_s, shared=shared)


@router.get("", response_model=WorkerList, dependencies=[require(ANY_ROLE)])
async def list_workers(store: StoreDep) -> WorkerList:
    """Live workers, least loaded first as plans rank them (`load_order`: the edge load the
    live leases put on each, then the heartbeat load), with the seconds until each expires and
    what the live leases reserve on each (`leased_ms_per_s` = Σ f_j·e_j, `leases`)."""
    workers = await store.registry.live()
    with contextlib.suppress(RedisUnavailable):
        await store.fleet.refresh()  # fresh reservations when Redis answers, else the last view
    booked = {w.url: store.fleet.leased(w.url) for w in workers}
    out = []
    for w in sorted(workers, key=lambda w: load_order(w, booked[w.url][0])):
        leased, count = booked[w.url]
        out.append(
            WorkerInfo(
                url=w.url,
                models=list(w.models),
                tier=w.tier,
                load=w.load,
                inflight=w.inflight,
                queue_depth=w.queue_depth,
                capacity_ms_per_s=w.capacity_ms_per_s,
                nominal_ms_per_s=w.nominal,
                expires_in_s=w.expires_in_s,
                leased_ms_per_s=leased,
                leases=count,
            )
        )
    return WorkerList(workers=out)

"""What one lease reservation costs Redis, against how many devices share the worker.

Every `POST /plan` with a `device_id` runs one reservation script (`LeaseBook.reserve`) in
Redis, whose single thread every planner replica shares. For each N in `--devices`, N devices
reserve on one worker of a fresh key prefix, then `--renewals` renewals go round them (each a
reservation that re-checks admission against the others' total, as a renewing device's does);
Redis's own CPU time for them is read from `INFO commandstats` (the change in `cmdstat_evalsha`
over the renewals, nothing else running the scripts). Prints µs per reservation at each N and
the ratio of the largest N to the smallest; target: at most 2x (admission reads a kept total,
O(1) in the devices on the worker).

    python bench/lease_redis.py [--devices 4 256 1024] [--renewals 3000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio

import redis
from tqdm import tqdm

from dapdee.planner.config import Settings
from dapdee.planner.leases import LeaseBook
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.redis_link import RedisLink
from dapdee.testing import clear_prefix, unique_prefix

TARGET_X = 2.0
WORKER = "http://bench-worker:8001"
RECORD = {"device_id": "d", "model": "m", "plan": {"device_nodes": [f"n{i}" for i in range(40)]}}


def _evalsha_usec(r: redis.Redis) -> tuple[int, int]:
    """(calls, µs) Redis has spent in EVALSHA since its stats were last reset."""
    stats = r.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(stats["calls"]), int(stats["usec"])


async def _per_reservation_us(url: str, devices: int, renewals: int) -> float:
    """Redis µs per renewal with `devices` reservations on one worker (a fresh prefix)."""
    prefix = unique_prefix("bench-lease-redis")
    link = RedisLink(Settings(redis_url=url, redis_timeout_s=10.0), PlannerMetrics())
    link.connect()
    book = LeaseBook(link, prefix, ttl_s=600.0, max_leases=devices + 1, rho_max=0.9)
    r = redis.Redis.from_url(url)
    try:
        for i in range(devices):
            await book.reserve(f"d{i}", WORKER, 1.0 + i % 7, 1e12, RECORD)
        calls0, usec0 = _evalsha_usec(r)
        for k in range(renewals):
            res = await book.reserve(f"d{k % devices}", WORKER, 1.0 + k % 7, 1e12, RECORD)
            if res.status != "reserved":
                raise SystemExit(f"a renewal was {res.status}, not reserved")
        calls1, usec1 = _evalsha_usec(r)
        if calls1 - calls0 < renewals:
            raise SystemExit("INFO commandstats did not count the reservations")
        return (usec1 - usec0) / (calls1 - calls0)
    finally:
        r.close()
        await link.close()
        clear_prefix(url, prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[4, 256, 1024])
    ap.add_argument("--renewals", type=int, default=3000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)
    if min(args.devices) < 1 or args.renewals < 1:
        ap.error("--devices and --renewals must be >= 1")
    cost = {n: asyncio.run(_per_reservation_us(args.redis_url, n, args.renewals)) for n in tqdm(args.devices)}
    print(f"Redis CPU per lease reservation ({args.renewals} renewals each), by devices on the worker:")
    for n, us in cost.items():
        print(f"  {n:5d} devices: {us:6.1f} us")
    lo, hi = min(cost), max(cost)
    ratio = cost[hi] / cost[lo]
    passed = ratio <= TARGET_X
    print(f"  {hi} vs {lo} devices: {ratio:.2f}x (target <= {TARGET_X:g}x): {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

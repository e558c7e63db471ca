"""Edge leases in Redis, shared by every planner replica, reserved atomically.

A lease says that device `d` offers `f` frames per second to worker `w` with a plan that costs
`e` ms of the worker per frame, so it reserves `f·e` ms per second of the worker's capacity
until it expires (`lease_ttl_s` after the last `POST /plan` of that device). Leases survive
a planner restart and are seen by every replica.

Why Lua and not WATCH: admission is "the others' reservations plus mine stay under ρ_max·C",
a read of a whole worker's reservations followed by a write. Under WATCH every concurrent
admission on the same worker would abort and retry (the hot case of a fleet starting at
once); a Lua script runs atomically inside Redis, reads and writes in one round trip, and
never retries. The scripts take expiry times from Redis's own clock (`TIME`), so replicas'
clocks never matter.

Keys (`P` = the planner's key prefix with schema version):

- `P:lease:{device}`        the lease record (JSON), with a TTL
- `P:leases`                zset device -> expiry (ms, Redis clock): all leases, for the cap
- `P:lease-worker`          hash device -> worker URL its lease is on (absent: none; 0 ms/s counts)
- `P:wload:{url}`           hash device -> reserved ms per second on that worker
- `P:wexp:{url}`            zset device -> expiry (ms) of each reservation on that worker
- `P:wsum:{url}`            hash: the total of `P:wload:{url}` (admission reads it in O(1))

Admission and rebalancing also read `P:workers:info` (the worker registry,
`dapdee.planner.workers`): a worker's reservations stay within ρ_max × the capacity its last
heartbeat states, checked inside the same script, so a replica whose view of a worker's capacity
is older than its last heartbeat (the worker measured itself slower) can neither admit nor apply
a rebalance past it. The refusal carries the capacity now, to plan again with. The apply script
can also register the worker's heartbeat with the rebalance (a capacity drop: the registry
refuses a capacity its reservations book past ρ_max of, `dapdee.planner.workers`). Until then
that capacity is pending (`P:workers:refused`): admission books within ρ_max of it too (a device
that re-plans meanwhile is not booked against a capacity the worker no longer has), and no other
rebalance of the worker applies (it solved for the capacity before). So, where
rebalancing is periodic, each write to either side is checked against the other; the one
exception is the planner's fallback when a capacity drop cannot be re-solved (`HeartbeatIntake.record`).

A lease record is known by its tag, the SHA-1 of its stored text (`record_tag`), and by its
basis, the SHA-1 of what a rebalance solves the lease from (`record_basis`: the device, model,
tier, frame rate, recorded request, worker, the content hash of the graph it was planned on
(its timings included) and the plan's exit and cut, not its predictions),
which the stored text carries as its first field (`record_text`) so that a script reads it
without decoding the JSON. A write that depends on a record a replica read names what it read,
and the script writes nothing when that is another by now. A replica plans a device from the
record Redis holds, not from its own older copy (`View`, by tag: any change matters there). A
rebalance's apply, computed from the records of a few seconds before, must not write back a
record its device has replaced meanwhile (a new frame rate, another plan, a move to
Device-Only), but a re-plan that only re-priced the same plan (its predictions follow the
load) leaves the solve's inputs as they were, so the apply names bases: compared by tag, each
wave of re-plans refused the rebalances computed before it. The record and its entry in
`P:leases` expire at the same instant (`PXAT`).

The scripts name some keys they compute from the prefix (a device's previous worker), so
the planner needs a single Redis instance (not a cluster), as it does for everything else.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json

# The Lua functions the lease scripts share (and the registry's heartbeat script,
# `dapdee.planner.workers`, for `booked` and `over`): a worker's reservations and their total,
# purging expired ones, Redis's clock, the others' reservations, the limit a worker's registered
# capacity sets, whether a total passes a limit, what a worker's reservations book.
LEASE_FUNCTIONS = """
-- What a worker's reservations book in all (ms/s), kept in `P:wsum:{url}` (fields `total`, and
-- `writes`: the updates since it was summed from the hash), so that admission reads it in O(1)
-- instead of summing every reservation inside Redis on every request. Summed from the hash
-- again when absent or after RESUM updates: float rounding then drifts by at most ~RESUM ulps
-- of the total, far within what a view check (1e-6 ms/s) and `over` (1e-9 of the limit) allow.
local RESUM = 1000
local function total(prefix, worker)
  local k = prefix .. ':wsum:' .. worker
  local t = redis.call('HMGET', k, 'total', 'writes')
  if t[1] and tonumber(t[2]) < RESUM then return tonumber(t[1]) end
  local sum, vals = 0, redis.call('HVALS', prefix .. ':wload:' .. worker)
  for _, v in ipairs(vals) do sum = sum + tonumber(v) end
  if #vals > 0 then  -- a worker without reservations keeps no total (no key per URL ever asked)
    redis.call('HSET', k, 'total', string.format('%.17g', sum), 'writes', 0)
  end
  return sum
end
-- Set the device's reservation on the worker to `load` (a numeric string) until `expiry`
-- (Redis ms), or with `load` nil free it: its entries in the worker's hash and expiry zset,
-- the device's worker, and the worker's total (dropped with the last reservation: 0 again).
local function set_reservation(prefix, worker, device, load, expiry)
  local wload, k = prefix .. ':wload:' .. worker, prefix .. ':wsum:' .. worker
  local old = redis.call('HGET', wload, device)
  if load then
    redis.call('HSET', wload, device, load)
    redis.call('ZADD', prefix .. ':wexp:' .. worker, expiry, device)
    redis.call('HSET', prefix .. ':lease-worker', device, worker)
  else
    redis.call('HDEL', wload, device)
    redis.call('ZREM', prefix .. ':wexp:' .. worker, device)
    redis.call('HDEL', prefix .. ':lease-worker', device)
  end
  if redis.call('HLEN', wload) == 0 then
    redis.call('DEL', k)
    return
  end
  local delta = (load and tonumber(load) or 0) - (old and tonumber(old) or 0)
  local t = delta ~= 0 and redis.call('HGET', k, 'total')
  if t then  -- (a renewal at the same load, the common write, leaves the total as it is)
    redis.call('HSET', k, 'total', string.format('%.17g', tonumber(t) + delta))
    redis.call('HINCRBY', k, 'writes', 1)
  end
end
-- Drop the worker's reservations that expired by `now` (its total is summed again next read).
local function purge(prefix, worker, now)
  local wexp = prefix .. ':wexp:' .. worker
  local old = redis.call('ZRANGEBYSCORE', wexp, '-inf', now)
  if #old == 0 then return end
  for _, d in ipairs(old) do redis.call('HDEL', prefix .. ':wload:' .. worker, d) end
  redis.call('ZREMRANGEBYSCORE', wexp, '-inf', now)
  redis.call('DEL', prefix .. ':wsum:' .. worker)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- What the devices other than `device` reserve on the worker (ms/s; the total less its own,
-- never below 0 by rounding). O(1).
local function others(prefix, worker, device)
  local own = redis.call('HGET', prefix .. ':wload:' .. worker, device)
  return math.max(0, total(prefix, worker) - (own and tonumber(own) or 0))
end
-- The basis a lease record's text starts with (`record_text`); '' for a text without one.
local function basis(raw)
  return string.match(raw, '^{"basis":"(%x+)"') or ''
end
-- Free the device's reservation (if it holds one) on the worker it names.
local function free_reservation(prefix, device)
  local w = redis.call('HGET', prefix .. ':lease-worker', device)
  if w then set_reservation(prefix, w, device, nil) end
end
local function purge_leases(prefix, leases, now)
  local old = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, d in ipairs(old) do free_reservation(prefix, d) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', leases, '-inf', now) end
end
-- The worker's refused heartbeat whose re-solve is pending (`dapdee.planner.workers`), a table
-- {at = Redis ms, capacity = ms/s}, or nil.
local function refusal(prefix, worker)
  local raw = redis.call('HGET', prefix .. ':workers:refused', worker)
  if not raw then return nil end
  local ok, r = pcall(cjson.decode, raw)
  if not ok or type(r) ~= 'table' or type(r.at) ~= 'number' or type(r.capacity) ~= 'number' then return nil end
  return r
end
-- Register the heartbeat `info` of `worker` that arrived at `at` (Redis ms) and was refused:
-- live until at + ttl at least (its refusal kept the worker live that long), its refusal ended.
-- Only for the refusal still pending (`refusal`) of a live worker: the caller checks.
local function register_refused(prefix, exp, worker, info, at, ttl)
  if tonumber(redis.call('ZSCORE', exp, worker)) < at + ttl then redis.call('ZADD', exp, at + ttl, worker) end
  redis.call('HSET', prefix .. ':workers:info', worker, info)
  redis.call('HDEL', prefix .. ':workers:refused', worker)
end
-- The worker's last heartbeat in the registry, decoded (nil: none, or not a JSON object).
local function worker_info(prefix, worker)
  local raw = redis.call('HGET', prefix .. ':workers:info', worker)
  if not raw then return nil end
  local ok, info = pcall(cjson.decode, raw)
  if not ok or type(info) ~= 'table' then return nil end
  return info
end
-- The caller's limit, lowered to rho x the capacity the worker's last heartbeat in the registry
-- states (the capacity now, whatever this replica saw), or the refused one `pending` (`refusal`)
-- if that is less, and that capacity ('' if unknown). `info`: the worker's (`worker_info`).
local function capped(info, limit, rho, pending)
  local capacity
  if info and type(info.capacity_ms_per_s) == 'number' then capacity = info.capacity_ms_per_s end
  if pending and (not capacity or pending.capacity < capacity) then capacity = pending.capacity end
  if not capacity then return limit, '' end
  return math.min(limit, rho * capacity), string.format('%.17g', capacity)
end
-- Whether the worker's last heartbeat `info` (`worker_info`) lists `model` (true when it cannot
-- tell: no registry entry, or one without a model list; admission then goes by capacity alone).
local function serves(info, model)
  if not info or type(info.models) ~= 'table' then return true end
  for _, m in ipairs(info.models) do
    if m == model then return true end
  end
  return false
end
-- Whether reservations totalling `sum` pass `limit`, by more than float summation order can
-- (a solver or a replica adds the same loads in another order than Redis does).
local function over(sum, limit)
  return sum > limit * (1 + 1e-9)
end
-- End a device's lease: its reservation, its record and its entry in the lease index.
local function end_lease(prefix, device, lease_key, leases)
  free_reservation(prefix, device)
  local had = redis.call('DEL', lease_key)
  redis.call('ZREM', leases, device)
  return had
end
-- What the live reservations on a worker book in all (ms/s), expired ones dropped first.
local function booked(prefix, worker, now)
  purge(prefix, worker, now)
  return total(prefix, worker)
end
"""

# Reserve (or refresh) a device's lease. KEYS: lease, leases, models (the model registry hash).
# ARGV: prefix, device, worker ('' = none; given, the lease is on it even at a zero load), load,
# limit, ttl_ms, max_leases, record JSON, rho_max
# (the limit is lowered to rho_max x the worker's capacity, registered or pending: `capped`), the model the
# lease is of ('' = not checked), then optionally the planner's view to verify: the tag of the
# device's record it planned from ('' = none), then (worker URL, the others' reservations there
# it assumed) pairs.
# Returns {status, others, capacity}: status 1 reserved, 0 refused (over the limit), -1 lease cap
# reached, -2 the model is not in the registry (deleted while the request was planned: END_MODEL
# has run or will find nothing of this lease), -3 the worker's last heartbeat no longer lists the
# model (it left, or stopped serving it, after this replica last read the registry: `serves`);
# capacity `capped`'s ('' if unknown or no worker);
# or, when the view differs from Redis's (some worker's others differ by more than 1e-6 ms/s, or
# the device's record is another), nothing is written and the answer is {2, record or false,
# url, {device, load, ...}, url, {...}, ...}: the figures to plan with.
RESERVE = (
    LEASE_FUNCTIONS
    + """
local prefix, device, worker = ARGV[1], ARGV[2], ARGV[3]
local load, limit, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local max_leases = tonumber(ARGV[7])
local now = now_ms()
purge_leases(prefix, KEYS[2], now)
if ARGV[10] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[10]) == 0 then return {-2, '0'} end
local seen = {}  -- worker -> the others' reservations there, read while verifying the view
if #ARGV >= 11 then
  local raw = redis.call('GET', KEYS[1])
  local stale = (raw and redis.sha1hex(raw) or '') ~= ARGV[11]
  for i = 12, #ARGV, 2 do
    purge(prefix, ARGV[i], now)
    seen[ARGV[i]] = others(prefix, ARGV[i], device)
    if math.abs(seen[ARGV[i]] - tonumber(ARGV[i + 1])) > 1e-6 then stale = true end
  end
  if stale then
    local out = {2, raw}
    for i = 12, #ARGV, 2 do
      out[#out + 1] = ARGV[i]
      out[#out + 1] = redis.call('HGETALL', prefix .. ':wload:' .. ARGV[i])
    end
    return out
  end
end
if not redis.call('ZSCORE', KEYS[2], device) and redis.call('ZCARD', KEYS[2]) >= max_leases then
  return {-1, '0'}
end
local sum, capacity = 0, ''
if worker ~= '' then
  local info = worker_info(prefix, worker)
  if ARGV[10] ~= '' and not serves(info, ARGV[10]) then return {-3, '0'} end
  sum = seen[worker]  -- nothing was written since: no need to read the worker's hash again
  if sum == nil then
    purge(prefix, worker, now)
    sum = others(prefix, worker, device)
  end
  limit, capacity = capped(info, limit, tonumber(ARGV[9]), refusal(prefix, worker))
  if load > 0 and over(sum + load, limit) then return {0, string.format('%.17g', sum), capacity} end
end
local old = redis.call('HGET', prefix .. ':lease-worker', device)
if old and old ~= worker then set_reservation(prefix, old, device, nil) end
if worker ~= '' then  -- the lease is on it, whatever its load (0: listed, reserving nothing)
  set_reservation(prefix, worker, device, ARGV[4], now + ttl)
end
redis.call('ZADD', KEYS[2], now + ttl, device)
redis.call('SET', KEYS[1], ARGV[8], 'PXAT', now + ttl)
return {1, string.format('%.17g', sum), capacity}
"""
)

# End a lease. KEYS: lease, leases. ARGV: prefix, device. Returns 1 if there was one.
RELEASE = (
    LEASE_FUNCTIONS
    + """
return end_lease(ARGV[1], ARGV[2], KEYS[1], KEYS[2])
"""
)

# End every lease of a deleted model. KEYS: leases, models (the model registry). ARGV: prefix,
# model. Nothing ends while the model exists (created again since the delete: its leases are
# valid). Returns the devices whose lease ended.
END_MODEL = (
    LEASE_FUNCTIONS
    + """
local prefix, model = ARGV[1], ARGV[2]
if redis.call('HEXISTS', KEYS[2], model) == 1 then return {} end
local ended = {}
for _, device in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = prefix .. ':lease:' .. device
  local raw = redis.call('GET', key)
  if raw then
    local ok, rec = pcall(cjson.decode, raw)
    if ok and type(rec) == 'table' and rec.model == model then
      end_lease(prefix, device, key, KEYS[1])
      ended[#ended + 1] = device
    end
  end
end
return ended
"""
)

# Live reservations of every worker: {url, {device, load, ...}, ...} after purging expired ones.
# KEYS: leases. ARGV: prefix.
LOADS = (
    LEASE_FUNCTIONS
    + """
local prefix = ARGV[1]
local now = now_ms()
purge_leases(prefix, KEYS[1], now)
local out = {}
local workers = {}
for _, w in ipairs(redis.call('HVALS', prefix .. ':lease-worker')) do workers[w] = true end
for w, _ in pairs(workers) do
  purge(prefix, w, now)
  table.insert(out, w)
  table.insert(out, redis.call('HGETALL', prefix .. ':wload:' .. w))
end
return out
"""
)

# Apply a rebalance of one worker atomically. KEYS: leases, workers:exp. ARGV: prefix, worker,
# limit, rho_max, then a heartbeat to register with it ('' = none): its worker JSON, its
# capacity, its TTL in ms, Redis's time (ms) when the registry refused it, partial ('1' or ''),
# then quadruples (device, load ('' = off this worker: Device-Only; a number, 0 included, = on
# it), record JSON, the basis of the record it replaces). A device may
# be one whose lease is on this worker or one whose live lease is on no worker (Device-Only: the
# rebalance may bring it onto this worker). With a heartbeat whose refusal is the one pending
# (`refusal`), the limit is lowered to rho_max x the heartbeat's capacity instead of the
# registered one, and the heartbeat is registered with the plans (the worker must be live in
# the registry), expiring its TTL after that refusal at the earliest. With another heartbeat
# (one registered since: none pending; or one refused since) it is not registered, and the
# limit is `capped`'s. Without a heartbeat, a refusal pending refuses the apply (solved for a
# capacity the worker no longer states; the refused heartbeat's re-solve applies). A device
# whose lease is gone, moved to another worker or holds a record of another basis refuses the
# whole apply, or with partial is left as it is (what it reserves here counts with the others').
# Every check comes before the first write. Returns {status, capacity, left devices...}: 1
# applied, 2 refused (the others' reservations plus the new loads exceed the limit), left: those
# partial left as they are; 0 refused, such a device, a refusal pending (or, with a heartbeat,
# the worker is not live); capacity as in RESERVE.
APPLY = (
    LEASE_FUNCTIONS
    + """
local prefix, worker = ARGV[1], ARGV[2]
local wload = prefix .. ':wload:' .. worker
local now = now_ms()
local pending = refusal(prefix, worker)
local limit, capacity = capped(worker_info(prefix, worker), tonumber(ARGV[3]), tonumber(ARGV[4]), pending)
local register = ARGV[5] ~= ''
if register then
  local expiry = redis.call('ZSCORE', KEYS[2], worker)
  if not expiry or tonumber(expiry) <= now then return {0, ''} end
  -- only the re-solve of the refusal pending may register its heartbeat: without one, a newer
  -- heartbeat was registered (it stays, with its capacity); with another, a newer one was
  -- refused (its re-solve registers it, and its capacity is the limit here)
  register = pending ~= nil and pending.at == tonumber(ARGV[8])
  if register then
    capacity = ARGV[6]
    limit = math.min(tonumber(ARGV[3]), tonumber(ARGV[4]) * tonumber(capacity))
  end
elseif pending then
  return {0, capacity}  -- solved for a capacity the worker no longer states; its re-solve applies
end
purge_leases(prefix, KEYS[1], now)
purge(prefix, worker, now)
local partial = ARGV[9] == '1'
local chosen, expiry, sum, left = {}, {}, 0, {}
for i = 10, #ARGV, 4 do
  local d = ARGV[i]
  local cur = redis.call('HGET', prefix .. ':lease-worker', d)
  local raw = redis.call('GET', prefix .. ':lease:' .. d)
  local exp = redis.call('ZSCORE', KEYS[1], d)
  if (cur and cur ~= worker) or not raw or not exp or basis(raw) ~= ARGV[i + 3] then
    if not partial then return {0, capacity} end
    left[#left + 1] = d
  else
    chosen[d], expiry[d] = true, exp
    sum = sum + (tonumber(ARGV[i + 1]) or 0)
  end
end
local all = redis.call('HGETALL', wload)
for i = 1, #all, 2 do
  if not chosen[all[i]] then sum = sum + tonumber(all[i + 1]) end
end
if over(sum, limit) then
  local out = {2, capacity}
  for _, d in ipairs(left) do out[#out + 1] = d end
  return out
end
if register then
  register_refused(prefix, KEYS[2], worker, ARGV[5], tonumber(ARGV[8]), tonumber(ARGV[7]))
end
for i = 10, #ARGV, 4 do
  local d = ARGV[i]
  if chosen[d] then
    set_reservation(prefix, worker, d, ARGV[i + 1] ~= '' and ARGV[i + 1] or nil, expiry[d])
    redis.call('SET', prefix .. ':lease:' .. d, ARGV[i + 2], 'PXAT', math.floor(tonumber(expiry[d])))
  end
end
local out = {1, capacity}
for _, d in ipairs(left) do out[#out + 1] = d end
return out
"""
)


@dataclass(frozen=True)
class Heartbeat:
    """A worker's heartbeat for `LeaseBook.apply` to register with a rebalance of its leases: its
    stored form (`Worker.info_json`), the capacity it states (ms/s), how long it keeps the worker
    live (ms) and Redis's time when the registry refused it (`CapacityBelowLeases`): a heartbeat
    that arrived after that is newer, and the apply keeps it. Registered, it expires `ttl_ms`
    after that refusal, so that an older one applied later does not count as newer."""

    info_json: str
    capacity_ms_per_s: float
    ttl_ms: int
    refused_at_ms: int


BASIS_FIELDS = ("device_id", "model", "device_tier", "frames_per_s", "worker", "graph_hash")


def record_basis(record: dict[str, Any]) -> str:
    """The basis of a lease record: the SHA-1 (hex) of the compact JSON array of what a
    rebalance solves the lease from, `BASIS_FIELDS`' values, then the recorded request's (key,
    value) pairs sorted by key, the plan's exit name and its device nodes; so two records that
    differ only in predictions, `edge_ms_per_frame` or `assigned` share it. O(len(record))."""
    plan = record.get("plan") or {}
    request = record.get("request")
    basis = [record.get(k) for k in BASIS_FIELDS]
    basis += [sorted(request.items()) if isinstance(request, dict) else request]
    basis += [(plan.get("exit") or {}).get("name"), plan.get("device_nodes")]
    return hashlib.sha1(to_json(basis, inf_nan_mode="null")).hexdigest()


def record_text(record: dict[str, Any]) -> str:
    """A lease record's stored text: compact JSON whose first field is its `basis`
    (`record_basis`, recomputed: a `basis` in `record` is replaced), a non-finite number as null
    (as the plan answers). O(len(record))."""
    fields = {k: v for k, v in record.items() if k != "basis"}
    return to_json({"basis": record_basis(fields), **fields}, inf_nan_mode="null").decode()


def record_tag(text: str | bytes) -> str:
    """The tag of a lease record's stored text: its SHA-1 in hex, as Redis's `redis.sha1hex`
    computes it inside the scripts. O(len(text))."""
    return hashlib.sha1(text.encode() if isinstance(text, str) else text).hexdigest()


# a `ReservationView.set`: device, worker (None: none), load (ms/s), held (on the worker at 0)
Change = tuple[str, str | None, float, bool]


@dataclass(frozen=True)
class StoredRecord:
    """A lease record as Redis holds it: its fields (without the basis), its tag (`record_tag`)
    and its basis (`record_basis`; '' for a text without one)."""

    fields: dict[str, Any]
    tag: str
    basis: str = ""


@dataclass(frozen=True)
class View:
    """What a replica planned a device with, for `LeaseBook.reserve` to verify: the tag of the
    device's lease record it planned from ('': none) and, per candidate worker URL, what it
    took the other devices to reserve there (ms per second)."""

    tag: str
    others: dict[str, float]


@dataclass(frozen=True)
class Figures:
    """Redis's own figures when a `View` was out of date: the device's lease record (None: no
    live lease) and per worker URL every reservation there (device -> ms per second, the
    device's own included)."""

    record: StoredRecord | None
    loads: dict[str, dict[str, float]]


class ReservationView:
    """One replica's view of the reservations: worker URL -> device -> ms per second, with each
    worker's total kept beside it so that "what the others reserve" is O(1) per request (totals
    follow each change; a `replace` sums them afresh, so rounding never builds up for long).
    Subtracting a load can leave a total a rounding error below what remains (80.8 + 26.4 −
    80.8 is not 26.4), so a worker without reservations totals exactly 0 and what the others
    reserve is never below 0. A lease on a worker reserving 0 ms/s (`set` with `held`) is
    listed there, adding 0 to its total.

    Redis may read a refresh's answer before a reservation this replica makes while waiting
    for it, so the `set`s made while a read is in flight are logged (`_since`) and made again
    on top of its answer (`replace` with the read's mark). Reads may overlap (the refresh loop,
    a rebalance's or a model delete's refresh), so each read in flight keeps its mark, and the
    log keeps only what the oldest of them may replay: the sets before its mark are dropped once
    they are at least half the log (amortized O(1) per set). So the log holds at most twice the
    sets made since the oldest read in flight was sent, however the reads overlap, where one
    cleared only when no read was in flight grew without bound under overlapping reads."""

    def __init__(self) -> None:
        self._loads: dict[str, dict[str, float]] = {}
        self._totals: dict[str, float] = {}
        self._since: list[Change] = []  # the `set`s made while a read was in flight, from `_base` on
        self._base = 0  # the sequence number (in all `set`s logged) of `_since[0]`
        self._open: dict[int, int] = {}  # reads in flight: mark -> how many
        self._marks: deque[int] = deque()  # their marks as sent (those of reads ended leave lazily)

    def read_started(self) -> int:
        """Note that a read of Redis's figures was sent; the mark to hand `replace` with its
        answer and then `read_ended` (answered or failed). O(1)."""
        mark = self._base + len(self._since)
        self._open[mark] = self._open.get(mark, 0) + 1
        self._marks.append(mark)
        return mark

    def read_ended(self, mark: int) -> None:
        """The read `read_started` gave `mark` is over (answered and replaced, or failed); the
        logged sets no read in flight may replay go (`_trim`). Amortized O(1)."""
        left = self._open.pop(mark) - 1
        if left:
            self._open[mark] = left
        while self._marks and self._marks[0] not in self._open:
            self._marks.popleft()
        self._trim(self._marks[0] if self._marks else self._base + len(self._since))

    def _trim(self, oldest: int) -> None:
        """Drop the logged sets before `oldest` (the oldest mark in flight) once they are at least
        half the log, so each set logged is moved at most once more. Amortized O(1) per set."""
        cut = oldest - self._base
        if cut > 0 and 2 * cut >= len(self._since):
            del self._since[:cut]
            self._base = oldest

    def replace(self, loads: dict[str, dict[str, float]], every: bool = False, mark: int | None = None) -> None:
        """Take `loads` for the workers it names (`every`: as the whole view). With `mark` (a
        read's, `read_started`, before its `read_ended`), the `set`s made since that read was
        sent are made again on top: its answer may have been read before them.
        O(reservations + those sets)."""
        if every:
            self._loads, self._totals = {}, {}
        for url, per_device in loads.items():
            self._loads[url] = dict(per_device)
            self._totals[url] = sum(per_device.values())
        for change in self._since[max(0, mark - self._base) :] if mark is not None else ():
            self._set(*change)

    def set(self, device_id: str, worker: str | None, load: float, held: bool = False) -> None:
        """The device now reserves `load` on `worker` (None, or 0 unless `held`: nothing) and
        nothing elsewhere; `held`: its lease is on `worker` even at a zero load (a zero-cost
        edge plan: listed there, reserving 0 ms/s). O(workers), plus O(1) to log it while a
        read is in flight."""
        if self._open:
            self._since.append((device_id, worker, load, held))
        self._set(device_id, worker, load, held)

    def _set(self, device_id: str, worker: str | None, load: float, held: bool) -> None:
        for url, per_device in self._loads.items():
            old = per_device.pop(device_id, None)
            if old is not None:
                self._totals[url] = self._totals[url] - old if per_device else 0.0
        if worker is not None and (load > 0 or held):
            self._loads.setdefault(worker, {})[device_id] = load
            self._totals[worker] = self._totals.get(worker, 0.0) + load

    def others(self, worker: str, device_id: str | None) -> float:
        """What the devices other than `device_id` reserve on `worker` (ms/s). O(1)."""
        return max(0.0, self._totals.get(worker, 0.0) - self._loads.get(worker, {}).get(device_id or "", 0.0))

    def leased(self, worker: str) -> tuple[float, int]:
        """(Σ f_j·e_j, lease count) on `worker`. O(1)."""
        return max(0.0, self._totals.get(worker, 0.0)), len(self._loads.get(worker, {}))


@dataclass(frozen=True)
class Reservation:
    """The outcome of `LeaseBook.reserve`: `status` "reserved" | "refused" | "full" (the lease
    cap) | "stale" (the view to verify was out of date: nothing written, `figures` says what is
    true) | "gone" (the model is not in the registry: nothing written) | "departed" (the
    worker's last heartbeat no longer lists the model: nothing written); what the other devices
    reserve on the worker (ms per second, Redis's view now); the worker's capacity in the
    registry, or a refused one pending if less (ms per second; None: no worker, or not
    registered); and the tag of the record
    stored ('' unless reserved)."""

    status: str
    others_ms_per_s: float
    figures: Figures | None = None
    capacity_ms_per_s: float | None = None
    tag: str = ""


@dataclass(frozen=True)
class Application:
    """The outcome of `LeaseBook.apply`: `status` "applied" | "changed" (a device's lease ended,
    moved or was replaced meanwhile, or the worker's capacity is being re-solved) | "over" (the
    worker's reservations would pass the limit); nothing is written unless applied.
    `capacity_ms_per_s` as in `Reservation`; `left`: the devices a partial apply left (or
    would have left) as they were."""

    status: str
    capacity_ms_per_s: float | None
    left: tuple[str, ...] = ()


class LeaseBook:
    """Leases in Redis (see the module docstring), through the planner's `RedisLink` (so Redis
    being away raises RedisUnavailable, counted, like every other Redis call). Every method is
    one round trip: a Lua script or a pipelined read. `rho_max`: the share of a worker's
    registered capacity its reservations may take (whatever limit a caller passes)."""

    def __init__(self, link: Any, base: str, ttl_s: float, max_leases: int, rho_max: float) -> None:
        self.link = link
        self.prefix = base
        self.k_models = f"{base}:models"  # the model registry (`Keys.models`)
        self.rho_max = rho_max
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_leases = max_leases
        self.k_leases = f"{base}:leases"

    def k_lease(self, device_id: str) -> str:
        return f"{self.prefix}:lease:{device_id}"

    async def reserve(
        self,
        device_id: str,
        worker: str | None,
        load_ms_per_s: float,
        limit_ms_per_s: float,
        record: dict[str, Any],
        view: View | None = None,
        model: str = "",
    ) -> Reservation:
        """Create or refresh the device's lease: reserve `load_ms_per_s` on `worker` (None: hold
        no reservation) if the other reservations plus it stay <= `limit` and <= ρ_max × the
        worker's registered capacity (or a refused one pending, if less), and store `record` with
        the lease TTL. A device moving to another worker frees the old one. The lease is on
        `worker` (listed and rebalanced there) when it reserves something there or its record
        names it (`record["worker"]`, as the planner's records do), so a zero-cost edge plan
        (e_i = 0) is on its worker reserving 0 ms/s; a zero load on a worker the record does not
        name holds no reservation (`on_worker`).
        With `model`, nothing is written when that model is not in the registry ("gone": it was
        deleted while the request was planned, and its leases have ended or are ending), nor
        when `worker`'s last heartbeat no longer lists it ("departed": the worker left or stopped
        serving it after this replica last read the registry).
        With `view`, first check that it is Redis's own (the device's record has the view's tag,
        every named worker's others are within 1e-6 ms/s), else write nothing and answer "stale"
        with the true figures. Atomic across replicas. O(1) inside Redis per named worker (each
        worker's total is kept; a stale answer carries the workers' reservations)."""
        text = record_text(record)
        args: list[Any] = [
            self.prefix,
            device_id,
            worker if on_worker(worker, load_ms_per_s, record) else "",
            repr(float(load_ms_per_s)),
            repr(float(limit_ms_per_s)),
            self.ttl_ms,
            self.max_leases,
            text,
            repr(float(self.rho_max)),
            model,
        ]
        if view is not None:
            args.append(view.tag)
            for url, others in view.others.items():
                args += [url, repr(float(others))]
        keys = [self.k_lease(device_id), self.k_leases, self.k_models]
        out = await self.link.script("lease_reserve", RESERVE, keys, args)
        if int(out[0]) == 2:
            return Reservation("stale", 0.0, _figures(out))
        name = {1: "reserved", 0: "refused", -1: "full", -2: "gone", -3: "departed"}[int(out[0])]
        capacity = _number(out[2]) if len(out) > 2 else None
        tag = record_tag(text) if name == "reserved" else ""
        return Reservation(name, float(out[1]), capacity_ms_per_s=capacity, tag=tag)

    async def release(self, device_id: str) -> bool:
        """End the device's lease (its reservation is freed). False if it had none."""
        had = await self.link.script(
            "lease_release", RELEASE, [self.k_lease(device_id), self.k_leases], [self.prefix, device_id]
        )
        return bool(had)

    async def end_model(self, model: str, models_key: str) -> list[str]:
        """End every lease of `model`, deleted from the registry hash `models_key`, in one atomic
        step (none while the model exists again); the devices whose lease ended. One round trip,
        O(leases) JSON decodes inside Redis (at most `max_leases`)."""
        out = await self.link.script("lease_end_model", END_MODEL, [self.k_leases, models_key], [self.prefix, model])
        return [_text(d) for d in out]

    async def record(self, device_id: str) -> tuple[dict[str, Any], float] | None:
        """The device's lease record and seconds until it expires (None: no live lease)."""
        key = self.k_lease(device_id)

        async def get(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            return await pipe.execute()

        raw, pttl = await self.link.call("lease_get", get)
        if raw is None or pttl is None or pttl < 0:
            return None
        return _stored(raw).fields, pttl / 1000.0

    async def records(self, device_ids: list[str]) -> dict[str, StoredRecord]:
        """The live lease records of `device_ids` (missing ones left out). One round trip."""
        if not device_ids:
            return {}
        raws = await self.link.call("lease_get", lambda r: r.mget([self.k_lease(d) for d in device_ids]))
        return {d: _stored(raw) for d, raw in zip(device_ids, raws, strict=True) if raw is not None}

    async def devices(self) -> list[str]:
        """Every device holding a live (not yet purged) lease. One round trip."""
        raw = await self.link.call("lease_list", lambda r: r.zrange(self.k_leases, 0, -1))
        return [_text(d) for d in raw]

    async def loads(self) -> dict[str, dict[str, float]]:
        """Every worker's live reservations: url -> {device: ms per second}. Expired ones are
        dropped first. O(reservations)."""
        flat = await self.link.script("lease_loads", LOADS, [self.k_leases], [self.prefix])
        out: dict[str, dict[str, float]] = {}
        for i in range(0, len(flat), 2):
            pairs = flat[i + 1]
            out[_text(flat[i])] = {_text(pairs[k]): float(pairs[k + 1]) for k in range(0, len(pairs), 2)}
        return out

    async def count(self) -> int:
        """Live leases (those not yet purged may count until the next script runs)."""
        return int(await self.link.call("lease_count", lambda r: r.zcard(self.k_leases)))

    async def apply(
        self,
        worker: str,
        assignments: dict[str, tuple[float, dict[str, Any], str]],
        limit_ms_per_s: float,
        heartbeat: Heartbeat | None = None,
        partial: bool = False,
    ) -> Application:
        """Replace the reservations and records of the devices in `assignments` (device -> (load,
        record, the basis of the record it replaces)) on `worker` in one atomic step, if every
        device still holds a lease there (or a live lease on no worker: it may join) with
        a record of that basis (`record_basis`), and the worker stays within `limit` and
        within ρ_max × its registered capacity (or a refused one pending, if less); else nothing
        changes. A device's new lease is on `worker` as `on_worker` says (a zero load whose
        record names no worker: it leaves it, Device-Only). `partial`: a device whose lease
        changed meanwhile is left as it is (what it reserves on `worker` counts with the
        others') instead of refusing the whole apply.
        Without `heartbeat`, a refused heartbeat of the worker pending refuses it ("changed":
        solved for a capacity the worker no longer states). With the `heartbeat` whose refusal
        is pending: within ρ_max × its capacity instead, and it is registered in the same step
        (refused, "changed", when the worker is not live in the registry); with one registered
        or refused since, that newer one stays, and counts. One round trip, O(reservations on
        the worker) inside Redis."""
        hb = heartbeat
        args: list[Any] = [self.prefix, worker, repr(float(limit_ms_per_s)), repr(float(self.rho_max))]
        args += [hb.info_json, repr(float(hb.capacity_ms_per_s)), hb.ttl_ms, hb.refused_at_ms] if hb else ["", "", 0, 0]
        args.append("1" if partial else "")
        for device, (load, record, basis) in assignments.items():
            args += [device, repr(float(load)) if on_worker(worker, load, record) else "", record_text(record), basis]
        keys = [self.k_leases, f"{self.prefix}:workers:exp"]
        out = await self.link.script("lease_apply", APPLY, keys, args)
        status = {1: "applied", 0: "changed", 2: "over"}[int(out[0])]
        return Application(status, _number(out[1]), tuple(_text(d) for d in out[2:]))


def on_worker(worker: str | None, load_ms_per_s: float, record: dict[str, Any]) -> bool:
    """Whether a lease writing `record` with `load_ms_per_s` on `worker` is on that worker: it
    reserves something there, or its record names it (a plan that uses the edge, whatever its
    cost: a zero-cost one is listed and rebalanced there too, as `GET /devices` shows it). O(1)."""
    return worker is not None and (load_ms_per_s > 0 or record.get("worker") == worker)


def _stored(raw: str | bytes) -> StoredRecord:
    fields = json.loads(raw)
    return StoredRecord(fields, record_tag(raw), str(fields.pop("basis", "")))


def _figures(out: list[Any]) -> Figures:
    """The "stale" answer of RESERVE: {2, record or nil, url, {device, load, ...}, ...}."""
    loads = {}
    for i in range(2, len(out), 2):
        pairs = out[i + 1]
        loads[_text(out[i])] = {_text(pairs[k]): float(pairs[k + 1]) for k in range(0, len(pairs), 2)}
    return Figures(_stored(out[1]) if out[1] else None, loads)


def _number(v: Any) -> float | None:
    """A number a script returned as text ('' : none)."""
    text = _text(v)
    return float(text) if text else None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)

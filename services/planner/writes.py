"""Versioned model writes: one operation, the Lua script that applies it atomically, and the
queue of operations made while Redis is unavailable.

Why a Lua script and not WATCH/MULTI: a write must check the version it was based on, change
one thing (the graph, or one field of the profiles hash — never delete-all-then-rewrite) and
bump the model's version and the shared generation counter, all-or-nothing. A script does that
in one round trip and can never be interleaved with another replica's write; WATCH would need a
read, a MULTI and a retry loop per write, and a dedicated connection while it watches. The
script also answers *why* a write was not applied (a newer version is stored, a cap is
reached), which the replay of queued writes reports.

Every operation carries its base: the version (0: the model did not exist) and graph hash the
replica saw when it made the change. The script applies it only if Redis still holds exactly
that base (`check="version"`: writes with If-Match, and writes queued while Redis was away,
decided on the cached state); the graph hash guards against a model deleted and created again,
whose versions restart at 1. A live write without If-Match checks only the base graph hash
(`check="graph"`): it changes one thing that was decided on that graph (a profile field, the
graph itself), so concurrent writes of other profiles by other replicas all apply instead of
retrying each other. It keeps that check when its round trip fails and it is queued: it was
decided on a fresh read all the same.

Each operation has a random id, and Redis keeps the ids of a model's last `RECENT_OPS`
operations (newest first; a delete keeps them too). A replica whose reply was lost (a timeout
after Redis applied the write) recognises its own write on replay, even after other replicas'
writes landed on top of it: else a queued write checked by graph would be applied a second time
over those newer writes (or a replayed delete would remove the model another replica created
again since).
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from dapdee.planner.errors import CapacityExceeded
from dapdee.planner.keys import Keys

RECENT_OPS = 16  # op ids remembered per model: far more writes than land while one reply is late
# how long a deleted model's op ids are kept (a queued write of it replays within an outage's
# length; past this its replay may apply again, as before the ids were kept at all)
DELETED_OPS_TTL_MS = 24 * 3600 * 1000

# KEYS: models, versions, lastop, gen, graph:{m}, profiles:{m}, deleted-ops:{m}
# ARGV: model, op id, kind, base version, base hash, new hash, payload, tier, drop profiles
#       ("1" or ""), max models, max profiles, restore version, check ("version": the base
#       version and hash must be stored; "graph": the base graph hash), then tier/JSON pairs
# Returns {status, version, graph hash}; status: ok | applied (this op id is among the model's
# last RECENT_OPS applied, kept in KEYS[3] as space-separated ids, newest first; a deleted
# model's in KEYS[7] for DELETED_OPS_TTL_MS) |
# conflict (another base is stored) | capacity (a cap is reached) | present (restore: the model
# exists) | deleted (restore: a delete since Redis lost its state ended it) | gone (delete: the
# model is already gone).
WRITE_MODEL = """
local name, opid, kind = ARGV[1], ARGV[2], ARGV[3]
local h = redis.call('HGET', KEYS[1], name)
local cur = 0
if h then
  cur = tonumber(redis.call('HGET', KEYS[2], name) or '1')
else
  h = ''
end
local ops = redis.call('HGET', KEYS[3], name) or redis.call('GET', KEYS[7]) or ''
local prev = string.match(ops, '^(%S+)') or ''  -- the last write before this one
if string.find(' ' .. ops .. ' ', ' ' .. opid .. ' ', 1, true) then
  return {'applied', cur, h}
end
local function recent()
  local keep = {opid}
  for id in string.gmatch(ops, '%S+') do
    if #keep >= RECENT_OPS then break end
    keep[#keep + 1] = id
  end
  return table.concat(keep, ' ')
end
local function remember()
  redis.call('HSET', KEYS[3], name, recent())
  redis.call('DEL', KEYS[7])
end
local function unchanged()
  remember()  -- a replay of it must not apply it over later writes
  return {'ok', cur, h}
end
local function bump(newh, added)
  local v = cur + 1
  redis.call('HSET', KEYS[2], name, v)
  remember()
  redis.call('INCR', KEYS[4])
  return {'ok', v, newh, prev, added or 0}
end
if kind == 'restore' then
  if cur > 0 then return {'present', cur, h} end
  -- Redis lost everything, so this key was set by a delete made since: the delete stands
  if redis.call('EXISTS', KEYS[7]) == 1 then return {'deleted', 0, ''} end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[10]) then return {'capacity', 0, ''} end
  redis.call('SET', KEYS[5], ARGV[7])
  redis.call('HSET', KEYS[1], name, ARGV[6])
  redis.call('DEL', KEYS[6])
  for i = 14, #ARGV, 2 do redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[2], name, ARGV[12])
  remember()
  redis.call('INCR', KEYS[4])
  return {'ok', tonumber(ARGV[12]), ARGV[6]}
end
local stale
if ARGV[13] == 'graph' then
  stale = h ~= ARGV[5]  -- '' on both sides: the model is still absent
else
  stale = cur ~= tonumber(ARGV[4]) or (cur > 0 and h ~= ARGV[5])
end
if stale then
  if kind == 'delete_model' and cur == 0 then return {'gone', 0, ''} end
  return {'conflict', cur, h}
end
if kind == 'put_graph' then
  if cur == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[10]) then return {'capacity', 0, ''} end
  if cur > 0 and h == ARGV[6] and ARGV[9] == '' then return unchanged() end
  redis.call('SET', KEYS[5], ARGV[7])
  redis.call('HSET', KEYS[1], name, ARGV[6])
  if ARGV[9] ~= '' then redis.call('DEL', KEYS[6]) end
  return bump(ARGV[6])
elseif kind == 'delete_model' then
  redis.call('DEL', KEYS[5], KEYS[6])
  redis.call('HDEL', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
  redis.call('HDEL', KEYS[3], name)
  -- kept a while: a model created again must not be deleted by a replay of this delete
  redis.call('SET', KEYS[7], recent(), 'PX', DELETED_OPS_TTL_MS)
  redis.call('INCR', KEYS[4])
  return {'ok', 0, ''}
elseif kind == 'put_profile' then
  local old = redis.call('HGET', KEYS[6], ARGV[8])
  if old == ARGV[7] then return unchanged() end
  if not old and redis.call('HLEN', KEYS[6]) >= tonumber(ARGV[11]) then return {'capacity', cur, h} end
  -- whether this write created the tier: another replica's may have, since this one was planned
  return bump(h, redis.call('HSET', KEYS[6], ARGV[8], ARGV[7]))
elseif kind == 'delete_profile' then
  if redis.call('HDEL', KEYS[6], ARGV[8]) == 0 then return unchanged() end
  return bump(h)
end
return redis.error_reply('unknown write kind ' .. kind)
""".replace("RECENT_OPS", str(RECENT_OPS)).replace("DELETED_OPS_TTL_MS", str(DELETED_OPS_TTL_MS))


@dataclass(frozen=True)
class Op:
    """One change of one model, with the base it was made on.

    kind: put_graph (payload: graph JSON, new_hash its content hash, drop_profiles when the
    structure changed) | delete_model | put_profile (tier, payload: profile JSON) |
    delete_profile (tier) | restore (write a whole model back into a Redis that lost it:
    payload, new_hash, restore_version, restore_profiles; applied only where the model is absent).
    """

    kind: str
    model: str
    base_version: int  # 0: the model did not exist
    base_hash: str  # "" when it did not exist
    new_hash: str = ""
    payload: str = ""
    tier: str = ""
    drop_profiles: bool = False
    restore_version: int = 0
    restore_profiles: tuple[tuple[str, str], ...] = ()
    check: str = "version"  # or "graph" (module docstring)
    op_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def describe(self) -> str:
        """A short description for log lines, e.g. `put_profile 'gpu'`."""
        return f"{self.kind} {self.tier!r}" if self.tier else self.kind

    def script_keys(self, keys: Keys) -> list[str]:
        m = self.model
        return [keys.models, keys.versions, keys.lastop, keys.gen, keys.graph(m), keys.profiles(m), keys.deleted_ops(m)]

    def script_args(self, max_models: int, max_profiles: int) -> list[str | int]:
        args: list[str | int] = [
            self.model,
            self.op_id,
            self.kind,
            self.base_version,
            self.base_hash,
            self.new_hash,
            self.payload,
            self.tier,
            "1" if self.drop_profiles else "",
            max_models,
            max_profiles,
            self.restore_version,
            self.check,
        ]
        for tier, js in self.restore_profiles:
            args += [tier, js]
        return args


class Outbox:
    """Operations made while Redis was unavailable, oldest first, at most `limit` (a write Redis
    may have applied is queued past it: see `add`).

    It lives in process memory only: a replica that dies during an outage loses what it queued
    (its answers said `"stored": "pending"`). O(1) per add and pop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ops: deque[Op] = deque()
        self._per_model: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(list(self._ops))

    def has(self, model: str) -> bool:
        """Some change of `model` waits here (later changes of it must queue behind it)."""
        return self._per_model[model] > 0

    def add(self, op: Op, in_doubt: bool = False) -> None:
        """Queue `op`; CapacityExceeded when `limit` operations wait already, unless `in_doubt`:
        its round trip failed after it was sent, so Redis may hold it, and only its replay can
        tell (refused, the client would be told "not stored" of a stored write). Such a failure
        starts the link's back-off, during which writes queue under the limit, so the queue
        passes it by at most one write per back-off."""
        if len(self._ops) >= self.limit and not in_doubt:
            raise CapacityExceeded(
                "pending writes",
                self.limit,
                f"the planner holds the maximum of {self.limit} writes queued while Redis is "
                "unavailable; retry when it is back",
            )
        self._ops.append(op)
        self._per_model[op.model] += 1

    def first(self) -> Op | None:
        return self._ops[0] if self._ops else None

    def pop_first(self) -> Op:
        op = self._ops.popleft()
        self._per_model[op.model] -= 1
        if self._per_model[op.model] <= 0:
            del self._per_model[op.model]
        return op

    def drop_model(self, model: str) -> int:
        """Forget every queued change of `model` (they are part of a state written whole). O(n)."""
        n = self._per_model.pop(model, 0)
        if n:
            self._ops = deque(op for op in self._ops if op.model != model)
        return n

    def clear(self) -> None:
        self._ops.clear()
        self._per_model.clear()

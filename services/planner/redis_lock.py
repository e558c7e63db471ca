"""A lock shared by the planner replicas through Redis: `SET NX PX` with a random token, released
by compare-and-delete, so a holder that outlived the lock's TTL never deletes the lock another
replica took since. The rebalances take it (one replica at a time)."""

from __future__ import annotations

import secrets

from dapdee.planner.redis_link import RedisLink

# delete the lock only while it still holds this token
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLock:
    """The lock at `key`, held at most `ttl_ms` per take."""

    def __init__(self, link: RedisLink, key: str, ttl_ms: int) -> None:
        self.link = link
        self.key = key
        self.ttl_ms = ttl_ms

    async def acquire(self) -> str | None:
        """Take the lock: its token, or None while another holder has it. RedisUnavailable passes
        up. One round trip."""
        token = secrets.token_hex(16)
        got = await self.link.call("rebalance_lock", lambda r: r.set(self.key, token, nx=True, px=self.ttl_ms))
        return token if got else None

    async def release(self, token: str) -> None:
        """Release the lock `token` took, unless it expired and another holder has it now (one
        script). RedisUnavailable passes up. One round trip."""
        await self.link.script("rebalance_unlock", RELEASE, [self.key], [token])

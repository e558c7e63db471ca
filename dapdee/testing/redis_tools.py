"""Redis helpers: unique key prefixes on a shared server, removing a prefix's keys afterwards,
and a private `redis-server` a test can stop and restart on the same port."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

from dapdee.testing.ports import free_port


def unique_prefix(tag: str = "test") -> str:
    """A fresh key prefix `{tag}-{12 hex digits}` (a valid DAPDEE_KEY_PREFIX). O(1)."""
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def clear_prefix(url: str, prefix: str) -> int:
    """Delete every key under `prefix:` on the Redis at `url`; the number deleted (0 when Redis
    cannot be reached: best effort). O(keys under the prefix)."""
    import redis

    try:
        r = redis.Redis.from_url(url, socket_timeout=2)
        try:
            keys = list(r.scan_iter(match=f"{prefix}:*", count=500))
            return int(r.delete(*keys)) if keys else 0
        finally:
            r.close()
    except redis.RedisError:
        return 0


class RedisProcess:
    """A private `redis-server --save '' --appendonly no` on a fixed free 127.0.0.1 port;
    `start()` waits until it answers PING, `stop()` kills it (a restart comes back empty on the
    same port). RuntimeError when redis-server is not installed (see `available()`)."""

    def __init__(self) -> None:
        if not self.available():
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as client:
                    client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

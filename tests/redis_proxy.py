"""A TCP proxy on 127.0.0.1 in front of a real Redis, for tests that cut one replica's link.

`cut()` closes every proxied connection and answers new ones by closing them at once (the
client sees a dropped connection, as in a network partition); `restore()` forwards again.
It counts the bytes Redis sent through it (`bytes_down`). `hold_next_reply()` keeps the next
reply Redis sends (on whichever connection) until `release()`, while other connections flow: a
slow answer, for tests of what changes while a read is on its way; `hold_reply_to(marker)` holds
the reply to the next request holding `marker` (Redis has run it: a reply that comes too late).
`cut_at(marker)` cuts the
link when the next request holding `marker` passes (dropped unanswered): an outage in the middle
of a sequence of calls. Runs in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib


class RedisProxy:
    """Forward 127.0.0.1:<port> to `target_host:target_port` until cut."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 6379) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.bytes_down = 0
        self.is_cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._hold = False
        self._released = asyncio.Event()
        self._cut_marker: bytes | None = None
        self._hold_marker: bytes | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        held = asyncio.Event()  # this connection's request held `_hold_marker`: hold its next reply
        down = asyncio.create_task(self._pipe(up_reader, writer, count=True, held=held))
        up = asyncio.create_task(self._pipe(reader, up_writer, count=False, held=held))
        self._tasks |= {down, up}
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool, held: asyncio.Event
    ) -> None:
        try:
            while data := await reader.read(65536):
                if not count and self._cut_marker is not None and self._cut_marker in data:
                    self._cut_marker = None
                    self.cut()
                    return
                if not count and self._hold_marker is not None and self._hold_marker in data:
                    self._hold_marker = None
                    self._released.clear()
                    held.set()
                if count:
                    self.bytes_down += len(data)
                    if self._hold or held.is_set():
                        self._hold = False
                        held.clear()
                        await self._released.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    def cut(self) -> None:
        """Drop every connection now and refuse new ones (by closing them at once)."""
        self.is_cut = True
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def cut_at(self, marker: bytes) -> None:
        """Cut (as `cut`) when the next request holding `marker` comes through, before it reaches
        Redis."""
        self._cut_marker = marker

    def restore(self) -> None:
        self.is_cut = False

    def hold_next_reply(self) -> None:
        """Keep the next reply Redis sends until `release()`."""
        self._released.clear()
        self._hold = True

    def hold_reply_to(self, marker: bytes) -> None:
        """Keep the reply to the next request holding `marker` (the next reply on that request's
        connection, once the request has gone through to Redis) until `release()`."""
        self._hold_marker = marker

    def release(self) -> None:
        self._released.set()

    async def close(self) -> None:
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

"""A delaying TCP proxy on 127.0.0.1 for slow-link tests and benchmarks/wan.py: each direction's bytes are
held ``rtt/2`` (order kept), optionally paced to a bandwidth that all its connections share (one access link:
opening more connections does not make it faster); TLS passes through untouched; bytes are counted."""

from __future__ import annotations

import asyncio
import socket
import threading

__all__ = ["DelayProxy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DelayProxy:
    """TCP proxy on 127.0.0.1 adding ``rtt/2`` each way and, optionally, a bandwidth cap (bits/s)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = _free_port()
        self.rtt = 0.0
        self.bandwidth: float | None = None
        self.bytes = 0  # passed through so far, both directions together
        self._free_at = {"up": 0.0, "down": 0.0}  # when each direction of the link is next free (loop time)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_w, "up"), self._pipe(up_r, writer, "down"),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                now = self.loop.time()
                if self.bandwidth:
                    free_at = max(self._free_at[direction], now) + len(data) * 8 / self.bandwidth
                    self._free_at[direction] = free_at
                    due = max(due, free_at)
                if due > now:
                    await asyncio.sleep(due - now)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                data = await reader.read(256 * 1024)
                self.bytes += len(data)
                queue.put_nowait((self.loop.time() + self.rtt / 2, data))
                if not data:
                    break
        finally:
            await sender

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)

"""The Dask `Client` internals the kernel relies on, in one place (checked by tests/test_dask_contract.py).

Dask's client uses its connect timeout for two things: how long the first connection may take, and how
long it keeps trying to reconnect when its scheduler goes away before closing itself. On a volunteer
network the second must be longer (a coordinator restarting after a crash takes seconds; the runs it
holds outlive it) without making a wrong address take longer to report.

Dask's client also waits, while it connects, on an ``identity`` call over a second connection (its own TLS
and comm handshakes: three round trips on a slow link) before it registers. Nothing at connect needs that
answer, so `client_class` asks for it while the first connection is made: connecting costs the three round
trips of one connection, and the second is open (for the next call) by the time it is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["client_class", "keep_reconnecting"]

_client_class: Any = None


def keep_reconnecting(client: Any, seconds: float) -> None:
    """Let ``client`` retry a lost scheduler for ``seconds`` before it closes itself (`Client._reconnect`)."""
    client._timeout = max(float(client._timeout or 0.0), float(seconds))


def client_class() -> Any:
    """A `distributed.Client` whose connect does not wait on the scheduler's identity (`_ensure_connected`,
    `_update_scheduler_info`)."""
    global _client_class
    if _client_class is None:
        from distributed import Client

        class QuickConnectClient(Client):  # type: ignore[misc]
            _alongside: asyncio.Future[Any] | None = None

            async def _ensure_connected(self, timeout: Any = None) -> None:
                fetching = self._alongside is not None and not self._alongside.done()
                if self.status == "connecting" and self.scheduler is not None and not fetching:
                    # the identity call opens the connection later calls reuse: open it alongside this one
                    self._alongside = asyncio.ensure_future(super()._update_scheduler_info())
                    self._alongside.add_done_callback(_quiet)
                await super()._ensure_connected(timeout)

            async def _update_scheduler_info(self, n_workers: int = 0) -> None:
                if self.status == "connecting" and self._alongside is not None and not self._alongside.done():
                    return  # connecting: the identity is on its way (`_ensure_connected`); do not wait on it
                await super()._update_scheduler_info(n_workers)

        _client_class = QuickConnectClient
    return _client_class


def _quiet(task: asyncio.Future[Any]) -> None:
    """The identity fetched in the background failed (the client closed meanwhile): its next poll retries."""
    if not task.cancelled():
        task.exception()

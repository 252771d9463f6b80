"""Blocking work the coordinator awaits from its event loop, each in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

__all__ = ["in_thread"]


def _settle_future(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


async def in_thread(func: Any, *args: Any) -> Any:
    """``func(*args)`` in a thread of its own (a replicated cell blocks one for as long as it runs, so the
    loop's small shared executor is not used), awaited from the loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def go() -> None:
        try:
            result = func(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle_future, done, None, e)
        else:
            loop.call_soon_threadsafe(_settle_future, done, result, None)

    threading.Thread(target=go, name="depin-replicas", daemon=True).start()
    return await done

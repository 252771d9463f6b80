"""The one Dask comm internal the depin RPCs rely on (checked by tests/test_dask_contract.py): sending many
messages on one pooled connection without waiting for each answer.

A big transfer goes in parts. Asking for each part's answer before sending the next costs a round trip per
part; sending parts over several connections at once interleaves them on the link, so the first part (the
one the far side is waiting for) arrives last. On one connection, back to back, they arrive in order at the
link's full speed. Dask's `Server.handle_comm` handles one connection's messages in order, and writes no
answer for a message with ``reply=False``: so only the last part is asked to answer, and its answer comes
after every part was handled. Uses `PooledRPCCall.addr`/`.pool`, `ConnectionPool.connect`/`reuse` and
`distributed.core.send_recv`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["send_in_order"]


async def send_in_order(rpc: Any, op: str, count: int, message: Callable[[int], dict[str, Any]]) -> Any:
    """Send ``message(i)`` for i in ``0..count-1`` to handler ``op`` on one connection of ``rpc`` (a pooled
    RPC: ``client.scheduler``, ``worker.scheduler``), back to back; the last one's answer."""
    from distributed.core import send_recv

    comm = await rpc.pool.connect(rpc.addr)
    try:
        for i in range(count - 1):
            await send_recv(comm=comm, op=op, reply=False, **message(i))
        answer = await send_recv(comm=comm, op=op, reply=True, **message(count - 1))
    except BaseException:
        comm.abort()
        raise
    rpc.pool.reuse(rpc.addr, comm)
    return answer

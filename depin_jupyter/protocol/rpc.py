"""The coordinator's own RPCs, as typed calls: one facade for the kernel, the server, the CLI and the worker.

Every call the rest of the package makes to a volunteer network's coordinator goes through `Coordinator`,
so an op name, its arguments and what a coordinator without that op answers live in one place. The
handlers themselves are registered under the same names by `network.coordinator`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["OPS", "WINDOW", "AsyncCoordinator", "Coordinator"]

# Op name on the coordinator -> what it does. `network.coordinator` registers exactly these handlers.
OPS: dict[str, str] = {
    "depin_identities": "worker address -> the certificate name of the volunteer behind it",
    "depin_pools": "worker address -> the pool its certificate put it in",
    "depin_reputation": "volunteer name -> its replication record (streak, valid, invalid, checked)",
    "depin_relay_put": "a worker parks a relayed cell's pickle-free result (whole, or one part)",
    "depin_relay_get": "a client reads one part of a big result of its own (waiting for a part on its way)",
    "depin_input_offer": "which of a client's inputs are held, and which to stream in parts now",
    "depin_input_put": "a client puts a serialized input under its content key (whole, or one part)",
    "depin_input_has": "which of a client's content keys the coordinator holds",
    "depin_input_get": "a worker reads one part of an input of the cell it runs (waiting for a part on its way)",
    "depin_input_stats": "the input cache's counters",
    "depin_credits": "credit per volunteer",
    "depin_submit_cell": "a client submits a cell (pickle-free spec and inputs) for the coordinator to run",
    "depin_wait_cell": "a client waits for one of its cells; a finished cell's result comes with the answer",
    "depin_wait_cells": "a client waits for any of its cells in one long poll; the ended ones' answers",
    "depin_release_cells": "a client lets the coordinator forget its ended detached runs of these names",
    "depin_cancel_cell": "a client cancels one of its cells",
    "depin_jobs": "the cells a client (an educator: its lab) has queued or running",
    "depin_lab_status": "the educator's view of a virtual lab",
    "depin_roster": "the workers that joined or left since the roster a notebook holds (all of them if need be)",
    "depin_hello": "the coordinator's clock and package versions (`depin doctor`: skew and version checks)",
}


WINDOW = 3  # parts of one big transfer asked for at once: the next is on its way while one is being read


async def _windowed(step: Callable[[int], Awaitable[None]], count: int, start: int = 0) -> None:
    """``step(i)`` for i in ``start..count-1``, at most `WINDOW` at once, in order of i."""
    import asyncio

    gate = asyncio.Semaphore(WINDOW)

    async def one(index: int) -> None:
        async with gate:
            await step(index)

    await asyncio.gather(*(one(i) for i in range(start, count)))


_NO_SUBMIT_WAIT: set[Any] = set()  # coordinators (by address) that answered a submission's ``wait`` with TypeError


class Coordinator:
    """Typed calls to the coordinator's depin RPCs over an existing Dask connection.

    ``rpc`` is the connection's scheduler RPC (``client.scheduler`` or ``worker.scheduler``); ``sync`` runs
    one of its coroutines to completion from a plain thread.
    """

    def __init__(self, rpc: Any, sync: Callable[..., Any]) -> None:
        self._rpc = rpc
        self._sync = sync

    @classmethod
    def of_client(cls, client: Any) -> Coordinator:
        return cls(client.scheduler, client.sync)

    @classmethod
    def of_worker(cls, worker: Any) -> Coordinator:
        from distributed.utils import sync

        return cls(worker.scheduler, lambda f, *a, **k: sync(worker.loop, f, *a, **k))

    def _call(self, op: str, **kwargs: Any) -> Any:
        assert op in OPS, op
        method: Callable[..., Awaitable[Any]] = getattr(self._rpc, op)
        return self._sync(method, **kwargs)

    # --- results relayed by the coordinator (volunteers behind NAT) ---
    def relay_put(self, key: str, payload: bytes) -> None:
        """Park the result of task ``key``; a big one goes in parts, which its client reads as they arrive."""
        from depin_jupyter.protocol.constants import PART_BYTES

        if len(payload) <= PART_BYTES:
            self._call("depin_relay_put", key=key, payload=payload)
            return
        if self._send_parts("depin_relay_put", "payload", payload, key=key) != "whole":
            raise RuntimeError(f"the coordinator did not get all of the result of {key} (see its log)")

    def payload(self, key: str, answer: dict[str, Any]) -> bytes | None:
        """The result a finished run's answer carries: itself, or read in parts when it was answered as parts."""
        if answer.get("payload") is not None or not answer.get("parts"):
            return answer.get("payload")
        return self.relay_fetch(key)

    def relay_fetch(self, key: str) -> bytes | None:
        """The big result of the client's run ``key`` (answered as parts), read in parts; None if gone."""
        return self._fetch_parts("depin_relay_get", key=key)

    def _fetch_parts(self, op: str, **kwargs: Any) -> bytes | None:
        """A payload read part by part with ``op`` (`WINDOW` parts asked for at once); None when missing."""
        method = getattr(self._rpc, op)

        async def fetch() -> bytes | None:
            first = await method(**kwargs, index=0)
            if first is None:
                return None
            parts: list[bytes | None] = [bytes(first["data"])] + [None] * (int(first["count"]) - 1)

            async def one(index: int) -> None:
                answer = await method(**kwargs, index=index)
                if answer is None or answer.get("gen") != first.get("gen"):  # gone, or another run's parts
                    raise LookupError(op)
                parts[index] = bytes(answer["data"])

            try:
                await _windowed(one, len(parts), start=1)
            except LookupError:
                return None
            return b"".join(p for p in parts if p is not None)

        result: bytes | None = self._sync(fetch)
        return result

    # --- inputs held by content key (each client's own) ---
    def input_put(self, key: str, data: bytes) -> bool:
        """Hold ``data`` under ``key``; False if it cannot fit in the coordinator's input cache at all."""
        return bool(self._call("depin_input_put", key=key, data=data) == "OK")

    def input_has(self, keys: list[str]) -> set[str]:
        return set(self._call("depin_input_has", keys=keys))

    def input_offer(self, sizes: dict[str, int]) -> tuple[set[str], set[str]]:
        """(keys held, keys to stream now with `input_stream`) of ``sizes`` (content key -> bytes)."""
        answer = self._call("depin_input_offer", sizes=dict(sizes))
        return set(answer["held"]), set(answer["stream"])

    def input_stream(self, key: str, data: bytes) -> None:
        """Send an offered input in `PART_BYTES` parts, in order on one connection (`_comm.send_in_order`)."""
        if self._send_parts("depin_input_put", "data", data, key=key) != "whole":
            raise RuntimeError(f"the coordinator did not get all of input {key} (see its log)")

    def _send_parts(self, op: str, field: str, payload: bytes, **kwargs: Any) -> Any:
        """``payload`` to ``op`` in `PART_BYTES` parts (``field``, ``index``, ``total``), back to back; the
        last part's answer."""
        from depin_jupyter.protocol._comm import send_in_order
        from depin_jupyter.protocol.constants import PART_BYTES, part_count

        view = memoryview(payload)

        def message(index: int) -> dict[str, Any]:
            return {**kwargs, field: bytes(view[index * PART_BYTES:(index + 1) * PART_BYTES]), "index": index,
                    "total": len(payload)}

        return self._sync(send_in_order, self._rpc, op, part_count(len(payload)), message)

    def input_fetch(self, key: str, task: str) -> bytes | None:
        """The whole input ``key`` of the running task ``task``, read in parts as they arrive on the
        coordinator; None when the coordinator does not hold it."""
        return self._fetch_parts("depin_input_get", key=key, task=task)

    def input_stats(self) -> dict[str, int]:
        return dict(self._call("depin_input_stats"))

    # --- identities, reputation, credit ---
    def identities(self) -> dict[str, str]:
        return dict(self._call("depin_identities"))

    def roster(self, generation: str | None, epoch: int) -> dict[str, Any]:
        """Changes since the roster ``(generation, epoch)`` (`network.roster.Roster.since`)."""
        return dict(self._call("depin_roster", generation=generation, epoch=epoch))

    def pools(self) -> dict[str, str | None]:
        return dict(self._call("depin_pools"))

    def reputation(self) -> dict[str, dict[str, Any]]:
        return dict(self._call("depin_reputation"))

    def credits(self) -> dict[str, dict[str, Any]]:
        return dict(self._call("depin_credits"))

    # --- cells, submitted through the coordinator's gateway ---
    def submit_cell(self, key: str, spec: bytes, inputs: bytes, blob: bytes | None, placement: dict[str, Any],
                    client_id: str | None = None, detached: bool = False,
                    replication: dict[str, Any] | None = None, wait: float = 0.0) -> dict[str, Any] | None:
        """Submit a cell; its end's answer (as `wait_cell`'s) when it ended within ``wait`` seconds, else None
        (then wait for it with `wait_cells`)."""
        kwargs: dict[str, Any] = dict(key=key, spec=spec, inputs=inputs, blob=blob, placement=placement,
                                      client=client_id, detached=detached, replication=replication)
        where = getattr(self._rpc, "address", None)
        if wait > 0 and not detached and where not in _NO_SUBMIT_WAIT:
            try:
                reply = self._call("depin_submit_cell", **kwargs, wait=float(wait))
            except TypeError as e:  # a coordinator of an earlier version: no such argument (nothing submitted)
                if "wait" not in str(e):
                    raise
                _NO_SUBMIT_WAIT.add(where)
                reply = self._call("depin_submit_cell", **kwargs)
        else:
            reply = self._call("depin_submit_cell", **kwargs)
        answer = reply.get("answer") if isinstance(reply, dict) else None
        return dict(answer) if isinstance(answer, dict) else None

    def wait_cell(self, key: str, timeout: float, keep: bool = False) -> dict[str, Any]:
        """``{"state": queued|pending|finished|error|cancelled|lost, "error": text, "payload": bytes?}``;
        ``keep``: a detached run stays on the coordinator after its result is handed over (`release_cells`)."""
        if keep:  # sent only when asked for: a coordinator of an earlier version knows no such argument
            return dict(self._call("depin_wait_cell", key=key, timeout=timeout, keep=True))
        return dict(self._call("depin_wait_cell", key=key, timeout=timeout))

    def wait_cells(self, keys: list[str], timeout: float, keep: list[str] | None = None,
                   pending: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """The answers (as `wait_cell`'s) of those of ``keys`` that ended: one long poll for many cells, which
        returns as soon as one ended or one of ``pending`` (being submitted) arrived; ``keep``: keys to keep."""
        return dict(self._call("depin_wait_cells", keys=list(keys), timeout=timeout, keep=list(keep or ()),
                               pending=list(pending or ())))

    def wait_ended(self, key: str, deadline: float | None, what: str, keep: bool = False) -> dict[str, Any]:
        """`wait_cell` until the cell has ended (a reattaching kernel); TimeoutError naming ``what`` past
        ``deadline`` (a `time.monotonic` value; None: no limit)."""
        import time

        while True:
            answer = self.wait_cell(key, 10.0, keep=keep)
            if answer.get("state") not in ("queued", "pending"):
                return answer
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{what} is still running")

    def release_cells(self, names: list[str]) -> int:
        """Let the coordinator forget this identity's ended detached runs of these names."""
        return int(self._call("depin_release_cells", names=names))

    def cancel_cell(self, key: str) -> bool:
        return bool(self._call("depin_cancel_cell", key=key))

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._call("depin_jobs"))

    def lab_status(self) -> dict[str, Any]:
        return dict(self._call("depin_lab_status"))


class AsyncCoordinator:
    """The same calls from inside an event loop (the Jupyter server, the CLI): ``rpc`` as for `Coordinator`."""

    def __init__(self, rpc: Any) -> None:
        self._rpc = rpc

    async def _call(self, op: str, **kwargs: Any) -> Any:
        assert op in OPS, op
        return await getattr(self._rpc, op)(**kwargs)

    async def identities(self) -> dict[str, str]:
        return dict(await self._call("depin_identities"))

    async def reputation(self) -> dict[str, dict[str, Any]]:
        return dict(await self._call("depin_reputation"))

    async def credits(self) -> dict[str, dict[str, Any]]:
        return dict(await self._call("depin_credits"))

    async def lab_status(self) -> dict[str, Any]:
        return dict(await self._call("depin_lab_status"))

    async def jobs(self) -> list[dict[str, Any]]:
        return list(await self._call("depin_jobs"))

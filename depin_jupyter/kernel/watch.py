"""One long poll for the ends of all of a kernel's cells on a volunteer network (`depin_wait_cells`).

Each cell (and each batch of a map: up to 256 at once) used to hold a thread and a coordinator connection
of its own, long-polling for its end. Here one thread per session asks for all of them at once. A cell is
added *before* it is submitted and named in the poll as "pending" until its submission is confirmed; the
coordinator answers as soon as one cell ended or a pending one arrived, so the poll is made again with the
new cell in it: a new cell never waits behind an older long poll, whichever of the two messages (the
submission, the poll) reaches the coordinator first.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from depin_jupyter import config
from depin_jupyter.protocol.constants import ENDED_STATES

__all__ = ["EndWatcher", "Watched"]

_POLL_S = 10.0   # one long poll's limit (the coordinator returns sooner when a cell ends)
_IDLE_S = 30.0   # the thread ends after this long with nothing to watch (started again on demand)


class Watched(Protocol):
    """A submitted cell the watcher reports the end of."""

    key: str
    keep: bool     # a map's batch: the coordinator keeps it after handing its result over

    def ended(self, answer: dict[str, Any]) -> None: ...


class EndWatcher:
    """Watches the submitted cells of one client; `add` one, it is told its answer once it ended."""

    def __init__(self, coordinator: Any, client: Any) -> None:
        self._coordinator = coordinator
        self._client = client
        self._cells: dict[str, Watched] = {}
        self._submitting: set[str] = set()  # added, their submission not confirmed yet
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, cell: Watched) -> None:
        """Watch ``cell``, about to be submitted (then call `submitted`, or `remove` if that failed)."""
        with self._lock:
            self._cells[cell.key] = cell
            self._submitting.add(cell.key)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="depin-cell-ends", daemon=True)
                self._thread.start()
        self._wake.set()

    def submitted(self, key: str) -> None:
        with self._lock:
            self._submitting.discard(key)
        self._wake.set()

    def remove(self, key: str) -> None:
        with self._lock:
            self._cells.pop(key, None)
            self._submitting.discard(key)

    def close(self) -> None:
        """The session closes: every cell still watched ends as lost (nothing waits on it forever)."""
        self._closed = True
        self._wake.set()
        with self._lock:
            left, self._cells = self._cells, {}
            self._submitting.clear()
        for cell in left.values():
            cell.ended({"state": "lost", "error": "this kernel's connection to the coordinator was closed"})

    def _run(self) -> None:
        idle_since = time.monotonic()
        gone_since: float | None = None
        stirred = False  # the last poll returned with nothing ended: a pending cell arrived
        while not self._closed:
            with self._lock:
                pending = set(self._submitting)
                cells = {k: c for k, c in self._cells.items() if k not in pending}
            if not cells or (stirred and pending):
                # Nothing to poll for yet, or a pending cell arrived but its confirmation is not here yet
                # (it comes with the same breath): wait for it rather than poll without it.
                if not cells and not pending and time.monotonic() - idle_since > _IDLE_S:
                    with self._lock:
                        if not self._cells:
                            self._thread = None
                            return
                self._wake.wait(1.0)
                self._wake.clear()
                stirred = False
                continue
            idle_since = time.monotonic()
            self._wake.clear()
            try:
                answers = self._coordinator.wait_cells(list(cells), _POLL_S,
                                                       keep=[k for k, c in cells.items() if c.keep],
                                                       pending=sorted(pending))
                stirred = not answers
                gone_since = None
            except Exception as e:  # noqa: BLE001 - the coordinator is gone: say so, do not hang
                gone_since = gone_since or time.monotonic()
                answers = {k: {"state": "lost", "error": f"the coordinator stopped answering "
                                                         f"({type(e).__name__}: {e})"}
                           for k, c in cells.items() if not self._may_come_back(c, e, gone_since)}
                if len(answers) < len(cells):
                    time.sleep(0.5)
            for key, answer in answers.items():
                if answer.get("state") in ENDED_STATES:
                    with self._lock:
                        cell = self._cells.pop(key, None)
                    if cell is not None:
                        cell.ended(answer)

    def _may_come_back(self, cell: Watched, error: Exception, since: float) -> bool:
        """Whether a failed poll is worth making again for ``cell``: the coordinator holds its runs (in its
        state dir: background runs at once, cells once they lasted ``depin.coordinator.hold-after``) across a
        restart, and this kernel's client is still rejoining it (`depin.reconnect-timeout`)."""
        from distributed.comm.core import CommClosedError

        transport = isinstance(error, (OSError, CommClosedError, TimeoutError))
        window = config.seconds("reconnect-timeout") or 0.0
        return (transport and self._client.status not in ("closed", "closing")
                and time.monotonic() - since < window)

"""Who is connected, as a notebook needs it: a change log, so a notebook's look at the pool before each cell
costs bytes in proportion to what changed since its last look, not to the number of volunteers.

Dask's ``identity`` answer carries every worker's whole record (a volunteer's advert alone lists ~4.6 KB of
package versions), so asking it before each cell cost ~0.9 MB per cell with 100 volunteers. A notebook that
says which roster it holds (``generation``, ``epoch``) gets only the workers that joined or left since.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["ENTRY_KEYS", "Roster"]

# What a notebook reads of a worker (placement, the environment check, GPU needs); fixed for a worker's life.
ENTRY_KEYS = ("name", "nthreads", "memory_limit", "resources", "gpu", "depin")


class Roster(SchedulerPlugin):
    """Counts joins and leaves; answers a notebook with the changes since the roster it holds."""

    name = "depin-roster"

    def __init__(self, scheduler: Any, keep: int = 4096) -> None:
        self.scheduler = scheduler
        # A restarted coordinator counts from 0 again: a new generation tells a notebook its epoch means nothing.
        self.generation = secrets.token_hex(8)
        self.epoch = 0
        self.log: deque[tuple[int, str]] = deque(maxlen=keep)  # (epoch of a join or leave, worker address)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self._changed(worker)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self._changed(worker)

    def _changed(self, address: str) -> None:
        self.epoch += 1
        self.log.append((self.epoch, address))

    def entry(self, address: str) -> dict[str, Any]:
        ident = self.scheduler.workers[address].identity()
        return self.scheduler.strip_serialized({k: ident[k] for k in ENTRY_KEYS if k in ident})

    def since(self, generation: str | None, epoch: int) -> dict[str, Any]:
        """``{"generation", "epoch", "full", "workers": {address: entry}, "removed": [address]}``: everything
        (``full``) when the notebook's roster is of another generation or older than the log, else the changes."""
        head = {"generation": self.generation, "epoch": self.epoch}
        if generation == self.generation and epoch == self.epoch:
            return {**head, "full": False, "workers": {}, "removed": []}
        oldest = self.log[0][0] if self.log else self.epoch + 1
        if generation != self.generation or epoch > self.epoch or epoch < oldest - 1:
            return {**head, "full": True, "workers": {a: self.entry(a) for a in self.scheduler.workers},
                    "removed": []}
        changed = {a for e, a in self.log if e > epoch}
        present = {a: self.entry(a) for a in sorted(changed) if a in self.scheduler.workers}
        return {**head, "full": False, "workers": present, "removed": sorted(changed - set(present))}

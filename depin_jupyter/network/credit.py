"""Credit and reputation per volunteer, kept by the coordinator: what finished work earned, what replicas proved.

Per volunteer name the ledger keeps:

* ``gpu_seconds`` / ``cpu_seconds``: raw wall-clock compute time of finished tasks, as the worker's
  ``startstops`` report it (a task that sleeps earns as much as one that computes);
* ``cpu_used_seconds``: CPU time the `%%depin` cells really used, claimed by the worker (event
  `CREDIT_TOPIC` from `worker.relayed`), capped at the task's wall time;
* ``credit``: normalized credit = cpu_used_seconds x speed factor (`protocol.credit`): a slow machine
  does not earn less for the same work, and sleeping earns nothing. Granted by the coordinator: the CPU
  time claimed is capped by the time it saw the task run (dispatch to result), the speed factor applies
  only once replicas validated the volunteer's work, and the valid replicas of one cell share the smallest
  (two) or median (three or more) of their claims;
* ``energy_j``: joules the volunteer's cells were measured to use (`worker.energy`), over ``energy_tasks``
  tasks; ``energy_unmeasured_tasks`` counts tasks with no power counter and ``energy_reason`` says why.

Replica verdicts extend a volunteer's streak or reset it and withhold that work's credit.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from depin_jupyter import config
from depin_jupyter.protocol.constants import CREDIT_TOPIC
from depin_jupyter.protocol.credit import normalized_credit

__all__ = ["Ledger", "apply_verdicts", "credit_entry", "reputation_entry"]


def credit_entry(credits: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """``name``'s credit entry, created empty on first use."""
    return credits.setdefault(name, {"gpu_seconds": 0.0, "cpu_seconds": 0.0, "tasks": 0})


def reputation_entry(reputation: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """``name``'s replication record, created empty on first use."""
    return reputation.setdefault(name, {"streak": 0, "valid": 0, "invalid": 0, "checked": 0})


def _claimed_energy(msg: dict[str, Any]) -> dict[str, Any]:
    joules = msg.get("energy_j")
    if isinstance(joules, (int, float)) and not isinstance(joules, bool) and 0 <= joules < math.inf:
        return {"energy_j": float(joules), "source": str(msg.get("energy_source") or "")[:40]}
    return {"reason": str(msg.get("energy_reason") or "not measured")[:300]}


def validated(reputation: dict[str, dict[str, Any]], name: str) -> bool:
    """Whether replicas have validated some of ``name``'s results (and none was found invalid lately)."""
    rep = reputation.get(name) or {}
    return int(rep.get("valid") or 0) > 0 and int(rep.get("streak") or 0) > 0


def _capped_energy(energy: dict[str, Any], observed: float, gpu: bool) -> dict[str, Any]:
    """An energy claim no larger than a plausible board draws in the time the coordinator saw the task run."""
    if "energy_j" not in energy:
        return energy
    watts = float(config.get("coordinator.max-power-w") or 1000.0) * (1.0 if gpu else 0.5)
    return {**energy, "energy_j": min(float(energy["energy_j"]), watts * observed)}


def _add_energy(entry: dict[str, Any], energy: dict[str, Any]) -> None:
    if "energy_j" in energy:
        entry["energy_j"] = entry.get("energy_j", 0.0) + energy["energy_j"]
        entry["energy_tasks"] = entry.get("energy_tasks", 0) + 1
        if energy["source"]:
            entry["energy_source"] = energy["source"]
    else:
        entry["energy_unmeasured_tasks"] = entry.get("energy_unmeasured_tasks", 0) + 1
        entry["energy_reason"] = energy["reason"]


class Ledger(SchedulerPlugin):
    """Credit per volunteer for completed work; frees relayed results of forgotten tasks."""

    name = "depin-ledger"

    def __init__(self, sched: Any) -> None:
        self.sched = sched
        # task key -> (worker address, CPU seconds, energy fields of the event)
        self.pending: dict[str, tuple[str, float, dict[str, Any]]] = {}
        self.dispatched: dict[str, float] = {}  # task key -> when the coordinator saw it start processing

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != CREDIT_TOPIC or not isinstance(msg, dict):
            return
        key, address = msg.get("key"), str(msg.get("worker"))  # "worker": set by the scheduler from the stream
        try:
            cpu = float(msg.get("cpu_seconds"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
        if not self.sched.is_processing_on(key, address) or not 0 <= cpu < math.inf:
            return  # only for a task this worker is running now
        self.pending[str(key)] = (address, cpu, _claimed_energy(msg))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "forgotten":
            self.sched.relay.drop(str(key))
            self.pending.pop(str(key), None)
            return
        if finish == "processing":
            self.dispatched[str(key)] = time.monotonic()
            return
        if start != "processing":
            return
        pending = self.pending.pop(str(key), None)
        dispatched = self.dispatched.pop(str(key), None)
        if finish == "memory":
            observed = max(0.0, time.monotonic() - dispatched) if dispatched is not None else 0.0
            self._credit(str(key), kwargs.get("worker"), kwargs.get("startstops") or (), pending, observed)

    def _credit(self, key: str, worker: Any, startstops: Any, pending: tuple[str, float, dict[str, Any]] | None,
                observed: float) -> None:
        """Credit one finished task: every figure the worker reports is capped by what the coordinator saw."""
        name = self.sched.worker_names.get(worker)
        if name is None:
            return
        claimed = max(0.0, sum(float(s.get("stop", 0)) - float(s.get("start", 0))
                               for s in startstops if s.get("action") == "compute"))
        seconds = min(claimed, observed)  # the worker's own timing, no longer than dispatch -> result here
        has_gpu, bench = self.sched.worker_profile(worker)
        kind = "gpu_seconds" if has_gpu else "cpu_seconds"
        entry = credit_entry(self.sched.credits, name)
        entry[kind] = entry.get(kind, 0.0) + seconds
        entry["tasks"] = entry.get("tasks", 0) + 1
        gained = 0.0
        if pending is not None and pending[0] == worker:
            used = min(pending[1], seconds)  # a claim is capped by the time the coordinator saw the task run
            if not validated(self.sched.reputation, name):
                bench = None  # a speed bonus only once replicas validated its work (speed factor 1 until then)
            gained = normalized_credit(used, bench)
            entry["cpu_used_seconds"] = entry.get("cpu_used_seconds", 0.0) + used
            entry["credit"] = entry.get("credit", 0.0) + gained
            _add_energy(entry, _capped_energy(pending[2], observed, has_gpu))
        self.sched.note_credit(key, name, kind, seconds, gained)
        self.sched.credits_dirty = True


def apply_verdicts(verdicts: Any, *, worker_names: dict[str, str], reputation: dict[str, dict[str, Any]],
                   credits: dict[str, dict[str, Any]], spent: dict[str, tuple[str, str, float, float]]) -> bool:
    """Replica verdicts: valid ones extend a volunteer's streak, an invalid one resets it and withholds
    that work's credit (``spent``: task key -> (volunteer, kind, seconds, credit), consumed). True if any
    credit changed."""
    credits_changed = _agree_on_credit(verdicts, credits, spent)
    for v in verdicts or ():
        work = spent.pop(str(v.get("key")), None)
        name = worker_names.get(str(v.get("address"))) or (work[0] if work else None)
        if name is None:
            continue
        rep = reputation_entry(reputation, name)
        rep["checked"] += 1
        if v.get("valid"):
            rep["valid"] += 1
            rep["streak"] += 1
        else:
            rep["invalid"] += 1
            rep["streak"] = 0
            if work is not None and work[0] == name:
                _withhold(credit_entry(credits, name), work)
                credits_changed = True
        rep["agreement"] = round(rep["valid"] / rep["checked"], 4)
    return credits_changed


def _agree_on_credit(verdicts: Any, credits: dict[str, dict[str, Any]],
                     spent: dict[str, tuple[str, str, float, float]]) -> bool:
    """BOINC style: the valid replicas of one cell are granted the same credit, the smallest claim of two or
    the median of three or more, so one volunteer's inflated claim earns nothing extra."""
    valid = [spent[str(v.get("key"))] for v in verdicts or () if v.get("valid") and str(v.get("key")) in spent]
    if len(valid) < 2:
        return False
    claims = [w[3] for w in valid]
    granted = min(claims) if len(claims) == 2 else statistics.median(claims)
    for key in [str(v.get("key")) for v in verdicts or () if v.get("valid") and str(v.get("key")) in spent]:
        name, kind, seconds, credit = spent[key]
        entry = credit_entry(credits, name)
        if "credit" in entry:
            entry["credit"] = max(0.0, entry["credit"] + granted - credit)
        spent[key] = (name, kind, seconds, granted)
    return True


def _withhold(entry: dict[str, Any], work: tuple[str, str, float, float]) -> None:
    _, kind, seconds, credit = work
    entry[kind] = max(0.0, entry.get(kind, 0.0) - seconds)
    if "credit" in entry:
        entry["credit"] = max(0.0, entry["credit"] - credit)
    entry["withheld_seconds"] = entry.get("withheld_seconds", 0.0) + seconds
    entry["invalid_tasks"] = entry.get("invalid_tasks", 0) + 1

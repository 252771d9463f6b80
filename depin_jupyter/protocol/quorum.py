"""Replicated runs: one cell on K distinct volunteers, a tolerant majority decides, reputation adapts.

BOINC-style validation, per notebook cell and interactive:

* The cell runs on K workers of distinct volunteers (two GPUs of one volunteer are one vote). Their
  results are compared value by value with `compare.compare`: exact for integers, booleans, bytes and
  strings; within ``rtol``/``atol`` for floats. A group that agrees and holds a strict majority wins.
  Without one, more replicas run (one at a time, on volunteers not yet used) up to ``replicas-max``; then
  `ReplicationError` lists every worker and how its results differed.
* Reputation (kept by the coordinator): consecutive validated results (streak), valid and invalid
  counts. **Adaptive replication**: a volunteer with a streak of at least N (``trust-streak``) runs a
  cell alone, except for spot checks with probability 1/N. An invalid result resets the streak and the
  coordinator withholds the credit of that work.

`needs_replication` and `majority` are pure, so the policy is tested by simulation as well as for real.

Pure (no cluster, no I/O): the kernel runs replicas by this policy, and it is tested by simulation.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter.compare import Comparison, compare
from depin_jupyter.errors import RemoteExecutionError
from depin_jupyter.protocol.values import RichValue, unbox

__all__ = ["Plan", "Replica", "ReplicationError", "agree", "comparable", "majority", "needs_replication", "plan", "run"]


class ReplicationError(RemoteExecutionError):
    """No majority of replicas agreed on the cell's results."""


@dataclass
class Replica:
    """One execution of the cell: where, by whom, and what came back (or why nothing did)."""

    worker: str
    volunteer: str
    result: dict[str, Any] | None = None
    failure: str | None = None      # an infrastructure failure (worker lost...): no vote
    verdict: str | None = None      # "valid", "invalid" or None (no vote)
    detail: str = ""


def needs_replication(reputation: dict[str, Any] | None, trust_streak: int, rng: random.Random) -> bool:
    """Whether a run on this volunteer must be replicated (always until trusted, then a 1/N spot check)."""
    streak = int((reputation or {}).get("streak", 0))
    if streak < trust_streak:
        return True
    return rng.random() < 1.0 / trust_streak


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What replicas must agree on: status, the error's type, and every output, changed input and value."""
    if result.get("status") != "ok":
        err = result.get("error") or {}
        return {"status": result.get("status"), "error": err.get("type")}
    values = {n: unbox(v) for n, v in (result.get("outputs") or {}).items()}
    values.update({f"{n} (changed in place)": unbox(v) for n, v in (result.get("mutated") or {}).items()})
    value = result.get("value")
    if value is not None and not isinstance(value, RichValue):
        values["(value)"] = value
    elif isinstance(value, RichValue):
        values["(value)"] = value.data.get("text/plain")
    return {"status": "ok", "values": values, "deleted": sorted(result.get("deleted") or ())}


def agree(a: dict[str, Any], b: dict[str, Any], rtol: float, atol: float) -> Comparison:
    return compare(comparable(a), comparable(b), rtol, atol)


def majority(results: list[dict[str, Any]], rtol: float, atol: float) -> tuple[list[int] | None, list[list[int]]]:
    """(indices of the agreeing strict majority or None, all groups of mutually agreeing results)."""
    groups: list[list[int]] = []
    for i, r in enumerate(results):
        for g in groups:
            if agree(results[g[0]], r, rtol, atol).ok:
                g.append(i)
                break
        else:
            groups.append([i])
    best = max(groups, key=len) if groups else None
    if best is not None and 2 * len(best) > len(results):
        return best, groups
    return None, groups


@dataclass
class Plan:
    """Which workers run the cell first, and whether the run is a spot check of a trusted volunteer."""

    workers: list[str]
    adaptive: bool
    replicated: bool
    reputations: dict[str, Any] = field(default_factory=dict)


def plan(candidates: list[str], names: dict[str, str], k: int, adaptive: bool,
         reputations: dict[str, Any], trust_streak: int, rng: random.Random) -> Plan:
    """Choose the primary worker at random and, when replication is needed, partners of other volunteers."""
    order = candidates[:]
    rng.shuffle(order)
    primary = order[0]
    replicate = k > 1 and (not adaptive or needs_replication(reputations.get(names[primary]), trust_streak, rng))
    chosen = [primary]
    if replicate:
        used = {names[primary]}
        for w in order[1:]:
            if len(chosen) == k:
                break
            if names[w] not in used:
                chosen.append(w)
                used.add(names[w])
    return Plan(workers=chosen, adaptive=adaptive, replicated=replicate, reputations=reputations)


def run(run_one: Callable[[str, bool], dict[str, Any]], plan_: Plan, candidates: list[str],
        names: dict[str, str], k: int, k_max: int, rtol: float, atol: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the plan (``run_one(worker, primary) -> result``), add replicas until a majority agrees.

    Returns the accepted result and the replication record (stored in the run's manifest).
    """
    replicas = [Replica(worker=w, volunteer=names[w]) for w in plan_.workers]
    if plan_.replicated and len({r.volunteer for r in replicas}) < k:
        raise ReplicationError(
            f"--replicas {k} needs {k} distinct volunteers able to run this cell; only "
            f"{len({names[w] for w in candidates})} are connected ({', '.join(sorted(set(names.values())))}). "
            f"Lower --replicas or wait for more volunteers.")
    _run_all(run_one, replicas)
    while True:
        voting = [r for r in replicas if r.result is not None]
        if not plan_.replicated:
            if not voting:
                raise RemoteExecutionError(f"the cell could not run on {replicas[0].volunteer}: {replicas[0].failure}")
            return voting[0].result, _record(replicas, plan_, rtol, atol, accepted=True)  # type: ignore[return-value]
        winners, groups = majority([r.result for r in voting], rtol, atol) if len(voting) >= 2 else (None, [])  # type: ignore[misc]
        if winners is not None and len(voting) >= min(k, 2):
            ref = voting[winners[0]].result
            for i, r in enumerate(voting):
                r.verdict = "valid" if i in winners else "invalid"
                if i not in winners:
                    r.detail = agree(ref, r.result, rtol, atol).detail  # type: ignore[arg-type]
            primary = next((r for r in voting if r.verdict == "valid" and r.worker == plan_.workers[0]),
                           voting[winners[0]])
            return primary.result, _record(replicas, plan_, rtol, atol, accepted=True)  # type: ignore[return-value]
        # A volunteer that voted is not asked twice; one whose replica was lost may be, on another worker.
        voted = {r.volunteer for r in voting}
        tried = {r.worker for r in replicas}
        spare = [w for w in candidates if names[w] not in voted and w not in tried]
        if len(replicas) >= k_max or not spare:
            raise ReplicationError(_disagreement(replicas, voting, rtol, atol, k_max, bool(spare)))
        extra = Replica(worker=spare[0], volunteer=names[spare[0]])
        lost = [r for r in replicas if r.result is None]
        why = (f"a replica was lost ({lost[-1].volunteer}: {lost[-1].failure})" if len(voting) < 2 and lost
               else "replicas disagree")
        print(f"depin: {why}; running the cell on a further volunteer ({extra.volunteer}, "
              f"replica {len(replicas) + 1} of at most {k_max}).", file=sys.stderr)
        replicas.append(extra)
        _run_all(run_one, [extra], primary_first=False)


def _run_all(run_one: Callable[[str, bool], dict[str, Any]], replicas: list[Replica],
             primary_first: bool = True) -> None:
    """Run replicas concurrently; the first (the primary) shows its output in the notebook."""
    def go(r: Replica, primary: bool) -> None:
        try:
            r.result = run_one(r.worker, primary)
        except Exception as e:  # noqa: BLE001 - recorded; the majority logic decides (Ctrl-C propagates)
            r.failure = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=go, args=(r, primary_first and i == 0), daemon=True)
               for i, r in enumerate(replicas[1:], 1)]
    for t in threads:
        t.start()
    go(replicas[0], primary_first)
    for t in threads:
        t.join()


def _disagreement(replicas: list[Replica], voting: list[Replica], rtol: float, atol: float, k_max: int,
                  spare: bool) -> str:
    lines = [f"no majority of replicas agreed on the cell's results (rtol={rtol:g}, atol={atol:g}; "
             f"{len(replicas)} replica(s), at most {k_max}{'' if spare else ', no further volunteer available'}):"]
    ref = voting[0].result if voting else None
    for r in replicas:
        if r.result is None:
            lines.append(f"  {r.volunteer} ({r.worker}): no result ({r.failure})")
        elif r is voting[0]:
            lines.append(f"  {r.volunteer} ({r.worker}): reference")
        else:
            c = agree(ref, r.result, rtol, atol)  # type: ignore[arg-type]
            lines.append(f"  {r.volunteer} ({r.worker}): {c.verdict}{' - ' + c.detail if c.detail else ''}")
    lines.append("Nothing was bound. Run the cell again, or with --worker to see one volunteer's result.")
    return "\n".join(lines)


def _record(replicas: list[Replica], plan_: Plan, rtol: float, atol: float, accepted: bool) -> dict[str, Any]:
    return {"replicated": plan_.replicated, "adaptive": plan_.adaptive, "rtol": rtol, "atol": atol,
            "accepted": accepted,
            "replicas": [{"worker": r.worker, "volunteer": r.volunteer, "verdict": r.verdict,
                          "detail": r.detail, "failure": r.failure} for r in replicas]}

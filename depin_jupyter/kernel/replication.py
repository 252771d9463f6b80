"""Replicated runs: one cell on K distinct workers until a tolerant majority agrees.

The policy (who runs, when results agree, when to stop) is `protocol.quorum`. On a volunteer network the
coordinator applies it (it runs the replicas, judges them, keeps reputations and credit); on a cluster of
one's own the kernel does (`--replicas K`).
"""

from __future__ import annotations

import random
import sys
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import DepinError
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.records import InputsLost, Prepared, Progress, RunOptions
from depin_jupyter.kernel.submit import submit_and_wait
from depin_jupyter.protocol import quorum
from depin_jupyter.protocol.records import RunResult, RunSpec

__all__ = ["execute", "gateway_replication", "identities"]


def identities(session: Any, addresses: list[str]) -> dict[str, str]:
    """Who is behind each worker of a cluster of one's own: its name (two workers of one host are two votes)."""
    by_addr = {w.address: w.name for w in session.workers()}
    return {a: str(by_addr.get(a, a)) for a in addresses}


def _replicas(session: Session, options: RunOptions) -> tuple[int, bool]:
    """(replicas to run, whether adaptive replication applies): --replicas K is exact; the configured
    default (1 on a trusted cluster, 2 on a volunteer network) adapts to each volunteer's reputation."""
    if options.replicas is not None:
        return options.replicas, False
    k = config.get("replicas")
    if k is None:
        k = 2 if session.untrusted else 1
    return int(k), session.untrusted


def gateway_replication(session: Session, prep: Prepared) -> dict[str, Any] | None:
    """What a volunteer network's coordinator is asked to replicate a cell as (None: one run)."""
    k, adaptive = _replicas(session, prep.options)
    if k <= 1:
        return None
    return {"k": k, "adaptive": adaptive, "rtol": float(config.get("rtol", prep.options.rtol)),
            "atol": float(config.get("atol", prep.options.atol)), "k_max": int(config.get("replicas-max"))}


def execute(session: Session, spec: RunSpec, args: dict[str, Any], prep: Prepared,
            progress: Progress) -> RunResult:
    """Run the cell once, or replicated on distinct workers until a tolerant majority agrees.

    On a volunteer network the coordinator runs the replicas and judges them itself (`network.gateway`):
    the notebook only says how many and how close, and gets the accepted result and the record back."""
    __tracebackhide__ = True
    k, adaptive = _replicas(session, prep.options)
    rtol = float(config.get("rtol", prep.options.rtol))
    atol = float(config.get("atol", prep.options.atol))
    if session.untrusted:
        result = submit_and_wait(session, spec, args, prep.placement, progress,
                                 replication=gateway_replication(session, prep), detached=prep.options.detached)
        record = result.get("replication") or {}
        if record.get("degraded_to") and not session.few_volunteers_said:
            print(f"depin: only {record['degraded_to']} volunteer(s) can run this cell: results are not "
                  f"replicated (depin.replicas wants {k}).", file=sys.stderr)
            session.few_volunteers_said = True
        return result
    if k <= 1:
        return submit_and_wait(session, spec, args, prep.placement, progress)
    return _replicated_here(session, spec, args, prep, progress, k, rtol, atol)


def _replicated_here(session: Session, spec: RunSpec, args: dict[str, Any], prep: Prepared, progress: Progress,
                     k: int, rtol: float, atol: float) -> RunResult:
    """--replicas K on a cluster of one's own: the notebook runs the replicas and compares them."""
    candidates = prep.candidates or [w.address for w in session.workers()]
    names = identities(session, candidates)
    plan = quorum.plan(candidates, names, k, False, {}, int(config.get("trust-streak")), random.Random())
    runs: list[Any] = []  # the submission of each replica (to cancel them together)
    base = {k2: v for k2, v in prep.placement.items() if k2 not in ("workers", "allow_other_workers")}
    inputs_lost: list[str] = []

    def run_one(worker: str, primary: bool) -> dict[str, Any]:
        rspec: RunSpec = spec if primary else {**spec, "run_id": f"{spec['run_id']}-{names[worker]}"}
        try:
            return dict(submit_and_wait(session, rspec, args, {**base, "workers": [worker], "allow_other_workers": False},
                                        progress if primary else Progress(), echo=primary, on_submit=runs.append))
        except InputsLost as e:
            inputs_lost.append(str(e))
            raise

    try:
        result, record = quorum.run(run_one, plan, candidates, names, k, int(config.get("replicas-max")), rtol, atol)
    except DepinError:
        if inputs_lost:  # not the workers' fault: run the whole replicated cell again, inputs inline
            raise InputsLost(inputs_lost[0]) from None
        raise
    except KeyboardInterrupt:
        for run in runs:
            run.cancel()
        raise
    result["replication"] = record
    return result  # type: ignore[return-value]

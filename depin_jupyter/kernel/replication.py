"""Replicated runs from the notebook: one cell on K distinct volunteers until a tolerant majority agrees.

The policy (who runs, when results agree, when to stop) is `protocol.quorum`; here the kernel runs it: it
asks the coordinator who is behind each worker and how trusted they are, submits the replicas, and reports
the verdicts back so the coordinator can keep reputations and withhold the credit of invalid work.
"""

from __future__ import annotations

import random
import sys
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import DepinError
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.records import InputsLost, Prepared, Progress, RunOptions
from depin_jupyter.kernel.submit import cancel, submit_and_wait
from depin_jupyter.protocol import quorum
from depin_jupyter.protocol.records import RunResult, RunSpec
from depin_jupyter.protocol.rpc import Coordinator

__all__ = ["execute", "identities"]


def identities(session: Any, addresses: list[str]) -> dict[str, str]:
    """Who is behind each worker: the certificate name on a volunteer network, else the worker's host."""
    if session.untrusted:
        try:
            from depin_jupyter.protocol.rpc import Coordinator

            names = Coordinator.of_client(session.client).identities()
        except Exception:  # noqa: BLE001 - an older coordinator: fall back to worker names
            names = {}
        by_addr = {w.address: w.name for w in session.workers()}
        return {a: str(names.get(a) or by_addr.get(a, a)) for a in addresses}
    return {a: a for a in addresses}


def _replicas(session: Session, options: RunOptions) -> tuple[int, bool]:
    """(replicas to run, whether adaptive replication applies): --replicas K is exact; the configured
    default (1 on a trusted cluster, 2 on a volunteer network) adapts to each volunteer's reputation."""
    if options.replicas is not None:
        return options.replicas, False
    k = config.get("replicas")
    if k is None:
        k = 2 if session.untrusted else 1
    return int(k), session.untrusted


def _report_verdicts(session: Session, record: dict[str, Any] | None, futures: list[tuple[str, Any]]) -> None:
    """Tell the coordinator which replicas were valid: it keeps reputations and withholds invalid credit."""
    if not record or not record.get("replicated") or not session.untrusted:
        return
    keys = {worker: f.key for worker, f in futures}
    verdicts = [{"address": r["worker"], "key": keys.get(r["worker"]), "valid": r["verdict"] == "valid"}
                for r in record["replicas"] if r["verdict"] is not None]
    try:
        Coordinator.of_client(session.client).report_verdicts(verdicts)
    except Exception as e:  # noqa: BLE001 - the run itself is fine; reputation is best effort
        print(f"depin: could not report replica verdicts to the coordinator ({e})", file=sys.stderr)


def execute(session: Session, spec: RunSpec, args: dict[str, Any], prep: Prepared,
            progress: Progress) -> RunResult:
    """Run the cell once, or replicated on distinct volunteers until a tolerant majority agrees."""
    __tracebackhide__ = True

    k, adaptive = _replicas(session, prep.options)
    if k <= 1:
        return submit_and_wait(session, spec, args, prep.placement, progress)
    rtol = float(config.get("rtol", prep.options.rtol))
    atol = float(config.get("atol", prep.options.atol))
    candidates = prep.candidates or [w.address for w in session.workers()]
    names = identities(session, candidates)
    reputations: dict[str, Any] = {}
    if adaptive:
        try:
            reputations = Coordinator.of_client(session.client).reputation()
        except Exception:  # noqa: BLE001 - no reputation service: replicate every run
            adaptive = False
    distinct = len(set(names.values()))
    if adaptive and distinct < k:  # the default on a volunteer network degrades; an explicit --replicas does not
        if not session.few_volunteers_said:
            print(f"depin: only {distinct} volunteer(s) can run this cell: results are not replicated "
                  f"(depin.replicas wants {k}).", file=sys.stderr)
            session.few_volunteers_said = True
        k = distinct
    if k <= 1:
        return submit_and_wait(session, spec, args, prep.placement, progress)
    plan = quorum.plan(candidates, names, k, adaptive, reputations, int(config.get("trust-streak")),
                            random.Random())
    if not plan.replicated:  # a trusted volunteer, not spot-checked this time: Dask places and re-runs it
        return submit_and_wait(session, spec, args, prep.placement, progress)
    futures: list[tuple[str, Any]] = []  # (worker, future) of each replica
    base = {k2: v for k2, v in prep.placement.items() if k2 not in ("workers", "allow_other_workers")}

    inputs_lost: list[str] = []

    def run_one(worker: str, primary: bool) -> dict[str, Any]:
        rspec: RunSpec = spec if primary else {**spec, "run_id": f"{spec['run_id']}-{names[worker]}"}
        try:
            return dict(submit_and_wait(session, rspec, args, {**base, "workers": [worker], "allow_other_workers": False},
                                        progress if primary else Progress(), echo=primary,
                                        on_submit=lambda f: futures.append((worker, f))))
        except InputsLost as e:
            inputs_lost.append(str(e))
            raise

    record: dict[str, Any] | None = None
    try:
        result, record = quorum.run(run_one, plan, candidates, names, k, int(config.get("replicas-max")),
                                         rtol, atol)
    except DepinError:
        if inputs_lost:  # not the volunteers' fault: run the whole replicated cell again, inputs inline
            raise InputsLost(inputs_lost[0]) from None
        raise
    except KeyboardInterrupt:
        for _, f in futures:
            cancel(session.client, f, spec["run_id"], timed_out=False)
        raise
    finally:
        _report_verdicts(session, record, futures)
    result["replication"] = record
    return result  # type: ignore[return-value]

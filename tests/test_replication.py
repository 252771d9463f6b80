"""Replicated runs: majority with tolerance, the adaptive policy (simulated), and real replicas."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import run, run_ok
from IPython.utils.capture import capture_output

from depin_jupyter.protocol import quorum
from depin_jupyter.store import open_store


def _ok(**values):
    return {"status": "ok", "outputs": values}


def test_majority_is_exact_for_ints_and_tolerant_for_floats():
    a = _ok(n=3, x=np.array([1.0, 2.0]))
    noise = _ok(n=3, x=np.array([1.0, 2.0 + 1e-12]))
    lie = _ok(n=3, x=np.array([1.0, 2.001]))
    other_int = _ok(n=4, x=np.array([1.0, 2.0]))
    assert quorum.majority([a, noise], 1e-9, 0)[0] == [0, 1]
    assert quorum.majority([a, lie], 1e-9, 0)[0] is None
    winners, groups = quorum.majority([a, lie, noise], 1e-9, 0)
    assert winners == [0, 2] and groups == [[0, 2], [1]]
    assert quorum.majority([a, other_int], 1.0, 1.0)[0] is None  # integers: no tolerance
    err = {"status": "error", "error": {"type": "ZeroDivisionError"}}
    assert quorum.majority([err, dict(err)], 0, 0)[0] == [0, 1]  # the same error twice agrees
    assert quorum.majority([err, a], 0, 0)[0] is None


def test_run_adds_replicas_until_a_majority_and_names_the_liar():
    names = {"w1": "alice", "w2": "bob", "w3": "carol", "w4": "alice-2nd-gpu"}
    names["w4"] = "alice"
    truth = np.arange(4.0)

    def run_one(worker, primary):
        return _ok(x=truth + (1e-3 if worker == "w2" else 0.0))

    plan = quorum.Plan(workers=["w2", "w4"], adaptive=False, replicated=True)
    with pytest.raises(quorum.ReplicationError, match="needs 2 distinct volunteers"):
        quorum.run(run_one, quorum.Plan(workers=["w1", "w4"], adaptive=False, replicated=True),
                        ["w1", "w4"], names, 2, 5, 1e-9, 0)
    result, record = quorum.run(run_one, plan, ["w1", "w2", "w3", "w4"], names, 2, 5, 1e-9, 0)
    assert np.array_equal(result["outputs"]["x"], truth)
    verdicts = {r["volunteer"]: r["verdict"] for r in record["replicas"]}
    assert verdicts == {"bob": "invalid", "alice": "valid"} or verdicts == {"bob": "invalid", "alice": "valid",
                                                                            "carol": "valid"}
    assert any("max abs error 0.001" in r["detail"] for r in record["replicas"] if r["verdict"] == "invalid")

    def all_differ(worker, primary):
        return _ok(x=truth + int(worker[1]))

    with pytest.raises(quorum.ReplicationError, match="(?s)no majority.*bob \\(w2\\): differs"):
        quorum.run(all_differ, quorum.Plan(workers=["w1", "w2"], adaptive=False, replicated=True),
                        ["w1", "w2", "w3"], names, 2, 3, 1e-9, 0)


def _simulate(seed: int, liar_rate: float, n_workers: int = 5, trust: int = 10, limit: int = 200,
              steps: int = 0) -> tuple[int | None, float]:
    """One sequence of the real policy (plan + needs_replication + majority) with worker 0 lying at
    ``liar_rate``; returns (liar's runs until caught or None, replication overhead after warm-up)."""
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(n_workers)]
    names = {w: w for w in workers}
    rep = {w: {"streak": 0} for w in workers}
    liar_runs, extra, counted = 0, 0, 0
    for step in range(steps or 10 ** 6):
        p = quorum.plan(workers, names, 2, True, rep, trust, rng)
        outputs = []
        for w in p.workers:
            lies = w == "w0" and rng.random() < liar_rate
            outputs.append(_ok(x=np.array([1.0 + (0.5 if lies else 0.0)])))
        if "w0" in p.workers:
            liar_runs += 1
        if step > 200:
            counted += 1
            extra += len(p.workers) - 1
        if p.replicated:
            winners, _ = quorum.majority(outputs, 1e-9, 0)
            if winners is None:  # a third, honest volunteer decides
                third = next(w for w in workers if w not in p.workers and w != "w0")
                outputs.append(_ok(x=np.array([1.0])))
                p.workers.append(third)
                winners, _ = quorum.majority(outputs, 1e-9, 0)
            for i, w in enumerate(p.workers):
                if i in winners:
                    rep[w]["streak"] += 1
                else:
                    rep[w]["streak"] = 0
                    if w == "w0":
                        return liar_runs, 0.0
        if not steps and liar_runs >= limit:
            return None, 0.0
    return None, extra / max(counted, 1)


def test_adaptive_replication_catches_a_10_percent_liar_and_costs_honest_workers_little():
    caught = [_simulate(seed, 0.10)[0] for seed in range(1000)]
    rate = sum(c is not None for c in caught) / len(caught)
    assert rate >= 0.95, rate
    overhead = np.mean([_simulate(seed, 0.0, steps=3000)[1] for seed in range(5)])
    assert overhead <= 0.15, overhead
    # and the policy is not vacuous: without replication nothing is caught
    assert quorum.needs_replication({"streak": 0}, 10, random.Random(0))
    rng = random.Random(1)
    spot = sum(quorum.needs_replication({"streak": 50}, 10, rng) for _ in range(10000)) / 10000
    assert 0.08 < spot < 0.12


def test_replicas_on_the_local_cluster_are_recorded_in_the_manifest(shell, tmp_path, depin_session):
    url = str(tmp_path / "rep.zarr")
    run_ok(shell, "import numpy as np\nx = np.linspace(0, 1, 50)")
    run_ok(shell, f"%%depin --replicas 2 --store {url}\ny = np.sin(x)\nn = int((y > 0.5).sum())")
    assert np.allclose(shell.user_ns["y"], np.sin(np.linspace(0, 1, 50)))
    store = open_store(url, create=False)
    [summary] = store.runs()
    rec = store.manifest(summary.run_id).extra["replication"]
    assert rec["replicated"] and len({r["worker"] for r in rec["replicas"]}) == 2
    assert [r["verdict"] for r in rec["replicas"]] == ["valid", "valid"] and rec["rtol"] == 1e-7
    with capture_output() as cap:
        run(shell, "%%depin --replicas 3 --no-store\nz = 1")
    assert "needs 3 distinct volunteers" in cap.stderr + cap.stdout + str(shell.user_ns.get("_", ""))

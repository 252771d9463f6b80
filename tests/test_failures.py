"""Failures that are not Python exceptions are explained: what happened, where, and what to try."""

from __future__ import annotations

import os

import dask
import pytest
from conftest import run, run_ok
from distributed import LocalCluster

from depin_jupyter.errors import WorkerLostError
from depin_jupyter.kernel.failures import explain_death, explain_exception

# ---------------------------------------------------------------- pure explanations

def test_memory_event_beats_everything_and_is_not_retried():
    d = explain_death("tcp://w:1", 42, ["Worker process 42 was killed by signal 15"],
                      [{"pid": 42, "worker": "tcp://w:1", "rss": 3 * 2**30}], memory_limit=2**31)
    assert d.cause == "memory" and not d.retryable
    assert "ran out of memory" in d.message and "3.00 GiB of its 2.00 GiB limit" in d.message


@pytest.mark.parametrize("line, cause, words, retryable", [
    ("Worker process 7 was killed by signal 11", "signal", "SIGSEGV", False),
    ("Worker process 7 was killed by signal 9", "signal", "SIGKILL", True),
    ("Worker process 7 exited with status 3", "exit", "status 3", True),
])
def test_nanny_log_lines(line, cause, words, retryable):
    d = explain_death("tcp://w:1", 7, ["unrelated", line], [])
    assert (d.cause, d.retryable) == (cause, retryable) and words in d.message


def test_other_pids_and_no_evidence_mean_a_lost_connection():
    d = explain_death("tcp://w:1", 7, ["Worker process 8 was killed by signal 11"], [{"pid": 8}])
    assert d.cause == "lost" and "lost its connection" in d.message and d.retryable


def test_exception_hints():
    assert "ran out of memory" in explain_exception("OutOfMemoryError", "cupy.cuda.memory", "Out of memory "
                                                    "allocating 1,024 bytes", "tcp://w:1",
                                                    {"name": "H100", "memory-total": 80 * 2**30})
    assert "--gpu-mem" in explain_exception("OutOfMemoryError", "cupy.cuda.memory", "x", None)
    assert "host memory" in explain_exception("_ArrayMemoryError", "numpy._core._exceptions", "", None)
    assert explain_exception("ValueError", "builtins", "bad", None) is None


# ---------------------------------------------------------------- real workers dying

def _still_works(shell):
    assert run_ok(shell, "%%depin --no-cache\nfine = 40 + 2\nfine") == 42


def test_segfault_is_explained_and_not_retried(shell):
    res = run(shell, "%%depin --retries 2\nimport ctypes\nctypes.string_at(0)")
    err = res.error_in_exec
    assert isinstance(err, WorkerLostError), err
    assert "crashed in native code" in str(err) and "SIGSEGV" in str(err)
    assert "Tried" not in str(err)  # not retried: it would crash again
    _still_works(shell)


def test_host_memory_error_gets_a_hint(shell):
    res = run(shell, "%%depin\nimport numpy as np\nnp.empty(2**62, dtype=np.uint8)")
    assert type(res.error_in_exec).__name__ in ("MemoryError", "_ArrayMemoryError")
    assert any("host memory" in n for n in res.error_in_exec.__notes__)
    _still_works(shell)


def test_worker_over_its_memory_limit_is_explained(shell, depin_session):
    from depin_jupyter.kernel import cluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.worker.memory.terminate": 0.9}):
        small = LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="400MiB", processes=True,
                             dashboard_address=None)
    cluster._session = None  # keep the suite's cluster open while we connect elsewhere
    try:
        run_ok(shell, f"%depin connect {small.scheduler_address}")
        res = run(shell, "%%depin --retries 3\nimport numpy as np, time\nhog = np.ones(2**27)\n"
                         "time.sleep(30)")
        err = res.error_in_exec
        assert isinstance(err, WorkerLostError), err
        assert "ran out of memory" in str(err) and "smaller" in str(err)
        assert "Tried" not in str(err)  # memory failures are not retried on a same-sized worker
    finally:
        cluster.close_session()
        small.close()
        cluster._session = depin_session
    _still_works(shell)


def test_a_cell_stuck_in_a_c_call_is_stopped_by_restarting_its_worker(shell, depin_session):
    from depin_jupyter.errors import CellTimeoutError

    pids = set(depin_session.client.run(os.getpid).values())
    res = run(shell, "%%depin --timeout 1 --no-store\nimport time\ntime.sleep(600)")
    err = res.error_in_exec
    assert isinstance(err, CellTimeoutError), err
    assert "C call" in str(err) and "restarted" in str(err)
    depin_session.client.wait_for_workers(2, timeout=60)
    assert not any(depin_session.client.processing().values())  # nothing left running the cell
    assert set(depin_session.client.run(os.getpid).values()) != pids  # a fresh worker process took over
    _still_works(shell)

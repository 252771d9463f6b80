"""What `depin worker` does before its workers register: the fork server, the advert measured once, and a
nanny whose worker process waits for the sandbox probe (real Dask scheduler and nanny, in-process)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("distributed")


def _run(code: str, env: dict[str, str] | None = None) -> str:
    import os

    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_fork_server_is_started_and_used_only_where_the_volunteer_did_not_choose():
    code = """
        import dask.config
        from depin_jupyter.worker.early import warm_process_start
        warm_process_start()
        print(dask.config.get("distributed.worker.multiprocessing-method"))
    """
    assert _run(code) == "forkserver"
    chosen = {"DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "spawn-chosen"}
    # a volunteer's own choice (here a value Dask would reject, so it is visibly left alone) is kept
    assert _run(code, chosen) == "spawn-chosen"


def test_a_cpu_worker_takes_the_benchmark_its_volunteer_measured():
    code = """
        import dask.config
        from depin_jupyter.worker import controls
        dask.config.set({"depin.volunteer.advert": {"benchmark": {"kind": "numpy", "seconds": 9.0}}})
        print(controls.cached_benchmark(False)["seconds"])
    """
    assert _run(code) == "9.0"


def test_nanny_registers_at_once_and_starts_its_worker_with_what_ready_gives():
    """The nanny is on the scheduler before ``ready`` is set; its worker process starts after, with the
    config ``ready`` gave; a refusal (None) fails the start and no worker joins."""
    from distributed import Client, Nanny, Scheduler

    from depin_jupyter.worker._dask import start_worker_when

    async def main() -> None:
        async with Scheduler(dashboard_address=":0", host="127.0.0.1") as s:
            registered = asyncio.Event()
            handler = s.handlers["register_nanny"]

            def register_nanny(comm, address):  # the scheduler's own handler, noting the call
                registered.set()
                return handler(comm, address)

            s.handlers["register_nanny"] = register_nanny
            ready: asyncio.Future = asyncio.get_running_loop().create_future()
            nanny = start_worker_when(Nanny(s.address, nthreads=1, host="127.0.0.1", dashboard=False), ready)
            starting = asyncio.ensure_future(nanny.start())
            await asyncio.wait_for(registered.wait(), 60)
            await asyncio.sleep(0.5)
            assert not s.workers and not starting.done()  # registered; no worker process before ready
            ready.set_result({"depin": {"volunteer": {"advert": {"versions": {"probe-said": "1"}}}}})
            await asyncio.wait_for(starting, 120)
            try:
                assert len(s.workers) == 1
                async with Client(s.address, asynchronous=True) as c:
                    assert list((await c.run(_advert_seen)).values()) == [{"probe-said": "1"}]
            finally:
                await nanny.close()

            refused: asyncio.Future = asyncio.get_running_loop().create_future()
            refused.set_result(None)
            other = start_worker_when(Nanny(s.address, nthreads=1, host="127.0.0.1", dashboard=False), refused)
            with pytest.raises(RuntimeError, match="failed to start") as failed:  # Dask's wrapping
                await asyncio.wait_for(other.start(), 120)
            assert "sandbox probe refused" in str(failed.value.__cause__)
            assert not s.workers

    asyncio.run(main())


def _advert_seen() -> object:
    import dask.config

    return (dask.config.get("depin.volunteer.advert", default={}) or {}).get("versions")


@pytest.fixture
def control_dir(tmp_path, monkeypatch):
    import dask.config

    with dask.config.set({"depin.volunteer.control-dir": str(tmp_path / "control")}):
        yield tmp_path / "control"


def test_what_the_machine_is_is_measured_once_and_again_when_it_changed(control_dir):
    """`worker.machine.remembered`: the benchmark and the installed versions are not measured at every start."""
    from depin_jupyter.worker.machine import remembered

    calls: list[int] = []

    def measure() -> dict:
        calls.append(1)
        return {"n": len(calls)}

    assert remembered("thing", {"cpus": 2}, 60.0, measure) == {"n": 1}
    assert remembered("thing", {"cpus": 2}, 60.0, measure) == {"n": 1} and len(calls) == 1  # remembered
    assert (control_dir / "thing.json").stat().st_mode & 0o077 == 0  # the volunteer's own
    assert remembered("thing", {"cpus": 4}, 60.0, measure) == {"n": 2}  # another machine: measured again
    assert remembered("thing", {"cpus": 4}, -1.0, measure) == {"n": 3}  # too old: measured again
    (control_dir / "thing.json").write_text("{not json")
    assert remembered("thing", {"cpus": 4}, 60.0, measure) == {"n": 4}  # unreadable: measured, rewritten
    assert remembered("thing", {"cpus": 4}, None, measure) == {"n": 4}


def test_installed_versions_are_read_again_when_a_package_is_installed(control_dir, tmp_path, monkeypatch):
    import os
    import sys
    import time

    from depin_jupyter.worker.machine import stored_versions

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    reads: list[int] = []

    def installed() -> dict[str, str]:
        reads.append(1)
        return {"pkg": str(len(reads))}

    assert stored_versions(installed) == {"pkg": "1"}
    assert stored_versions(installed) == {"pkg": "1"}
    (site / "newpkg-1.0.dist-info").mkdir()  # what pip does
    later = time.time() + 5
    os.utime(site, (later, later))
    assert stored_versions(installed) == {"pkg": "2"}

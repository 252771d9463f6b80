"""DepinManager without HTTP: a real LocalCluster behind a real published session, a real store."""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from typing import Any

import pytest

from depin_jupyter.server.manager import (
    NOT_CONNECTED,
    BadRequest,
    Conflict,
    DepinManager,
    NotFound,
)
from depin_jupyter.server.records import duration, energy_fields, worker_record


async def test_status_not_connected(jp_environ: Any, jp_root_dir: pathlib.Path) -> None:
    s = await DepinManager(str(jp_root_dir)).status()
    assert s == {"connected": False, "message": NOT_CONNECTED, "connections": [], "workers": 0,
                 "gpus": 0, "runs_in_flight": 0}


async def test_status_reads_the_published_session(published: Any, local_cluster: Any,
                                             jp_root_dir: pathlib.Path) -> None:
    manager = DepinManager(str(jp_root_dir), kernel_pids=lambda: {os.getpid(): "kernel-abc"})
    s = await manager.status()
    assert s["connected"] is True and s["message"] is None
    assert s["workers"] == 1 and s["gpus"] == 0 and s["runs_in_flight"] == 0
    (conn,) = s["connections"]
    assert conn["ok"] and conn["error"] is None
    assert conn["scheduler"] == local_cluster.scheduler_address == published.address
    assert conn["pid"] == os.getpid() and conn["kernel_id"] == "kernel-abc"
    assert conn["description"] == "test LocalCluster (1 in-process worker)"
    assert conn["embedded"] is False and conn["target"] == published.address
    (w,) = conn["workers"]
    (addr,) = local_cluster.scheduler_info["workers"]
    assert w["address"] == addr and w["nthreads"] == 2 and w["status"] == "running"
    assert w["memory_limit"] and w["memory_limit"] > 0
    assert w["gpus"] == 0 and w["gpu_model"] is None and w["gpu_utilization"] is None
    assert w["volunteer"] is None and w["trust"] is None


async def test_runs_in_flight_count_depin_tasks(published: Any, jp_root_dir: pathlib.Path) -> None:
    client = published.client
    run = client.submit(time.sleep, 2, key="depin-run-cell-20260101T000000-abcd1234-ff", pure=False)
    other = client.submit(time.sleep, 2, key="not-a-depin-run", pure=False)
    try:
        manager = DepinManager(str(jp_root_dir))
        deadline = time.monotonic() + 10
        while (s := await manager.status())["runs_in_flight"] != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert s["runs_in_flight"] == 1  # the other task is not a %%depin run
        assert s["connections"][0]["workers"][0]["depin_runs"] == 1
    finally:
        client.cancel([run, other])


async def test_a_scheduler_that_is_gone_is_reported_quickly(jp_root_dir: pathlib.Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    dead = {"pid": 1, "scheduler": f"tcp://127.0.0.1:{port}", "description": "gone", "embedded": True}
    manager = DepinManager(str(jp_root_dir), sessions=lambda: [dead], status_timeout=1.0)
    t = time.monotonic()
    s = await manager.status()
    assert time.monotonic() - t < 5
    assert s["connected"] is False and s["workers"] == 0
    (conn,) = s["connections"]
    assert not conn["ok"] and f"tcp://127.0.0.1:{port}" in conn["error"]
    assert "%depin connect" in conn["error"] and s["message"] == conn["error"]
    assert conn["target"] == "embedded local cluster"


async def test_an_in_process_cluster_is_explained(jp_root_dir: pathlib.Path) -> None:
    inproc = {"pid": 1, "scheduler": "inproc://10.0.0.1/1/1", "description": "x", "embedded": True}
    (conn,) = (await DepinManager(str(jp_root_dir), sessions=lambda: [inproc]).status())["connections"]
    assert "processes: true" in conn["error"]


def test_duration_is_the_wall_time_the_notebook_saw() -> None:
    assert duration({"total_s": 2.0, "remote_s": 9}) == 2.0
    assert duration({"ship_s": 0.25, "remote_s": 1.0, "run_s": 0.5}) == 1.25  # what the runner records
    assert duration({"run_s": 0.5}) == 0.5 and duration({}) is None


def test_energy_fields_stay_plain_json() -> None:
    """What the panel gets from figures a worker reported oddly: no NaN, no crash, a reason."""
    import json

    odd = energy_fields({"energy": {"energy_j": float("nan"), "source": "nvml", "gpu_power_mean_w": float("inf"),
                                    "cpu_seconds": 1.0}})
    assert odd["energy_j"] is None and odd["gpu_power_mean_w"] is None and "nan" in odd["energy_reason"]
    json.dumps(odd, allow_nan=False)
    garbled = energy_fields({"energy": {"energy_j": True, "reason": "x", "gpu_power_mean_w": "many"}})
    assert garbled["energy_j"] is None and garbled["energy_reason"] == "x" and garbled["energy"]
    assert energy_fields({"energy": None}) == energy_fields({}) == dict.fromkeys(
        ("energy_j", "energy", "energy_reason", "gpu_power_mean_w"))


def test_worker_record_reads_gpu_metrics() -> None:
    """The fields distributed's NVML support adds to a GPU worker's identity (distributed.diagnostics.nvml)."""
    identity = {
        "name": "gpu-0", "host": "10.0.0.5", "nthreads": 1, "memory_limit": 64 * 2**30, "status": "running",
        "resources": {"GPU": 1},
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory-total": 80 * 2**30},
        "metrics": {"memory": 2**30, "cpu": 12.5, "task_counts": {"executing": 1},
                    "gpu": {"utilization": 87, "memory-used": 10 * 2**30}},
    }
    w = worker_record("tcp://10.0.0.5:4000", identity, ["depin-run-a", "other"])
    assert w["gpus"] == 1 and w["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert w["gpu_memory_total"] == 80 * 2**30 and w["gpu_memory_used"] == 10 * 2**30
    assert w["gpu_utilization"] == 87 and w["executing"] == 1 and w["depin_runs"] == 1
    assert w["memory_used"] == 2**30 and w["cpu_percent"] == 12.5


async def test_runs_newest_first_with_worker_duration_and_badges(store_with_runs: Any,
                                                           jp_root_dir: pathlib.Path) -> None:
    rs, (first, second, unfinished) = store_with_runs
    manager = DepinManager(str(jp_root_dir))
    out = await manager.runs()  # default: depin-results.zarr at the server root
    assert out["store"] == rs.url and out["total"] == 3 and out["verify"] is None
    assert [r["run_id"] for r in out["runs"]] == [unfinished, second, first]
    top = out["runs"][1]
    assert top["name"] == "second" and top["status"] == "ok" and top["complete"] and top["sealed"]
    assert top["worker"] == "worker-7" and top["worker_address"] == "tcp://127.0.0.1:1"
    assert top["duration_s"] == 1.25 and top["cached"] is False
    assert top["verified"] is None and sorted(top["outputs"]) == ["n", "y"]
    inc = out["runs"][0]
    assert inc["status"] == "incomplete" and not inc["complete"] and inc["worker"] is None
    assert [r["run_id"] for r in (await manager.runs("depin-results.zarr", limit=1))["runs"]] == [unfinished]


async def test_runs_carry_their_energy_or_why_it_was_not_measured(published: Any, jp_root_dir: pathlib.Path) -> None:
    """A real %%depin run on the CPU LocalCluster, stored beside the notebook, and one with measured joules."""
    import json

    from depin_jupyter import reports
    from depin_jupyter.kernel import runner
    from depin_jupyter.store import open_store
    from depin_jupyter.worker import energy

    store = str(jp_root_dir / "depin-results.zarr")
    ns: dict[str, Any] = {"n": 200_000}
    out = await asyncio.to_thread(runner.run_cell, published, "total = sum(i * i for i in range(n))", ns,
                                  runner.RunOptions(store=store, name="squares"))
    assert ns["total"] == sum(i * i for i in range(200_000)) and out.energy is not None
    rs = open_store(store, create=False)
    gpu = {"energy_j": 4500.0, "source": "nvml", "gpu_energy_j": 4500.0, "gpu_power_mean_w": 250.0,
           "gpu_power_peak_w": 300.0, "gpu_util_mean": 97.0, "cpu_seconds": 1.5, "wall_seconds": 18.0}
    w = rs.begin_run(code="y = f(x)", inputs={}, options={}, cache_key=None, name="on-a-gpu")
    w.finish(worker={"name": "gpu-box-0", "address": "tls://10.0.0.2:1", "gpus": [{"name": "NVIDIA H100"}]},
             timings={"total_s": 18.0}, extra={"energy": gpu, "pool": "lab"})
    old = rs.begin_run(code="z = 1", inputs={}, options={}, cache_key=None, name="before-energy")
    old.finish(timings={"total_s": 0.1})  # a run stored before energy was measured: no figures at all

    listed = await DepinManager(str(jp_root_dir)).runs()
    json.dumps(listed, allow_nan=False)  # what the route sends
    by_name = {r["name"]: r for r in listed["runs"]}
    real = by_name["squares"]
    assert real["run_id"] == out.run_id and real["pool"] is None
    assert real["energy"] == reports.energy_summary(rs.manifest(out.run_id).extra["energy"])
    domains, why = energy.rapl_domains()
    if domains:  # a machine whose RAPL counters this user can read: CPU package joules
        assert isinstance(real["energy_j"], float) and real["energy_j"] >= 0 and real["energy_reason"] is None
        assert "(rapl)" in real["energy"]
    else:  # this machine: the worker says why nothing was measured
        assert real["energy_j"] is None and real["energy"].startswith("not measured (")
        assert why and why in real["energy_reason"] and real["energy_reason"] in real["energy"]
    assert real["gpu_power_mean_w"] is None and "; CPU " in real["energy"]
    measured = by_name["on-a-gpu"]
    assert measured["energy_j"] == 4500.0 and measured["energy_reason"] is None
    assert measured["gpu_power_mean_w"] == 250.0 and measured["pool"] == "lab"
    assert measured["energy"] == "4500.0 J (nvml), GPU mean 250 W, peak 300 W, util 97%; CPU 1.50 s"
    fields = ("energy_j", "energy", "energy_reason", "gpu_power_mean_w", "pool")
    assert [by_name["before-energy"][k] for k in fields] == [None] * len(fields)  # the panel shows "–"


async def test_verify_marks_runs_and_names_a_tampered_chunk(store_with_runs: Any,
                                                      jp_root_dir: pathlib.Path) -> None:
    rs, (first, second, _) = store_with_runs
    manager = DepinManager(str(jp_root_dir))
    out = await manager.runs(verify=True)
    assert out["verify"]["ok"] and all(r["verified"] for r in out["runs"] if r["complete"])
    chunk = next(p for p in (pathlib.Path(rs.url) / "runs" / first / "y").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    out = await manager.runs(verify=True)
    verdicts = {r["run_id"]: (r["verified"], r["problems"]) for r in out["runs"]}
    assert not out["verify"]["ok"] and verdicts[second] == (True, [])
    assert verdicts[first][0] is False and "chunk" in verdicts[first][1][0]


async def test_run_manifest_and_refusals(store_with_runs: Any, jp_root_dir: pathlib.Path) -> None:
    _, (first, _, unfinished) = store_with_runs
    manager = DepinManager(str(jp_root_dir))
    doc = await manager.run(None, first)
    m = doc["manifest"]
    assert doc["run_id"] == first and m["run_id"] == first and m["code"]["text"] == "y = x + 1"
    assert isinstance(m["outputs"]["y"]["chunk_digests"], int)  # counted; full=True keeps them
    assert isinstance((await manager.run(None, first, full=True))["manifest"]["outputs"]["y"]
                      ["chunk_digests"], dict)
    with pytest.raises(NotFound, match="no run 20990101"):
        await manager.run(None, "20990101T000000.000000Z-dead")
    with pytest.raises(NotFound, match="not a run id"):
        await manager.run(None, "..")
    with pytest.raises(Conflict, match="incomplete"):
        await manager.run(None, unfinished)


async def test_the_store_setting_is_honoured(store_with_runs: Any, tmp_path: pathlib.Path,
                                             jp_root_dir: pathlib.Path) -> None:
    import dask

    from depin_jupyter.store import open_store

    rs, _ = store_with_runs
    elsewhere = open_store(str(tmp_path / "configured.zarr"))
    manager = DepinManager(str(jp_root_dir))
    with dask.config.set({"depin.store.url": elsewhere.url}):
        assert (await manager.runs())["store"] == elsewhere.url  # as the kernel would store
        assert (await manager.runs("depin-results.zarr"))["store"] == rs.url  # the request wins


async def test_missing_store_says_why(store_with_runs: Any, jp_root_dir: pathlib.Path) -> None:
    manager = DepinManager(str(jp_root_dir))
    with pytest.raises(NotFound, match="no depin store at .*elsewhere.zarr"):
        await manager.runs("elsewhere.zarr")


async def test_reproduce_refuses_paths_outside_the_root_and_missing_files(jp_root_dir: pathlib.Path,
                                                                         tmp_path: pathlib.Path) -> None:
    manager = DepinManager(str(jp_root_dir))
    (jp_root_dir / "sub").mkdir()
    (jp_root_dir / "sub" / "nb.ipynb").write_text("{}")
    outside = tmp_path / "outside.ipynb"
    outside.write_text("{}")
    (jp_root_dir / "link.ipynb").symlink_to(outside)  # a symlink out of the root is outside too
    for bad in ("../outside.ipynb", "sub/../../outside.ipynb", str(outside), "link.ipynb", "", None, 3,
                "sub/notes.txt"):
        with pytest.raises(BadRequest):
            manager.notebook_path(bad)
    with pytest.raises(NotFound, match="no notebook 'sub/missing.ipynb'"):
        manager.notebook_path("sub/missing.ipynb")
    nb = manager.notebook_path("sub/./nb.ipynb")
    assert nb == os.path.realpath(jp_root_dir / "sub" / "nb.ipynb")
    # the store: by default beside the notebook; a given path is from the server root, as for runs
    with pytest.raises(NotFound, match="no depin store at .*sub/depin-results.zarr"):
        manager.reproduce_store(None, nb)
    (jp_root_dir / "sub" / "depin-results.zarr").mkdir()
    assert manager.reproduce_store(None, nb) == str(jp_root_dir / "sub" / "depin-results.zarr")
    assert manager.reproduce_store("sub/depin-results.zarr", nb) == str(jp_root_dir / "sub" / "depin-results.zarr")
    with pytest.raises(NotFound):
        manager.reproduce_job("nope")


def test_volunteer_worker_record_names_the_volunteer_and_its_credit() -> None:
    advertised = {"host": "alice-pc", "gpu": {"name": "NVIDIA RTX 4090", "memory": 24 * 2**30,
                                              "driver": "550", "arch": "ada"}, "versions": {}}
    gpu_worker = {"name": "alice-1", "nthreads": 1, "resources": {"GPU": 1}, "depin": advertised}
    credits = {"alice": {"gpu_seconds": 3.5, "cpu_seconds": 0.0, "tasks": 2}}
    w = worker_record("tls://10.0.0.9:1", gpu_worker, credits=credits, volunteer=True)
    assert w["volunteer"] == "alice" and w["credit"] == credits["alice"]
    assert w["gpu_model"] == "NVIDIA RTX 4090" and w["gpu_memory_total"] == 24 * 2**30 and w["gpus"] == 1
    cpu_worker = {"name": "bob-2", "nthreads": 4, "depin": {"host": "b", "cpu": {"model": "x86_64", "cores": 8}}}
    w = worker_record("tls://10.0.0.9:2", cpu_worker, credits=None, volunteer=True)
    assert w["volunteer"] == "bob-2" and w["credit"] is None  # a CPU worker keeps its name; credit unknown
    assert w["cpu_model"] == "x86_64" and w["cpu_cores"] == 8 and w["gpu_model"] is None
    assert worker_record("tls://10.0.0.9:2", cpu_worker, credits={}, volunteer=True)["credit"] == {}
    plain = worker_record("tcp://1.2.3.4:5", {"name": "0", "nthreads": 1})
    assert plain["volunteer"] is None and plain["credit"] is None

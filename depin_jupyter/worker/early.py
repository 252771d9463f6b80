"""What `depin worker` starts first, before it imports Dask's `distributed` (half a second here): the
sandbox probe, the fork server worker processes start from, and the CPU benchmark its workers advertise.
None waits on another, and each runs beside the imports and the first contact with the coordinator.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError

__all__ = ["Started", "advertised_versions", "begin", "gpu_list", "say", "warm_process_start"]

logger = logging.getLogger("depin.volunteer")


def say(text: str) -> None:
    """What `depin worker` tells its volunteer (stderr, at once)."""
    print(text, file=sys.stderr, flush=True)


@dataclass
class Started:
    """The work begun before joining: the probe (versions advertised, None: refused), the fork server, the
    benchmark (None on GPU machines)."""

    probing: Future[dict[str, str] | None]
    warming: Future[None]
    benching: Future[dict[str, Any] | None]


def begin(gpus: str, tell: Callable[[str], None] = say) -> Started:
    """Start the probe, the fork server and the benchmark, each in a thread of its own."""
    gpu_list(gpus)  # a bad --gpus fails here, before anything starts
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="depin-join")
    started = Started(pool.submit(_probe_sandbox, gpus, tell), pool.submit(warm_process_start),
                      pool.submit(_cpu_benchmark, gpus))
    pool.shutdown(wait=False)
    return started


def advertised_versions() -> dict[str, str]:
    """Installed package versions by top-level module: notebooks check theirs against these (read once per
    change of the installed packages, `worker.machine`)."""
    from depin_jupyter.worker.machine import stored_versions

    unimportable = set(config.get("volunteer.unimportable") or ())  # the start probe's finding
    return {m: v for m, v in stored_versions(_installed_versions).items() if m not in unimportable}


def _installed_versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            try:
                out[module] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def gpu_list(gpus: str) -> list[str] | None:
    """Which GPUs to use: None for no GPU, [] for all, else the device indices given."""
    if gpus == "none":
        return None
    if gpus == "all":
        return []
    items = [g.strip() for g in gpus.split(",") if g.strip()]
    if not items or not all(g.isdigit() for g in items):
        raise DepinUsageError(f"--gpus {gpus!r}: give all, none, or device indices such as 0,2")
    return items


def _probe_sandbox(gpus: str, say: Callable[[str], None]) -> dict[str, str] | None:
    """Run the sandboxed probe (`worker.probe`): the package versions the workers advertise, or None when
    cells could not run here (said, with the fix).

    Modules a sandboxed cell cannot find are left out of what the workers advertise."""
    import dask.config

    from depin_jupyter.worker import probe
    from depin_jupyter.worker.sandbox import Limits

    versions = advertised_versions()
    if not config.get("volunteer.probe"):
        return versions
    if not Limits.from_config().is_enabled(volunteer=True):
        say("depin worker: the sandbox is off (depin.sandbox.enabled: false): cells run in the worker process.")
        return versions
    from depin_jupyter.gpu import detect

    modules = set(versions)
    gpu = gpus != "none" and bool(detect()[0])
    report = probe.probe(modules, gpu=gpu)
    if not report.usable:
        why = report.failure or report.errors.get("numpy", "")
        say(f"depin worker: refusing to start: a sandboxed cell cannot run here ({why}). Fix: "
            f"{probe.fix_for(report)}. (`depin doctor` checks this machine; depin.volunteer.probe: false skips "
            f"this check.)")
        return None
    dask.config.set({"depin.volunteer.unimportable": sorted(report.missing)})
    line = f"depin worker: sandbox probe (cells run as uid {report.uid}): numpy and numpy.random work"
    if gpu:
        line += f"; cupy does not ({report.errors['cupy']}): cells get numpy" if "cupy" in report.errors \
            else "; cupy works"
    if report.missing:
        shown = ", ".join(sorted(report.missing)[:8]) + (" ..." if len(report.missing) > 8 else "")
        line += (f"; {len(report.missing)} of {len(modules)} installed modules cannot be imported by a cell "
                 f"and are not advertised ({shown})")
    say(line + ".")
    return {m: v for m, v in versions.items() if m not in report.missing}


def _cpu_benchmark(gpus: str) -> dict[str, Any] | None:
    """The CPU benchmark a CPU worker advertises (measured once a week, `worker.machine`); None where the
    workers will be GPU workers (each times its own GPU), so a GPU machine spends no CPU on it."""
    from depin_jupyter.gpu import detect
    from depin_jupyter.worker.machine import stored_benchmark

    if gpu_list(gpus) is not None and detect()[0]:
        return None
    return stored_benchmark()


def warm_process_start() -> None:
    """Start the process worker processes are forked from, its imports done (``forkserver``), so a worker's
    start (a new Python importing Dask: about a second) is not on the way to joining. Not where the
    volunteer chose another start method, nor where forking is unavailable (Windows). Imports no
    `distributed` here: the fork server's own imports run beside this process's."""
    import multiprocessing
    import multiprocessing.forkserver

    import dask.config

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    # `distributed`'s own defaults are not loaded yet (not imported): its default is "spawn"; what is set here
    # stays when they are (Dask's defaults never override set values)
    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") != "spawn":
        return
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    try:
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["distributed", "numpy", "depin_jupyter.worker._dask", "depin_jupyter.worker.plugins"])
        multiprocessing.forkserver.ensure_running()
    except Exception:  # a worker process can still be started the usual way
        logger.warning("could not start the fork server; worker processes start from scratch", exc_info=True)
        dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})

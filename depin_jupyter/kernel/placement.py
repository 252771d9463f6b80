"""Where a cell may run: Dask submit keywords for --worker, --pool and GPU needs, after the environment check."""

from __future__ import annotations

import sys
import types
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import EnvironmentMismatchError, NoSuitableWorkerError
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.envcheck import ALWAYS_CHECKED, compare, local_version
from depin_jupyter.kernel.privacy import effective_pool
from depin_jupyter.kernel.records import RunOptions
from depin_jupyter.protocol.constants import pool_resource

__all__ = ["check_environment", "module_candidates", "route"]


def module_candidates(imports: tuple[str, ...], names: list[str], namespace: dict[str, Any]) -> list[str]:
    """Top-level modules a run may need: what the cell imports, and where its inputs come from."""
    out = list(imports)
    for name in names:
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            mod = value.__name__
        elif isinstance(value, (type, types.FunctionType)):
            mod = getattr(value, "__module__", None) or ""
        else:
            mod = type(value).__module__
        out.append(mod.split(".")[0])
    return out


def check_environment(session: Session, needed: list[str], bundle: Any, placement: dict[str, Any],
                       candidates: list[str]) -> dict[str, Any]:
    """Refuse (or route around) workers whose versions of the cell's packages differ from the kernel's."""
    mode = config.get("env-check")
    if mode == "ignore" or not candidates:
        return placement
    shipped = set(bundle.names) if bundle else set()
    packages = [p for p in dict.fromkeys([*ALWAYS_CHECKED, *needed])
                if p and p not in shipped and p not in ("__main__", "builtins")]
    local = {p: local_version(p) for p in packages}
    session.env.forget(w.address for w in session.last_workers)
    mismatches = compare(local, session.worker_versions(candidates, packages))
    if not mismatches:
        return placement
    listing = "; ".join(str(m) for m in mismatches)
    if mode == "warn":
        print(f"depin: environment differs: {listing}. Running anyway (depin.env-check: warn).", file=sys.stderr)
        return placement
    bad = {m.worker for m in mismatches}
    good = [w for w in candidates if w not in bad]
    if good:
        print(f"depin: not using {len(bad)} worker(s) whose environment differs: {listing}.", file=sys.stderr)
        return {**placement, "workers": good, "allow_other_workers": False}
    first = mismatches[0]
    raise EnvironmentMismatchError(
        f"the cell needs {first.package} but {listing}. Install the same major.minor versions on both sides "
        f"(pip install '{first.package}=={first.local}' on the worker, or match the notebook to the "
        f"cluster), or set depin.env-check: warn to run anyway."
    )


def _gpu_fits(gpu: dict[str, Any] | None, options: RunOptions) -> bool:
    if gpu is None:
        return False
    if options.gpu_mem and gpu["memory"] < options.gpu_mem * 2**30:
        return False
    return not (options.gpu_arch and gpu["arch"] < options.gpu_arch)


def _gpu_text(gpu: dict[str, Any] | None) -> str:
    if gpu is None:
        return "no GPU"
    return f"{gpu['name']}, {gpu['memory'] / 2**30:.1f} GiB, compute capability {gpu['arch']}"


def _wanted(options: RunOptions) -> str:
    parts = []
    if options.gpu_mem:
        parts.append(f"at least {options.gpu_mem:g} GiB (--gpu-mem)")
    if options.gpu_arch:
        parts.append(f"compute capability {options.gpu_arch:g} or newer (--gpu-arch)")
    return " and ".join(parts)


def route(session: Session, options: RunOptions) -> tuple[dict[str, Any], list[str]]:
    """Dask submit keywords that route the cell to suitable workers, and those workers' addresses."""
    try:
        return _place(session, options, session.workers())
    except NoSuitableWorkerError:  # maybe a worker joined since the cached list: ask again
        return _place(session, options, session.workers(max_age=0))


def _place(session: Session, options: RunOptions, workers: list[Any]) -> tuple[dict[str, Any], list[str]]:
    gpus = options.gpu if options.gpu is not None else (None if options.cpu else config.get("gpus"))
    placement: dict[str, Any] = {}
    if options.worker:
        match = [w.address for w in workers if options.worker in (w.name, w.address)]
        if not match:
            known = ", ".join(f"{w.name} ({w.address})" for w in workers) or "none"
            raise NoSuitableWorkerError(f"--worker {options.worker}: no such worker is connected. "
                                        f"Connected: {known}.")
        placement.update(workers=match, allow_other_workers=False)
        workers = [w for w in workers if w.address in match]
    pool = effective_pool(options)
    if pool:
        in_pool = [w for w in workers if pool in w.pools]
        if not in_pool:
            raise NoSuitableWorkerError(_no_pool(session, pool, workers))
        workers = in_pool
        placement["resources"] = {pool_resource(pool): 1}
    if options.gpu_mem or options.gpu_arch:
        gpus = gpus or 1
    if gpus:
        capable = [w for w in workers if w.gpus >= gpus]
        if capable and (options.gpu_mem or options.gpu_arch):
            hardware = session.gpu_hardware([w.address for w in capable])
            capable = [w for w in capable if _gpu_fits(hardware.get(w.address), options)]
            if not capable:
                offered = "; ".join(f"{w.name} ({w.address}): {_gpu_text(hardware.get(w.address))}"
                                    for w in workers) or "no workers"
                raise NoSuitableWorkerError(
                    f"no connected worker has a GPU with {_wanted(options)}. Available: {offered}. Lower "
                    f"--gpu-mem/--gpu-arch, or connect to a cluster with such GPUs."
                )
        if capable:
            placement["resources"] = {**placement.get("resources", {}), "GPU": gpus}
            workers = capable
        elif config.get("gpu-fallback") == "cpu" and not (options.gpu_mem or options.gpu_arch):
            if not session.cpu_fallback_said:
                print(f"depin: no worker offers {gpus} GPU(s); running on CPU with numpy "
                      f"(depin.gpu-fallback: cpu).", file=sys.stderr)
                session.cpu_fallback_said = True
        else:
            have = ", ".join(f"{w.name}: {w.gpus} GPU" for w in workers) or "no workers"
            want = f"{gpus} GPU(s)" + (f" with {_wanted(options)}" if options.gpu_mem or options.gpu_arch else "")
            raise NoSuitableWorkerError(
                f"the cell asks for {want} but no connected worker has that ({have}). Connect to a "
                f"cluster with GPU workers, run with --cpu, or set depin.gpu-fallback: cpu to run such "
                f"cells on CPU with numpy."
            )
    return placement, [w.address for w in workers]


def _no_pool(session: Session, pool: str, workers: list[Any]) -> str:
    """Why no worker can run a --pool cell: the pools connected, and how a worker joins one."""
    counts: dict[str, int] = {}
    for w in workers:
        for p in w.pools or ("(no pool)",):
            counts[p] = counts.get(p, 0) + 1
    have = ", ".join(f"{p} ({n} worker{'s' if n > 1 else ''})" for p, n in sorted(counts.items())) or "no workers"
    if session.untrusted:
        how = (f"a worker joins pool {pool!r} with a token from the coordinator: `depin token issue --role worker "
               f"--name NAME --pool {pool}`")
    else:
        how = (f"on a cluster of your own, a worker is in pool {pool!r} when it has the Dask resource "
               f"pool:{pool} (`dask worker ... --resources pool:{pool}=1000000`); volunteer networks get pools "
               f"from the coordinator's certificates")
    return (f"no connected worker is in pool {pool!r} (--pool / depin.pool). Pools connected: {have}. Wait for "
            f"one to join, pick another pool, or drop --pool; {how}.")

"""Runs into the Zarr result store and back: the cache key, recording a finished run, serving a hit.

A run is recorded after its results are bound: its outputs (including inputs it changed in place
and the value of its last expression) go into a run group, and how they were bound (aliases,
deletions, modules, in-place changes) into the manifest's ``extra``, so a cache hit can rebind the
namespace exactly as the run did. A run is only cacheable when every output could be stored.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import types
from typing import Any

from depin_jupyter import config
from depin_jupyter.protocol.records import RunResult
from depin_jupyter.protocol.values import unbox

__all__ = ["open_for", "cache_key", "serve_cached", "record", "VALUE_NAME"]

VALUE_NAME = "_depin_value"   # the stored last-expression value
KEY_VERSION = 1
REPLAY_MAX_BYTES = 8 * 2**20  # printed/displayed output kept with a run for replay (JSON in the manifest)


def open_for(options: Any) -> Any | None:
    """The run's store (probed for writability, before any compute), or None with --no-store."""
    if options.no_store or (not config.get("store.enabled") and not options.store):
        return None
    from depin_jupyter.store import open_store

    return open_store(options.store)


def result_options(options: Any) -> dict[str, Any]:
    """The options that can change what a cell computes (part of the cache key and the manifest)."""
    return {"gpu": options.gpu, "cpu": options.cpu, "gpu_arch": options.gpu_arch,
            "inputs": list(options.inputs) if options.inputs is not None else None,
            "outputs": list(options.outputs) if options.outputs is not None else None,
            "deps": list(options.deps) if getattr(options, "deps", None) else None}


def deps_digests(patterns: Any) -> dict[str, str]:
    """SHA-256 of each file `--deps` names (globs expanded; a directory such as a Zarr store is hashed
    over its file listing and contents). A pattern that matches nothing is a usage error."""
    import glob
    import os

    from depin_jupyter.errors import DepinUsageError

    out: dict[str, str] = {}
    for pattern in patterns or ():
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DepinUsageError(f"--deps {pattern}: no such file or directory (relative paths start at "
                                  f"{os.getcwd()}); nothing was run")
        for path in matches:
            out[path] = _digest_path(path)
    return out


def _digest_path(path: str) -> str:
    import os

    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0" + _file_digest(full).encode())
        return "dir:" + h.hexdigest()
    return _file_digest(path)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(code: str, hashes: dict[str, str], modules_key: str | None, options: Any,
              deps: dict[str, str] | None = None) -> str:
    """What must match for a stored run to stand in for running the cell again."""
    payload = {"v": KEY_VERSION, "code": code, "inputs": sorted(hashes.items()), "modules": modules_key,
               "options": result_options(options), "deps": sorted((deps or {}).items())}
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def serve_cached(store: Any, key: str, namespace: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """If a complete run has this key, return (run id, result dict) to bind as the run bound its names.

    Outputs come back with the types the fresh run bound: numpy arrays (and subclasses), xarray objects
    and values as themselves, loaded now, up to ``depin.store.lazy-bytes`` each; bigger ones, and those the
    run itself bound lazily (dask arrays), as dask arrays over the store (``result["lazy"]`` names them).
    """
    run_id = store.lookup_cache(key)
    if run_id is None:
        return None
    manifest = store.manifest(run_id)
    bindings = (manifest.extra or {}).get("bindings", {})
    lazy = lazy_outputs(manifest.outputs, bindings.get("lazy"), config.nbytes("store.lazy-bytes"))
    values = {**store.load(run_id, [n for n in manifest.outputs if n not in lazy], lazy=False),
              **(store.load(run_id, sorted(lazy), lazy=True) if lazy else {})}
    mutated = set(bindings.get("mutated", []))
    result: dict[str, Any] = {
        "status": "ok",
        "outputs": {n: v for n, v in values.items() if n not in mutated and n != VALUE_NAME},
        # In-place changes are applied to the existing local objects: those need concrete values.
        "mutated": {n: _concrete(v) for n, v in values.items() if n in mutated},
        "aliases": bindings.get("aliases", {}),
        "deleted": bindings.get("deleted", []),
        "modules": bindings.get("modules", {}),
        "worker": (manifest.worker or {}).get("address"),
        "lazy": {n: size for n, size in lazy.items() if n not in mutated},
        **{k: bindings[k] for k in ("views", "parts", "kept") if bindings.get(k)},
    }
    for name, (module, qualname) in bindings.get("imports", {}).items():
        result["outputs"][name] = _import(module, qualname)
    result["shown"] = (manifest.extra or {}).get("shown", [])
    if VALUE_NAME in values:
        result["value"] = values[VALUE_NAME]
    return run_id, result


def lazy_outputs(records: dict[str, Any], was_lazy: list[str] | None, limit: int) -> dict[str, int | None]:
    """Name -> bytes of the outputs a hit binds lazily: bigger than ``limit``, or lazy in the fresh run."""
    out: dict[str, int | None] = {}
    for name, rec in records.items():
        size = _stored_bytes(rec)
        fresh_lazy = name in was_lazy if was_lazy is not None else rec.pytype.startswith("dask.")
        if rec.kind in ("array", "xarray") and (fresh_lazy or (size is not None and size > limit)):
            out[name] = size
    return out


def _stored_bytes(rec: Any) -> int | None:
    """The in-memory size of a stored array or xarray object (None: unknown, e.g. strings)."""
    if rec.kind == "xarray" and rec.variables:
        sizes = [_stored_bytes(v) for v in rec.variables.values()]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)
    return rec.nbytes if rec.kind == "array" else None


def _importable(value: Any) -> bool:
    """A function or class defined in an installed (not notebook-local) module, found again by import."""
    if not isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return False
    module = getattr(value, "__module__", None)
    if not module or module == "__main__" or "<" in getattr(value, "__qualname__", "<"):
        return False
    from depin_jupyter.protocol.bundles import is_local

    return not is_local(module.split(".")[0])


def _import(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _is_lazy(value: Any) -> bool:
    """A dask array, or an xarray object holding one: the fresh run bound it lazily, so a hit does too."""
    if hasattr(value, "dask") and hasattr(value, "compute") and type(value).__module__.startswith("dask"):
        return True
    return type(value).__module__.startswith("xarray") and bool(getattr(value, "chunks", None))


def _concrete(value: Any) -> Any:
    return value.compute() if hasattr(value, "compute") and hasattr(value, "dask") else value


def record(store: Any, *, run_id: str, label: str, code: str, hashes: dict[str, str], key: str,
           options: Any, result: RunResult, client: Any = None,
           timings: dict[str, float] | None = None, pool: str | None = None,
           private: Any = (), views: dict[str, Any] | None = None) -> str | None:
    """Write a finished run into ``store``; returns a warning to show, or None.

    ``pool``: the pool the run was restricted to (None: any worker); ``private``: the inputs that carried
    private data (the manifest keeps their names and content hashes, never their values); ``views``: the
    values of the outputs that came back as views (``result["views"]`` describes them), stored as arrays
    and rebuilt as views on a hit.

    Never raises for an output it cannot store: the run is then stored without it and is not
    cacheable, and the warning names the output.
    """
    from depin_jupyter.store import UnsupportedOutputError
    from depin_jupyter.store import output_kind as classify

    mutated = {n: unbox(v) for n, v in result.get("mutated", {}).items()}
    outputs = {**{n: unbox(v) for n, v in result.get("outputs", {}).items()}, **(views or {}), **mutated}
    # Functions and classes of installed packages are stored by reference: they are importable anywhere.
    imports = {n: [v.__module__, v.__qualname__] for n, v in outputs.items() if _importable(v)}
    for n in imports:
        del outputs[n]
    value = result.get("value")
    if value is not None and type(value).__name__ != "RichValue":
        outputs[VALUE_NAME] = value
    allow_pickle = bool(config.get("store.allow-pickle"))
    unstorable = [n for n, v in outputs.items() if classify(v) == "other" and not allow_pickle]
    cacheable = result.get("status") == "ok" and not result.get("skipped") and not unstorable
    writer = store.begin_run(code=code, inputs=hashes, options=result_options(options),
                             cache_key=key if cacheable else None, name=label, run_id=run_id)
    problems = []
    compute = {"scheduler": client} if client is not None else None
    for name, v in outputs.items():
        if name in unstorable:
            problems.append(f"{name} ({type(v).__module__}.{type(v).__qualname__})")
            continue
        try:
            writer.write_output(name, v, compute_kwargs=compute)
        except UnsupportedOutputError as e:
            problems.append(f"{name} ({e})")
    hardware = dict(result.get("hardware") or {})
    environment = hardware.pop("environment", None)
    worker = {"address": result.get("worker"), "name": result.get("worker_name"), **hardware}
    extra: dict[str, Any] = {"bindings": {"aliases": result.get("aliases", {}),
                                          "deleted": list(result.get("deleted", [])),
                                          "modules": result.get("modules", {}),
                                          "imports": imports,
                                          "mutated": sorted(mutated),
                                          "lazy": sorted(n for n, v in outputs.items() if _is_lazy(v)),
                                          **{k: result[k] for k in ("views", "parts", "kept")  # type: ignore[literal-required]
                                             if result.get(k)}}}
    if result.get("status") != "ok":
        err = result.get("error") or {}
        extra["error"] = {"type": err.get("type"), "message": err.get("message")}
    extra["pool"] = pool
    if private:
        extra["private_inputs"] = {n: hashes.get(n) for n in private}
    if result.get("energy") is not None:
        extra["energy"] = result["energy"]  # measured on the worker (`energy.py`), or "not measured" and why
    if result.get("replication"):
        extra["replication"] = result["replication"]  # which workers ran it, their verdicts, the tolerance
    if problems:
        extra["not_stored"] = problems
    shown = result.get("shown") or []
    if shown and len(json.dumps(shown)) <= REPLAY_MAX_BYTES:
        extra["shown"] = shown  # printed text and display bundles, replayed on a cache hit
    elif shown:
        extra["shown"] = [{"kind": "stderr", "text": "depin: the run's output was too large to keep for replay\n"}]
    writer.finish(status="ok" if result.get("status") == "ok" else "error", worker=worker,
                  environment=environment, timings=timings or {}, extra=extra)
    if problems:
        return (f"stored run {run_id} without {', '.join(problems)}: not portable; it will not serve as a "
                f"cache hit (set depin.store.allow-pickle: true to store such values as pickles)")
    return None


def cached_note(run_id: str, label: str | None, lazy: dict[str, int | None]) -> str:
    """What a cache hit tells the user: which run stood in, and which names are bound lazily."""
    from dask.utils import format_bytes

    text = f"cached (run {run_id}{', ' + label if label else ''}): the cell was not run again"
    if lazy:
        listed = ", ".join(f"{n} ({format_bytes(b)})" if b is not None else n for n, b in sorted(lazy.items()))
        text += (f"; bound lazily, as dask arrays over the store (bigger than depin.store.lazy-bytes, or lazy "
                 f"in the run itself): {listed}")
    return text + ". Use --no-cache to recompute."

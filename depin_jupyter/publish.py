"""`depin publish`: a notebook, its result store and their provenance as one self-contained bundle.

The bundle is a directory ready to upload to a repository such as Zenodo:

* the notebook as published;
* ``results.zarr``: a byte-for-byte copy of the result store (ledger included), so `depin verify` re-hashes
  it and `depin reproduce` re-executes against it;
* ``environment.lock.txt``: the exact Python and package versions of the publishing environment;
* ``ro-crate-metadata.json``: RO-Crate 1.1 metadata in the Process Run Crate style: one ``CreateAction``
  per `%%depin` cell's run, with the cell as instrument, its stored outputs as results, and the hardware
  it ran on; every file carries its SHA-256, every stored output its depin output digest under the name of
  the algorithm that made it (``blake3``, or ``sha256`` for stores written with SHA-256).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pathlib
import platform
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from .errors import DepinUsageError, StoreIntegrityError

__all__ = ["publish", "Bundle", "open_bundle", "STORE_DIR", "CRATE_FILE", "LOCK_FILE"]

STORE_DIR = "results.zarr"
CRATE_FILE = "ro-crate-metadata.json"
LOCK_FILE = "environment.lock.txt"
PROCESS_CRATE = "https://w3id.org/ro/wfrun/process/0.5"
RO_CRATE = "https://w3id.org/ro/crate/1.1"
DIGEST_TERMS = {"blake3": "https://depin-jupyter.invalid/terms#blake3"}
"""JSON-LD terms for output digests the RO-Crate context does not define (it knows ``sha256``)."""


@dataclass(frozen=True)
class Bundle:
    """A published bundle on disk: where its notebook and store are."""

    path: pathlib.Path
    notebook: pathlib.Path
    store: pathlib.Path
    runs: list[str]


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _copy_store(src: Any, dest: pathlib.Path) -> int:
    """Copy every key of the Zarr store ``src`` into a local directory store; returns the key count."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    target = LocalStore(str(dest))
    proto = default_buffer_prototype()

    async def copy() -> int:
        n = 0
        async for key in src.list():
            buf = await src.get(key, prototype=proto)
            if buf is not None:
                await target.set(key, buf)
                n += 1
        return n

    return sync(copy())


def _lock_text() -> str:
    import importlib.metadata

    dists = sorted({(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()
                    if d.metadata["Name"]}.items())
    head = [f"# environment of `depin publish`, {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
            f"# python {platform.python_version()} ({platform.python_implementation()}) on "
            f"{platform.system()} {platform.machine()}"]
    return "\n".join(head + [f"{name}=={version}" for name, version in dists]) + "\n"


def publish(notebook: str, store_url: str, out: str, *, overwrite: bool = False) -> Bundle:
    """Write the bundle of ``notebook`` and the result store at ``store_url`` to the directory ``out``.

    The store is verified first: a store that does not verify is not published.
    """
    import nbformat

    from .reproduce import _depin_cells, _latest
    from .store import open_store

    src_nb = pathlib.Path(notebook)
    if not src_nb.is_file():
        raise DepinUsageError(f"no notebook at {notebook}")
    dest = pathlib.Path(out)
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise DepinUsageError(f"{out} exists and is not empty; choose a new directory (or --overwrite)")
        shutil.rmtree(dest)
    store = open_store(store_url, create=False, writable=False)
    check = store.verify()
    if not check.ok:
        raise StoreIntegrityError(f"the store {store.url} does not verify; nothing was published:\n"
                                  f"{check.format()}")
    nb = nbformat.read(src_nb, as_version=4)
    summaries = store.runs()
    runs = []
    for index, name, code in _depin_cells(nb):
        manifest = _latest(store, summaries, code)
        runs.append((index, name, code, manifest))
    missing = [i for i, _, _, m in runs if m is None]

    dest.mkdir(parents=True, exist_ok=True)
    tmp_store = dest / (STORE_DIR + ".partial")
    _copy_store(store.zarr_store, tmp_store)
    os.replace(tmp_store, dest / STORE_DIR)  # a bundle never holds a half-copied store under its real name
    shutil.copy2(src_nb, dest / src_nb.name)
    (dest / LOCK_FILE).write_text(_lock_text())
    crate = _crate(dest, src_nb.name, nb, runs)
    (dest / CRATE_FILE).write_text(json.dumps(crate, indent=1, sort_keys=False))
    copied = open_store(str(dest / STORE_DIR), create=False, writable=False).verify()
    if not copied.ok:
        raise StoreIntegrityError(f"the copied store in {dest} does not verify:\n{copied.format()}")
    if missing:
        print(f"depin publish: cell(s) {', '.join(map(str, missing))} have no complete run in the store; "
              f"run them before publishing so reviewers can compare them.", file=sys.stderr)
    return Bundle(path=dest, notebook=dest / src_nb.name, store=dest / STORE_DIR,
                  runs=[m.run_id for *_, m in runs if m is not None])


def _crate(dest: pathlib.Path, nb_name: str, nb: Any, runs: list[tuple[int, str | None, str, Any]]) -> dict[str, Any]:
    from . import __version__

    graph: list[dict[str, Any]] = [
        {"@id": CRATE_FILE, "@type": "CreativeWork", "about": {"@id": "./"},
         "conformsTo": [{"@id": RO_CRATE}, {"@id": PROCESS_CRATE}]},
        {"@id": "./", "@type": "Dataset", "name": f"{nb_name} with its depin results",
         "datePublished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "conformsTo": [{"@id": PROCESS_CRATE}],
         "hasPart": [{"@id": nb_name}, {"@id": f"{STORE_DIR}/"}, {"@id": LOCK_FILE}],
         "mentions": []},
        {"@id": nb_name, "@type": ["File", "SoftwareSourceCode"], "name": nb_name,
         "encodingFormat": "application/x-ipynb+json", "programmingLanguage": {"@id": "#python"},
         "sha256": _sha256(dest / nb_name)},
        {"@id": LOCK_FILE, "@type": "File", "name": "exact package versions", "encodingFormat": "text/plain",
         "sha256": _sha256(dest / LOCK_FILE)},
        {"@id": f"{STORE_DIR}/", "@type": "Dataset", "name": "depin result store (Zarr 3, with ledger)",
         "encodingFormat": "application/vnd+zarr", "hasPart": []},
        {"@id": "#python", "@type": "ComputerLanguage", "name": "Python",
         "version": platform.python_version()},
        {"@id": "#depin-jupyter", "@type": "SoftwareApplication", "name": "depin-jupyter",
         "version": __version__},
    ]
    root, store_ds = graph[1], graph[4]
    for index, name, code, manifest in runs:
        cell_id = f"{nb_name}#cell-{index}"
        graph.append({"@id": cell_id, "@type": "SoftwareSourceCode", "name": name or f"cell {index}",
                      "text": code, "isPartOf": {"@id": nb_name}})
        if manifest is None:
            continue
        results = []
        for out_name, rec in manifest.outputs.items():
            out_id = f"{STORE_DIR}/{rec.path}/" if rec.path else f"#run-{manifest.run_id}-{out_name}"
            entity: dict[str, Any] = {"@id": out_id, "@type": "Dataset" if rec.path else "PropertyValue",
                                      "name": out_name}
            if rec.digest:  # "<algorithm>:<hex>"; a bare hex digest (older stores) is SHA-256
                algorithm, _, hexdigest = rec.digest.rpartition(":")
                entity[algorithm or "sha256"] = hexdigest
            if rec.shape is not None:
                entity["description"] = f"{rec.dtype} array of shape {tuple(rec.shape)}"
            if not rec.path:
                entity["value"] = json.dumps(rec.value, default=str)[:1000]
            graph.append(entity)
            results.append({"@id": out_id})
            if rec.path:
                store_ds["hasPart"].append({"@id": out_id})
        worker = dict(manifest.worker or {})
        gpu = worker.get("gpu") if isinstance(worker.get("gpu"), dict) else None
        hardware = (f"GPU {gpu.get('name')}" if gpu and gpu.get("name") else
                    f"CPU {worker.get('cpu') or worker.get('machine') or 'unknown'}")
        action_id = f"#run-{manifest.run_id}"
        graph.append({"@id": action_id, "@type": "CreateAction", "name": f"depin run {manifest.run_id}",
                      "identifier": manifest.run_id, "instrument": {"@id": cell_id},
                      "agent": {"@id": "#depin-jupyter"}, "endTime": manifest.created,
                      "actionStatus": "http://schema.org/CompletedActionStatus" if manifest.status == "ok"
                      else "http://schema.org/FailedActionStatus",
                      "object": [{"@id": f"#input-{manifest.run_id}-{k}", "name": k} for k in manifest.inputs],
                      "result": results, "description": f"ran on {hardware} (worker {worker.get('name') or worker.get('address')})"})
        root["mentions"].append({"@id": action_id})
    return {"@context": ["https://w3id.org/ro/crate/1.1/context", DIGEST_TERMS], "@graph": graph}


def open_bundle(path: str) -> Bundle | None:
    """The bundle at ``path`` (a directory with ``ro-crate-metadata.json``), or None if it is not one."""
    p = pathlib.Path(path)
    crate_file = p / CRATE_FILE
    if not (p.is_dir() and crate_file.is_file()):
        return None
    graph = json.loads(crate_file.read_text()).get("@graph", [])
    notebooks = [e["@id"] for e in graph if "SoftwareSourceCode" in _types(e) and e["@id"].endswith(".ipynb")]
    if not notebooks:
        raise DepinUsageError(f"{path} has RO-Crate metadata but names no notebook")
    runs = [e.get("identifier") for e in graph if "CreateAction" in _types(e)]
    return Bundle(path=p, notebook=p / notebooks[0], store=p / STORE_DIR, runs=[r for r in runs if r])


def verify_files(bundle: Bundle) -> list[str]:
    """Files of the bundle whose SHA-256 differs from the crate's record (the store verifies itself)."""
    graph = json.loads((bundle.path / CRATE_FILE).read_text()).get("@graph", [])
    bad = []
    for e in graph:
        if "File" in _types(e) and e.get("sha256"):
            f = bundle.path / e["@id"]
            if not f.is_file() or _sha256(f) != e["sha256"]:
                bad.append(e["@id"])
    return bad


def _types(entity: dict[str, Any]) -> list[str]:
    t = entity.get("@type", [])
    return [t] if isinstance(t, str) else list(t)

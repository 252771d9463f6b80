"""`depin publish`: a notebook, its result store and their provenance as one self-contained bundle.

The bundle is a directory ready to upload to a repository such as Zenodo:

* the notebook as published;
* ``results.zarr``: a byte-for-byte copy of the result store (ledger included), so `depin verify` re-hashes
  it and `depin reproduce` re-executes against it;
* ``environment.lock.txt``: the exact Python and package versions of the publishing environment;
* the files the `%%depin` cells declare (``--deps``) and any given with ``--include``;
* ``ro-crate-metadata.json``: RO-Crate 1.1 metadata conforming to Process Run Crate 0.5 (`crate.py`): one
  ``CreateAction`` per `%%depin` cell's run, with its code, inputs, stored outputs and hardware; every file
  carries its SHA-256; the author's public key and the store's ledger head and run-digest Merkle root;
* ``depin-signature.json``: the author's Ed25519 signature over all of that (`proof.py`), unless unsigned.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import platform
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from depin_jupyter.errors import DepinUsageError, StoreIntegrityError
from depin_jupyter.reproduce import signing
from depin_jupyter.reproduce.crate import Authorship, CrateRun, build_crate
from depin_jupyter.reproduce.proof import (
    SIGNATURE_FILE,
    BundleCheck,
    check_bundle,
    crate_file_mismatches,
    sha256_file,
    sign_bundle,
)

__all__ = ["publish", "Bundle", "check", "open_bundle", "shipped_files", "verify_files", "STORE_DIR", "CRATE_FILE", "LOCK_FILE",
           "SIGNATURE_FILE"]

STORE_DIR = "results.zarr"
CRATE_FILE = "ro-crate-metadata.json"
LOCK_FILE = "environment.lock.txt"
README_FILE = "README.md"


@dataclass(frozen=True)
class Bundle:
    """A published bundle on disk: where its notebook and store are."""

    path: pathlib.Path
    notebook: pathlib.Path
    store: pathlib.Path
    runs: list[str]


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


def _authorship(key: Any, options: dict[str, str | None]) -> Authorship:
    """Who publishes, from the flags, else the settings depin.publish.*, else the key's name."""
    from depin_jupyter import config

    def pick(name: str) -> str | None:
        value = options.get(name.replace("-", "_"))
        return value if value is not None else config.get(f"publish.{name}")

    license = pick("license")
    if not license:
        raise DepinUsageError("RO-Crate requires a license for the bundle: pass --license (an SPDX id such as "
                              "CC-BY-4.0, or a license URL) or set depin.publish.license")
    return Authorship(license=license, author=pick("author") or (key.name if key else None),
                      author_id=pick("author-id"), affiliation=pick("affiliation"),
                      affiliation_url=pick("affiliation-url"), publisher=pick("publisher"),
                      publisher_url=pick("publisher-url"),
                      key_b64=key.public_b64 if key else None, key_fingerprint=key.fingerprint if key else None)


def _copy_files(src_dir: pathlib.Path, dest: pathlib.Path, names: list[str]) -> dict[str, str]:
    """Copy the notebook's declared files into the bundle; name -> SHA-256."""
    out = {}
    for name in names:
        if name == STORE_DIR or name.startswith(STORE_DIR + "/") or name in (CRATE_FILE, SIGNATURE_FILE, LOCK_FILE,
                                                                             README_FILE):
            raise DepinUsageError(f"the declared file {name} would overwrite a part of the bundle; rename it")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_dir / name, target)
        out[name] = sha256_file(target)
    return out


def publish(notebook: str, store_url: str, out: str, *, overwrite: bool = False, unsigned: bool = False,
            key_dir: str | None = None, include: tuple[str, ...] = (), **who: str | None) -> Bundle:
    """Write the bundle of ``notebook`` and the result store at ``store_url`` to the directory ``out``.

    The store is verified first: a store that does not verify is not published. The bundle is signed with the
    author's key (`depin key create`) unless ``unsigned``; ``who`` are license, author, author_id, affiliation,
    affiliation_url, publisher, publisher_url (defaults: depin.publish.*). ``include``: more files beside the
    notebook to ship (the files its `%%depin` cells declare with --deps always are).
    """
    import nbformat

    from depin_jupyter.reproduce.cells import declared_paths, depin_cells
    from depin_jupyter.store import open_store
    from depin_jupyter.store.anchor import anchor_of

    src_nb = pathlib.Path(notebook)
    if not src_nb.is_file():
        raise DepinUsageError(f"no notebook at {notebook}")
    key = None if unsigned else signing.load_key(key_dir)
    authorship = _authorship(key, who)
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
    try:
        declared = sorted(set(declared_paths(nb, src_nb.parent)) | set(include))
    except ValueError as exc:
        raise DepinUsageError(str(exc)) from None
    runs = _runs(store, depin_cells(nb))

    dest.mkdir(parents=True, exist_ok=True)
    tmp_store = dest / (STORE_DIR + ".partial")
    _copy_store(store.zarr_store, tmp_store)
    os.replace(tmp_store, dest / STORE_DIR)  # a bundle never holds a half-copied store under its real name
    shutil.copy2(src_nb, dest / src_nb.name)
    (dest / LOCK_FILE).write_text(_lock_text())
    files = {src_nb.name: sha256_file(dest / src_nb.name), LOCK_FILE: sha256_file(dest / LOCK_FILE),
             **_copy_files(src_nb.parent, dest, declared)}
    copied = open_store(str(dest / STORE_DIR), create=False, writable=False)
    report = copied.verify()
    if not report.ok:
        raise StoreIntegrityError(f"the copied store in {dest} does not verify:\n{report.format()}")
    anchor = anchor_of(copied).to_json()
    (dest / README_FILE).write_text(_readme(src_nb.name, authorship, anchor, runs))
    files[README_FILE] = sha256_file(dest / README_FILE)
    crate = build_crate(src_nb.name, runs, authorship, store_dir=STORE_DIR, lock_file=LOCK_FILE,
                        signature_file=None if key is None else SIGNATURE_FILE, files=files, anchor=anchor)
    (dest / CRATE_FILE).write_text(json.dumps(crate, indent=1, sort_keys=False))
    if key is not None:
        sign_bundle(dest, key, crate_file=CRATE_FILE, store_dir=STORE_DIR, files=files, anchor=anchor)
    _tell(authorship, key, [r.index for r in runs if r.manifest is None])
    return Bundle(path=dest, notebook=dest / src_nb.name, store=dest / STORE_DIR,
                  runs=[r.manifest.run_id for r in runs if r.manifest is not None])


def _readme(nb_name: str, who: Authorship, anchor: dict[str, Any], runs: list[CrateRun]) -> str:
    """The bundle's README: whose claim it is, what the signature pins, and how to check it."""
    author = who.author or "an unnamed author"
    lines = [f"# {nb_name} with its depin results", "",
             f"Published {dt.datetime.now(dt.timezone.utc):%Y-%m-%d} by {author}"
             + (f" ({who.author_id})" if who.author_id else "") + f"; license {who.license}.", ""]
    if who.key_fingerprint:
        lines += ["## Who signed it", "", f"- Ed25519 public key: `{who.key_b64}`",
                  f"- fingerprint: `{who.key_fingerprint}`", "",
                  "Compare the fingerprint with the one the author published with the work (paper, web page, ORCID).",
                  "`depin-signature.json` signs the digests of every file here, the store's ledger head and the",
                  "Merkle root of its run digests.", ""]
    else:
        lines += ["This bundle is **not signed**: nothing here shows whose claim it is.", ""]
    lines += ["## What the store holds", "",
              f"- ledger: {anchor['ledger_entries']} entries, head SHA-256 `{anchor['head_sha256']}`",
              f"- Merkle root of the run digests (RFC 6962): `{anchor['runs_merkle_root']}`", ""]
    lines += [f"- cell {r.index} ({r.name or 'unnamed'}): run `{r.manifest.run_id}`" for r in runs if r.manifest]
    fp = f" --key '{who.key_fingerprint}'" if who.key_fingerprint else ""
    lines += ["", "## Check it, then re-execute it", "", "```bash", f"depin verify .{fp}",
              f"depin reproduce .{fp} --sandbox --report review", "```", "",
              "`depin reproduce` runs the notebook's code; `--sandbox` keeps it away from your files.", ""]
    return "\n".join(lines)


def _runs(store: Any, cells: list[tuple[int, str | None, str]]) -> list[CrateRun]:
    """Each `%%depin` cell with its newest complete run and the time the ledger sealed it."""
    from depin_jupyter.reproduce.cells import latest_run
    from depin_jupyter.store import ledger

    sealed = {e.run_id: e.time for e in ledger.read_chain(store.zarr_store)[0]}
    summaries = store.runs()
    out = []
    for index, name, code in cells:
        manifest = latest_run(store, summaries, code)
        out.append(CrateRun(index, name, code, manifest, sealed.get(manifest.run_id) if manifest else None))
    return out


def _tell(who: Authorship, key: Any, missing: list[int]) -> None:
    if missing:
        print(f"depin publish: cell(s) {', '.join(map(str, missing))} have no complete run in the store; "
              f"run them before publishing so reviewers can compare them.", file=sys.stderr)
    if key is None:
        print("depin publish: the bundle is NOT signed (--unsigned): reviewers cannot tell whose claim it is, nor "
              "detect a ledger cut or rebuilt after publication", file=sys.stderr)
    lacking = who.missing_recommended()
    if lacking:
        print(f"depin publish: the RO-Crate lacks what RO-Crate recommends; add {', '.join(lacking)} "
              "(or depin.publish.*)", file=sys.stderr)


def open_bundle(path: str) -> Bundle | None:
    """The bundle at ``path`` (a directory with ``ro-crate-metadata.json``), or None if it is not one."""
    p = pathlib.Path(path)
    crate_file = p / CRATE_FILE
    if not (p.is_dir() and crate_file.is_file()):
        return None
    try:
        graph = json.loads(crate_file.read_text()).get("@graph", [])
        notebooks = [e["@id"] for e in graph if {"File", "SoftwareSourceCode"} & set(_types(e))
                     and str(e["@id"]).endswith(".ipynb") and "/" not in str(e["@id"])]
    except (ValueError, AttributeError, TypeError, KeyError):  # a damaged crate: `check` names it
        graph, notebooks = [], sorted(n.name for n in p.glob("*.ipynb"))
    if not notebooks:
        raise DepinUsageError(f"{path} has RO-Crate metadata but names no notebook")
    runs = [e.get("identifier") for e in graph if "CreateAction" in _types(e)]
    return Bundle(path=p, notebook=p / notebooks[0], store=p / STORE_DIR, runs=[r for r in runs if r])


def verify_files(bundle: Bundle) -> list[str]:
    """Files of the bundle whose SHA-256 differs from the crate's record (the store verifies itself)."""
    return crate_file_mismatches(bundle.path, json.loads((bundle.path / CRATE_FILE).read_text()))


def shipped_files(bundle: Bundle) -> list[str]:
    """The files a bundle ships beside its notebook (what a re-execution may read)."""
    graph = json.loads((bundle.path / CRATE_FILE).read_text()).get("@graph", [])
    skip = {CRATE_FILE, LOCK_FILE, SIGNATURE_FILE, README_FILE, bundle.notebook.name}
    return sorted(e["@id"] for e in graph if "File" in _types(e) and e["@id"] not in skip)


def check(path: str, *, keys: tuple[str, ...] = ()) -> BundleCheck | None:
    """Everything a reviewer can check of the bundle at ``path`` without running it (None: not a bundle)."""
    bundle = open_bundle(path)
    if bundle is None:
        return None
    return check_bundle(bundle, keys=keys, crate_file=CRATE_FILE, store_dir=STORE_DIR)


def _types(entity: dict[str, Any]) -> list[str]:
    t = entity.get("@type", [])
    return [t] if isinstance(t, str) else list(t)

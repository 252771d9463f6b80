"""The result store: runs as Zarr groups, written by `RunWriter`, served only once sealed.

Layout (every node a Zarr 3 group or array, so plain zarr/xarray read it without depin)::

    zarr.json                       root group, attribute depin_store
    runs/<run_id>/zarr.json         run group: depin_run (begin info), then depin_manifest (last)
    runs/<run_id>/<output>/...      arrays, or xarray groups
    ledger/<seq>/zarr.json          hash chain of sealed runs (see ledger.py)
    depin/index/<run_id>/           run -> ledger seq (speeds up load)
    depin/cache/<sha256(key)>/<run_id>/   cache markers (lookup without scanning runs; a marker
                                          lost to a crash only costs a recomputation)
    depin/pending/<run_id>/<output>/      output records written by workers, folded into the manifest

A run is *complete* when its manifest is present and a ledger entry holds the SHA-256 of the run
group's zarr.json; anything else (running, killed, aborted, unsealed) is listed but never served.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from zarr.abc.store import Store

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError
from depin_jupyter.store import _io, _outputs, ledger
from depin_jupyter.store._digest import DEFAULT_ALGORITHM, group_document, sha256_hex
from depin_jupyter.store._errors import (
    RunIncompleteError,
    RunNotFoundError,
    StoreAccessError,
    StoreIntegrityError,
    UnsupportedOutputError,
)
from depin_jupyter.store._layout import (
    GROUPS,
    RUN_ATTR,
    RUN_ID,
    STORE_ATTR,
    cache_marker_document,
    cache_prefix,
    group_attrs,
    index_document,
    summarize,
)
from depin_jupyter.store.manifest import (
    MANIFEST_ATTR,
    OutputRecord,
    RunManifest,
    RunSummary,
    local_environment,
    local_worker,
)

DEFAULT_URL = "depin-results.zarr"
STORE_FORMAT = 1
_NAME = re.compile(r"^[^/\x00]+$")


def new_run_id() -> str:
    """A time-sortable unique id: ``YYYYmmddTHHMMSS.ffffffZ-<8 hex>`` (UTC)."""
    t = _dt.datetime.now(_dt.UTC)
    return f"{t:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(4)}"


def _ensure_group(store: Store, path: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Create the group ``path`` unless it exists (idempotent; racing writers write the same bytes)."""
    key = f"{path}/zarr.json" if path else "zarr.json"
    if not _io.exists(store, key):
        _io.create(store, key, group_document(attributes or {}))


def _rehash_before_seal(record: OutputRecord) -> bool:
    """Whether finish re-reads an output's chunks: config depin.store.verify-before-seal (parallel/all/none)."""
    mode = config.get("store.verify-before-seal")
    if mode == "all":
        return True
    return mode == "parallel" and (record.pytype.startswith("dask.") or record.pytype == "xarray.Variable")


class RunWriter:
    """Writes one run's outputs; picklable (url, storage options, run id) so Dask workers can write."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, run_id: str) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.run_id = run_id
        self._settings: _outputs.Settings | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], state["run_id"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"RunWriter({self.url!r}, run_id={self.run_id!r})"

    @property
    def _store(self) -> Store:
        return _io.open_zarr_store(self.url, self.storage_options)

    def _run_attrs(self) -> dict[str, Any]:
        raw = _io.get(self._store, f"runs/{self.run_id}/zarr.json")
        if raw is None:
            raise RunNotFoundError(f"run {self.run_id} does not exist in {self.url}")
        return group_attrs(raw)

    def _open_run(self) -> _outputs.Settings:
        """The run's write settings; refuses a run that is already finished or aborted."""
        attrs = self._run_attrs()
        if MANIFEST_ATTR in attrs or attrs[RUN_ATTR].get("status") == "aborted":
            raise DepinUsageError(f"run {self.run_id} is already {attrs[RUN_ATTR].get('status')}: "
                                  "no more outputs can be written to it")
        if self._settings is None:
            self._settings = _outputs.Settings(**attrs[RUN_ATTR]["settings"])
        return self._settings

    def write_output(self, name: str, value: object, *, compute_kwargs: dict[str, Any] | None = None) -> None:
        """Store output ``name``: arrays chunked and digested, small values into the manifest.

        numpy arrays (ndarray, recarray, matrix; numeric, bool, complex, datetime, fixed-width and
        str-object strings, structured) are written here; dask arrays are written block by block by
        whichever workers compute them (``dask.compute(..., **compute_kwargs)``: the active
        distributed client unless told otherwise; the workers must reach the store's URL), one
        Zarr chunk per block (irregular chunks are rechunked first); cupy arrays are copied to the
        host first (zarr 3.1's GPU buffers still go through host codecs); xarray objects become
        groups (dask-backed ones written and hashed on the workers). Anything else raises
        UnsupportedOutputError naming the variable and its type, unless ``store.allow-pickle`` is
        set (then it is stored pickled and flagged ``portable: false``).
        """
        if not isinstance(name, str) or not _NAME.match(name) or name.startswith("__") or name in (".", ".."):
            raise DepinUsageError(f"output name {name!r} cannot name a Zarr node (no '/', no leading '__')")
        store = self._store
        settings = self._open_run()
        pending = f"depin/pending/{self.run_id}/{name}/zarr.json"
        if _io.exists(store, pending):
            raise DepinUsageError(f"output {name!r} was already written to run {self.run_id}")
        path = f"runs/{self.run_id}/{name}"
        kind = _outputs.classify(value)
        if kind == "other" and not settings.allow_pickle:
            what = " of dtype object" if isinstance(value, np.ndarray) else ""
            raise UnsupportedOutputError(
                f"output {name!r} has type {_outputs.pytype_of(value)}{what}, which the store cannot keep "
                "portably (arrays, xarray objects, numbers, str, bytes and small lists/dicts of them "
                "can). Convert it, or set depin.store.allow-pickle: true to store it pickled.")
        if kind == "array":
            rec, secs = _outputs.timed(_outputs.write_numpy, store, path, value, settings, name=name,
                                       pytype=_outputs.pytype_of(value))
        elif kind == "cupy":
            rec, secs = _outputs.timed(_outputs.write_numpy, store, path, value.get(), settings,  # type: ignore[attr-defined]
                                       name=name, pytype=_outputs.pytype_of(value))
        elif kind == "dask":
            rec, secs = _outputs.timed(
                _outputs.write_dask, store, path, value, settings, url=self.url,
                storage_options=self.storage_options, key_prefix=f"depin-write-{self.run_id}-{name}",
                compute_kwargs=compute_kwargs)
        elif kind == "xarray":
            rec, secs = _outputs.timed(
                _outputs.write_xarray, store, path, value, settings, name=name, url=self.url,
                storage_options=self.storage_options, key_prefix=f"depin-write-{self.run_id}-{name}",
                compute_kwargs=compute_kwargs)
        elif kind == "value":
            rec, secs = _outputs.timed(_outputs.write_value, value, name=name, algorithm=settings.digest)
        else:
            rec, secs = _outputs.timed(_outputs.write_pickle, store, path, value, settings, name=name)
        _io.put(store, pending, group_document({"depin_output": {"record": rec.to_json(), "store_s": secs}}))

    def _pending(self) -> tuple[dict[str, OutputRecord], float]:
        store = self._store
        prefix = f"depin/pending/{self.run_id}"
        names = [n for n in _io.list_dir(store, prefix) if n != "zarr.json"]
        raws = _io.get_many(store, [f"{prefix}/{n}/zarr.json" for n in names])
        records: dict[str, OutputRecord] = {}
        seconds = 0.0
        for n in names:
            raw = raws[f"{prefix}/{n}/zarr.json"]
            if raw is None:
                continue
            body = group_attrs(raw)["depin_output"]
            records[n] = OutputRecord.from_json(body["record"])
            seconds += float(body["store_s"])
        return records, seconds

    def _check(self, name: str, record: OutputRecord) -> None:
        """Cheap pre-seal check: metadata digests match and exactly the digested chunks exist."""
        store = self._store
        for path, rec in record.arrays().items():
            if sha256_hex(_io.get(store, f"{path}/zarr.json") or b"") != rec.metadata_sha256:
                raise StoreIntegrityError(f"run {self.run_id}, output {name}: metadata of {path} changed")
            keys = {k[len(path) + 1:] for k in _io.list_prefix(store, path)}
            keys = {k for k in keys if k == "c" or k.startswith("c/")}
            if keys != set(rec.chunk_digests or {}):
                raise StoreIntegrityError(
                    f"run {self.run_id}, output {name}: chunks of {path} differ from those digested "
                    f"({len(keys)} stored, {len(rec.chunk_digests or {})} digested); not sealing")
            if _rehash_before_seal(record):
                # Written in parallel by workers: re-read every chunk, so a chunk another writer changed
                # between its write and now is caught before the run is sealed (zarr-python#3682).
                recorded = {f"{path}/{k}": d for k, d in (rec.chunk_digests or {}).items()}
                got = _io.check_keys(store, recorded)
                for k in sorted(keys):
                    if got[f"{path}/{k}"] != recorded[f"{path}/{k}"]:
                        raise StoreIntegrityError(
                            f"run {self.run_id}, output {name}: chunk {path}/{k} changed between its write "
                            f"and the seal; the run is left incomplete. Re-run the cell.")

    def finish(self, *, status: str = "ok", worker: dict[str, Any] | None = None,
               timings: dict[str, float] | None = None, extra: dict[str, Any] | None = None,
               environment: dict[str, Any] | None = None) -> RunManifest:
        """Check the outputs, write the manifest last, then chain it into the ledger (sealing the run).

        ``worker`` and ``environment`` describe where the cell ran (`local_worker()` /
        `local_environment()` called there); by default, this process. ``timings`` are seconds
        (queue_s, run_s, ...); ``store_s`` defaults to the time spent in `write_output`.
        """
        store = self._store
        attrs = self._run_attrs()
        begin = attrs[RUN_ATTR]
        if MANIFEST_ATTR in attrs:
            raise DepinUsageError(f"run {self.run_id} is already finished")
        if begin.get("status") == "aborted":
            raise DepinUsageError(f"run {self.run_id} was aborted ({begin.get('reason')}); start a new run")
        outputs, store_s = self._pending()
        try:
            for name, rec in outputs.items():
                self._check(name, rec)
        except StoreIntegrityError as exc:
            self.abort(str(exc))  # marked, never served
            raise
        times = {k: float(v) for k, v in (timings or {}).items()}
        times.setdefault("store_s", store_s)
        manifest = RunManifest(
            run_id=self.run_id, name=begin["name"], status=status, created=begin["created"],
            code=begin["code"], code_sha256=begin["code_sha256"], inputs=begin["inputs"],
            outputs=dict(sorted(outputs.items())), options=begin["options"],
            cache_key=begin["cache_key"], worker=worker or local_worker(),
            environment=environment or local_environment(), timings=times, extra=extra or {},
            digest_algorithm=str(begin["settings"].get("digest", DEFAULT_ALGORITHM)),
        )
        kept = {k: begin[k] for k in ("run_id", "name", "created", "cache_key", "settings")}  # rest: manifest
        raw = group_document({RUN_ATTR: {**kept, "status": status}, MANIFEST_ATTR: manifest.to_json()})
        _io.put(store, f"runs/{self.run_id}/zarr.json", raw)  # the manifest: written last
        entry = ledger.append(store, self.run_id, sha256_hex(raw), manifest.cache_key)
        _io.put(store, f"depin/index/{self.run_id}/zarr.json", index_document(entry))
        if manifest.cache_key is not None and status == "ok":
            prefix = cache_prefix(manifest.cache_key)
            _ensure_group(store, prefix)
            _io.put(store, f"{prefix}/{self.run_id}/zarr.json", cache_marker_document(entry))
        _io.delete_prefix(store, f"depin/pending/{self.run_id}")
        return manifest

    def abort(self, reason: str) -> None:
        """Mark the run aborted: it stays incomplete and is never served."""
        attrs = self._run_attrs()
        if MANIFEST_ATTR in attrs:
            raise DepinUsageError(f"run {self.run_id} is already finished; it cannot be aborted")
        attrs[RUN_ATTR] = {**attrs[RUN_ATTR], "status": "aborted", "reason": str(reason)}
        _io.put(self._store, f"runs/{self.run_id}/zarr.json", group_document(attrs))
        _io.delete_prefix(self._store, f"depin/pending/{self.run_id}")


class ResultStore:
    """A depin result store at an fsspec URL: begin runs, list, load, look up the cache, verify."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"ResultStore({self.url!r})"

    @property
    def zarr_store(self) -> Store:
        """The zarr Store object (what `zarr.open_group` / `xarray.open_zarr` accept)."""
        return _io.open_zarr_store(self.url, self.storage_options)

    def _open(self, *, create: bool) -> None:
        if _io.is_local(self.url) and not os.path.isdir(self.url) and not create:
            raise StoreAccessError(f"no depin store at {self.url}: the directory does not exist. "
                                   "Pass the path of an existing store, or write a run there first.")
        try:
            if _io.is_local(self.url) and create:
                os.makedirs(self.url, exist_ok=True)
            raw = _io.get(self.zarr_store, "zarr.json")
        except Exception as exc:
            raise StoreAccessError(
                f"cannot open the store {self.url}: {type(exc).__name__}: {exc}. Check the path or URL, "
                "the network and credentials (depin.store.storage-options), or pick another with "
                "--store / depin.store.url.") from exc
        if raw is not None:
            try:
                if STORE_ATTR in group_attrs(raw):
                    return
            except ValueError:
                pass
            raise StoreAccessError(f"{self.url} exists but is not a depin result store (no "
                                   f"'{STORE_ATTR}' in its zarr.json); choose another location.")
        if not create:
            raise StoreAccessError(f"no depin store at {self.url}; pass an existing store.")
        try:
            _ensure_group(self.zarr_store, "", {STORE_ATTR: {"format": STORE_FORMAT, "created": ledger.now()}})
            for g in GROUPS:
                _ensure_group(self.zarr_store, g)
        except Exception as exc:
            raise StoreAccessError(
                f"cannot create a store at {self.url}: {type(exc).__name__}: {exc}. Choose a writable "
                "location (--store URL or depin.store.url) or fix its permissions/credentials.") from exc

    def check_writable(self) -> None:
        """Raise StoreAccessError (path + fix) unless a key can be written and removed; call before compute."""
        key = f"depin/probe-{uuid.uuid4().hex}"
        try:
            _io.put(self.zarr_store, key, b"probe")
            _io.delete(self.zarr_store, key)
        except Exception as exc:
            raise StoreAccessError(
                f"the store {self.url} is not writable: {type(exc).__name__}: {exc}. Choose a writable "
                "location with --store URL or depin.store.url, fix permissions or credentials "
                "(depin.store.storage-options), or run with --no-store.") from exc

    def begin_run(self, *, code: str, inputs: dict[str, str], options: dict[str, Any],
                  cache_key: str | None, name: str | None = None, run_id: str | None = None) -> RunWriter:
        """Create the (incomplete) run group and return its writer; settings are fixed here."""
        run_id = run_id or new_run_id()
        if not RUN_ID.match(run_id):
            raise DepinUsageError(f"run id {run_id!r} is not of the form YYYYmmddTHHMMSS.ffffffZ-<hex>")
        try:
            json.dumps(options, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DepinUsageError(f"run options must be plain JSON values: {exc}") from exc
        settings = _outputs.Settings.from_config()
        settings.check()  # a misconfigured compression or digest fails here, before any compute
        begin = {
            "run_id": run_id, "name": name, "created": ledger.now(), "status": "running",
            "code": code, "code_sha256": hashlib.sha256(code.encode()).hexdigest(),
            "inputs": dict(inputs), "options": dict(options), "cache_key": cache_key,
            "settings": asdict(settings),
        }
        if not _io.create(self.zarr_store, f"runs/{run_id}/zarr.json", group_document({RUN_ATTR: begin})):
            raise DepinUsageError(f"run {run_id} already exists in {self.url}")
        _ensure_group(self.zarr_store, f"depin/pending/{run_id}")
        return RunWriter(self.url, self.storage_options, run_id)

    def writer(self, run_id: str) -> RunWriter:
        """The writer of an existing unfinished run (e.g. from another process)."""
        w = RunWriter(self.url, self.storage_options, run_id)
        w._run_attrs()
        return w

    def _sealed(self, run_id: str) -> tuple[RunManifest, ledger.LedgerEntry]:
        """The manifest of a complete run and its ledger entry; raises for anything not servable."""
        store = self.zarr_store
        raw = _io.get(store, f"runs/{run_id}/zarr.json")
        if raw is None:
            # Listed by `runs()` but without metadata (only data, only a half-written temporary file, or an
            # empty directory): its writer was killed early.
            if _io.list_prefix(store, f"runs/{run_id}") or run_id in _io.list_dir(store, "runs"):
                raise RunIncompleteError(f"run {run_id} in {self.url} has no run metadata: its writer was killed "
                                         f"before it began; it is not servable (see `depin runs {self.url}`)")
            raise RunNotFoundError(f"no run {run_id} in {self.url} (see `depin runs {self.url}`)")
        try:
            attrs = group_attrs(raw)
        except ValueError as exc:
            raise StoreIntegrityError(
                f"run {run_id}: its zarr.json is unreadable ({exc}); run `depin verify`") from exc
        if MANIFEST_ATTR not in attrs:
            status = attrs.get(RUN_ATTR, {}).get("status", "incomplete")
            raise RunIncompleteError(
                f"run {run_id} is incomplete ({status}: no manifest); its outputs are never served. "
                "Re-run the cell.")
        entry = None
        idx = _io.get(store, f"depin/index/{run_id}/zarr.json")
        if idx is not None:
            try:
                seq = group_attrs(idx)["depin_index"]["seq"]
                entry = ledger.parse_entry(_io.get(store, ledger.entry_key(seq)) or b"", seq)
            except (ValueError, KeyError, TypeError):
                entry = None
        if entry is None or entry.run_id != run_id:
            entry = ledger.find(store, run_id)
        if entry is None:
            raise RunIncompleteError(f"run {run_id} has a manifest but no ledger entry (its writer "
                                     "stopped while sealing it); it is not served. Re-run the cell.")
        if entry.manifest_sha256 != sha256_hex(raw):
            raise StoreIntegrityError(f"run {run_id}: manifest does not match ledger entry {entry.seq} "
                                      "(modified after sealing); run `depin verify`")
        return RunManifest.from_json(attrs[MANIFEST_ATTR]), entry

    def manifest(self, run_id: str) -> RunManifest:
        """The manifest of a complete run (RunIncompleteError otherwise)."""
        return self._sealed(run_id)[0]

    def load(self, run_id: str, names: list[str] | None = None, *, lazy: bool = True,
             allow_pickle: bool | None = None, verify: bool | None = None) -> dict[str, object]:
        """Outputs of a complete run: arrays as dask arrays (``lazy``) or host arrays, values as stored.

        ``verify`` (default: depin.store.verify-on-read) re-hashes every chunk as it is read, so bytes
        changed since the run was sealed raise StoreIntegrityError naming run, array and chunk; a lazy
        array checks each chunk when it is computed.
        """
        manifest = self.manifest(run_id)
        wanted = list(manifest.outputs) if names is None else list(names)
        unknown = [n for n in wanted if n not in manifest.outputs]
        if unknown:
            raise DepinUsageError(f"run {run_id} has no output(s) {unknown}; it has {list(manifest.outputs)}")
        pickles = bool(config.get("store.allow-pickle")) if allow_pickle is None else allow_pickle
        check = bool(config.get("store.verify-on-read")) if verify is None else verify
        return {n: _outputs.read(self.zarr_store, manifest.outputs[n], lazy=lazy, allow_pickle=pickles,
                                 verify=check, where=_Locator.of(run_id, n, manifest.outputs[n]))
                for n in wanted}

    def lookup_cache(self, cache_key: str) -> str | None:
        """The newest complete ``ok`` run stored under ``cache_key`` whose manifest and array metadata
        match the ledger, or None; reads no chunks, so its cost does not grow with output size."""
        store = self.zarr_store
        candidates = [n for n in _io.list_dir(store, cache_prefix(cache_key)) if RUN_ID.match(n)]
        for run_id in sorted(candidates, reverse=True):
            try:
                manifest, _ = self._sealed(run_id)
            except (RunNotFoundError, RunIncompleteError, StoreIntegrityError):
                continue
            if manifest.status != "ok" or manifest.cache_key != cache_key:
                continue
            arrays = {p: r for rec in manifest.outputs.values() for p, r in rec.arrays().items()}
            metas = _io.get_many(store, [f"{p}/zarr.json" for p in arrays])
            if all(sha256_hex(metas[f"{p}/zarr.json"] or b"") == r.metadata_sha256 for p, r in arrays.items()):
                return run_id
        return None

    def runs(self) -> list[RunSummary]:
        """Every run, complete or not, oldest first; ``complete`` means sealed and servable."""
        store = self.zarr_store
        ids = [n for n in _io.list_dir(store, "runs") if n != "zarr.json"]
        raws = _io.get_many(store, [f"runs/{r}/zarr.json" for r in ids])
        entries, _ = ledger.read_chain(store)
        sealed = {e.run_id: e for e in entries}
        return [summarize(r, raws[f"runs/{r}/zarr.json"], sealed.get(r)) for r in sorted(ids)]

    def verify(self) -> Any:
        """Re-hash every chunk, manifest and ledger entry; a `VerifyReport` naming each mismatch."""
        from depin_jupyter.store.verify import verify_store

        return verify_store(self)


@dataclass(frozen=True)
class _Locator:
    """``where(key)`` for a verifying read: the key as `depin verify` names it (run / output / array /
    chunk); a plain picklable object, since lazy arrays may be computed on other processes."""

    run_id: str
    name: str
    paths: tuple[str, ...]

    @classmethod
    def of(cls, run_id: str, name: str, record: OutputRecord) -> _Locator:
        return cls(run_id, name, tuple(sorted(record.arrays(), key=len, reverse=True)))

    def __call__(self, key: str) -> str:
        from depin_jupyter.store.findings import Problem

        path = next((p for p in self.paths if key.startswith(p + "/")), None)
        if path is None:
            return Problem("", self.run_id, self.name, key.removeprefix(f"runs/{self.run_id}/")).where
        rest = key[len(path) + 1:]
        array = path.removeprefix(f"runs/{self.run_id}/")
        if rest == "zarr.json":
            return Problem("", self.run_id, self.name, array).where + " / metadata (zarr.json)"
        return Problem("", self.run_id, self.name, array, rest).where


def open_store(url: str | None = None, *, storage_options: dict[str, Any] | None = None,
               create: bool = True, writable: bool | None = None) -> ResultStore:
    """Open (and by default create) the store; url None: depin.store.url, else ./depin-results.zarr.

    With ``create`` (or ``writable=True``) a probe key is written, so an unwritable or unreachable
    store fails here with a StoreAccessError naming the path and the fix, before any compute.
    """
    url = url or config.get("store.url") or DEFAULT_URL
    if storage_options is None:
        storage_options = dict(config.get("store.storage-options") or {})
    store = ResultStore(_io.normalize_url(url), storage_options)
    store._open(create=create)
    if create if writable is None else writable:
        store.check_writable()
    return store

"""How each kind of output is written to and read from a run group, with per-chunk digests.

Arrays (numpy, cupy, dask, pickles as uint8) become Zarr arrays written with
``write_empty_chunks=True``; xarray objects become groups xarray opens; small values go into the
manifest. Digests (BLAKE3 by default, `depin.store.digest`) are taken from the bytes as they are
written (`DigestingStore`); only chunks written by another process without reporting their digest
(dask-backed xarray) are read back. Verifying reads re-hash each chunk as it is read.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.errors import UnstableSpecificationWarning
from zarr.storage import LocalStore

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError
from depin_jupyter.store import _io, _values
from depin_jupyter.store._digest import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    PIECE_BYTES,
    Digest,
    canonical_json,
    digest,
    grid_size,
    output_digest,
    sha256_hex,
)
from depin_jupyter.store._errors import StoreIntegrityError, UnsupportedOutputError
from depin_jupyter.store.manifest import OutputRecord

MAX_VALUE_BYTES = 1 << 20
"""Largest JSON form of a value kept in the manifest; bigger containers should be arrays."""

_EXACT_NUMPY = {np.ndarray: "numpy.ndarray", np.recarray: "numpy.recarray", np.matrix: "numpy.matrix"}


@dataclass(frozen=True)
class Settings:
    """Write settings, captured once per run so every worker writes the run the same way."""

    chunk_bytes: int
    compression: str
    compression_level: int
    allow_pickle: bool
    digest: str = DEFAULT_ALGORITHM

    @classmethod
    def from_config(cls) -> Settings:
        """The `depin.store.*` settings in effect now."""
        return cls(
            chunk_bytes=config.nbytes("store.chunk-bytes"),
            compression=str(config.get("store.compression")),
            compression_level=int(config.get("store.compression-level")),
            allow_pickle=bool(config.get("store.allow-pickle")),
            digest=str(config.get("store.digest")),
        )

    def check(self) -> None:
        """Raise DepinUsageError for a setting the writers cannot honour (before any compute)."""
        self.compressors()
        if self.digest not in ALGORITHMS:
            raise DepinUsageError(f"depin.store.digest is {self.digest!r}; use {' or '.join(map(repr, ALGORITHMS))}")

    def compressors(self) -> list[Any] | None:
        """zarr's own codec objects for the configured compression (None: stored raw)."""
        if self.compression == "none":
            return None
        if self.compression == "zstd":
            return [ZstdCodec(level=self.compression_level)]
        if self.compression == "blosc-lz4":
            return [BloscCodec(cname="lz4", clevel=self.compression_level, shuffle="shuffle")]
        raise DepinUsageError(
            f"depin.store.compression is {self.compression!r}; use 'zstd', 'blosc-lz4' or 'none'")


def chunk_shape(shape: tuple[int, ...], itemsize: int, target: int) -> tuple[int, ...]:
    """Chunks of about ``target`` bytes cut along the leading axes (whole rows stay contiguous)."""
    chunks = [max(1, s) for s in shape]
    for axis in range(len(shape)):
        inner = max(1, itemsize) * math.prod(chunks[axis + 1:])
        if inner * chunks[axis] <= target:
            break
        chunks[axis] = max(1, min(chunks[axis], target // inner))
        if inner <= target:
            break
    return tuple(chunks)


def pytype_of(value: object) -> str:
    """``module.qualname`` of a value's type, as recorded in the manifest."""
    t = type(value)
    return _EXACT_NUMPY.get(t) or f"{t.__module__}.{t.__qualname__}"


def classify(value: object) -> str:
    """Which writer handles ``value``: array, cupy, dask, xarray, value or other."""
    t = type(value)
    if t in _EXACT_NUMPY:
        arr: np.ndarray = value  # type: ignore[assignment]
        if arr.dtype == object and not all(type(v) is str for v in arr.flat):
            return "other"  # objects: only as a pickle, when allowed
        return "array"
    mod = t.__module__.split(".")[0]
    if mod == "cupy" and t.__name__ == "ndarray":
        return "cupy"
    if mod == "dask" and t.__name__ == "Array":
        return "dask"
    if mod == "xarray" and t.__name__ in ("DataArray", "Dataset"):
        return "xarray"
    try:
        encoded = _values.encode(value)
    except _values.UnsupportedValue:
        return "other"
    return "value" if len(canonical_json(encoded)) <= MAX_VALUE_BYTES else "other"


def _zarr_dtype(arr: np.ndarray) -> Any:
    """The dtype zarr should store: object arrays (of str, see `classify`) as variable-length UTF-8."""
    return str if arr.dtype == object else arr.dtype


def create_array(store: Store, path: str, shape: tuple[int, ...], dtype: Any,
                 chunks: tuple[int, ...], settings: Settings) -> zarr.Array:
    """An empty Zarr 3 array at ``path`` that xarray can open (dimension names set).

    Structured and fixed-width string dtypes use zarr-python's extension data types (no Zarr 3 spec
    yet); zarr's warning about that is silenced here and the limitation documented instead.
    """
    leaf = path.rsplit("/", 1)[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        return zarr.create_array(
            store, name=path, shape=shape, dtype=dtype, chunks=chunks, zarr_format=3,
            compressors=settings.compressors(), config={"write_empty_chunks": True},
            dimension_names=tuple(f"{leaf}_dim_{i}" for i in range(len(shape))),
        )


def dtype_str(dtype: np.dtype[Any]) -> str:
    """How a dtype is named in the manifest: numpy's name, or the field list of a structured dtype."""
    return str(dtype) if dtype.names is None else json.dumps(dtype.descr)


def finalize_array(store: Store, path: str, digests: dict[str, str], *, kind: str, pytype: str,
                   dtype: np.dtype[Any], algorithm: str, portable: bool = True) -> OutputRecord:
    """Check every chunk of the array at ``path`` landed and build its record (digests of the bytes)."""
    meta_raw = _io.get(store, f"{path}/zarr.json")
    if meta_raw is None:
        raise StoreIntegrityError(f"array {path}: zarr.json is missing after writing it")
    meta = json.loads(meta_raw)
    shape = tuple(meta["shape"])
    chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    listed = {k[len(path) + 1:] for k in _io.list_prefix(store, path)}
    listed = {k for k in listed if k == "c" or k.startswith("c/")}
    relative = {k[len(path) + 1:]: v for k, v in digests.items() if k.startswith(path + "/")}
    expected = grid_size(shape, chunks)
    lost = set(relative) - listed
    if lost or len(listed) != expected:
        raise StoreIntegrityError(
            f"array {path}: {len(listed)} of {expected} chunks are in the store"
            + (f"; written but now missing: {sorted(lost)[:3]}" if lost else "")
            + ". A concurrent writer or a failing store lost data; the run is not sealed.")
    missing = sorted(listed - set(relative))
    if missing:  # written by processes that did not report digests: hash what is stored
        for key, hexd in _io.hash_keys(store, [f"{path}/{k}" for k in missing], algorithm).items():
            if hexd is None:
                raise StoreIntegrityError(f"array {path}: chunk {key} vanished while hashing")
            relative[key[len(path) + 1:]] = hexd
    codecs = list(meta["codecs"])
    return OutputRecord(
        kind=kind, pytype=pytype, portable=portable, path=path, shape=shape, dtype=dtype_str(dtype),
        chunks=chunks, codec=codecs, nbytes=None if dtype.kind == "O" else math.prod(shape) * dtype.itemsize,
        digest=output_digest(relative, algorithm), metadata_sha256=sha256_hex(meta_raw),
        chunk_digests=dict(sorted(relative.items())),
    )


def _write_chunkwise(z: zarr.Array, arr: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Write chunk by chunk, several at once: a whole-chunk write hands zarr a view it encodes
    without the copy its generic many-chunk path makes (see zarr's `_merge_chunk_array`)."""
    az = z.async_array
    limit = int(zarr.config.get("async.concurrency"))
    grid = [range(0, s, c) for s, c in zip(arr.shape, chunks)]

    async def _all() -> None:
        gate = asyncio.Semaphore(limit)

        async def one(sel: tuple[slice, ...]) -> None:
            async with gate:
                await az.setitem(sel, arr[sel])

        await asyncio.gather(*(one(tuple(slice(o, o + c) for o, c in zip(origin, chunks)))
                               for origin in itertools.product(*grid)))

    sync(_all())


def write_numpy(store: Store, path: str, value: np.ndarray, settings: Settings, *,
                name: str, pytype: str, kind: str = "array") -> OutputRecord:
    """Write a host array through a digesting wrapper: encode, hash and store in one pass."""
    arr = np.asarray(value)
    dtype = _zarr_dtype(arr)
    itemsize = arr.dtype.itemsize if arr.dtype != object else 64
    wrapped = _io.DigestingStore(store, settings.digest)
    chunks = chunk_shape(arr.shape, itemsize, settings.chunk_bytes)
    z = create_array(wrapped, path, arr.shape, dtype, chunks, settings)
    if arr.size and arr.ndim and dtype is not str:
        _write_chunkwise(z, arr, chunks)
    elif arr.size:
        z[...] = arr
    return finalize_array(store, path, wrapped.digests, kind=kind, pytype=pytype, dtype=arr.dtype,
                          algorithm=settings.digest)


def write_pickle(store: Store, path: str, value: object, settings: Settings, *, name: str) -> OutputRecord:
    """An opaque pickle as a uint8 array, flagged non-portable (only loaded on explicit opt-in)."""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise UnsupportedOutputError(
            f"output {name!r} ({pytype_of(value)}) cannot be pickled: {exc}") from exc
    rec = write_numpy(store, path, np.frombuffer(data, dtype=np.uint8), settings, name=name,
                      pytype=pytype_of(value), kind="pickle")
    return OutputRecord(**{**rec.__dict__, "portable": False})


def _host(block: Any) -> np.ndarray:
    """A numpy view of a block (cupy blocks are copied to the host, see `write_output`)."""
    if type(block).__module__.split(".")[0] == "cupy":
        return block.get()
    return np.asarray(block)


def write_block(url: str, storage_options: dict[str, Any] | None, path: str, block: Any,
                region: tuple[slice, ...], algorithm: str = DEFAULT_ALGORITHM) -> dict[str, str]:
    """Dask task: write one chunk-aligned block where it was computed; return its chunk digests."""
    wrapped = _io.DigestingStore(_io.open_zarr_store(url, storage_options), algorithm)
    z = zarr.open_array(wrapped, path=path, mode="r+").with_config({"write_empty_chunks": True})
    z[region] = _host(block)
    return wrapped.digests


def _regular_chunks(chunks: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
    """The Zarr chunk shape matching dask chunks, or None if they are not a regular grid."""
    out = []
    for dim in chunks:
        first = dim[0] if dim else 1
        if any(c != first for c in dim[:-1]) or (dim and dim[-1] > first):
            return None
        out.append(max(1, first))
    return tuple(out)


def write_dask(store: Store, path: str, x: Any, settings: Settings, *, url: str,
               storage_options: dict[str, Any] | None, key_prefix: str,
               compute_kwargs: dict[str, Any] | None = None) -> OutputRecord:
    """Let the workers write the blocks straight to the store, one Zarr chunk per block."""
    import dask

    chunks = _regular_chunks(x.chunks)
    if chunks is None:
        chunks = chunk_shape(x.shape, x.dtype.itemsize, settings.chunk_bytes)
        x = x.rechunk(chunks)
    if x.dtype == object:
        raise UnsupportedOutputError(f"output {path.rsplit('/', 1)[-1]!r}: a dask array of dtype object "
                                     "cannot be stored; convert it to a numeric or string dtype")
    create_array(store, path, x.shape, x.dtype, chunks, settings)
    offsets = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in x.chunks]
    blocks = x.to_delayed(optimize_graph=True)
    tasks = []
    for idx in itertools.product(*(range(len(c)) for c in x.chunks)):
        region = tuple(slice(int(o[i]), int(o[i + 1])) for o, i in zip(offsets, idx))
        tasks.append(dask.delayed(write_block, pure=False)(
            url, storage_options, path, blocks[idx], region, settings.digest,
            dask_key_name=f"{key_prefix}-{'.'.join(map(str, idx)) or '0'}"))
    digests: dict[str, str] = {}
    for part in dask.compute(*tasks, **(compute_kwargs or {})):
        digests.update(part)
    return finalize_array(store, path, digests, kind="array", pytype=pytype_of(x), dtype=x.dtype,
                          algorithm=settings.digest)


def hash_task(url: str, storage_options: dict[str, Any] | None, keys: list[str],
              algorithm: str = DEFAULT_ALGORITHM) -> dict[str, str]:
    """Dask task: digests of stored chunks, computed where they were written (only digests come back)."""
    hashed = _io.hash_keys(_io.open_zarr_store(url, storage_options), keys, algorithm)
    return {k: v for k, v in hashed.items() if v is not None}


def write_xarray(store: Store, path: str, value: Any, settings: Settings, *, name: str, url: str,
                 storage_options: dict[str, Any] | None, key_prefix: str,
                 compute_kwargs: dict[str, Any] | None = None) -> OutputRecord:
    """An xarray object as a Zarr group `xarray.open_zarr` opens; each variable digested like an array.

    xarray does the CF encoding and writing; dask-backed variables are written by the workers and
    hashed there afterwards (one extra read of each chunk, on the worker, not in the notebook).
    """
    import dask
    import xarray as xr

    is_da = isinstance(value, xr.DataArray)
    varname = None
    if is_da:
        varname = value.name if isinstance(value.name, str) and value.name else name
        ds = value.to_dataset(name=varname).copy()
    else:
        ds = value.copy()
    lazy = False
    encoding: dict[str, dict[str, Any]] = {}
    for v in list(ds.variables):
        var = ds.variables[v]
        var.encoding = {}
        if var.chunks is not None:
            lazy = True
            if _regular_chunks(var.chunks) is None:
                target = chunk_shape(var.shape, var.dtype.itemsize, settings.chunk_bytes)
                ds[v] = var.chunk(dict(zip(var.dims, target)))
            encoding[str(v)] = {"compressors": settings.compressors()}
        else:
            chunks = chunk_shape(var.shape, var.dtype.itemsize, settings.chunk_bytes)
            encoding[str(v)] = {"compressors": settings.compressors(), "chunks": chunks}
    wrapped = _io.DigestingStore(store, settings.digest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        pending = ds.to_zarr(store if lazy else wrapped, group=path, mode="w-", zarr_format=3,
                             consolidated=False, write_empty_chunks=True, encoding=encoding,
                             compute=not lazy)
        if lazy:
            dask.compute(pending, **(compute_kwargs or {}))
    digests = dict(wrapped.digests)
    if lazy:
        keys = [k for v in ds.variables for k in _io.list_prefix(store, f"{path}/{v}")
                if k.rsplit("/", 1)[-1] != "zarr.json"]
        parts = [keys[i:i + 64] for i in range(0, len(keys), 64)]
        tasks = [dask.delayed(hash_task, pure=False)(url, storage_options, part, settings.digest,
                                                     dask_key_name=f"{key_prefix}-hash-{i}")
                 for i, part in enumerate(parts)]
        for part in dask.compute(*tasks, **(compute_kwargs or {})):
            digests.update(part)
    variables = {
        str(v): finalize_array(store, f"{path}/{v}", digests, kind="array", pytype="xarray.Variable",
                               dtype=ds[v].dtype, algorithm=settings.digest)
        for v in ds.variables
    }
    meta_raw = _io.get(store, f"{path}/zarr.json") or b""
    return OutputRecord(
        kind="xarray", pytype=pytype_of(value), path=path, variables=variables,
        metadata_sha256=sha256_hex(meta_raw),
        digest=output_digest({k: r.digest or "" for k, r in variables.items()}, settings.digest),
        variable=varname, dataarray_name=_values.encode(value.name) if is_da else None,
    )


def write_value(value: object, *, name: str, algorithm: str = DEFAULT_ALGORITHM) -> OutputRecord:
    """A small Python value kept in the manifest itself (typed JSON, never pickled)."""
    encoded = _values.encode(value, name)
    return OutputRecord(kind="value", pytype=pytype_of(value), value=encoded,
                        digest=digest(canonical_json(encoded), algorithm))


def restore_type(arr: np.ndarray, record: OutputRecord) -> Any:
    """Give a loaded host array back the container type it was stored from."""
    arr = np.asarray(arr)  # zarr returns a numpy scalar for a 0-d array
    if record.dtype == "object":
        arr = arr.astype(object)
    if record.pytype == "numpy.recarray":
        return arr.view(np.recarray)
    if record.pytype == "numpy.matrix":
        return np.asmatrix(arr)
    if record.pytype.startswith("cupy."):
        try:
            import cupy

            return cupy.asarray(arr)
        except Exception:  # no GPU here: the numpy array is the honest answer  # noqa: BLE001 - any failure is reported, not raised
            return arr
    return arr


_RAW_LE = [{"name": "bytes", "configuration": {"endian": "little"}}]


def recorded_digests(record: OutputRecord) -> dict[str, str]:
    """Store key -> recorded digest of everything a verifying read of ``record`` checks: each
    array's chunks and zarr.json (and an xarray group's zarr.json)."""
    out: dict[str, str] = {}
    if record.kind == "xarray" and record.path and record.metadata_sha256:
        out[f"{record.path}/zarr.json"] = record.metadata_sha256
    for path, arr in record.arrays().items():
        if arr.metadata_sha256:
            out[f"{path}/zarr.json"] = arr.metadata_sha256
        out.update({f"{path}/{k}": d for k, d in (arr.chunk_digests or {}).items()})
    return out


def _read_exactly(f: Any, view: memoryview, check: Digest | None, where: Callable[[], str]) -> None:
    """Fill ``view`` from ``f``; with ``check``, piece by piece, each hashed while it is in the cache."""
    step = view.nbytes if check is None else PIECE_BYTES
    for start in range(0, view.nbytes, step):
        piece = view[start:start + step]
        if f.readinto(piece) != piece.nbytes:
            raise StoreIntegrityError(f"{where()} is truncated; run `depin verify`")
        if check is not None:
            check.update(piece)


def _read_direct(store: Store, record: OutputRecord, recorded: dict[str, str] | None = None,
                 where: Callable[[str], str] = str) -> np.ndarray | None:
    """Uncompressed row-chunked arrays on a local disk: read each chunk file straight into the
    output (its bytes *are* the decoded chunk), several at once, re-hashing each against
    ``recorded`` when given (in the same thread, while it is in cache); None where that does not hold."""
    if not isinstance(store, LocalStore) or record.codec != _RAW_LE or not record.shape:
        return None
    dtype = np.dtype(record.dtype) if record.dtype and not record.dtype.startswith("[") else None
    if dtype is None or dtype.kind not in "biufcmM" or dtype.byteorder == ">" or not record.chunks:
        return None
    shape, chunks = record.shape, record.chunks
    if tuple(chunks[1:]) != tuple(shape[1:]):
        return None
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1).view(np.uint8)
    row = dtype.itemsize * math.prod(shape[1:])
    suffix = "/0" * (len(shape) - 1)

    def one(i: int) -> None:
        start = i * chunks[0]
        view = flat[start * row:min(shape[0], start + chunks[0]) * row]
        key = f"{record.path}/c/{i}{suffix}"
        check = None if recorded is None else Digest(recorded=recorded.get(key, ""))
        try:
            with open(os.path.join(str(store.root), *key.split("/")), "rb", buffering=0) as f:
                _read_exactly(f, memoryview(view), check, lambda: where(key))  # type: ignore[arg-type]
                if check is not None:
                    check.update(f.read())  # a last chunk is stored padded
        except FileNotFoundError:
            raise StoreIntegrityError(f"{where(key)} is missing from the store; run `depin verify`") from None
        if check is not None and check.result() != check.recorded:
            raise StoreIntegrityError(f"{where(key)}: bytes differ from their digest (changed after "
                                      "the run was sealed); run `depin verify`")

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(-(-shape[0] // chunks[0]))))
    return out


def read(store: Store, record: OutputRecord, *, lazy: bool, allow_pickle: bool, verify: bool = False,
         where: Callable[[str], str] = str) -> Any:
    """The Python object for a stored output; arrays as dask arrays when ``lazy``.

    With ``verify`` every chunk and zarr.json read is re-hashed against the manifest's digest and
    a mismatch raises StoreIntegrityError located by ``where(key)``; lazy arrays check each chunk
    when it is computed. (A value's digest is the manifest's own, checked against the ledger.)
    """
    if record.kind == "value":
        return _values.decode(record.value)
    recorded = recorded_digests(record) if verify else None
    raw = store
    if recorded is not None:
        store = _io.VerifyingStore(store, recorded, where)
    if record.kind == "xarray":
        import xarray as xr

        ds = xr.open_zarr(store, group=record.path, consolidated=False, chunks={} if lazy else None)
        if record.variable is not None:
            da = ds[record.variable].rename(_values.decode(record.dataarray_name))
            return da if lazy else da.load()
        return ds if lazy else ds.load()
    z = zarr.open_array(store, path=record.path or "", mode="r")
    if record.kind == "pickle":
        if not allow_pickle:
            raise UnsupportedOutputError(
                f"output at {record.path} ({record.pytype}) is a pickle (portable: false); load it "
                "with allow_pickle=True only if you trust the worker that produced it")
        return pickle.loads(np.asarray(z[...]).tobytes())  # noqa: S301 - opt-in non-portable pickles the user stored (depin.store.allow-pickle)
    if lazy and z.ndim and record.kind == "array":
        import dask.array as da

        return da.from_zarr(z, name=f"depin-{record.digest}")
    direct = _read_direct(raw, record, recorded, where) if record.kind == "array" else None
    return restore_type(np.asarray(z[...]) if direct is None else direct, record)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, seconds it took): store time is part of a run's timings."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0

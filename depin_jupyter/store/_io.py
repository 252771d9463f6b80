"""Key/value access to a store through zarr's own Store classes, so depin reads what zarr reads.

Everything here is synchronous (run on zarr's event loop) and knows nothing about runs or manifests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from depin_jupyter.store._digest import DEFAULT_ALGORITHM, digest, digest_like, digest_through, matches
from depin_jupyter.store._errors import StoreIntegrityError

PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
"""Temporary files a killed LocalStore writer can leave behind (``<key>.<uuid>.partial``)."""

_STORES: dict[tuple[str, str], Store] = {}
_STORES_LOCK = threading.Lock()


def is_local(url: str) -> bool:
    """True for a plain path or ``file://`` URL (served by zarr's LocalStore)."""
    return "://" not in url or url.startswith("file://")


def normalize_url(url: str) -> str:
    """An absolute path for local stores (so a pickled writer finds it from any cwd); URLs as given."""
    if is_local(url):
        return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
    return url.rstrip("/")


def open_zarr_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The zarr Store for ``url``, cached per process (workers reuse one S3 client for many chunks)."""
    key = (url, json.dumps(storage_options or {}, sort_keys=True, default=str))
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            if is_local(url):
                store = LocalStore(url)
            else:
                store = FsspecStore.from_url(url, storage_options=dict(storage_options or {}))
            _STORES[key] = store
        return store


def _invalidate(store: Store, prefix: str) -> None:
    """Drop fsspec's listing cache so two writers see each other's new keys."""
    inner = store._store if isinstance(store, WrapperStore) else store
    if isinstance(inner, FsspecStore):
        inner.fs.invalidate_cache(f"{inner.path}/{prefix}".rstrip("/"))


def get(store: Store, key: str) -> bytes | None:
    """The bytes at ``key``, or None when the key is absent."""
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def get_many(store: Store, keys: Iterable[str]) -> dict[str, bytes | None]:
    """Several small keys fetched concurrently (ledger entries, manifests)."""
    keys = list(keys)

    async def _all() -> list[Any]:
        proto = default_buffer_prototype()
        return await asyncio.gather(*(store.get(k, prototype=proto) for k in keys))

    return {k: (None if b is None else b.to_bytes()) for k, b in zip(keys, sync(_all()))}


def put(store: Store, key: str, data: bytes) -> None:
    """Write ``data`` at ``key`` (atomic per key on LocalStore and S3)."""
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def create(store: Store, key: str, data: bytes) -> bool:
    """Write ``key`` only if absent, atomically where the backend can; True if this call created it."""
    inner = store._store if isinstance(store, WrapperStore) else store
    if isinstance(inner, FsspecStore):
        path = f"{inner.path}/{key}"
        try:
            sync(inner.fs._pipe_file(path, data, mode="create"))
            inner.fs.invalidate_cache(path.rsplit("/", 1)[0])
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):
            pass  # a filesystem without exclusive create: fall back to check-then-write below
    buf = default_buffer_prototype().buffer.from_bytes(data)
    sync(store.set_if_not_exists(key, buf))
    return get(store, key) == data


def exists(store: Store, key: str) -> bool:
    """Whether ``key`` holds a value."""
    return bool(sync(store.exists(key)))


def delete(store: Store, key: str) -> None:
    """Remove one key."""
    sync(store.delete(key))


def delete_prefix(store: Store, prefix: str) -> None:
    """Remove every key under ``prefix`` (best effort; used for scratch records)."""
    sync(store.delete_dir(prefix))


def list_dir(store: Store, prefix: str) -> list[str]:
    """Names directly under ``prefix`` (keys and sub-prefixes), sorted, temporary files excluded."""
    _invalidate(store, prefix)

    async def _all() -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    names = {n.rstrip("/") for n in sync(_all())}
    return sorted(n for n in names if n and not PARTIAL.search(n))


def list_prefix(store: Store, prefix: str) -> list[str]:
    """Every key under ``prefix`` (recursively), sorted, temporary files excluded."""
    _invalidate(store, prefix)

    async def _all() -> list[str]:
        return [k async for k in store.list_prefix(prefix.rstrip("/") + "/")]

    return sorted(k for k in sync(_all()) if not PARTIAL.search(k))


def _hash_many(store: Store, hashers: Mapping[str, Callable[[Any], str]], concurrency: int) -> dict[str, str | None]:
    """Read keys and hash each with its own function, several at once (None where a key is missing)."""
    async def _all() -> list[str | None]:
        proto = default_buffer_prototype()
        gate = asyncio.Semaphore(concurrency)

        async def one(key: str) -> str | None:
            async with gate:
                buf = await store.get(key, prototype=proto)
                if buf is None:
                    return None
                return await asyncio.to_thread(hashers[key], buf.as_buffer_like())

        return await asyncio.gather(*(one(k) for k in hashers))

    return dict(zip(hashers, sync(_all())))


def hash_keys(store: Store, keys: Iterable[str], algorithm: str = DEFAULT_ALGORITHM,
              concurrency: int = 8) -> dict[str, str | None]:
    """New digests (``"<algorithm>:<hex>"``) of each key's bytes (None if missing), several keys at once."""
    return _hash_many(store, {k: functools.partial(digest, algorithm=algorithm) for k in keys}, concurrency)


def check_keys(store: Store, recorded: Mapping[str, str], concurrency: int = 8) -> dict[str, str | None]:
    """Each key re-hashed by the algorithm its recorded digest names, in the same form, so equal means
    intact (None if missing)."""
    return _hash_many(store, {k: functools.partial(digest_like, recorded=v) for k, v in recorded.items()},
                      concurrency)


def _hash_and_put(path: Path, data: Any, algorithm: str) -> str:
    """Write ``data`` to ``path`` the way zarr's LocalStore does (a ``.partial`` file renamed into place, so
    a reader never sees half a chunk), hashing it on the way; return its digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            hexd = digest_through(data, f.write, algorithm)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hexd


class DigestingStore(WrapperStore[Store]):
    """A store wrapper that hashes every value as it is written, so digests cost no re-read.

    On a LocalStore each chunk is hashed and written piece by piece in one pass (`digest_through`); on
    other stores hashing runs on a thread beside the upload. Either way hashlib and blake3 release the
    GIL and zarr writes several chunks at once, so hashing, encoding and I/O of different chunks overlap.
    """

    def __init__(self, store: Store, algorithm: str = DEFAULT_ALGORITHM) -> None:
        super().__init__(store)
        self.algorithm = algorithm
        self.digests: dict[str, str] = {}

    def _with_store(self, store: Store) -> DigestingStore:
        return type(self)(store, self.algorithm)

    async def set(self, key: str, value: Any) -> None:
        if key.endswith("zarr.json"):
            await self._store.set(key, value)
            return
        view = value.as_buffer_like()
        if isinstance(self._store, LocalStore) and not self._store.read_only:
            self.digests[key] = await asyncio.to_thread(_hash_and_put, self._store.root / key, view,
                                                        self.algorithm)
            return
        hexd, _ = await asyncio.gather(
            asyncio.to_thread(digest, view, self.algorithm), self._store.set(key, value)
        )
        self.digests[key] = hexd


class VerifyingStore(WrapperStore[Store]):
    """A read-only view that re-hashes every value it serves whose digest is recorded, and raises
    `StoreIntegrityError` naming the key on a mismatch (or when a recorded key is missing)."""

    def __init__(self, store: Store, recorded: Mapping[str, str], where: Callable[[str], str] = str) -> None:
        super().__init__(store)
        self.recorded = dict(recorded)
        self.where = where

    def _with_store(self, store: Store) -> VerifyingStore:
        return type(self)(store, self.recorded, self.where)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        expected = self.recorded.get(key)
        if expected is None:
            return await self._store.get(key, prototype, byte_range)
        buf = await self._store.get(key, prototype)
        if buf is None:
            raise StoreIntegrityError(f"{self.where(key)}: missing, though the manifest records its digest; "
                                      "run `depin verify`")
        if not await asyncio.to_thread(matches, buf.as_buffer_like(), expected):
            raise StoreIntegrityError(f"{self.where(key)}: bytes differ from their digest (changed after the "
                                      "run was sealed); run `depin verify`")
        return buf if byte_range is None else buf[_slice(byte_range, len(buf))]

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))


def _slice(req: ByteRequest, size: int) -> slice:
    """The part of a value of ``size`` bytes a byte-range request asks for."""
    if isinstance(req, RangeByteRequest):
        return slice(req.start, req.end)
    if isinstance(req, OffsetByteRequest):
        return slice(req.offset, size)
    return slice(max(0, size - req.suffix), size)

"""Key/value access to a store through zarr's own Store classes, so depin reads what zarr reads.

Everything here is synchronous (run on zarr's event loop) and knows nothing about runs or manifests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Iterable
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from depin_jupyter.store._digest import sha256_hex

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


def hash_keys(store: Store, keys: Iterable[str], concurrency: int = 8) -> dict[str, str | None]:
    """SHA-256 of each key's bytes (None if missing), reading and hashing several keys at once."""
    keys = list(keys)

    async def _all() -> list[str | None]:
        proto = default_buffer_prototype()
        gate = asyncio.Semaphore(concurrency)

        async def one(key: str) -> str | None:
            async with gate:
                buf = await store.get(key, prototype=proto)
                if buf is None:
                    return None
                return await asyncio.to_thread(sha256_hex, buf.as_buffer_like())

        return await asyncio.gather(*(one(k) for k in keys))

    return dict(zip(keys, sync(_all())))


class DigestingStore(WrapperStore[Store]):
    """A store wrapper that hashes every value as it is written, so digests cost no re-read.

    Hashing runs in a thread alongside the write itself (hashlib releases the GIL).
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.digests: dict[str, str] = {}

    def _with_store(self, store: Store) -> DigestingStore:
        return type(self)(store)

    async def set(self, key: str, value: Any) -> None:
        if key.endswith("zarr.json"):
            await self._store.set(key, value)
            return
        view = value.as_buffer_like()
        digest, _ = await asyncio.gather(
            asyncio.to_thread(sha256_hex, view), self._store.set(key, value)
        )
        self.digests[key] = digest

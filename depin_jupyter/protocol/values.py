"""Values that cross a process boundary: boxing ndarray subclasses, content hashes, rich last-expression
values, and notebook functions re-bound to the namespace they arrive in."""

from __future__ import annotations

import base64
import pickle
import sys
import types
from typing import Any

__all__ = ["Boxed", "ByValue", "RichValue", "box", "content_hash", "rebind_globals", "unbox"]


class Boxed:
    """Carries a value by pickle, bypassing Dask's array serializer, which drops ndarray subclasses."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (Boxed, (self.value,))


class ByValue:
    """Carries an object of the notebook's own modules by value (cloudpickle). Dask pickles with plain
    pickle first, which names a module-level function or class by its module; a worker receiving it
    before the run's module bundle is installed could not import that module. Unpickles to the object."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        import cloudpickle

        return (pickle.loads, (cloudpickle.dumps(self.value, protocol=5),))


def box(value: Any) -> Any:
    """Box ndarray subclasses (recarray, matrix, masked arrays) so they keep their type in transit."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        return Boxed(value)
    return value


def unbox(value: Any) -> Any:
    return value.value if isinstance(value, Boxed) else value


def content_hash(obj: Any) -> str:
    """A content hash for shipping and change detection: xxh3 over array bytes, dask's tokenize otherwise.

    Non-deterministic objects (no stable token) get a fresh random hash, so they are always re-sent.
    """
    import numpy as np

    if type(obj) is np.ndarray or isinstance(obj, np.ndarray):
        import xxhash

        arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        h = xxhash.xxh3_128()
        h.update(repr((type(obj).__name__, obj.dtype.str, obj.dtype.descr, obj.shape)).encode())
        if arr.dtype.hasobject:
            h.update(pickle.dumps(arr, protocol=5))
        else:
            _hash_buffer(h, memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]  # numpy stubs
        return "xxh3-" + h.hexdigest()
    from dask.base import tokenize

    return "tok-" + tokenize(obj)


_PARALLEL_HASH_BYTES = 16 * 2**20
_PIECE_BYTES = 4 * 2**20  # large buffers are hashed in pieces of this size, whatever the core count


_hash_pool = None


def _hash_buffer(h: Any, buf: memoryview) -> None:
    """Feed ``buf`` to ``h``; large buffers as the digests of fixed-size pieces, hashed in parallel where
    threads can start (xxhash releases the GIL) and one after another otherwise: the same digest either way,
    so a fingerprint taken before a cell matches the one taken after it (a sandbox that cannot start threads
    or import concurrent.futures once reported every large input as changed in place), and two machines
    with different core counts agree on a content key."""
    global _hash_pool
    import os

    if buf.nbytes < _PARALLEL_HASH_BYTES:
        h.update(buf)
        return
    import xxhash

    pieces = [buf[i:i + _PIECE_BYTES] for i in range(0, buf.nbytes, _PIECE_BYTES)]
    digests = None
    workers = min(8, os.cpu_count() or 1)
    if workers > 1:
        try:
            if _hash_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                _hash_pool = ThreadPoolExecutor(workers, thread_name_prefix="depin-hash")
            digests = list(_hash_pool.map(xxhash.xxh3_128_digest, pieces))
        except (ImportError, RuntimeError, OSError):  # no threads here (a limit, a sandbox): hash in line
            digests = None
    for digest in digests if digests is not None else map(xxhash.xxh3_128_digest, pieces):
        h.update(digest)


class RichValue:
    """A last-expression value that cannot travel itself: shown through its MIME bundle.

    ``errors``: the tracebacks of formatters that failed where it was formatted (shown with it, as IPython
    shows a failing formatter's; with no bundle left, that is all there is to show).
    """

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any], errors: list[str] | None = None) -> None:
        self.data, self.metadata = data, metadata
        self.errors = list(errors or [])

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        data = dict(self.data)
        if "image/png" in data and isinstance(data["image/png"], str):
            data["image/png"] = base64.b64decode(data["image/png"])
        return data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote value>"))


def rebind_globals(obj: Any, ns: dict[str, Any]) -> Any:
    """A copy of a notebook-defined function whose globals are ``ns``, so it sees the cell's names.

    Classes keep the globals cloudpickle gave their methods (the names they used when shipped).
    """
    if isinstance(obj, types.FunctionType) and obj.__module__ == "__main__" and obj.__globals__ is not ns:
        new = types.FunctionType(obj.__code__, ns, obj.__name__, obj.__defaults__, obj.__closure__)
        new.__kwdefaults__ = obj.__kwdefaults__
        new.__qualname__ = obj.__qualname__
        new.__dict__.update(obj.__dict__)
        new.__annotations__ = getattr(obj, "__annotations__", {})
        new.__doc__ = obj.__doc__
        return new
    return obj

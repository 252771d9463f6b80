"""Local modules travel: find the notebook's own modules a cell needs and bundle their source.

A module is *local* when it is importable in the kernel from outside the Python installation (beside
the notebook, or on a sys.path entry the user added) and is not an installed distribution. Its
source (a module file, or a whole package with its subpackages) is bundled, content-hashed so the
cluster receives each version once, and registered with cloudpickle to travel by value, so objects
defined in it unpickle on workers that have never seen the file. Only `.py` files are bundled.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path
from typing import Iterable

from depin_jupyter.cell import imported_packages, parse
from depin_jupyter.protocol.bundles import ModuleBundle, origin_of

__all__ = ["bundle_local_modules"]

@functools.lru_cache(maxsize=4096)
def _read(path: Path, mtime_ns: int, size: int) -> bytes:  # the stat values key the cache
    return path.read_bytes()


def _files_of(origin: Path) -> dict[str, bytes]:
    paths = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*.py") if "__pycache__" not in p.parts)
    base = origin.parent
    out = {}
    for p in paths:
        st = p.stat()
        out[p.relative_to(base).as_posix()] = _read(p, st.st_mtime_ns, st.st_size)
    return out


def bundle_local_modules(names: Iterable[str]) -> ModuleBundle | None:
    """Bundle the local modules among ``names`` and the local modules they import, transitively."""
    todo = [n for n in dict.fromkeys(names)]
    seen: set[str] = set()
    files: dict[str, bytes] = {}
    tops: list[str] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        origin = origin_of(name)
        if origin is None:
            continue
        tops.append(name)
        found = _files_of(origin)
        files.update(found)
        for rel, src in found.items():
            try:
                todo.extend(imported_packages(parse(src, rel)))
            except SyntaxError:
                pass  # the worker will report it on import, with the file's own line numbers
        module = sys.modules.get(name)
        if module is not None:
            _register_by_value(module)
    if not files:
        return None
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return ModuleBundle(key="depin-modules-" + h.hexdigest()[:32], names=tuple(sorted(tops)), files=files)


def _register_by_value(module: object) -> None:
    import cloudpickle

    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError:  # already registered, or not a proper module
        pass

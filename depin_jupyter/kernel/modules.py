"""Local modules travel: find the notebook's own modules a cell needs and bundle their source.

A module is *local* when it is importable in the kernel from outside the Python installation (beside
the notebook, or on a sys.path entry the user added) and is not an installed distribution. Its
source (a module file, or a whole package with its subpackages) is bundled, content-hashed so the
cluster receives each version once, and registered with cloudpickle to travel by value, so objects
defined in it unpickle on workers that have never seen the file. Only `.py` files are bundled.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from depin_jupyter.cell import imported_packages

__all__ = ["ModuleBundle", "bundle_local_modules", "is_local"]

_NEVER = {"depin_jupyter", "__main__"}


@dataclass(frozen=True)
class ModuleBundle:
    """Source files of local modules, keyed by their content hash."""

    key: str
    names: tuple[str, ...]          # top-level module names it provides
    files: dict[str, bytes]         # relative path -> content

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[Path, ...]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(p)
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # some embedded interpreters lack these
        pass
    return tuple(Path(r).resolve() for r in roots if r)


@functools.lru_cache(maxsize=512)
def _is_distribution(name: str) -> bool:
    for candidate in {name, name.replace("_", "-")}:
        try:
            importlib.metadata.distribution(candidate)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def _origin(name: str) -> Path | None:
    """The file or package directory ``name`` imports from, if it is a local module."""
    if name in _NEVER or name in sys.builtin_module_names or name in sys.stdlib_module_names:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen") or not spec.has_location:
        return None
    path = Path(spec.origin).resolve()
    if any(path.is_relative_to(root) for root in _installed_roots()) or _is_distribution(name):
        return None
    return path.parent if spec.submodule_search_locations else path


def is_local(name: str) -> bool:
    """True when top-level module ``name`` is the notebook's own (so it must be shipped)."""
    return _origin(name) is not None


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
        origin = _origin(name)
        if origin is None:
            continue
        tops.append(name)
        found = _files_of(origin)
        files.update(found)
        for rel, src in found.items():
            try:
                todo.extend(imported_packages(ast.parse(src, filename=rel)))
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

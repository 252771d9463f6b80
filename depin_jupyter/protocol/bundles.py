"""The notebook's own modules as they travel: which modules are local, and a bundle of their source.

A module is *local* when it is importable in the kernel from outside the Python installation (beside the
notebook, or on a sys.path entry the user added) and is not an installed distribution. The kernel bundles
such modules (`kernel.modules`); the worker installs a bundle (`worker.modules`); the store tells them apart
from installed code when it decides what is portable.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModuleBundle", "is_local", "origin_of"]


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


def origin_of(name: str) -> Path | None:
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
    return origin_of(name) is not None

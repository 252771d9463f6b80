"""Environments are checked first: the packages a cell imports must match between kernel and worker.

A difference in major or minor version (numpy 2.4 here, 2.3 there) is what turns into confusing
failures later — unpickling errors, changed defaults — so it is refused up front, naming the
package, both versions and the worker (config `depin.env-check`: error, warn or ignore). Worker
versions are asked once per worker and package, then cached on the session.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Mismatch", "local_version", "worker_versions", "compare", "ALWAYS_CHECKED"]

ALWAYS_CHECKED = ("numpy", "dask", "distributed", "cloudpickle")


@dataclass(frozen=True)
class Mismatch:
    """One package that differs (or is missing) on one worker."""

    package: str
    local: str | None
    remote: str | None
    worker: str

    def __str__(self) -> str:
        if self.remote is None:
            return f"{self.package} is not installed on worker {self.worker} (the notebook has {self.local})"
        return f"{self.package} {self.local} in the notebook but {self.remote} on worker {self.worker}"


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _version_of(module: str) -> str | None:
    """The installed version of top-level ``module`` in this process, or None if it is not importable."""
    if module in sys.builtin_module_names or module in sys.stdlib_module_names:
        return None
    for dist in _distributions().get(module, ()):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    mod = sys.modules.get(module)
    version = getattr(mod, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return "unversioned" if found else None


@functools.lru_cache(maxsize=1024)
def local_version(module: str) -> str | None:
    return _version_of(module)


def worker_versions(modules: list[str]) -> dict[str, str | None]:
    """Run on a worker (through `Client.run`): its versions of ``modules`` (None: not installed)."""
    return {m: _version_of(m) for m in modules}


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def compare(local: dict[str, str | None], remote: dict[str, dict[str, str | None]]) -> list[Mismatch]:
    """Mismatches in major.minor version (or missing packages) between the kernel and each worker."""
    out = []
    for worker, versions in sorted(remote.items()):
        for pkg, mine in local.items():
            if mine is None:
                continue  # not installed here: nothing to compare with
            theirs = versions.get(pkg)
            if theirs is None:
                out.append(Mismatch(pkg, mine, None, worker))
            elif "unversioned" not in (mine, theirs) and _minor(mine) != _minor(theirs):
                out.append(Mismatch(pkg, mine, theirs, worker))
    return out


class EnvironmentCache:
    """Worker versions already asked for, per worker address (a session holds one)."""

    def __init__(self) -> None:
        self._known: dict[str, dict[str, str | None]] = {}

    def unknown(self, workers: Iterable[str], packages: list[str]) -> list[str]:
        """The workers not yet asked about all of ``packages``."""
        return [w for w in workers if any(p not in self._known.get(w, {}) for p in packages)]

    def versions(self, client: Any, workers: Iterable[str], packages: list[str]) -> dict[str, dict[str, str | None]]:
        workers = list(workers)
        missing = self.unknown(workers, packages)
        if missing:
            wanted = sorted({p for w in missing for p in packages if p not in self._known.get(w, {})})
            answers = client.run(worker_versions, wanted, workers=missing, on_error="return")
            for w, ans in answers.items():
                if isinstance(ans, dict):
                    self._known.setdefault(w, {}).update(ans)
        # A worker that did not answer (it died since the worker list was read) is left out: what it never
        # said is not "not installed" (that made a cell fail right after a worker restart).
        return {w: known for w in workers if (known := self._known.get(w)) is not None
                and all(p in known for p in packages)}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop workers no longer connected (a restarted worker may run another environment)."""
        keep = set(keep)
        for w in list(self._known):
            if w not in keep:
                del self._known[w]

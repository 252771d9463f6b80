"""What a volunteer's machine is, measured once and remembered in its control directory: the CPU benchmark
its workers advertise and the package versions installed. Both used to be measured on every `depin worker`
start (about 1.2 s and 0.5 s of CPU on a 2-core machine, on the way to joining); a BOINC client, too,
benchmarks a host once in a while, not at every start.

A remembered value is used while its fingerprint still matches the machine (for the versions: every
``sys.path`` directory's modification time, which installing, upgrading or removing a package changes)
and, for the benchmark, while it is younger than ``depin.volunteer.benchmark-max-age``. Self-reported
either way, like everything a volunteer says: the coordinator caps credit by what it saw itself.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["remembered", "stored_benchmark", "stored_versions"]

T = TypeVar("T")


def remembered(name: str, fingerprint: Any, max_age: float | None, measure: Callable[[], T]) -> T:
    """The value remembered as ``name`` if it was measured on a machine of this ``fingerprint`` at most
    ``max_age`` seconds ago (None: any age); else ``measure()``, remembered for the next start."""
    from depin_jupyter.worker import controls

    try:
        path = controls.control_dir() / f"{name}.json"
        doc = json.loads(path.read_text()) if path.stat().st_uid == os.getuid() else {}
        fresh = max_age is None or time.time() - float(doc["at"]) <= max_age
        if doc.get("fingerprint") == json.loads(json.dumps(fingerprint)) and fresh and "value" in doc:
            value: T = doc["value"]
            return value
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    value = measure()
    try:
        directory = controls.control_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"at": time.time(), "fingerprint": fingerprint, "value": value}, f)
        os.replace(tmp, directory / f"{name}.json")
    except (OSError, TypeError, ValueError):  # an unwritable control dir: measured again next time
        pass
    return value


def _machine() -> dict[str, Any]:
    import importlib.metadata

    try:
        numpy = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        numpy = None
    return {"node": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": numpy}


def stored_benchmark() -> dict[str, Any]:
    """The CPU benchmark of this machine (`controls.benchmark`), measured at most once per
    ``depin.volunteer.benchmark-max-age`` (7 days)."""
    from depin_jupyter import config
    from depin_jupyter.worker import controls

    max_age = config.seconds("volunteer.benchmark-max-age")
    return remembered("benchmark", _machine(), max_age, lambda: controls.benchmark(False))


def _path_fingerprint() -> list[tuple[str, int]]:
    out = []
    for entry in sys.path:
        try:
            if os.path.isdir(entry):
                out.append((entry, os.stat(entry).st_mtime_ns))
        except OSError:
            continue
    return out


def stored_versions(measure: Callable[[], dict[str, str]]) -> dict[str, str]:
    """The installed package versions (``measure``), read again only when a ``sys.path`` directory changed."""
    return remembered("versions", {"python": sys.executable, "path": _path_fingerprint()}, None, measure)

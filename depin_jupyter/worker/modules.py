"""The notebook's own modules on the worker: a shipped bundle becomes what `import` finds."""

from __future__ import annotations

import importlib
import os
import sys
import threading

__all__ = ["use_local_modules"]


_modules_lock = threading.Lock()


def use_local_modules(key: str, names: list[str], files: dict[str, bytes]) -> None:
    """Make this bundle of notebook modules the one `import` finds, replacing older versions."""
    import shutil
    import tempfile

    root = os.path.join(tempfile.gettempdir(), "depin-modules")
    target = os.path.join(root, key)
    with _modules_lock:
        if not os.path.isdir(target):
            tmp = tempfile.mkdtemp(prefix=key + ".", dir=_mkdir(root))
            for rel, data in files.items():
                path = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            try:
                os.rename(tmp, target)  # atomic: another process may have won the race; both are equal
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        sys.path[:] = [p for p in sys.path if not p.startswith(root + os.sep)]
        sys.path.insert(0, target)
        for name in list(sys.modules):
            top = name.split(".")[0]
            mod_file = getattr(sys.modules[name], "__file__", None) or ""
            if top in names and not mod_file.startswith(target + os.sep):
                del sys.modules[name]  # an older version: the cell imports the shipped one
        importlib.invalidate_caches()


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path

"""What a notebook's cells say about reproduction: which are `%%depin` cells, which files they declare, which
published runs match them, and which cells name the published store (and so could read the answers)."""

from __future__ import annotations

import glob
import os
import pathlib
import shlex
from collections.abc import Sequence
from typing import Any

__all__ = ["declared_paths", "depin_cells", "latest_run", "naming_the_store", "norm"]


def _magic_args(first_line: str) -> list[str]:
    try:
        return shlex.split(first_line)[1:]
    except ValueError:
        return first_line.split()[1:]


def depin_cells(nb: Any) -> list[tuple[int, str | None, str]]:
    """(cell index, --name, code) of each `%%depin` cell."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.startswith("%%depin"):
            continue
        first, _, body = cell.source.partition("\n")
        args = _magic_args(first)
        name = args[args.index("--name") + 1] if "--name" in args and args.index("--name") + 1 < len(args) else None
        out.append((i, name, body))
    return out


def declared_paths(nb: Any, nb_dir: str | os.PathLike[str]) -> list[str]:
    """The files the `%%depin` cells declare with ``--deps`` (globs and directories expanded), relative to the
    notebook's directory, sorted; paths outside that directory raise ValueError naming them."""
    base = pathlib.Path(nb_dir).resolve()
    found: set[str] = set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.startswith("%%depin"):
            continue
        args = _magic_args(cell.source.partition("\n")[0])
        if "--deps" not in args:
            continue
        for pattern in _deps_values(args):
            for match in glob.glob(str(base / pattern), recursive=True) or [str(base / pattern)]:
                p = pathlib.Path(match).resolve()
                if p != base and base not in p.parents:
                    raise ValueError(f"cell {i} declares --deps {pattern}, which is outside the notebook's "
                                     f"directory {base}: keep the files a notebook reads beside it")
                files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
                found.update(str(q.relative_to(base)) for q in files)
    return sorted(found)


def _deps_values(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    on = False
    for a in args:
        if a == "--deps":
            on = True
        elif a.startswith("-"):
            on = False
        elif on:
            out.append(a)
    return out


def norm(code: str) -> str:
    return code.rstrip()


def latest_run(store: Any, summaries: list[Any], code: str) -> Any | None:
    """The newest complete run of ``code`` in ``store`` (with its manifest), or None."""
    for s in reversed(summaries):
        if not s.complete:
            continue
        manifest = store.manifest(s.run_id)
        if norm(manifest.code) == norm(code):
            return manifest
    return None


def naming_the_store(nb: Any, names: Sequence[str]) -> list[tuple[int, str]]:
    """(cell index, the name it contains) for each code cell whose source names one of ``names`` (the published
    store's path, its directory name, the bundle's path): such a cell could copy the published answers."""
    hits = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for name in names:
            if name and name in cell.source:
                hits.append((i, name))
                break
    return hits

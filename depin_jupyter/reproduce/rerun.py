"""`depin reproduce`: verify a published store, re-execute the notebook where it cannot read the answers, compare.

A reviewer's question is "did every number come out the same?". The published store is verified first
(digests, ledger, every file); a cell whose code names the published store is refused before anything runs.
The notebook then runs headlessly in a fresh kernel (nbclient) in a scratch directory holding only the notebook
and its declared files, writing to a scratch store with the cache off, with a guard that refuses opening the
published store (`isolate.py`; ``sandbox`` also isolates the whole run from the reviewer's files). Each
`%%depin` cell's new run, the one stored while that cell executed, is compared with the published run of the
same code, variable by variable (`compare.compare`): bit-identical where both runs are of one hardware class and
``exact_same_class`` is set, else exact for integers and strings and rtol/atol for floats.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

from depin_jupyter.compare import compare
from depin_jupyter.reproduce import isolate
from depin_jupyter.reproduce.cells import depin_cells, latest_run, naming_the_store, norm
from depin_jupyter.reproduce.hardware import hardware_class, same_class
from depin_jupyter.reproduce.report import REPORT_SCHEMA, CellVerdict, Report

__all__ = ["CellVerdict", "Report", "reproduce", "reproduce_bundle", "REPORT_SCHEMA", "depin_cells", "latest_run"]


def _forbidden(store: Any, protect: Sequence[str]) -> list[str]:
    """The published store and ``protect`` (the bundle), minus any that holds the Python installation itself."""
    import sys

    own = [os.path.realpath(p) for p in (sys.prefix, os.path.dirname(os.path.realpath(sys.executable)))]
    roots = [os.path.realpath(store.url)] + [os.path.realpath(p) for p in protect]
    return [r for r in dict.fromkeys(roots) if not any(o == r or o.startswith(r + os.sep) for o in own)]


def _names(roots: Sequence[str], store_url: str, nb_dir: pathlib.Path) -> list[str]:
    """The strings a cell would contain to name the published store: its paths and its directory name."""
    names = {*roots, os.path.abspath(store_url), os.path.basename(os.path.normpath(store_url))}
    try:
        names.add(os.path.relpath(os.path.realpath(store_url), nb_dir.resolve()))
    except ValueError:
        pass
    return sorted(n for n in names if n and n not in (".", "/") and len(n) > 3)


def reproduce(notebook: str, store_url: str, *, rtol: float = 1e-7, atol: float = 0.0, cluster: str | None = None,
              timeout: float = 1800, sandbox: bool | str = False, exact_same_class: bool = False,
              files: Sequence[str] | None = None, protect: Sequence[str] = ()) -> Report:
    """Verify ``store_url``, re-execute ``notebook`` in isolation with the cache off, compare every `%%depin` run.

    ``files``: the files beside the notebook it may read (default: those its cells declare with --deps);
    ``protect``: more paths the re-execution must not read (a bundle's directory); ``sandbox``: False, True
    (bubblewrap when it works here, else a child process), "bubblewrap" (required) or "child".
    """
    import nbformat

    from depin_jupyter.reproduce.cells import declared_paths
    from depin_jupyter.store import open_store

    published = open_store(store_url, create=False, writable=False)
    report = Report(notebook=notebook, store=published.url, verified=False)
    check = published.verify()
    if not check.ok:
        report.error = "the published store does not verify; nothing was re-executed:\n" + check.format()
        return report
    report.verified = True
    nb_path = pathlib.Path(notebook)
    nb = nbformat.read(nb_path, as_version=4)
    roots = _forbidden(published, protect)
    for index, name in naming_the_store(nb, _names(roots, store_url, nb_path.parent)):
        report.refused.append({"index": index, "reason": (
            f"names the published store ({name!r}): a re-execution must not read the published results, so "
            "nothing was executed. Remove that reference (a notebook reads its inputs from files it declares "
            "with --deps), or review the cell by hand")})
    if report.refused:
        return report
    try:
        declared = list(files) if files is not None else declared_paths(nb, nb_path.parent)
    except ValueError as exc:
        report.error = f"{exc}; nothing was re-executed"
        return report
    scratch = isolate.prepare(nb, nb_path.parent, declared, roots)
    try:
        _run_and_judge(report, nb, scratch, published, sandbox=sandbox, cluster=cluster, timeout=timeout,
                       rtol=rtol, atol=atol, exact_same_class=exact_same_class)
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
    return report


def reproduce_bundle(path: str, *, keys: Sequence[str] = (), **options: Any) -> Report:
    """Check the bundle at ``path`` (signature, files, store, signed head; ``keys``: the fingerprints accepted),
    then `reproduce` its notebook against its store with only its shipped files, the bundle out of reach."""
    from depin_jupyter.reproduce.publish import check, open_bundle, shipped_files

    bundle = open_bundle(path)
    if bundle is None:
        raise ValueError(f"{path} is not a bundle (no ro-crate-metadata.json)")
    result = check(path, keys=tuple(keys))
    assert result is not None
    if not result.ok:
        report = Report(notebook=str(bundle.notebook), store=str(bundle.store), verified=False)
        report.error = "the bundle does not verify; nothing was re-executed:\n" + result.format()
        return report
    report = reproduce(str(bundle.notebook), str(bundle.store), files=shipped_files(bundle),
                       protect=[str(bundle.path)], **options)
    report.signer = result.signer
    return report


def _run_and_judge(report: Report, nb: Any, scratch: isolate.Scratch, published: Any, *, sandbox: bool | str,
                   cluster: str | None, timeout: float, rtol: float, atol: float, exact_same_class: bool) -> None:
    from depin_jupyter.store import open_store

    started = dt.datetime.now(dt.timezone.utc)
    try:
        report.isolation = isolate.describe(sandbox, cluster)
        executed = isolate.execute(nb, scratch, sandbox=sandbox, cluster=cluster, timeout=timeout,
                                   isolation=report.isolation)
    except RuntimeError as exc:
        report.error = str(exc)
        return
    _refuse_guarded(report, executed, scratch)
    fresh = open_store(str(scratch.store), create=True)
    fresh_check = fresh.verify()
    if not fresh_check.ok:
        report.error = "the re-execution's own store does not verify (a cell tampered with it):\n" + fresh_check.format()
        return
    pub_runs, new_runs = published.runs(), fresh.runs()
    made, strays = _attribute(executed, fresh, new_runs, started)
    published_ids = {s.run_id for s in pub_runs}
    for s in strays:
        copied = " (a run id of the published store: copied from it)" if s.run_id in published_ids else ""
        report.error = ((report.error + "\n") if report.error else "") + (
            f"run {s.run_id} in the re-execution's store was not made by any %%depin cell while it ran{copied}: "
            "another cell wrote it, so the reproduction cannot be trusted. Find the cell that writes to the "
            "depin store (DASK_DEPIN__STORE__URL) and remove it")
    for index, name, code in depin_cells(executed):
        report.cells.append(_judge(index, name, code, executed.cells[index], published, pub_runs, fresh,
                                   made.get(index), rtol, atol, exact_same_class))


def _refuse_guarded(report: Report, executed: Any, scratch: isolate.Scratch) -> None:
    """Name the cells the guard stopped from opening the published store (and say so if it cannot tell which)."""
    hits = isolate.guard_hits(scratch)
    cells = [i for i, c in enumerate(executed.cells) if c.cell_type == "code" and any(
        o.get("output_type") == "error" and isolate.GUARD_MESSAGE in str(o.get("evalue", ""))
        for o in c.get("outputs", []))]
    for i in cells:
        report.refused.append({"index": i, "reason": "opened the published store while the notebook was "
                               "re-executed (refused by the guard): a reproduction computes its results, it does "
                               "not copy them. Remove that access from the notebook"})
    if hits and not cells:
        paths = sorted({h.get("path", "?") for h in hits})[:3]
        report.refused.append({"index": -1, "reason": (
            f"a cell tried to open the published store {len(hits)} time(s) ({', '.join(paths)}) and hid the "
            "refusal; the reproduction cannot be trusted. Find the cell (search the notebook for file access) "
            "and remove it")})


def _stamp(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _attribute(executed: Any, fresh: Any, new_runs: list[Any],
               started: dt.datetime) -> tuple[dict[int, Any], list[Any]]:
    """Each `%%depin` cell's own new run (stored while that cell executed), and the runs no cell made."""
    windows = {}
    for index, _, code in depin_cells(executed):
        timing = executed.cells[index].get("metadata", {}).get("execution", {})
        lo, hi = _stamp(timing.get("iopub.execute_input")), _stamp(timing.get("shell.execute_reply"))
        if lo and hi:
            windows[index] = (lo, hi, norm(code))
    made: dict[int, Any] = {}
    strays = []
    for s in new_runs:
        created = _stamp(s.created)
        owner = next((i for i, (lo, hi, _) in windows.items() if created and lo <= created <= hi), None)
        if created is None or created < started or owner is None or owner in made:
            strays.append(s)
            continue
        if s.complete:
            made[owner] = fresh.manifest(s.run_id)
    for index, manifest in list(made.items()):
        if norm(manifest.code) != windows[index][2]:
            strays.append(next(s for s in new_runs if s.run_id == manifest.run_id))
            del made[index]
    return made, strays


def _judge(index: int, name: str | None, code: str, cell: Any, published: Any, pub_runs: list[Any],
           fresh: Any, new: Any, rtol: float, atol: float, exact_same_class: bool) -> CellVerdict:
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    old = latest_run(published, pub_runs, code)
    if old is None:
        same_name = name is not None and any(s.name == name and s.complete for s in pub_runs)
        return CellVerdict(index, name, "code changed" if same_name else "missing in store",
                           "the published store has a run named like this cell but with other code"
                           if same_name else "no published run of this cell's code")
    if errors:
        e = errors[0]
        return CellVerdict(index, name, "failed", f"{e.get('ename')}: {e.get('evalue')}", old.run_id)
    if new is None:
        said = [line for o in cell.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stderr"
                for line in str(o.get("text", "")).splitlines() if line.strip()]
        return CellVerdict(index, name, "failed", "the re-execution stored no run for this cell"
                           + (f" (it said: {said[-1]})" if said else ""), old.run_id)
    pub_hw, new_hw = hardware_class(old), hardware_class(new)
    one_class = same_class(pub_hw, new_hw)
    exact = exact_same_class and one_class
    verdict = CellVerdict(index, name, "reproduced", "", old.run_id, new.run_id, published_hardware=pub_hw,
                          reproduced_hardware=new_hw, same_class=one_class,
                          comparison=("bit-identical required (one hardware class, --exact-same-class)" if exact
                                      else f"integers and strings exact, floats within rtol {rtol:g}, atol {atol:g}"))
    old_values = published.load(old.run_id, lazy=False)
    new_values = fresh.load(new.run_id, lazy=False)
    for var in sorted(set(old_values) | set(new_values)):
        if var not in new_values:
            verdict.variables[var] = {"verdict": "missing in re-execution"}
        elif var not in old_values:
            verdict.variables[var] = {"verdict": "new output"}
        else:
            c = compare(old_values[var], new_values[var], rtol=0.0 if exact else rtol, atol=0.0 if exact else atol)
            verdict.variables[var] = {"verdict": c.verdict, "detail": c.detail, "max_abs": c.max_abs,
                                      "max_rel": c.max_rel}
    bad = [v for v, r in verdict.variables.items()
           if r["verdict"] not in (("identical",) if exact else ("identical", "within tolerance"))]
    if bad:
        verdict.verdict = "differs"
        verdict.detail = ", ".join(f"{v} {verdict.variables[v]['verdict']}" for v in bad)
        if exact:
            verdict.detail += " (bit-identical required: both runs are of one hardware class)"
    return verdict

"""`depin reproduce`: verify a published store, re-execute the notebook with the cache off, compare run by run.

A reviewer's question is "did every number come out the same?". The published store is verified first
(digests and ledger); the notebook then runs headlessly in a fresh kernel (nbclient) writing to a scratch
store with the cache off; each `%%depin` cell's new run is compared with the published run of the same
code, variable by variable (`compare.compare`: exact for integers and strings, rtol/atol for floats).
"""

from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from depin_jupyter.compare import compare

__all__ = ["CellVerdict", "Report", "reproduce", "REPORT_SCHEMA"]

REPORT_SCHEMA = os.path.join(os.path.dirname(__file__), "reproduce-report-schema.json")

PASS = ("reproduced",)


@dataclass
class CellVerdict:
    """What became of one `%%depin` cell."""

    index: int
    name: str | None
    verdict: str    # reproduced | differs | code changed | missing in store | failed
    detail: str = ""
    published_run: str | None = None
    reproduced_run: str | None = None
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    published_hardware: dict[str, Any] | None = None
    reproduced_hardware: dict[str, Any] | None = None


@dataclass
class Report:
    notebook: str
    store: str
    verified: bool
    cells: list[CellVerdict] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.verified and self.error is None and all(c.verdict in PASS for c in self.cells)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def _repr_html_(self) -> str:
        """The report as an HTML table (what `%depin reproduce` shows in a notebook)."""
        from html import escape

        color = {"reproduced": "#1a7f37", "identical": "#1a7f37", "within tolerance": "#1a7f37"}
        head = "REPRODUCED" if self.ok else "NOT REPRODUCED"
        rows = []
        for c in self.cells:
            rows.append(f"<tr><td>{c.index}</td><td>{escape(c.name or '')}</td><td></td>"
                        f"<td style='color:{color.get(c.verdict, '#cf222e')}'>{escape(c.verdict)}</td>"
                        f"<td>{escape(c.detail)}</td></tr>")
            for var, v in c.variables.items():
                rows.append(f"<tr><td></td><td></td><td>{escape(var)}</td>"
                            f"<td style='color:{color.get(v['verdict'], '#cf222e')}'>{escape(v['verdict'])}</td>"
                            f"<td>{escape(v.get('detail') or '')}</td></tr>")
        error = f"<pre>{escape(self.error)}</pre>" if self.error else ""
        return (f"<div class='depin-reproduce'><b>{head}</b>: {escape(self.notebook)} against "
                f"{escape(self.store)}{error}<table><tr><th>cell</th><th>name</th><th>variable</th>"
                f"<th>verdict</th><th>detail</th></tr>{''.join(rows)}</table></div>")

    def to_html(self) -> str:
        """A standalone HTML page of the report (what `depin reproduce --report` writes)."""
        from html import escape

        return ("<!doctype html><html><head><meta charset='utf-8'><title>depin reproduce: "
                f"{escape(self.notebook)}</title><style>body{{font-family:sans-serif}}td,th{{padding:2px 8px;"
                "text-align:left}}</style></head><body>" + self._repr_html_() + "</body></html>")

    def format(self) -> str:
        lines = [f"notebook {self.notebook}, published store {self.store}: "
                 f"{'REPRODUCED' if self.ok else 'NOT REPRODUCED'}"]
        if self.error:
            lines.append(f"  {self.error}")
        for c in self.cells:
            lines.append(f"  cell {c.index} ({c.name or 'unnamed'}): {c.verdict}{' - ' + c.detail if c.detail else ''}")
            for var, v in c.variables.items():
                lines.append(f"    {var}: {v['verdict']}{' (' + v['detail'] + ')' if v.get('detail') else ''}")
        return "\n".join(lines)


def depin_cells(nb: Any) -> list[tuple[int, str | None, str]]:
    """(cell index, --name, code) of each `%%depin` cell."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.startswith("%%depin"):
            continue
        first, _, body = cell.source.partition("\n")
        args = shlex.split(first)[1:]
        name = args[args.index("--name") + 1] if "--name" in args and args.index("--name") + 1 < len(args) else None
        out.append((i, name, body))
    return out


def _norm(code: str) -> str:
    return code.rstrip()


def latest_run(store: Any, summaries: list[Any], code: str) -> Any | None:
    """The newest complete run of ``code`` in ``store`` (with its manifest), or None."""
    for s in reversed(summaries):
        if not s.complete:
            continue
        manifest = store.manifest(s.run_id)
        if _norm(manifest.code) == _norm(code):
            return manifest
    return None


def reproduce(notebook: str, store_url: str, *, rtol: float = 1e-7, atol: float = 0.0,
              cluster: str | None = None, timeout: float = 1800) -> Report:
    """Verify ``store_url``, re-execute ``notebook`` with the cache off, and compare every `%%depin` run."""
    import nbformat
    from nbclient import NotebookClient

    from depin_jupyter.store import open_store

    published = open_store(store_url, create=False)
    report = Report(notebook=notebook, store=published.url, verified=False)
    check = published.verify()
    if not check.ok:
        report.error = "the published store does not verify; nothing was re-executed:\n" + check.format()
        return report
    report.verified = True

    nb = nbformat.read(notebook, as_version=4)
    scratch = os.path.join(tempfile.mkdtemp(prefix="depin-reproduce-"), "reproduced.zarr")
    env = {"DASK_DEPIN__STORE__URL": scratch, "DASK_DEPIN__STORE__CACHE": "false"}
    if cluster:
        env["DASK_DEPIN__SCHEDULER_ADDRESS"] = cluster
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the fresh kernel inherits them
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": os.path.dirname(os.path.abspath(notebook))}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    fresh = open_store(scratch, create=True)
    pub_runs, new_runs = published.runs(), fresh.runs()
    for index, name, code in depin_cells(nb):
        report.cells.append(_judge(index, name, code, nb.cells[index], published, pub_runs, fresh, new_runs,
                                   rtol, atol))
    return report


def _judge(index: int, name: str | None, code: str, cell: Any, published: Any, pub_runs: list[Any],
           fresh: Any, new_runs: list[Any], rtol: float, atol: float) -> CellVerdict:
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
    new = latest_run(fresh, new_runs, code)
    if new is None:
        return CellVerdict(index, name, "failed", "the re-execution stored no run for this cell", old.run_id)
    verdict = CellVerdict(index, name, "reproduced", "", old.run_id, new.run_id,
                          published_hardware=_hardware(old.worker), reproduced_hardware=_hardware(new.worker))
    old_values = published.load(old.run_id, lazy=False)
    new_values = fresh.load(new.run_id, lazy=False)
    for var in sorted(set(old_values) | set(new_values)):
        if var not in new_values:
            verdict.variables[var] = {"verdict": "missing in re-execution"}
        elif var not in old_values:
            verdict.variables[var] = {"verdict": "new output"}
        else:
            c = compare(old_values[var], new_values[var], rtol=rtol, atol=atol)
            verdict.variables[var] = {"verdict": c.verdict, "detail": c.detail, "max_abs": c.max_abs,
                                      "max_rel": c.max_rel}
    bad = [v for v, r in verdict.variables.items() if r["verdict"] not in ("identical", "within tolerance")]
    if bad:
        verdict.verdict = "differs"
        verdict.detail = ", ".join(f"{v} {verdict.variables[v]['verdict']}" for v in bad)
    if verdict.published_hardware != verdict.reproduced_hardware:
        verdict.detail = (verdict.detail + "; " if verdict.detail else "") + (
            f"published on {verdict.published_hardware}, reproduced on {verdict.reproduced_hardware}")
    return verdict


def _hardware(worker: dict[str, Any] | None) -> dict[str, Any]:
    worker = worker or {}
    gpu = worker.get("gpu") or {}
    return {"cpu": worker.get("cpu"), "gpu": gpu.get("name") if isinstance(gpu, dict) else None}

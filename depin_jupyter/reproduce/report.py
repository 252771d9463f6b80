"""The verdict of `depin reproduce`: one `CellVerdict` per `%%depin` cell, the `Report` (text, JSON, HTML).

The JSON form follows ``reproduce-report-schema.json``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CellVerdict", "REPORT_SCHEMA", "Report"]

REPORT_SCHEMA = os.path.join(os.path.dirname(__file__), "reproduce-report-schema.json")

PASS = ("reproduced",)


@dataclass
class CellVerdict:
    """What became of one `%%depin` cell."""

    index: int
    name: str | None
    verdict: str    # reproduced | differs | code changed | missing in store | failed | tampered
    detail: str = ""
    published_run: str | None = None
    reproduced_run: str | None = None
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    published_hardware: dict[str, Any] | None = None
    reproduced_hardware: dict[str, Any] | None = None
    same_class: bool | None = None
    comparison: str = ""


@dataclass
class Report:
    """The whole verdict; ``ok`` only when the store verified, nothing was refused and every cell reproduced."""

    notebook: str
    store: str
    verified: bool
    cells: list[CellVerdict] = field(default_factory=list)
    error: str | None = None
    refused: list[dict[str, Any]] = field(default_factory=list)
    isolation: dict[str, Any] = field(default_factory=dict)
    signer: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return (self.verified and self.error is None and not self.refused
                and all(c.verdict in PASS for c in self.cells))

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
            if c.published_hardware or c.reproduced_hardware:
                sides = (f"published on {(c.published_hardware or {}).get('class')}; reproduced on "
                         f"{(c.reproduced_hardware or {}).get('class')}; {c.comparison}")
                rows.append(f"<tr><td></td><td></td><td>hardware</td><td></td><td>{escape(sides)}</td></tr>")
        problems = ([self.error] if self.error else []) + [f"cell {r['index']}: {r['reason']}" for r in self.refused]
        error = f"<pre>{escape(chr(10).join(problems))}</pre>" if problems else ""
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
        if self.signer:
            lines.append(f"  the author's claim: signed by {self.signer.get('name') or 'an unnamed author'}, "
                         f"key {self.signer.get('fingerprint')}")
        if self.error:
            lines.append(f"  {self.error}")
        for r in self.refused:
            lines.append(f"  cell {r['index']}: {r['reason']}")
        for c in self.cells:
            lines.append(f"  cell {c.index} ({c.name or 'unnamed'}): {c.verdict}{' - ' + c.detail if c.detail else ''}")
            for var, v in c.variables.items():
                lines.append(f"    {var}: {v['verdict']}{' (' + v['detail'] + ')' if v.get('detail') else ''}")
            if c.published_hardware or c.reproduced_hardware:
                pub, new = (c.published_hardware or {}).get("class"), (c.reproduced_hardware or {}).get("class")
                lines.append(f"    published on: {pub}")
                lines.append(f"    reproduced on: {new}" + ("" if c.same_class is None else
                             " (same hardware class)" if c.same_class else " (another hardware class)"))
            if c.comparison:
                lines.append(f"    compared: {c.comparison}")
        if self.isolation:
            lines.append(f"  re-executed: {self.isolation.get('mode')}; "
                         + "; ".join(self.isolation.get("protected", [])))
        return "\n".join(lines)

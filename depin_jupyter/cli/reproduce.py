"""`depin reproduce NOTEBOOK --store STORE`: re-execute a published notebook and say what reproduced."""

from __future__ import annotations

import json

import click

from . import main


@main.command()
@click.argument("notebook", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", "store", required=True, help="the published result store (path or URL)")
@click.option("--cluster", default=None, metavar="ADDRESS", help="scheduler to re-execute on (default: embedded)")
@click.option("--rtol", default=1e-7, show_default=True, help="relative tolerance for floats")
@click.option("--atol", default=0.0, show_default=True, help="absolute tolerance for floats")
@click.option("--report", "report_file", default=None, type=click.Path(dir_okay=False), help="write the JSON report")
def reproduce(notebook: str, store: str, cluster: str | None, rtol: float, atol: float,
              report_file: str | None) -> None:
    """Verify STORE, re-run NOTEBOOK with the cache off, compare every %%depin run; exit 0 only if all reproduced."""
    from ..reproduce import reproduce as run

    report = run(notebook, store, rtol=rtol, atol=atol, cluster=cluster)
    click.echo(report.format())
    if report_file:
        with open(report_file, "w") as f:
            json.dump(report.to_json(), f, indent=2, default=str)
    raise SystemExit(0 if report.ok else 1)

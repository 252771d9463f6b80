"""`depin reproduce NOTEBOOK --store STORE`: re-execute a published notebook and say what reproduced."""

from __future__ import annotations

import json

import click

from depin_jupyter.cli.group import main


@main.command()
@click.argument("notebook", type=click.Path(exists=True))
@click.option("--store", "store", default=None, help="the published result store (path or URL; a bundle has its own)")
@click.option("--cluster", default=None, metavar="ADDRESS|TOKEN",
              help="scheduler address or volunteer-network client token to re-execute on (default: embedded)")
@click.option("--rtol", default=1e-7, show_default=True, help="relative tolerance for floats")
@click.option("--atol", default=0.0, show_default=True, help="absolute tolerance for floats")
@click.option("--report", "report_file", default=None, type=click.Path(dir_okay=False),
              help="write the report: FILE.json and FILE.html (either name may be given)")
def reproduce(notebook: str, store: str | None, cluster: str | None, rtol: float, atol: float,
              report_file: str | None) -> None:
    """Verify the store, re-run NOTEBOOK (or a `depin publish` BUNDLE) with the cache off, compare every
    %%depin run; exit 0 only if all reproduced."""
    import pathlib

    from depin_jupyter.reproduce.publish import open_bundle, verify_files
    from depin_jupyter.reproduce.rerun import reproduce as run

    bundle = open_bundle(notebook)
    if bundle is not None:
        bad = verify_files(bundle)
        if bad:
            click.echo(f"error: the bundle's files differ from its RO-Crate record: {', '.join(bad)}; "
                       f"nothing was re-executed", err=True)
            raise SystemExit(1)
        notebook, store = str(bundle.notebook), store or str(bundle.store)
    elif pathlib.Path(notebook).is_dir():
        raise click.UsageError(f"{notebook} is a directory without {'ro-crate-metadata.json'}: give a notebook "
                               f"or a bundle written by `depin publish`")
    if store is None:
        raise click.UsageError("--store is required with a notebook (a bundle carries its own)")
    report = run(notebook, store, rtol=rtol, atol=atol, cluster=cluster)
    click.echo(report.format())
    if report_file:
        base = pathlib.Path(report_file)
        base = base.with_suffix("") if base.suffix in (".json", ".html") else base
        base.with_suffix(".json").write_text(json.dumps(report.to_json(), indent=2, default=str))
        base.with_suffix(".html").write_text(report.to_html())
        click.echo(f"report: {base.with_suffix('.json')} and {base.with_suffix('.html')}", err=True)
    raise SystemExit(0 if report.ok else 1)


@main.command()
@click.argument("notebook", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", "store", required=True, help="the result store the notebook's runs are in")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="bundle directory to write")
@click.option("--overwrite", is_flag=True, help="replace a non-empty OUT")
def publish(notebook: str, store: str, out: str, overwrite: bool) -> None:
    """Write NOTEBOOK, its verified STORE, an environment lock and RO-Crate metadata to OUT."""
    from depin_jupyter.errors import DepinError
    from depin_jupyter.reproduce.publish import publish as run

    try:
        bundle = run(notebook, store, out, overwrite=overwrite)
    except DepinError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"published {bundle.notebook.name} with {len(bundle.runs)} run(s) to {bundle.path} "
               f"(check it with `depin verify {bundle.path}`, re-execute with `depin reproduce {bundle.path}`)")

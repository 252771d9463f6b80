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
@click.option("--exact-same-class", is_flag=True,
              help="demand bit-identical values where both runs are of one hardware class (tolerance across classes)")
@click.option("--sandbox", is_flag=True,
              help="re-execute in a sandbox (bubblewrap when it works here, else a child with a scratch HOME and a "
                   "minimal environment) so the author's code cannot touch your files")
@click.option("--key", "keys", multiple=True, metavar="FINGERPRINT",
              help="a bundle must be signed by this key (the author's); repeatable")
@click.option("--report", "report_file", default=None, type=click.Path(dir_okay=False),
              help="write the report: FILE.json and FILE.html (either name may be given)")
def reproduce(notebook: str, store: str | None, cluster: str | None, rtol: float, atol: float,
              exact_same_class: bool, sandbox: bool, keys: tuple[str, ...], report_file: str | None) -> None:
    """Verify the store, re-run NOTEBOOK (or a `depin publish` BUNDLE) with the cache off where it cannot read the
    published results, compare every %%depin run; exit 0 only if all reproduced.

    The notebook is the author's code and runs with your rights unless --sandbox is given."""
    import pathlib

    from depin_jupyter.reproduce.publish import open_bundle
    from depin_jupyter.reproduce.rerun import reproduce as run
    from depin_jupyter.reproduce.rerun import reproduce_bundle

    if open_bundle(notebook) is not None:
        if store is not None:
            raise click.UsageError("a bundle carries its own store: leave out --store")
        report = reproduce_bundle(notebook, keys=keys, rtol=rtol, atol=atol, cluster=cluster, sandbox=sandbox,
                                  exact_same_class=exact_same_class)
    elif pathlib.Path(notebook).is_dir():
        raise click.UsageError(f"{notebook} is a directory without {'ro-crate-metadata.json'}: give a notebook "
                               f"or a bundle written by `depin publish`")
    elif store is None:
        raise click.UsageError("--store is required with a notebook (a bundle carries its own)")
    else:
        report = run(notebook, store, rtol=rtol, atol=atol, cluster=cluster, sandbox=sandbox,
                     exact_same_class=exact_same_class)
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
@click.option("--license", "license", default=None, help="SPDX id (CC-BY-4.0) or URL (default: depin.publish.license)")
@click.option("--author", default=None, help="your name (default: depin.publish.author, else your key's name)")
@click.option("--author-id", default=None, help="your ORCID or other URL")
@click.option("--affiliation", default=None, help="your organization")
@click.option("--affiliation-url", default=None, help="its URL")
@click.option("--publisher", default=None, help="the publishing organization (default: the affiliation)")
@click.option("--publisher-url", default=None, help="its URL")
@click.option("--include", multiple=True, metavar="PATH", help="another file beside the notebook to ship (repeatable)")
@click.option("--unsigned", is_flag=True, help="do not sign (reviewers then cannot tell whose claim it is)")
def publish(notebook: str, store: str, out: str, overwrite: bool, unsigned: bool, include: tuple[str, ...],
            **who: str | None) -> None:
    """Write NOTEBOOK, its verified STORE, its declared files, an environment lock, RO-Crate metadata and your
    signature (`depin key create`) to OUT."""
    from depin_jupyter.errors import DepinError
    from depin_jupyter.reproduce.publish import publish as run

    try:
        bundle = run(notebook, store, out, overwrite=overwrite, unsigned=unsigned, include=include, **who)
    except DepinError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"published {bundle.notebook.name} with {len(bundle.runs)} run(s) to {bundle.path} "
               f"(check it with `depin verify {bundle.path}`, re-execute with `depin reproduce {bundle.path}`)")

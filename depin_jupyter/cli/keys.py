"""`depin key create` / `depin key show`: the author's signing key for `depin publish`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from depin_jupyter.cli.group import main

if TYPE_CHECKING:
    from depin_jupyter.reproduce.signing import SigningKey


@main.group()
def key() -> None:
    """The Ed25519 key that signs your bundles (in depin.keys.dir, default ~/.config/depin/keys)."""


def _describe(k: SigningKey) -> None:
    click.echo(f"fingerprint: {k.fingerprint}")
    click.echo(f"public key:  {k.public_b64}")
    click.echo(f"name:        {k.name or '-'}")
    click.echo(f"private key: {k.path} (mode 0600: never share it)")


@key.command()
@click.option("--name", default=None, help="your name, written into the bundles you sign (their RO-Crate author)")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="where to keep it (default: depin.keys.dir)")
@click.option("--force", is_flag=True, help="replace an existing key (bundles signed with it keep naming the old one)")
def create(name: str | None, directory: str | None, force: bool) -> None:
    """Make a new signing key; publish its fingerprint where readers of your work find it (paper, README, ORCID)."""
    from depin_jupyter.errors import DepinError
    from depin_jupyter.reproduce.signing import create_key

    try:
        k = create_key(directory, name=name, force=force)
    except DepinError as e:
        raise click.ClickException(str(e)) from None
    _describe(k)


@key.command()
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="where the key is (default: depin.keys.dir)")
def show(directory: str | None) -> None:
    """Print the key's fingerprint and public key (what reviewers pass to `depin verify --key`)."""
    from depin_jupyter.errors import DepinError
    from depin_jupyter.reproduce.signing import load_key

    try:
        k = load_key(directory)
    except DepinError as e:
        raise click.ClickException(str(e)) from None
    _describe(k)

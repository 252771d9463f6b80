"""The `depin` click group itself; each module of `depin_jupyter.cli` adds its commands to it."""

from __future__ import annotations

import click

from depin_jupyter.version import __version__

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="depin")
def main() -> None:
    """depin-jupyter: run notebook cells on volunteer GPUs, store and verify the results."""

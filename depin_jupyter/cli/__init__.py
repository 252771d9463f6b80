"""The `depin` command line: one click group, one module per command group.

Imports stay lazy: each command imports dask/zarr inside its body, so `depin --help` is instant.
"""

from __future__ import annotations

import click

from depin_jupyter import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="depin")
def main() -> None:
    """depin-jupyter: run notebook cells on volunteer GPUs, store and verify the results."""


def _register() -> None:
    from depin_jupyter.cli import demo, jobs, network, reproduce  # noqa: F401  (each module adds its commands to `main`)

    try:
        from depin_jupyter.cli import store  # noqa: F401
    except ImportError:  # the store commands land with the store module
        pass


_register()

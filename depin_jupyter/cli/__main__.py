"""`python -m depin_jupyter.cli` runs the `depin` command."""

from depin_jupyter.cli import main

main()

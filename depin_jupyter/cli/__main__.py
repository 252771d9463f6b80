"""`python -m depin_jupyter.cli` runs the `depin` command."""

from . import main

main()

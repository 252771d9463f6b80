"""The package's version (read by hatch at build time, and by `depin --version` and published crates)."""

__version__ = "0.1.0"

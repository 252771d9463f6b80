"""Reviewing published work: `publish` bundles a notebook with its store, `reproduce` re-executes and judges it."""

from __future__ import annotations

from depin_jupyter.reproduce.publish import open_bundle, publish, verify_files
from depin_jupyter.reproduce.rerun import Report, reproduce

__all__ = ["Report", "open_bundle", "publish", "reproduce", "verify_files"]

"""`depin runs`, `depin show`, `depin load`, `depin verify`: read and check a result store from the shell.

Exit codes: 0 success; 1 a mismatch (verify) or a run that is not complete (show); 2 the store
cannot be opened or the arguments are wrong.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from depin_jupyter.cli.group import main


def _open(url: str | None) -> Any:
    """The store at ``url`` (or depin.store.url / ./depin-results.zarr), opened read-only."""
    from depin_jupyter.store import StoreAccessError, open_store

    try:
        return open_store(url, create=False, writable=False)
    except StoreAccessError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _resolve(rs: Any, run: str) -> str:
    """The run id ``run`` names: itself, or the one run it is a unique prefix of."""
    matches = [s.run_id for s in rs.runs() if s.run_id.startswith(run)]
    return matches[0] if len(matches) == 1 else run


@main.command()
@click.argument("store", required=False)
def runs(store: str | None) -> None:
    """List the runs in STORE (default: depin.store.url or ./depin-results.zarr)."""
    rs = _open(store)
    rows = [("RUN", "NAME", "STATUS", "COMPLETE", "OUTPUTS", "CREATED")]
    for s in rs.runs():
        rows.append((s.run_id, s.name or "-", s.status, "yes" if s.complete else "no",
                     ",".join(s.outputs) or "-", s.created or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if len(rows) == 1:
        click.echo(f"(no runs in {rs.url})")


def _elide(doc: dict[str, Any]) -> dict[str, Any]:
    """The manifest with per-chunk digest lists shortened to a count (shown with --full)."""
    def shorten(rec: dict[str, Any]) -> dict[str, Any]:
        rec = dict(rec)
        if "chunk_digests" in rec:
            rec["chunk_digests"] = f"<{len(rec['chunk_digests'])} chunk digests; --full shows them>"
        if "variables" in rec:
            rec["variables"] = {k: shorten(v) for k, v in rec["variables"].items()}
        return rec

    return {**doc, "outputs": {k: shorten(v) for k, v in doc["outputs"].items()}}


@main.command()
@click.argument("run")
@click.option("--store", "store", default=None, help="store path or URL (default: depin.store.url)")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.option("--full", is_flag=True, help="include every chunk digest")
def show(run: str, store: str | None, fmt: str, full: bool) -> None:
    """Print the manifest of RUN (an id or a unique prefix; incomplete runs are reported, exit 1)."""
    from depin_jupyter.store import RunIncompleteError, RunNotFoundError, StoreIntegrityError

    rs = _open(store)
    run = _resolve(rs, run)
    try:
        doc = rs.manifest(run).to_json()
    except RunNotFoundError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (RunIncompleteError, StoreIntegrityError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    doc = doc if full else _elide(doc)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(doc, sort_keys=False, width=100))
        extra = doc.get("extra") or {}
        if extra.get("energy"):
            from depin_jupyter.reports import energy_summary as summary

            click.echo(f"# energy: {summary(extra['energy'])}; pool: {extra.get('pool') or 'any'}")


@main.command()
@click.argument("store")
@click.option("--quiet", "-q", is_flag=True, help="print only mismatches and the verdict")
@click.option("--key", "keys", multiple=True, metavar="FINGERPRINT",
              help="a bundle must be signed by this key (the author's, as published with their work); repeatable")
def verify(store: str, quiet: bool, keys: tuple[str, ...]) -> None:
    """Re-hash every chunk, manifest and ledger entry of STORE and account for every file; for a `depin publish`
    BUNDLE also check its signature, its files and that its ledger ends at the signed head. Exit 1 naming any
    mismatch."""
    from depin_jupyter.reproduce.publish import check

    result = check(store, keys=keys)
    if result is not None:
        for line in result.format().splitlines():
            if quiet and line.startswith(("incomplete ", "note ")):
                continue
            click.echo(line, err=line.startswith("MISMATCH"))
        sys.exit(0 if result.ok else 1)
    if keys:
        click.echo(f"error: {store} is not a bundle (no ro-crate-metadata.json): only bundles are signed", err=True)
        sys.exit(2)
    report = _open(store).verify()
    for line in report.format().splitlines():
        if quiet and line.startswith(("incomplete ", "note ")):
            continue
        click.echo(line, err=line.startswith("MISMATCH"))
    sys.exit(0 if report.ok else 1)


def _describe(value: Any) -> str:
    """One line for a loaded output: its type, and shape and dtype for arrays."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(value).__module__.split('.')[0]}.{type(value).__name__} shape={tuple(shape)} dtype={dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _save(out: str, name: str, value: Any) -> str:
    """Write one loaded output under ``out``: arrays as NAME.npy, JSON-able values as NAME.json."""
    import os

    import numpy as np

    os.makedirs(out, exist_ok=True)
    if isinstance(value, np.ndarray) and value.dtype != object:
        path = os.path.join(out, f"{name}.npy")
        np.save(path, value, allow_pickle=False)
        return path
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return "not saved (only arrays and JSON values are; open it with depin_jupyter.store.open_store)"
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        f.write(text)
    return path


@main.command()
@click.argument("run")
@click.argument("names", nargs=-1)
@click.option("--store", "store", default=None, help="store path or URL (default: depin.store.url)")
@click.option("--verify/--no-verify", default=None,
              help="re-hash every chunk against the manifest as it is read (default: depin.store.verify-on-read)")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="save each output to DIR/NAME.npy (arrays) or DIR/NAME.json (values)")
def load(run: str, names: tuple[str, ...], store: str | None, verify: bool | None, out: str | None) -> None:
    """Read the outputs of RUN (an id or a unique prefix; every output, or NAMES) and print what each is.
    With --verify a chunk whose bytes changed since the run was sealed stops the load, named (exit 1)."""
    from depin_jupyter import config
    from depin_jupyter.errors import DepinUsageError
    from depin_jupyter.store import RunIncompleteError, RunNotFoundError, StoreIntegrityError, UnsupportedOutputError

    check = bool(config.get("store.verify-on-read")) if verify is None else verify
    rs = _open(store)
    run = _resolve(rs, run)
    try:
        wanted = list(names) or list(rs.manifest(run).outputs)
        for name in wanted:
            try:
                value = rs.load(run, [name], lazy=False, verify=check)[name]
            except UnsupportedOutputError as exc:
                click.echo(f"{name}: skipped: {exc}")
                continue
            saved = f" -> {_save(out, name, value)}" if out else ""
            click.echo(f"{name}: {_describe(value)}{saved}")
    except (RunNotFoundError, DepinUsageError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (RunIncompleteError, StoreIntegrityError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if check:
        click.echo(f"verified: every chunk read matched its digest in run {run}")

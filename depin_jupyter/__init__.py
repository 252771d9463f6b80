"""depin-jupyter: run notebook cells on a Dask(-CUDA) cluster of volunteer GPUs.

Importing the package is cheap: dask, distributed and zarr are imported only when a magic or
command needs them.
"""

from __future__ import annotations

from depin_jupyter.version import __version__

__all__ = ["__version__", "attach_map", "load_ipython_extension", "map", "unload_ipython_extension", "xp"]


def xp():  # type: ignore[no-untyped-def]
    """The array module for this process: cupy where a GPU is usable, numpy otherwise."""
    from depin_jupyter.gpu import array_module

    return array_module()


def map(func, items, *, name=None, batch=None, retries=2, out=None, pool=None, replicas=None,  # type: ignore[no-untyped-def]  # noqa: A001
        timeout=None, wait=True):
    """Run ``func`` on every item on the pool, in batches (one `%%depin` cell each); a `MapHandle`.

    On a volunteer network each batch runs sandboxed on a volunteer, replicated and judged as a cell is.
    ``out``: a Zarr group path where numeric results stream in as they arrive (``values``, ``done``).
    Items that fail are retried ``retries`` times, then named in ``handle.errors``. The finished map is one
    run in the result store (``handle.run_id``; values, done, errors, with provenance). ``wait=False``
    returns at once (``handle.result()`` waits). Connects to the embedded default cluster if no
    `%depin connect` was made.
    """
    from depin_jupyter.kernel.cluster import get_session
    from depin_jupyter.kernel.mapping import map_items
    from depin_jupyter.kernel.records import RunOptions
    from depin_jupyter.kernel.widgets import make_progress

    label = name or getattr(func, "__name__", "map")
    options = RunOptions(pool=pool, replicas=replicas, timeout=timeout)
    progress = make_progress(label) if wait else None  # a map left running shows nothing by itself
    try:
        return map_items(get_session(), func, items, name=label, batch=batch, retries=retries, out=out,
                         options=options, progress=progress, wait_done=wait)
    finally:
        if progress is not None:
            progress.close()


def attach_map(name, *, timeout=None, out=None):  # type: ignore[no-untyped-def]
    """The map ``name`` an earlier kernel of this identity started on the volunteer network (it died or was
    closed mid-map): waits for the batches still running and returns a finished `MapHandle` with every item
    that has a result (the coordinator kept them all, also those the old kernel had received)."""
    from depin_jupyter.kernel.cluster import get_session
    from depin_jupyter.kernel.mapping import attach

    return attach(get_session(), name, timeout=timeout, out=out)


def load_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """`%load_ext depin_jupyter`: register `%%depin` and `%depin`."""
    from depin_jupyter.kernel.magics import DepinMagics, bind_finished_runs

    ipython.register_magics(DepinMagics)
    # Finished background runs are bound before the next cell runs, never while one runs.
    ipython.events.register("pre_run_cell", bind_finished_runs)


def unload_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """`%unload_ext depin_jupyter`: close the session's cluster connection."""
    from depin_jupyter.kernel.cluster import close_session
    from depin_jupyter.kernel.magics import bind_finished_runs

    try:
        ipython.events.unregister("pre_run_cell", bind_finished_runs)
    except ValueError:
        pass
    close_session()


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt JupyterLab extension shipped in the package (sidebar, status bar, command)."""
    return [{"src": "labextension", "dest": "depin-jupyter"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The Jupyter server extension: JSON routes under {base_url}depin/ for the JupyterLab panel."""
    return [{"module": "depin_jupyter"}]


def _load_jupyter_server_extension(server_app):  # type: ignore[no-untyped-def]
    """Register the routes; dask/distributed/zarr are imported only when a route is first used."""
    from depin_jupyter.server import load

    load(server_app)

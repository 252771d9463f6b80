"""Inside a cell, Dask collections use the whole cluster: the scheduler `output.install` sets for the worker.

While the cell waits for them it gives up its worker slot (`secede`/`rejoin`), so cells waiting on other
work never deadlock."""

from __future__ import annotations

from typing import Any

from depin_jupyter.worker.runs import current

__all__ = ["cluster_get"]


def cluster_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Dask's ``get`` for the worker process: the cluster inside a cell, what Dask would use outside one."""
    from distributed import get_client, rejoin, secede

    if current() is None:
        # Not inside a cell: what Dask would do without this setting. (A worker that lives in another
        # program's process, `LocalCluster(processes=False)`, shares its dask config with that program.)
        try:
            client = get_client()
        except ValueError:  # no worker and no default client here: the local threaded scheduler
            import dask.threaded

            return dask.threaded.get(dsk, keys, **kwargs)
        return client.get(dsk, keys, **kwargs)
    client = get_client()
    secede()
    try:
        return client.get(dsk, keys, **kwargs)
    finally:
        rejoin()

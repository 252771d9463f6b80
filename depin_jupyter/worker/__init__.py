"""The worker side: what runs in a Dask worker (and a volunteer's sandboxed child) to execute a cell."""

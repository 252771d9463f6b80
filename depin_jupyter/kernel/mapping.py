"""`depin_jupyter.map(func, items)`: one function over many items, spread over the pool in batches.

Each batch is a `%%depin` cell of its own (`runner.run_cell`), so it gets what a cell gets: on a volunteer
network it goes through the coordinator, runs sandboxed on a volunteer and is replicated and judged as
any cell is (nothing a volunteer sends is unpickled here); on a trusted cluster it is a Dask task. One
sandbox process serves a whole batch (one submitter, one function). Items whose function raised, and
batches that failed as a whole (a worker lost past its retries, a sandbox limit), go back into the queue
up to ``retries`` times, then are named with their error; the others are usable meanwhile. Numeric
results stream into one Zarr array as batches finish (``out``), readable by plain zarr. A finished map is
recorded as one run in the provenance store (`_record`): its code, the digests of its function and items, every
item's value, which are done, and the errors of the others, with a ledger entry like any cell's.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from depin_jupyter.errors import DepinUsageError
from depin_jupyter.kernel.records import Progress, RunOptions
from depin_jupyter.protocol.constants import ENDED_STATES

__all__ = ["MapHandle", "attach", "map_cell", "map_items"]

_PROGRESS_EVERY_S = 1.0  # the progress line is redrawn at most this often
_DETACHED_SLOTS = 256    # batches of a map on a volunteer network submitted at once (all of them, up to this)

# Each batch binds which items it ran, of how many (a name of its own: an input bound again unchanged does not
# travel back): a kernel attaching to the map later reads them from the batch's result.
_BATCH_CODE = """\
depin_at = [list(depin_index), int(depin_n)]
depin_out = []
for depin_x in depin_items:
    try:
        depin_out.append((True, depin_f(depin_x)))
    except Exception as depin_e:
        depin_out.append((False, f"{type(depin_e).__name__}: {depin_e}"))
"""

_CELL_BATCH_CODE = """\
depin_at = [list(depin_index), int(depin_n)]
depin_out = []
for depin_x in depin_items:
    depin_ns = dict(globals())
    depin_ns[depin_name] = depin_x
    try:
        exec(compile(depin_body, depin_label, "exec"), depin_ns)
        depin_out.append((True, {depin_k: depin_ns.get(depin_k) for depin_k in depin_outs
                                 if type(depin_ns.get(depin_k)).__name__ != "module"}))
    except Exception as depin_e:
        depin_out.append((False, f"{type(depin_e).__name__}: {depin_e}"))
"""
"""A `%%depin --map NAME=ITEMS` batch: the cell's body once per item, in a namespace of its own holding the
cell's inputs and NAME bound to the item; what it binds is collected per item."""


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every batch of one map runs: its code, the names it is sent besides ``depin_items``."""

    code: str
    env: dict[str, Any]
    source: str = ""  # what the user wrote: the function's source, or the cell's body (provenance)


class MapHandle:
    """A running (or finished) map: its results, errors and progress; `result()` waits for it."""

    def __init__(self, name: str, n: int, out: str | None) -> None:
        self.name, self.n, self.out = name, n, out
        self.results: list[Any] = [None] * n
        self.done = [False] * n
        self.errors: dict[int, str] = {}       # item index -> its last error, once its retries are spent
        self.attempts = [0] * n
        self.workers: set[str] = set()          # who ran its batches
        self.running = 0
        self.finished = threading.Event()
        self.cancelled = False
        self.elapsed: float | None = None       # seconds, once finished
        self.run_id: str | None = None          # its run in the provenance store, once recorded
        self._session: Any = None               # where its batches run (what `cancel` cancels them on)
        self._array: Any = None
        self._mask: Any = None

    @property
    def n_done(self) -> int:
        return sum(self.done)

    def status(self) -> str:
        return (f"{self.n_done}/{self.n} done, {self.running} batch(es) running, {len(self.errors)} failed, "
                f"{len(self.workers)} worker(s) used")

    def result(self, timeout: float | None = None) -> list[Any]:
        """Every item's result in order once the map ends; raises naming the failed items if any failed."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"map {self.name!r} is still running ({self.status()})")
        if self.errors:
            first = min(self.errors)
            raise RuntimeError(f"map {self.name!r}: {len(self.errors)} of {self.n} item(s) failed, e.g. item "
                               f"{first}: {self.errors[first]}. Their results are None in .results; the "
                               f"others are usable.")
        return list(self.results)

    def cancel(self) -> int:
        """Stop the map: no more batches are submitted and those queued or running on the pool are cancelled
        (their workers stop them); the items done so far stay. The number of batches cancelled."""
        self.cancelled = True
        return self._cancel_listed()

    def _cancel_listed(self) -> int:
        """Cancel this map's batches the pool lists as queued or running (the map's driver calls this again
        while batches come back: one submitted just before `cancel` may be listed only a moment later)."""
        if self._session is None or self.finished.is_set():
            return 0
        from depin_jupyter.kernel.jobs import cancel_jobs, list_jobs

        session = self._session
        mine = [j for j in list_jobs(session.client, session.untrusted) if j.map_name == self.name
                and j.state not in ENDED_STATES]
        return len(cancel_jobs(session.client, mine, session.untrusted))

    def _store(self, index: int, value: Any) -> None:
        """Write one numeric result into the Zarr array (created from the first one)."""
        if self.out is None:
            return
        import numpy as np

        arr = np.asarray(value)
        if not _numeric(arr):
            return
        if self._array is None:
            import zarr

            group = zarr.open_group(self.out, mode="w")
            group.attrs.update({"depin_map": self.name, "items": self.n})
            self._array = group.create_array("values", shape=(self.n, *arr.shape), dtype=arr.dtype,
                                             chunks=(max(1, min(self.n, 1024)), *arr.shape), fill_value=0)
            self._mask = group.create_array("done", shape=(self.n,), dtype=bool, chunks=(max(1, min(self.n, 1024)),),
                                            fill_value=False)
        if arr.shape != self._array.shape[1:] or not np.can_cast(arr.dtype, self._array.dtype, "same_kind"):
            return  # another shape or kind than the first result: kept in .results only
        self._array[index] = arr
        self._mask[index] = True


def map_items(session: Any, func: Callable[[Any], Any], items: Iterable[Any], *, name: str = "map",
              batch: int | None = None, retries: int = 2, out: str | None = None, options: RunOptions | None = None,
              progress: Progress | None = None, wait_done: bool = True) -> MapHandle:
    """Run ``func`` over ``items`` on ``session``'s pool; the handle (finished when ``wait_done``)."""
    if not callable(func):
        raise DepinUsageError(f"depin map: {func!r} is not callable; pass the function first, then the items")
    return _run_map(session, _Job(_BATCH_CODE, {"depin_f": func}, _source(func)), items, name=name, batch=batch,
                    retries=retries, out=out, options=options, progress=progress, wait_done=wait_done)


def map_cell(session: Any, body: str, var: str, items: Iterable[Any], namespace: dict[str, Any], *,
             name: str = "cell", batch: int | None = None, retries: int = 2, options: RunOptions | None = None,
             progress: Progress | None = None) -> tuple[MapHandle, tuple[str, ...]]:
    """`%%depin --map VAR=ITEMS`: run the cell ``body`` once per item with ``var`` bound to it; the finished
    handle (each result a dict of what the body bound) and the names the body binds, in order."""
    from depin_jupyter.cell import analyze

    try:
        plan = analyze(body)
    except SyntaxError as e:
        raise DepinUsageError(f"%%depin --map: the cell does not parse (line {e.lineno}: {e.msg})") from None
    outs = tuple(n for n in plan.binds if n != var and not n.startswith("depin_"))
    if not outs:
        raise DepinUsageError(f"%%depin --map {var}=...: the cell binds no name, so there is nothing to collect "
                              f"per item; assign what each item yields (e.g. `y = f({var})`)")
    env = {k: namespace[k] for k in plan.inputs(namespace) if k != var}
    job = _Job(_CELL_BATCH_CODE, {**env, "depin_body": body, "depin_name": var, "depin_outs": outs,
                                  "depin_label": f"<{name}>"}, body)
    handle = _run_map(session, job, items, name=name, batch=batch, retries=retries, out=None, options=options,
                      progress=progress, wait_done=True)
    return handle, outs


def _run_map(session: Any, job: _Job, items: Iterable[Any], *, name: str, batch: int | None, retries: int,
             out: str | None, options: RunOptions | None, progress: Progress | None, wait_done: bool) -> MapHandle:
    """Drive the batches of one map (one `%%depin` cell each) until every item is done or failed."""
    values = list(items)
    handle = MapHandle(name, len(values), out)
    handle._session = session
    if not values:
        handle.finished.set()
        return handle
    n_workers = max(1, len(session.workers(max_age=0)))
    size = batch or max(1, min(64, math.ceil(len(values) / (4 * n_workers))))
    base = options or RunOptions()
    progress = progress or Progress()
    queue: list[list[int]] = [list(range(i, min(i + size, len(values)))) for i in range(0, len(values), size)]
    # On a volunteer network every batch is submitted at once as a detached run the coordinator keeps, with
    # its result, until the map ends: the map outlives this kernel, and a new one attaches (`attach`).
    detach = bool(getattr(session, "untrusted", False))
    slots = max(2 * n_workers, min(len(queue), _DETACHED_SLOTS)) if detach else 2 * n_workers
    used: list[str] = []  # the batches' run names (released on the coordinator when the map ends)

    def run_batch(indices: list[int], serial: int) -> tuple[list[int], Any, str | None]:
        used.append(f"{name}[{serial}]")
        return _run_batch(session, job, values, indices, dataclasses.replace(base, name=used[-1], detached=detach))

    def collect(indices: list[int], got: Any, failure: str | None) -> None:
        again = []
        out_list, worker = got if got is not None else (None, None)
        if out_list is None and failure is None:
            failure = "the batch ran but its results did not come back (a value that cannot travel?)"
        if worker:
            handle.workers.add(str(worker))
        for k, i in enumerate(indices):
            handle.attempts[i] += 1
            ok, value = (False, failure) if out_list is None or k >= len(out_list) else out_list[k]
            if ok:
                handle.results[i], handle.done[i] = value, True
                handle.errors.pop(i, None)
                handle._store(i, value)
            elif handle.attempts[i] <= retries:
                again.append(i)
            else:
                handle.errors[i] = str(value)
        if again:
            queue.append(again)

    def drive() -> None:
        serial, shown = 0, 0.0
        with ThreadPoolExecutor(slots, thread_name_prefix=f"depin-map-{name}") as pool:
            pending: set[Future[Any]] = set()
            while (queue and not handle.cancelled) or pending:
                while queue and len(pending) < slots and not handle.cancelled:
                    pending.add(pool.submit(run_batch, queue.pop(0), serial))
                    serial += 1
                handle.running = len(pending)
                if time.perf_counter() - shown >= _PROGRESS_EVERY_S:
                    progress.update("running", f"map {name}: {handle.status()}")
                    shown = time.perf_counter()
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for f in finished:
                    collect(*f.result())
                if handle.cancelled and pending:
                    handle._cancel_listed()
        handle.running = 0
        handle.elapsed = time.perf_counter() - started
        if detach:
            _release(session, used)
        for i in range(handle.n):
            if not handle.done[i] and (i not in handle.errors or handle.cancelled):
                handle.errors[i] = "cancelled (its map was cancelled before it ran or while it ran)"
        progress.update("failed" if handle.errors else "done", f"map {name}: {handle.status()}")
        handle.run_id = _recorded(handle, job, values, base, batch=size, retries=retries)
        handle.finished.set()

    started = time.perf_counter()
    if wait_done:
        drive()
    else:
        threading.Thread(target=drive, name=f"depin-map-{name}", daemon=True).start()
    return handle


def _run_batch(session: Any, job: _Job, values: list[Any], indices: list[int],
               options: RunOptions) -> tuple[list[int], Any, str | None]:
    """One batch as a `%%depin` cell: (its indices, (per-item results, worker) or None, why it failed)."""
    from depin_jupyter.kernel import runner

    ns: dict[str, Any] = {**job.env, "depin_items": [values[i] for i in indices], "depin_index": indices,
                          "depin_n": len(values)}
    opts = dataclasses.replace(options, outputs=("depin_out", "depin_at"), no_store=True,
                               inputs=(*job.env, "depin_items", "depin_index", "depin_n"))
    try:
        outcome = runner.run_cell(session, job.code, ns, opts)
    except Exception as e:  # noqa: BLE001 - the whole batch failed: its items are retried
        return indices, None, f"{type(e).__name__}: {e}"
    return indices, (ns.get("depin_out"), outcome.worker), None


def _source(func: Callable[..., Any]) -> str:
    """The function's source where Python can find it (a notebook cell's too), for the run's provenance."""
    import inspect

    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return f"# source of {getattr(func, '__qualname__', func)!r} not available"


def _numeric(arr: Any) -> bool:
    """Whether an item's result (as a numpy array) is numbers a Zarr array holds: bool, int, float, complex."""
    return arr.dtype.kind in "biufc" and not arr.dtype.hasobject


def _stacked(values: list[Any], done: list[bool]) -> Any:
    """The items' values as one array (zeros where not done) when every done one is a number or an array of
    one shape and kind; else the list itself."""
    import numpy as np

    try:
        arrays = [np.asarray(v) for v, ok in zip(values, done, strict=True) if ok]
    except Exception:  # noqa: BLE001 - a value numpy cannot look at: stored as it is, or named not stored
        return list(values)
    if not arrays or any(not _numeric(a) or a.shape != arrays[0].shape for a in arrays):
        return list(values)
    out = np.zeros((len(values), *arrays[0].shape), dtype=np.result_type(*arrays))
    for i, (v, ok) in enumerate(zip(values, done, strict=True)):
        if ok:
            out[i] = v
    return out


def _recorded(handle: MapHandle, job: _Job, values: list[Any], options: RunOptions, *, batch: int,
              retries: int) -> str | None:
    """`_record`, or None with a line saying why it failed (the results stay usable in the handle)."""
    try:
        return _record(handle, job, values, options, batch=batch, retries=retries)
    except Exception as e:  # noqa: BLE001 - a store that fails must not lose the map's results
        print(f"depin: map {handle.name!r} was not recorded in the store: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _record(handle: MapHandle, job: _Job, values: list[Any], options: RunOptions, *, batch: int,
            retries: int) -> str | None:
    """The finished map as one run in the provenance store (None when the store is off): ``values`` (one
    array when the results are numbers of one shape, else the list; the cell form: each name its body
    binds, so), ``done`` and the failed items' ``errors``, the code (what the user wrote and the batch
    runner), the content digests of the function and the items, and a ledger entry, as for any cell; its
    run id."""
    import numpy as np

    from depin_jupyter.kernel.shipping import fingerprints
    from depin_jupyter.store import UnsupportedOutputError, persist

    store = persist.open_for(options)
    if store is None:
        return None
    env = {**job.env, "depin_items": values}
    hashes = fingerprints(env, sorted(env))
    code = f"# depin map {handle.name!r} over {handle.n} item(s)\n{job.source.rstrip()}\n# each batch runs:\n{job.code}"
    writer = store.begin_run(code=code, inputs=hashes, options={**persist.result_options(options), "batch": batch,
                                                                "retries": retries}, cache_key=None,
                             name=f"map {handle.name}")
    names = job.env.get("depin_outs")
    if names:  # the cell form: a result is a dict of what the body bound
        columns = {n: [r.get(n) if isinstance(r, dict) else None for r in handle.results] for n in names}
    else:
        columns = {"values": list(handle.results)}
    done_name, errors_name = ("depin_done" if "done" in columns else "done",
                              "depin_errors" if "errors" in columns else "errors")  # a cell may bind those
    not_stored = []
    try:
        for out_name, column in columns.items():
            try:
                writer.write_output(out_name, _stacked(column, handle.done))
            except UnsupportedOutputError as e:
                not_stored.append(f"{out_name} ({e})")
        writer.write_output(done_name, np.array(handle.done, dtype=bool))
        if handle.errors:
            writer.write_output(errors_name, {str(i): msg for i, msg in sorted(handle.errors.items())})
    except Exception as e:
        writer.abort(f"the map's results could not be written: {type(e).__name__}: {e}")  # marked, never served
        raise
    extra: dict[str, Any] = {"map": {"items": handle.n, "done": handle.n_done, "failed": len(handle.errors),
                                     "cancelled": handle.cancelled, "workers": sorted(handle.workers)}}
    if not_stored:
        extra["not_stored"] = not_stored
    pool = f"the pool: {len(handle.workers)} worker(s)"  # who ran what is in extra.map.workers
    writer.finish(status="error" if handle.errors else "ok", worker={"host": pool},
                  timings={"total": handle.elapsed or 0.0}, extra=extra)
    return str(writer.run_id)


def _release(session: Any, names: list[str]) -> None:
    """Let the coordinator forget a map's batches (it kept them for a kernel that might attach)."""
    from depin_jupyter.protocol.rpc import Coordinator

    try:
        Coordinator.of_client(session.client).release_cells(sorted(set(names)))
    except Exception:  # noqa: BLE001, S110 - the coordinator may be gone; it forgets them after result-ttl
        pass


def attach(session: Any, name: str, *, timeout: float | None = None, out: str | None = None) -> MapHandle:
    """The map ``name`` a kernel of this identity left on a volunteer network's coordinator (it died, or
    was closed, mid-map): waits for its batches still running, then every item's result, as a handle."""
    import re

    from depin_jupyter.protocol.rpc import Coordinator

    if not getattr(session, "untrusted", False):
        raise DepinUsageError("attach_map: only a volunteer network's coordinator keeps a map for a new kernel; "
                              "on a cluster of your own a map lives in the kernel that started it")
    coordinator = Coordinator.of_client(session.client)
    batch_name = re.compile(re.escape(name) + r"\[\d+\]")
    batches = [j for j in coordinator.jobs() if j.get("detached") and not j.get("replica")
               and batch_name.fullmatch(str(j.get("name")))]
    if not batches:
        raise DepinUsageError(f"attach_map: no map named {name!r} on the coordinator for this identity (it may "
                              f"have finished in its own kernel, or expired after depin.coordinator.result-ttl)")
    deadline = None if timeout is None else time.monotonic() + timeout
    answers = [coordinator.wait_ended(str(j["key"]), deadline, f"map {name!r} on the coordinator", keep=True)
               for j in batches]
    for job, answer in zip(batches, answers, strict=True):  # a big batch result is answered as its parts
        if answer.get("state") == "finished" and answer.get("payload") is None:
            answer["payload"] = coordinator.payload(str(job["key"]), answer)
    handle = _gathered(name, answers, out)
    _release(session, [str(j["name"]) for j in batches])
    return handle


def _gathered(name: str, answers: list[dict[str, Any]], out: str | None) -> MapHandle:
    """A finished handle from the batches' answers (decoded without pickle, as any volunteer's result)."""
    from depin_jupyter.kernel.binding import apply_results
    from depin_jupyter.protocol.payloads import from_payload

    got: list[tuple[list[int], list[Any]]] = []
    why: list[str] = []
    n = 0
    for answer in answers:
        ns: dict[str, Any] = {}
        if answer.get("state") == "finished" and answer.get("payload") is not None:
            apply_results(ns, from_payload(answer["payload"]), keep=lambda _: True, trusted=False)
        at = ns.get("depin_at")
        if isinstance(ns.get("depin_out"), list) and isinstance(at, list) and len(at) == 2:
            got.append(([int(i) for i in at[0]], ns["depin_out"]))
            n = max(n, int(at[1]))
        else:
            why.append(f"{answer.get('state')}: {answer.get('error') or 'no result'}")
    if not got:
        raise RuntimeError(f"map {name!r}: none of its {len(answers)} batch(es) left a result ({'; '.join(why)})")
    handle = MapHandle(name, n, out)
    for indices, outs in got:
        for i, (ok, value) in zip(indices, outs, strict=False):
            if ok:
                handle.results[i], handle.done[i] = value, True
                handle.errors.pop(i, None)  # a retry of an item that failed in another batch
                handle._store(i, value)
            elif not handle.done[i]:
                handle.errors[i] = str(value)
    lost = "; ".join(dict.fromkeys(why)) or "never submitted"
    for i in range(n):
        if not handle.done[i]:
            handle.errors.setdefault(i, f"its batch left no result ({lost})")
    handle.finished.set()
    return handle

"""Benchmark of the result store against raw files on the same disk; prints a table, writes JSON.

    python benchmarks/store.py [--size-mib 1024] [--repeats 3] [--dir DIR] [--fsync]

Measures, for a float32 array of random and of smooth data: store writes (uncompressed and zstd level
`depin.store.compression-level`, through `begin_run`/`write_output`/`finish`) and eager reads, plain and
verifying (every chunk re-hashed), against `ndarray.tofile`/`np.fromfile` and `np.save`/`np.load`; the
share of write time spent on digests, side by side for the candidates: BLAKE3 (the default) and SHA-256,
each hashed on worker threads as the chunks are written, vs no digests, vs BLAKE3 by reading back; the
CPU time of each hash over the data on one core; and cache-hit latency (`lookup_cache` + lazy `load`)
for 1 MiB and SIZE outputs, also with `depin.store.verify-on-read`. Candidates and baselines are
interleaved in one process after a warm-up round, each started with nothing dirty in the page cache;
medians are reported. Without ``--fsync`` writes land in the page cache (what a notebook waits for); with
it every writer's time includes syncing what it wrote to the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"write_vs_tofile": 0.8, "zstd_write_vs_tofile": 0.5, "read_vs_fromfile": 0.8, "cache_hit_ms": 50.0,
           "digest_share": 0.10}


Writer = tuple[Callable[[], None], Callable[[], None]]
"""(prepare, write): prepare (untimed) removes the previous output, so every writer starts alike."""


def _cpu() -> float:
    """CPU seconds of this process so far, all threads, user + kernel (page-cache copies are kernel time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn: Callable[[], Any], fsync: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn``, with a sync of everything written when ``fsync``."""
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    if fsync:
        os.sync()
    return time.perf_counter() - t0, _cpu() - c0


def _settle(nbytes: int) -> None:
    """Untimed, before every operation: write back what earlier ones left dirty in the page cache (so
    no writer pays for, or is throttled by, another's writeback), then fault in and free ``nbytes`` of
    memory (RECIPES §7: re-touching 1 GiB the VM host took back costs seconds)."""
    os.sync()
    np.ones(nbytes, dtype=np.uint8).sum()


def _check_shape(out: Any, shape: tuple[int, ...]) -> None:
    """A reader returned the whole array (dropped at once, so readers start with the same free memory)."""
    assert out.shape == shape


def _file_writer(path: str, write: Callable[[], None]) -> Writer:
    def prepare() -> None:
        if os.path.exists(path):
            os.remove(path)
    return prepare, write


def _data(kind: str, n: int) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(0).random(n, dtype=np.float32)
    return np.sin(np.linspace(0, 200 * np.pi, n, dtype=np.float64)).astype(np.float32)


def _store_writer(rs: Any, x: np.ndarray, last: dict[str, str], compression: str) -> Writer:
    """A whole run: begin_run, write_output, finish (manifest, ledger, index)."""
    import dask.config

    def prepare() -> None:
        if "run" in last:
            shutil.rmtree(os.path.join(rs.url, "runs", last["run"], "x"), ignore_errors=True)

    def write() -> None:
        with dask.config.set({"depin.store.compression": compression}):
            w = rs.begin_run(code="x = data", inputs={}, options={}, cache_key=None)
        w.write_output("x", x)
        w.finish()
        last["run"] = w.run_id
    return prepare, write


DIGEST_MODES = ("digest_on", "digest_sha256", "digest_off", "digest_reread")


def _digest_writers(rs: Any, x: np.ndarray, settings: Any) -> dict[str, Writer]:
    """One array write four ways: digests as written (what the store does: BLAKE3), the same with
    SHA-256 (hashed on worker threads too), no digests at all, and BLAKE3 by reading the chunks back
    afterwards (the obvious alternative)."""
    from depin_jupyter.store import _io, _outputs

    def writer(mode: str) -> Writer:
        path = f"bench/{mode}"

        def prepare() -> None:
            shutil.rmtree(os.path.join(rs.url, path), ignore_errors=True)

        def write() -> None:
            if mode in ("digest_on", "digest_sha256"):
                algorithm = "sha256" if mode == "digest_sha256" else "blake3"
                _outputs.write_numpy(rs.zarr_store, path, x, replace(settings, digest=algorithm), name="x",
                                     pytype="numpy.ndarray")
                return
            chunks = _outputs.chunk_shape(x.shape, x.dtype.itemsize, settings.chunk_bytes)
            z = _outputs.create_array(rs.zarr_store, path, x.shape, x.dtype, chunks, settings)
            _outputs._write_chunkwise(z, x, chunks)
            if mode == "digest_reread":
                _io.hash_keys(rs.zarr_store, _io.list_prefix(rs.zarr_store, f"{path}/c"), "blake3")
        return prepare, write
    return {mode: writer(mode) for mode in DIGEST_MODES}


def bench_io(kind: str, n: int, workdir: str, repeats: int, fsync: bool) -> dict[str, dict[str, float]]:
    """Median wall ("seconds"), fastest wall ("best") and median CPU seconds ("cpu") of each writer and
    reader on one data kind (the first round is a warm-up)."""
    from depin_jupyter.store import open_store
    from depin_jupyter.store._outputs import Settings

    x = _data(kind, n)
    raw, npy = os.path.join(workdir, "raw.bin"), os.path.join(workdir, "raw.npy")
    stores: dict[str, Any] = {}
    last: dict[str, dict[str, str]] = {}
    for comp in ("none", "zstd"):
        stores[comp] = open_store(os.path.join(workdir, f"{kind}-{comp}.zarr"))
        last[comp] = {}
    writers: dict[str, Writer] = {
        "tofile": _file_writer(raw, lambda: x.tofile(raw)),
        "np.save": _file_writer(npy, lambda: np.save(npy, x)),
        "store_none": _store_writer(stores["none"], x, last["none"], "none"),
        "store_zstd": _store_writer(stores["zstd"], x, last["zstd"], "zstd"),
    }
    writers.update(_digest_writers(stores["none"], x, replace(Settings.from_config(), compression="none")))
    readers = {
        "fromfile": lambda: np.fromfile(raw, dtype=np.float32),
        "np.load": lambda: np.load(npy),
        "store_none": lambda: stores["none"].load(last["none"]["run"], lazy=False, verify=False)["x"],
        "store_zstd": lambda: stores["zstd"].load(last["zstd"]["run"], lazy=False, verify=False)["x"],
        "store_none verified": lambda: stores["none"].load(last["none"]["run"], lazy=False, verify=True)["x"],
        "store_zstd verified": lambda: stores["zstd"].load(last["zstd"]["run"], lazy=False, verify=True)["x"],
    }
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for rnd in range(repeats + 1):
        order = list(writers)
        if rnd % 2:  # alternate which of the digest variants goes first
            digests = [n for n in order if n in DIGEST_MODES]
            order = [n for n in order if n not in DIGEST_MODES] + digests[::-1]
        for name in order:
            prepare, write = writers[name]
            prepare()
            _settle(x.nbytes)
            t, c = _timed(write, fsync)
            if rnd:
                times.setdefault(f"write {name}", []).append(t)
                cpu.setdefault(f"write {name}", []).append(c)
        for name in list(readers)[rnd % len(readers):] + list(readers)[:rnd % len(readers)]:
            fn = readers[name]
            _settle(x.nbytes)
            t, c = _timed(lambda: _check_shape(fn(), x.shape), False)  # noqa: B023 - called right here
            if rnd:
                times.setdefault(f"read {name}", []).append(t)
                cpu.setdefault(f"read {name}", []).append(c)
    for comp, rs in stores.items():
        m = rs.manifest(last[comp]["run"]).outputs["x"]
        stored = sum(os.path.getsize(os.path.join(rs.url, m.path or "", *k.split("/")))
                     for k in (m.chunk_digests or {}))
        times[f"stored/raw {comp}"] = [stored / x.nbytes]
    import hashlib

    import blake3

    for name, hasher in (("sha256", hashlib.sha256), ("blake3", blake3.blake3)):  # one core each
        t, c = _timed(lambda: hasher(memoryview(x).cast("B")).digest(), False)  # noqa: B023
        times[f"{name} of the data"], cpu[f"{name} of the data"] = [t], [c]
    return {"seconds": {k: statistics.median(v) for k, v in times.items()},
            "best": {k: min(v) for k, v in times.items()},
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


def bench_cache(nbytes: int, workdir: str, repeats: int = 20, verify_on_read: bool = False) -> dict[str, float]:
    """Median ms of a cache hit (lookup_cache + lazy load) for an output of ``nbytes``."""
    import dask.config

    from depin_jupyter.store import open_store

    rs = open_store(os.path.join(workdir, f"cache-{nbytes}-{verify_on_read}.zarr"))
    key = f"cache-key-{nbytes}"
    w = rs.begin_run(code="x = data", inputs={}, options={}, cache_key=key)
    w.write_output("x", np.ones(nbytes // 4, dtype=np.float32))
    w.finish()
    samples = []
    for _ in range(repeats + 1):
        with dask.config.set({"depin.store.verify-on-read": verify_on_read}):
            t0 = time.perf_counter()
            run_id = rs.lookup_cache(key)
            assert run_id is not None
            out: Any = rs.load(run_id)["x"]
            samples.append((time.perf_counter() - t0) * 1000)
        assert out.shape == (nbytes // 4,)
    return {"median_ms": statistics.median(samples[1:]), "max_ms": max(samples[1:])}


def _ratios(t: dict[str, float], cpu: dict[str, float]) -> dict[str, float]:
    """The speed ratios against the baselines and the digests' shares, from one set of timings."""
    return {
        "write none / tofile (speed)": t["write tofile"] / t["write store_none"],
        "write zstd / tofile (speed)": t["write tofile"] / t["write store_zstd"],
        "read none / fromfile (speed)": t["read fromfile"] / t["read store_none"],
        "read zstd / fromfile (speed)": t["read fromfile"] / t["read store_zstd"],
        "verified read none / fromfile (speed)": t["read fromfile"] / t["read store_none verified"],
        "verified read zstd / fromfile (speed)": t["read fromfile"] / t["read store_zstd verified"],
        "digest share of write": max(0.0, t["write digest_on"] - t["write digest_off"]) / t["write digest_on"],
        "  same, of CPU time": (max(0.0, cpu["write digest_on"] - cpu["write digest_off"])
                                / cpu["write digest_on"]),
        "  same, SHA-256 on threads": (max(0.0, t["write digest_sha256"] - t["write digest_off"])
                                       / t["write digest_sha256"]),
        "  same, BLAKE3 by re-reading": (max(0.0, t["write digest_reread"] - t["write digest_off"])
                                         / t["write digest_reread"]),
        "blake3 CPU time / write none": cpu["blake3 of the data"] / t["write store_none"],
        "sha256 CPU time / write none": cpu["sha256 of the data"] / t["write store_none"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=1024, help="array size (MiB), default 1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: $TMPDIR)")
    ap.add_argument("--fsync", action="store_true", help="sync after every write (all writers)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "store.json"))
    args = ap.parse_args(argv)
    n = int(args.size_mib * 2**20) // 4
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="depin-bench-", dir=args.dir)
    load_before = os.getloadavg()
    try:
        measured = {kind: bench_io(kind, n, workdir, args.repeats, args.fsync) for kind in ("random", "smooth")}
        io = {kind: m["seconds"] for kind, m in measured.items()}
        best = {kind: m["best"] for kind, m in measured.items()}
        cpu = {kind: m["cpu"] for kind, m in measured.items()}
        cache = {"1MiB": bench_cache(2**20, workdir), f"{args.size_mib:g}MiB": bench_cache(n * 4, workdir)}
        cache_verify = {f"{args.size_mib:g}MiB": bench_cache(n * 4, workdir, verify_on_read=True)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {kind: _ratios(t, cpu[kind]) for kind, t in io.items()}
    ratios_best = {kind: _ratios(t, cpu[kind]) for kind, t in best.items()}
    result = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "nice": os.nice(0)},
        "size_mib": args.size_mib, "repeats": args.repeats, "fsync": args.fsync, "dir": workdir,
        "load_average_before": load_before, "load_average": os.getloadavg(),
        "seconds": io, "best_seconds": best, "cpu_seconds": cpu,
        "ratios": ratios, "ratios_best": ratios_best, "cache_hit": cache, "cache_hit_verify_on_read": cache_verify,
        "targets": TARGETS,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    _print(result)
    return result


def _print(r: dict[str, Any]) -> None:
    gb = r["size_mib"] * 2**20 / 1e9
    load = " ".join(f"{v:.1f}" for v in r.get("load_average_before", ())) or "?"
    print(f"\nstore benchmark: {r['size_mib']:g} MiB float32, median of {r['repeats']}, "
          f"fsync={r['fsync']}, {r['machine']['cpus']} CPUs (nice {r['machine'].get('nice', 0)}), load average {load} before, "
          f"{' '.join(f'{v:.1f}' for v in r['load_average'])} after")
    print(f"{'operation':28} {'random s':>9} {'GB/s':>6} {'cores':>5} {'smooth s':>9} {'GB/s':>6} {'cores':>5}")
    cpu = r.get("cpu_seconds", {})
    for key in r["seconds"]["random"]:
        a, b = r["seconds"]["random"][key], r["seconds"]["smooth"][key]
        if key.startswith("stored/raw"):
            print(f"{key:28} {a:9.3f} {'':6} {'':5} {b:9.3f}")
        else:
            ca, cb = (cpu.get(k, {}).get(key, float("nan")) / t for k, t in (("random", a), ("smooth", b)))
            print(f"{key:28} {a:9.3f} {gb / a:6.2f} {ca:5.2f} {b:9.3f} {gb / b:6.2f} {cb:5.2f}")
    print("(cores: CPU seconds of this process / wall seconds)")
    print(f"\n{'ratio (target)':46} {'random':>8} {'smooth':>8}   fastest round: {'random':>8} {'smooth':>8}")
    targets = {"write none": 0.8, "write zstd": 0.5, "read none": 0.8, "verified read none": 0.8,
               "digest share": 0.10}
    for key in r["ratios"]["random"]:
        tgt = next((f"(>= {v})" if "digest" not in k else f"(<= {v})" for k, v in targets.items()
                    if key.startswith(k)), "")
        fast = r.get("ratios_best", r["ratios"])
        print(f"{key + ' ' + tgt:46} {r['ratios']['random'][key]:8.2f} {r['ratios']['smooth'][key]:8.2f}   "
              f"{'':14} {fast['random'][key]:8.2f} {fast['smooth'][key]:8.2f}")
    print("\ncache hit (lookup_cache + lazy load), target <= 50 ms")
    for size, c in r["cache_hit"].items():
        print(f"  {size:>10}: median {c['median_ms']:.1f} ms, max {c['max_ms']:.1f} ms")
    for size, c in r.get("cache_hit_verify_on_read", {}).items():
        print(f"  {size:>10}, verify-on-read: median {c['median_ms']:.1f} ms, max {c['max_ms']:.1f} ms "
              "(chunks are checked when computed)")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()

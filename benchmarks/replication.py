"""Cost of replicated runs: `%%depin --replicas 2` against `--replicas 1`, measured in one run.

    python benchmarks/replication.py [--reps 20] [--mib 256] [--out benchmarks/results/replication.json]

On the embedded cluster (2 worker processes), for a trivial cell and for a cell returning a ``--mib`` MiB
float64 array: median and p90 wall time of the cell with 1 and with 2 replicas, their ratio, and the time the
comparison of the two results takes by itself (`quorum.majority`): identical arrays (the fast path) and
arrays that differ within tolerance (max abs/rel error computed over every element).
Baseline in the same run: plain ``client.submit(f).result()``. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from _results import save, timed
from _results import stats as _stats


def _inc(v):
    return v + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--big-reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "replication.json"))
    args = ap.parse_args()

    import dask
    import numpy as np

    from depin_jupyter.kernel import cluster, runner
    from depin_jupyter.protocol import quorum

    dask.config.set({"depin.store.enabled": False})
    session = cluster.connect("local")
    session.client.wait_for_workers(2, timeout=60)
    client = session.client

    n = args.mib * 2**20 // 8
    rows: dict[str, dict[str, float]] = {}
    rows["submit"] = _stats(timed(lambda: client.submit(_inc, 1, pure=False).result(), args.reps))
    for k in (1, 2):
        opts = runner.RunOptions(replicas=k)
        rows[f"trivial_r{k}"] = _stats(timed(lambda opts=opts: runner.run_cell(session, "y = 1", {}, opts), args.reps))
    for k in (1, 2):
        opts = runner.RunOptions(replicas=k)
        code = f"import numpy as np\nbig = np.arange({n}, dtype=np.float64) * 0.5"
        rows[f"big_r{k}"] = _stats(timed(lambda code=code, opts=opts: runner.run_cell(session, code, {}, opts), args.big_reps))
    a = {"status": "ok", "outputs": {"big": np.arange(n, dtype=np.float64) * 0.5}}
    b = {"status": "ok", "outputs": {"big": np.arange(n, dtype=np.float64) * 0.5 + 1e-12}}
    a2 = {"status": "ok", "outputs": {"big": a["outputs"]["big"].copy()}}
    rows["compare_big_identical"] = _stats(timed(lambda: quorum.majority([a, a2], 1e-7, 0.0), args.big_reps))
    rows["compare_big_tolerant"] = _stats(timed(lambda: quorum.majority([a, b], 1e-7, 0.0), args.big_reps))
    cluster.close_session()

    ratios = {
        "trivial r2 / r1": rows["trivial_r2"]["median_ms"] / rows["trivial_r1"]["median_ms"],
        "trivial r1 / submit": rows["trivial_r1"]["median_ms"] / rows["submit"]["median_ms"],
        f"{args.mib} MiB r2 / r1": rows["big_r2"]["median_ms"] / rows["big_r1"]["median_ms"],
        f"identical compare / {args.mib} MiB r2": rows["compare_big_identical"]["median_ms"] / rows["big_r2"]["median_ms"],
        f"tolerant compare / {args.mib} MiB r2": rows["compare_big_tolerant"]["median_ms"] / rows["big_r2"]["median_ms"],
    }
    print(f"{'case':<28} {'median ms':>10} {'p90 ms':>10} {'n':>4}")
    for name, r in rows.items():
        print(f"{name:<28} {r['median_ms']:>10.1f} {r['p90_ms']:>10.1f} {r['n']:>4}")
    for name, v in ratios.items():
        print(f"{name:<28} {v:>10.2f}")
    save(args.out, {"rows": rows, "ratios": ratios, "mib": args.mib,
                    "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cpus": os.cpu_count()},
                    "note": "embedded CPU LocalCluster, 2 worker processes; replicas run concurrently"})


if __name__ == "__main__":
    main()

"""Throughput of 200 small `%%depin`-style runs on 1, 2 and 4 workers, against `client.map` of the same work.

    python benchmarks/scaling.py [--runs 200] [--workers 1 2 4] [--out benchmarks/results/scaling.json]

The runs go through the real path (cell analysis, shipping, the worker-side executor, result binding) as
background runs, so they overlap like independent cells of many users would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

CELL = "s = 0\nfor i in range(20_000):\n    s += i * i"


def _work(_: int) -> int:  # the same work as CELL, for the client.map baseline
    s = 0
    for i in range(20_000):
        s += i * i
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scaling.json"))
    args = ap.parse_args()

    import dask

    from depin_jupyter.kernel import background, cluster
    from depin_jupyter.kernel.runner import RunOptions

    rows = {}
    for n in args.workers:
        with dask.config.set({"depin.local-cluster.n-workers": n}):
            session = cluster.connect("local")
        session.client.wait_for_workers(n)
        ns: dict = {}
        for i in range(5):  # warm up every worker's imports
            background.submit(session, CELL, ns, RunOptions(name=f"warm{i}", no_store=True))
        background.wait(session, ns)
        t = time.perf_counter()
        session.client.gather(session.client.map(_work, range(args.runs), pure=False))
        map_s = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(args.runs):
            background.submit(session, CELL, ns, RunOptions(name=f"r{i}", no_store=True))
        background.wait(session, ns)
        depin_s = time.perf_counter() - t
        rows[n] = {"depin_runs_per_s": args.runs / depin_s, "client_map_tasks_per_s": args.runs / map_s,
                   "depin_over_map": map_s / depin_s}
        cluster.close_session()
    print(f"{'workers':>7} {'depin runs/s':>13} {'client.map/s':>13} {'ratio':>7}")
    for n, r in rows.items():
        print(f"{n:7d} {r['depin_runs_per_s']:13.1f} {r['client_map_tasks_per_s']:13.1f} {r['depin_over_map']:7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "scaling", "runs": args.runs, "rows": rows,
                   "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                               "cpus": os.cpu_count()}}, f, indent=2)


if __name__ == "__main__":
    main()

"""`%%depin` on a volunteer network: a real `depin scheduler` and `depin worker` on 127.0.0.1 (mutual TLS,
sandbox on), against the same cells on the embedded local cluster, measured in one run.

    python benchmarks/volunteer.py [--reps 20] [--input-mib 64]

Rows: a trivial cell (on a volunteer with warm sandboxes, `depin.sandbox.warm`, and on one without them: a
new sandbox process started per cell, the baseline); a cell reading a ``--input-mib`` MiB array for the first time and again. The input
cache (`relay.InputRef`: the notebook puts an array on the coordinator once, the volunteer keeps what it
fetched) is measured against its baseline in the same run: the same cells with every input inside the task
(``depin.coordinator.input-ref-min-bytes`` set above the array's size), which is how volunteer cells
travelled before the cache. One replica (``--replicas 1``), stores off. Prints a table, writes
benchmarks/results/volunteer.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

from _network import BenchNetwork
from _results import save, stats, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--input-mib", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "volunteer.json"))
    args = ap.parse_args()

    import dask
    import numpy as np

    from depin_jupyter.kernel import cluster, runner
    net = BenchNetwork("depin-bench-volunteer-")
    rows: dict[str, Any] = {}
    one = runner.RunOptions(replicas=1, no_store=True)
    try:
        net.start_worker(net.token("worker", "bench-vol"), "bench-vol")
        net.start_worker(net.token("worker", "bench-cold"), "bench-cold", env={"DASK_DEPIN__SANDBOX__WARM": "false"})
        vol = cluster._connect_token(net.token("client", "bench-sci"))
        vol.client.wait_for_workers(2, timeout=60)
        local = cluster.connect("local")
        local.client.wait_for_workers(1, timeout=60)

        n = args.input_mib * 2**20 // 8
        trivial = "y = 1"
        big = "s = big.shape[0]"
        warm = runner.RunOptions(replicas=1, no_store=True, worker="bench-vol")
        cold = runner.RunOptions(replicas=1, no_store=True, worker="bench-cold")
        for name, session, opts in (("local", local, one), ("volunteer", vol, warm),
                                    ("volunteer, no warm sandbox (baseline)", vol, cold)):
            runner.run_cell(session, trivial, {}, opts)  # warm-up
            rows[f"{name}: trivial"] = stats(timed(lambda s=session, o=opts: runner.run_cell(s, trivial, {}, o),
                                                   args.reps, warmup=False))
        one = warm  # the input rows: on the warm volunteer
        for mode, ref_min in (("input cache", "1MiB"), ("inline (baseline)", f"{args.input_mib * 2}MiB")):
            with dask.config.set({"depin.coordinator.input-ref-min-bytes": ref_min}):
                first, second = [], []
                for i in range(max(3, args.reps // 4)):
                    ns = {"big": np.full(n, float(i) + (0.5 if mode.startswith("inline") else 0.0))}
                    first += timed(lambda ns=ns: runner.run_cell(vol, big, ns, one), 1, warmup=False)
                    second += timed(lambda ns=ns: runner.run_cell(vol, big, ns, one), 2, warmup=False)
                rows[f"volunteer, {mode}: {args.input_mib} MiB input, first use"] = stats(first)
                rows[f"volunteer, {mode}: {args.input_mib} MiB input, reused"] = stats(second)
        vol.close()
        cluster.close_session()
    finally:
        net.close()

    reused = rows[f"volunteer, input cache: {args.input_mib} MiB input, reused"]["median_ms"]
    inline = rows[f"volunteer, inline (baseline): {args.input_mib} MiB input, reused"]["median_ms"]
    ratios = {
        "volunteer trivial / local trivial": rows["volunteer: trivial"]["median_ms"] / rows["local: trivial"]["median_ms"],
        "volunteer trivial: warm / no warm sandbox": rows["volunteer: trivial"]["median_ms"]
        / rows["volunteer, no warm sandbox (baseline): trivial"]["median_ms"],
        f"{args.input_mib} MiB reused: input cache / inline": reused / inline,
    }
    print(f"{'case':<58} {'median ms':>10} {'p90 ms':>10}")
    for name, r in rows.items():
        print(f"{name:<58} {r['median_ms']:>10.1f} {r['p90_ms']:>10.1f}")
    for name, v in ratios.items():
        print(f"{name:<58} {v:>9.2f}x")
    save(args.out, {"benchmark": "volunteer", "rows": rows, "ratios": ratios, "input_mib": args.input_mib,
                    "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cpus": os.cpu_count()}})


if __name__ == "__main__":
    main()

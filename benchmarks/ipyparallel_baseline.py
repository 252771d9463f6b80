"""`%%depin` against what a user would do with ipyparallel instead, measured in one run on this machine.

    pip install ipyparallel   # not a dependency of depin-jupyter: only this benchmark needs it
    python benchmarks/ipyparallel_baseline.py [--reps 30] [--input-mib 64]

The ipyparallel equivalent of a `%%depin` cell is `%%px` on one engine with its inputs pushed and its
outputs pulled: ``view.push(inputs); view.execute(code); view.pull(outputs)``. Both sides run the same
cells: a trivial one (``y = 1``) and one reading a ``--input-mib`` MiB array (``s = float(a.sum())``), the
second time for the same array (depin ships it once and reuses it; ipyparallel pushes it again, since
``%%px`` has no notion of "already there"). Two worker processes / two engines, stores off. Prints medians
and writes benchmarks/results/ipyparallel_baseline.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from _results import save, stats, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--input-mib", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ipyparallel_baseline.json"))
    args = ap.parse_args()
    try:
        import ipyparallel as ipp
    except ImportError:
        print("ipyparallel is not installed (pip install ipyparallel): nothing to compare with", file=sys.stderr)
        raise SystemExit(2) from None

    import dask
    import numpy as np

    from depin_jupyter import cluster, runner

    dask.config.set({"depin.store.enabled": False})
    a = np.random.default_rng(0).random(args.input_mib * 2**20 // 8)

    rows = {}
    session = cluster.connect("local")
    session.client.wait_for_workers(2, timeout=60)
    rows["depin_trivial"] = stats(timed(lambda: runner.run_cell(session, "y = 1", {}), args.reps))
    ns = {"a": a}
    runner.run_cell(session, "s = float(a.sum())", ns)  # first use ships `a`
    rows["depin_input_second_use"] = stats(timed(lambda: runner.run_cell(session, "s = float(a.sum())", ns),
                                                 max(3, args.reps // 5)))
    cluster.close_session()

    with ipp.Cluster(n=2, log_level=40) as rc:
        view = rc[0]

        def px(code: str, inputs: dict, outputs: list[str]) -> None:
            if inputs:
                view.push(inputs, block=True)
            view.execute(code, block=True)
            view.pull(outputs, block=True)

        rows["ipyparallel_trivial"] = stats(timed(lambda: px("y = 1", {}, ["y"]), args.reps))
        rows["ipyparallel_input_second_use"] = stats(timed(lambda: px("s = float(a.sum())", {"a": a}, ["s"]),
                                                           max(3, args.reps // 5)))
    ratios = {
        "trivial: depin / ipyparallel": rows["depin_trivial"]["median_ms"] / rows["ipyparallel_trivial"]["median_ms"],
        f"{args.input_mib} MiB input, second use: depin / ipyparallel":
            rows["depin_input_second_use"]["median_ms"] / rows["ipyparallel_input_second_use"]["median_ms"],
    }
    print(f"{'case':<34} {'median ms':>10} {'p90 ms':>10}")
    for name, r in rows.items():
        print(f"{name:<34} {r['median_ms']:>10.1f} {r['p90_ms']:>10.1f}")
    for name, v in ratios.items():
        print(f"{name:<44} {v:>6.2f}x")
    save(args.out, {"rows": rows, "ratios": ratios, "input_mib": args.input_mib,
                    "met": {"trivial below ipyparallel": ratios["trivial: depin / ipyparallel"] < 1.0},
                    "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cpus": os.cpu_count(), "ipyparallel": ipp.__version__}})


if __name__ == "__main__":
    main()

"""`%%depin` against what a user would do with ipyparallel instead, measured in one run on this machine.

    pip install ipyparallel   # not a dependency of depin-jupyter: only this benchmark needs it
    python benchmarks/ipyparallel_baseline.py [--reps 30] [--input-mib 64]

The ipyparallel equivalent of a `%%depin` cell is `%%px` on one engine with its inputs pushed and its
outputs pulled: ``view.push(inputs); view.execute(code); view.pull(outputs)``. Both sides run the same
cells: a trivial one (``y = 1``) and one reading a ``--input-mib`` MiB array (``s = float(a.sum())``), the
second time for the same array (depin ships it once and reuses it; ipyparallel pushes it again, since
``%%px`` has no notion of "already there"). Two worker processes / two engines, stores off, both
clusters up at once and the candidates interleaved. A bare Dask ``client.submit`` round trip is measured
beside them: the floor under any `%%depin` cell. Prints medians and writes
benchmarks/results/ipyparallel_baseline.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys

from _results import save, stats, timed


def _inc(v: int) -> int:  # the bare Dask round trip's task
    return v + 1



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

    from depin_jupyter.kernel import cluster, runner

    dask.config.set({"depin.store.enabled": False})
    a = np.random.default_rng(0).random(args.input_mib * 2**20 // 8)

    rows: dict = {}
    session = cluster.connect("local")
    session.client.wait_for_workers(2, timeout=60)
    ns = {"a": a}
    runner.run_cell(session, "s = float(a.sum())", ns)  # first use ships `a`

    with ipp.Cluster(n=2, log_level=40) as rc:
        view = rc[0]

        def px(code: str, inputs: dict, outputs: list[str]) -> None:
            if inputs:
                view.push(inputs, block=True)
            view.execute(code, block=True)
            view.pull(outputs, block=True)

        # Both clusters run at once and the candidates take turns in a new random order each round, so
        # machine noise and the after-effects of the previous call fall on all of them alike. The bare
        # Dask round trip (client.submit + result) is the floor any Dask-based cell sits on.
        trivial = {
            "depin_trivial": lambda: runner.run_cell(session, "y = 1", {}),
            "dask_client_submit": lambda: session.client.submit(_inc, 1, pure=False).result(),
            "ipyparallel_trivial": lambda: px("y = 1", {}, ["y"]),
        }
        big = {
            "depin_input_second_use": lambda: runner.run_cell(session, "s = float(a.sum())", ns),
            "ipyparallel_input_second_use": lambda: px("s = float(a.sum())", {"a": a}, ["s"]),
        }
        samples: dict = {k: [] for k in (*trivial, *big)}
        order = random.Random(0)
        for group, reps in ((trivial, args.reps), (big, max(3, args.reps // 5))):
            items = list(group.items())
            for fn in group.values():
                fn()  # warm-up
            for _ in range(reps):
                order.shuffle(items)
                for name, fn in items:
                    samples[name] += timed(fn, 1, warmup=False)
        rows = {k: stats(v) for k, v in samples.items()}
    cluster.close_session()
    ratios = {
        "trivial: depin / ipyparallel": rows["depin_trivial"]["median_ms"] / rows["ipyparallel_trivial"]["median_ms"],
        "trivial: Dask client.submit / ipyparallel":
            rows["dask_client_submit"]["median_ms"] / rows["ipyparallel_trivial"]["median_ms"],
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

"""`depin_jupyter.map` over volunteers against `client.map` on a plain LocalCluster, in one run on 127.0.0.1.

    python benchmarks/pool_map.py [--items 1000] [--ms 50] [--volunteers 4]

The function burns ``--ms`` of CPU per item. Baseline: `client.map` of the same function on a LocalCluster
of ``--volunteers`` single-threaded worker processes (results gathered). Then a real `depin scheduler` with
that many `depin worker`s (sandboxed, mutual TLS): the map without replication (``replicas=1``), with the
default adaptive replication while the volunteers are new (every batch replicated: no streak yet), and again
once each volunteer has earned the validated streak after which it is only spot-checked (replicated one-item
cells until the coordinator's reputation says so). Reports items/s, the ratio to the baseline and the notebook's CPU per item
(this process's CPU time during the map, all threads). Targets (issue #25): >= 0.8x without replication,
>= 0.6x with adaptive replication of trusted volunteers, <= 0.5 ms notebook CPU per item. Prints a table,
writes benchmarks/results/pool_map.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

from _network import BenchNetwork
from _results import save

BURN = """
def burn(x, ms={ms}):
    import time
    end = time.process_time() + ms / 1000
    acc = 0
    while time.process_time() < end:
        acc += 1
    return float(x) * 2.0
"""


def _measure(fn: Any, n: int) -> dict[str, float]:
    cpu, t = time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"seconds": wall, "items_per_s": n / wall, "notebook_cpu_ms_per_item": cpu * 1000 / n}


def _earn_trust(session: Any, volunteers: int, fn: Any) -> int:
    """Replicated one-item cells until every volunteer has the validated streak after which it is only
    spot-checked (``depin.trust-streak``); the rounds it took. Trust is earned, never set."""
    from depin_jupyter import config
    from depin_jupyter.kernel.mapping import map_items
    from depin_jupyter.kernel.records import RunOptions
    from depin_jupyter.protocol.rpc import Coordinator

    need = int(config.get("trust-streak"))
    coordinator = Coordinator.of_client(session.client)
    for rounds in range(1, 40):
        map_items(session, fn, range(2 * volunteers), batch=1, options=RunOptions(replicas=2)).result()
        streaks = [int(r.get("streak", 0)) for r in coordinator.reputation().values()]
        if len(streaks) >= volunteers and min(streaks) >= need:
            return rounds
    raise SystemExit(f"the volunteers did not earn a streak of {need} (streaks {streaks})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--ms", type=float, default=50.0)
    ap.add_argument("--volunteers", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pool_map.json"))
    args = ap.parse_args()

    import dask
    from distributed import Client, LocalCluster

    from depin_jupyter.kernel import cluster
    from depin_jupyter.kernel.mapping import map_items
    from depin_jupyter.kernel.records import RunOptions

    dask.config.set({"depin.store.enabled": False})
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(BURN.format(ms=args.ms), ns)  # noqa: S102 - a notebook's function (module __main__): travels by value
    burn = ns["burn"]
    items = list(range(args.items))
    expected = [2.0 * i for i in items]
    rows: dict[str, Any] = {}

    with LocalCluster(n_workers=args.volunteers, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        client.gather(client.map(burn, range(8), pure=False))  # warm-up

        def baseline() -> None:
            assert client.gather(client.map(burn, items, pure=False)) == expected
        rows["client.map, LocalCluster (baseline)"] = _measure(baseline, args.items)

    net = BenchNetwork("depin-bench-map-")
    try:
        for i in range(args.volunteers):
            net.start_worker(net.token("worker", f"map-vol-{i}"), f"map-vol-{i}")
        session = cluster._connect_token(net.token("client", "map-sci"))
        session.client.wait_for_workers(args.volunteers, timeout=120)
        map_items(session, burn, range(2 * args.volunteers), options=RunOptions(replicas=1))  # warm-up
        for label, replicas in (("depin map, volunteers, no replication", 1),
                                ("depin map, new volunteers, adaptive replication", None)):
            def run(replicas: int | None = replicas) -> None:
                assert map_items(session, burn, items, options=RunOptions(replicas=replicas)).result() == expected
            rows[label] = _measure(run, args.items)
        rounds = _earn_trust(session, args.volunteers, burn)
        rows["depin map, trusted volunteers, adaptive replication"] = _measure(run, args.items)
        rows["depin map, trusted volunteers, adaptive replication"]["trust_rounds"] = rounds
        session.close()
    finally:
        net.close()

    base = rows["client.map, LocalCluster (baseline)"]["items_per_s"]
    for r in rows.values():
        r["vs_baseline"] = r["items_per_s"] / base
    no_rep = rows["depin map, volunteers, no replication"]
    rep = rows["depin map, trusted volunteers, adaptive replication"]
    met = {"no replication >= 0.8x": no_rep["vs_baseline"] >= 0.8,
           "adaptive replication >= 0.6x": rep["vs_baseline"] >= 0.6,
           "notebook CPU <= 0.5 ms/item": no_rep["notebook_cpu_ms_per_item"] <= 0.5}
    print(f"{'case':<52} {'s':>7} {'items/s':>9} {'x base':>7} {'nb CPU ms/item':>15}")
    for name, r in rows.items():
        print(f"{name:<52} {r['seconds']:>7.1f} {r['items_per_s']:>9.1f} {r['vs_baseline']:>7.2f} "
              f"{r['notebook_cpu_ms_per_item']:>15.2f}")
    save(args.out, {"benchmark": "pool_map", "items": args.items, "ms_per_item": args.ms,
                    "volunteers": args.volunteers, "rows": rows, "met": met,
                    "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cpus": os.cpu_count()}})


if __name__ == "__main__":
    main()

"""Run every benchmark and print one table of ratios against the baselines each measured in the same run.

    python benchmarks/run.py [--store-mib 1024] [--quick]

Each benchmark is its own script (overhead, store, longruns, scaling, replication, ipyparallel_baseline when
ipyparallel is installed, volunteer; gpu when a GPU is usable) writing
benchmarks/results/<name>.json; this collects them. `--quick` uses small sizes and few repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _run(script: str, *args: str) -> dict | None:
    print(f"== {script} {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args])
    if proc.returncode != 0:
        print(f"   {script} exited with {proc.returncode}; left out of the table", flush=True)
        return None
    with open(os.path.join(RESULTS, script.replace(".py", ".json"))) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store-mib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = ["--reps", "10"] if args.quick else []
    summary: list[tuple[str, str, str]] = []

    if (r := _run("overhead.py", *reps)) is not None:
        rows = r["rows"]
        summary.append(("trivial %%depin / client.submit", f"{rows['c_depin_trivial']['x_submit']:.2f}x", "<= 1.5x"))
        second = next(v for k, v in rows.items() if k.endswith("_second"))
        summary.append(("reused 64 MiB input / client.submit", f"{second['x_submit']:.2f}x", "<= 1.5x"))
        summary.append(("cache hit / client.submit", f"{rows['c3_depin_trivial_cache_hit']['x_submit']:.2f}x", "-"))
    if (r := _run("store.py", "--size-mib", str(64 if args.quick else args.store_mib))) is not None:
        for kind, ratios in r["ratios"].items():
            summary.append((f"store write none / tofile ({kind})", f"{ratios['write none / tofile (speed)']:.2f}x", ">= 0.8x"))
            summary.append((f"store read none / fromfile ({kind})", f"{ratios['read none / fromfile (speed)']:.2f}x", ">= 0.8x"))
            summary.append((f"digest share of write ({kind})", f"{ratios['digest share of write']:.2f}", "<= 0.10"))
        for size, hit in r["cache_hit"].items():
            ms = hit.get("median_ms", hit) if isinstance(hit, dict) else hit
            summary.append((f"cache hit {size}", f"{ms if isinstance(ms, str) else f'{ms:.1f} ms'}", "<= 50 ms"))
    if (r := _run("longruns.py", *reps)) is not None:
        rows = r["rows"]
        summary.append(("interrupt -> idle (Python loop)", f"{rows['interrupt_to_idle']['median_ms']:.0f} ms", "< 5 s"))
        summary.append(("interrupt -> idle (C call)", f"{rows['interrupt_c_call_to_idle']['median_ms']:.0f} ms", "< 5 s"))
        summary.append(("--background return", f"{rows['background_return']['median_ms']:.1f} ms", "< 1 s"))
    if (r := _run("scaling.py", *(["--runs", "50"] if args.quick else []))) is not None:
        for n, row in r["rows"].items():
            summary.append((f"throughput on {n} worker(s) / client.map", f"{row['depin_over_map']:.2f}x", "-"))
    if (r := _run("replication.py", *(["--reps", "10", "--mib", "64"] if args.quick else []))) is not None:
        for name, v in r["ratios"].items():
            summary.append((f"replicas: {name}", f"{v:.2f}x", "-"))
    if (r := _run("ipyparallel_baseline.py", *(["--reps", "10"] if args.quick else []))) is not None:
        for name, v in r["ratios"].items():
            summary.append((name, f"{v:.2f}x", "< 1.0x" if name.startswith("trivial: depin") else "-"))
    if (r := _run("volunteer.py", *(["--reps", "8", "--input-mib", "16"] if args.quick else []))) is not None:
        for name, v in r["ratios"].items():
            summary.append((f"volunteer network: {name}", f"{v:.2f}x", "-"))
    _run("gpu.py")  # exits 2 without a GPU: said, and left out
    print(f"\n{'measure':44} {'result':>30} {'target':>16}")
    for name, value, target in summary:
        print(f"{name:44} {value:>30} {target:>16}")


if __name__ == "__main__":
    main()

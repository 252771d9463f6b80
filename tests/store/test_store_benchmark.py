"""The store benchmark script runs end to end at a tiny size and reports every measured quantity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_runs_small(tmp_path):
    out = tmp_path / "store.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "store.py"), "--size-mib", "2",
                           "--repeats", "1", "--dir", str(tmp_path), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for kind in ("random", "smooth"):
        seconds = result["seconds"][kind]
        for op in ("write tofile", "write store_none", "write store_zstd", "read fromfile", "read store_none",
                   "write digest_on", "write digest_off", "write digest_reread"):
            assert seconds[op] > 0, op
        assert seconds["stored/raw none"] == 1.0 and seconds["stored/raw zstd"] < 1.0
        assert set(result["ratios"][kind]) >= {"write none / tofile (speed)", "digest share of write"}
    assert set(result["cache_hit"]) == {"1MiB", "2MiB"}
    assert "cache hit" in proc.stdout and not [p for p in os.listdir(tmp_path) if p.startswith("depin-bench-")]

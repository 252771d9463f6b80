"""The volunteer-network benchmark runs end to end at a tiny size (a real coordinator and volunteer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_volunteer_benchmark_runs_small(tmp_path):
    out = tmp_path / "volunteer.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "volunteer.py"), "--reps", "2",
                           "--input-mib", "2", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    for mode in ("input cache", "inline (baseline)"):
        for use in ("first use", "reused"):
            assert rows[f"volunteer, {mode}: 2 MiB input, {use}"]["median_ms"] > 0
    assert rows["volunteer: trivial"]["n"] == 2 and rows["local: trivial"]["median_ms"] > 0
    assert rows["volunteer, no warm sandbox (baseline): trivial"]["n"] == 2
    assert set(result["ratios"]) == {"volunteer trivial / local trivial", "volunteer trivial: warm / no warm sandbox",
                                     "2 MiB reused: input cache / inline"}

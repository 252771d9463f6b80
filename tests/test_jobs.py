"""Runs in flight are listed with owner and age, and cancelled from another client (CLI or kernel)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from click.testing import CliRunner

from depin_jupyter.cli import main
from depin_jupyter.kernel.jobs import owner


def _start_looping_run(address, beat, name):
    script = textwrap.dedent(f"""
        from depin_jupyter.kernel import cluster
        from depin_jupyter.kernel.runner import RunOptions, run_cell
        s = cluster.connect({address!r})
        try:
            run_cell(s, "import time\\nn = 0\\nwhile True:\\n    n += 1\\n    open(beat, 'w').write(str(n))\\n"
                        "    time.sleep(0.01)", {{"beat": {str(beat)!r}}}, RunOptions(name={name!r}))
        except Exception as e:
            print("RUN ENDED:", type(e).__name__, e, flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _listed(address, name, timeout=30):
    """`depin jobs` output once it lists ``name`` (a run is registered once it has run ~0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        out = CliRunner().invoke(main, ["jobs", "--scheduler", address])
        if name in out.output or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def _wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists()


def test_jobs_lists_and_cancel_stops_a_run_of_another_client(depin_session, tmp_path):
    beat = tmp_path / "beat"
    proc = _start_looping_run(depin_session.address, beat, "looper")
    try:
        _wait_for(beat)
        runner = CliRunner()
        out = _listed(depin_session.address, "looper")
        assert out.exit_code == 0, out.output
        assert "looper" in out.output and owner() in out.output and "processing" in out.output

        out = runner.invoke(main, ["cancel", "nosuchrun", "--scheduler", depin_session.address])
        assert out.exit_code != 0 and "nosuchrun" in out.output

        out = runner.invoke(main, ["cancel", "looper", "--scheduler", depin_session.address])
        assert out.exit_code == 0 and "cancelled" in out.output, out.output
        text = proc.communicate(timeout=60)[0]
        assert "RUN ENDED" in text and "cancel" in text.lower(), text
        first = beat.read_text()
        time.sleep(0.5)
        assert beat.read_text() == first  # the worker stopped the cell
        out = runner.invoke(main, ["jobs", "--scheduler", depin_session.address])
        assert "looper" not in out.output
    finally:
        proc.kill()


def test_line_magic_jobs_and_cancel_mine(shell, depin_session, tmp_path, capsys):
    beat = tmp_path / "beat2"
    proc = _start_looping_run(depin_session.address, beat, "mine")
    try:
        _wait_for(beat)
        _listed(depin_session.address, "mine")
        shell.run_line_magic("depin", "jobs")
        assert "mine" in capsys.readouterr().out
        shell.run_line_magic("depin", "cancel --mine")
        assert "cancelled" in capsys.readouterr().out
        assert "RUN ENDED" in proc.communicate(timeout=60)[0]
    finally:
        proc.kill()

"""`depin demo`: the main job on the embedded default cluster, through the real `%%depin` magic."""

from __future__ import annotations

import click

from depin_jupyter.cli.group import main

# A notebook in miniature: local setup, then cells that run on the cluster.
DEMO_CELLS = [
    "import numpy as np\nfrom depin_jupyter import xp\nn = 2_000_000\nseed = 42",
    "%%depin\n# Monte Carlo estimate of pi on a worker (cupy on a GPU worker, numpy otherwise)\n"
    "m = xp()\nrng = m.random.default_rng(seed)\npts = rng.random((n, 2))\n"
    "inside = int(((pts ** 2).sum(axis=1) <= 1.0).sum())\npi_estimate = 4 * inside / n\n"
    "print(f'{m.__name__}: {inside} of {n} points inside -> pi ~ {pi_estimate:.5f}')",
    "%%depin\n# a spectral derivative with an FFT: d/dx sin(x) = cos(x)\n"
    "m = xp()\nx = m.linspace(0, 2 * m.pi, 4096, endpoint=False)\nk = m.fft.fftfreq(x.size, d=x[1] - x[0]) * 2 * m.pi\n"
    "deriv = m.fft.ifft(1j * k * m.fft.fft(m.sin(x))).real\nmax_err = float(abs(deriv - m.cos(x)).max())\n"
    "print(f'spectral derivative max error {max_err:.2e}')",
    "print(f'back in the notebook: pi_estimate={pi_estimate:.5f}, max_err={max_err:.1e}')",
    "%depin status",
]


@main.command()
@click.option("--scheduler", default=None, help="scheduler address; default: the embedded local cluster")
def demo(scheduler: str | None) -> None:
    """Run a few %%depin cells (Monte Carlo pi, an FFT) and print what comes back."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "depin_jupyter")
    if scheduler:
        shell.run_line_magic("depin", f"connect {scheduler}")
    failed = False
    try:
        for code in DEMO_CELLS:
            click.secho("\n>>> " + code.replace("\n", "\n... "), fg="cyan")
            result = shell.run_cell(code, store_history=True)
            failed |= not result.success
    finally:
        shell.run_line_magic("depin", "close")
    if failed:
        raise SystemExit(1)
    click.secho("\ndemo finished: every cell ran on the cluster", fg="green")

"""`python -m depin_jupyter.server.reproduce_job NOTEBOOK STORE OUT.json`: one reproduce job of the panel.

The Jupyter server runs this in its own process (see `DepinManager.reproduce_start`): `reproduce`
points the fresh kernel it starts at a scratch store through environment variables, which must not
reach the kernels the server starts meanwhile. Writes the report's JSON to OUT.json; exit status 0
when a report was written (whatever its verdict), 1 with the error on stderr otherwise.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    notebook, store, out = argv
    from depin_jupyter.reproduce.rerun import reproduce

    try:
        report = reproduce(notebook, store)
    except Exception as exc:  # noqa: BLE001 - the panel shows the reason
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    with open(out, "w") as f:
        json.dump(report.to_json(), f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

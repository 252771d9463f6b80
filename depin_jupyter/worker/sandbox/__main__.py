"""``python -m depin_jupyter.worker.sandbox FD``: the sandboxed child process of one cell."""

import os
import sys

from depin_jupyter.worker.sandbox.child import main

try:
    main(sys.argv[1:])
except BaseException as e:  # noqa: BLE001 - the parent reports the tail of this
    if not isinstance(e, SystemExit):
        import traceback

        traceback.print_exc()
    os._exit(70)

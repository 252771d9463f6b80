"""The volunteer-side sandbox: each cell runs in a child process with limits, in a scratch directory.

A volunteer's worker runs code written by strangers. `run_sandboxed` executes one cell in a child
process (``python -m depin_jupyter.worker.sandbox``) and returns the pickle-free result payload the child
produced (`protocol.payloads.to_payload`). The worker never unpickles anything the child sends: the child talks
over a private pipe in length-prefixed frames (stream events, the cell's energy figures, then the
payload), each a `safe_codec` encoding; the worker decodes the events and the energy figures with
`safe_codec.decode` and passes the payload on as bytes.
What the child prints from C code (fd 1/2) goes to the worker's stderr, never into that pipe.

Protection, strongest available first (`describe` says what is active on this machine):

* bubblewrap (``bwrap``): the whole file system read-only, the home directories, /root, /run, /media,
  /mnt and /tmp hidden (the Python installation is bound back read-only), a private /tmp, /dev and
  /proc, no network (``depin.sandbox.network``), its own PID namespace: when the cell ends every
  process it started ends too.
* a separate user: a worker running as root runs the cell as ``depin.sandbox.user`` (nobody), so
  root's files are out of reach, `RLIMIT_NPROC` applies and setuid programs give nothing back
  (no_new_privs).
* rlimits set in the child before the cell runs: address space (``memory``), CPU time
  (``cpu-time``), processes and threads (``max-processes``); the parent enforces the wall time
  (``wall-time``) by killing the child's process group.
* a minimal environment (no inherited secrets), HOME and TMPDIR in a fresh 0700 scratch directory that
  is removed afterwards.

Every limit that stops a cell comes back as the cell's error, naming the limit and the setting to
change; the worker process itself carries on with the next cell.
"""

from __future__ import annotations

from depin_jupyter.worker.sandbox.isolation import describe
from depin_jupyter.worker.sandbox.limits import Limits, SandboxError
from depin_jupyter.worker.sandbox.parent import run_sandboxed

__all__ = ["Limits", "SandboxError", "describe", "run_sandboxed"]

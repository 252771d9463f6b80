"""The sandboxed probe `depin worker` runs before it joins: can a cell here import what this worker advertises?

A volunteer whose sandbox cannot import numpy (a root worker without bubblewrap whose Python the sandbox
user cannot read, a broken installation) would accept cells and fail every one of them. The probe runs a
real cell through `run_sandboxed`, with this machine's limits: numpy is imported and draws random numbers
(`numpy.random` needs `secrets`, the module a closed /root hid), every advertised top-level module is looked
up with `importlib.util.find_spec` (found, not imported: importing hundreds of packages would be slow and
some act when imported), and cupy is imported where GPUs are shared.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from depin_jupyter.protocol.records import RunSpec, new_run_id

__all__ = ["ProbeReport", "fix_for", "probe"]

_CODE = """\
import importlib.util as _u
depin_probe = {"missing": [], "errors": {}}
for _n in depin_probe_names:
    try:
        if _u.find_spec(_n) is None:
            depin_probe["missing"].append(_n)
    except Exception as _e:  # a module whose lookup fails is as unusable as a missing one
        depin_probe["missing"].append(_n)
for _n, _check in depin_probe_checks:
    try:
        exec(_check, {})
    except BaseException as _e:
        depin_probe["errors"][_n] = f"{type(_e).__name__}: {_e}"
depin_probe["uid"] = __import__("os").getuid()
"""

_NUMPY = "import numpy\nnumpy.random.default_rng().random(4).sum()\n"
_CUPY = "import cupy\ncupy.arange(4).sum().item()\n"


@dataclasses.dataclass
class ProbeReport:
    """What a sandboxed cell could do here: ``errors`` (check name -> error) for numpy (and cupy), the
    advertised modules it could not find, the uid cells ran as; ``failure`` when the probe itself failed."""

    errors: dict[str, str]
    missing: list[str]
    uid: int | None
    failure: str | None = None
    limit: str | None = None  # the sandbox limit that stopped the probe, if one did

    @property
    def usable(self) -> bool:
        return self.failure is None and "numpy" not in self.errors


def probe(modules: Iterable[str], gpu: bool = False) -> ProbeReport:
    """Run the probe cell in this machine's sandbox (``depin.sandbox.*``) and report what worked."""
    import importlib.util

    from depin_jupyter.protocol.payloads import from_payload
    from depin_jupyter.worker.sandbox import Limits, SandboxError, run_sandboxed

    def found_here(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    # Only what this process finds: a module missing here too is not the sandbox's doing.
    names = sorted(m for m in set(modules) if m.isidentifier() and found_here(m))
    checks = [("numpy", _NUMPY)] + ([("cupy", _CUPY)] if gpu else [])
    spec: RunSpec = {"run_id": new_run_id(), "name": "depin worker probe", "code": _CODE,
                     "filename": "<depin-worker-probe>", "modules": {}, "maybe_mutated": [],
                     "outputs": ["depin_probe"], "last_expr": False, "timeout": 120.0}
    try:
        payload = run_sandboxed(spec, {"depin_probe_names": names, "depin_probe_checks": checks},
                                emit=lambda msg: None, limits=Limits.from_config())
        result: dict[str, Any] = dict(from_payload(payload))
    except SandboxError as e:
        return ProbeReport({}, [], None, failure=str(e))
    except Exception as e:  # noqa: BLE001 - whatever stops the probe stops cells too: reported, not raised
        return ProbeReport({}, [], None, failure=f"the probe could not run: {type(e).__name__}: {e}")
    if result.get("status") != "ok":
        err = result.get("error") or {}
        return ProbeReport({}, [], None, failure=f"{err.get('type', 'error')}: {err.get('message', '')}".strip(),
                           limit=err.get("limit"))
    found = (result.get("outputs") or {}).get("depin_probe")
    if not isinstance(found, dict):
        return ProbeReport({}, [], None, failure="the probe cell returned nothing")
    return ProbeReport(dict(found.get("errors") or {}), list(found.get("missing") or []), found.get("uid"))


def fix_for(report: ProbeReport) -> str:
    """The one thing to do about an unusable sandbox on this machine."""
    from depin_jupyter.worker.sandbox.isolation import bwrap_works

    if report.limit and report.limit != "sandbox":
        return (f"raise depin.sandbox.{report.limit} (or set it to null): a cell that imports numpy must fit in it "
                f"here")
    if os.geteuid() == 0:
        works, _why = bwrap_works(False, "nobody")
        if not works:
            return ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
                    "bubblewrap`), or run `depin worker` as an unprivileged user that owns its Python")
    return ("make numpy importable by this worker's Python (`python -m pip install numpy` in the environment "
            "`depin worker` runs from), then start it again")

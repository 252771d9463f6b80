"""The run manifest: frozen records, their JSON form (manifest-schema.json), and who/what ran a cell.

The JSON form is what is stored (run group attribute ``depin_manifest``) and what the schema
describes; the dataclasses are how Python code reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter.store._digest import DEFAULT_ALGORITHM

SCHEMA_VERSION = 2
"""2: digests name their algorithm (``blake3:<hex>`` / ``sha256:<hex>``); 1: bare hex SHA-256 (still read)."""
READABLE_VERSIONS = (1, 2)
SCHEMA_FILE = pathlib.Path(__file__).with_name("manifest-schema.json")
MANIFEST_ATTR = "depin_manifest"
"""Run group attribute holding the manifest; its presence is what makes a run complete."""

_CORE_PACKAGES = ("depin-jupyter", "numpy", "zarr", "numcodecs", "dask", "distributed")
_OPTIONAL_MODULES = ("xarray", "cupy", "pandas", "scipy", "dask_cuda")


@dataclass(frozen=True)
class OutputRecord:
    """One stored output: an array (``array``/``pickle``), a value in the manifest, or an xarray group."""

    kind: str
    pytype: str
    portable: bool = True
    path: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    chunks: tuple[int, ...] | None = None
    codec: list[Any] | None = None
    nbytes: int | None = None
    digest: str | None = None
    metadata_sha256: str | None = None
    chunk_digests: Mapping[str, str] | None = None
    value: Any = None
    variables: Mapping[str, OutputRecord] | None = None
    variable: str | None = None
    dataarray_name: Any = None

    def to_json(self) -> dict[str, Any]:
        """The manifest form: None fields left out, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name not in ("value",):
                continue
            if f.name == "value" and self.kind != "value":
                continue
            if f.name == "variables":
                v = {k: r.to_json() for k, r in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> OutputRecord:
        """Inverse of `to_json`."""
        kw = dict(doc)
        for name in ("shape", "chunks"):
            if kw.get(name) is not None:
                kw[name] = tuple(kw[name])
        if kw.get("variables") is not None:
            kw["variables"] = {k: cls.from_json(v) for k, v in kw["variables"].items()}
        return cls(**kw)

    def arrays(self) -> dict[str, OutputRecord]:
        """The array records inside this output, by store path (one for arrays, one per xarray variable)."""
        if self.kind in ("array", "pickle") and self.path:
            return {self.path: self}
        if self.kind == "xarray" and self.variables:
            return {r.path: r for r in self.variables.values() if r.path}
        return {}


@dataclass(frozen=True)
class RunManifest:
    """Everything needed to cite, trust and re-run one cell execution."""

    run_id: str
    name: str | None
    status: str
    created: str
    code: str
    code_sha256: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, OutputRecord]
    options: Mapping[str, Any]
    cache_key: str | None
    worker: Mapping[str, Any]
    environment: Mapping[str, Any]
    timings: Mapping[str, float]
    extra: Mapping[str, Any] = field(default_factory=dict)
    digest_algorithm: str = DEFAULT_ALGORITHM
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The stored JSON form (validated by manifest-schema.json)."""
        return {
            "schema_version": self.schema_version,
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "created": self.created,
            "code": {"text": self.code, "sha256": self.code_sha256},
            "inputs": dict(self.inputs),
            "outputs": {k: r.to_json() for k, r in self.outputs.items()},
            "options": dict(self.options),
            "cache_key": self.cache_key,
            "worker": dict(self.worker),
            "environment": dict(self.environment),
            "timings": dict(self.timings),
            "extra": dict(self.extra),
            "digests": {"algorithm": self.digest_algorithm, "rules": "depin_jupyter.store._digest"},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunManifest:
        """Inverse of `to_json`; raises KeyError/TypeError on a malformed document."""
        if doc.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported manifest schema_version {doc.get('schema_version')!r} "
                             "(written by a newer depin-jupyter? upgrade it)")
        return cls(
            run_id=doc["run_id"],
            name=doc["name"],
            status=doc["status"],
            created=doc["created"],
            code=doc["code"]["text"],
            code_sha256=doc["code"]["sha256"],
            inputs=dict(doc["inputs"]),
            outputs={k: OutputRecord.from_json(v) for k, v in doc["outputs"].items()},
            options=dict(doc["options"]),
            cache_key=doc["cache_key"],
            worker=dict(doc["worker"]),
            environment=dict(doc["environment"]),
            timings=dict(doc["timings"]),
            extra=dict(doc.get("extra", {})),
            digest_algorithm=str(doc.get("digests", {}).get("algorithm", "sha256")),
            schema_version=int(doc["schema_version"]),
        )


@dataclass(frozen=True)
class RunSummary:
    """One line of `ResultStore.runs()`: complete runs and the ones that must never be served."""

    run_id: str
    name: str | None
    status: str
    complete: bool
    created: str
    outputs: tuple[str, ...]
    cache_key: str | None
    detail: str = ""


@functools.cache
def schema() -> dict[str, Any]:
    """The manifest JSON schema shipped with the package."""
    return json.loads(SCHEMA_FILE.read_text())


def validate(doc: Mapping[str, Any]) -> None:
    """Raise jsonschema.ValidationError if ``doc`` is not a valid manifest (needs `jsonschema`)."""
    import jsonschema

    jsonschema.validate(dict(doc), schema())


def _cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[dict[str, Any]]:
    """GPU model, memory and driver through NVML; empty without a GPU or pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any failure is reported, not raised
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
            })
        return gpus
    except Exception:  # noqa: BLE001 - any failure is reported, not raised
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: S110, BLE001 - best effort
            pass


@functools.cache
def local_worker() -> dict[str, Any]:
    """This process's host and hardware: the default worker identity of a manifest."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "gpus": _gpus(),
    }


def local_environment(extra_packages: Mapping[str, str] | None = None) -> dict[str, Any]:
    """This process's Python and the versions of the packages that shape results (core + imported).

    Call it where the cell ran and pass it to `RunWriter.finish(environment=...)`."""
    packages: dict[str, str] = {}
    for dist in _CORE_PACKAGES:
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    for mod in _OPTIONAL_MODULES:
        version = getattr(sys.modules.get(mod), "__version__", None)
        if isinstance(version, str):
            packages[mod] = version
    packages.update(extra_packages or {})
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "packages": packages}

"""The `depin` settings: defaults from depin.yaml merged into `dask.config`, read only through `get`.

Users override them the Dask way: a YAML file in ~/.config/dask/, `dask.config.set(...)`, or
environment variables such as ``DASK_DEPIN__TIMEOUT=60`` / ``DASK_DEPIN__LOCAL_CLUSTER__N_WORKERS=4``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import dask.config
import yaml

_HERE = pathlib.Path(__file__).parent
DEFAULTS_FILE = _HERE / "depin.yaml"
SCHEMA_FILE = _HERE / "depin-schema.yaml"

with open(DEFAULTS_FILE) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def get(key: str, override: Any = None) -> Any:
    """The setting ``depin.<key>``, or ``override`` when it is not None (a magic option)."""
    if override is not None:
        return override
    return dask.config.get(f"depin.{key}")


def seconds(key: str, override: Any = None) -> float | None:
    """A duration setting in seconds (accepts 10, "10s", "50ms"); None stays None."""
    value = get(key, override)
    if value is None:
        return None
    return float(dask.utils.parse_timedelta(value, default="s"))


def nbytes(key: str) -> int:
    """A size setting in bytes (accepts 1000000, "4GiB")."""
    return int(dask.utils.parse_bytes(get(key)))


def as_yaml() -> str:
    """The effective `depin` settings, as `%depin config` prints them."""
    return yaml.safe_dump({"depin": dask.config.get("depin")}, sort_keys=False)

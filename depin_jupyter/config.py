"""The `depin` settings: defaults from depin.yaml merged into `dask.config`, read only through `get`.

Users override them the Dask way: a YAML file in ~/.config/dask/, `dask.config.set(...)`, or
environment variables such as ``DASK_DEPIN__TIMEOUT=60`` / ``DASK_DEPIN__LOCAL_CLUSTER__N_WORKERS=4``.
`check` validates them against depin-schema.yaml (the kernel calls it before each run).
"""

from __future__ import annotations

import copy
import difflib
import os
import pathlib
from typing import Any

import dask.config
import yaml

from depin_jupyter.errors import DepinConfigError

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


_sources_checked = False
_effective_checked: Any = None   # the effective `depin` settings last found valid


def check() -> None:
    """Validate the `depin` settings against depin-schema.yaml; raises DepinConfigError on the first problem.

    Environment variables and YAML files are read as given, since Dask silently drops a value where its
    defaults hold a mapping (``DASK_DEPIN__STORE=x`` would otherwise be ignored). Cheap when nothing changed.
    """
    global _sources_checked, _effective_checked
    if not _sources_checked:
        for where, path, value in _env_settings():
            _check_leaf(path, value, where)
        for file, doc in dask.config.collect_yaml(dask.config.paths, return_paths=True):  # type: ignore[misc]
            if isinstance(doc, dict) and "depin" in doc:
                _check_doc(doc["depin"], ("depin",), f"in {file}")
        _sources_checked = True
    effective = dask.config.config.get("depin")
    if effective != _effective_checked:
        _check_doc(effective, ("depin",), "in the effective settings (dask.config.set or a YAML file)")
        _effective_checked = copy.deepcopy(effective)


def _schema() -> dict[str, Any]:
    global _SCHEMA
    if _SCHEMA is None:
        with open(SCHEMA_FILE) as f:
            _SCHEMA = yaml.safe_load(f)
    return _SCHEMA


_SCHEMA: dict[str, Any] | None = None


def _env_settings() -> list[tuple[str, tuple[str, ...], Any]]:
    """(variable, key path, parsed value) of every ``DASK_DEPIN__...`` environment variable."""
    out = []
    for var, text in sorted(os.environ.items()):
        if var.upper().startswith("DASK_DEPIN__"):
            path = tuple(p.lower().replace("_", "-") for p in var[5:].split("__"))
            out.append((f"from environment variable {var}", path, dask.config.interpret_value(text)))
    return out


def _check_doc(doc: Any, path: tuple[str, ...], where: str) -> None:
    """Check a (partial) settings mapping at ``path``: groups are walked, each leaf checked."""
    node = _node(path, where)
    if isinstance(doc, dict) and "properties" in node:
        for key, value in doc.items():
            _check_doc(value, (*path, str(key).replace("_", "-")), where)
    else:
        _check_leaf(path, doc, where)


def _node(path: tuple[str, ...], where: str) -> dict[str, Any]:
    """The schema of the setting at ``path``; an unknown key is an error naming the nearest known one."""
    node = _schema()
    for i, part in enumerate(path):
        props = node.get("properties")
        if props is None:
            raise DepinConfigError(f"{_dotted(path[:i])} is a single value, not a group: there is no setting "
                                   f"{_dotted(path)} ({where})")
        if part not in props:
            near = difflib.get_close_matches(part, list(props), n=1, cutoff=0.5)
            hint = (f"; did you mean {_dotted((*path[:i], near[0]))} ({_env_name((*path[:i], near[0]))})?"
                    if near else f"; the settings there are {', '.join(props)}")
            raise DepinConfigError(f"unknown setting {_dotted(path[:i + 1])} ({where}){hint}")
        node = props[part]
    return node


def _check_leaf(path: tuple[str, ...], value: Any, where: str) -> None:
    node = _node(path, where)
    props = node.get("properties")
    if props is not None and not isinstance(value, dict):
        fits = next((k for k, s in props.items() if _valid(s, value)), next(iter(props)))
        raise DepinConfigError(
            f"{_dotted(path)} is a group of settings ({', '.join(props)}), not a value: got {value!r} ({where}). "
            f"Set one of its keys, e.g. {_dotted((*path, fits))} ({_env_name((*path, fits))}={value})")
    if props is not None:
        _check_doc(value, path, where)
        return
    problem = _first_error(node, value)
    if problem:
        raise DepinConfigError(f"{_dotted(path)}: {problem} ({where}); see depin_jupyter/depin.yaml for "
                               f"its default and meaning")


def _valid(node: dict[str, Any], value: Any) -> bool:
    return "properties" not in node and _first_error(node, value) is None


_TYPES: dict[str, Any] = {"string": str, "boolean": bool, "null": type(None), "array": list, "object": dict,
                          "integer": int, "number": (int, float)}
SCHEMA_KEYWORDS = frozenset({"type", "enum", "minimum", "maximum", "exclusiveMinimum", "pattern", "items",
                             "oneOf", "properties", "additionalProperties"})
"""The JSON-schema keywords `_first_error` understands: all that depin-schema.yaml uses (a test checks).
(jsonschema itself takes 1.5 s to import here, too long for a notebook's first cell.)"""


def _first_error(node: dict[str, Any], value: Any) -> str | None:
    """What is wrong with ``value`` under the leaf schema ``node`` (the keywords above), or None."""
    if "oneOf" in node:
        fits = [s for s in node["oneOf"] if _first_error(s, value) is None]
        return None if len(fits) == 1 else f"{value!r} is not one of the allowed forms"
    if "enum" in node and value not in node["enum"]:
        return f"{value!r} is not one of {node['enum']}"
    types = node.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        is_bool = isinstance(value, bool)
        if not any(isinstance(value, _TYPES[t]) and (t == "boolean" or not is_bool) for t in names):
            return f"{value!r} is not of type {' or '.join(names)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in node and value < node["minimum"]:
            return f"{value!r} is less than the minimum of {node['minimum']}"
        if "maximum" in node and value > node["maximum"]:
            return f"{value!r} is more than the maximum of {node['maximum']}"
        if "exclusiveMinimum" in node and value <= node["exclusiveMinimum"]:
            return f"{value!r} must be more than {node['exclusiveMinimum']}"
    if isinstance(value, str) and "pattern" in node:
        import re

        if not re.search(node["pattern"], value):
            return f"{value!r} does not match {node['pattern']!r}"
    if isinstance(value, list) and "items" in node:
        for item in value:
            problem = _first_error(node["items"], item)
            if problem:
                return f"an item: {problem}"
    return None


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _env_name(path: tuple[str, ...]) -> str:
    return "DASK_" + "__".join(p.upper().replace("-", "_") for p in path)

"""Binding a run's results into the notebook's namespace as if the cell had run here.

Values are bound; inputs the cell changed are updated in place (so views and aliases of them see the
change); what the results still share with the inputs is rebuilt on the notebook's own objects: numpy views
of an input (or of another output) become views of the notebook's array (`protocol.views`), and objects that
were inside an input and still are inside a result, or are an output themselves, are the notebook's objects
again, brought up to date in place (`protocol.parts`). Classes defined in the notebook get their methods'
globals back (unpickling a result re-sets them to the copy cloudpickle made).
"""

from __future__ import annotations

import collections
import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from depin_jupyter.protocol.parts import get_path, set_step, valid_path
from depin_jupyter.protocol.values import rebind_globals, unbox
from depin_jupyter.protocol.views import ViewRecord, rebuild

__all__ = ["adopt_classes", "apply_results", "update_in_place", "view_values"]

_SHARED = ("views", "parts", "kept")


def apply_results(namespace: dict[str, Any], result: Mapping[str, Any], keep: Callable[[str], bool] | None = None,
                  trusted: bool = True) -> list[str]:
    """Bind a run's results into ``namespace``; returns warnings to show the user.

    ``keep(name) -> bool`` may veto binding a name (it was rebound meanwhile); vetoed names are reported.
    ``trusted=False`` (a volunteer network) ignores descriptions of shared objects: only values are bound.
    """
    warnings: list[str] = []
    vetoed: list[str] = []

    def allowed(name: str) -> bool:
        if keep is None or keep(name):
            return True
        vetoed.append(name)
        return False

    shared = {k: result.get(k) or {} for k in _SHARED} if trusted else {k: {} for k in _SHARED}
    inputs = _input_objects(namespace, shared)      # the notebook's objects, before anything is rebound
    old = _resolve(inputs, shared)
    for name, modpath in result.get("modules", {}).items():
        if allowed(name):
            try:
                namespace[name] = sys.modules.get(modpath) or importlib.import_module(modpath)
            except ImportError as e:
                warnings.append(f"the cell imported {modpath!r} on the worker, but it cannot be imported here ({e})")
    for name, value in result.get("mutated", {}).items():
        if allowed(name):
            value = _graft(adopt_classes(unbox(value), namespace), shared["kept"].get(name, ()), old)
            local = namespace.get(name)
            if local is None or not update_in_place(local, value):
                namespace[name] = inputs[name] = value
    for name, value in result.get("outputs", {}).items():
        if allowed(name):
            namespace[name] = _output(name, value, namespace, shared, old)
    _bind_views(namespace, shared["views"], inputs, allowed)
    for name, source in result.get("aliases", {}).items():
        if allowed(name):
            namespace[name] = namespace[source]
    for name in result.get("deleted", []):
        if allowed(name):
            namespace.pop(name, None)
    for name, why in result.get("skipped", {}).items():
        warnings.append(f"output {name!r} of type {why} could not be brought back from the worker; "
                        f"it is not bound here")
    if vetoed:
        warnings.append(f"kept your current value of {', '.join(vetoed)}: rebound or changed since the run "
                        f"was submitted (the run's values are in its handle's .outputs)")
    return warnings


def _input_objects(namespace: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """The notebook's objects that views, parts and kept objects refer to, by input name."""
    names = {rec["of"] for rec in shared["views"].values() if rec.get("source") == "input"}
    names |= {src for src, _ in shared["parts"].values()}
    names |= {rec[1] for recs in shared["kept"].values() for rec in recs}
    return {n: namespace[n] for n in names if n in namespace}


def _resolve(inputs: dict[str, Any], shared: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """The notebook's object at each (input, path) a result refers to, found before any of it changes."""
    wanted = [(src, path) for src, path in shared["parts"].values()]
    wanted += [(rec[1], rec[2]) for recs in shared["kept"].values() for rec in recs]
    found: dict[tuple[str, str], Any] = {}
    for src, path in wanted:
        if src in inputs and valid_path(path):
            try:
                found[(src, repr(path))] = get_path(inputs[src], path)
            except LookupError:
                continue
    return found


def _output(name: str, value: Any, namespace: dict[str, Any], shared: dict[str, Any],
            old: dict[tuple[str, str], Any]) -> Any:
    """What to bind for output ``name``: the notebook's own object where the output was one of its parts."""
    value = _graft(adopt_classes(rebind_globals(unbox(value), namespace), namespace), shared["kept"].get(name, ()), old)
    part = shared["parts"].get(name)
    local = old.get((part[0], repr(part[1]))) if part else None
    if local is not None and update_in_place(local, value):
        return local
    return value


def _graft(value: Any, records: Any, old: dict[tuple[str, str], Any]) -> Any:
    """Put the notebook's objects back where ``value`` holds what was inside an input (deepest first),
    each brought up to date in place."""
    for path, src, src_path in sorted(records, key=lambda r: -len(r[0])):
        local = old.get((src, repr(src_path)))
        if local is None or not valid_path(path) or not path:
            continue
        try:
            parent, new = get_path(value, path[:-1]), get_path(value, path)
        except LookupError:
            continue
        if new is local or update_in_place(local, new):
            set_step(parent, path[-1], local)
    return value


def _bind_views(namespace: dict[str, Any], views: dict[str, ViewRecord], inputs: dict[str, Any],
                allowed: Callable[[str], bool]) -> None:
    """Bind each view on the notebook's array; views of views after their source (a stored copy stays
    bound where the source is not such an array, e.g. a lazy one)."""
    pending = {n: r for n, r in views.items() if allowed(n)}
    while pending:
        ready = {n: r for n, r in pending.items() if r["source"] == "input" or r["of"] not in pending}
        if not ready:
            break
        for name, rec in ready.items():
            del pending[name]
            source = inputs.get(rec["of"]) if rec["source"] == "input" else namespace.get(rec["of"])
            view = _view_on(source, rec)
            if view is not None:
                namespace[name] = view


def _view_on(source: Any, rec: ViewRecord) -> Any:
    if source is None or not valid_path(rec.get("path", [])):
        return None
    try:
        return rebuild(get_path(source, rec.get("path", [])), rec)
    except LookupError:
        return None


def view_values(namespace: dict[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a run's view outputs, from the notebook's arrays as the run left them (for the store)."""
    out: dict[str, Any] = {}
    views: dict[str, ViewRecord] = result.get("views") or {}
    for name, rec in views.items():
        if rec["source"] == "input":
            source = unbox(result.get("mutated", {}).get(rec["of"], namespace.get(rec["of"])))
        else:
            source = unbox(result.get("outputs", {}).get(rec["of"], out.get(rec["of"])))
        view = _view_on(source, rec)
        if view is not None:
            out[name] = view
    return out


def update_in_place(local: Any, new: Any) -> bool:
    """Make ``local`` equal to ``new`` without replacing it; False when that is not possible."""
    if local is new:
        return True
    if type(local) is not type(new):
        return False
    mod = type(local).__module__
    if mod.startswith(("numpy", "cupy")) and hasattr(local, "shape"):
        if local.shape != new.shape or local.dtype != new.dtype or not local.flags.writeable:
            return False
        local[...] = new
        return True
    if isinstance(local, (list, bytearray)):
        local[:] = new
        return True
    if isinstance(local, (dict, collections.OrderedDict, set)):
        local.clear()
        local.update(new)
        return True
    if mod.startswith("numpy.random"):
        if hasattr(local, "bit_generator"):
            local.bit_generator.state = new.bit_generator.state  # a seeded Generator advanced by the cell
            return True
        if hasattr(local, "set_state"):
            local.set_state(new.get_state())  # a legacy RandomState
            return True
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(local, pd.Index):
        # An Index's values never change in place; its names do (`df.index.names = [...]`).
        if local.dtype != new.dtype or not local.equals(new):
            return False
        local.names = list(new.names)
        return True
    if hasattr(local, "__dict__") and not isinstance(local, type):
        local.__dict__.clear()
        local.__dict__.update(new.__dict__)
        return True
    return False


def adopt_classes(value: Any, namespace: dict[str, Any]) -> Any:
    """Give the notebook's classes among ``value``, its type and its items their methods' globals back.

    Unpickling an instance of a class defined in the notebook re-sets that very class's methods to copies whose
    globals hold only the names they mention, so a `__repr__` that evaluates other names (`eval(name)`) would
    fail here; the notebook's namespace is what they saw before the cell, and what they see locally.
    """
    items = value if isinstance(value, (list, tuple)) else list(value.values()) if isinstance(value, dict) else []
    for obj in [value, *items[:100]]:
        cls = obj if isinstance(obj, type) else type(obj)
        for klass in getattr(cls, "__mro__", ()):
            if klass.__module__ == "__main__":
                _rebind_methods(klass, namespace)
    return value


def _rebind_methods(klass: type, namespace: dict[str, Any]) -> None:
    for attr, member in list(vars(klass).items()):
        func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
        if isinstance(func, types.FunctionType) and func.__module__ == "__main__" and func.__globals__ is not namespace:
            rebound = rebind_globals(func, namespace)
            try:
                setattr(klass, attr, type(member)(rebound) if func is not member else rebound)
            except (AttributeError, TypeError):
                continue
        elif isinstance(member, property) and isinstance(member.fget, types.FunctionType) and \
                member.fget.__module__ == "__main__" and member.fget.__globals__ is not namespace:
            funcs: list[Any] = [rebind_globals(f, namespace) if isinstance(f, types.FunctionType) else f
                                for f in (member.fget, member.fset, member.fdel)]
            fget, fset, fdel = funcs
            try:
                setattr(klass, attr, property(fget, fset, fdel, member.__doc__))
            except (AttributeError, TypeError):
                continue

"""Private data stays home: a cell that would send a private variable anywhere but a trusted pool is refused."""

from __future__ import annotations

import types
from typing import Any

from depin_jupyter import config
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.records import RunOptions

__all__ = ["check_private", "effective_pool"]


def effective_pool(options: RunOptions) -> str | None:
    """The pool a run is restricted to: --pool, else config depin.pool (None: any worker)."""
    pool = options.pool if options.pool is not None else config.get("pool")
    return str(pool) if pool else None


def _private_inputs(names: list[str], namespace: dict[str, Any], private: set[str]) -> list[str]:
    """The inputs that are private or carry private data: a private name, another name for the same
    object, or a notebook function that reads a private global (cloudpickle would take it along)."""
    marked = [namespace[p] for p in private if p in namespace]

    def same_object(v: Any) -> bool:
        if v is None or isinstance(v, bool) or (type(v) is int and -5 <= v <= 256):
            return False  # shared singletons are not the private data itself
        return any(v is m for m in marked)

    def code_names(code: types.CodeType) -> set[str]:
        out = set(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                out |= code_names(c)
        return out

    out = []
    for n in names:
        v = namespace.get(n)
        if n in private or same_object(v) or (isinstance(v, types.FunctionType) and v.__module__ == "__main__"
                                               and code_names(v.__code__) & private):
            out.append(n)
    return out


def check_private(session: Session, names: list[str], namespace: dict[str, Any], options: RunOptions) -> list[str]:
    """Refuse (DepinUsageError) a cell that would send private data anywhere but a trusted pool; returns the
    private inputs it sends. The embedded cluster runs on this machine: nothing leaves it."""
    private = set(options.private or ())
    sent = _private_inputs(names, namespace, private) if private else []
    if not sent or session.cluster is not None:
        return sent
    pool = effective_pool(options)
    trusted = [str(p) for p in config.get("trusted-pools") or ()]
    if pool is None or pool not in trusted:
        from depin_jupyter.errors import DepinUsageError

        where = "any worker of the cluster (no --pool)" if pool is None else f"pool {pool!r}"
        hint = f"run it with --pool {trusted[0]}" if trusted else "list a pool you trust in depin.trusted-pools"
        raise DepinUsageError(
            f"the cell reads private data ({', '.join(repr(n) for n in sent)}; %depin private / --private) and "
            f"would send it to {where}; private data goes only to a trusted pool (depin.trusted-pools: "
            f"{', '.join(trusted) or 'none'}). Nothing was sent: {hint}, or unmark it (%depin private --clear).")
    return sent

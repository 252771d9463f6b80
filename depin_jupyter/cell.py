"""Pure analysis of a cell's source: which names it reads, binds and may mutate. No I/O.

The rules follow Python's own scoping: top-level statements run now, function and lambda bodies
run later (their free names are read "deferred"), comprehensions and class bodies run now in
their own scope. The analysis is conservative where it must guess: a name that *might* be read
before it is bound is an input; an input is only assumed unchanged when every use of it is
provably read-only (an operand, or an argument of a known pure builtin or method).
"""

from __future__ import annotations

import ast
import builtins
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CellPlan", "analyze", "imported_packages", "last_expression_shown", "parse"]

# CPython's AST constructor keeps its recursion depth in state the threads of an interpreter share: two
# threads parsing at once can fail with "SystemError: AST constructor recursion depth mismatch" (reported
# from threaded programs, python/cpython#106905; seen here on 3.11.7 while a map's batches were prepared in
# its thread pool). Parses here take turns.
_PARSING = threading.Lock()


def parse(code: str | bytes, filename: str = "<cell>") -> ast.Module:
    """``ast.parse`` of ``code``, one thread at a time (see ``_PARSING``)."""
    with _PARSING:
        return ast.parse(code, filename=filename, mode="exec")

# Methods of arrays and containers that return a new object and never change their receiver.
PURE_METHODS = frozenset(
    "sum mean std var min max any all prod argmax argmin copy astype tolist item dot "
    "cumsum cumprod ravel flatten nonzero conj conjugate round trace diagonal "
    "keys values items get count index startswith endswith split join strip format "
    "get_array_module".split()
)
# Builtins that only read their arguments.
PURE_CALLS = frozenset(
    "print len float int str repr bool abs isinstance type hash id sum min max sorted "
    "round range enumerate zip list tuple set frozenset dict format divmod pow".split()
)
# Attributes that are plain data (reading them cannot hand out a writable alias).
DATA_ATTRS = frozenset("shape dtype size ndim nbytes itemsize real_if_close __class__".split())


@dataclass(frozen=True)
class CellPlan:
    """What a cell needs and produces, found from its source alone."""

    code: str
    reads: tuple[str, ...]          # names possibly read before the cell binds them (input candidates)
    immediate_reads: tuple[str, ...]  # of those, read while the cell runs (not only in def bodies)
    binds: tuple[str, ...]          # names bound at top level (output candidates), in order
    deletes: tuple[str, ...]        # names the cell `del`s at top level
    maybe_mutated: tuple[str, ...]  # read names used in a way that could change them in place
    guarded_reads: tuple[str, ...] = field(default=())  # read only inside `try` (NameError may be handled)
    has_star_import: bool = False
    last_expr: bool = False         # the last statement is an expression whose value is shown
    imports: tuple[str, ...] = ()   # top-level packages the cell imports (absolute imports, anywhere)

    def inputs(self, namespace: dict[str, object]) -> list[str]:
        """Input names: read before bound and present in ``namespace`` (dunders excluded)."""
        return [n for n in self.reads if n in namespace and not _is_dunder(n)]

    def undefined(self, namespace: dict[str, object]) -> list[str]:
        """Names the cell reads right away that neither it, the namespace nor builtins define."""
        bound = set(self.binds)
        return [
            n
            for n in self.immediate_reads
            if n not in namespace
            and n not in bound
            and n not in self.guarded_reads
            and not hasattr(builtins, n)
        ]


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def last_expression_shown(tree: ast.Module, code: str) -> bool:
    """True when IPython would display the value of the cell's last statement."""
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return False
    return not code.rstrip().endswith(";")


def analyze(code: str, filename: str = "<cell>") -> CellPlan:
    """Analyze a cell; raises SyntaxError (with the cell's own line numbers) if it does not parse."""
    tree = parse(code, filename)
    scan = _TopLevel()
    for stmt in tree.body:
        scan.statement(stmt)
    mutated = _maybe_mutated(tree, set(scan.reads))
    return CellPlan(
        code=code,
        reads=tuple(scan.reads),
        immediate_reads=tuple(scan.immediate),
        binds=tuple(scan.binds),
        deletes=tuple(scan.deletes),
        maybe_mutated=tuple(n for n in scan.reads if n in mutated),
        guarded_reads=tuple(scan.guarded),
        has_star_import=scan.star,
        last_expr=last_expression_shown(tree, code),
        imports=imported_packages(tree),
    )


def imported_packages(tree: ast.AST) -> tuple[str, ...]:
    """Top-level package names of every absolute import in ``tree`` (relative imports skipped)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for n in names:
            top = n.split(".")[0]
            if top not in found:
                found.append(top)
    return tuple(found)


class _Names(ast.NodeVisitor):
    """Loads and stores of one top-level statement, with nested scopes resolved."""

    def __init__(self) -> None:
        self.loads: list[str] = []       # read while the statement runs
        self.deferred: list[str] = []    # free names of function/lambda bodies
        self.stores: list[str] = []
        self.deletes: list[str] = []
        self.star = False

    # -- plain names
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.loads.append(node.id)
        elif isinstance(node.ctx, ast.Store):
            self.stores.append(node.id)
        else:
            self.deletes.append(node.id)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):  # `x += 1` reads x first
            self.loads.append(node.target.id)
        self.visit(node.value)
        self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.stores.append(node.target.id)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.stores.append(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.star = True
            else:
                self.stores.append(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self.stores.append(node.name)
        for stmt in node.body:
            self.visit(stmt)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self.stores.append(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.stores.append(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self.generic_visit(node)
        if node.rest:
            self.stores.append(node.rest)

    # -- nested scopes
    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = node.args
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        body: list[Any] = node.body if isinstance(node.body, list) else [node.body]
        inner = _Names()
        for stmt in body:
            inner.visit(stmt)
        declared_global = _globals_in(body)
        local = (params | set(inner.stores) | set(inner.deletes)) - declared_global
        self.deferred.extend(n for n in [*inner.loads, *inner.deferred] if n not in local)
        self.stores.extend(n for n in inner.stores if n in declared_global)
        self.star |= inner.star

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for dec in node.decorator_list:
            self.visit(dec)
        if node.returns is not None:
            self.visit(node.returns)
        for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            if a.annotation is not None:
                self.visit(a.annotation)
        self._function(node)
        self.stores.append(node.name)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        inner = _Names()
        for stmt in node.body:
            inner.visit(stmt)
        class_locals = set(inner.stores)
        # The class body runs now; its methods' free names are read later and skip the class scope.
        self.loads.extend(inner.loads)
        self.deferred.extend(inner.deferred)
        self.stores.extend(n for n in class_locals if n in _globals_in(node.body))
        self.stores.append(node.name)

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        gens = node.generators
        self.visit(gens[0].iter)  # evaluated in the enclosing scope
        inner = _Names()
        for i, gen in enumerate(gens):
            inner.visit(gen.target)
            if i:
                inner.visit(gen.iter)
            for cond in gen.ifs:
                inner.visit(cond)
        if isinstance(node, ast.DictComp):
            inner.visit(node.key)
            inner.visit(node.value)
        else:
            inner.visit(node.elt)
        targets = set()
        for gen in gens:
            t = _Names()
            t.visit(gen.target)
            targets |= set(t.stores)
        self.loads.extend(n for n in inner.loads if n not in targets)
        self.deferred.extend(inner.deferred)
        # walrus inside a comprehension binds in the enclosing scope
        self.stores.extend(n for n in inner.stores if n not in targets)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension  # type: ignore[assignment]


def _globals_in(body: list[ast.stmt]) -> set[str]:
    """Names declared `global` directly in a scope's body (not in its nested scopes)."""
    found: set[str] = set()
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Global):
            found.update(node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return found


class _TopLevel:
    """Walks top-level statements in order, tracking which names are surely bound so far."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.immediate: list[str] = []
        self.guarded: list[str] = []
        self.binds: list[str] = []
        self.deletes: list[str] = []
        self.star = False
        self._sure: set[str] = set()

    def _add(self, seq: list[str], names: list[str]) -> None:
        for n in names:
            if n not in seq:
                seq.append(n)

    def statement(self, stmt: ast.stmt) -> None:
        names = _Names()
        names.visit(stmt)
        # `del x` needs x to exist: a name deleted before the cell surely bound it is read too
        unsure_loads = [n for n in [*names.loads, *names.deletes] if n not in self._sure]
        unsure_deferred = [n for n in names.deferred if n not in self._sure]
        self._add(self.reads, unsure_loads + unsure_deferred)
        if isinstance(stmt, ast.Try) or isinstance(stmt, getattr(ast, "TryStar", ast.Try)):
            self._add(self.guarded, _loads_in(stmt.body))  # type: ignore[attr-defined]  # Try or TryStar
        self._add(self.immediate, unsure_loads)
        self._add(self.binds, names.stores)
        self._add(self.deletes, names.deletes)
        self.star |= names.star
        # Only straight-line bindings are sure; a binding inside if/for/while/try may not happen.
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Import, ast.ImportFrom,
                             ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._sure |= set(names.stores)
        self._sure -= set(names.deletes)


def _loads_in(body: list[ast.stmt]) -> list[str]:
    found = _Names()
    for stmt in body:
        found.visit(stmt)
    return found.loads


def _maybe_mutated(tree: ast.Module, names: set[str]) -> set[str]:
    """Names (of ``names``) with at least one use that is not provably read-only."""
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    mutated: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load):
            if not _read_only_use(node, parents):
                mutated.add(node.id)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            if node.target.id in names:  # `a += 1` on an array changes it in place
                mutated.add(node.target.id)
    return mutated


def _read_only_use(node: ast.expr, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    if isinstance(parent, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.FormattedValue)):
        return True
    if isinstance(parent, ast.Call) and node is not parent.func:
        func = parent.func
        return isinstance(func, ast.Name) and func.id in PURE_CALLS
    if isinstance(parent, ast.Attribute) and parent.value is node:
        grand = parents.get(parent)
        if parent.attr in PURE_METHODS and isinstance(grand, ast.Call) and grand.func is parent:
            return True  # the receiver is only read (an `out=` argument is watched on its own)
        if parent.attr in DATA_ATTRS:
            return True
    return False

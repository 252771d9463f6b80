"""The house is tested, not only drawn: import contracts, no cycles, no reaching into other modules' privates.

The import-linter contracts live in pyproject.toml (layers: entry points > kernel | worker | network >
reproduce > store > protocol > leaves; the kernel, the worker and the coordinator independent of each other,
meeting only in protocol and through `worker/entry.py`).
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "depin_jupyter"
MODULE_MAX_LINES = 600
FUNCTION_MAX_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "labextension" in path.parts:
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _lint_imports(config: pathlib.Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (it is in the test extra)"
    return subprocess.run([exe, "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_import_linter_contracts_hold():
    out = _lint_imports(ROOT / "pyproject.toml")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout, out.stdout[-2000:]


def test_import_linter_catches_a_broken_contract(tmp_path):
    """The same run fails on a contract the code breaks (the kernel does import the protocol)."""
    cfg = tmp_path / "contracts.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "depin_jupyter"\n\n[[tool.importlinter.contracts]]\n'
                   'name = "kernel without protocol"\ntype = "forbidden"\nsource_modules = ["depin_jupyter.kernel"]\n'
                   'forbidden_modules = ["depin_jupyter.protocol"]\n')
    out = _lint_imports(cfg)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]


def test_there_are_no_import_cycles():
    import grimp

    graph = grimp.build_graph("depin_jupyter", exclude_type_checking_imports=True)  # type-only imports run nothing
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _private_uses(module: str, path: pathlib.Path) -> list[str]:
    """Where ``module`` touches another module's ``_private`` names (or a private module of another package)."""
    tree = ast.parse(path.read_text())
    own_package = _package_of(module, path)
    aliases: dict[str, str] = {}  # local name -> depin module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("depin_jupyter"):
            source = node.module
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in MODULES:
                    aliases[alias.asname or alias.name] = target
                private_name = alias.name.startswith("_") and not alias.name.startswith("__")
                own_private_module = target in MODULES and own_package.startswith(source)
                if private_name and source != module and not own_private_module:
                    found.append(f"line {node.lineno}: imports {alias.name} from {source}")
            private = [p for p in source.split(".") if p.startswith("_") and not p.startswith("__")]
            if private and not own_package.startswith(source.rsplit(".", 1)[0]):
                found.append(f"line {node.lineno}: imports from the private module {source}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("depin_jupyter") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != module:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_touches_another_modules_private_names(module):
    assert _private_uses(module, MODULES[module]) == []


def test_the_private_access_check_can_fail(tmp_path):
    """The check above finds what it looks for (a fake module reaching into `worker.runs`)."""
    fake = tmp_path / "fake.py"
    fake.write_text("from depin_jupyter.worker import runs\nfrom depin_jupyter.network._scheduler import _UNTRUSTED\n"
                    "x = runs._local\n")
    uses = _private_uses("depin_jupyter.kernel.fake", fake)
    assert any("runs._local" in u for u in uses) and any("_UNTRUSTED" in u for u in uses), uses


def test_modules_and_functions_stay_small():
    """A room per concept: no module over ~600 lines, no function over ~80 (STYLE.md habit 1)."""
    too_big = []
    for module, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MODULE_MAX_LINES:
            too_big.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_MAX_LINES:
                    too_big.append(f"{module}.{node.name}: {length} lines")
    assert not too_big, too_big

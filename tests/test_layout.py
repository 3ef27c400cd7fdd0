"""The house rules of agent/, checked from the source: every module imports; no import cycle
(module-level and function-level imports alike); no module over 400 lines; nothing private
(`_name`) imported from another module; every module that registers a state document is one
`status` finds (agent.state.DOCUMENT_MODULES)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(AGENT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str) -> List[Tuple[str, List[str], int]]:
    """(module imported, names taken from it, line) for every import anywhere in the module."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            out.append((resolve(name, node), [a.name for a in node.names], node.lineno))
    return out


def graph() -> Dict[str, Set[str]]:
    """module -> the agent modules it imports (`from pkg import mod` counts as mod)."""
    edges: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, names, _line in imports_of(m):
            if target not in MODULES:
                continue
            sub = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in sub or [target]:
                if t != m:
                    edges[m].add(t)
            if sub and len(sub) < len(names):
                edges[m].add(target)  # names from the package itself too
    return edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walk_finds_the_layout():
    # a broken walk would make every check below pass vacuously
    for m in ("agent.cli", "agent.state", "agent.runtime.runner", "agent.jobs.drain.plan"):
        assert m in MODULES
    assert len(MODULES) > 40
    assert "agent.state" in graph()["agent.runtime.runner"]
    assert "agent.jobs.drain.plan" in graph()["agent.jobs.drain.state"]  # `from ... import X`


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    if name == "agent.__main__":  # runs the CLI when imported: compile it only
        compile(MODULES[name].read_text(encoding="utf-8"), str(MODULES[name]), "exec")
        return
    importlib.import_module(name)


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_400_lines():
    long = {
        m: n
        for m, p in MODULES.items()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_nothing_private_is_imported_across_modules():
    private = []
    for m in MODULES:
        for target, names, line in imports_of(m):
            if not target.startswith("agent") or target == m:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    private.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {target}.{n}")
    assert private == []


def registers_a_document(name: str) -> bool:
    """The module calls agent.state.register (imported by name or through the module)."""
    state_imports = [names for target, names, _ in imports_of(name) if target == "agent.state"]
    by_name = any("register" in names for names in state_imports)
    as_module = any(
        target == "agent" and "state" in names for target, names, _ in imports_of(name)
    ) or any(target == "agent.state" and not names for target, names, _ in imports_of(name))
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if by_name and isinstance(f, ast.Name) and f.id == "register":
            return True
        if as_module and isinstance(f, ast.Attribute) and f.attr == "register":
            return True
    return False


def test_every_document_module_is_one_status_finds():
    from agent.state import DOCUMENT_MODULES

    declaring = sorted(m for m in MODULES if registers_a_document(m))
    assert declaring == sorted(DOCUMENT_MODULES)

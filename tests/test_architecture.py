"""The layout stays readable: no module over 400 lines, no import cycle, a trainer that names no method."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kdarena"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _nodes(tree: ast.AST, type_checking: bool):
    """Every node; without ``type_checking``, not the bodies of ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if not type_checking and isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path, known: set[str], type_checking: bool = False) -> set[str]:
    """kdarena modules imported anywhere in the file (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text()), type_checking):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from PKG import submodule`` needs the submodule; ``from PKG import name`` needs PKG's __init__ to have run
            # far enough to define ``name`` (``from .. import __version__`` inside the package closes a cycle)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"


def _cycle(type_checking: bool) -> list[str]:
    modules = _modules()
    graph = {name: _imports(name, path, set(modules), type_checking) for name, path in modules.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, []):
            break
    return cycle


def test_there_is_no_import_cycle():
    cycle = _cycle(type_checking=False)
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_no_import_cycle_hides_behind_type_checking():
    # an import for annotations only that closes a cycle is still a layer pointing upwards: pass the state instead
    cycle = _cycle(type_checking=True)
    assert not cycle, f"import cycle (counting `if TYPE_CHECKING:` imports): {' -> '.join(cycle)}"


#: what a method module may import from its own package: the contract, the registry and shared parts
METHOD_SHARED = {"kdarena.methods.base", "kdarena.methods.registry", "kdarena.methods.distiller", "kdarena.methods.temporal"}


def test_methods_import_neither_the_engine_nor_the_trainer_nor_each_other():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("kdarena.methods."):
            continue
        imported = _imports(name, path, set(modules), type_checking=True)
        upward = sorted(t for t in imported if t.startswith(("kdarena.engine", "kdarena.trainer", "kdarena.experiments", "kdarena.cli")))
        assert not upward, f"{name} imports {upward}: a method receives what it needs (StepInput, MethodContext)"
        if name not in METHOD_SHARED:
            siblings = sorted(t for t in imported if t.startswith("kdarena.methods.") and t not in METHOD_SHARED)
            assert not siblings, f"{name} imports {siblings}: shared maths lives in kdarena.losses, shared parts in {sorted(METHOD_SHARED)}"


def test_the_trainer_names_no_method():
    text = (PACKAGE / "trainer.py").read_text()
    found = re.findall(r'CompetitiveDistillation|DeepMutualLearning|KnowledgeDistillation|method\.name|== "(?:cd|kd|dml)"|isinstance\(self\.method', text)
    assert not found, found

"""The house rules DESIGN.md states, checked on the source: module sizes, the one-way import
graph without circles, and what each layer may import."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxpost", "kernels", "experiments")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _runtime_nodes(tree):
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at module level or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))  # fmt: skip
            # `from a import b`: the module a.b if there is one, else a (b is a name in it)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_module_passes_the_size_limit():
    files = [p for d in (*PACKAGES, "scripts", "tests") for p in (ROOT / d).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"split these along a seam (over {MAX_LINES} lines): {long}"


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer, forbidden", [
    ("jaxpost", ("experiments",)),      # the library never imports the programs
    ("kernels", ("jaxpost", "experiments")),  # kernels import only jax and numpy
    ("jaxpost.models", ("jaxpost.sharding", "jaxpost.train", "jaxpost.loops")),
])  # fmt: skip
def test_imports_go_one_way(layer, forbidden):
    bad = {(a, b) for a, targets in _graph().items() if a == layer or a.startswith(layer + ".")
           for b in targets if any(b == f or b.startswith(f + ".") for f in forbidden)}  # fmt: skip
    assert not bad, bad


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    """A lazy import inside a function is still an edge (the models<->sharding circle was one)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("import pkg.a\nif TYPE_CHECKING:\n    import pkg.c\n")
    modules = {"pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py", "pkg": pkg / "__init__.py"}
    assert _imports("pkg.a", pkg / "a.py", modules) == {"pkg.b"}
    assert _imports("pkg.b", pkg / "b.py", modules) == {"pkg.a"}

"""The kernels package imports only jax, numpy and the standard library (DESIGN.md)."""

import ast
import pathlib
import sys

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_kernels_import_only_jax_and_numpy():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) > 5
    allowed = {"jax", "numpy", "kernels"} | set(sys.stdlib_module_names)
    offenders = {f.name: sorted(_imported_roots(f) - allowed) for f in files}
    assert not {name: roots for name, roots in offenders.items() if roots}

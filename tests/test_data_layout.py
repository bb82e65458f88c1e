"""The data package's layout contract: it imports nothing of the library but errors, the
registry, the typed-settings checker and the atomic writer (data knows nothing of pruning or training), its modules import each other without cycles,
and ``__init__.py`` only gathers (no import after code)."""

from __future__ import annotations

import ast
from pathlib import Path

import sparsetrain.data

PACKAGE = Path(sparsetrain.data.__file__).parent
ALLOWED_OUTSIDE = {"errors", "registry", "options", "fsio"}  # fsio: caches of decoded data (site "data")


def relative_imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every relative import in ``path``."""
    tree = ast.parse(path.read_text())
    return [(n.level, n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]


def test_data_imports_only_errors_and_registry_of_the_library():
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert (node.module or "").split(".")[0] in ALLOWED_OUTSIDE, f"{path.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("sparsetrain"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("sparsetrain") for a in node.names), path.name


def test_data_modules_import_each_other_without_cycles():
    graph = {
        path.stem: {m.split(".")[0] for level, m in relative_imports(path) if level == 1 and m}
        for path in PACKAGE.glob("*.py")
        if path.stem != "__init__"
    }
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join(stack + (module,))}"
        if module in done:
            return
        for child in graph.get(module, ()):
            visit(child, stack + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "__init__" not in {m for deps in graph.values() for m in deps}  # no child imports the package


def test_init_imports_come_first():
    body = ast.parse((PACKAGE / "__init__.py").read_text()).body
    kinds = [isinstance(n, (ast.Import, ast.ImportFrom)) for n in body if not isinstance(n, ast.Expr)]
    assert kinds == sorted(kinds, reverse=True), "an import after code in data/__init__.py"

"""Every `from slq... import name` in the package resolves, the ones inside functions included.

An import inside a function runs only when the function does; after code moves between modules
(the layers), a stale one would fail first in a user's run. This walks the source instead.
"""

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.joinpath("slq").rglob("*.py"), *REPO.joinpath("flows").rglob("*.py"), REPO / "cli.py"])


def project_imports(path: Path):
    """(line, module, name or None) of each absolute import of slq/flows in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in ("slq", "flows"):
                for alias in node.names:
                    yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("slq", "flows"):
                    yield node.lineno, alias.name, None


def resolves(module: str, name: str | None) -> bool:
    mod = importlib.import_module(module)
    if name is None or hasattr(mod, name):
        return True
    try:  # `from package import submodule`
        importlib.import_module(f"{module}.{name}")
        return True
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_project_import_resolves(path):
    missing = [f"{path.relative_to(REPO)}:{line}: from {module} import {name}"
               for line, module, name in project_imports(path) if not resolves(module, name)]
    assert not missing, "\n".join(missing)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from slq.train import no_such_name  # a comment (with brackets)\n")
    [(line, module, name)] = list(project_imports(src))
    assert (line, module, name) == (2, "slq.train", "no_such_name")
    assert not resolves(module, name)

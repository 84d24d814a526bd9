"""The import direction is held by import-linter's contracts ([tool.importlinter] in pyproject.toml):
these tests prove that the contracts bite, on a copy of the package with one bad import added, and
that the real tree keeps them.

lint-imports analyses the package that `import slq` finds; it puts its working directory first on
sys.path, so run in the copy's folder it analyses the copy, not the editable install of /work/main
(the failing cases below would pass if it analysed the real tree, which lacks the bad imports)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = str(LINT_IMPORTS) if LINT_IMPORTS.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports not installed: pip install -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of what the contracts analyse: slq/, flows/ and pyproject.toml (the contracts)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("slq", "flows"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=skip)
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append(path: Path, line: str) -> None:
    text = path.read_text() if path.exists() else ""
    path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")


@pytest.mark.parametrize("file, line, named", [
    # a library module importing an MLOps tool (forbidden contract)
    ("slq/encoder.py", "import mlflow", "slq.encoder -> mlflow"),
    # inside a function counts too: grimp reads every import statement
    ("slq/retrieval.py", "def _f():\n    import dvc.repo", "slq.retrieval -> dvc"),
    # the library importing the MLOps layer (forbidden and layers contracts)
    ("slq/loss.py", "from slq.mlops import config", "slq.loss -> slq.mlops.config"),
    # the MLOps layer reaching the miniature other than through slq.mlops.builtin (layers contract)
    ("slq/mlops/report.py", "import slq.miniature.world", "slq.mlops.report -> slq.miniature.world"),
    # a new top-level module that no layer lists (exhaustive layers contract)
    ("slq/newthing.py", "X = 1", "- slq.newthing"),
])
def test_a_bad_import_breaks_a_contract(tree, file, line, named):
    append(tree / file, line)
    res = lint_imports(tree)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "BROKEN" in out, out
    assert named in out, out


def test_the_tree_keeps_every_contract(tree):
    """The unmodified copy (the real tree) keeps every contract: what CI's lint-imports checks."""
    res = lint_imports(tree)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout, res.stdout


def test_the_forbidden_contract_covers_the_whole_library_layer():
    """The forbidden contract names its sources one by one: every module of the library layer (an
    optional one once it exists) must be among them, and nothing else."""
    import tomllib

    contracts = {c["id"]: c for c in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
                 ["contracts"]}
    library = [name.strip() for name in contracts["layers"]["layers"][-1].split(":")]
    members = {f"slq.{n.strip('()')}" for n in library
               if not n.startswith("(") or (REPO / "slq" / n.strip("()")).exists()
               or (REPO / "slq" / f"{n.strip('()')}.py").exists()}
    assert set(contracts["library-tools"]["source_modules"]) == members

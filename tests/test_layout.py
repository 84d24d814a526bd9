"""`slq --help` stays fast, and the public API resolves lazily. (The import direction, the library
importing none of the MLOps tools, is held by import-linter: tests/test_architecture.py.)"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> set[str]:
    probe = f"import sys; {code}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_config_and_runner_load_no_tool():
    """What import-linter cannot see: the MLOps layer may import the tools, but its config and runner
    load none of them until a stage runs (the library's own direction: tests/test_architecture.py)."""
    mods = loaded_after("import slq.mlops.config, slq.mlops.runner")
    tools = {"mlflow", "prefect", "dvc", "great_expectations", "lancedb", "typer", "pandas", "torch"}
    assert not mods & tools, mods & tools


def test_cli_help_imports_no_heavy_module():
    mods = loaded_after("import cli")
    assert not mods & {"torch", "transformers", "mlflow", "prefect", "lancedb", "great_expectations"}


def test_public_api_resolves_lazily():
    import pytest

    import slq

    for name in slq.__all__:
        assert getattr(slq, name) is not None
    with pytest.raises(AttributeError):
        slq.no_such_thing  # noqa: B018

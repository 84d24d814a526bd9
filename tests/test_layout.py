"""The library's import direction: the core imports none of the MLOps tools, so it runs on a
GPU machine that has only torch/transformers, and `slq --help` stays fast."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = ["mlflow", "prefect", "dvc", "great_expectations", "lancedb", "typer", "pandas"]


def loaded_after(code: str) -> set[str]:
    probe = f"import sys; {code}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_core_library_imports_no_mlops_tool():
    mods = loaded_after("import slq.encoder, slq.train, slq.loss, slq.retrieval, slq.backbones.tiny, "
                        "slq.data.world, slq.checkpoint, slq.config, slq.pipeline")
    assert not mods & set(TOOLS), mods & set(TOOLS)


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

""".ci/check_deps.py: every dvc.yaml stage lists the code it runs among its deps, so `dvc repro` reruns
a stage when that code changes. It runs on copies here: slq/ and a dvc.yaml with one dep removed
(the script analyses the slq/ beside the dvc.yaml it is given, not the installed one)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "check_deps.py"


def check(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copytree(REPO / "slq", tmp_path / "slq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def write_stage(project: Path, stage: str, deps: list[str], cmd: str | None = None) -> Path:
    """The real dvc.yaml's `stage` alone, with these deps (and cmd), in the copy."""
    spec = dict(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage])
    spec["deps"] = deps
    if cmd is not None:
        spec["cmd"] = cmd
    path = project / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": {stage: spec}}))
    return path


def train_deps() -> list[str]:
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["deps"])


def test_a_missing_dep_fails_naming_the_stage_and_the_module(project):
    deps = train_deps()
    assert "slq/loss.py" in deps  # the train stage runs the contrastive loss (slq.train imports it)
    ok = check(write_stage(project, "train", deps))
    assert "module slq.loss " not in ok.stdout, ok.stdout
    res = check(write_stage(project, "train", [d for d in deps if d != "slq/loss.py"]))
    assert res.returncode == 1, res.stdout + res.stderr
    line = next((ln for ln in res.stdout.splitlines() if "module slq.loss " in ln), None)
    assert line is not None, res.stdout
    assert line.startswith("ERROR ") and "dvc.yaml:train:" in line and "slq/loss.py" in line, line


def test_a_module_added_to_the_stage_fails_until_listed(project):
    """The check follows the code: a new import in the stage makes its file a needed dep."""
    deps = train_deps()
    (project / "slq" / "mlops" / "newhelper.py").write_text("X = 1\n")
    stage = project / "slq" / "mlops" / "stages" / "train.py"
    stage.write_text(stage.read_text() + "\n\ndef _uses_it():\n    from slq.mlops import newhelper  # noqa: F401\n")
    res = check(write_stage(project, "train", deps))
    assert res.returncode == 1
    assert any("dvc.yaml:train:" in ln and "module slq.mlops.newhelper " in ln for ln in res.stdout.splitlines())
    res = check(write_stage(project, "train", [*deps, "slq/mlops/newhelper.py"]))
    assert "slq.mlops.newhelper" not in res.stdout, res.stdout


def test_an_unknown_command_fails(project):
    res = check(write_stage(project, "train", train_deps(), cmd="python cli.py frobnicate now"))
    assert res.returncode == 1
    assert "dvc.yaml:train: unknown cmd" in res.stdout, res.stdout


def test_the_pipelines_list_the_code_they_run():
    """dvc.yaml and pipelines/smollm2/dvc.yaml as committed: what CI checks."""
    res = check()
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_code_dep_that_does_not_exist_fails(project):
    res = check(write_stage(project, "train", [*train_deps(), "slq/gone.py"]))
    assert res.returncode == 1
    assert "dvc.yaml:train: dep slq/gone.py does not exist" in res.stdout, res.stdout


def test_a_foreach_stage_is_checked_and_fixed_in_its_template(project):
    """The bank stages (foreach over the bank set): their `do:` template's deps are checked like any
    stage's, and --fix rewrites them there."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["bank_train"]
    assert "foreach" in spec and "do" in spec
    deps = [d for d in spec["do"]["deps"] if d != "slq/loss.py"]
    assert len(deps) < len(spec["do"]["deps"])
    text = (REPO / "dvc.yaml").read_text()  # the stage as dvc.yaml writes it (--fix edits the text)
    block = text[text.index("\n  bank_train:"):text.index("\n  bank_embed:")]
    path = project / "dvc.yaml"
    path.write_text("stages:" + block.replace("        - slq/loss.py\n", "") + "\n")
    assert yaml.safe_load(path.read_text())["stages"]["bank_train"]["do"]["deps"] == deps
    res = check(path)
    assert res.returncode == 1 and "dvc.yaml:bank_train: module slq.loss " in res.stdout, res.stdout
    fixed = check("--fix", path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    after = yaml.safe_load(path.read_text())["stages"]["bank_train"]
    assert "slq/loss.py" in after["do"]["deps"] and "params/banks/${item}.yaml" in after["do"]["deps"]
    assert after["foreach"] == spec["foreach"]

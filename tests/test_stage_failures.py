"""A failed stage changes nothing it does not own (issue 31, item 3), with the real tools.

One tiny project runs every stage once, in this process, through `run_stage` (as `slq stage`,
dvc.yaml and the Prefect flow do); its tracking store is then removed, as in a teammate's clone
after `dvc pull` (the store is not in DVC). Each test copies it, makes one stage fail (a planted
bad manifest row, a missing input, or an exception injected after the stage has already written
part of its outputs) and checks that every file of the project is the very file it was (same
bytes, same inode: not rewritten), that nothing half-written or temporary is left, and that no
MLflow store appeared. The validate stage is also run under DVC: after its failure,
`dvc checkout data.dvc --force` leaves `dvc status` clean.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slq.mlops import tracking
from slq.mlops.config import load_config
from slq.mlops.runner import STAGES, run_stage, stage_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "data": {"n_train": 24, "n_val": 4, "n_test": 8, "image_size": 64},
    "train": {"steps": 3, "batch_size": 8, "save_every": 3, "warmup_steps": 1, "num_queries": 2},
    "embed": {"batch_size": 16, "splits": ["val", "test"]},  # two splits: the index stage fails between them
    "methods": {"workers": 1, "compare": ["zero_shot", "lora"]},
    "pretrain": {"hidden_size": 32, "num_layers": 1, "vision_dim": 32, "vocab_size": 600, "image_pixels": 96,
                 "n_scenes": 40, "steps": 2, "batch_size": 8, "warmup_steps": 1},
}
# Written by a failing stage on purpose, or not any stage's output: the failure report beside the
# validation's outputs, caches, the methods' logs, training's resume folder.
NOT_OUTPUTS = ("reports/validate.failed.json", "reports/validate.failed.html", "artifacts/validate_cache.sqlite",
               "artifacts/embed_cache/", "logs/", "checkpoints/.work")
STORE = ("mlflow.db", "mlartifacts", "mlruns")


def write_params(proj: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    path = proj / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny project after every stage ran once; its MLflow store removed."""
    proj = tmp_path_factory.mktemp("built")
    cfg = load_config(write_params(proj))
    for name in STAGES:
        run_stage(name, cfg)
    os.environ.pop(tracking.PARENT_ENV, None)  # that run's parent lived in the store removed here
    for name in STORE:
        p = proj / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return proj


@pytest.fixture
def project(built, tmp_path, monkeypatch):
    """A copy of the built project (the config loaded from it) and the state of its files."""
    proj = tmp_path / "proj"
    shutil.copytree(built, proj, symlinks=True)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return load_config(proj / "params.yaml"), proj


def files(root: Path) -> dict[str, tuple]:
    """Every file under `root`: relative path -> (sha256, inode, mtime): a file rewritten with the
    same bytes counts as changed."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino,
                                                   st.st_mtime_ns)
    return out


def owned(rel: str, planted: tuple) -> bool:
    return not rel.startswith(NOT_OUTPUTS + planted)


def fails_and_changes_nothing(cfg, proj: Path, stage: str, error, match: str, planted: tuple = (), **kw):
    """Run `stage`: it must raise `error` matching `match`, leave every file it (or any other stage)
    owns the very file it was, leave no temporary or half-written entry, and create no MLflow store."""
    before = {k: v for k, v in files(proj).items() if owned(k, planted)}
    with pytest.raises(error, match=match):
        run_stage(stage, cfg, **kw)
    after = {k: v for k, v in files(proj).items() if owned(k, planted)}
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert (changed, sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())) == ([], [], [])
    leftovers = [p for p in proj.rglob(".*") if any(t in p.name for t in (".tmp-", ".keep-", ".old-", ".tmp"))]
    assert leftovers == []
    assert [n for n in STORE if (proj / n).exists()] == [], f"the failed {stage} stage created a tracking store"


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def plant_bad_rows(cfg) -> None:
    """A duplicate id and a train image leaked into the test split, appended to the manifest."""
    manifest = cfg.path(cfg.data.root) / cfg.data.manifest
    rows = _rows(manifest)
    train = next(r for r in rows if r["split"] == "train")
    leaked = dict(next(r for r in rows if r["split"] == "test"), id="planted-leak", image=train["image"],
                  image_id=train["image_id"])
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows + [dict(rows[0]), leaked]))


def boom(*args, **kwargs):
    raise RuntimeError("injected failure")


# ---- each stage fails ----------------------------------------------------------------------------
def test_validate_with_a_bad_row_keeps_report_page_and_data_docs(project):
    cfg, proj = project
    plant_bad_rows(cfg)
    fails_and_changes_nothing(cfg, proj, "validate", Exception, "data validation failed",
                              planted=(f"{cfg.data.root}/{cfg.data.manifest}",))
    report = cfg.path(cfg.validate.report)
    failed = json.loads(report.with_suffix(".failed.json").read_text())
    assert not failed["success"] and json.loads(report.read_text())["success"]
    page = report.with_suffix(".failed.html").read_text()
    assert "FAILED" in page and "planted-leak" in page  # the failure is read beside the good page


def test_validate_passing_again_replaces_its_outputs_and_drops_the_failure_report(project):
    cfg, proj = project
    manifest = cfg.path(cfg.data.root) / cfg.data.manifest
    good = manifest.read_text()
    plant_bad_rows(cfg)
    with pytest.raises(Exception, match="data validation failed"):
        run_stage("validate", cfg)
    manifest.write_text(good)
    docs = cfg.path(cfg.validate.data_docs) / "index.html"
    old_docs = docs.stat().st_ino
    run_stage("validate", cfg)
    report = cfg.path(cfg.validate.report)
    assert not report.with_suffix(".failed.json").exists() and not report.with_suffix(".failed.html").exists()
    assert docs.stat().st_ino != old_docs and "PASSED" in report.with_suffix(".html").read_text()
    assert (proj / "mlflow.db").is_file()  # a stage that succeeds records its run, creating the store


def test_pretrain_failing_after_its_model_is_written(project, monkeypatch):
    """The new backbone folder is already in place when the probe fails: it is put back."""
    cfg, proj = project
    cfg.pretrain.steps = 1  # another model than the one there
    monkeypatch.setattr("slq.miniature.pretrain.probe_facts", boom)
    fails_and_changes_nothing(cfg, proj, "pretrain", RuntimeError, "injected failure")


def test_train_failing_after_its_checkpoint_is_written(project, monkeypatch):
    cfg, proj = project
    cfg.train.seed = 1  # another checkpoint than the one there
    monkeypatch.setattr("slq.mlops.training.write_csv_atomic", boom)  # the history: the last thing written
    fails_and_changes_nothing(cfg, proj, "train", RuntimeError, "injected failure")


def remove_images(cfg, split: str) -> tuple[str, ...]:
    """Delete the image files of `split`; their paths, relative to the project."""
    rows = _rows(cfg.path(cfg.data.root) / cfg.data.manifest)
    images = sorted({r["image"] for r in rows if r["split"] == split})
    for image in images:
        (cfg.path(cfg.data.root) / image).unlink()
    return tuple(f"{cfg.data.root}/{image}" for image in images)


def test_train_with_its_images_missing(project):
    cfg, proj = project
    planted = remove_images(cfg, "train")
    cfg.train.seed = 1  # would train another checkpoint
    fails_and_changes_nothing(cfg, proj, "train", Exception, "file not found", planted=planted)


def test_embed_with_an_eval_split_missing(project):
    cfg, proj = project
    planted = remove_images(cfg, cfg.embed.splits[-1])
    fails_and_changes_nothing(cfg, proj, "embed", Exception, "file not found", planted=planted)


def test_index_with_a_split_missing_after_the_first_tables(project):
    """The first split's tables are rewritten before the second split's vectors turn out missing:
    the LanceDB folder is the one index.json describes."""
    cfg, proj = project
    assert len(cfg.embed.splits) >= 2
    missing = cfg.path(cfg.embed.out) / f"{cfg.embed.splits[-1]}_text.npy"
    missing.unlink()
    fails_and_changes_nothing(cfg, proj, "index", FileNotFoundError, missing.name,
                              planted=(f"{cfg.embed.out}/{missing.name}",))


def test_evaluate_failing_after_its_metrics_are_written(project, monkeypatch):
    cfg, proj = project
    cfg.evaluate.ks = [1, 2]  # other metrics, another benchmark report
    monkeypatch.setattr("slq.mlops.stages.evaluate.write_text_atomic", boom)  # the plots: written after the metrics
    fails_and_changes_nothing(cfg, proj, "evaluate", RuntimeError, "injected failure")


def test_a_method_failing_after_its_checkpoint_is_written(project, monkeypatch):
    """Its old checkpoint and metrics come back together (never new weights beside old numbers)."""
    cfg, proj = project
    cfg.train.seed = 1
    monkeypatch.setattr("slq.mlops.baselines.evaluate_checkpoint", boom)
    fails_and_changes_nothing(cfg, proj, "methods", RuntimeError, "injected failure", method="lora")


def test_compare_failing_after_its_table_is_written(project, monkeypatch):
    cfg, proj = project
    monkeypatch.setattr("slq.mlops.report.write_report", boom)  # the whole-run page: written last
    fails_and_changes_nothing(cfg, proj, "compare", RuntimeError, "injected failure")


def test_register_without_evaluation_metrics(project):
    cfg, proj = project
    cfg.path(cfg.evaluate.metrics).unlink()
    fails_and_changes_nothing(cfg, proj, "register", Exception, "eval.json", planted=(cfg.evaluate.metrics,))


def test_every_stage_declares_what_dvc_yaml_lists(project):
    """stage_outputs (what a failed stage puts back) covers each stage's outs, metrics and plots."""
    cfg, proj = project
    params = yaml.safe_load((proj / "params.yaml").read_text())

    def resolve(path: str) -> str:
        if path.startswith("${"):
            section, key = path[2:-1].split(".")
            return params[section][key]
        return path

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        if name == "methods":  # per method: slq.mlops.stages.methods.method_outputs
            continue
        listed = [next(iter(o)) if isinstance(o, dict) else o
                  for kind in ("outs", "metrics", "plots") for o in stages[name].get(kind, [])]
        declared = {p.relative_to(proj).as_posix() for p in stage_outputs(name, cfg)}
        assert {resolve(p) for p in listed} <= declared, name


# ---- under DVC -----------------------------------------------------------------------------------
def dvc(*args, cwd: Path, check: bool = True):
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO),  # `python` in dvc.yaml: this one
                                           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def test_failed_validation_under_dvc_leaves_status_clean(tmp_path):
    """dvc repro validate passes, a bad row fails it, `dvc checkout data.dvc --force` brings the data
    back: `dvc status` is clean (the page and the Data Docs were not rewritten), and no store exists."""
    from slq.miniature.world import generate_world

    proj = tmp_path / "dvcproj"
    proj.mkdir()
    cfg = load_config(write_params(proj))
    shutil.copy(REPO / "cli.py", proj / "cli.py")
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["validate"]
    stage["deps"] = [d for d in stage["deps"] if not d.startswith("slq")]  # the code is not copied here
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"validate": stage}}, sort_keys=False))
    generate_world(cfg.data, cfg.path(cfg.data.root))
    dvc("init", "--no-scm", "-q", cwd=proj)
    dvc("add", "data/world", cwd=proj)
    pin = yaml.safe_load((proj / "data/world.dvc").read_text())
    pin["outs"][0]["path"] = "data/world"
    (proj / "data.dvc").write_text(yaml.safe_dump(pin, sort_keys=False))  # pinned from the root, as here
    (proj / "data/world.dvc").unlink()
    dvc("repro", "validate", cwd=proj)
    assert "up to date" in dvc("status", cwd=proj).stdout
    assert (proj / "mlflow.db").is_file()  # the passing run was recorded
    for name in STORE:  # a project with no store (not in DVC: a teammate's clone has none)
        p = proj / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    plant_bad_rows(cfg)
    res = dvc("repro", "validate", cwd=proj, check=False)
    assert res.returncode != 0 and "data validation failed" in res.stdout + res.stderr
    dvc("checkout", "data.dvc", "--force", cwd=proj)
    status = dvc("status", cwd=proj).stdout
    assert "Data and pipelines are up to date" in status, status
    assert (proj / "reports/validate.failed.json").is_file()
    assert [n for n in STORE if (proj / n).exists()] == []

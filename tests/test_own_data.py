"""Your own data to the end: real photographs imported with `slq data import`, then `dvc repro`
(validate -> pretrain -> train -> embed -> index -> evaluate -> methods -> compare -> register)
with the default benchmark list, no override of it; and records bound to their checkpoint (a
stale file planted in the finished project is refused, naming both hashes)."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from real_photos import write_csv
from test_pipeline import dvc, make_project, sh

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("own"))
    src = write_csv(tmp_path_factory.mktemp("photos"))
    out = sh(sys.executable, "cli.py", "data", "import", str(src), "--out", "data/photos", "--format", "csv",
             "--val", "0.2", "--test", "0.3", cwd=proj)
    assert "0 bad rows skipped" in out.stdout
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"].update(root="data/photos", builtin=False)  # the README's two lines; the benchmark list as shipped
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc("init", "--no-scm", "-q", cwd=proj)
    dvc("add", "data/photos", cwd=proj)
    run = dvc("repro", cwd=proj)
    return proj, run.stdout


def read(proj: Path, rel: str) -> dict:
    return json.loads((proj / rel).read_text())


def test_repro_on_imported_photos_runs_every_stage(own):
    proj, out = own
    for stage in ("validate", "pretrain", "train", "embed", "index", "evaluate", "methods", "compare", "register"):
        assert f"Running stage '{stage}'" in out
    manifest = [json.loads(line) for line in (proj / "data/photos/manifest.jsonl").read_text().splitlines()]
    test_images = {r["image_id"] for r in manifest if r["split"] == "test"}
    ev = read(proj, "metrics/eval.json")
    assert ev["n_images"] == len(test_images) > 0
    # the world's list became this data's own task: `world` on the manifest, labelled `data`
    assert set(ev["benchmarks"]) == {"data"}
    assert ev["benchmarks"]["data"]["t2i_R@1"] == pytest.approx(ev["t2i_R@1"])  # the same task, scored twice
    assert set(ev["skipped_benchmarks"]) == {"world_composed", "world_knowledge"}
    assert "only on the built-in world" in ev["skipped_benchmarks"]["world_knowledge"]
    compare = read(proj, "metrics/compare.json")
    assert all(set(row) == {"budget", "data"} for row in compare.values()), compare
    reg = read(proj, "reports/register.json")
    assert reg["checkpoint_hash"] == ev["checkpoint_hash"] and reg["version"] >= 1
    assert dvc("status", cwd=proj).stdout.strip().endswith("Data and pipelines are up to date.")


def plant(proj: Path, rel: str, **changes) -> str:
    """Rewrite a JSON record with `changes`; returns the original text (to put back)."""
    path = proj / rel
    original = path.read_text()
    path.write_text(json.dumps({**json.loads(original), **changes}))
    return original


def one_error_line(res) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("rel, stage, rerun", [
    ("metrics/eval.json", "register", "evaluate"),
    ("metrics/train.json", "register", "train"),
    ("artifacts/index.json", "register", "index"),
    ("artifacts/embeddings/meta.json", "index", "embed"),
    ("artifacts/embeddings/meta.json", "evaluate", "embed"),
    ("metrics/methods/lora.json", "compare", "methods"),
])
def test_a_stale_record_is_refused_naming_both_hashes(own, rel, stage, rerun):
    proj, _ = own
    ckpt = read(proj, "metrics/eval.json")["checkpoint_hash"]
    stale = "0123456789abcdef"
    before = {p: (proj / p).read_bytes() for p in ("reports/register.json", "metrics/eval.json", "artifacts/index.json")}
    if rel.startswith("metrics/methods/"):  # a method's hash sits in its budget
        record = read(proj, rel)
        original = plant(proj, rel, budget={**record["budget"], "checkpoint_hash": stale})
    else:
        original = plant(proj, rel, checkpoint_hash=stale)
    try:
        res = sh(sys.executable, "cli.py", "stage", stage, cwd=proj, check=False)
    finally:
        (proj / rel).write_text(original)
    line = one_error_line(res)
    assert stale in line and f"rerun the {rerun} stage" in line, line
    if not rel.startswith("metrics/methods/"):
        assert ckpt in line, line
    for p, data in before.items():  # nothing the refused stage would write was touched
        assert (proj / p).read_bytes() == data, p


def test_register_refuses_numbers_measured_on_another_evaluation(own):
    proj, _ = own
    original = plant(proj, "metrics/eval.json", evaluation_key="ffffffffffffffff")
    try:
        res = sh(sys.executable, "cli.py", "stage", "register", cwd=proj, check=False)
    finally:
        (proj / "metrics/eval.json").write_text(original)
    line = one_error_line(res)
    assert "another evaluation" in line and "ffffffffffffffff" in line


def test_a_parquet_manifest_is_refused_naming_file_and_import(own, tmp_path):
    import pandas as pd

    proj, _ = own
    rows = [json.loads(line) for line in (proj / "data/photos/manifest.jsonl").read_text().splitlines()]
    data = tmp_path / "pq"
    data.mkdir()
    pd.DataFrame(rows).to_parquet(data / "manifest.parquet")
    res = sh(sys.executable, "cli.py", "stage", "validate", "--set", f"data.root={data}",
             "--set", "data.manifest=manifest.parquet", cwd=proj, check=False)
    line = one_error_line(res)
    assert "manifest.parquet is Parquet, not a JSONL manifest" in line and "slq data import" in line

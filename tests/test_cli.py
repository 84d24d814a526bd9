"""The CLI as a user meets it: every user error is one `error: ...` line (no traceback), --json
prints JSON only, run ids are never cut, runs compare, every benchmark in `slq metrics`, a
missing params file or tracking store is an error (never defaults, never a new empty mlflow.db),
and `--set` values are YAML in every command and in the Prefect flow.

One module-scoped project, made cheaply: a real MLflow sqlite store with two runs and two model
versions written through MlflowClient (no model artifacts), a tiny backbone with an untrained
query checkpoint, a LanceDB table of random vectors, and hand-written metrics files.
"""

import json
import os

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import cli

pytestmark = pytest.mark.integration

MODEL = "slq-retriever"
LONG_NAME = "register-0123456789abcdef-a-long-run-name"


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    from mlflow import MlflowClient

    from slq.miniature.tiny import build_tiny_backbone
    from slq.mlops.config import load_config
    from slq.encoder import SLQEncoder
    from slq.mlops.index import arrow_table

    root = tmp_path_factory.mktemp("cliproj")
    backbone = build_tiny_backbone("qwen2_vl", root / "models" / "tiny")
    params = {"backbone": {"path": "models/tiny", "builtin": False, "dtype": "float32", "device": "cpu"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root / "params.yaml")
    enc = SLQEncoder.from_pretrained(backbone, num_queries=4, seed=0)
    from slq.checkpoint import checkpoint_hash

    ckpt_hash = checkpoint_hash(enc.save(cfg.path(cfg.train.out), metrics={}))

    # the index (written by this checkpoint: search refuses another's table): a text and an image table for the test split only
    import lancedb

    rng = np.random.default_rng(0)
    db = lancedb.connect(str(cfg.path(cfg.index.uri)))
    for modality in ("image", "text"):
        vecs = rng.standard_normal((6, enc.backbone.hidden_size)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        rows = [{"id": f"c{i}", "image_id": f"i{i}", "caption": f"caption {i}", "split": "test"} for i in range(6)]
        db.create_table(f"slq_test_{modality}", data=arrow_table(vecs, rows, modality, {}, ckpt_hash),
                        mode="overwrite")

    # metrics as the evaluate and train stages write them, plus a report file from `slq evaluate`
    world = {"t2i_R@1": 0.25, "i2t_R@1": 0.5}
    (root / "metrics").mkdir()
    (root / "metrics/eval.json").write_text(json.dumps({
        **world, "n_images": 6, "checkpoint_hash": "h0",
        "benchmarks": {"world": world, "world_composed": {"R@1": 0.125}, "world_knowledge": {"t2i_R@1": 0.0625}},
        "modality_gap": {"trained": 0.75, "untrained": 1.5}}))
    (root / "metrics/train.json").write_text(json.dumps({"steps": 300, "wall_s": 12.5}))
    reports = root / "reports/benchmarks"
    reports.mkdir(parents=True)
    (reports / "coco.json").write_text(json.dumps({"t2i_R@1": 0.03125, "partial": False}))
    (reports / "coco_info.json").write_text(json.dumps({"files": 3}))

    # the tracking store: two runs, a version each, the first the champion
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("slq", artifact_location=(root / "mlartifacts").as_uri())
    client.create_registered_model(MODEL)
    run_ids = []
    for i, (steps, metric) in enumerate(((50, 0.5), (60, 0.25))):
        r = client.create_run(exp, run_name=f"{LONG_NAME}-{i}")
        rid = r.info.run_id
        for k, v in {"train.steps": steps, "train.lr": 0.005, "data.seed": 0}.items():
            client.log_param(rid, k, str(v))
        client.log_metric(rid, "t2i_R_at_1", metric)
        client.set_tag(rid, "promotion.version", str(i + 1))
        client.set_terminated(rid)
        client.create_model_version(MODEL, f"{r.info.artifact_uri}/model", run_id=rid)
        run_ids.append(rid)
    client.set_registered_model_alias(MODEL, "champion", "1")
    return root, run_ids


@pytest.fixture()
def runner():
    return CliRunner(env={"COLUMNS": "80"})


def invoke(runner, proj, *args):
    return runner.invoke(cli.app, [*args, "-p", str(proj / "params.yaml")])


def error_line(res, *words, code=1) -> str:
    """The one `error: ...` line of a failed command, checked: exit code, no traceback, key words."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and res.stdout == "", res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_user_errors_are_one_line(runner, proj, monkeypatch):
    root, _ = proj
    error_line(invoke(runner, root, "runs", "show", "nosuchrun"), "no run 'nosuchrun'", "slq runs list")
    error_line(invoke(runner, root, "promote", "99"), "no version 99", "versions: 1, 2")
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("the server must not start"))
    error_line(invoke(runner, root, "serve", "--version", "99"), "no version 99", "versions: 1, 2")
    error_line(invoke(runner, root, "search", "a red circle", "--k", "0"), "--k", "between 1 and 100 (index.max_k)")
    error_line(invoke(runner, root, "search", "a red circle", "--k", "1000000"), "--k", "got 1000000")
    error_line(invoke(runner, root, "search", "a red circle", "--target", "audio"), "audio", "image, text")
    error_line(invoke(runner, root, "search", "a red circle", "--split", "val"), "'val'", "test")
    error_line(invoke(runner, root, "search", "--image", str(root / "nope.png")), "not found", "nope.png")
    error_line(invoke(runner, root, "runs", "compare", "nosuchrun", "other"), "no run 'nosuchrun'")
    error_line(invoke(runner, root, "runs", "compare", "onlyone"), "two or more")
    error_line(invoke(runner, root, "stage", "train", "--set", "train.steps"), "section.key=value")
    error_line(invoke(runner, root, "stage", "train", "--set", "train.nosuch=1"), "unknown", "nosuch")
    error_line(invoke(runner, root, "stage", "train", "--set", "train.steps=many"), "train.steps: expected an integer",
               "got 'many'")
    error_line(invoke(runner, root, "stage", "evaluate", "--set", "evaluate.benchmarks=[{name:world,split:test}]"),
               "evaluate.benchmarks[0]: expected a mapping with a `name`")
    error_line(invoke(runner, root, "search", "a red circle", "--k", "many"), "'--k'", "integer", code=2)


def test_missing_params_file_is_an_error(runner, proj, tmp_path, monkeypatch):
    root, _ = proj
    res = runner.invoke(cli.app, ["metrics", "-p", str(root / "typo.yaml")])
    error_line(res, "params file not found", "typo.yaml")
    monkeypatch.chdir(tmp_path)
    error_line(runner.invoke(cli.app, ["flow", "run"]), "params file not found", "params.yaml")
    error_line(runner.invoke(cli.app, ["runs", "list"]), "params file not found")
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_tracking_store_is_an_error_and_never_created(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")
    db = tmp_path / "mlflow.db"
    for args in (["runs", "list"], ["runs", "show", "abc"], ["runs", "compare", "a", "b"], ["promote", "1"],
                 ["serve"], ["serve", "--version", "1"]):
        line = error_line(runner.invoke(cli.app, args), "no MLflow tracking store", str(db), "slq run")
        assert "dvc repro" in line
    assert not db.exists()


def test_runs_list_and_show_full_ids_and_params(runner, proj):
    root, run_ids = proj
    res = invoke(runner, root, "runs", "list")
    assert res.exit_code == 0, res.output
    for i, rid in enumerate(run_ids):
        assert rid in res.stdout and f"{LONG_NAME}-{i}" in res.stdout  # whole, on one line, at 80 columns
    res = invoke(runner, root, "runs", "list", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["run_id"] for r in rows] == run_ids[::-1] and rows[0]["run_name"] == f"{LONG_NAME}-1"

    res = invoke(runner, root, "runs", "show", run_ids[0])
    assert res.exit_code == 0, res.output
    for text in (run_ids[0], f"{LONG_NAME}-0", "train.steps", "t2i_R_at_1", "promotion.version", "@champion"):
        assert text in res.stdout, text
    info = json.loads(invoke(runner, root, "runs", "show", run_ids[0], "--json").stdout)
    assert info["params"]["train.steps"] == "50" and info["metrics"]["t2i_R_at_1"] == 0.5
    assert info["tags"]["promotion.version"] == "1" and info["model_versions"][0]["aliases"] == ["champion"]


def test_runs_compare(runner, proj):
    root, run_ids = proj
    res = runner.invoke(cli.app, ["runs", "compare", *run_ids, "-p", str(root / "params.yaml")],
                        env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    for rid in run_ids:
        assert rid in res.stdout
    assert "train.steps" in res.stdout and "train.lr" not in res.stdout  # only the params that differ
    assert "train.lr" in invoke(runner, root, "runs", "compare", *run_ids, "--all").stdout
    out = json.loads(invoke(runner, root, "runs", "compare", *run_ids, "--json").stdout)
    assert [r["run_id"] for r in out["runs"]] == run_ids
    assert out["params"]["train.steps"] == ["50", "60"] and out["metrics"]["t2i_R_at_1"] == [0.5, 0.25]
    assert out["differ"] == {"params": ["train.steps"], "metrics": ["t2i_R_at_1"]}


def test_metrics_shows_every_benchmark(runner, proj):
    root, _ = proj
    res = runner.invoke(cli.app, ["metrics", "-p", str(root / "params.yaml")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("world_composed", "world_knowledge", "coco", "0.1250", "0.0625", "0.0312", "modality gap",
                 "wall_s"):
        assert text in res.stdout, text
    assert "coco_info" not in res.stdout
    out = json.loads(invoke(runner, root, "metrics", "--json").stdout)
    assert set(out["evaluate"]["benchmarks"]) == {"world", "world_composed", "world_knowledge"}
    assert out["reports"] == {"coco": {"t2i_R@1": 0.03125, "partial": False}} and out["train"]["steps"] == 300


def test_search_json(runner, proj):
    root, _ = proj
    res = invoke(runner, root, "search", "a red circle", "--target", "text", "--k", "3", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["table"] == "slq_test_text" and len(out["hits"]) == 3
    assert out["hits"][0]["score"] >= out["hits"][-1]["score"] and out["hits"][0]["caption"].startswith("caption")


def test_promote_and_serve_a_version_that_exists(runner, proj, monkeypatch):
    root, _ = proj
    res = invoke(runner, root, "promote", "2")  # 0.25 does not beat the champion's 0.5
    assert res.exit_code == 2 and "refused" in res.stdout, res.output
    calls = []
    monkeypatch.setattr(os, "execvpe", lambda *a: calls.append(a))
    res = invoke(runner, root, "serve", "--version", "2", "--port", "5999")
    assert res.exit_code == 0, res.output
    assert f"models:/{MODEL}/2" in calls[0][1] and calls[0][2]["MLFLOW_TRACKING_URI"].endswith("mlflow.db")


def test_set_values_are_yaml_everywhere(proj, monkeypatch, runner):
    from flows.pipeline import parse_overrides

    from slq.mlops.cli.common import config
    from slq.mlops.config import load_config

    root, _ = proj
    params = root / "params.yaml"
    cfg = config(params, ["train.steps=50", "evaluate.ks=[1, 2]", "train.lr=1e-3", "data.root=x/y"])
    assert cfg.train.steps == 50 and cfg.evaluate.ks == [1, 2] and cfg.train.lr == 0.001 and cfg.data.root == "x/y"
    assert load_config(params, parse_overrides({"train.steps": "50"})).train.steps == 50  # a UI-typed run
    assert load_config(params, parse_overrides(["train.steps=50"])).train.steps == 50
    assert load_config(params, parse_overrides({"train.steps": 50})).train.steps == 50

    import flows.pipeline

    seen = {}
    monkeypatch.setattr(flows.pipeline, "slq_pipeline", lambda params, overrides: seen.update(overrides))
    res = runner.invoke(cli.app, ["flow", "run", "-p", str(params), "--set", "train.steps=50"])
    assert res.exit_code == 0, res.output
    assert load_config(params, parse_overrides(seen)).train.steps == 50


def test_the_flow_refuses_a_missing_params_file(tmp_path):
    from flows.pipeline import slq_pipeline

    from slq.mlops.config import ConfigError

    with pytest.raises(ConfigError, match="params file not found.*nowhere.yaml"):
        slq_pipeline.fn(params=str(tmp_path / "nowhere.yaml"))
    assert list(tmp_path.iterdir()) == []

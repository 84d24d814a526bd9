"""The offline report (slq.mlops.report): one HTML page built from the files the stages write, with its
plots inline and nothing fetched from the network; missing or damaged inputs become a line."""

import json
import re

import pytest
import torch

from slq.mlops.report import ReportInputs, render_report, write_report, write_validation_page

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)  # any resource from elsewhere


def _offline(page: str) -> None:
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page


def _expectation(name, column, ok, count=0, examples=(), fix="fix it", **extra):
    return {"expectation": name, "column": column, "kwargs": {}, "success": ok, "unexpected_count": count,
            "examples": [{"id": i, "value": v} for i, v in examples], "fix": fix, **extra}


VALIDATION = {
    "success": False, "manifest": "data/world/manifest.jsonl", "n_rows": 60, "n_images": 30,
    "splits": {"test": {"rows": 10, "images": 5}, "train": {"rows": 40, "images": 20}},
    "expectations": [
        _expectation("expect_table_row_count_to_be_between", None, True, observed_value=60),
        _expectation("expect_column_values_to_be_unique", "id", True),
        _expectation("expect_column_values_to_be_null", "leak", False, 2,
                     [("test-00002-c1", "image_id train-00004 also used by train")],
                     fix="drop those rows or move the image out of train"),
    ],
    "data_docs": "reports/data_docs/index.html",
}


@pytest.fixture()
def project(tmp_path):
    """Small copies of every file the report reads, laid out as the default params put them."""
    m, r = tmp_path / "metrics", tmp_path / "reports"
    (m / "methods").mkdir(parents=True)
    (r / "benchmarks" / "curves").mkdir(parents=True)
    (m / "train_history.csv").write_text("step,loss,lr\n1,3.2,0.1\n2,2.5,0.1\n3,1.9,0.1\n")
    (m / "pretrain_history.csv").write_text("step,loss\n1,6.4\n2,6.1\n")
    (m / "recall_at_k.csv").write_text("k,t2i,i2t\n1,0.30,0.35\n2,0.50,0.52\n3,0.65,0.62\n")
    (r / "benchmarks" / "curves" / "world.csv").write_text("k,t2i,i2t\n1,0.3,0.35\n2,0.5,0.5\n")
    (r / "benchmarks" / "curves" / "world_composed.csv").write_text("k,recall\n1,0.04\n2,0.07\n3,\n")
    (m / "eval.json").write_text(json.dumps({"t2i_R@1": 0.3, "i2t_R@1": 0.35, "n_images": 5, "n_texts": 10,
                                             "benchmarks": {"world_composed": {"R@1": 0.04}}}))
    (r / "methods.md").write_text("# Methods compared\n\n| method | world t2i R@1 |\n|---|---:|\n| slq | 0.300 |\n"
                                  "| lora | 0.200 |\n\n- **world**: best t2i R@1 is slq (0.300); lora 0.200.\n")
    (m / "compare.json").write_text(json.dumps({
        "lora": {"budget": {"steps": 3}, "world": {"t2i_R@1": 0.2}, "world_knowledge": {"t2i_R@1": 0.05}},
        "slq": {"budget": {"steps": 3}, "world": {"t2i_R@1": 0.3}, "world_knowledge": {"t2i_R@1": 0.1}}}))
    (r / "validate.failed.json").write_text(json.dumps(VALIDATION))
    return tmp_path


def _inputs(root, **over) -> ReportInputs:
    m, r = root / "metrics", root / "reports"
    paths = {"train_history": m / "train_history.csv", "pretrain_history": m / "pretrain_history.csv",
             "recall_at_k": m / "recall_at_k.csv", "curves_dir": r / "benchmarks" / "curves",
             "eval_metrics": m / "eval.json", "methods_report": r / "methods.md",
             "compare_metrics": m / "compare.json", "methods_dir": m / "methods", "validate": r / "validate.json",
             "root": root}
    return ReportInputs(**{**paths, **over})


def test_the_report_holds_every_section_inline_and_names_the_failed_expectation(project):
    out = write_report(project / "reports" / "report.html", _inputs(project))
    page = out.read_text()
    _offline(page)
    assert page.count("<svg") == 6  # 2 losses, the eval split's curve, 2 benchmarks, the methods chart
    for source in ("metrics/train_history.csv", "metrics/pretrain_history.csv", "metrics/recall_at_k.csv",
                   "reports/benchmarks/curves/world.csv", "reports/benchmarks/curves/world_composed.csv"):
        assert f"<code>{source}</code>" in page
    assert "<td>slq</td><td class=\"num\">0.300</td>" in page  # the methods table, rendered from markdown
    assert "<strong>world</strong>: best t2i R@1 is slq" in page
    # validation failed: the page reads validate.failed.json and says which expectation broke, on which row
    assert "FAILED: 1 of 3 expectations: expect_column_values_to_be_null(leak)" in page
    assert "test-00002-c1" in page and "drop those rows or move the image out of train" in page
    assert '<tr class="fail"><td>expect_column_values_to_be_null</td><td>leak</td>' in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the figures' ids do not collide on one page
    assert render_report(_inputs(project)) == page  # no timestamps: the same inputs give the same page


def test_missing_or_damaged_inputs_are_a_line_each_never_a_crash(project, tmp_path):
    (project / "metrics" / "eval.json").write_text("{not json")
    (project / "reports" / "validate.failed.json").unlink()
    nowhere = tmp_path / "absent"
    page = write_report(tmp_path / "out.html", _inputs(
        project, train_history=nowhere / "train_history.csv", pretrain_history=None, curves_dir=nowhere,
        methods_report=nowhere / "methods.md", compare_metrics=None, methods_dir=nowhere)).read_text()
    _offline(page)
    assert "not available: absent/train_history.csv" in page and "not configured" in page
    assert "could not read metrics/eval.json: JSONDecodeError" in page
    assert "no benchmark curves" in page and "no methods metrics" in page
    assert "not available: reports/validate.json" in page
    assert page.count("<svg") == 1  # only the eval split's recall curve was there


def test_the_methods_chart_falls_back_to_each_methods_metrics(project):
    (project / "metrics" / "methods" / "lora.json").write_text(json.dumps(
        {"method": "lora", "budget": {}, "benchmarks": {"world": {"t2i_R@1": 0.2}}}))
    (project / "metrics" / "methods" / "lora.train.json").write_text("{}")  # a method still training
    page = render_report(_inputs(project, compare_metrics=None))
    assert "t2i R@1 by method" in page and "<code>metrics/methods</code>" in page  # the chart and its source


def test_validation_page_of_a_passing_run(tmp_path):
    report = {**VALIDATION, "success": True,
              "expectations": [e for e in VALIDATION["expectations"] if e["success"]]}
    page = write_validation_page(tmp_path / "validate.html", report).read_text()
    _offline(page)
    assert "PASSED: all 2 expectations hold" in page and "expect_column_values_to_be_unique" in page
    assert "<code>data/world/manifest.jsonl</code>" in page and "FAIL" not in page


def test_the_compare_stage_writes_the_report(tmp_path):
    """compare.run, with SLQ's scores taken from the evaluate stage's metrics (no model is loaded)."""
    from slq.checkpoint import checkpoint_hash, save_checkpoint
    from slq.mlops.config import Config
    from slq.mlops.stages import compare

    cfg = Config(root=str(tmp_path))
    cfg.methods.readme = None
    cfg.evaluate.benchmarks = [{"name": b, "split": cfg.evaluate.split} for b in cfg.methods.benchmarks]
    ckpt = save_checkpoint(cfg.path(cfg.train.out), torch.zeros(2, 4), None, {"method": "slq"})
    scores = {b: {"t2i_R@1": 0.3, "i2t_R@1": 0.3} for b in cfg.methods.benchmarks}
    budget = {"trainable_params": 9, "steps": 3, "pooling": "queries", "prompt": "pipeline"}
    cfg.path(cfg.train.metrics).parent.mkdir(parents=True, exist_ok=True)
    cfg.path(cfg.train.metrics).write_text(json.dumps({**budget, "checkpoint_hash": checkpoint_hash(ckpt)}))
    cfg.path(cfg.evaluate.metrics).write_text(json.dumps({"checkpoint_hash": checkpoint_hash(ckpt),
                                                          "benchmarks": scores, "t2i_R@1": 0.3}))
    cfg.path(cfg.methods.metrics).mkdir(parents=True)
    for m in cfg.methods.compare:  # each method's record names its own checkpoint (slq.mlops.records)
        mck = save_checkpoint(cfg.path(cfg.methods.out) / m, torch.full((2, 4), float(len(m))), None, {"method": m})
        cfg.path(cfg.methods.metrics).joinpath(f"{m}.json").write_text(json.dumps(
            {"method": m, "budget": {**budget, "pooling": "last_token", "checkpoint_hash": checkpoint_hash(mck)},
             "benchmarks": scores}))
    compare.run(cfg)
    page = cfg.path(cfg.methods.html).read_text()
    _offline(page)
    assert "| slq |" not in page and "<td>slq</td>" in page and "<td>lora</td>" in page  # the table, as HTML
    assert "t2i R@1 by method" in page and page.count("<svg") == 1  # the methods chart; no curves were made
    assert "not available: metrics/train_history.csv" in page  # this fixture trained nothing


@pytest.mark.integration
def test_the_validate_stage_writes_its_page_when_the_data_fails(tmp_path):
    """With real Great Expectations: the page beside the GX Data Docs names what broke, offline."""
    from slq.mlops.config import Config, DataConfig
    from slq.miniature.world import generate_world
    from slq.mlops.stages import validate

    cfg = Config(root=str(tmp_path), data=DataConfig(n_train=8, n_val=2, n_test=2))
    generate_world(cfg.data, cfg.path(cfg.data.root))
    (cfg.path(cfg.data.root) / "images/val/val-00001.png").unlink()
    with pytest.raises(validate.ValidationFailed):
        validate.run(cfg)
    assert not cfg.path(cfg.validate.report).with_suffix(".html").exists()  # the failure's page goes beside it
    page = cfg.path(cfg.validate.report).with_suffix(".failed.html").read_text()
    _offline(page)
    assert "FAILED: 1 of" in page and "expect_column_values_to_be_null(image_missing)" in page
    assert "val-00001-c0" in page and "add the missing image files" in page

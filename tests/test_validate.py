"""The validate stage with real Great Expectations: clean data passes, each kind of breakage fails
with a message naming the expectation and the row, and the last good report stays untouched."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import pytest

from slq.mlops.config import Config, DataConfig
from slq.miniature.world import generate_world
from slq.mlops.stages import validate

pytestmark = pytest.mark.integration


def make_cfg(root) -> Config:
    return Config(root=str(root), data=DataConfig(n_train=20, n_val=5, n_test=5))


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """A small world that passed validation once: (project folder, summary)."""
    root = tmp_path_factory.mktemp("proj")
    cfg = make_cfg(root)
    generate_world(cfg.data, cfg.path(cfg.data.root))
    return root, validate.run(cfg)


def test_clean_world_passes(validated):
    root, summary = validated
    cfg = make_cfg(root)
    assert summary["success"] and summary["n_rows"] == 60 and summary["n_images"] == 30
    assert summary["splits"]["test"] == {"rows": 10, "images": 5}
    report = json.loads(cfg.path(cfg.validate.report).read_text())
    assert report["success"] and all(r["success"] for r in report["expectations"])
    assert {r["column"] for r in report["expectations"]} >= {"id", "caption", "split", "image_missing",
                                                             "image_error", "leak"}
    assert (cfg.path(cfg.validate.data_docs) / "index.html").is_file()


def _rewrite(manifest, edit):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    edit(rows)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))


def missing_image(world):
    (world / "images/val/val-00001.png").unlink()
    return "expect_column_values_to_be_null(image_missing)", "val-00001-c0"


def duplicate_id(world):
    def edit(rows):
        rows[3]["id"] = rows[2]["id"]
    _rewrite(world / "manifest.jsonl", edit)
    return "expect_column_values_to_be_unique(id)", "train-00001-c0"


def train_image_in_test(world):
    def edit(rows):
        row = next(r for r in rows if r["id"] == "test-00002-c1")
        row["image_id"], row["image"] = "train-00004", "images/train/train-00004.png"
    _rewrite(world / "manifest.jsonl", edit)
    return "expect_column_values_to_be_null(leak)", "test-00002-c1"


def truncated_png(world):
    png = world / "images/test/test-00003.png"
    png.write_bytes(png.read_bytes()[:60])
    return "expect_column_values_to_be_null(image_error)", "test-00003-c0"


def bad_caption(world):
    def edit(rows):
        rows[7]["caption"] = "x"
    _rewrite(world / "manifest.jsonl", edit)
    return "expect_column_value_lengths_to_be_between(caption)", "train-00003-c1"


def blank_caption(world):
    def edit(rows):
        rows[9]["caption"] = " \t   \n "  # long enough, but no word in it
    _rewrite(world / "manifest.jsonl", edit)
    return "expect_column_values_to_match_regex(caption)", "train-00004-c1"


@pytest.mark.parametrize("breakage", [missing_image, duplicate_id, train_image_in_test, truncated_png,
                                      bad_caption, blank_caption])
def test_broken_data_fails_and_keeps_good_report(validated, tmp_path, breakage):
    shutil.copytree(validated[0], tmp_path, dirs_exist_ok=True)
    cfg = make_cfg(tmp_path)
    report = cfg.path(cfg.validate.report)
    good = report.read_bytes()
    expectation, row_id = breakage(cfg.path(cfg.data.root))

    with pytest.raises(validate.ValidationFailed) as err:
        validate.run(cfg)

    message = str(err.value)
    assert expectation in message and repr(row_id) in message and "fix:" in message
    assert report.read_bytes() == good
    failed = json.loads(report.with_suffix(".failed.json").read_text())
    assert not failed["success"]
    broken = [r for r in failed["expectations"] if not r["success"]]
    assert [f"{r['expectation']}({r['column']})" for r in broken] == [expectation]
    assert row_id in [e["id"] for e in broken[0]["examples"]]

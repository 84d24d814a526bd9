"""COCO training data: the manifest builder (`slq data coco`), the validate stage catching the
Karpathy test leak (same image id, same file, same bytes under a train name), and the paper's
params profile. Tiny fake COCO layouts with real file names and fields; GX runs for real."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import pytest
import yaml
from PIL import Image

from slq.mlops.config import Config, DataConfig, load_config
from slq.data.coco import CocoError, build_coco_manifest
from slq.mlops.stages import validate

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "params" / "paper-qwen3-vl-4b.yaml"
# (folder, Karpathy split, COCO id): two test images, as in the 5K test split all from val2014
SPEC = [("train2014", "train", 9), ("train2014", "train", 25), ("val2014", "restval", 42),
        ("val2014", "val", 73), ("val2014", "test", 74), ("val2014", "test", 133)]


def coco_name(folder: str, cocoid: int) -> str:
    return f"COCO_{folder}_{cocoid:012d}.jpg" if folder.endswith("2014") else f"{cocoid:012d}.jpg"


def make_coco(root: Path, spec=SPEC) -> Path:
    """A COCO folder: train2014/ and val2014/ with tiny distinct JPEGs, and dataset_coco.json."""
    images = []
    for n, (folder, split, cocoid) in enumerate(spec):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), (37 * n % 256, 200 - 30 * n, 90)).save(root / folder / coco_name(folder, cocoid))
        sentences = [{"raw": f"photo {cocoid}: caption number {k} ", "tokens": [], "imgid": n} for k in range(5)]
        images.append({"filepath": folder, "filename": coco_name(folder, cocoid), "split": split, "cocoid": cocoid,
                       "imgid": n, "sentids": [], "sentences": sentences})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def make_coco2017_train(root: Path, cocoids) -> Path:
    """captions_train2017.json + train2017/: the 2014 images under 2017 names (same bytes)."""
    (root / "train2017").mkdir(exist_ok=True)
    by_id = {c: (f, s) for f, s, c in SPEC}
    anns, ims = [], []
    for cocoid in cocoids:
        folder, _ = by_id[cocoid]
        shutil.copyfile(root / folder / coco_name(folder, cocoid), root / "train2017" / coco_name("train2017", cocoid))
        ims.append({"id": cocoid, "file_name": coco_name("train2017", cocoid), "height": 12, "width": 16})
        anns += [{"id": 1000 * cocoid + k, "image_id": cocoid, "caption": f"a 2017 caption {k} of {cocoid}"}
                 for k in range(5)]
    path = root / "annotations" / "captions_train2017.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"images": ims, "annotations": anns}))
    return path


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def project_cfg(proj: Path) -> Config:
    return Config(root=str(proj), data=DataConfig(root="data/coco", builtin=False))


@pytest.fixture
def coco(tmp_path):
    """(project folder, COCO folder outside it, summary) with the manifest at project/data/coco."""
    src = make_coco(tmp_path / "coco")
    proj = tmp_path / "proj"
    summary = build_coco_manifest(src / "dataset_coco.json", src, proj / "data" / "coco", progress=False)
    return proj, src, summary


# --- the builder ----------------------------------------------------------------------------------


def test_builder_splits_ids_and_paths(coco):
    proj, src, summary = coco
    rows = rows_of(proj / "data" / "coco")
    assert summary["splits"] == {"train": {"images": 3, "rows": 15}, "val": {"images": 1, "rows": 5},
                                 "test": {"images": 2, "rows": 10}}
    by_image = {r["image_id"]: r for r in rows}
    assert by_image["42"]["split"] == "train"  # restval trains
    assert by_image["74"]["split"] == "test" and by_image["73"]["split"] == "val"
    assert len({r["id"] for r in rows}) == len(rows) == 30 and rows[0]["id"] == "9-c0"
    assert rows[0]["caption"] == "photo 9: caption number 0"  # stripped
    assert set(rows[0]) == {"id", "image_id", "image", "caption", "split"}
    # images outside the manifest's folder: absolute paths, which `data.root / image` keeps as they are
    assert by_image["74"]["image"] == str(src / "val2014" / "COCO_val2014_000000000074.jpg")
    assert summary["image_paths"] == "absolute"
    saved = json.loads((proj / "data" / "coco" / "coco.json").read_text())
    assert saved["n_rows"] == 30 and len(saved["karpathy"]["sha256"]) == 64
    assert [p.name for p in (proj / "data" / "coco").iterdir() if p.name.startswith(".")] == []  # no temp files


def test_builder_images_under_out_are_relative(tmp_path):
    out = tmp_path / "data" / "coco"
    src = make_coco(out / "images")
    summary = build_coco_manifest(src / "dataset_coco.json", src, out, progress=False)
    assert summary["image_paths"] == "relative to this folder"
    assert rows_of(out)[0]["image"] == "images/train2014/COCO_train2014_000000000009.jpg"
    beside = make_coco(tmp_path / "beside")  # the manifest written into the COCO folder itself
    build_coco_manifest(beside / "dataset_coco.json", beside, beside, progress=False)
    assert rows_of(beside)[0]["image"] == "train2014/COCO_train2014_000000000009.jpg"


def test_builder_errors_say_what_to_do(tmp_path):
    src = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    with pytest.raises(CocoError, match=r"nope\.json not found: pass Karpathy's COCO split file.*--karpathy"):
        build_coco_manifest(tmp_path / "nope.json", src, out, progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(CocoError, match=r"bad\.json: not valid JSON .* at line 1"):
        build_coco_manifest(bad, src, out, progress=False)
    bad.write_text('{"annotations": []}')
    with pytest.raises(CocoError, match=r"Karpathy split format"):
        build_coco_manifest(bad, src, out, progress=False)
    data = json.loads((src / "dataset_coco.json").read_text())
    data["images"][1]["split"] = "dev"
    data["images"][2]["cocoid"] = 9
    bad.write_text(json.dumps(data))
    with pytest.raises(CocoError, match=r"1 splits not in .*'dev'.*1 duplicate image ids \(e\.g\. images\[2\]: 9"):
        build_coco_manifest(bad, src, out, progress=False)
    with pytest.raises(CocoError, match=r"image folder not found: .*elsewhere.*train2014/ and val2014/"):
        build_coco_manifest(src / "dataset_coco.json", tmp_path / "elsewhere", out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CocoError, match=r"none of 6 sampled images is under .*empty \(first expected: "
                                        r".*empty/train2014/COCO_train2014_000000000009\.jpg\)"):
        build_coco_manifest(src / "dataset_coco.json", tmp_path / "empty", out, progress=False)
    (src / "val2014" / "COCO_val2014_000000000133.jpg").unlink()
    with pytest.raises(CocoError, match=r"1 of 6 sampled images are missing .*COCO_val2014_000000000133\.jpg"):
        build_coco_manifest(src / "dataset_coco.json", src, out, progress=False)
    assert not out.exists()  # nothing written on failure
    build_coco_manifest(src / "dataset_coco.json", src, out, check=0, progress=False)  # the validate stage's job


def test_cli_data_coco(tmp_path):
    from typer.testing import CliRunner

    import cli

    src = make_coco(tmp_path / "coco")
    runner = CliRunner()
    ok = runner.invoke(cli.app, ["data", "coco", "--karpathy", str(src / "dataset_coco.json"), "--images", str(src),
                                 "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert "train" in ok.output and "absolute" in ok.output and len(rows_of(tmp_path / "out")) == 30
    bad = runner.invoke(cli.app, ["data", "coco", "--karpathy", str(tmp_path / "x.json"), "--images", str(src)])
    assert bad.exit_code == 1 and "x.json not found" in bad.output


# --- validation: the Karpathy test leak -----------------------------------------------------------

def expect_leak(cfg: Config, *row_ids: str, text: str) -> dict:
    report = cfg.path(cfg.validate.report)
    before = report.read_bytes() if report.exists() else None
    with pytest.raises(validate.ValidationFailed) as err:
        validate.run(cfg)
    message = str(err.value)
    assert "expect_column_values_to_be_null(leak)" in message and text in message, message
    assert "train on Karpathy train+restval" in message
    failed = [r for r in err.value.report["expectations"] if not r["success"]]
    assert [r["column"] for r in failed] == ["leak"], failed  # nothing else is wrong
    examples = {e["id"] for e in failed[0]["examples"]}
    assert set(row_ids) <= examples, examples
    assert (report.read_bytes() if report.exists() else None) == before  # the last good report stays
    return failed[0]


@pytest.mark.integration
def test_karpathy_manifest_passes(coco):
    proj, _, _ = coco
    cfg = project_cfg(proj)
    summary = validate.run(cfg)
    assert summary["success"] and summary["n_rows"] == 30 and summary["splits"]["test"] == {"rows": 10, "images": 2}
    assert summary["image_files"] == {"files": 6, "read": 6, "cached": 0}
    report = json.loads(cfg.path(cfg.validate.report).read_text())
    assert len(report["images_sha256"]) == 64
    again = validate.run(cfg)  # the cache: nothing read twice, the same report
    assert again["image_files"] == {"files": 6, "read": 0, "cached": 6}
    assert json.loads(cfg.path(cfg.validate.report).read_text()) == report


@pytest.mark.integration
def test_test_image_id_in_train_fails(coco):
    proj, _, _ = coco
    cfg = project_cfg(proj)
    manifest = proj / "data" / "coco" / "manifest.jsonl"
    rows = rows_of(proj / "data" / "coco")
    for r in rows:
        if r["id"] == "25-c3":
            r["image_id"] = "74"  # a test image's COCO id on a train row (another file)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    failed = expect_leak(cfg, "74-c0", text="image_id 74 also used by train")
    assert len(failed["examples"]) == 1  # one leaked image: one example, not its five captions
    assert failed["unexpected_count"] == 5  # every caption of test image 74


@pytest.mark.integration
def test_same_bytes_under_a_train_name_fails(coco):
    proj, src, _ = coco
    cfg = project_cfg(proj)
    validate.run(cfg)  # passes, and fills the cache
    train_file = src / "train2014" / "COCO_train2014_000000000025.jpg"
    shutil.copyfile(src / "val2014" / "COCO_val2014_000000000133.jpg", train_file)  # a test image, train name
    failed = expect_leak(cfg, "133-c0", text=f"has the same bytes as train image {train_file} (row '25-c0')")
    assert failed["unexpected_count"] == 5


@pytest.mark.integration
def test_reference_codes_coco2017_train_fails(tmp_path):
    """Training rows from COCO 2017 train, as the reference code did: the test images are in it."""
    src = make_coco(tmp_path / "coco")
    ann = make_coco2017_train(src, [9, 25, 42, 74])  # 74: a Karpathy test image
    proj = tmp_path / "proj"
    s = build_coco_manifest(src / "dataset_coco.json", src, proj / "data" / "coco", coco_train=ann, progress=False)
    assert s["splits"]["train"] == {"images": 4, "rows": 20} and "leak" in s["train_source"]["warning"]
    rows = rows_of(proj / "data" / "coco")
    assert {r["image"].split("/")[-2] for r in rows if r["split"] == "train"} == {"train2017"}
    assert rows[0]["id"] == "train2017-9-c0" and rows[0]["image"].endswith("train2017/000000000009.jpg")
    failed = expect_leak(project_cfg(proj), "74-c0", text="image_id 74 also used by train")
    assert failed["unexpected_count"] == 5


# --- the paper's params profile -------------------------------------------------------------------


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and prefix + k not in ("methods.lr", "methods.pooling", "methods.prompts",
                                                      "pretrain.mix"):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_paper_profile_loads_with_the_recipe(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(PROFILE)
    t = cfg.train
    assert (t.num_queries, t.lr, t.batch_size, t.warmup_steps, t.method) == (20, 5e-4, 32, 100, "slq")
    assert t.steps == 566_747 // 32 == 17_710  # one epoch of Karpathy train + restval captions on one GPU
    assert (cfg.backbone.path, cfg.backbone.builtin, cfg.backbone.dtype) == ("/models/Qwen3-VL-4B-Instruct", False,
                                                                            "bfloat16")
    assert (cfg.data.root, cfg.data.builtin) == ("data/coco", False)
    assert cfg.path(cfg.data.root) == REPO / "data" / "coco"  # root: . -> the project folder, not params/
    p = cfg.prompts
    assert (p.text, p.image, p.multimodal, p.add_generation_prompt) == ("{text}", "", "{text}", True)
    assert [(b["name"], b["root"]) for b in cfg.evaluate.benchmarks] == [("coco", "/data/coco"),
                                                                         ("flickr30k", "/data/flickr30k")]
    assert cfg.methods.readme is None and cfg.register.log_backbone is False


def test_paper_profile_keys_are_the_schemas_and_dvc_resolves(tmp_path, monkeypatch):
    profile = yaml.safe_load(PROFILE.read_text())
    schema = _keys(Config().to_dict())
    assert _keys({k: v for k, v in profile.items() if k != "root"}) <= schema
    # it stands in for params.yaml in `dvc repro register`: every params key those stages name is in it
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("validate", "pretrain", "train", "embed", "index", "evaluate", "register"):
        for key in stages[name].get("params", []):
            node = profile
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: the profile has no {key}"
                node = node[part]
    # every ${...} dvc.yaml interpolates exists in the profile
    import re

    for var in set(re.findall(r"\$\{([\w.]+)\}", (REPO / "dvc.yaml").read_text())) - {"item", "key"}:  # (foreach's)
        node = profile
        for part in var.split("."):
            node = node[part]
    # copied over params.yaml in another project folder, it is that folder's config
    shutil.copyfile(PROFILE, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("params.yaml")
    assert cfg.path(cfg.data.root) == tmp_path / "data" / "coco"

"""`slq data import`: the four formats users hold data in (HF imagefolder, CSV/Parquet, WebDataset
shards, a `datasets` save_to_disk folder) become a manifest folder that loads and passes the validate
stage; bad rows are named and skipped; splits never share an image; nothing is half-written."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import pytest
from PIL import Image

from slq.data import load_manifest
from slq.data.importers import DataImportError, assign_split, expand_braces, import_data

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLORS[i % len(COLORS)]).save(buf, format="PNG")
    return buf.getvalue()


def jpg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLORS[i % len(COLORS)]).save(buf, format="JPEG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def check_manifest(out: Path) -> list[dict]:
    """The common checks: loads, ids unique, each image decodes and lies in one split."""
    rows = load_manifest(out)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["id"] == f"{r['image_id']}-c{r['id'].rsplit('-c', 1)[1]}" for r in rows)
    split_of = {}
    for r in rows:
        assert r["split"] in ("train", "val", "test") and r["caption"].strip()
        assert split_of.setdefault(r["image_id"], r["split"]) == r["split"], r
        with Image.open(out / r["image"]) as im:
            im.load()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left
    return rows


def captions_by_split(rows):
    out = {}
    for r in rows:
        out.setdefault(r["split"], set()).add(r["caption"])
    return out


# --- imagefolder ------------------------------------------------------------------------------

def make_imagefolder(root: Path) -> Path:
    for split, idx in (("train", [0, 1, 2]), ("test", [3])):
        meta = []
        for i in idx:
            write(root / split / f"img{i}.png", png(i))
            meta.append({"file_name": f"img{i}.png", "text": f"a {split} picture number {i}"})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    # bad rows: a missing image, an empty caption, a truncated image, a row without file_name
    (root / "train" / "metadata.jsonl").open("a").write(
        json.dumps({"file_name": "gone.png", "text": "not there"}) + "\n"
        + json.dumps({"file_name": "img0.png", "text": "   "}) + "\n"
        + json.dumps({"file_name": "broken.png", "text": "a broken file"}) + "\n"
        + json.dumps({"text": "no file name"}) + "\n")
    write(root / "train" / "broken.png", png(5)[:40])
    return root


def test_imagefolder_subfolder_splits_and_bad_rows(tmp_path):
    src = make_imagefolder(tmp_path / "pets")
    s = import_data(src, tmp_path / "out", "imagefolder", progress=False)
    rows = check_manifest(tmp_path / "out")
    assert len(rows) == 4 and s["splits_from"] == "source"
    assert captions_by_split(rows) == {"train": {f"a train picture number {i}" for i in range(3)},
                                       "test": {"a test picture number 3"}}
    problems = {b["where"].rsplit(":", 1)[1]: b["problem"] for b in s["bad"]}
    assert s["n_bad"] == 4 and all(b["where"].startswith(str(src / "train" / "metadata.jsonl")) for b in s["bad"])
    assert problems["line 4"].startswith("missing image") and problems["line 5"] == "empty caption"
    assert problems["line 6"].startswith("unreadable image") and problems["line 7"] == "missing column file_name"
    assert s["bad_by_kind"] == {"missing image": 1, "empty caption": 1, "unreadable image": 1, "missing column": 1}
    assert json.loads((tmp_path / "out" / "import.json").read_text())["n_bad"] == 4
    # --strict: the first bad row stops it, and nothing is left behind
    with pytest.raises(DataImportError, match="bad row.*line 4.*missing image"):
        import_data(src, tmp_path / "strict", "imagefolder", strict=True, progress=False)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict*"))


def test_imagefolder_csv_metadata_hash_splits(tmp_path):
    src = tmp_path / "flat"
    lines = ["file_name,caption"]
    for i in range(6):
        write(src / f"p{i}.jpg", jpg(i))
        lines += [f"p{i}.jpg,photo {i} first caption", f"p{i}.jpg,photo {i} second caption"]
    write(src / "copy_of_p0.jpg", jpg(0))  # byte-identical to p0 under another name
    lines.append("copy_of_p0.jpg,the copy of photo 0")
    (src / "metadata.csv").write_text("\n".join(lines) + "\n")
    s = import_data(src, tmp_path / "out", caption_column="caption", val=0.3, test=0.3, seed=1, progress=False)
    rows = check_manifest(tmp_path / "out")
    assert s["format"] == "imagefolder" and s["n_images"] == 6 and len(rows) == 13 and s["n_bad"] == 0
    p0 = [r for r in rows if "photo 0" in r["caption"] or "copy of photo 0" in r["caption"]]
    assert len({r["image_id"] for r in p0}) == 1 and [r["id"] for r in p0][-1].endswith("-c2")
    assert len(s["splits"]) >= 2  # the hash spread six images over the splits
    # the split is a function of the bytes and the seed alone
    for r in rows:
        sha = hashlib.sha256((tmp_path / "out" / r["image"]).read_bytes()).hexdigest()
        assert r["image_id"] == sha[:16] and r["split"] == assign_split(sha, 0.3, 0.3, 1)


# --- CSV / Parquet ----------------------------------------------------------------------------

def test_csv_and_parquet(tmp_path):
    import pandas as pd

    src = tmp_path / "table"
    for i in range(4):
        write(src / "imgs" / f"{i}.png", png(i))
    df = pd.DataFrame({"path": [f"imgs/{i}.png" for i in range(4)] + ["imgs/9.png", "http://x/y.jpg", ""],
                       "desc": [f"table image {i}" for i in range(4)] + ["absent", "a url", "no path"],
                       "split": ["train", "train", "validation", "test", "train", "train", "train"]})
    df.to_csv(src / "pairs.csv", index=False)
    s = import_data(src / "pairs.csv", tmp_path / "csv_out", "csv", image_column="path", caption_column="desc",
                    progress=False)
    rows = check_manifest(tmp_path / "csv_out")
    assert {r["caption"]: r["split"] for r in rows} == {"table image 0": "train", "table image 1": "train",
                                                          "table image 2": "val", "table image 3": "test"}
    assert [b["where"].rsplit(":", 1)[1] for b in s["bad"]] == ["line 6", "line 7", "line 8"]
    assert "URL" in s["bad"][1]["problem"] and s["bad"][0]["problem"].startswith("missing image")

    # Parquet, with the image bytes inline (datasets' struct) in one row
    df2 = df.iloc[:4].copy()
    df2["path"] = [{"bytes": None, "path": f"imgs/{i}.png"} for i in range(3)] + [{"bytes": png(3), "path": None}]
    df2.to_parquet(src / "pairs.parquet")
    s = import_data(src / "pairs.parquet", tmp_path / "pq_out", image_column="path", caption_column="desc",
                    progress=False)
    assert s["format"] == "parquet" and s["n_rows"] == 4 and s["n_bad"] == 0
    assert captions_by_split(check_manifest(tmp_path / "pq_out")) == captions_by_split(rows)

    with pytest.raises(DataImportError, match="missing column caption or text.*--caption-column"):
        import_data(src / "pairs.csv", tmp_path / "x", "csv", image_column="path", progress=False)
    assert not (tmp_path / "x").exists()


# --- WebDataset -------------------------------------------------------------------------------

def make_shards(root: Path) -> None:
    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    root.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as tf:
            for j in range(3):
                i = shard * 3 + j
                key = f"{i:05d}"
                add(tf, f"{key}.jpg", jpg(i))
                if i % 2:
                    add(tf, f"{key}.json", json.dumps({"caption": [f"shard caption {i}", f"another {i}"]}).encode())
                else:
                    add(tf, f"{key}.txt", f"shard caption {i}".encode())
            add(tf, "99999.txt", b"a caption without its image")


def test_webdataset_shards(tmp_path):
    make_shards(tmp_path / "wds")
    s = import_data(str(tmp_path / "wds" / "shard-{000..001}.tar"), tmp_path / "out", val=0.2, test=0.2,
                    progress=False)
    rows = check_manifest(tmp_path / "out")
    assert s["format"] == "webdataset" and s["n_images"] == 6 and len(rows) == 9
    assert {b["where"] for b in s["bad"]} == {f"{tmp_path / 'wds' / f'shard-00{k}.tar'}:99999" for k in (0, 1)}
    assert all(b["problem"].startswith("no image") for b in s["bad"])
    same = import_data(tmp_path / "wds", tmp_path / "out2", "webdataset", val=0.2, test=0.2, progress=False)
    assert load_manifest(tmp_path / "out2") == rows and same["n_rows"] == 9  # folder == pattern, same ids
    assert expand_braces("a-{0..2}-{x,y}.tar") == ["a-0-x.tar", "a-0-y.tar", "a-1-x.tar", "a-1-y.tar",
                                                   "a-2-x.tar", "a-2-y.tar"]


# --- datasets save_to_disk ----------------------------------------------------------------------

def test_hf_disk_datasetdict(tmp_path):
    import datasets

    def part(idx):
        return datasets.Dataset.from_dict(
            {"image": [Image.open(io.BytesIO(png(i))) for i in idx], "text": [f"hub picture {i}" for i in idx]},
            features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))

    dd = datasets.DatasetDict({"train": part([0, 1, 2]), "validation": part([3]), "test": part([4, 0])})
    dd.save_to_disk(str(tmp_path / "hub"))
    s = import_data(tmp_path / "hub", tmp_path / "out", progress=False)
    rows = check_manifest(tmp_path / "out")
    assert s["format"] == "hf-disk" and s["splits_from"] == "source"
    # image 0 is in train and in test: test keeps it, its train row is named as bad
    assert captions_by_split(rows) == {"train": {"hub picture 1", "hub picture 2"}, "val": {"hub picture 3"},
                                       "test": {"hub picture 4", "hub picture 0"}}
    assert s["n_bad"] == 1 and s["bad"][0]["where"].endswith("[train] row 0")
    assert s["bad"][0]["problem"].startswith("image also in split test")


# --- the whole: refusal, --force, the CLI, the validate stage --------------------------------------

def test_existing_out_refused_then_forced(tmp_path):
    src = make_imagefolder(tmp_path / "pets")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataImportError, match="exists: pass --force"):
        import_data(src, tmp_path / "out", "imagefolder", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # a failure with --force leaves the old folder as it was
    with pytest.raises(DataImportError):
        import_data(src, tmp_path / "out", "csv", force=True, progress=False)
    assert (tmp_path / "out" / "keep.txt").exists() and not list(tmp_path.glob(".out.*"))
    import_data(src, tmp_path / "out", "imagefolder", force=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and len(check_manifest(tmp_path / "out")) == 4


@pytest.mark.integration
def test_cli_and_validate_stage(tmp_path):
    from typer.testing import CliRunner

    import cli
    from slq.mlops.config import Config, DataConfig, RegisterConfig
    from slq.mlops.runner import run_stage

    src = make_imagefolder(tmp_path / "pets")
    runner = CliRunner()
    ok = runner.invoke(cli.app, ["data", "import", str(src), "--out", str(tmp_path / "proj" / "data" / "pets"),
                                 "--format", "imagefolder"])
    assert ok.exit_code == 0, ok.output
    assert "skipped:" in ok.output and "line 5: empty caption" in ok.output and "4 bad rows skipped" in ok.output
    again = runner.invoke(cli.app, ["data", "import", str(src), "--out", str(tmp_path / "proj" / "data" / "pets")])
    assert again.exit_code == 1 and "exists: pass --force" in again.output and "Traceback" not in again.output

    cfg = Config(root=str(tmp_path / "proj"), data=DataConfig(root="data/pets", builtin=False),
                 register=RegisterConfig(track_stages=False))
    summary = run_stage("validate", cfg)
    assert summary["success"] and summary["n_rows"] == 4 and summary["splits"]["test"] == {"rows": 1, "images": 1}

"""Index stage against a real embedded LanceDB in tmp_path, on hand-built embeddings files."""

import json
import os

import numpy as np
import pytest

from slq.config import Config

os.environ.setdefault("DO_NOT_TRACK", "1")
lancedb = pytest.importorskip("lancedb")

from slq.stages import index  # noqa: E402

pytestmark = pytest.mark.integration


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(out, split, img, txt, txt_to_img, checkpoint_hash="abc123"):
    """The embed stage's file contract for one split."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{split}_image.npy", img)
    np.save(out / f"{split}_text.npy", txt)
    with open(out / f"{split}_image.jsonl", "w") as f:
        for i in range(len(img)):
            f.write(json.dumps({"image_id": f"img{i}", "image": f"images/{i}.png", "split": split}) + "\n")
    with open(out / f"{split}_text.jsonl", "w") as f:
        for j, i in enumerate(txt_to_img):
            row = {"id": f"cap{j}", "image_id": f"img{i}", "caption": f"caption {j} of image {i}", "split": split}
            f.write(json.dumps(row) + "\n")
    (out / "meta.json").write_text(json.dumps({"checkpoint_hash": checkpoint_hash, "dim": img.shape[1], "backbone": "tiny"}))


@pytest.fixture
def cfg(tmp_path):
    rng = np.random.default_rng(0)
    cfg = Config(root=str(tmp_path))
    cfg.embed.splits = ["val", "test"]
    for split, n_img in [("val", 20), ("test", 150)]:
        img = unit(rng, n_img, 16)
        txt_to_img = np.repeat(np.arange(n_img), 2)  # two captions per image
        write_embeddings(tmp_path / cfg.embed.out, split, img, unit(rng, 2 * n_img, 16), txt_to_img)
    return cfg


def test_run_writes_tables_versions_and_report(cfg):
    cfg.index.ann_min_rows = 300  # only test_text (300 rows) gets an ANN index
    report = index.run(cfg)
    on_disk = json.loads(cfg.path(cfg.index.out).read_text())
    assert on_disk == report
    assert report["checkpoint_hash"] == "abc123"
    assert report["slq_val_image"] == {"rows": 20, "version": 1, "ann": False}
    assert report["slq_test_text"]["rows"] == 300 and report["slq_test_text"]["ann"] is True
    assert not any(p.name.endswith(".tmp") for p in cfg.path(cfg.index.out).parent.iterdir())

    db = lancedb.connect(str(cfg.path(cfg.index.uri)))
    assert sorted(db.list_tables().tables) == ["slq_test_image", "slq_test_text", "slq_val_image", "slq_val_text"]
    tbl = db.open_table("slq_test_text")
    assert tbl.version == report["slq_test_text"]["version"]
    assert [i.index_type for i in tbl.list_indices()] == ["IvfHnswSq"]
    assert db.open_table("slq_test_image").list_indices() == []
    schema = tbl.schema
    assert str(schema.field("vector").type) == "fixed_size_list<item: float>[16]"
    assert {"id", "image_id", "caption", "image", "split", "checkpoint_hash"} <= set(schema.names)
    row = tbl.search().where("id = 'cap3'").limit(1).to_list()[0]
    assert row["image_id"] == "img1" and row["caption"] == "caption 3 of image 1"
    assert row["image"] == "images/1.png" and row["checkpoint_hash"] == "abc123"


def test_search_with_own_vector_returns_item_first(cfg):
    index.run(cfg)
    img = np.load(cfg.path(cfg.embed.out) / "test_image.npy")
    for i in (0, 7, 149):
        hits = index.search(cfg, img[i], "slq_test_image", k=3)
        assert len(hits) == 3
        assert hits[0]["id"] == f"img{i}" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert hits[0]["image"] == f"images/{i}.png" and hits[0]["caption"] == ""
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
        exact = np.sort(img @ img[i])[::-1][:3]  # the same scores as the matrix product
        np.testing.assert_allclose([h["score"] for h in hits], exact, atol=1e-5)


def test_second_run_bumps_version(cfg):
    first = index.run(cfg)
    second = index.run(cfg)
    for name in ("slq_val_image", "slq_val_text", "slq_test_image", "slq_test_text"):
        assert second[name]["version"] > first[name]["version"]
        assert second[name]["rows"] == first[name]["rows"]
    tbl = lancedb.connect(str(cfg.path(cfg.index.uri))).open_table("slq_val_text")
    assert tbl.count_rows() == 40  # overwritten, not appended


def test_missing_embeddings_name_the_file(cfg):
    (cfg.path(cfg.embed.out) / "val_text.npy").unlink()
    with pytest.raises(FileNotFoundError, match="val_text.npy"):
        index.run(cfg)

"""Index stage and search (slq.mlops.search) against a real embedded LanceDB in tmp_path, on hand-built
embeddings files: tables, versions, the ANN index built, measured against exact search and tuned
to the recall target (or a clear failure), and searches that use the tuned settings only where
they hold and refuse a table written by another checkpoint."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from slq.mlops.config import Config

os.environ.setdefault("DO_NOT_TRACK", "1")
lancedb = pytest.importorskip("lancedb")

from slq.mlops import search as slq_search  # noqa: E402
from slq.mlops.index import RecallTargetError  # noqa: E402
from slq.mlops.stages import index  # noqa: E402

pytestmark = pytest.mark.integration


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng, n, d, centres=50, spread=0.5):
    """Unit vectors around `centres` unit centres, like embeddings of a few kinds of thing."""
    c = unit(rng, centres, d)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_checkpoint(ckpt_dir) -> str:
    """A query checkpoint (the records name its hash; the index stage checks the vectors are its)."""
    import torch

    from slq.checkpoint import checkpoint_hash, save_checkpoint

    save_checkpoint(ckpt_dir, torch.ones(2, 16), None, {"hidden_size": 16})
    return checkpoint_hash(ckpt_dir)


with tempfile.TemporaryDirectory() as _d:
    HASH = write_checkpoint(Path(_d) / "ckpt")  # the same tensors give the same hash in every fixture


def write_embeddings(out, split, img, txt, txt_to_img, checkpoint_hash=HASH):
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
    meta = {"checkpoint_hash": checkpoint_hash, "dim": img.shape[1], "backbone": "tiny"}
    (out / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def cfg(tmp_path):
    rng = np.random.default_rng(0)
    cfg = Config(root=str(tmp_path))
    cfg.embed.splits = ["val", "test"]
    write_checkpoint(cfg.path(cfg.train.out))
    for split, n_img in [("val", 20), ("test", 150)]:
        img = unit(rng, n_img, 16)
        txt_to_img = np.repeat(np.arange(n_img), 2)  # two captions per image
        write_embeddings(tmp_path / cfg.embed.out, split, img, unit(rng, 2 * n_img, 16), txt_to_img)
    return cfg


@pytest.fixture
def big(tmp_path):
    """One split of 5,000 clustered 32-d images, large enough for a real IVF_PQ index, and 1,000
    captions near the first 1,000 (searched exactly; 200 of them are the image table's recall queries)."""
    rng = np.random.default_rng(1)
    cfg = Config(root=str(tmp_path))
    cfg.embed.splits = ["test"]
    write_checkpoint(cfg.path(cfg.train.out))
    img = clustered(rng, 5000, 32)
    txt = img[:1000] + 0.3 * rng.standard_normal((1000, 32)).astype(np.float32) / np.sqrt(32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    write_embeddings(tmp_path / cfg.embed.out, "test", img, txt.astype(np.float32), np.arange(1000))
    cfg.index.ann_min_rows = 5000
    cfg.index.num_partitions = 32
    cfg.index.num_sub_vectors = 4
    return cfg


def test_run_writes_tables_versions_and_report(cfg):
    cfg.index.ann_min_rows = 300  # only test_text (300 rows) gets an ANN index
    report = index.run(cfg)
    on_disk = json.loads(cfg.path(cfg.index.out).read_text())
    assert on_disk == report
    assert report["checkpoint_hash"] == HASH
    assert report["slq_val_image"] == {"rows": 20, "version": 1, "ann": False}
    text = report["slq_test_text"]
    assert text["rows"] == 300 and text["ann"] is True and text["version"] == 2  # the index is a new version
    s = text["search"]
    assert s["index_type"] == "IVF_PQ" and s["metric"] == "l2" and s["recall_k"] == 10
    assert s["recall"] >= cfg.index.recall_target and s["nprobes"] in cfg.index.nprobes
    assert s["refine_factor"] in cfg.index.refine_factors and s["recall_queries"] == 150  # the 150 test images
    assert any(t["nprobes"] == s["nprobes"] and t["refine_factor"] == s["refine_factor"] for t in s["tried"])
    assert not any(p.name.endswith(".tmp") for p in cfg.path(cfg.index.out).parent.iterdir())

    # measurements, wall times included, go to the metrics file only
    metrics = json.loads(cfg.path(cfg.index.metrics).read_text())
    m = metrics["slq_test_text"]
    assert m["build_s"] > 0 and 0 < m["p50_ms"] <= m["p95_ms"] and m["exact_p50_ms"] > 0
    assert m["recall_at_10"] == s["recall"] and (m["nprobes"], m["refine_factor"]) == (s["nprobes"], s["refine_factor"])
    assert metrics["slq_val_image"] == {"rows": 20, "index_type": "exact"}
    timed = [key for e in report.values() if isinstance(e, dict) for key in [*e, *e.get("search", {})]
             if key.endswith(("_s", "_ms"))]
    assert timed == []

    db = lancedb.connect(str(cfg.path(cfg.index.uri)))
    assert sorted(db.list_tables().tables) == ["slq_test_image", "slq_test_text", "slq_val_image", "slq_val_text"]
    tbl = db.open_table("slq_test_text")
    assert tbl.version == text["version"]
    assert [i.index_type for i in tbl.list_indices()] == ["IvfPq"]
    assert db.open_table("slq_test_image").list_indices() == []
    schema = tbl.schema
    assert str(schema.field("vector").type) == "fixed_size_list<item: float>[16]"
    assert {"id", "image_id", "caption", "image", "split", "checkpoint_hash"} <= set(schema.names)
    row = tbl.search().where("id = 'cap3'").limit(1).to_list()[0]
    assert row["image_id"] == "img1" and row["caption"] == "caption 3 of image 1"
    assert row["image"] == "images/1.png" and row["checkpoint_hash"] == HASH


def test_search_with_own_vector_returns_item_first(cfg):
    index.run(cfg)
    img = np.load(cfg.path(cfg.embed.out) / "test_image.npy")
    searcher = slq_search.Searcher(cfg, HASH)
    for i in (0, 7, 149):
        res = searcher.search(img[i], "test", "image", k=3)
        hits = res["hits"]
        assert res["table"] == "slq_test_image" and res["search"]["mode"] == "exact"
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


def test_ann_is_measured_tuned_and_used(big):
    """5,000 clustered vectors: the index reaches the target with settings searched from the grid,
    and search then uses exactly those settings, finding what exact search finds."""
    report = index.run(big)
    s = report["slq_test_image"]["search"]
    assert report["slq_test_image"]["ann"] and not report["slq_test_text"]["ann"]
    assert s["recall"] >= 0.95 and s["recall_queries"] == 200
    assert s["num_partitions"] == 32 and s["num_sub_vectors"] == 4
    # greedy ascent from the grid's start: the first setting tried is the cheapest, the chosen one the last
    assert (s["tried"][0]["nprobes"], s["tried"][0]["refine_factor"]) == (8, None)
    assert s["tried"][0]["recall"] < 0.95  # 4-byte PQ codes alone do not reach it: tuning had to raise settings

    searcher = slq_search.Searcher(big, HASH)
    txt = np.load(big.path(big.embed.out) / "test_text.npy")
    img = np.load(big.path(big.embed.out) / "test_image.npy")
    found = 0
    for j in range(0, 1000, 50):  # 20 caption queries
        res = searcher.search(txt[j], "test", "image", k=10)
        assert res["search"] == {"mode": "ann", "index_type": "IVF_PQ", "metric": "l2", "nprobes": s["nprobes"],
                                 "refine_factor": s["refine_factor"], "recall": s["recall"], "recall_k": 10}
        exact = {f"img{i}" for i in np.argsort(-(img @ txt[j]))[:10]}
        found += len(exact & {h["id"] for h in res["hits"]})
    assert found / 200 >= 0.9

    exact_searcher = slq_search.Searcher(big, HASH, exact=True)
    res = exact_searcher.search(txt[0], "test", "image", k=10)
    assert res["search"]["mode"] == "exact"
    assert [h["id"] for h in res["hits"]] == [f"img{i}" for i in np.argsort(-(img @ txt[0]))[:10]]


def test_unreachable_recall_target_fails_clearly(big):
    big.index.nprobes, big.index.refine_factors = [1], [None]  # one probe, PQ distances only
    with pytest.raises(RecallTargetError) as e:
        index.run(big)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("table slq_test_image: ANN recall@10 reached at most 0.")
    assert "nprobes 1, refine_factor None" in msg and "index.recall_target 0.95" in msg
    assert "index.refine_factors" in msg and "index.ann_min_rows" in msg


def test_settings_are_checked_before_any_work(cfg):
    for key, value, words in (("ann_type", "HNSW", "index.ann_type 'HNSW'"),
                              ("recall_target", 1.5, "index.recall_target 1.5"),
                              ("nprobes", [16, 8], "index.nprobes [16, 8]"),
                              ("refine_factors", [5, None], "null, for no re-rank, only first")):
        bad = Config(root=cfg.root)
        bad.embed.splits = cfg.embed.splits
        setattr(bad.index, key, value)
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            index.run(bad)
    assert not cfg.path(cfg.index.uri).exists()
    cfg.index.ann_min_rows, cfg.index.num_sub_vectors = 300, 5
    with pytest.raises(ValueError, match="num_sub_vectors 5 does not divide the vector size 16"):
        index.run(cfg)


def test_stale_settings_fall_back_to_exact(big):
    big.index.ann_min_rows = 10**6  # no ANN index: exact, and it says why
    index.run(big)
    res = slq_search.Searcher(big, HASH).search(np.ones(32, np.float32) / 32**0.5, "test", "image", k=3)
    assert res["search"]["mode"] == "exact" and "ann_min_rows" in res["search"]["why"]

    big.index.ann_min_rows = 5000
    report = index.run(big)
    tbl = lancedb.connect(str(big.path(big.index.uri))).open_table("slq_test_image")
    tbl.delete("id = 'img0'")  # the table moved on after tuning: the settings no longer describe it
    res = slq_search.Searcher(big, HASH).search(np.ones(32, np.float32) / 32**0.5, "test", "image", k=3)
    assert res["search"]["mode"] == "exact"
    assert f"tuned for table version {report['slq_test_image']['version']}" in res["search"]["why"]


def test_embeddings_of_another_checkpoint_are_not_indexed(cfg):
    from slq.mlops.records import StaleRecordError

    meta = cfg.path(cfg.embed.out) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "checkpoint_hash": "0123456789abcdef"}))
    with pytest.raises(StaleRecordError, match=f"describes checkpoint 0123456789abcdef, but .* is checkpoint {HASH}"):
        index.run(cfg)
    assert not cfg.path(cfg.index.out).exists()


def test_a_table_of_another_checkpoint_is_refused(cfg):
    index.run(cfg)
    searcher = slq_search.Searcher(cfg, "fedcba9876543210", source="the checkpoint checkpoints/slq")
    with pytest.raises(slq_search.CheckpointMismatch) as e:
        searcher.search(np.zeros(16, np.float32), "test", "text", k=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"table slq_test_text was written by checkpoint {HASH}, not by the checkpoint checkpoints/slq " \
           "(fedcba9876543210)" in msg and "dvc repro index" in msg
    with pytest.raises(slq_search.SearchError, match="no index for split 'train'.*splits with a text index: test, val"):
        slq_search.Searcher(cfg, HASH).search(np.zeros(16, np.float32), "train", "text", k=1)

"""MMEB v1 benchmark (hit@1 by hand on a tiny copy) and the benchmark report writers."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from slq.benchmarks import DataError, MissingData, Result, get_benchmark
from slq.benchmarks.mmeb import DATASETS, MMEB
from slq.mlops.benchmark_report import (
    markdown_table,
    modality_gap,
    pca_scatter_png,
    write_report,
)

CLS_INST = "Represent the given image for classification"
T2I_INST = "Find an image that matches the caption"
VQA_INST = "Represent the image with the question"

# The fake embedder's vectors: text -> VEC[text], image -> VEC[file name], (image, text) -> the sum.
VEC = {
    "red.png": [1, 0, 0], "green.png": [0, 1, 0], "blue.png": [0, 0, 1], "gray.png": [1, 1, 0],
    "cat": [1, 0, 0], "dog": [0, 1, 0], "car": [0, 0, 1], "what is it?": [0, 0, 0],
}


class FakeEmbedder:
    def __init__(self):
        self.calls = []

    def embed(self, corpus):
        self.calls.append(corpus)

        def vec(item):
            if corpus.kind == "text":
                return np.array(VEC[item], float)
            if corpus.kind == "image":
                return np.array(VEC[item.rsplit("/", 1)[-1]], float)
            return np.array(VEC[item[0].rsplit("/", 1)[-1]], float) + VEC[item[1]]

        return np.stack([vec(it) for it in corpus.items]).astype(np.float32)


def _rec(qi, qt, qimg, ti, texts, imgs=None):
    return {"qry_inst": qi, "qry_text": qt, "qry_img_path": qimg, "tgt_inst": ti, "tgt_text": texts,
            "tgt_img_path": imgs if imgs is not None else [""] * len(texts)}


TINY = {
    # classification, IND. Hand hit@1: hit, miss, hit (positive ties "dog" and comes first), miss
    # (two negatives tie above the positive) -> 2/4; one query won on a tie.
    "ImageNet-1K": [
        _rec(CLS_INST, "", "c/red.png", "", ["cat", "dog", "car"]),
        _rec("<|image_1|>\n" + CLS_INST, "", "c/green.png", "", ["cat", "dog", "car"]),
        _rec(CLS_INST, "", "c/gray.png", "", ["cat", "dog", "car"]),
        _rec(CLS_INST, "", "c/gray.png", "", ["car", "cat", "dog"]),
    ],
    # retrieval, IND: text -> image. hit, hit, miss -> 2/3.
    "MSCOCO_t2i": [
        _rec(T2I_INST, "cat", None, "", ["", "", ""], ["c/red.png", "c/green.png", "c/blue.png"]),
        _rec(T2I_INST, "dog", "", "", ["", ""], ["c/green.png", "c/blue.png"]),
        _rec(T2I_INST, "car", None, "", ["", "", ""], ["c/red.png", "c/blue.png", "c/gray.png"]),
    ],
    # VQA, OOD: image + question -> answer text. hit, miss -> 1/2.
    "ScienceQA": [
        _rec(VQA_INST, "what is it?", "c/blue.png", "", ["car", "cat"]),
        _rec(VQA_INST, "what is it?", "c/red.png", "", ["dog", "cat"]),
    ],
}
HAND = {"ImageNet-1K": 2 / 4, "MSCOCO_t2i": 2 / 3, "ScienceQA": 1 / 2}


@pytest.fixture
def mmeb_root(tmp_path):
    root = tmp_path / "mmeb"
    (root / "images" / "c").mkdir(parents=True)
    for name, color in [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220)),
                        ("gray", (128, 128, 128))]:
        Image.new("RGB", (56, 56), color).save(root / "images" / "c" / f"{name}.png")
    for ds, recs in TINY.items():
        (root / ds).mkdir()
        (root / ds / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_table_is_mmeb_v1():
    tasks = [t for t, _ in DATASETS.values()]
    splits = [s for _, s in DATASETS.values()]
    assert len(DATASETS) == 36
    assert [tasks.count(t) for t in ("classification", "vqa", "retrieval", "grounding")] == [10, 10, 12, 4]
    assert (splits.count("IND"), splits.count("OOD")) == (20, 16)
    assert get_benchmark("mmeb") is MMEB and MMEB.paper == {"classification": 60.9}


def test_hit_at_1_by_hand_and_aggregation(mmeb_root):
    emb = FakeEmbedder()
    res = MMEB(mmeb_root, datasets=list(TINY)).evaluate(emb)
    m = res.metrics
    for ds, v in HAND.items():
        assert m[ds] == pytest.approx(v)
    assert m["classification"] == pytest.approx(0.5)
    assert m["retrieval"] == pytest.approx(2 / 3)
    assert m["vqa"] == pytest.approx(0.5)
    assert "grounding" not in m
    assert m["ind"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["ood"] == pytest.approx(0.5)
    assert m["overall"] == pytest.approx(np.mean(list(HAND.values())))  # over datasets
    assert res.info["ties_at_top"] == {"ImageNet-1K": 1, "MSCOCO_t2i": 0, "ScienceQA": 0}
    assert not res.info["partial"] and res.info["missing"] == []
    assert res.curves["overall"][0] == pytest.approx(m["overall"]) and len(res.curves["overall"]) == 10
    assert res.curves["overall"][-1] == 1.0  # every positive is within its <= 3 candidates


def test_instructions_and_dedup(mmeb_root):
    emb = FakeEmbedder()
    MMEB(mmeb_root, datasets=["ImageNet-1K", "MSCOCO_t2i"]).evaluate(emb)
    by = {(c.kind, json.dumps(c.prompt, sort_keys=True)): c for c in emb.calls}
    # ImageNet-1K: 4 queries (gray twice; the <|image_1|> token stripped) -> 3 images, one prompt;
    # 12 candidate slots -> 3 labels.
    img = by[("image", json.dumps({"image": CLS_INST}))]
    assert sorted(p.rsplit("/", 1)[-1] for p in img.items) == ["gray.png", "green.png", "red.png"]
    assert sorted(by[("text", "{}")].items) == ["car", "cat", "dog"]
    # MSCOCO_t2i: the instruction sits in the text template; 8 candidate slots -> 4 distinct images.
    txt = by[("text", json.dumps({"text": T2I_INST + " {text}"}))]
    assert txt.items == ["cat", "dog", "car"]
    assert len([c for c in emb.calls if c.kind == "image" and not c.prompt]) == 1
    assert sum(len(c.items) for c in emb.calls) == 3 + 3 + 3 + 4
    assert all(c.data_hash for c in emb.calls)


def test_missing_dataset_and_partial(mmeb_root):
    with pytest.raises(MissingData, match="VisDial") as e:
        MMEB(mmeb_root, datasets=["ImageNet-1K", "VisDial"]).evaluate(FakeEmbedder())
    assert "ImageNet-1K" not in str(e.value)
    res = MMEB(mmeb_root, partial=True, datasets=["ImageNet-1K", "VisDial"]).evaluate(FakeEmbedder())
    assert res.info["partial"] and res.info["missing"] == ["VisDial"]
    assert res.info["datasets_run"] == ["ImageNet-1K"] and res.metrics["overall"] == 0.5
    full = MMEB(mmeb_root, partial=True).evaluate(FakeEmbedder())  # all 36 asked, 3 present
    assert len(full.info["missing"]) == 33 and full.metrics["overall"] == pytest.approx(np.mean(list(HAND.values())))
    with pytest.raises(MissingData, match="33 of 36"):
        MMEB(mmeb_root).evaluate(FakeEmbedder())
    with pytest.raises(ValueError, match="unknown dataset"):
        MMEB(mmeb_root, datasets=["ImageNet"]).evaluate(FakeEmbedder())


def test_bad_records_are_reported(mmeb_root):
    (mmeb_root / "images" / "c" / "blue.png").unlink()
    with pytest.raises(DataError, match=r"ScienceQA.*1 image\(s\) not found.*blue.png"):
        MMEB(mmeb_root, datasets=["ScienceQA"]).evaluate(FakeEmbedder())
    (mmeb_root / "ImageNet-1K" / "test.jsonl").write_text('{"qry_text": "x", "tgt_text": []}\nnot json\n')
    with pytest.raises(DataError, match="2 bad record"):
        MMEB(mmeb_root, datasets=["ImageNet-1K"]).evaluate(FakeEmbedder())


# ---- report ---------------------------------------------------------------------------------
def _results():
    mmeb = Result({"classification": 0.5, "retrieval": 2 / 3, "overall": 0.55},
                  curves={"overall": [0.55, 0.8, 1.0]}, info={"partial": True, "missing": ["VisDial"],
                                                               "files_hash": "abc123"})
    coco = Result({"t2i_R@1": 0.25}, curves={"t2i": [0.25, 0.5]}, info={"files_hash": "def456"})
    return {"mmeb": mmeb, "coco": coco}


META = {"backbone": "Qwen/Qwen3-VL-4B-Instruct", "revision": "r1", "num_queries": 20,
        "checkpoint_hash": "ck42", "prompts": {"text": "{text}"}}


def test_markdown_table():
    md = markdown_table(_results(), {"mmeb": {"classification": 60.9}}, META)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in md.splitlines() if line.startswith("| ")}
    assert ("mmeb", "classification", "50.0", "60.9", "partial") in rows
    assert ("mmeb", "retrieval", "66.7", "—", "partial") in rows
    assert ("coco", "t2i_R@1", "25.0", "—", "") in rows
    for s in ("Qwen/Qwen3-VL-4B-Instruct", "N_q: 20", "ck42", "mmeb `abc123`", "missing VisDial",
              "Caption truncation: not recorded"):
        assert s in md
    assert "60.9" in markdown_table(_results(), None, META)  # paper values from the registered class


def test_modality_gap_and_png(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    same = modality_gap(x, x.copy())
    assert same["gap_l2"] == pytest.approx(0, abs=1e-9)
    assert same["cos_within_image"] == pytest.approx(same["cos_within_text"], abs=1e-12)
    n, w = 200, same["cos_within_image"]  # between = all (i, j) pairs, the n matched ones included
    assert same["cos_between"] == pytest.approx((n * (n - 1) * w + n) / n**2)
    shifted = modality_gap(x, x + 3 * np.eye(16)[0])
    assert shifted["gap_l2"] > 0.5 and shifted["cos_within_text"] > shifted["cos_within_image"]
    png = pca_scatter_png(x, x + 3 * np.eye(16)[0], tmp_path / "plots" / "gap.png", "gap")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    assert [p.name for p in png.parent.iterdir()] == ["gap.png"]  # no temporary left behind


def test_write_report(tmp_path):
    gap = {**modality_gap(np.eye(3), np.eye(3)[::-1] + 0.1), "plot": str(tmp_path / "out" / "gap.png")}
    paths = write_report(tmp_path / "out", _results(), META, gap=gap, paper={"mmeb": {"classification": 60.9}})
    out = tmp_path / "out"
    md = (out / "benchmarks.md").read_text()
    assert "| mmeb | classification | 50.0 | 60.9 | partial |" in md and "## Modality gap" in md
    assert "](gap.png)" in md
    m = json.loads((out / "mmeb.json").read_text())
    assert m["classification"] == 0.5 and m["partial"] is True and m["checkpoint_hash"] == "ck42"
    assert json.loads((out / "mmeb_info.json").read_text())["missing"] == ["VisDial"]
    rows = list(csv.reader((out / "curves" / "mmeb.csv").open()))
    assert rows[0] == ["k", "overall"] and rows[3] == ["3", "1.000000"]
    assert json.loads((out / "modality_gap.json").read_text())["n_image"] == 3
    assert set(paths) >= {"markdown", "mmeb", "coco", "mmeb_recall", "coco_recall"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- end to end with the real encoder --------------------------------------------------------
def test_mmeb_end_to_end_tiny_backbone(mmeb_root, tmp_path):
    from slq.miniature.tiny import build_tiny_backbone
    from slq.benchmarks.cache import CachedEmbedder
    from slq.encoder import SLQEncoder

    bb = build_tiny_backbone("qwen2_vl", tmp_path / "bb")
    enc = SLQEncoder.from_pretrained(bb, num_queries=2)
    emb = CachedEmbedder(enc, tmp_path / "cache", checkpoint_hash="tiny", batch_size=8)
    bench = MMEB(mmeb_root, datasets=list(TINY))
    res = bench.evaluate(emb)
    assert set(HAND) | {"classification", "retrieval", "vqa", "ind", "ood", "overall"} <= set(res.metrics)
    assert all(0 <= v <= 1 for v in res.metrics.values())
    misses = emb.misses
    assert misses > 0 and emb.hits == 0
    again = bench.evaluate(emb)  # re-scoring hits the cache, never re-embeds
    assert again.metrics == res.metrics and emb.misses == misses and emb.hits == misses
    paths = write_report(tmp_path / "report", {"mmeb": res}, {"checkpoint_hash": "tiny", "num_queries": 2})
    assert "| mmeb | classification |" in paths["markdown"].read_text()

"""CIRR and FashionIQ on tiny on-disk copies of their real layouts, scored by hand.

A fake embedder returns vectors chosen per item, so every rank below is worked out by hand:
one-hot gallery images, queries built from a few of them.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slq.benchmarks import DataError, MissingData, get_benchmark
from slq.benchmarks.composed import GALLERY_PROMPT, QUERY_PROMPT

CIRR_N, TEST1_N = 8, 55
FIQ_IDS = {"dress": ["d0", "d1", "d2", "d3"], "shirt": ["s0", "s1", "s2", "s3"], "toptee": ["t0", "t1", "t2", "t3"]}
FIQ_ALL = [x for ids in FIQ_IDS.values() for x in ids]


def write_image(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def one_hot(n: int, weights: dict[int, float]) -> np.ndarray:
    v = np.zeros(n, dtype=np.float32)
    for i, w in weights.items():
        v[i] = w
    return v


class FakeEmbedder:
    """Image -> vector by file stem; (image, text) -> vector by (stem, text). Records every corpus."""

    def __init__(self, images: dict, queries: dict):
        self.images, self.queries, self.calls = images, queries, []

    def embed(self, corpus):
        self.calls.append(corpus)
        if corpus.kind == "image":
            return np.stack([self.images[Path(p).stem] for p in corpus.items])
        assert corpus.kind == "multimodal"
        return np.stack([self.queries[(Path(p).stem, t)] for p, t in corpus.items])


# ---- CIRR ----------------------------------------------------------------------------------------
def cirr_name(split: str, i: int) -> str:
    return f"{'dev' if split == 'val' else split}-{i}-0-img0"


def img(i: int) -> str:
    return cirr_name("val", i)


# pairid, reference, target, members, caption, query vector (over the 8 one-hot images)
CIRR_ROWS = [
    (0, 0, 1, [0, 1, 2, 3, 4, 5], "make it blue", {0: 0.9, 1: 0.3}),  # ref scores best: masked -> rank 0
    (1, 2, 3, [2, 3, 4, 5, 6, 7], "add a dog", {5: 0.5, 6: 0.4, 3: 0.3}),  # rank 2, subset rank 2
    (2, 4, 5, [4, 5, 6, 7, 2, 3], "zoom out.", {0: 0.9, 1: 0.8, 5: 0.5}),  # rank 2; within members rank 0
    (3, 3, 7, [3, 7, 6, 0, 1, 2], "two of them", {6: 0.5, 7: 0.5}),  # tie 6 vs 7: index 6 first -> rank 1
]


def cirr_row(pid, ref, tgt, members, caption):
    return {"pairid": pid, "reference": img(ref), "target_hard": img(tgt), "target_soft": {img(tgt): 1.0},
            "caption": caption, "img_set": {"id": pid, "members": [img(m) for m in members]}}


@pytest.fixture
def cirr_root(tmp_path):
    root = tmp_path / "cirr"
    split = {}
    for i in range(CIRR_N):
        split[img(i)] = f"./dev/{img(i)}.png"
        write_image(root / "dev" / f"{img(i)}.png", i)
    write_json(root / "image_splits" / "split.rc2.val.json", split)
    write_json(root / "captions" / "cap.rc2.val.json", [cirr_row(*r[:5]) for r in CIRR_ROWS])
    return root


def cirr_embedder() -> FakeEmbedder:
    images = {img(i): one_hot(CIRR_N, {i: 1.0}) for i in range(CIRR_N)}
    queries = {(img(ref), cap.rstrip(".")): one_hot(CIRR_N, w) for _, ref, _, _, cap, w in CIRR_ROWS}
    return FakeEmbedder(images, queries)


def add_rows(root: Path, *rows) -> None:
    path = root / "captions" / "cap.rc2.val.json"
    write_json(path, json.loads(path.read_text()) + list(rows))


def test_cirr_val_hand_worked(cirr_root):
    emb = cirr_embedder()
    res = get_benchmark("cirr")(root=cirr_root).evaluate(emb)
    # global ranks (reference masked): 0, 2, 2, 1 ; subset ranks: 0, 2, 0, 1
    assert res.metrics == pytest.approx({"R@1": 0.25, "R@5": 1.0, "R@10": 1.0, "R@50": 1.0,
                                         "R_subset@1": 0.5, "R_subset@2": 0.75, "R_subset@3": 1.0, "avg": 0.75})
    assert res.curves["recall"][:4] == pytest.approx([0.25, 0.5, 1.0, 1.0]) and len(res.curves["recall"]) == 50
    assert res.curves["recall_subset"] == pytest.approx([0.5, 0.75, 1.0])

    gal, qry = emb.calls
    assert gal.kind == "image" and gal.prompt == GALLERY_PROMPT and len(gal.items) == CIRR_N
    assert gal.items[0] == str(cirr_root / "dev" / f"{img(0)}.png")
    assert qry.kind == "multimodal" and qry.prompt == QUERY_PROMPT
    assert qry.items[2] == (str(cirr_root / "dev" / f"{img(4)}.png"), "zoom out")
    # the reference's instructions verbatim, leading space included
    assert QUERY_PROMPT == {"multimodal": " Modify this image with {text}. Describe modified image in one word: "}
    assert GALLERY_PROMPT == {"image": " Describe this image in one word: "}

    info = res.info
    assert info["counts"]["queries"] == 4 and info["counts"]["gallery"] == CIRR_N
    assert info["files"] == ["captions/cap.rc2.val.json", "image_splits/split.rc2.val.json"]
    assert info["partial"] is False and info["dropped"] == {} and len(info["data_hash"]) == 16
    assert info["prompts"] == {"query": QUERY_PROMPT, "gallery": GALLERY_PROMPT}


def test_cirr_reference_is_masked(cirr_root):
    """A query identical to its reference image still finds its target first."""
    write_json(cirr_root / "captions" / "cap.rc2.val.json", [cirr_row(0, 0, 1, [0, 1, 2, 3, 4, 5], "x")])
    emb = cirr_embedder()
    emb.queries[(img(0), "x")] = one_hot(CIRR_N, {0: 1.0, 1: 0.1})
    res = get_benchmark("cirr")(root=cirr_root).evaluate(emb)
    assert res.metrics["R@1"] == 1.0 and res.metrics["R_subset@1"] == 1.0


def test_cirr_image_root_option(cirr_root, tmp_path):
    """Split paths resolve under `image_root` when the images live apart from the annotations."""
    (cirr_root / "dev").rename(tmp_path / "dev")
    with pytest.raises(DataError, match="missing_image: 8"):
        get_benchmark("cirr")(root=cirr_root).evaluate(cirr_embedder())
    res = get_benchmark("cirr")(root=cirr_root, image_root=tmp_path).evaluate(cirr_embedder())
    assert res.metrics["R@1"] == 0.25


def test_cirr_test1_submission(tmp_path):
    root, out = tmp_path / "cirr", tmp_path / "submit"
    names = [cirr_name("test1", i) for i in range(TEST1_N)]
    for i, n in enumerate(names):
        write_image(root / "test1" / f"{n}.png", i)
    write_json(root / "image_splits" / "split.rc2.test1.json", {n: f"./test1/{n}.png" for n in names})
    rows = [  # test1 rows carry no targets
        {"pairid": 10, "reference": names[0], "caption": "up", "img_set": {"members": names[:6]}},
        {"pairid": 11, "reference": names[54], "caption": "down",
         "img_set": {"members": [names[54], names[10], names[20], names[30], names[40], names[50]]}},
    ]
    write_json(root / "captions" / "cap.rc2.test1.json", rows)
    images = {n: one_hot(TEST1_N, {i: 1.0}) for i, n in enumerate(names)}
    queries = {(names[0], "up"): np.linspace(1.0, 0.1, TEST1_N, dtype=np.float32),  # prefers low indices
               (names[54], "down"): np.linspace(0.1, 1.0, TEST1_N, dtype=np.float32)}  # prefers high ones

    bench = get_benchmark("cirr")(root=root, split="test1", submission_dir=str(out))
    res = bench.evaluate(FakeEmbedder(images, queries))
    assert res.metrics == {}
    files = sorted(res.info["submission_files"])
    assert [Path(f).name for f in files] == ["cirr_test1_recall.json", "cirr_test1_recall_subset.json"]

    recall = json.loads((out / "cirr_test1_recall.json").read_text())
    assert set(recall) == {"version", "metric", "10", "11"}
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert recall["10"] == names[1:51]  # reference (index 0) never listed
    assert recall["11"] == names[53:3:-1]
    assert all(len(v) == 50 for k, v in recall.items() if k.isdigit())
    subset = json.loads((out / "cirr_test1_recall_subset.json").read_text())
    assert subset == {"version": "rc2", "metric": "recall_subset",
                      "10": names[1:4], "11": [names[50], names[40], names[30]]}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    with pytest.raises(ValueError, match="submission_dir"):
        get_benchmark("cirr")(root=root, split="test1").evaluate(FakeEmbedder(images, queries))


def test_cirr_dangling_target_and_partial(cirr_root):
    add_rows(cirr_root, cirr_row(4, 0, 1, [0, 1, 2, 3, 4, 5], "x") | {"target_hard": "dev-99-0-img0"})
    with pytest.raises(DataError, match=r"dangling_target: 1 \(e\.g\. pairid 4: target 'dev-99-0-img0'"):
        get_benchmark("cirr")(root=cirr_root).evaluate(cirr_embedder())
    res = get_benchmark("cirr")(root=cirr_root, partial=True).evaluate(cirr_embedder())
    assert res.metrics["R@1"] == 0.25 and res.metrics["R_subset@2"] == 0.75  # the four good rows
    assert res.info["partial"] is True and res.info["dropped"] == {"dangling_target": 1}
    assert res.info["counts"]["queries"] == 4 and res.info["counts"]["queries_in_file"] == 5


def test_cirr_duplicate_pairid_and_dangling_member(cirr_root):
    add_rows(cirr_root, cirr_row(0, 0, 1, [0, 1, 2, 3, 4, 5], "make it blue"),
             cirr_row(5, 0, 1, [0, 1, 2, 3, 4, 42], "make it blue"))
    with pytest.raises(DataError) as e:
        get_benchmark("cirr")(root=cirr_root).evaluate(cirr_embedder())
    assert "duplicate_pairid: 1 (e.g. pairid 0 (row 4))" in str(e.value)
    assert "dangling_member: 1" in str(e.value) and "partial: true" in str(e.value)


def test_cirr_missing_files_are_named(cirr_root):
    (cirr_root / "image_splits" / "split.rc2.val.json").unlink()
    with pytest.raises(MissingData, match=r"image_splits/split\.rc2\.val\.json"):
        get_benchmark("cirr")(root=cirr_root).evaluate(cirr_embedder())
    with pytest.raises(MissingData, match=r"captions/cap\.rc2\.test1\.json.*split\.rc2\.test1\.json"):
        get_benchmark("cirr")(root=cirr_root, split="test1", submission_dir="x").evaluate(cirr_embedder())


def test_cirr_unreadable_image(cirr_root):
    (cirr_root / "dev" / f"{img(7)}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable_image: 1"):
        get_benchmark("cirr")(root=cirr_root).evaluate(cirr_embedder())
    emb = cirr_embedder()
    res = get_benchmark("cirr")(root=cirr_root, partial=True).evaluate(emb)
    # image 7 is a member of pairids 1, 2 and the target of 3: only pairid 0 is left
    assert res.info["dropped"] == {"unreadable_image": 1, "query_with_bad_image": 3}
    assert res.info["counts"]["gallery"] == CIRR_N - 1 and len(emb.calls[0].items) == CIRR_N - 1
    assert res.metrics["R@1"] == 1.0


# ---- FashionIQ -----------------------------------------------------------------------------------
def fid(x: str) -> int:
    return FIQ_ALL.index(x)


def vec(**w) -> np.ndarray:
    return one_hot(len(FIQ_ALL), {fid(k): v for k, v in w.items()})


# category -> rows of (candidate, target, captions, vector for "c1 and c2", vector for "c2 and c1")
FIQ_ROWS = {
    "dress": [  # order 1 alone ranks d2 first, order 2 alone d3; their sum ranks the target d1 first
        ("d0", "d1", ["is red.", "has sleeves"], vec(d2=1.0, d1=0.6), vec(d2=-0.9, d1=0.6, d3=0.7)),
        ("d2", "d3", ["is longer", "is darker"], vec(d0=1.0), vec(d0=1.0, d3=0.1)),  # rank 1
    ],
    "shirt": [  # d2 scores best but is not in the shirt gallery -> rank 0
        ("s0", "s2", ["is plain", "no logo"], vec(d2=1.0, s2=0.5), vec(d2=1.0, s2=0.5)),
    ],
    "toptee": [  # t1 and t3 tie: lower index t1 first -> rank 1
        ("t0", "t3", ["is green", "is shorter"], vec(t1=1.0, t3=1.0), vec(t1=1.0, t3=1.0)),
    ],
}


def join(a: str, b: str) -> str:
    """The reference's FashionIQ modification text (eval_qwen_on_coco.py)."""
    return '"' + ", ".join(c.strip(".?, ") for c in (a, b)) + '"'


@pytest.fixture
def fiq_root(tmp_path):
    root = tmp_path / "fashionIQ_dataset"
    for cat, ids in FIQ_IDS.items():
        for x in ids:
            path = root / "images" / f"{x}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (56, 56), (fid(x) * 20, 80, 160)).save(path, format="JPEG")
        write_json(root / "image_splits" / f"split.{cat}.val.json", ids)
        write_json(root / "captions" / f"cap.{cat}.val.json",
                   [{"candidate": c, "target": t, "captions": caps} for c, t, caps, _, _ in FIQ_ROWS[cat]])
    return root


def fiq_embedder() -> FakeEmbedder:
    images = {x: vec(**{x: 1.0}) for x in FIQ_ALL}
    queries = {}
    for rows in FIQ_ROWS.values():
        for c, _, (c1, c2), v1, v2 in rows:
            queries[(c, join(c1, c2))], queries[(c, join(c2, c1))] = v1, v2
    return FakeEmbedder(images, queries)


def test_fashioniq_hand_worked(fiq_root):
    emb = fiq_embedder()
    res = get_benchmark("fashioniq")(root=fiq_root).evaluate(emb, ks=(1,))
    m = res.metrics
    assert (m["dress_R@1"], m["shirt_R@1"], m["toptee_R@1"]) == (0.5, 1.0, 0.0)
    assert m["mean_R@1"] == pytest.approx(0.5)
    assert m["mean_R@10"] == m["mean_R@50"] == 1.0 and m["dress_R@50"] == 1.0
    assert res.curves["recall"][:2] == pytest.approx([0.5, 1.0]) and len(res.curves["recall"]) == 50
    assert res.curves["recall_toptee"][:2] == [0.0, 1.0]

    # per category: one gallery corpus (that category's images only), then both caption orders
    assert [c.kind for c in emb.calls] == ["image", "multimodal", "multimodal"] * 3
    for cat, (gal, o1, o2) in zip(FIQ_IDS, zip(*[iter(emb.calls)] * 3)):
        name = "shirt" if cat == "toptee" else cat  # the reference's per-category instructions, verbatim
        assert [Path(p).stem for p in gal.items] == FIQ_IDS[cat]
        assert gal.prompt == {"image": f" Describe this {name} in one word based on its style: "}
        assert o1.prompt == o2.prompt == {"multimodal": f" Change the style of this {name} to {{text}}. "
                                                        f"Describe this modified {name} in one word based on its style: "}
    dress_o1, dress_o2 = emb.calls[1].items, emb.calls[2].items
    assert dress_o1[0] == (str(fiq_root / "images" / "d0.jpg"), '"is red, has sleeves"')
    assert dress_o2[0] == (str(fiq_root / "images" / "d0.jpg"), '"has sleeves, is red"')

    info = res.info
    assert info["categories"] == ["dress", "shirt", "toptee"]
    assert info["counts"]["dress"] == {"queries": 2, "gallery": 4, "queries_in_file": 2, "gallery_in_file": 4}
    assert "captions/cap.shirt.val.json" in info["files"] and "image_splits/split.toptee.val.json" in info["files"]
    assert info["partial"] is False and info["dropped"] == {}


def test_fashioniq_one_order_alone_would_differ(fiq_root):
    """The sum matters: with only "c1 and c2" the first dress query would miss at k=1."""
    emb = fiq_embedder()
    for rows in FIQ_ROWS.values():
        for c, _, (c1, c2), v1, _ in rows:
            emb.queries[(c, join(c2, c1))] = v1
    res = get_benchmark("fashioniq")(root=fiq_root, categories=["dress"]).evaluate(emb, ks=(1,))
    assert res.metrics["dress_R@1"] == 0.0 and res.info["categories"] == ["dress"]


def test_fashioniq_bad_input(fiq_root):
    path = fiq_root / "captions" / "cap.dress.val.json"
    write_json(path, json.loads(path.read_text()) + [{"candidate": "zz9", "target": "d1", "captions": ["a", "b"]}])
    (fiq_root / "images" / "s3.jpg").unlink()
    with pytest.raises(DataError) as e:
        get_benchmark("fashioniq")(root=fiq_root).evaluate(fiq_embedder())
    msg = str(e.value)
    assert "dangling_candidate: 1 (e.g. captions/cap.dress.val.json[2]: candidate 'zz9'" in msg
    assert "missing_image: 1" in msg and "s3.jpg" in msg
    res = get_benchmark("fashioniq")(root=fiq_root, partial=True).evaluate(fiq_embedder(), ks=(1,))
    assert res.info["partial"] is True and res.info["dropped"] == {"dangling_candidate": 1, "missing_image": 1}
    assert res.metrics["dress_R@1"] == 0.5 and res.info["counts"]["shirt"]["gallery"] == 3

    (fiq_root / "captions" / "cap.shirt.val.json").unlink()
    with pytest.raises(MissingData, match=r"captions/cap\.shirt\.val\.json"):
        get_benchmark("fashioniq")(root=fiq_root).evaluate(fiq_embedder())


# ---- end to end with the real encoder ------------------------------------------------------------
def test_real_encoder_end_to_end_uses_cache(tmp_path, cirr_root, fiq_root):
    from slq.miniature.tiny import build_tiny_backbone
    from slq.benchmarks.cache import CachedEmbedder
    from slq.encoder import SLQEncoder

    enc = SLQEncoder.from_pretrained(build_tiny_backbone("qwen2_vl", tmp_path / "bb"), num_queries=2,
                                     device="cpu")
    emb = CachedEmbedder(enc, tmp_path / "cache", checkpoint_hash="tiny")
    for name, root, n_corpora in (("cirr", cirr_root, 2), ("fashioniq", fiq_root, 9)):
        bench = get_benchmark(name)(root=root)
        first = bench.evaluate(emb)
        misses, hits = emb.misses, emb.hits
        second = bench.evaluate(emb)
        assert emb.misses == misses and emb.hits == hits + n_corpora
        assert first.metrics == second.metrics
        assert all(0.0 <= v <= 1.0 for v in first.metrics.values())
    assert emb.misses == 2 + 9

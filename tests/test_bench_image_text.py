"""Image-text benchmarks (COCO, Flickr30K, their I2I variants, KARR, the world) on tiny on-disk copies.

Each copy uses the real file names and field names. A fake embedder gives every item the one-hot
vector of the image it belongs to (a caption: the `imgN` it names; a photo: the `imgN` in its file
name; a rendered caption: looked up), so recalls are known exactly; `perm` sends captions of image
i to image perm[i] to check hand-computed R@1.
"""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slq.benchmarks import DataError, MissingData, get_benchmark
from slq.benchmarks.base import files_hash
from slq.benchmarks.image_text import CaptionRenderer

DIM = 16
pytestmark = pytest.mark.filterwarnings("ignore:.*the standard protocol has")  # tiny copies, on purpose
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


class FakeEmbedder:
    """One-hot vectors of each item's image; records every corpus it was asked for."""

    def __init__(self, perm=None, lookup=None):
        self.perm = perm or {}
        self.lookup = lookup or {}  # item string -> image number (rendered captions, world files)
        self.corpora = []

    def ident(self, kind, item) -> int:
        s = str(item)
        if s in self.lookup:
            return self.lookup[s]
        m = re.search(r"img(\d+)", s if kind == "text" else Path(s).name)
        assert m, f"fake embedder cannot place {s!r}"
        return int(m.group(1))

    def embed(self, corpus):
        self.corpora.append(corpus)
        ids = [self.ident(corpus.kind, x) for x in corpus.items]
        if corpus.kind == "text" or any(str(x) in self.lookup for x in corpus.items):
            ids = [self.perm.get(i, i) for i in ids]
        return np.eye(DIM, dtype=np.float32)[ids]  # (N, D)


def save_image(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), COLOURS[n % len(COLOURS)]).save(path)


def captions(n: int, count: int) -> list[str]:
    return [f"a {COLOURS[n]} square, picture img{n}, caption number {k}" for k in range(count)]


# --- tiny copies of the real formats --------------------------------------------------------------

# (image number, split, number of captions); the 6-caption image checks captions_per_image.
LAYOUT = [(0, "test", 6), (1, "test", 5), (2, "restval", 5), (3, "test", 5), (4, "train", 5)]
TEST = [0, 1, 3]


def karpathy_coco(root: Path) -> Path:
    imgs = []
    for n, split, count in LAYOUT:
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_img{n}.jpg"
        save_image(root / folder / name, n)
        imgs.append({"filepath": folder, "filename": name, "imgid": n, "cocoid": 1000 + n, "split": split,
                     "sentids": list(range(count)),
                     "sentences": [{"raw": c, "tokens": c.split(), "imgid": n} for c in captions(n, count)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": imgs, "dataset": "coco"}))
    return root


def karpathy_flickr(root: Path, folder: str = "flickr30k-images") -> Path:
    imgs = []
    for n, split, count in LAYOUT:
        save_image(root / folder / f"img{n}.jpg", n)
        imgs.append({"filename": f"img{n}.jpg", "imgid": n, "split": split, "sentids": list(range(count)),
                     "sentences": [{"raw": c, "tokens": c.split(), "imgid": n} for c in captions(n, count)]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": imgs, "dataset": "flickr30k"}))
    return root


def clip_coco(root: Path) -> Path:
    images, anns = [], []
    for n in TEST:
        name = f"COCO_val2014_img{n}.jpg"
        save_image(root / "val2014" / name, n)
        images.append({"id": 1000 + n, "file_name": name})
        anns += [{"id": len(anns), "image_id": 1000 + n, "caption": c} for c in captions(n, 6 if n == 0 else 5)]
    (root / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def flickr_txt(root: Path) -> Path:
    lines = ["image,caption"]
    for n in TEST:
        save_image(root / "images" / f"img{n}.jpg", n)
        lines += [f"img{n}.jpg,{c}" for c in captions(n, 5)]  # captions hold a comma
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


def check_perfect(res, n_images, n_texts):
    assert all(v == 1.0 for v in res.metrics.values()), res.metrics
    assert set(res.metrics) == {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"mean_R"}
    assert res.info["n_images"] == n_images and res.info["n_texts"] == n_texts
    assert [len(res.curves[d]) for d in ("t2i", "i2t")] == [50, 50]


# --- COCO / Flickr30K -----------------------------------------------------------------------------


def test_coco_karpathy_first_five_captions_of_test_only(tmp_path):
    root = karpathy_coco(tmp_path)
    fake = FakeEmbedder()
    res = get_benchmark("coco")(root).evaluate(fake)
    check_perfect(res, 3, 15)
    info = res.info
    assert info["format"] == "karpathy" and info["split"] == "test" and info["captions_per_image"] == 5
    assert info["captions_cut"] == 1 and info["skipped_splits"] == {"restval": 1, "train": 1}
    assert info["files"] == [str(root / "dataset_coco.json")]
    assert info["data_hash"] == files_hash([root / "dataset_coco.json"])
    assert info["partial"] is False and info["dropped"] == {}
    assert info["truncation"] == {"max_caption_words": None, "n_truncated": 0}
    assert info["prompts"] == {"image": {}, "text": {}}  # {}: the checkpoint's own prompts
    assert info["paper"] == {"i2t_R@1": 69.6, "t2i_R@1": 55.4}
    images, texts = fake.corpora
    assert images.kind == "image" and [Path(p).name for p in images.items] == [
        f"COCO_val2014_img{n}.jpg" for n in TEST]
    assert texts.kind == "text" and texts.items[:5] == captions(0, 5) and "img2" not in " ".join(texts.items)
    assert images.data_hash == texts.data_hash == info["data_hash"]


def test_captions_per_image_none_keeps_all(tmp_path):
    res = get_benchmark("coco")(karpathy_coco(tmp_path), captions_per_image=None).evaluate(FakeEmbedder())
    check_perfect(res, 3, 16)
    assert res.info["captions_per_image"] is None and res.info["captions_cut"] == 0


def test_hand_computed_recall_with_swapped_images(tmp_path):
    """Captions of images 0 and 1 point at each other's image: only image 3 is right at rank 1."""
    bench = get_benchmark("flickr30k")(karpathy_flickr(tmp_path))
    res = bench.evaluate(FakeEmbedder(perm={0: 1, 1: 0}))
    assert res.metrics["t2i_R@1"] == pytest.approx(5 / 15)
    assert res.metrics["i2t_R@1"] == pytest.approx(1 / 3)
    # t2i: the true image ties with image 3 at score 0 and wins on the lower index (rank 2).
    assert res.curves["t2i"][:3] == pytest.approx([1 / 3, 1.0, 1.0])
    # i2t: image 0's top 5 are image 1's captions; its own follow (ties with image 3's, lower index first).
    assert res.curves["i2t"][4:6] == pytest.approx([1 / 3, 1.0])
    assert res.metrics["i2t_R@5"] == pytest.approx(1 / 3) and res.metrics["i2t_R@10"] == 1.0
    assert res.info["images_dir"] == str(tmp_path / "flickr30k-images")


def test_clip_benchmark_formats(tmp_path):
    coco = get_benchmark("coco")(clip_coco(tmp_path / "coco")).evaluate(FakeEmbedder())
    check_perfect(coco, 3, 15)
    assert coco.info["format"] == "clip_benchmark" and coco.info["images_dir"] == str(tmp_path / "coco" / "val2014")
    flickr = get_benchmark("flickr30k")(flickr_txt(tmp_path / "f30k")).evaluate(fake := FakeEmbedder())
    check_perfect(flickr, 3, 15)
    assert flickr.info["format"] == "clip_benchmark" and flickr.info["images_dir"] == str(tmp_path / "f30k" / "images")
    assert fake.corpora[1].items[0] == captions(0, 1)[0]  # the comma inside the caption survives


def test_images_option_and_format_option(tmp_path):
    root = karpathy_flickr(tmp_path, folder="pics")
    with pytest.raises(MissingData, match="`images` option"):  # not in a default folder
        get_benchmark("flickr30k")(root).evaluate(FakeEmbedder())
    res = get_benchmark("flickr30k")(root, images="pics").evaluate(FakeEmbedder())
    assert res.info["format"] == "karpathy" and res.info["images_dir"] == str(root / "pics")
    flickr_txt(root)  # both formats present: Karpathy wins unless `format` says otherwise
    assert get_benchmark("flickr30k")(root, images="pics").evaluate(FakeEmbedder()).info["format"] == "karpathy"
    res = get_benchmark("flickr30k")(root, format="clip_benchmark").evaluate(FakeEmbedder())
    assert res.info["format"] == "clip_benchmark"
    with pytest.raises(ValueError, match="unknown option"):
        get_benchmark("coco")(root, captions_per_imag=5)


@pytest.mark.parametrize("name, files", [
    ("coco", ["dataset_coco.json", "coco_test_karpathy.json"]),
    ("flickr30k", ["dataset_flickr30k.json", "flickr30k_test_karpathy.txt"]),
    ("coco_i2i", ["dataset_coco.json", "coco_test_karpathy.json"]),
    ("karr", ["dataset_dict.json", "state.json", "data.jsonl"]),
    ("world", ["manifest.jsonl"]),
])
def test_missing_files_are_named(tmp_path, name, files):
    with pytest.raises(MissingData) as err:
        get_benchmark(name)(tmp_path).evaluate(FakeEmbedder())
    for f in files:
        assert f in str(err.value)
    assert str(tmp_path) in str(err.value)


def broken_coco(root: Path) -> Path:
    """Image 1 listed twice, image 3's file missing."""
    karpathy_coco(root)
    data = json.loads((root / "dataset_coco.json").read_text())
    data["images"].append(dict(data["images"][1]))
    (root / "dataset_coco.json").write_text(json.dumps(data))
    (root / "val2014" / "COCO_val2014_img3.jpg").unlink()
    return root


def test_duplicates_and_missing_images_are_reported(tmp_path):
    with pytest.raises(DataError) as err:
        get_benchmark("coco")(broken_coco(tmp_path)).evaluate(FakeEmbedder())
    msg = str(err.value)
    assert "1 duplicate image ids" in msg and "val2014/COCO_val2014_img1.jpg" in msg
    assert "1 missing image files" in msg and "COCO_val2014_img3.jpg" in msg
    assert "partial" in msg


def test_partial_runs_on_the_present_part(tmp_path):
    with pytest.warns(UserWarning, match="partial"):
        res = get_benchmark("coco")(broken_coco(tmp_path), partial=True).evaluate(FakeEmbedder())
    check_perfect(res, 2, 10)
    assert res.info["partial"] is True
    assert res.info["dropped"] == {"duplicate image ids": 1, "missing image files": 1}


def test_clip_coco_dangling_and_duplicate_ids(tmp_path):
    root = clip_coco(tmp_path)
    data = json.loads((root / "coco_test_karpathy.json").read_text())
    data["images"].append({"id": 1000, "file_name": "COCO_val2014_img0.jpg"})
    data["annotations"].append({"id": 99, "image_id": 4242, "caption": "nobody's caption"})
    (root / "coco_test_karpathy.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"1 duplicate image ids.*1 captions of unknown image ids|"
                                        r"1 captions of unknown image ids.*1 duplicate image ids"):
        get_benchmark("coco")(root).evaluate(FakeEmbedder())


def test_truncation_is_applied_and_recorded(tmp_path):
    fake = FakeEmbedder(lookup={"a red square,": 0, "a green square,": 1, "a yellow square,": 3})
    res = get_benchmark("coco")(karpathy_coco(tmp_path), max_caption_words=3).evaluate(fake)
    assert res.info["truncation"] == {"max_caption_words": 3, "n_truncated": 15}
    assert all(len(c.split()) == 3 for c in fake.corpora[1].items)
    assert res.metrics["t2i_R@1"] == 1.0


def test_prompt_override_is_used_and_recorded(tmp_path):
    fake = FakeEmbedder()
    res = get_benchmark("flickr30k")(karpathy_flickr(tmp_path), prompts={"text": {"text": "Caption: {text}"}}
                                     ).evaluate(fake)
    want = {"text": "Caption: {text}"}
    assert res.info["prompts"]["text"] == want and fake.corpora[1].prompt == want
    assert fake.corpora[0].prompt == {}


# --- I2I ------------------------------------------------------------------------------------------


def test_i2i_renders_captions_and_retrieves_image_to_image(tmp_path):
    root = karpathy_flickr(tmp_path / "f30k")
    render = tmp_path / "render"
    r = CaptionRenderer()
    caps = [c for n in TEST for c in captions(n, 5)]
    lookup = {str(r.path_for(render, c)): int(re.search(r"img(\d+)", c).group(1)) for c in caps}
    fake = FakeEmbedder(perm={0: 1, 1: 0}, lookup=lookup)
    res = get_benchmark("flickr30k_i2i")(root, render_dir=str(render)).evaluate(fake)
    assert res.metrics["t2i_R@1"] == pytest.approx(5 / 15) and res.metrics["i2t_R@1"] == pytest.approx(1 / 3)
    photos, rendered = fake.corpora
    assert photos.kind == rendered.kind == "image" and rendered.items == [str(r.path_for(render, c)) for c in caps]
    assert rendered.data_hash != photos.data_hash  # the render spec is part of the cache key
    info = res.info
    assert info["paper"] == {"t2i_R@1": 90.2} and "rendered" in info["prompts"]
    assert info["render"]["font"].endswith("DejaVuSans.ttf") and info["render"]["canvas"] == [800, 400]
    assert info["render"]["font_size"] == 40 and info["render"]["n_text_cut_off"] == 0
    with Image.open(rendered.items[0]) as im:
        assert im.size == (800, 400)
        px = np.asarray(im.convert("L"))
        assert px.min() == 0 and px.max() == 255 and (px == 255).mean() > 0.8  # black text on white
    again, _ = CaptionRenderer().render_all(caps[:2], tmp_path / "render2", progress=False)
    assert Path(again[0]).read_bytes() == Path(rendered.items[0]).read_bytes()  # deterministic PNGs


def test_renderer_wraps_long_captions_and_counts_cut_off_text():
    r = CaptionRenderer()
    lines = r.lines("word " * 40 + "x" * 80)
    assert all(r.font.getlength(s) <= 760 for s in lines) and len(lines) > 7
    assert r.layout("word " * 80)[1] is True and r.layout("a short caption")[1] is False


# --- KARR -----------------------------------------------------------------------------------------


def karr_jsonl(root: Path) -> Path:
    rows = []
    for n in range(4):
        save_image(root / "imgs" / f"img{n}.png", n)
        rows.append({"image": f"imgs/img{n}.png", "text": f"an animal with ({n}+7) lives, img{n}"})
    rows.append({"image": "imgs/img0.png", "text": rows[0]["text"]})  # a duplicate row
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_karr_jsonl_one_positive_each(tmp_path):
    root = karr_jsonl(tmp_path)
    with pytest.raises(DataError, match="1 duplicate rows"):
        get_benchmark("karr")(root).evaluate(FakeEmbedder())
    with pytest.warns(UserWarning):
        res = get_benchmark("karr")(root, partial=True).evaluate(FakeEmbedder(perm={0: 1, 1: 0}))
    assert res.metrics["t2i_R@1"] == res.metrics["i2t_R@1"] == 0.5
    assert res.info["n_images"] == res.info["n_texts"] == 4 and res.info["format"] == "jsonl"
    assert res.info["partial"] is True and res.info["captions_per_image"] == 1


def test_karr_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = [tmp_path / "src" / f"img{n}.png" for n in range(4)]
    for n, p in enumerate(src):
        save_image(p, n)
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in src], "text": [f"a colour between two others, img{n}" for n in range(4)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "karr"))
    out = tmp_path / "extracted"  # images are written there once, named by their bytes' hash
    lookup = {str(out / f"{hashlib.sha256(p.read_bytes()).hexdigest()[:24]}.png"): n for n, p in enumerate(src)}
    for p in src:
        p.unlink()  # the images now live only inside the dataset
    res = get_benchmark("karr")(tmp_path / "karr", images_dir=str(out)).evaluate(FakeEmbedder(lookup=lookup))
    check_perfect(res, 4, 4)
    assert res.info["format"] == "hf_disk" and res.info["split_used"] == "train"
    assert res.info["repeated_images"] == res.info["repeated_texts"] == 0


# --- the world ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from slq.mlops.config import DataConfig
    from slq.data import load_manifest
    from slq.miniature.world import generate_world

    root = generate_world(DataConfig(n_train=2, n_val=1, n_test=4, captions_per_image=2, image_size=32),
                          tmp_path_factory.mktemp("world") / "world")
    rows = [r for r in load_manifest(root) if r["split"] == "test"]
    order = list(dict.fromkeys(r["image_id"] for r in rows))
    lookup = {str(root / r["image"]): order.index(r["image_id"]) for r in rows}
    lookup |= {r["caption"]: order.index(r["image_id"]) for r in rows}
    return root, rows, lookup


def test_world_and_world_i2i(world, tmp_path):
    root, rows, lookup = world
    res = get_benchmark("world")(root).evaluate(FakeEmbedder(lookup=lookup))
    check_perfect(res, 4, 8)
    assert res.info["captions_per_image"] is None and res.info["files"][0] == str(root / "manifest.jsonl")
    r = CaptionRenderer()
    render = tmp_path / "render"
    lookup_i2i = {**lookup, **{str(r.path_for(render, row["caption"])): lookup[row["caption"]] for row in rows}}
    res = get_benchmark("world_i2i")(root, render_dir=str(render)).evaluate(FakeEmbedder(lookup=lookup_i2i))
    check_perfect(res, 4, 8)
    assert res.info["render"]["render_dir"] == str(render / r.spec_hash)


# --- the real encoder through the embedding cache -------------------------------------------------


def test_cached_embedder_second_evaluation_hits_the_cache(tmp_path):
    from slq.miniature.tiny import build_tiny_backbone
    from slq.benchmarks.cache import CachedEmbedder
    from slq.encoder import SLQEncoder

    enc = SLQEncoder.from_pretrained(build_tiny_backbone("qwen2_vl", tmp_path / "tiny"), num_queries=2)
    emb = CachedEmbedder(enc, tmp_path / "cache" / "embeddings", checkpoint_hash="tiny-random", batch_size=8)
    root = karpathy_coco(tmp_path / "coco")
    first = get_benchmark("coco")(root).evaluate(emb)
    assert (emb.misses, emb.hits) == (2, 0)
    second = get_benchmark("coco")(root).evaluate(emb)
    assert (emb.misses, emb.hits) == (2, 2) and second.metrics == first.metrics
    i2i = get_benchmark("coco_i2i")(root).evaluate(emb)
    assert (emb.misses, emb.hits) == (3, 3)  # the photos' embeddings are shared with `coco`
    assert Path(i2i.info["render"]["render_dir"]).parent == tmp_path / "cache" / "rendered_i2i"
    assert 0.0 <= i2i.metrics["mean_R"] <= 1.0

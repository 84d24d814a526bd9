"""The synthetic world: byte-identical per seed, well-formed manifest, disjoint splits."""

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import pytest

from slq.mlops.config import DataConfig
from slq.data import image_path, load_manifest
from slq.miniature.world import generate_world

SMALL = dict(n_train=20, n_val=5, n_test=5, captions_per_image=2, image_size=64)


def tree_hashes(root):
    """{relative path: sha256} for every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(DataConfig(seed=0, **SMALL), tmp_path_factory.mktemp("w") / "world")


def test_same_seed_is_byte_identical(world, tmp_path):
    again = generate_world(DataConfig(seed=0, **SMALL), tmp_path / "world")
    assert tree_hashes(again) == tree_hashes(world)
    assert len(tree_hashes(world)) == 30 + 3  # images + manifest + scenes + world.json


def test_other_seed_differs(world, tmp_path):
    other = tree_hashes(generate_world(DataConfig(seed=1, **SMALL), tmp_path / "world"))
    mine = tree_hashes(world)
    assert other["manifest.jsonl"] != mine["manifest.jsonl"]
    assert other["images/train/train-00000.png"] != mine["images/train/train-00000.png"]


def test_manifest_rows(world):
    rows = load_manifest(world)
    assert len(rows) == 30 * 2
    assert all(set(r) == {"id", "image_id", "image", "caption", "split"} for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")} == \
        {"train": 40, "val": 10, "test": 10}
    for r in rows:
        assert r["id"].startswith(r["image_id"] + "-c")
        assert r["image"] == f"images/{r['split']}/{r['image_id']}.png"
        assert image_path(world, r).is_file()
        assert r["caption"].strip()
    assert json.loads((world / "world.json").read_text())["seed"] == 0


def test_no_image_shared_across_splits(world):
    rows = load_manifest(world)
    hashes = tree_hashes(world)
    by_split = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).update({r["image_id"], r["image"], hashes[r["image"]]})
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]


def test_captions_identify_images(world):
    """Every caption names a single image: the same caption never describes two images."""
    images_of = {}
    for r in load_manifest(world):
        images_of.setdefault(r["caption"], set()).add(r["image_id"])
    assert all(len(ids) == 1 for ids in images_of.values())


def test_regenerate_replaces_without_leftovers(tmp_path):
    root = tmp_path / "world"
    generate_world(DataConfig(seed=0, **SMALL), root)
    (root / "stale.txt").write_text("old")
    generate_world(DataConfig(seed=0, **SMALL), root)
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no temp folders left


def test_load_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"id": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:2"):
        load_manifest(tmp_path)

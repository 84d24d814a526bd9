"""The world's knowledge-aware and composed tasks: construction and metrics, hand-checked."""

import hashlib
import random
import re
from pathlib import Path

import numpy as np
import pytest

from slq.benchmarks import get_benchmark
from slq.config import DataConfig
from slq.data.world import (
    COLOUR_FACTS,
    COLOURS,
    COUNT_WORDS,
    SHAPE_FACTS,
    SHAPES,
    generate_world,
    knowledge_caption,
    load_manifest,
    load_scenes,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(DataConfig(n_train=30, n_val=5, n_test=12, seed=3), tmp_path_factory.mktemp("w") / "world")


def test_knowledge_captions_state_only_facts(world):
    scenes = load_scenes(world)
    literal = set(SHAPES) | set(COLOURS)
    for image_id, scene in scenes.items():
        cap = knowledge_caption(scene, random.Random(image_id))
        words = set(re.findall(r"[a-z]+", cap))
        assert not words & literal, (cap, words & literal)  # never names a shape or a colour
        assert f"{COUNT_WORDS[len(scene)]} shape" not in cap  # nor states the count
        for _, colour, shape, _ in scene:  # ...but every object is recoverable from the facts
            assert SHAPE_FACTS[shape] in cap and COLOUR_FACTS[colour] in cap
        a, b = map(int, re.match(r"\((\d+)\+(\d+)\)", cap).groups())
        assert a + b == len(scene)


def test_facts_are_unambiguous():
    assert len(set(SHAPE_FACTS.values())) == len(SHAPE_FACTS)
    assert len(set(COLOUR_FACTS.values())) == len(COLOUR_FACTS)
    assert not any(a != b and a in b for a in SHAPE_FACTS.values() for b in SHAPE_FACTS.values())


def test_training_captions_never_state_a_fact(world):
    facts = list(SHAPE_FACTS.values()) + list(COLOUR_FACTS.values())
    for row in load_manifest(world):
        assert not any(f in row["caption"] for f in facts), row


class Unit:
    """A fake embedder: every image path gets its own random unit vector."""

    def __init__(self, dim=512):
        self.dim, self.seen = dim, []

    def vec(self, key):
        seed = int(hashlib.md5(str(key).encode()).hexdigest()[:8], 16)  # stable across processes
        v = np.random.default_rng(seed).standard_normal(self.dim)
        return v / np.linalg.norm(v)

    def embed(self, corpus):
        self.seen.append(corpus)
        if corpus.kind == "multimodal":
            # the target's vector, plus twice the reference's: the reference would win if it were not masked
            out = [self.vec(Path(ref).parent.parent.parent / "T" / Path(ref).stem) for ref, _ in corpus.items]
            refs = [self.vec(ref) for ref, _ in corpus.items]
            out = [t + 2 * r for t, r in zip(out, refs)]
        else:
            out = []
            for p in corpus.items:
                p = Path(p)
                if p.name.endswith("-target.png"):
                    ref_stem = p.name[: -len("-target.png")]
                    out.append(self.vec(self._root / "T" / ref_stem))
                else:
                    out.append(self.vec(p))
        out = np.stack(out).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_world_composed_masks_the_reference_and_finds_the_target(world, tmp_path):
    emb = Unit()
    emb._root = world  # images live at world/images/<split>/<id>.png: parent.parent.parent == world
    bench = get_benchmark("world_composed")(root=world, split="test", render_dir=tmp_path / "r")
    res = bench.evaluate(emb, ks=(1, 5))
    assert res.metrics["R@1"] == 1.0 and res.info["n_queries"] == 12 and res.info["n_gallery"] == 24
    mods = [text for _, text in emb.seen[0].items]
    assert all(re.fullmatch(r"make the (\w+) (\w+)", m) for m in mods)
    targets = sorted((tmp_path / "r").rglob("*-target.png"))
    assert len(targets) == 12
    ref = world / "images/test/test-00000.png"
    assert targets[0].read_bytes() != ref.read_bytes()


def test_world_knowledge_runs_as_image_text(world):
    class Same:
        def embed(self, corpus):
            return np.eye(len(corpus.items), 16, dtype=np.float32)  # caption i <-> image i

    res = get_benchmark("world_knowledge")(root=world, split="test").evaluate(Same(), ks=(1,))
    assert res.metrics["t2i_R@1"] == 1.0 and res.metrics["i2t_R@1"] == 1.0
    assert "(" in res.info["example"] and res.info["captions_per_image"] == 1

"""The world's knowledge-aware and composed tasks: construction and metrics, hand-checked."""

import hashlib
import random
import re
from pathlib import Path

import numpy as np
import pytest

from slq.benchmarks import get_benchmark
from slq.mlops.config import DataConfig
from slq.miniature.world import (
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


# --- world_everyday: the scene named through the LM's own knowledge -------------------

PROBE = Path(__file__).resolve().parents[1] / "bench" / "results" / "lm_knowledge_smollm2.json"


def _report(tmp_path, known: dict, unknown: dict | None = None) -> Path:
    """A probe report: `known` {(kind, answer): [cues]} marked known, `unknown` likewise not."""
    import json

    rows = [{"kind": k, "expected": a, "cue": c, "known": True} for (k, a), cs in known.items() for c in cs]
    rows += [{"kind": k, "expected": a, "cue": c, "known": False} for (k, a), cs in (unknown or {}).items() for c in cs]
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_world_everyday_names_each_scene_only_through_known_cues(world, tmp_path):
    from slq.miniature import knowledge

    known = {("colour", c): [f"thing number {i}"] for i, c in enumerate(sorted(COLOURS)) if c != "red"}
    known |= {("shape", "circle"): ["a wheel", "a ring"], ("shape", "square"): ["a chessboard tile"],
              ("shape", "cross"): ["a plus sign"], ("count", "two"): ["eyes on a face"]}
    unknown = {("colour", "red"): ["a ripe tomato"], ("shape", "star"): ["a sheriff's badge"],
               ("count", "one"): ["noses on a face"]}
    bench = get_benchmark("world_everyday")(root=world, split="test", cues=str(_report(tmp_path, known, unknown)))
    pairs = bench.load(tmp_path)
    scenes = load_scenes(world)
    by_path = {f"images/test/{i}.png": s for i, s in scenes.items()}
    askable = [i for i, s in scenes.items() if i.startswith("test-")
               and all(o[1] != "red" and o[2] in ("circle", "square", "cross") for o in s)]
    assert 0 < len(pairs.images) == len(askable) < 12 and pairs.info["n_split_images"] == 12
    literal = set(SHAPES) | set(COLOURS) | set(COUNT_WORDS.values())
    for img, cap in zip(pairs.images, pairs.captions):
        scene = by_path[str(Path(img).relative_to(world))]
        assert not set(re.findall(r"[a-z]+", cap)) & literal, cap  # no answer is named
        assert "tomato" not in cap and "badge" not in cap and "noses" not in cap  # no unknown cue is used
        assert cap.startswith("as many shapes as there are eyes on a face: ") == (len(scene) == 2)
        for size, colour, shape, pos in scene:  # every object is there, through one of its known cues
            assert any(f"a {size} thing shaped like {s}, the colour of {c}" in cap
                       for s in known[("shape", shape)] for c in known[("colour", colour)]), (cap, scene)
    assert pairs.captions == get_benchmark("world_everyday")(root=world, split="test", cues=str(
        _report(tmp_path, known, unknown))).load(tmp_path).captions  # seeded: the same split every time
    assert knowledge.everyday_caption([("small", "red", "circle", "left")], known, random.Random(0)) is None


def test_world_everyday_refuses_a_cue_a_training_caption_states(world, tmp_path):
    from slq.benchmarks.base import DataError, MissingData

    train_caption = next(r["caption"] for r in load_manifest(world) if r["split"] == "train")
    stated = " ".join(train_caption.split()[1:3])  # e.g. "small red" from "a small red circle ..."
    cues = _report(tmp_path, {("colour", c): ["snow"] for c in COLOURS} | {("shape", s): [stated] for s in SHAPES})
    with pytest.raises(DataError, match=re.escape(repr(stated)) + ".*training caption"):
        get_benchmark("world_everyday")(root=world, split="test", cues=str(cues)).load(tmp_path)
    with pytest.raises(MissingData, match="needs `cues`"):
        get_benchmark("world_everyday")(root=world, split="test").load(tmp_path)
    with pytest.raises(MissingData, match="probe report not found"):
        get_benchmark("world_everyday")(root=world, split="test", cues=str(tmp_path / "none.json")).load(tmp_path)


def test_the_committed_smollm2_probe_gives_a_split_free_of_answer_words(world, tmp_path):
    """With SmolLM2's measured knowledge: the split is built only from cues the probe marked known,
    none stated in the real-LM recipe's pretraining text or the world's training captions."""
    import json

    from slq.miniature import knowledge

    rows = json.loads(PROBE.read_text())["rows"]
    known = knowledge.load_known(PROBE)
    assert {c for cs in known.values() for c in cs} == {r["cue"] for r in rows if r["known"]}
    knowledge.check_unseen(known, knowledge.recipe_texts({"caption": 0.5, "qa_image": 0.5}))
    knowledge.check_unseen(known, [r["caption"] for r in load_manifest(world)])
    pairs = get_benchmark("world_everyday")(root=world, split="test", cues=str(PROBE)).load(tmp_path)
    used = {c for cap in pairs.captions for cs in known.values() for c in cs if c in cap}
    assert used and used <= {r["cue"] for r in rows if r["known"]}
    known_text = " | ".join(c for cs in known.values() for c in cs)
    for r in rows:  # an unknown cue never appears (unless it is part of a known one's words)
        if not r["known"] and r["cue"] not in known_text:
            assert not any(r["cue"] in cap for cap in pairs.captions), r["cue"]

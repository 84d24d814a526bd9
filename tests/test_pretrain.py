"""Generative pretraining of the built-in backbone (reduced size), and the knowledge split it serves."""

import os
import random
import re

import pytest

from slq.backbones import load_backbone
from slq.mlops.config import DataConfig, PretrainConfig
from slq.miniature.world import (
    COLOUR_FACTS,
    POSITIONS,
    SHAPE_FACTS,
    generate_world,
    knowledge_caption,
    load_manifest,
    load_scenes,
    render_scene,
)
from slq.io import file_sha256
from slq.miniature.pretrain import (
    Batcher,
    build_model,
    canonical_caption,
    corpus_text,
    describe_image,
    fact_sentences,
    is_vision_encoder,
    load_generative,
    make_example,
    pretrain,
    pretraining_scenes,
    scene_key,
)

SMALL = dict(hidden_size=32, num_layers=2, vision_dim=32, vision_depth=2, vocab_size=600, image_pixels=96,
             n_scenes=300, batch_size=16, lr=3e-3, warmup_steps=5, log_every=10_000)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(DataConfig(n_train=40, n_val=10, n_test=40, seed=5), tmp_path_factory.mktemp("w") / "world")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "tiny"
    res = pretrain(PretrainConfig(**SMALL, steps=120), out)
    return out, res


def test_pretraining_lowers_the_loss_and_saves_a_loadable_mllm(pretrained):
    out, res = pretrained
    first = sum(h["loss"] for h in res.history[:10]) / 10
    last = sum(h["loss"] for h in res.history[-10:]) / 10
    assert last < first * 0.5, (first, last)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    adapter = load_backbone(out)  # the same path a downloaded checkpoint takes
    assert adapter.model_type == "qwen3_vl" and adapter.hidden_size == 32
    # tests run with HF_HUB_OFFLINE=1, which transformers would record in tokenizer_config.json: the
    # folder (and its DVC hash) must not depend on the shell it was built in
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert not [f.name for f in out.iterdir() if f.is_file() and "local_files_only" in f.read_text(errors="ignore")]


def test_the_pretrained_model_captions_a_training_image(pretrained):
    out, _ = pretrained
    scene = pretraining_scenes(1, 0, set())[0]  # the first pretraining scene (seed 0)
    caption = describe_image(out, render_scene(scene, 64, random.Random(0)))
    words = caption.split()
    # a caption in the world's language: "a <size> <colour> <shape> <place> ..."
    assert words and words[0] == "a" and words[1] in ("small", "large"), caption
    assert any(p[1] in caption for p in POSITIONS.values()), caption


def test_conversations_train_on_every_answer_and_nothing_else(pretrained):
    out, _ = pretrained
    _, processor = load_generative(out)
    scene = [("small", "blue", "triangle", "left"), ("large", "red", "circle", "right")]
    batcher = Batcher(processor, [render_scene(scene, 64, random.Random(0))])
    chat = make_example("qa_image", scene, 0, random.Random(3))
    assert len(chat["turns"]) > 1
    fact = make_example("facts", scene, 0, random.Random(3))
    inputs = batcher([chat, make_example("caption", scene, 0, random.Random(0))])
    tok = processor.tokenizer
    learned = [tok.decode(ids[labels != -100]) for ids, labels in zip(inputs["input_ids"], inputs["labels"])]
    assert learned[0] == "".join(f"{a}<|im_end|>" for _, a in chat["turns"])  # answers only, never the questions
    assert learned[1] == canonical_caption(scene) + "<|im_end|>"
    text = batcher([fact])
    assert tok.decode(text["input_ids"][0][text["labels"][0] != -100]) == fact["text"] + "<|im_end|>"


def test_a_frozen_vision_encoder_stays_as_initialised(tmp_path):
    import torch
    from safetensors.torch import load_file

    cfg = PretrainConfig(**SMALL, steps=3, vision_lr_scale=0.0)
    init = build_model(cfg, corpus_text(pretraining_scenes(cfg.n_scenes, cfg.seed, set()), cfg.seed), tmp_path / "init")
    pretrain(cfg, tmp_path / "out")
    before, after = load_file(init / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    encoder = [k for k in before if is_vision_encoder(k)]
    projector = [k for k in before if ".visual." in f".{k}" and not is_vision_encoder(k)]
    assert encoder and projector
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in projector)  # the projector still learns


def test_pretraining_is_deterministic_from_its_seed(tmp_path):
    cfg = PretrainConfig(**{**SMALL, "n_scenes": 40}, steps=3)
    pretrain(cfg, tmp_path / "a")
    pretrain(cfg, tmp_path / "b")
    assert file_sha256(tmp_path / "a" / "model.safetensors") == file_sha256(tmp_path / "b" / "model.safetensors")


def test_pretraining_scenes_never_include_a_held_out_scene(world):
    held = {scene_key(s) for i, s in load_scenes(world).items() if not i.startswith("train-")}
    # ask for more scenes than would avoid them by chance
    scenes = pretraining_scenes(3000, 0, held)
    assert len(scenes) == 3000 and not {scene_key(s) for s in scenes} & held


def test_every_task_is_generative_and_facts_are_taught(world):
    rng = random.Random(0)
    scene = [("small", "blue", "triangle", "left"), ("large", "red", "circle", "right")]
    for kind in ("caption", "qa_image", "qa_text", "describe_text", "knowledge_text", "facts"):
        ex = make_example(kind, scene, 0, rng)
        turns = ex.get("turns") or ([(ex["prompt"], ex["answer"])] if "prompt" in ex else [])
        assert ("text" in ex) or (turns and all(q and a for q, a in turns))  # answers to generate, never a pair to match
    assert canonical_caption(scene) == "a small blue triangle on the left and a large red circle on the right"
    text = " ".join(fact_sentences())
    for fact in list(SHAPE_FACTS.values()) + list(COLOUR_FACTS.values()):
        assert fact in text  # the pretraining text states every fact the knowledge split relies on
    with pytest.raises(ValueError, match="unknown pretraining task"):
        make_example("contrastive", scene, 0, rng)


def _parse_knowledge(cap: str):
    """Recover the scene from a knowledge caption using nothing but the fact tables."""
    shape_of = {v: k for k, v in SHAPE_FACTS.items()}
    colour_of = {v: k for k, v in COLOUR_FACTS.items()}
    place_of = {v[1]: k for k, v in POSITIONS.items()}
    alt = lambda xs: "|".join(re.escape(x) for x in sorted(xs, key=len, reverse=True))  # noqa: E731
    pat = rf"a (small|large) ({alt(shape_of)}) in ({alt(colour_of)}) ({alt(place_of)})"
    objs = {(s, colour_of[c], shape_of[f], place_of[p]) for s, f, c, p in re.findall(pat, cap)}
    a, b = map(int, re.match(r"\((\d+)\+(\d+)\)", cap).groups())
    return objs, a + b


def test_every_knowledge_query_is_answerable_from_the_facts_alone(world):
    scenes = {i: s for i, s in load_scenes(world).items() if i.startswith("test-")}
    by_key = {}
    for i, s in scenes.items():
        by_key.setdefault(frozenset(s), []).append(i)
    for image_id, scene in scenes.items():
        objs, count = _parse_knowledge(knowledge_caption(scene, random.Random(image_id)))
        assert objs == set(scene) and count == len(scene)
        assert by_key[frozenset(objs)] == [image_id]  # ... and it picks out exactly one test image


def test_no_slq_training_caption_states_a_fact(world):
    facts = list(SHAPE_FACTS.values()) + list(COLOUR_FACTS.values())
    train = [r for r in load_manifest(world) if r["split"] == "train"]
    assert train and not [r["caption"] for r in train if any(f in r["caption"] for f in facts)]

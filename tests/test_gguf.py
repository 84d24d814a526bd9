"""The GGUF path (slq.miniature.smollm2) on a small GGUF file made here: fetch from a wheel (sha256
pinned, atomic), load, wrap as LLaVA, load back through slq, encode. No network."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from slq.miniature.smollm2 import (
    GGUFError,
    build_llava_on_lm,
    fetch_gguf_from_wheel,
    load_gguf_lm,
    probe_completions,
)

PKG, VERSION = "slq-tiny-gguf-lm", "0.0.1"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPTS = ["a red circle on the left", "the sky is blue"]


# ---- a small GGUF, written as llama.cpp lays out a Llama ------------------------------------------
def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout of q / k rows (transformers undoes it when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, tokenizer, path: Path) -> Path:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # no output.weight: tied
        base, suffix = hf_name.rsplit(".", 1)
        arr = t.detach().float().numpy()
        if base.endswith("q_proj"):
            arr = _permute_for_gguf(arr, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            arr = _permute_for_gguf(arr, cfg.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _make_wheel(folder: Path, members: dict[str, bytes], name: str = PKG, version: str = VERSION) -> Path:
    """A minimal pure-Python wheel holding `members` (path in the wheel -> bytes)."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = dict(members)
    files[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist}.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: slq-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{p},,\n" for p in files) + f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, data in files.items():
            zf.writestr(p, data)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source LlamaForCausalLM, its tokenizer, GGUF path, wheel path) of a small random Llama."""
    import transformers as tf

    from slq.miniature.tokenizer import build_bpe_tokenizer, wrap_fast

    tok = wrap_fast(build_bpe_tokenizer(SPECIALS, PROMPTS, vocab_size=320), eos_token="<|im_end|>",
                    pad_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = tf.LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("gguf")
    gguf_path = _write_gguf(model, tok, root / "tiny.gguf")
    wheel = _make_wheel(root / "wheels", {"tiny_lm/__init__.py": b"", "tiny_lm/tiny.Q.gguf": gguf_path.read_bytes()})
    return model, tok, gguf_path, wheel


@pytest.fixture(scope="module")
def llava_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "backbone"
    return build_llava_on_lm(tiny[2], out, vision_hidden=32, vision_layers=2, vision_heads=2,
                             image_size=64, patch_size=16, seed=0)


# ---- fetch --------------------------------------------------------------------------------------
def test_fetch_from_local_wheel_and_find_links(tiny, tmp_path):
    _, _, gguf_path, wheel = tiny
    a = fetch_gguf_from_wheel(PKG, VERSION, _sha(wheel), tmp_path / "a" / "lm.gguf", source=wheel)
    b = fetch_gguf_from_wheel(PKG, VERSION, _sha(wheel), tmp_path / "b" / "lm.gguf", source=wheel.parent)
    assert a.read_bytes() == b.read_bytes() == gguf_path.read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["lm.gguf"]  # no temporary left behind


def test_fetch_wrong_sha256_leaves_out_path_untouched(tiny, tmp_path):
    wheel = tiny[3]
    out = tmp_path / "lm.gguf"
    out.write_bytes(b"old")
    for source in (wheel, wheel.parent):
        with pytest.raises(GGUFError) as e:
            fetch_gguf_from_wheel(PKG, VERSION, "0" * 64, out, source=source)
        msg = str(e.value)
        assert wheel.name in msg and "0" * 64 in msg and _sha(wheel) in msg and "\n" not in msg
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.gguf"]


@pytest.mark.parametrize("members, found", [
    ({"x/__init__.py": b""}, "0 .gguf"),
    ({"x/a.gguf": b"1", "x/b.gguf": b"2"}, "2 .gguf"),
])
def test_fetch_needs_exactly_one_gguf(tmp_path, members, found):
    wheel = _make_wheel(tmp_path / "w", members)
    with pytest.raises(GGUFError, match=found):
        fetch_gguf_from_wheel(PKG, VERSION, _sha(wheel), tmp_path / "lm.gguf", source=wheel)
    assert not (tmp_path / "lm.gguf").exists()


def test_fetch_shows_pip_failure(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GGUFError) as e:
        fetch_gguf_from_wheel(PKG, VERSION, "0" * 64, tmp_path / "lm.gguf", source=empty)
    assert f"{PKG}=={VERSION}" in str(e.value) and "pip said" in str(e.value)
    assert "distribution" in str(e.value).lower()  # pip's own words: no matching distribution
    assert not (tmp_path / "lm.gguf").exists()


# ---- load ---------------------------------------------------------------------------------------
def test_fetch_smollm2_checks_the_extracted_file_every_time(tiny, tmp_path, monkeypatch):
    """The pinned fetch: the GGUF is fetched when missing; a file already there is used only when
    its own sha256 is the pinned one (a stale or corrupt file is refused and left as it was);
    `force` fetches it again."""
    from slq.miniature import smollm2 as g

    _, _, gguf_path, wheel = tiny
    monkeypatch.setattr(g, "SMOLLM2_WHEEL_SHA256", _sha(wheel))
    monkeypatch.setattr(g, "SMOLLM2_GGUF_SHA256", _sha(gguf_path))
    out = tmp_path / "m" / "lm.gguf"
    assert g.fetch_smollm2(out, source=wheel) == out and out.read_bytes() == gguf_path.read_bytes()
    out.write_bytes(b"GGUF stale")
    with pytest.raises(GGUFError, match=r"lm\.gguf: sha256 .* not the pinned GGUF"):
        g.fetch_smollm2(out, source=wheel)
    assert out.read_bytes() == b"GGUF stale"
    g.fetch_smollm2(out, source=wheel, force=True)
    assert out.read_bytes() == gguf_path.read_bytes()


def test_cli_gguf_stage_fetches_and_refuses_a_stale_file(tiny, tmp_path, monkeypatch):
    """`slq backbone gguf` (the real-LM pipeline's first stage): the file and its pinned hash, or
    one error line naming the file for a stale one, and `--force` mends it."""
    import json

    from typer.testing import CliRunner

    import cli
    from slq.miniature import smollm2 as g

    _, _, gguf_path, wheel = tiny
    monkeypatch.setattr(g, "SMOLLM2_WHEEL_SHA256", _sha(wheel))
    monkeypatch.setattr(g, "SMOLLM2_GGUF_SHA256", _sha(gguf_path))
    out, runner = tmp_path / "models" / "lm.gguf", CliRunner()
    args = ["backbone", "gguf", "--wheel", str(wheel), "--out", str(out)]
    res = runner.invoke(cli.app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sha256"] == _sha(out) == _sha(gguf_path)
    out.write_bytes(b"GGUF stale")
    bad = runner.invoke(cli.app, args)
    assert bad.exit_code == 1 and "lm.gguf" in bad.output and "--force" in bad.output
    assert runner.invoke(cli.app, [*args, "--force"]).exit_code == 0 and _sha(out) == _sha(gguf_path)


def test_load_gguf_lm_matches_the_source_model(tiny):
    model, tok, gguf_path, _ = tiny
    lm, lm_tok = load_gguf_lm(gguf_path)
    assert type(lm).__name__ == "LlamaForCausalLM"
    for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert lm_tok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_load_gguf_lm_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="fetch it first"):
        load_gguf_lm(tmp_path / "nope.gguf")


# ---- wrap as LLaVA ------------------------------------------------------------------------------
def test_llava_keeps_the_lm(tiny, llava_dir):
    import transformers as tf

    lm, tok = load_gguf_lm(tiny[2])
    wrapped = tf.AutoModelForImageTextToText.from_pretrained(str(llava_dir)).eval()
    assert type(wrapped).__name__ == "LlavaForConditionalGeneration"
    V = lm.config.vocab_size
    assert wrapped.config.image_token_id == V == wrapped.config.text_config.vocab_size - 1  # one row added
    emb = wrapped.get_input_embeddings().weight
    torch.testing.assert_close(emb[V], lm.get_input_embeddings().weight.mean(0))
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits[..., :V]
        torch.testing.assert_close(got, lm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert probe_completions(llava_dir, PROMPTS, max_new_tokens=4) == \
        probe_completions(lm, PROMPTS, tokenizer=tok, max_new_tokens=4)
    assert probe_completions(llava_dir, PROMPTS[:1], max_new_tokens=3, chat=True) == \
        probe_completions(lm, PROMPTS[:1], tokenizer=tok, max_new_tokens=3, chat=True)


def test_llava_loads_and_encodes_through_slq(llava_dir):
    from PIL import Image

    from slq.backbones import load_backbone
    from slq.backbones.base import Prompts
    from slq.encoder import SLQEncoder

    adapter = load_backbone(llava_dir)
    assert adapter.model_type == "llava" and adapter.hidden_size == 32
    images = [Image.new("RGB", (80, 60), c) for c in ("red", "blue")]
    inputs = adapter.build_inputs(None, images, Prompts())
    image_id = adapter.model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == [16, 16]  # (64 / 16)^2 visual tokens
    rendered = adapter.inputs.render("hi", True, Prompts())
    assert rendered == "<|im_start|>user\n<image>hi<|im_end|>\n<|im_start|>assistant\n"

    enc = SLQEncoder.from_pretrained(llava_dir, num_queries=4)
    t = enc.encode_text(PROMPTS)
    v = enc.encode_image(images)
    assert t.shape == v.shape == (2, 32)
    assert np.isfinite(t).all() and np.isfinite(v).all()
    assert not np.allclose(v[0], v[1])  # the images reach the embedding


def test_build_is_seeded(tiny, llava_dir, tmp_path):
    from safetensors.torch import load_file

    again = build_llava_on_lm(tiny[2], tmp_path / "again", vision_hidden=32, vision_layers=2, vision_heads=2,
                              image_size=64, patch_size=16, seed=0)
    a, b = load_file(llava_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


# ---- the CLI ------------------------------------------------------------------------------------
def test_cli_builds_the_backbone_from_a_local_wheel(tiny, tmp_path, monkeypatch):
    """`slq backbone smollm2 --wheel W` with the pins pointed at the small wheel: the GGUF beside
    the folder, a LLaVA folder that loads, the probe's rows; a wheel of another hash is refused
    in one line and writes nothing."""
    import json

    from typer.testing import CliRunner

    import cli
    from slq.miniature import smollm2 as g
    from slq.miniature.cli import FACT_PROBES

    _, _, gguf_path, wheel = tiny
    runner = CliRunner()
    bad = runner.invoke(cli.app, ["backbone", "smollm2", "--wheel", str(wheel), "--out", str(tmp_path / "x" / "bb")])
    assert bad.exit_code == 1 and "sha256" in bad.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    monkeypatch.setattr(g, "SMOLLM2_WHEEL_SHA256", _sha(wheel))
    monkeypatch.setattr(g, "SMOLLM2_GGUF_SHA256", _sha(gguf_path))
    out = tmp_path / "models" / "bb"
    res = runner.invoke(cli.app, ["backbone", "smollm2", "--wheel", str(wheel), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert Path(got["gguf"]).read_bytes() == gguf_path.read_bytes()
    assert Path(got["gguf"]).parent == out.parent
    assert [r["prompt"] for r in got["probe"]] == list(FACT_PROBES)
    assert all(r["lm"] == r["llava"] for r in got["probe"])  # the wrapper keeps the LM's greedy answers
    from slq.backbones import load_backbone

    assert load_backbone(out).model_type == "llava"


def test_llava_folder_is_plain_weights_and_saves_again(llava_dir, tmp_path):
    """The GGUF is dequantised: the folder records no quantization, and a model loaded from it can
    be trained and saved again (pretraining does both)."""
    import json

    import transformers as tf

    cfg = json.loads((llava_dir / "config.json").read_text())
    assert "quantization_config" not in json.dumps(cfg)
    model = tf.AutoModelForImageTextToText.from_pretrained(str(llava_dir))
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").is_file()
    # HF_HUB_OFFLINE (set in tests) is the shell's, not the model's: no file of the folder records it
    assert not [f.name for f in llava_dir.iterdir() if f.is_file() and "local_files_only" in f.read_text(errors="ignore")]


# ---- pretraining around the real LM (LLaVA's first stage) ---------------------------------------
def test_pretraining_around_the_lm_keeps_it_frozen(tiny, tmp_path, monkeypatch):
    """`pretrain.lm: smollm2` (here: the small wheel under the pinned name): the LLaVA is built
    from the wheel, the projector learns, the language model and the (frozen) vision encoder do not
    change, and the result loads like any backbone. The answer-only head gives the model's own loss."""
    import torch
    import transformers as tf

    from slq.miniature import smollm2 as g
    from slq.backbones import load_backbone
    from slq.mlops.config import PretrainConfig
    from slq.miniature.pretrain import (
        Batcher,
        answer_loss,
        is_language_model,
        is_vision_encoder,
        make_example,
        pretrain,
    )

    _, _, gguf_path, wheel = tiny
    monkeypatch.setattr(g, "SMOLLM2_WHEEL_SHA256", _sha(wheel))
    monkeypatch.setattr(g, "SMOLLM2_GGUF_SHA256", _sha(gguf_path))
    cfg = PretrainConfig(lm="smollm2", lm_source=str(wheel), gguf="lm/small.gguf", vision_dim=32, vision_depth=2,
                         image_pixels=64, n_scenes=60, steps=4, batch_size=6, lr=1e-2, warmup_steps=0,
                         mix={"caption": 0.5, "qa_image": 0.5}, log_every=10_000)
    out = tmp_path / "bb"
    pretrain(cfg, out, root=tmp_path)
    assert (tmp_path / "lm" / "small.gguf").is_file()
    assert not (tmp_path / ".bb.init").exists()  # the starting folder is removed
    start = tmp_path / "start"
    g.build_llava_on_lm(tmp_path / "lm" / "small.gguf", start, vision_hidden=32, vision_layers=2, image_size=64,
                        seed=cfg.seed)
    a = tf.AutoModelForImageTextToText.from_pretrained(str(start)).state_dict()
    b = tf.AutoModelForImageTextToText.from_pretrained(str(out)).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all("multi_modal_projector" in k for k in changed), sorted(changed)[:5]
    assert any(is_language_model(k) for k in a) and any(is_vision_encoder(k) for k in a)
    assert load_backbone(out).model_type == "llava"

    import random

    from slq.miniature.world import render_scene
    from slq.miniature.pretrain import load_generative, pretraining_scenes

    model, proc = load_generative(out)
    scenes = pretraining_scenes(4, 0, set())
    batcher = Batcher(proc, [render_scene(s, 64, random.Random(i)) for i, s in enumerate(scenes)])
    inputs = batcher([make_example("qa_image", s, i, random.Random(i)) for i, s in enumerate(scenes)])
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, dict(inputs)), model(**inputs).loss, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_pretraining_trains_the_vision_side_and_keeps_the_lm_exact(tiny, tmp_path, monkeypatch):
    """The real-LM recipe's speed settings (bf16 autocast, eager attention, the tower trained too):
    the saved LM is bit-for-bit the one loaded (the weights stay fp32; only the arithmetic is bf16),
    the vision tower and projector change, the loss is finite and falls from its start."""
    import torch
    import transformers as tf

    from slq.miniature import smollm2 as g
    from slq.mlops.config import PretrainConfig
    from slq.miniature.pretrain import is_language_model, pretrain

    _, _, gguf_path, wheel = tiny
    monkeypatch.setattr(g, "SMOLLM2_WHEEL_SHA256", _sha(wheel))
    monkeypatch.setattr(g, "SMOLLM2_GGUF_SHA256", _sha(gguf_path))
    cfg = PretrainConfig(lm="smollm2", lm_source=str(wheel), gguf="lm/small.gguf", vision_dim=32, vision_depth=2,
                         image_pixels=48, n_scenes=60, steps=6, batch_size=8, lr=1e-2, warmup_steps=0,
                         vision_lr_scale=1.0, mix={"caption": 0.5, "qa_image": 0.5}, log_every=10_000,
                         autocast="bfloat16", attn_implementation="eager")
    res = pretrain(cfg, tmp_path / "bb", root=tmp_path)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    start = tmp_path / "start"
    g.build_llava_on_lm(tmp_path / "lm" / "small.gguf", start, vision_hidden=32, vision_layers=2, image_size=48,
                        seed=cfg.seed)
    a = tf.AutoModelForImageTextToText.from_pretrained(str(start)).state_dict()
    b = tf.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "bb")).state_dict()
    assert all(b[k].dtype == torch.float32 for k in b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert not any(is_language_model(k) for k in changed)
    assert any("vision_tower" in k for k in changed) and any("multi_modal_projector" in k for k in changed)


def test_a_bad_autocast_setting_fails_before_any_work(tmp_path):
    from slq.mlops.config import PretrainConfig
    from slq.miniature.pretrain import pretrain

    with pytest.raises(ValueError, match="pretrain.autocast 'float16'.*bfloat16"):
        pretrain(PretrainConfig(autocast="float16"), tmp_path / "bb", root=tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_stage_probes_the_lm_and_refuses_a_recipe_that_states_a_known_cue(llava_dir, tmp_path, monkeypatch):
    """The pretrain stage's knowledge report (pretrain.knowledge): the probe's rows and known cues,
    checked against the recipe's pretraining text and the world's training captions. A recipe whose
    text states a known cue (the default world's fact sentences say "white is the colour of snow")
    is refused, naming the cue, and no report is written."""
    import json

    from slq.miniature import knowledge
    from slq.mlops.config import load_config
    from slq.miniature.world import generate_world
    from slq.miniature.build import probe_knowledge

    cfg = load_config(None, {"data.root": str(tmp_path / "world"), "pretrain.knowledge": "rep/k.json",
                             "pretrain.lm": "smollm2", "pretrain.mix": {"caption": 0.5, "qa_image": 0.5}})
    cfg.root = str(tmp_path)
    generate_world(cfg.data.__class__(n_train=20, n_val=2, n_test=4), tmp_path / "world")
    seen = []

    def fake_probe(model, tok, cues=None, calibrate=True):
        seen.append(type(model).__name__)
        return [{"kind": k, "cue": c, "expected": a, "known": c in ("snow", "a wheel"), "best": a, "margin": 1.0}
                for k, a, c in knowledge.all_cues()]

    monkeypatch.setattr(knowledge, "probe", fake_probe)
    summary = probe_knowledge(cfg, llava_dir)
    assert seen == ["LlavaForConditionalGeneration"]  # the backbone's own LM
    report = json.loads((tmp_path / "rep" / "k.json").read_text())
    assert report["known"] == {"colour:white": ["snow"], "shape:circle": ["a wheel"]}
    assert summary["cues_known"] == 2 and summary["checked_texts"]["train_captions"] == 40
    assert knowledge.load_known(tmp_path / "rep" / "k.json") == {("colour", "white"): ["snow"],
                                                                  ("shape", "circle"): ["a wheel"]}
    (tmp_path / "rep" / "k.json").unlink()
    cfg.pretrain.mix = {"caption": 0.5, "facts": 0.5}
    with pytest.raises(ValueError, match="cue 'snow' is stated in training text"):
        probe_knowledge(cfg, llava_dir)
    assert not (tmp_path / "rep" / "k.json").exists()

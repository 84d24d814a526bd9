"""The road a real user takes: the reference recipe by default, a pinned backbone, bounded images,
a GPU-safe whole-sequence path, fp32 trained weights, and an input pipeline that changes nothing."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from slq.backbones.base import HookNotFired, Prompts, right_padded_with_slots
from slq.checkpoint import CheckpointError
from slq.encoder import SLQEncoder
from slq.train import FitConfig, fit

TEXTS = ["a red circle on the left", "hi", "a much longer caption about a small blue square at the top right"]
IMAGES = [Image.new("RGB", (60, 90), "red"), Image.new("RGB", (120, 60), "blue"), Image.new("RGB", (56, 56), "green")]


def _enc(path, **kw):
    """SLQ's encoder, or with `method` that method's (its class picked by the registry)."""
    from slq.methods import from_pretrained

    kw.setdefault("num_queries", 4)
    kw.setdefault("seed", 1)
    load = from_pretrained if "method" in kw else SLQEncoder.from_pretrained
    return load(path, device="cpu", dtype=kw.pop("dtype", "float32"), **kw)


@pytest.fixture(scope="module")
def qwen3(tiny_dirs):
    return _enc(tiny_dirs["qwen3_vl"])


# ---- prompts -------------------------------------------------------------------------------------
def test_default_prompts_are_the_reference_recipe(qwen3):
    p = Prompts()
    assert (p.text, p.image, p.multimodal, p.add_generation_prompt, p.system) == ("{text}", "", "{text}", True, None)
    b = qwen3.backbone.inputs
    assert b.render("a dog", False, p) == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n"
    img = b.render("", True, p)
    assert img == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    # the queries follow the opened assistant turn: the last real token of every input is its "\n"
    inputs = qwen3.prepare(texts=["a dog"])
    assert qwen3.backbone.tokenizer.decode(inputs["input_ids"][0]).endswith("a dog<|im_end|>\n<|im_start|>assistant\n")


def test_system_prompt_is_explicit(qwen3):
    b = qwen3.backbone.inputs
    with_sys = b.render("a dog", False, Prompts(system="Embed this."))
    assert with_sys.startswith("<|im_start|>system\nEmbed this.<|im_end|>\n<|im_start|>user\na dog")


def test_checkpoint_records_and_reuses_prompts_and_template(qwen3, tmp_path):
    custom = Prompts(text="{text} (caption)", system="S")
    with qwen3.using_prompts(custom):
        ckpt = qwen3.save(tmp_path / "ck")
    man = json.loads((ckpt / "slq.json").read_text())
    assert man["prompts"]["system"] == "S" and man["prompts"]["text"] == "{text} (caption)"
    assert man["template"]["text"].startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<caption> (caption)")
    assert len(man["template"]["chat_template_sha256"]) == 64
    again = SLQEncoder.from_pretrained(queries=ckpt, device="cpu", dtype="float32")
    assert again.prompts == custom  # used by default when loaded


def test_training_truncates_long_captions_but_keeps_the_template(qwen3):
    long = " ".join(["word"] * 400)
    inputs = qwen3.prepare(texts=[long, "short"], max_text_tokens=40)
    n = inputs["attention_mask"].sum(-1)
    assert int(n[0]) <= 40 and int(n[0]) >= 35
    row = qwen3.backbone.tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    assert row.startswith("<|im_start|>user\nword word") and row.endswith("word<|im_end|>\n<|im_start|>assistant\n")
    untouched = qwen3.prepare(texts=["short"])
    assert torch.equal(untouched["input_ids"][0], inputs["input_ids"][1][-untouched["input_ids"].shape[1]:])


# ---- pixel budget --------------------------------------------------------------------------------
def test_pixel_budget_bounds_visual_tokens(tiny_dirs, tmp_path):
    big = [Image.new("RGB", (640, 480), "white")]
    free = _enc(tiny_dirs["qwen3_vl"])
    capped = _enc(tiny_dirs["qwen3_vl"], max_pixels=64 * 64, min_pixels=32 * 32)
    n_free = int(free.prepare(images=big)["image_grid_thw"].prod())
    n_capped = int(capped.prepare(images=big)["image_grid_thw"].prod())
    assert n_capped < n_free and n_capped * 16 * 16 <= 64 * 64
    assert capped.backbone.pixel_budget == {"min_pixels": 32 * 32, "max_pixels": 64 * 64}
    # a checkpoint trained with a cap is loaded with it
    ck = capped.save(tmp_path / "capped")
    again = SLQEncoder.from_pretrained(queries=ck, device="cpu", dtype="float32")
    assert again.backbone.pixel_budget == {"min_pixels": 32 * 32, "max_pixels": 64 * 64}
    with pytest.raises(Exception, match="min_pixels .* above max_pixels"):
        _enc(tiny_dirs["qwen3_vl"], min_pixels=10_000, max_pixels=100)
    with pytest.raises(Exception, match="fixed size"):
        _enc(tiny_dirs["llava"], max_pixels=100_000)


# ---- the backbone a checkpoint belongs to -----------------------------------------------------------
def test_checkpoint_pins_its_backbone_by_content(tiny_dirs, tmp_path):
    from slq.miniature.tiny import build_tiny_backbone

    enc = _enc(tiny_dirs["qwen2_vl"])
    ck = enc.save(tmp_path / "ck")
    fp = json.loads((ck / "slq.json").read_text())["backbone"]["fingerprint"]
    assert fp == enc.backbone.fingerprint and len(fp) == 16
    # a "fine-tune": same architecture, same shapes, other weights
    other = build_tiny_backbone("qwen2_vl", tmp_path / "finetune", seed=5)
    with pytest.raises(CheckpointError, match=f"fingerprint {fp}.*other weights"):
        SLQEncoder.from_pretrained(other, queries=ck)
    forced = SLQEncoder.from_pretrained(other, queries=ck, allow_backbone_mismatch=True)
    torch.testing.assert_close(forced.queries.weight, enc.queries.weight)
    # a copy of the same weights elsewhere is the same backbone
    import shutil

    copy = shutil.copytree(tiny_dirs["qwen2_vl"], tmp_path / "copy")
    assert SLQEncoder.from_pretrained(copy, queries=ck).backbone.fingerprint == fp


def test_fingerprint_ignores_resharding_but_not_weights(tiny_dirs, tmp_path):
    import transformers as tf

    from slq.backbones.fingerprint import backbone_fingerprint

    src = tiny_dirs["qwen2_vl"]
    model = tf.AutoModelForImageTextToText.from_pretrained(str(src))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert backbone_fingerprint(tmp_path / "sharded", memo=False) == backbone_fingerprint(src, memo=False)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(tmp_path / "changed")
    assert backbone_fingerprint(tmp_path / "changed", memo=False) != backbone_fingerprint(src, memo=False)


def test_loading_is_strict(qwen3, tiny_dirs, tmp_path):
    ck = qwen3.save(tmp_path / "ck")
    wider = _enc(tiny_dirs["qwen3_vl"], num_queries=6)
    with pytest.raises(CheckpointError, match=r"queries of shape \(4, .*\(6, "):
        wider.load_trained(ck)
    from safetensors.torch import save_file

    save_file({"model.layers.0.nonsense": torch.zeros(2)}, str(ck / "llm.safetensors"))
    with pytest.raises(ValueError, match="trains none"):
        SLQEncoder.from_pretrained(queries=ck)


# ---- hooks that must fire ------------------------------------------------------------------------
def test_a_hook_that_did_not_fire_is_an_error(tiny_dirs):
    enc = _enc(tiny_dirs["qwen3_vl"])
    inputs = enc.prepare(texts=TEXTS)
    enc.backbone.input_embeddings._forward_hooks.clear()  # as a wrapper that swaps the module would
    with pytest.raises(HookNotFired, match="queries were not injected"):
        enc.embed_inputs(inputs, split=False)
    enc = _enc(tiny_dirs["qwen3_vl"])

    class Wrapped(torch.nn.Module):  # a decoder behind a wrapper: its own pre-hook never runs
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    real = enc.backbone.base.language_model
    enc.backbone.__class__ = type("Shifted", (type(enc.backbone),), {"decoder": property(lambda s: Wrapped(real))})
    with pytest.raises(HookNotFired, match="pre-hook"):
        enc.embed_inputs(inputs, split=True)


# ---- the whole-sequence path has no fully masked attention row -------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava"])
@pytest.mark.parametrize("method", ["slq", "full"])
def test_whole_sequence_training_sees_no_fully_masked_row(tiny_dirs, monkeypatch, family, method):
    """A fully masked softmax row (left padding) has a NaN backward in bf16 GPU SDPA kernels; the
    whole-sequence path must never give one to attention, yet stay exact (padding invariance)."""
    enc = _enc(tiny_dirs[family], method=method) if method != "slq" else _enc(tiny_dirs[family])
    enc.make_trainable()
    seen = []
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None and attn_mask.shape[-2] > 1:
            keep = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
            seen.append(int((~keep.any(-1)).sum()))
        return orig(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for inputs in (enc.prepare(texts=TEXTS), enc.prepare(texts=["x", "make it a big blue star", "y"], images=IMAGES)):
        assert (inputs["attention_mask"] == 0).any()  # the batch is padded
        emb = enc.embed_inputs(inputs, split=False)
        emb.sum().backward()
    assert seen and max(seen) == 0, f"fully masked rows per attention call: {seen}"
    monkeypatch.undo()
    # exact: each item alone (no padding at all) gives the same embedding
    batch = enc.embed_inputs(enc.prepare(texts=TEXTS), split=False).detach()
    for i, t in enumerate(TEXTS):
        alone = enc.embed_inputs(enc.prepare(texts=[t]), split=False).detach()
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-4, atol=1e-5)


def test_right_padded_layout():
    inputs = {"input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
              "position_ids": torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]])}
    out, slots = right_padded_with_slots(inputs, 2, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 0, 0, 0, 0], [7, 8, 9, 1, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert slots.tolist() == [[False, False, True, True, False, False], [False] * 4 + [True, True]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3], [0, 1, 2, 3, 4, 5]]


# ---- dtype, fp32 trained weights, temperature ------------------------------------------------------
def test_backbone_dtype_is_honoured_and_lora_stays_fp32(tiny_dirs, color_pairs):
    enc = _enc(tiny_dirs["qwen2_vl"], method="lora", dtype="bfloat16")
    assert enc.backbone.dtype == torch.bfloat16
    enc.make_trainable()
    lora = enc.trainable_parameters()
    assert lora and all(p.dtype == torch.float32 for p in lora)
    emb = enc.embed_inputs(enc.prepare(texts=TEXTS))
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_full_finetuning_keeps_fp32_master_weights(tiny_dirs, color_pairs):
    enc = _enc(tiny_dirs["qwen2_vl"], method="full", dtype="bfloat16")
    w = enc.backbone.decoder.layers[0].mlp.down_proj.weight
    before = w.detach().clone()
    cfg = FitConfig(steps=3, batch_size=4, lr=1e-4, warmup_steps=1, save_every=1000, weight_decay=0.1)
    res = fit(enc, color_pairs[:16], cfg, progress=False)
    assert w.dtype == torch.bfloat16 and not torch.equal(w, before)
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in res.history)


def test_temperature_has_no_weight_decay(tiny_dirs, color_pairs):
    enc = _enc(tiny_dirs["qwen2_vl"])
    seen = {}
    orig = torch.optim.AdamW.__init__

    def spy(self, params, **kw):
        seen["groups"] = [dict(g) for g in params]
        orig(self, params, **kw)

    torch.optim.AdamW.__init__ = spy
    try:
        fit(enc, color_pairs[:8], FitConfig(steps=1, batch_size=4, weight_decay=0.3, warmup_steps=1), progress=False)
    finally:
        torch.optim.AdamW.__init__ = orig
    wd = {tuple(p.shape): g["weight_decay"] for g in seen["groups"] for p in g["params"]}
    assert wd[()] == 0.0 and wd[tuple(enc.queries.weight.shape)] == 0.3


# ---- the input pipeline --------------------------------------------------------------------------
@pytest.mark.slow
def test_dataloader_workers_change_nothing(tiny_dirs, color_pairs, tmp_path):
    paths = []
    for i, (im, cap) in enumerate(color_pairs[:12]):
        p = tmp_path / f"{i}.png"
        im.save(p)
        paths.append({"image": str(p), "caption": cap, "id": i})
    runs = []
    for workers in (0, 2):
        enc = _enc(tiny_dirs["qwen2_vl"])
        cfg = FitConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, save_every=1000, num_workers=workers)
        res = fit(enc, paths, cfg, progress=False)
        img = enc.encode_image([r["image"] for r in paths], batch_size=5, num_workers=workers)
        txt = enc.encode_text([r["caption"] for r in paths], batch_size=5, num_workers=workers)
        runs.append((enc.queries.weight.detach().clone(), [h["loss"] for h in res.history], img, txt))
    (q0, l0, i0, t0), (q1, l1, i1, t1) = runs
    torch.testing.assert_close(q1, q0, rtol=0, atol=0)
    assert l0 == l1
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(t0, t1)


def test_a_bad_item_in_a_worker_is_named(tiny_dirs, tmp_path):
    enc = _enc(tiny_dirs["qwen2_vl"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match=r"image #1 .*broken.jpg.*cannot be decoded"):
        enc.encode_image([IMAGES[0], str(bad)], num_workers=1)


def test_a_text_only_template_is_refused(tiny_dirs, tmp_path):
    """Qwen's tokenizer_config.json template drops list content: every caption would embed alike."""
    import shutil

    from slq.backbones import BackboneError, load_backbone

    d = shutil.copytree(tiny_dirs["qwen2_5_vl"], tmp_path / "text_only")
    for name in ("chat_template.jinja", "chat_template.json"):
        (d / name).unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m.content is string %}{{ m.content }}{% endif %}"
                            "{% endfor %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match="drops the message's text or image"):
        load_backbone(d)

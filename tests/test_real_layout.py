"""The library against folders laid out exactly like the real Hugging Face downloads
(tests/real_layout.py), and against an independent reference forward (tests/reference_slq.py).

Fixture faithfulness: special token ids, the files each download has, the model and its parts
load with the real classes, and the real traps hold (Qwen2.5-VL's tokenizer template is text
only; AutoProcessor fails without torchvision).

Key tests: SLQEncoder with no prompt arguments gives, for one item, exactly the reference
recipe's embedding (chat template with the generation prompt, queries after the opened
assistant turn, mRoPE from get_rope_index, DeepStack), for text, image and image+instruction.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_layout import FAMILIES, LLAVA_IDS, QWEN_IDS, build_real_layout  # noqa: E402
from reference_slq import (  # noqa: E402
    build_prompt_ids,
    multimodal_template,
    reference_embed,
    render_chat,
)

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CAPTION = "a red circle on the left"
INSTRUCTION = " Modify this image with make it red. Describe modified image in one word: "

FILES = {
    "qwen2_vl": {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "preprocessor_config.json"},
    "qwen2_5_vl": {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "preprocessor_config.json"},
    "qwen3_vl": {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "preprocessor_config.json", "video_preprocessor_config.json"},
    "llava": {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
              "processor_config.json"},
}


def _image(w: int, h: int, color: str, box=None):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h), "gray")
    d = ImageDraw.Draw(im)
    d.ellipse(box or [4, 8, w // 2, h // 2], fill=color)
    return im


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder per (family, template format), built on first use."""
    root = tmp_path_factory.mktemp("real_layout")
    made = {}

    def get(family: str, template: str = "json") -> Path:
        key = (family, template)
        if key not in made:
            made[key] = build_real_layout(family, root / f"{family}-{template}", template=template)
        return made[key]

    return get


@pytest.fixture(scope="module")
def pairs():
    colors = ["red", "green", "blue", "yellow", "white", "purple"]
    return [(_image(56 + 8 * (i % 2), 56 + 24 * (i % 3 == 0), c), f"a {c} circle") for i, c in enumerate(colors)]


# ---- fixture faithfulness ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_file_set_and_special_ids(folders, family):
    import transformers as tf

    d = folders(family)
    names = {p.name for p in d.iterdir()}
    assert FILES[family] | {"chat_template.json"} == names
    tok = tf.AutoTokenizer.from_pretrained(str(d))
    want = LLAVA_IDS if family == "llava" else {
        k: QWEN_IDS[k] for k in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")}
    assert {t: tok.convert_tokens_to_ids(t) for t in want} == want
    if family == "llava":
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (32001, 2, 1)
        assert tok("a red circle").input_ids[0] == 1  # Llama adds <s>
    else:
        assert (tok.pad_token_id, tok.eos_token_id) == (151643, 151645)
        assert tok.convert_tokens_to_ids("<|file_sep|>") == (151664 if family != "qwen2_vl" else tok.unk_token_id)
        ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
        assert ids[0] == 151644 and ids[-1] == 151645
    cfg = json.loads((d / "config.json").read_text())
    if family == "llava":
        assert (cfg["image_token_index"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (32000, 32064, False)
    else:
        text = cfg.get("text_config", cfg)
        assert (cfg["image_token_id"], cfg["vision_start_token_id"], text["vocab_size"]) == (151655, 151652, 151936)
        assert cfg["tie_word_embeddings"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_the_real_classes(folders, family):
    import transformers as tf

    d = folders(family)
    model = tf.AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32)
    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    assert type(model).__name__ == arch
    assert model.config.model_type == family
    assert model.config.get_text_config().hidden_size == 64
    ip = tf.AutoImageProcessor.from_pretrained(str(d))
    if family == "llava":
        assert ip.crop_size["height"] == 336
        proc = tf.AutoProcessor.from_pretrained(str(d))
        assert type(proc).__name__ == "LlavaProcessor" and proc.patch_size == 14
        assert proc.chat_template == json.loads((d / "chat_template.json").read_text())["chat_template"]
    else:
        assert ip.merge_size == 2 and ip.patch_size == (16 if family == "qwen3_vl" else 14)
        # all checkpoint tensors were matched (legacy key names converted on load)
        emb = model.get_input_embeddings().weight
        assert emb.shape == (151936, 64) and model.lm_head.weight.data_ptr() == emb.data_ptr()


def test_qwen2_5_vl_tokenizer_template_is_text_only(folders):
    """The real trap: the tokenizer's own template concatenates message.content."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(folders("qwen2_5_vl")))
    with pytest.raises(TypeError):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"


def test_qwen3_vl_tokenizer_template_drops_list_content(folders):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(folders("qwen3_vl")))
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    assert "hi" not in text


@pytest.mark.parametrize("family", QWEN)
def test_autoprocessor_needs_torchvision(folders, family):
    """Without torchvision the Qwen AutoProcessor fails (its video processor); the library copes."""
    import importlib.util

    import transformers as tf

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    with pytest.raises(ImportError):
        tf.AutoProcessor.from_pretrained(str(folders(family)))


@pytest.mark.parametrize("template", ["json", "jinja"])
@pytest.mark.parametrize("family", QWEN)
def test_reference_prompts(folders, family, template):
    """The reference's jinja rendering equals transformers' own, and gives the recipe's prompts."""
    import transformers as tf

    d = folders(family, template)
    tmpl = multimodal_template(d)
    tok = tf.AutoTokenizer.from_pretrained(str(d))
    for content in ([{"type": "text", "text": CAPTION}], [{"type": "image"}, {"type": "text", "text": ""}]):
        msgs = [{"role": "user", "content": content}]
        ours = render_chat(tmpl, msgs)
        assert ours == tok.apply_chat_template(msgs, chat_template=tmpl, tokenize=False, add_generation_prompt=True)
    system = "" if family == "qwen3_vl" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert render_chat(tmpl, [{"role": "user", "content": [{"type": "text", "text": CAPTION}]}]) == \
        f"{system}<|im_start|>user\n{CAPTION}<|im_end|>\n<|im_start|>assistant\n"
    ids, _, grid, prompt = build_prompt_ids(d, image=_image(64, 80, "red"))
    assert prompt.startswith(f"{system}<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert prompt.endswith("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    assert int((ids == 151655).sum()) == int(grid.prod()) // 4


@pytest.mark.parametrize("family", QWEN)
def test_reference_matches_the_models_own_forward(folders, family):
    """Cross-check of the reference: queries equal to the pad embedding give what the model's
    own forward gives on the ids extended with pads."""
    import torch.nn.functional as F

    from reference_slq import load

    d = folders(family)
    model, tok, _ = load(d)
    n_q = 3
    q = model.get_input_embeddings().weight[tok.pad_token_id].detach().expand(n_q, -1).clone()
    for kw in (dict(text=CAPTION), dict(image=_image(64, 80, "blue")), dict(image=_image(56, 56, "red"),
                                                                          text=INSTRUCTION)):
        ids, pv, grid, _ = build_prompt_ids(d, **kw)
        ext = torch.cat([ids, ids.new_full((1, n_q), tok.pad_token_id)], 1)
        inputs = dict(input_ids=ext, attention_mask=torch.ones_like(ext))
        if pv is not None:
            inputs.update(pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=(ext == model.config.image_token_id).int())
        with torch.no_grad():
            h = model.model(**inputs, use_cache=False).last_hidden_state[0, -n_q:].mean(0)
        torch.testing.assert_close(F.normalize(h, dim=-1), reference_embed(d, q, **kw), atol=1e-6, rtol=0)


# ---- the key tests: the library equals the reference recipe ----------------------------------

def _encoder(folder):
    from slq.encoder import SLQEncoder

    return SLQEncoder.from_pretrained(str(folder), num_queries=4, seed=1, device="cpu", dtype="float32")


KEY_CASES = [("qwen3_vl", "json"), ("qwen3_vl", "jinja"), ("qwen2_5_vl", "json"), ("qwen2_5_vl", "jinja"),
             ("qwen2_vl", "json")]


@pytest.mark.parametrize(("family", "template"), KEY_CASES)
def test_key_encoder_equals_reference(folders, family, template):
    d = folders(family, template)
    enc = _encoder(d)
    q = enc.queries.weight.detach()
    img = _image(64, 80, "red")
    ref_t = reference_embed(d, q, text=CAPTION)
    ref_i = reference_embed(d, q, image=img)
    ref_m = reference_embed(d, q, image=img, text=INSTRUCTION)
    got_t = torch.from_numpy(enc.encode_text([CAPTION])[0])
    got_i = torch.from_numpy(enc.encode_image([img])[0])
    got_m = torch.from_numpy(enc.encode_multimodal([(img, INSTRUCTION)])[0])
    # distinct inputs give distinct embeddings (else the comparison would prove little)
    assert (ref_t - ref_i).abs().max() > 1e-3 and (ref_i - ref_m).abs().max() > 1e-3
    errors = {name: float((got - ref).abs().max()) for name, got, ref in
              (("text", got_t, ref_t), ("image", got_i, ref_i), ("image+text", got_m, ref_m))}
    assert all(e <= 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize(("family", "template"), [("qwen3_vl", "json"), ("qwen2_5_vl", "json"), ("qwen2_vl", "jinja")])
def test_key_batches_equal_reference(folders, family, template):
    """Left-padded batches of unequal items (text lengths, image sizes) give each item's reference."""
    d = folders(family, template)
    enc = _encoder(d)
    q = enc.queries.weight.detach()
    texts = [CAPTION, "a much longer caption: a small blue square above a large green circle, on the left"]
    images = [_image(64, 80, "red"), _image(120, 56, "green", [10, 10, 60, 40])]
    got = [torch.from_numpy(e) for e in enc.encode_text(texts)]
    want = [reference_embed(d, q, text=t) for t in texts]
    got += [torch.from_numpy(e) for e in enc.encode_image(images)]
    want += [reference_embed(d, q, image=im) for im in images]
    got += [torch.from_numpy(e) for e in enc.encode_multimodal([(images[0], INSTRUCTION), (images[1], " make it red")])]
    want += [reference_embed(d, q, image=images[0], text=INSTRUCTION),
             reference_embed(d, q, image=images[1], text=" make it red")]
    errors = [round(float((g - w).abs().max()), 7) for g, w in zip(got, want)]
    assert max(errors) <= 1e-5, errors


# ---- every family: encode and train ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_and_fit_two_steps(folders, family, pairs):
    from slq.train import FitConfig, fit

    enc = _encoder(folders(family))
    img = pairs[0][0]
    t = enc.encode_text([CAPTION, "a blue square"])
    i = enc.encode_image([img, pairs[1][0]])
    m = enc.encode_multimodal([(img, INSTRUCTION)])
    for e in (t, i, m):
        assert e.shape[1] == 64
        assert abs(float((e**2).sum(-1).mean()) - 1.0) < 1e-4
    frozen = {n: p.detach().clone() for n, p in enc.backbone.model.named_parameters()}
    q0 = enc.queries.weight.detach().clone()
    fit(enc, pairs, FitConfig(steps=2, batch_size=4, warmup_steps=1, save_every=1000), progress=False)
    assert not torch.equal(q0, enc.queries.weight.detach())
    changed = [n for n, p in enc.backbone.model.named_parameters() if not torch.equal(frozen[n], p.detach())]
    assert changed == []

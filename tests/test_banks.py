"""Many query banks on one backbone in one pass (slq/banks.py), exact.

For every registered adapter family (folders laid out like the real downloads, fp32), a
MultiBankEncoder holding banks of different sizes gives, for text, image and image+text
batches with padding, on its split path (one prompt pass + one query forward for every bank)
and its whole-sequence path, each bank's single-bank SLQEncoder embedding to 1e-5, and the
independent reference's (tests/reference_slq.py for the Qwen-VL families, a LLaVA forward
written here from transformers' own parts) to 1e-5. The tests would catch a wrong mask or
wrong positions: with banks that see each other, or positions that continue across banks,
the same comparisons fail by at least two orders of magnitude.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_slq import reference_embed

from slq import banks as banks_mod
from slq.backbones import load_backbone, supported_model_types
from slq.banks import (
    BankError,
    MultiBankEncoder,
    forward_banks_split,
    forward_banks_whole,
)
from slq.encoder import SLQEncoder

SIZES = {"captions": 4, "knowledge": 2, "edits": 5}  # banks of different N_q
TOL = 1e-5


def _image(w: int, h: int, color: str, box=None):
    im = Image.new("RGB", (w, h), "gray")
    ImageDraw.Draw(im).ellipse(box or [4, 8, w // 2, h // 2], fill=color)
    return im


IMAGES = [_image(64, 80, "red"), _image(120, 56, "green", [10, 10, 60, 40]), _image(56, 56, "blue")]
TEXTS = ["a red circle on the left", "hi", "a much longer caption: a small blue square above a large green circle"]
INSTRUCTIONS = [" make it blue", "x", " turn the red circle into a big star on the right"]
KINDS = ("text", "image", "multimodal")


def encode(enc, kind: str, **kw):
    if kind == "text":
        return enc.encode_text(TEXTS, **kw)
    if kind == "image":
        return enc.encode_image(IMAGES, **kw)
    return enc.encode_multimodal(list(zip(IMAGES, INSTRUCTIONS)), **kw)


@pytest.fixture(scope="module", params=supported_model_types())
def family(request, real_layout_dirs):
    if request.param not in real_layout_dirs:
        pytest.fail(f"adapter family {request.param!r} has no real-layout test folder (tests/real_layout.py)")
    return request.param


@functools.cache
def _setup(folder: str):
    adapter = load_backbone(folder, dtype=torch.float32, device="cpu")
    singles = {name: SLQEncoder.fresh(adapter, num_queries=n, seed=k) for k, (name, n) in enumerate(SIZES.items())}
    return adapter, singles, MultiBankEncoder.from_encoders(singles)


@pytest.fixture(scope="module")
def setup(family, real_layout_dirs):
    return _setup(str(real_layout_dirs[family]))


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ---- one pass equals K separate single-bank encodes ---------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_equals_separate_single_bank_encodes(setup, family, kind):
    _, singles, multi = setup
    want = {name: encode(enc, kind, batch_size=3) for name, enc in singles.items()}  # SLQEncoder's own path
    names = list(SIZES)
    # the comparison means something: banks and items are far apart
    assert min(max_err(want[a], want[b]) for a in names for b in names if a < b) > 1e-2
    assert min(max_err(w[0], w[1]) for w in want.values()) > 1e-3
    if kind != "image" or family != "llava":  # LLaVA resizes every image to one size
        enc = next(iter(singles.values()))
        inputs = {"text": lambda: enc.prepare(texts=TEXTS), "image": lambda: enc.prepare(images=IMAGES),
                  "multimodal": lambda: enc.prepare(texts=INSTRUCTIONS, images=IMAGES)}[kind]()
        assert (inputs["attention_mask"] == 0).any(), "the batch should need padding"
    for path in ({"split": True}, {"split": True, "buckets": 2}, {"split": False}):
        got = encode(multi, kind, batch_size=3, **path)
        assert list(got) == names
        errors = {name: max_err(got[name], want[name]) for name in names}
        assert max(errors.values()) <= TOL, (path, errors)


@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_equals_single_bank_split_and_whole_forwards(setup, kind):
    """At the level of one batch: each bank's embedding from the multi-bank split / whole forward
    equals its single-bank split / whole forward."""
    _, singles, multi = setup
    enc = next(iter(singles.values()))
    inputs = {"text": lambda: enc.prepare(texts=TEXTS), "image": lambda: enc.prepare(images=IMAGES),
              "multimodal": lambda: enc.prepare(texts=INSTRUCTIONS, images=IMAGES)}[kind]()
    with torch.no_grad():
        for split in (True, False):
            got = multi.embed_inputs(inputs, split=split)
            for name, single in singles.items():
                want = single.embed_inputs(inputs, split=split)
                assert max_err(got[name], want) <= TOL, (name, split)


# ---- the independent reference gives the expectation ----------------------------------------------

def _llava_load(folder: str):
    import transformers as tf

    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tf.AutoProcessor.from_pretrained(folder)


_llava_load = functools.lru_cache(maxsize=2)(_llava_load)


def _llava_prompt(proc, content: list[dict]) -> str:
    """transformers' own rendering of the folder's template (it uses transformers' {% generation %} tag,
    which plain jinja2 lacks)."""
    return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)


@torch.no_grad()
def llava_reference_embed(folder, queries: torch.Tensor, *, text: str | None = None, image=None) -> torch.Tensor:
    """One item's SLQ embedding on LLaVA-1.5, written from transformers' parts, sharing nothing with slq:
    the folder's chat template as transformers renders it (user turn: image, then the text if any; the opened assistant turn),
    the processor's tokens (<s> first, <image> expanded to the patch count), CLIP features from the
    layer `vision_feature_layer` without the class token ("default" strategy) through the projector at
    the image tokens, the queries after the last token, plain positions 0..L+Nq-1, mean of the
    queries' last hidden states, L2-normalised.  -> (D,)"""
    model, proc = _llava_load(str(folder))
    cfg, base = model.config, model.model
    content = ([{"type": "image"}] if image is not None else []) + ([{"type": "text", "text": text}] if text else [])
    prompt = _llava_prompt(proc, content)
    enc = proc(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
    ids = enc["input_ids"]
    x = base.get_input_embeddings()(ids).clone()  # (1, L, D)
    if image is not None:
        hidden = base.vision_tower(enc["pixel_values"].float(), output_hidden_states=True).hidden_states
        feats = base.multi_modal_projector(hidden[cfg.vision_feature_layer][:, 1:])  # (1, P, D)
        where = ids == cfg.image_token_index
        assert int(where.sum()) == feats.shape[1]
        x[where] = feats[0]
    n_q, L = queries.shape[0], ids.shape[1]
    x = torch.cat([x, queries.float().unsqueeze(0)], dim=1)
    out = base.language_model(inputs_embeds=x, attention_mask=torch.ones(1, L + n_q, dtype=torch.long),
                              position_ids=torch.arange(L + n_q).unsqueeze(0), use_cache=False)
    return F.normalize(out.last_hidden_state[0, -n_q:].mean(0), dim=-1)


def reference(family: str, folder, queries, **item) -> np.ndarray:
    fn = llava_reference_embed if family == "llava" else reference_embed
    return fn(folder, queries, **item).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_equals_the_independent_reference(setup, family, real_layout_dirs, kind):
    folder = real_layout_dirs[family]
    _, _, multi = setup
    items = {"text": [{"text": t} for t in TEXTS[::2]], "image": [{"image": im} for im in IMAGES[:2]],
             "multimodal": [{"image": im, "text": t} for im, t in zip(IMAGES[:2], INSTRUCTIONS[::2])]}[kind]
    for split in (True, False):
        if kind == "text":
            got = multi.encode_text([it["text"] for it in items], split=split)
        elif kind == "image":
            got = multi.encode_image([it["image"] for it in items], split=split)
        else:
            got = multi.encode_multimodal([(it["image"], it["text"]) for it in items], split=split)
        errors = {}
        for name in SIZES:
            q = multi.banks[name].weight.detach()
            want = np.stack([reference(family, folder, q, **it) for it in items])
            errors[name] = max_err(got[name], want)
        assert max(errors.values()) <= TOL, (split, errors)


def test_the_llava_reference_is_the_models_own_forward(real_layout_dirs):
    """Cross-check of the LLaVA reference: queries equal to the pad embedding give what LLaVA's own
    forward gives on the processor's ids extended with pad ids."""
    folder = real_layout_dirs["llava"]
    model, proc = _llava_load(str(folder))
    pad = proc.tokenizer.pad_token_id
    q = model.get_input_embeddings().weight[pad].detach().expand(3, -1).clone()
    for item in ({"text": TEXTS[0]}, {"image": IMAGES[0]}, {"image": IMAGES[1], "text": INSTRUCTIONS[2]}):
        content = ([{"type": "image"}] if "image" in item else []) + (
            [{"type": "text", "text": item["text"]}] if "text" in item else [])
        prompt = _llava_prompt(proc, content)
        enc = proc(text=[prompt], images=[item["image"]] if "image" in item else None, return_tensors="pt")
        ext = torch.cat([enc["input_ids"], enc["input_ids"].new_full((1, 3), pad)], 1)
        kw = {"pixel_values": enc["pixel_values"]} if "image" in item else {}
        with torch.no_grad():
            h = model.model(input_ids=ext, attention_mask=torch.ones_like(ext), use_cache=False, **kw)
        want = F.normalize(h.last_hidden_state[0, -3:].mean(0), dim=-1)
        torch.testing.assert_close(llava_reference_embed(folder, q, **item), want, atol=1e-6, rtol=0)


# ---- a wrong mask or wrong positions would be caught -------------------------------------------

_QUERY_MASK, _WHOLE_MASK = banks_mod.bank_query_mask, banks_mod.bank_whole_mask


def _leaky_query_mask(prefix_mask, sizes, dtype):
    """Banks see each other: plain causal attention over the concatenated banks."""
    return _QUERY_MASK(prefix_mask, [sum(sizes)], dtype)


def _leaky_whole_mask(n_real, sizes, width, dtype):
    return _WHOLE_MASK(n_real, [sum(sizes)], width, dtype)


def _continued_shift(n_real, sizes, width):
    """Positions that continue across banks (no bank's positions moved back to a single bank's)."""
    return torch.zeros(n_real.shape[0], width, dtype=torch.long, device=n_real.device)


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_a_leaking_mask_or_continued_positions_would_be_caught(setup, monkeypatch, kind):
    """Each deliberate error breaks the banks after the first by over 100 times the tolerance, and
    leaves the first bank (which sees nothing of the others either way) within it: the equality
    tests above do test the mask and the positions."""
    _, singles, multi = setup
    enc = next(iter(singles.values()))
    inputs = enc.prepare(texts=TEXTS) if kind == "text" else enc.prepare(texts=INSTRUCTIONS, images=IMAGES)
    with torch.no_grad():
        want = {name: e.embed_inputs(inputs, split=True).numpy() for name, e in singles.items()}
    names = list(SIZES)
    broken = {
        "split, banks see each other": ("bank_query_mask", _leaky_query_mask, True),
        "whole, banks see each other": ("bank_whole_mask", _leaky_whole_mask, False),
        "whole, positions continue across banks": ("bank_slot_shift", _continued_shift, False),
    }
    for what, (attr, fn, split) in broken.items():
        with monkeypatch.context() as m:
            m.setattr(banks_mod, attr, fn)
            with torch.no_grad():
                got = multi.embed_inputs(inputs, split=split)
        errors = {name: max_err(got[name].numpy(), want[name]) for name in names}
        assert errors[names[0]] <= TOL, (what, errors)
        assert min(errors[n] for n in names[1:]) > 100 * TOL, (what, errors)

    # positions continuing across banks on the split path: each bank placed after the ones before it
    def continued(adapter_, inputs_, queries, buckets=1):
        q = torch.cat(list(queries))
        h = adapter_.forward_split(inputs_, q)  # one bank of all the queries: positions and attention continue
        return list(h.split([x.shape[0] for x in queries], dim=1))

    with monkeypatch.context() as m:
        m.setattr(banks_mod, "forward_banks_split", continued)
        with torch.no_grad():
            got = multi.embed_inputs(inputs, split=True)
    errors = {name: max_err(got[name].numpy(), want[name]) for name in names}
    assert errors[names[0]] <= TOL and min(errors[n] for n in names[1:]) > 100 * TOL, errors


def test_the_masks_themselves():
    """The split mask on a left-padded row, and the whole mask on a right-padded one, by hand."""
    ok = 0.0
    m = banks_mod.bank_query_mask(torch.tensor([[0, 1, 1]]), [2, 1], torch.float32)[0, 0] == ok
    # rows: bank 1 query 0, bank 1 query 1, bank 2 query 0; columns: pad, 2 prompt tokens, 3 queries
    assert m.tolist() == [[False, True, True, True, False, False],
                          [False, True, True, True, True, False],
                          [False, True, True, False, False, True]]
    w = banks_mod.bank_whole_mask(torch.tensor([2]), [2, 1], 6, torch.float32)[0, 0] == ok
    # columns: 2 real tokens, bank 1 (2 slots), bank 2 (1 slot), 1 pad
    assert w.tolist() == [[True, False, False, False, False, False],
                          [True, True, False, False, False, False],
                          [True, True, True, False, False, False],
                          [True, True, True, True, False, False],
                          [True, True, False, False, True, False],
                          [False, False, False, False, False, True]]
    assert banks_mod.bank_slot_shift(torch.tensor([2]), [2, 1], 6).tolist() == [[0, 0, 0, 0, 2, 0]]


# ---- checkpoints, prompts, refusals ------------------------------------------------------------

def test_banks_from_checkpoints_and_refusals(setup, family, tmp_path):
    from real_layout import build_real_layout

    _, singles, multi = setup
    ckpts = {name: enc.save(tmp_path / name) for name, enc in singles.items()}
    loaded = MultiBankEncoder.from_pretrained(ckpts, dtype="float32", device="cpu")
    assert loaded.names == list(SIZES) and [loaded.num_queries(n) for n in SIZES] == list(SIZES.values())
    got, want = loaded.encode_text(TEXTS), multi.encode_text(TEXTS)
    assert max(max_err(got[n], want[n]) for n in SIZES) <= TOL
    sub = loaded.encode_image(IMAGES[:1], banks=["edits"])
    assert list(sub) == ["edits"]

    # a bank trained on another backbone of the same family and width: refused by its name
    other = build_real_layout(family, tmp_path / "other-backbone", seed=1)
    foreign = SLQEncoder.from_pretrained(other, num_queries=3, dtype="float32", device="cpu").save(tmp_path / "foreign")
    with pytest.raises(BankError, match=r"bank 'customer-7': .*fingerprint"):
        loaded.add_checkpoint("customer-7", foreign)
    with pytest.raises(BankError, match=r"bank 'customer-7': .*fingerprint"):
        MultiBankEncoder.from_pretrained({**ckpts, "customer-7": foreign}, dtype="float32", device="cpu")

    # a checkpoint of a method that changes the backbone: refused by name
    lora = tmp_path / "lora"
    singles["captions"].save(lora)
    manifest = json.loads((lora / "slq.json").read_text())
    (lora / "slq.json").write_text(json.dumps({**manifest, "method": "lora"}))
    with pytest.raises(BankError, match=r"bank 'adapted': .*method 'lora'"):
        loaded.add_checkpoint("adapted", lora)
    with pytest.raises(BankError, match="already loaded"):
        loaded.add_checkpoint("captions", ckpts["captions"])
    with pytest.raises(BankError, match=r"bank name 'a b'"):
        loaded.add_checkpoint("a b", ckpts["captions"])
    with pytest.raises(BankError, match=r"unknown bank 'nope'; loaded: captions, knowledge, edits"):
        loaded.encode_text(TEXTS, banks=["nope"])


def test_banks_with_other_prompts_get_their_own_prompt_pass(setup, monkeypatch):
    """Banks are grouped by equal prompts (one prompt pass per group); each still equals its own
    single-bank encoder with its own prompts."""
    adapter, singles, _ = setup
    instructed = SLQEncoder.fresh(adapter, num_queries=3, seed=7,
                                  prompts={"text": "Find an image of: {text}", "multimodal": "{text}"})
    encs = {**singles, "instructed": instructed}
    multi = MultiBankEncoder.from_encoders(encs)
    groups = multi.prompt_groups()
    assert [members for _, members in groups] == [list(SIZES), ["instructed"]]
    calls = []
    real = banks_mod.forward_banks_split

    def counted(adapter_, inputs, queries, buckets=1):
        calls.append(len(queries))
        return real(adapter_, inputs, queries, buckets)

    monkeypatch.setattr(banks_mod, "forward_banks_split", counted)
    got = multi.encode_text(TEXTS, batch_size=3)
    monkeypatch.undo()
    assert calls == [3, 1]  # one pass for the three default-prompt banks, one for the other
    assert max(max_err(got[n], e.encode_text(TEXTS)) for n, e in encs.items()) <= TOL
    plain = SLQEncoder.fresh(adapter, num_queries=3, seed=7)  # the same queries, the default prompts
    assert max_err(got["instructed"], plain.encode_text(TEXTS)) > 1e-3  # the prompts did matter


def test_flash_attention_is_refused(setup):
    adapter, singles, multi = setup
    cfg = adapter.decoder.config
    saved = cfg._attn_implementation
    try:
        cfg._attn_implementation = "flash_attention_2"
        with pytest.raises(BankError, match="attn_implementation='sdpa'"):
            multi.embed_inputs(next(iter(singles.values())).prepare(texts=TEXTS))
    finally:
        cfg._attn_implementation = saved


def test_direct_forwards_return_each_banks_states(setup):
    adapter, singles, _ = setup
    enc = next(iter(singles.values()))
    inputs = enc.prepare(texts=TEXTS)
    qs = [e.queries.weight.detach() for e in singles.values()]
    with torch.no_grad():
        for fwd in (forward_banks_split, forward_banks_whole):
            hs = fwd(adapter, inputs, qs)
            assert [tuple(h.shape) for h in hs] == [(3, n, adapter.hidden_size) for n in SIZES.values()]

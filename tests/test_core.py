"""Contract tests: every registered adapter on its tiny random model of the real class."""

import numpy as np
import pytest
import torch
from PIL import Image

from slq.backbones import BackboneError, get_adapter_class, supported_model_types
from slq.miniature.tiny import TINY_TYPES
from slq.checkpoint import CheckpointError
from slq.encoder import SLQEncoder

IMAGES = [Image.new("RGB", (60, 90), "red"), Image.new("RGB", (120, 60), "blue"), Image.new("RGB", (56, 56), "green")]
TEXTS = ["a red circle on the left", "hi", "a much longer caption about a small blue square at the top right"]


@pytest.fixture(scope="module", params=[*TINY_TYPES, *(f"real:{t}" for t in TINY_TYPES)])
def encoder(request, tiny_dirs, real_layout_dirs):
    """Every family twice: its tiny test model, and a folder laid out like its real download
    (real config, special token ids, chat_template.json beside tokenizer_config.json's own
    template, real preprocessor settings; no torchvision needed)."""
    torch.manual_seed(0)
    kind, _, family = request.param.rpartition(":")
    folder = real_layout_dirs[family] if kind == "real" else tiny_dirs[family]
    return SLQEncoder.from_pretrained(folder, num_queries=4, seed=1)


def batches(enc):
    return {
        "text": enc.prepare(texts=TEXTS),
        "image": enc.prepare(images=IMAGES),
        "multimodal": enc.prepare(texts=["make it blue", "x", "turn the red circle into a big star"], images=IMAGES),
    }


def test_every_required_family_is_registered():
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"} <= set(supported_model_types())


def test_unknown_model_type_lists_supported():
    with pytest.raises(BackboneError, match="supported: .*qwen2_vl"):
        get_adapter_class("mamba_vl")


def test_batches_are_left_padded(encoder):
    for name, inputs in batches(encoder).items():
        mask = inputs["attention_mask"]
        assert (mask[:, -1] == 1).all(), name
        fixed_size_images = name == "image" and encoder.backbone.model_type == "llava"
        assert fixed_size_images or (mask == 0).any(), f"{name}: test batch should need padding"


def test_shapes_and_norms(encoder):
    D = encoder.backbone.hidden_size
    for out in (encoder.encode_text(TEXTS), encoder.encode_image(IMAGES),
                encoder.encode_multimodal(list(zip(IMAGES, TEXTS)))):
        assert out.shape == (3, D) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("kind", ["text", "image", "multimodal"])
def test_split_equals_whole(encoder, kind):
    """Prefix-in-cache + queries-only autograd gives the whole sequence's embeddings and gradients."""
    inputs = batches(encoder)[kind]
    q = encoder.queries.weight
    results = []
    for split in (False, True):
        q.grad = None
        emb = encoder.embed_inputs(inputs, split=split)
        target = torch.linspace(-1, 1, emb.numel()).reshape(emb.shape)
        (emb * target).sum().backward()
        results.append((emb.detach().clone(), q.grad.clone()))
    (ew, gw), (es, gs) = results
    torch.testing.assert_close(es, ew, rtol=1e-4, atol=1e-6)
    assert (gs - gw).norm() / gw.norm() < 1e-4
    assert gw.norm() > 0
    q.grad = None


@pytest.mark.parametrize("kind", ["text", "image", "multimodal"])
def test_bucketed_prefix_equals_plain_split(encoder, kind):
    """The prompt run in length groups (less padding) and laid back into one cache gives the plain
    split's embeddings and query gradients (fp32), and the whole sequence's."""
    from slq.backbones.base import plan_buckets

    inputs = batches(encoder)[kind]
    q = encoder.queries.weight
    results = []
    for split, buckets in ((True, 1), (True, 3), (False, 1)):
        q.grad = None
        emb = encoder.embed_inputs(inputs, split=split, buckets=buckets)
        target = torch.linspace(-1, 1, emb.numel()).reshape(emb.shape)
        (emb * target).sum().backward()
        results.append((emb.detach().clone(), q.grad.clone()))
    (e1, g1), (eb, gb), (ew, gw) = results
    torch.testing.assert_close(eb, e1, rtol=1e-5, atol=1e-6)
    assert (gb - g1).norm() / g1.norm() < 1e-5
    torch.testing.assert_close(eb, ew, rtol=1e-4, atol=1e-6)
    assert (gb - gw).norm() / gw.norm() < 1e-4
    lengths = inputs["attention_mask"].sum(-1).tolist()
    if len(set(lengths)) > 1:  # rows of different lengths: the prompt really ran in several groups
        assert len(plan_buckets(lengths, 3)) > 1, lengths
    q.grad = None


def test_padding_invariance(encoder):
    alone = encoder.encode_text(TEXTS[:1])
    padded = encoder.encode_text(TEXTS, batch_size=3)
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-4)
    alone = encoder.encode_image(IMAGES[2:])
    padded = encoder.encode_image(IMAGES, batch_size=3)
    np.testing.assert_allclose(alone[0], padded[2], atol=1e-4)
    pairs = list(zip(IMAGES, ["a", "turn the red circle into a big star", "b"]))
    np.testing.assert_allclose(encoder.encode_multimodal(pairs[:1])[0], encoder.encode_multimodal(pairs)[0], atol=1e-4)


def test_backbone_frozen_only_queries_train(encoder):
    from slq.loss import ContrastiveLoss

    before = {k: v.detach().clone() for k, v in encoder.backbone.model.state_dict().items()}
    assert not any(p.requires_grad for p in encoder.backbone.model.parameters())
    assert not encoder.backbone.model.training
    called = []
    head = encoder.backbone.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *a: called.append(1))
    loss_fn = ContrastiveLoss()
    q0 = encoder.queries.weight.detach().clone()
    opt = torch.optim.AdamW([encoder.queries.weight, loss_fn.log_temp], lr=1e-2)
    img = encoder.embed_inputs(encoder.prepare(images=IMAGES), split=True)
    txt = encoder.embed_inputs(encoder.prepare(texts=TEXTS), split=True)
    loss_fn(img, txt).backward()
    opt.step()
    handle.remove()
    assert not called, "the vocabulary head must never run"
    after = encoder.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(q0, encoder.queries.weight)
    assert loss_fn.log_temp.item() != pytest.approx(np.log(0.07), abs=1e-9)
    with torch.no_grad():
        encoder.queries.weight.copy_(q0)


def test_checkpoint_round_trip(encoder, tmp_path, tiny_dirs):
    out = encoder.save(tmp_path / "ckpt", metrics={"t2i_R@1": 0.5})
    again = SLQEncoder.from_pretrained(queries=out)
    np.testing.assert_allclose(again.encode_text(TEXTS), encoder.encode_text(TEXTS), atol=1e-6)
    assert again.manifest["metrics"]["t2i_R@1"] == 0.5
    assert again.manifest["backbone"]["model_type"] == encoder.backbone.model_type
    other = "llava" if encoder.backbone.model_type != "llava" else "qwen2_vl"
    with pytest.raises(CheckpointError, match="trained on a"):
        SLQEncoder.from_pretrained(tiny_dirs[other], queries=out)


def test_checkpoint_on_wider_backbone_is_an_error(tmp_path, tiny_dirs):
    from slq.miniature.tiny import build_tiny_backbone

    enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=2)
    ckpt = enc.save(tmp_path / "ckpt")
    wide = build_tiny_backbone("qwen2_vl", tmp_path / "wide", hidden_size=96)
    with pytest.raises(CheckpointError, match="hidden size 64"):
        SLQEncoder.from_pretrained(wide, queries=ckpt)


def test_checkpoint_records_its_hidden_state_and_refuses_another(tmp_path, tiny_dirs):
    import json

    enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=2)
    ckpt = enc.save(tmp_path / "ckpt")
    manifest = json.loads((ckpt / "slq.json").read_text())
    assert manifest["hidden_state"] == "final_norm"  # the decoder's last_hidden_state: after its final norm
    old = {k: v for k, v in manifest.items() if k != "hidden_state"}  # written before the record: post-norm
    (ckpt / "slq.json").write_text(json.dumps(old))
    np.testing.assert_array_equal(SLQEncoder.from_pretrained(queries=ckpt).encode_text(TEXTS), enc.encode_text(TEXTS))
    (ckpt / "slq.json").write_text(json.dumps({**manifest, "hidden_state": "pre_norm"}))
    with pytest.raises(CheckpointError, match="trained on the decoder's 'pre_norm' hidden state, but .* pools 'final_norm'"):
        SLQEncoder.from_pretrained(queries=ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not an SLQ checkpoint"):
        SLQEncoder.from_pretrained(queries=tmp_path)


def test_init_from_text(tiny_dirs):
    enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=3, init="text:summarize")
    ids = enc.backbone.tokenizer("summarize", add_special_tokens=False)["input_ids"]
    table = enc.backbone.input_embeddings.weight
    torch.testing.assert_close(enc.queries.weight[0], table[ids[0]].float())


def test_backbone_path_errors(tmp_path):
    from slq.backbones import load_backbone

    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(tmp_path)
    with pytest.raises(BackboneError, match="not a directory"):
        load_backbone(tmp_path / "missing")

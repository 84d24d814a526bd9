"""`slq export`: a checkpoint as a portable model folder, loaded back in slq (bit-identical) and in the
real sentence-transformers 6 package (the embeddings SLQEncoder gives, to 1e-6 in float32, whatever
the input form, order and batch size), self-contained with --with-backbone, written whole or not
at all, and with a model card whose Hugging Face header parses."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer  # the real package (the `test` extra), never a stand-in

from slq.checkpoint import LLM_WEIGHTS, WEIGHTS
from slq.encoder import SLQEncoder
from slq.export import MODULE_CLASS, MODULE_CONFIG, ExportError, export_model, read_card_header

HUB_ID = "Tiny-Org/tiny-qwen2-vl"
TEXTS = ["a red circle on the left", "hi", "a much longer caption about a small blue square at the top right",
         "two green squares", "make it blue"]
DATA = {"manifest": "data/world/manifest.jsonl", "manifest_sha256": "0fdcb9ad85e543a1", "n_pairs": 4000}
ATOL = 1e-6


def images():
    return [Image.new("RGB", (60, 90), "red"), Image.new("RGB", (120, 60), "blue"), Image.new("RGB", (56, 56), "green")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny backbone with a licensed model card and a Hub id in its config, a trained-looking
    checkpoint on it, its encoder, the evaluate stage's metrics for it, and two image files."""
    from slq.checkpoint import checkpoint_hash
    from slq.miniature.tiny import build_tiny_backbone

    root = tmp_path_factory.mktemp("export")
    bb = build_tiny_backbone("qwen2_vl", root / "backbone-src")
    cfg = json.loads((bb / "config.json").read_text())
    (bb / "config.json").write_text(json.dumps({**cfg, "_name_or_path": HUB_ID}))  # not part of the fingerprint
    (bb / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny\n")
    torch.manual_seed(0)
    enc = SLQEncoder.from_pretrained(bb, num_queries=4, seed=1, dtype="float32", device="cpu")
    ckpt = enc.save(root / "ckpt", metrics={"final_loss": 0.12, "steps": 600}, data=DATA)
    metrics = {"t2i_R@1": 0.427, "i2t_R@1": 0.448, "mean_R": 0.75, "n_images": 1000, "n_texts": 2000,
               "checkpoint_hash": checkpoint_hash(ckpt), "benchmarks": {"world_composed": {"R@1": 0.022}}}
    (root / "eval.json").write_text(json.dumps(metrics))
    paths = []
    for i, im in enumerate(images()[:2]):
        paths.append(str(root / f"img{i}.png"))
        im.save(paths[-1])
    return {"root": root, "backbone": bb, "ckpt": ckpt, "enc": enc, "metrics": root / "eval.json", "paths": paths}


@pytest.fixture(scope="module")
def exported(world):
    out = world["root"] / "models" / "slq-tiny"
    done = export_model(world["ckpt"], out, metrics=world["metrics"], query_prompt="query: ",
                        document_prompt="passage: ")
    return out, done


@pytest.fixture(scope="module")
def st_model(exported):
    return SentenceTransformer(str(exported[0]), trust_remote_code=True, device="cpu")


def test_the_folder_holds_the_checkpoint_and_the_sentence_transformers_files(world, exported):
    out, done = exported
    assert done.files == sorted(["README.md", "config_sentence_transformers.json", "modules.json", MODULE_CONFIG,
                                 "queries.safetensors", "slq.json"])
    for f in ("queries.safetensors", "slq.json"):
        assert (out / f).read_bytes() == (world["ckpt"] / f).read_bytes()
    assert not list(out.parent.glob(".slq-tiny*")), "a temporary folder was left beside OUT"
    modules = json.loads((out / "modules.json").read_text())
    assert modules == [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}]
    from slq.st import SLQModule

    assert f"{SLQModule.__module__}.{SLQModule.__qualname__}" == MODULE_CLASS
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": "query: ", "document": "passage: "}
    assert st["similarity_fn_name"] == "cosine" and st["model_type"] == "SentenceTransformer"
    module = json.loads((out / MODULE_CONFIG).read_text())
    manifest = json.loads((world["ckpt"] / "slq.json").read_text())
    assert module["backbone"] == str(world["backbone"].resolve())
    assert module["backbone_fingerprint"] == manifest["backbone"]["fingerprint"]
    assert module["embedding_dimension"] == 64 and module["method"] == "slq"


def test_model_card_header_parses_with_the_hub_fields(world, exported):
    from huggingface_hub import ModelCard

    out, done = exported
    head = read_card_header(out / "README.md")
    assert head["base_model"] == HUB_ID == done.base_model  # from config.json's _name_or_path
    assert head["license"] == "apache-2.0" == done.license  # from the backbone's own card
    assert head["library_name"] == "sentence-transformers" and head["pipeline_tag"] == "sentence-similarity"
    assert {"slq", "multimodal", "retrieval", "sentence-transformers"} <= set(head["tags"])
    results = head["model-index"][0]["results"]
    by_name = {r["metrics"][0]["name"]: r for r in results}
    assert by_name["t2i_R@1"]["metrics"][0]["value"] == 0.427
    assert by_name["t2i_R@1"]["dataset"]["split"] == "test"
    assert by_name["t2i_R@1"]["dataset"]["name"] == DATA["manifest"]
    assert by_name["R@1"]["dataset"]["name"] == "world_composed"
    card = ModelCard.load(out / "README.md")  # the Hub's own parser
    assert card.data.base_model == HUB_ID and card.data.license == "apache-2.0"
    body = card.text
    assert DATA["manifest_sha256"] in body and "n_pairs" in body  # the data and its hash
    row = next(line for line in body.splitlines() if line.startswith("| `data/world/manifest.jsonl` |"))
    assert "| test | text->image recall@k" in row and "t2i_R@1 0.427" in row  # benchmark, split, protocol
    assert "over 2000 captions, 1000 images" in row
    assert "world_composed" in body and "final_loss" in body  # eval metrics and the run's own
    assert "slq.methods.from_pretrained" in body and "trust_remote_code=True" in body
    assert '"query: "' in body and "chat template" in body
    assert json.loads((world["ckpt"] / "slq.json").read_text())["backbone"]["fingerprint"] in body


def test_slq_loads_the_export_bit_identical(world, exported):
    from slq.methods import from_pretrained

    out, _ = exported
    enc = world["enc"]
    again = from_pretrained(world["backbone"], out, dtype="float32", device="cpu")
    assert torch.equal(again.queries.weight, enc.queries.weight)
    assert again.prompts == enc.prompts
    np.testing.assert_array_equal(again.encode_text(TEXTS), enc.encode_text(TEXTS))
    np.testing.assert_array_equal(again.encode_image(images()), enc.encode_image(images()))


def test_sentence_transformers_gives_slq_embeddings(world, st_model):
    enc, paths = world["enc"], world["paths"]
    assert st_model.modalities == ["text", "image", ("image", "text")]
    assert st_model.get_embedding_dimension() == 64
    ims = images()
    np.testing.assert_allclose(st_model.encode(TEXTS), enc.encode_text(TEXTS), atol=ATOL, rtol=0)
    np.testing.assert_allclose(st_model.encode(ims), enc.encode_image(ims), atol=ATOL, rtol=0)
    np.testing.assert_allclose(st_model.encode(paths), enc.encode_image(paths), atol=ATOL, rtol=0)
    pairs = [(ims[0], "make it blue"), (paths[1], "x"), (ims[2], "turn the red circle into a big star")]
    want = enc.encode_multimodal(pairs)
    as_dicts = [{"image": im, "text": t} for im, t in pairs]
    np.testing.assert_allclose(st_model.encode(as_dicts), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(st_model.encode(pairs), want, atol=ATOL, rtol=0)  # (image, text) tuples
    np.testing.assert_allclose(st_model.encode([(t, im) for im, t in pairs]), want, atol=ATOL, rtol=0)
    one = st_model.encode(TEXTS[0])  # a single input: one vector
    assert one.shape == (64,) and one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(st_model.encode(TEXTS), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_any_order_and_batch_size_gives_the_same_rows(world, st_model, batch_size):
    enc = world["enc"]
    items = TEXTS + [t.upper() for t in TEXTS]
    order = list(range(len(items)))
    random.Random(batch_size).shuffle(order)
    want = enc.encode_text(items)
    got = st_model.encode([items[i] for i in order], batch_size=batch_size)
    np.testing.assert_allclose(got, want[order], atol=ATOL, rtol=0)
    ims = images() + [im.rotate(90, expand=True) for im in images()]
    order = list(range(len(ims)))
    random.Random(batch_size + 1).shuffle(order)
    got = st_model.encode([{"image": ims[i], "text": items[i]} for i in order], batch_size=batch_size)
    np.testing.assert_allclose(got, enc.encode_multimodal([(ims[i], items[i]) for i in order]), atol=ATOL, rtol=0)


def test_encode_query_and_document_apply_the_prompts(world, st_model):
    enc, ims = world["enc"], images()
    q = st_model.encode_query(TEXTS)
    np.testing.assert_allclose(q, enc.encode_text([f"query: {t}" for t in TEXTS]), atol=ATOL, rtol=0)
    d = st_model.encode_document(ims)  # an image alone: the prompt is its instruction
    with enc.using_prompts({**enc.prompts.to_dict(), "image": "passage: " + enc.prompts.image}):
        np.testing.assert_allclose(d, enc.encode_image(ims), atol=ATOL, rtol=0)
    dm = st_model.encode_document([{"image": ims[0], "text": "make it blue"}])
    np.testing.assert_allclose(dm, enc.encode_multimodal([(ims[0], "passage: make it blue")]), atol=ATOL, rtol=0)
    plain = st_model.encode(TEXTS, prompt="")
    np.testing.assert_allclose(plain, enc.encode_text(TEXTS), atol=ATOL, rtol=0)
    assert st_model.similarity_fn_name == "cosine"
    sim = st_model.similarity(q, d)
    assert tuple(sim.shape) == (len(TEXTS), len(ims))
    np.testing.assert_allclose(sim.numpy(), q @ d.T, atol=1e-5)


def test_inputs_sentence_transformers_or_slq_refuse_say_why(st_model):
    with pytest.raises(ValueError, match="one modality per call|Encode each modality separately"):
        st_model.encode(["a text", images()[0]])
    with pytest.raises(ValueError, match="no text pairs"):
        st_model.encode([("a caption", "another caption")])
    with pytest.raises(ValueError, match="URLs are not fetched"):
        st_model.encode(["https://example.org/cat.png"])
    with pytest.raises(ValueError, match="message"):
        st_model.encode([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="empty"):
        st_model.encode([""])


def test_trust_remote_code_is_required(exported):
    """sentence-transformers 6 imports a module class of another package only when trusted, local folder or not."""
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(exported[0]), device="cpu")


def test_an_existing_folder_is_kept_unless_forced(world, exported, tmp_path):
    out = tmp_path / "model"
    export_model(world["ckpt"], out)
    (out / "stale.txt").write_text("from an earlier export")
    with pytest.raises(ExportError, match="--force"):
        export_model(world["ckpt"], out)
    assert (out / "stale.txt").exists()
    with pytest.raises(ExportError, match="checkpoint"):  # metrics of another checkpoint: refused, OUT untouched
        export_model(world["ckpt"], out, force=True, metrics={"t2i_R@1": 0.9, "checkpoint_hash": "0000"})
    assert (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "a temporary folder was left beside OUT"
    export_model(world["ckpt"], out, force=True)
    assert not (out / "stale.txt").exists() and (out / WEIGHTS).is_file()
    with pytest.raises(ExportError, match="holds the checkpoint"):
        export_model(world["ckpt"], world["ckpt"].parent, force=True)


def test_with_backbone_the_folder_is_self_contained(tmp_path):
    """Export with the backbone, delete the backbone and checkpoint it came from, move the folder:
    it still loads, in slq and in sentence-transformers, to the same embeddings."""
    from slq.methods import from_pretrained
    from slq.miniature.tiny import build_tiny_backbone

    bb = build_tiny_backbone("qwen3_vl", tmp_path / "src" / "backbone")
    enc = SLQEncoder.from_pretrained(bb, num_queries=3, seed=2, dtype="float32", device="cpu")
    ckpt = enc.save(tmp_path / "src" / "ckpt")
    want_t, want_i = enc.encode_text(TEXTS), enc.encode_image(images())
    done = export_model(ckpt, tmp_path / "out" / "m", with_backbone=True)
    assert done.backbone == "backbone" and json.loads((done.path / MODULE_CONFIG).read_text())["backbone"] == "backbone"
    assert (done.path / "backbone" / "config.json").is_file()
    head = read_card_header(done.path / "README.md")
    assert head["license"] == "other" and head["base_model"] == str(bb.resolve())  # no card, no Hub id: the path
    assert "**Not set.**" in (done.path / "README.md").read_text()
    assert any("license" in w for w in done.warnings) and any("base_model" in w for w in done.warnings)
    shutil.rmtree(tmp_path / "src")
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(done.path, moved)
    again = from_pretrained(moved / "backbone", moved, dtype="float32", device="cpu")
    np.testing.assert_array_equal(again.encode_text(TEXTS), want_t)
    model = SentenceTransformer(str(moved), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(model.encode(TEXTS), want_t, atol=ATOL, rtol=0)
    np.testing.assert_allclose(model.encode(images()), want_i, atol=ATOL, rtol=0)


def test_the_backbone_is_found_by_its_hub_cache_path_and_checked_by_fingerprint(world, tmp_path):
    """--backbone: another folder with the same weights (here laid out as the Hub cache lays it out,
    which names the Hub id); a folder with other weights is refused."""
    from slq.miniature.tiny import build_tiny_backbone

    cached = tmp_path / "hub" / "models--Some-Org--Tiny-VL" / "snapshots" / "0123abcd"
    shutil.copytree(world["backbone"], cached, ignore=shutil.ignore_patterns("README.md"))
    cfg = json.loads((cached / "config.json").read_text())
    (cached / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "_name_or_path"}))
    done = export_model(world["ckpt"], tmp_path / "m", backbone=cached)
    assert done.base_model == "Some-Org/Tiny-VL" and done.license == "other"
    assert json.loads((done.path / MODULE_CONFIG).read_text())["backbone"] == str(cached.resolve())
    other = build_tiny_backbone("qwen2_vl", tmp_path / "other", seed=5)
    with pytest.raises(ExportError, match="fingerprint"):
        export_model(world["ckpt"], tmp_path / "m2", backbone=other)
    with pytest.raises(ExportError, match="fingerprint"):
        export_model(world["ckpt"], tmp_path / "m3", backbone=other, with_backbone=True)
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_model_kwargs_backbone_loads_a_folder_whose_backbone_moved(world, tmp_path):
    moved_bb = tmp_path / "bb"
    shutil.copytree(world["backbone"], moved_bb)
    done = export_model(world["ckpt"], tmp_path / "m", backbone=moved_bb)
    shutil.rmtree(moved_bb)
    with pytest.raises(FileNotFoundError, match="model_kwargs"):
        SentenceTransformer(str(done.path), trust_remote_code=True, device="cpu")
    model = SentenceTransformer(str(done.path), trust_remote_code=True, device="cpu",
                                model_kwargs={"backbone": str(world["backbone"]), "dtype": "float32"})
    np.testing.assert_allclose(model.encode(TEXTS), world["enc"].encode_text(TEXTS), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="does not take"):
        SentenceTransformer(str(done.path), trust_remote_code=True, device="cpu",
                            model_kwargs={"backbone": str(world["backbone"]), "low_cpu_mem_usage": True})


def test_a_lora_checkpoint_exports_and_loads(world, tmp_path):
    from slq.methods import from_pretrained

    enc = from_pretrained(world["backbone"], method="lora", lora={"r": 2, "seed": 0}, dtype="float32", device="cpu")
    enc.make_trainable()
    with torch.no_grad():  # LoRA's B starts at zero (no change): give the adapters something to carry
        g = torch.Generator().manual_seed(0)
        for n, p in enc.backbone.decoder.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ckpt = enc.save(tmp_path / "lora-ckpt")
    want = enc.encode_text(TEXTS)
    done = export_model(ckpt, tmp_path / "lora-model")
    assert LLM_WEIGHTS in done.files and done.method == "lora"
    assert (done.path / LLM_WEIGHTS).read_bytes() == (ckpt / LLM_WEIGHTS).read_bytes()
    again = from_pretrained(world["backbone"], done.path, dtype="float32", device="cpu")
    np.testing.assert_array_equal(again.encode_text(TEXTS), want)
    plain = SLQEncoder.from_pretrained(world["backbone"], num_queries=4, seed=1, dtype="float32", device="cpu")
    assert np.abs(plain.encode_text(TEXTS) - want).max() > 1e-3  # the adapters matter
    model = SentenceTransformer(str(done.path), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(model.encode(TEXTS), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(model.encode(images()), enc.encode_image(images()), atol=ATOL, rtol=0)


def test_the_module_saves_and_reloads(world, st_model, tmp_path):
    st_model.save(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "modules.json").read_text())[0]["type"] == MODULE_CLASS
    again = SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(again.encode(TEXTS), st_model.encode(TEXTS), atol=ATOL, rtol=0)
    assert again.prompts["query"] == "query: "


def test_slq_export_command(world, tmp_path):
    from typer.testing import CliRunner

    import cli

    out = tmp_path / "cli-model"
    runner = CliRunner()
    r = runner.invoke(cli.app, ["export", str(world["ckpt"]), str(out), "--metrics", str(world["metrics"]),
                                "--json"])
    assert r.exit_code == 0, r.output
    done = json.loads(r.stdout)
    assert done["path"] == str(out) and done["base_model"] == HUB_ID and "README.md" in done["files"]
    r = runner.invoke(cli.app, ["export", str(world["ckpt"]), str(out)])
    assert r.exit_code == 1 and "error:" in r.output and "--force" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli.app, ["export", str(world["ckpt"]), str(out), "--force", "--license", "mit",
                                "--base-model", "Org/Backbone"])
    assert r.exit_code == 0, r.output
    head = read_card_header(out / "README.md")
    assert head["license"] == "mit" and head["base_model"] == "Org/Backbone"

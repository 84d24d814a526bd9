"""The methods SLQ is compared with: one training step each on a tiny model, and what it changes."""

import numpy as np
import pytest
import torch

from slq.checkpoint import read_manifest
from slq.encoder import SLQEncoder
from slq.methods import SUMMARIZE_PROMPTS, check_method, from_pretrained
from slq.train import FitConfig, fit

STEP = FitConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=0, save_every=1000, seed=1)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("method", ["slq", "lora", "full"])
def test_one_training_step_changes_exactly_what_the_method_trains(tiny_dirs, color_pairs, method, tmp_path):
    enc = from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=0, method=method)
    model = enc.backbone.model
    before = _snapshot(model)
    q0 = enc.queries.weight.detach().clone() if enc.queries is not None else None
    res = fit(enc, color_pairs, STEP, progress=False)
    assert len(res.history) == 2 and np.isfinite(res.history[-1]["loss"])
    changed = _changed(before, model)
    vision = {n for n in changed if ".visual." in n or "vision" in n}
    assert not vision, f"{method} changed the vision tower: {sorted(vision)[:3]}"
    n_trainable = sum(p.numel() for p in enc.trainable_parameters())
    if method == "slq":
        assert not changed  # the backbone is frozen
        assert not torch.equal(q0, enc.queries.weight)
        assert n_trainable == 4 * enc.backbone.hidden_size
    elif method == "lora":
        assert not changed  # base weights untouched; only the injected LoRA layers move
        lora = [n for n, p in model.named_parameters() if "lora_" in n]
        assert lora and n_trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert any("lora_B" in n and p.detach().abs().sum() > 0 for n, p in model.named_parameters())
    else:
        llm = {n for n in changed if "language_model" in n}
        assert llm and llm == changed
        assert n_trainable == sum(p.numel() for p in enc.backbone.decoder.parameters())

    # The checkpoint records the method and reloads to the same embeddings.
    out = enc.save(tmp_path / method, log_temp=res.log_temp)
    assert read_manifest(out)["method"] == method
    again = from_pretrained(queries=out)  # the manifest's method picks the class
    assert again.method == method and again.pooling == enc.pooling and type(again) is type(enc)
    imgs = [p[0] for p in color_pairs[:3]]
    np.testing.assert_allclose(again.encode_image(imgs, progress=False), enc.encode_image(imgs, progress=False),
                               atol=1e-5)


def test_zero_shot_uses_the_summarize_prompt_and_last_token_and_trains_nothing(tiny_dirs, color_pairs):
    enc = from_pretrained(tiny_dirs["qwen2_vl"], method="zero_shot")
    assert enc.queries is None and enc.pooling == "last_token"
    assert enc.prompts.text == SUMMARIZE_PROMPTS["text"] and enc.prompts.add_generation_prompt
    chat = enc.prepare(texts=["a red circle"])
    text = enc.backbone.tokenizer.decode(chat["input_ids"][0])
    assert text.rstrip().endswith("assistant") and "Summarize the above sentence in one word:" in text
    emb = enc.encode_text(["a red circle", "a blue square"], progress=False)
    assert emb.shape == (2, enc.backbone.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(enc, color_pairs, STEP, progress=False)


def test_lora_with_query_pooling_trains_both(tiny_dirs, color_pairs):
    enc = from_pretrained(tiny_dirs["qwen2_vl"], num_queries=2, method="lora", pooling="queries")
    q0 = enc.queries.weight.detach().clone()
    fit(enc, color_pairs, STEP, progress=False)
    assert not torch.equal(q0, enc.queries.weight)
    names = [n for n, p in enc.backbone.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_bad_method_or_pooling_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'clip'"):
        check_method("clip", None)
    with pytest.raises(ValueError, match="slq' pools by its queries"):
        check_method("slq", "last_token")
    with pytest.raises(ValueError, match="unknown pooling"):
        check_method("lora", "cls")
    assert check_method("full", None) == "last_token" and check_method("lora", "queries") == "queries"


@pytest.fixture
def fifth_method():
    """A fifth method, registered in the test as a plugin would be (one class): last-token pooling,
    training only the LLM's norm weights; unregistered afterwards."""
    from slq.methods import MethodEncoder, register_method
    from slq.methods.base import _REGISTRY

    @register_method("norm_only")
    class NormOnly(MethodEncoder):
        poolings = ("last_token",)
        default_lr = 1e-3

        def _norms(self):
            return {n: p for n, p in self.backbone.decoder.named_parameters() if "norm" in n}

        def train_llm(self):
            for p in self._norms().values():
                p.requires_grad_(True)
            return list(self._norms().values())

        def llm_tensors(self):
            return {n: p.detach().float().cpu().contiguous() for n, p in self._norms().items()}

        def load_llm(self, ckpt_dir, resume):
            self.load_llm_strict(ckpt_dir, set(self._norms()), keep_trainable=resume)

    try:
        yield NormOnly
    finally:
        _REGISTRY.pop("norm_only", None)


def test_a_fifth_method_is_one_registered_class_and_loads_by_its_checkpoints_method(
        tiny_dirs, color_pairs, tmp_path, fifth_method):
    import json

    from slq.methods import METHODS, check_method, compared_methods, get_method
    from slq.methods import reference_method as reference

    assert get_method("norm_only") is fifth_method and list(METHODS)[-1] == "norm_only"
    assert check_method("norm_only", None) == "last_token" and "norm_only" in compared_methods()
    assert reference() == "slq"
    enc = from_pretrained(tiny_dirs["qwen2_vl"], method="norm_only")
    assert type(enc) is fifth_method and enc.queries is None and enc.prompts.text == SUMMARIZE_PROMPTS["text"]
    before = _snapshot(enc.backbone.model)
    res = fit(enc, color_pairs, STEP, progress=False)
    changed = _changed(before, enc.backbone.model)
    assert changed and all("norm" in n for n in changed)
    out = enc.save(tmp_path / "norm_only", log_temp=res.log_temp)
    manifest = json.loads((out / "slq.json").read_text())
    assert manifest["method"] == "norm_only" and manifest["pooling"] == "last_token_state_l2"

    again = from_pretrained(queries=out)  # the manifest's `method` picks the class
    assert type(again) is fifth_method and not any(p.requires_grad for p in again.backbone.decoder.parameters())
    texts = ["a red circle on the left", "a blue square"]
    np.testing.assert_allclose(again.encode_text(texts, progress=False), enc.encode_text(texts, progress=False),
                               atol=1e-5)
    assert type(fifth_method.from_pretrained(queries=out)) is fifth_method  # its own class loads it too
    with pytest.raises(ValueError, match="SLQEncoder.from_pretrained builds method 'slq', but checkpoint .* "
                                         "records method 'norm_only'.*slq.methods.from_pretrained"):
        SLQEncoder.from_pretrained(queries=out)  # the base class does not pick subclasses


def test_an_unknown_method_is_a_clear_error_and_a_manifest_without_one_is_slq(tiny_dirs, tmp_path):
    import json

    from slq.methods import METHODS, MethodError, get_method, register_method

    listed = "use one of slq, zero_shot, lora, full"
    with pytest.raises(MethodError, match=f"unknown method 'clip': {listed}"):
        get_method("clip")
    with pytest.raises(MethodError, match=f"unknown method 'clip': {listed}"):
        from_pretrained(tiny_dirs["qwen2_vl"], method="clip")
    enc = from_pretrained(tiny_dirs["qwen2_vl"], num_queries=2)
    assert type(enc) is get_method("slq") and enc.split_exact and enc.pooling == "queries"
    out = enc.save(tmp_path / "ckpt")
    manifest_path = out / "slq.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "method": "clip"}))
    with pytest.raises(MethodError, match=f"unknown method 'clip': {listed}"):
        from_pretrained(queries=out)
    del manifest["method"]  # written before the methods existed
    manifest_path.write_text(json.dumps(manifest))
    old = from_pretrained(queries=out)
    assert type(old) is get_method("slq") and old.pooling == "queries"
    np.testing.assert_array_equal(old.queries.weight.detach(), enc.queries.weight.detach())
    assert type(SLQEncoder.from_pretrained(queries=out)) is SLQEncoder  # the base class: SLQ's encoder
    with pytest.raises(RuntimeError, match="registered twice"):
        register_method("lora")(type("Other", (get_method("full"),), {}))
    with pytest.raises(TypeError, match="not a MethodEncoder"):
        register_method("plain")(object)
    assert list(METHODS) == ["slq", "zero_shot", "lora", "full"]


def _row(p1, k1, params, pooling="last_token", prompt="pipeline"):
    bench = {"world": {"t2i_R@1": p1, "t2i_R@5": p1, "t2i_R@10": p1, "i2t_R@1": p1},
             "world_knowledge": {"t2i_R@1": k1, "t2i_R@5": k1, "t2i_R@10": k1, "i2t_R@1": k1}}
    return {"budget": {"trainable_params": params, "pooling": pooling, "prompt": prompt, "steps": 10, "step_time_mean": 0.1,
                       "wall_time_s": 1.0, "peak_memory_gib": 0.5}, "benchmarks": bench}


def test_comparison_table_states_what_the_numbers_say(tmp_path):
    from slq.mlops.comparison import BEGIN, END, render, update_readme

    rows = {"slq": _row(0.4, 0.1, 1025, "queries"), "zero_shot": _row(0.005, 0.0, 0, prompt="summarize"),
            "lora": _row(0.5, 0.2, 9000), "full": _row(0.6, 0.05, 90000)}
    text = render(rows, ["world", "world_knowledge"])
    assert "| slq | 0.400 | 0.400 | 0.400 | 0.400 | - | - | 0.100 |" in text
    assert "best t2i R@1 is full (0.600)" in text and "best t2i R@1 is lora (0.200)" in text
    assert "SLQ does not beat lora (t2i R@1 0.100 vs 0.200)" in text
    assert "SLQ beats full (t2i R@1 0.100 vs 0.050)" in text
    assert "slq keeps 25% of its plain t2i R@1 on world_knowledge" in text
    assert "zero_shot is near chance on world" in text and "zero_shot keeps" not in text
    assert "| zero_shot | last_token | summarize | 0 |" in text and "| lora | last_token | pipeline | 9,000 |" in text

    # a second knowledge split (world_everyday on a real LM): read the same way, apart from the first
    for r, e in zip(rows.values(), (0.08, 0.0, 0.05, 0.3)):
        r["benchmarks"]["world_everyday"] = {"t2i_R@1": e}
    text2 = render(rows, ["world", "world_knowledge", "world_everyday"])
    assert "**world_everyday**: best t2i R@1 is full (0.300)" in text2
    assert "On world_everyday, SLQ beats lora (t2i R@1 0.080 vs 0.050)" in text2
    assert "slq keeps 20% of its plain t2i R@1 on world_everyday (0.080 / 0.400)" in text2
    assert "slq keeps 25% of its plain t2i R@1 on world_knowledge" in text2
    assert text2.count("zero_shot is near chance on world") == 1 and "zero_shot keeps" not in text2

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\nrest\n")
    assert update_readme(readme, text)
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith(f"{END}\nrest\n") and "old" not in new and text in new
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, text) and plain.read_text() == "no markers\n"


def test_the_table_says_when_budgets_were_timed_under_different_cpu_conditions():
    from slq.mlops.comparison import render

    rows = {"slq": _row(0.4, 0.1, 1025, "queries"), "lora": _row(0.5, 0.2, 9000), "full": _row(0.6, 0.05, 90000)}
    rows["slq"]["budget"].update(threads=2, side_by_side=1)
    for m in ("lora", "full"):
        rows[m]["budget"].update(threads=1, side_by_side=2)
    text = render(rows, ["world", "world_knowledge"])
    assert "| 0.50 (process_rss) | 2 |" in text and "| 0.50 (process_rss) | 1, 2 methods at once |" in text
    assert "different CPU conditions" in text
    for m in ("lora", "full"):
        rows[m]["budget"].update(threads=2, side_by_side=1)
    assert "different CPU conditions" not in render(rows, ["world", "world_knowledge"])


def test_benchmarks_embed_with_the_checkpoints_own_prompts(tiny_dirs, tmp_path):
    from slq.benchmarks.base import Corpus
    from slq.benchmarks.cache import CachedEmbedder

    enc = from_pretrained(tiny_dirs["qwen2_vl"], method="zero_shot")  # the summarize prompt
    texts = ["a red circle on the left", "a blue square"]
    cached = CachedEmbedder(enc, tmp_path, "h", batch_size=2).embed(Corpus("text", texts, {}, "d"))
    np.testing.assert_allclose(cached, enc.encode_text(texts, progress=False), atol=1e-6)
    assert enc.prompts.text == SUMMARIZE_PROMPTS["text"]  # unchanged afterwards


def test_cache_key_changes_with_the_encoders_prompts(tiny_dirs, tmp_path):
    from slq.benchmarks.base import Corpus
    from slq.benchmarks.cache import CachedEmbedder

    enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=2)
    corpus = Corpus("text", ["a red circle"], {}, "d")
    cache = CachedEmbedder(enc, tmp_path, "h", batch_size=2)
    a = cache.embed(corpus)
    enc.prompts = type(enc.prompts)(text="{text}\nDescribe the scene.", add_generation_prompt=True)
    b = cache.embed(corpus)  # same checkpoint hash and corpus, other prompts: not a cache hit
    assert cache.misses == 2 and not np.allclose(a, b)


def test_vectors_embedded_elsewhere_are_reused_only_for_the_same_items_and_prompts(tiny_dirs, tmp_path):
    from slq.benchmarks.base import Corpus
    from slq.benchmarks.cache import CachedEmbedder

    enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=2)
    texts = ["a red circle", "a blue square", "a green star"]
    vecs = enc.encode_text(texts, progress=False)
    cache = CachedEmbedder(enc, tmp_path, "h", batch_size=2)
    cache.prefill("text", texts[:2], vecs[:2] + 1.0, enc.prompts.to_dict())  # marked: +1 shows where it came from
    got = cache.embed(Corpus("text", texts[1::-1], {}, "d"))  # any order, any subset
    np.testing.assert_allclose(got, vecs[1::-1] + 1.0)
    assert cache.reused == 1
    np.testing.assert_allclose(cache.embed(Corpus("text", texts, {}, "d")), vecs, atol=1e-6)  # one is unknown
    other = cache.embed(Corpus("text", texts[:2], {"text": "{text}!"}, "d"))  # another prompt: embedded anew
    assert cache.reused == 1 and not np.allclose(other, vecs[:2] + 1.0)


def test_the_cache_tells_backbones_apart_when_the_checkpoint_is_empty(tiny_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from slq.benchmarks.base import Corpus
    from slq.benchmarks.cache import CachedEmbedder

    other = tmp_path / "retrained"  # same architecture and files, other weights (a re-pretrained backbone)
    shutil.copytree(tiny_dirs["qwen2_vl"], other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    corpus = Corpus("text", ["a red circle on the left"], {}, "d")
    a = CachedEmbedder(from_pretrained(tiny_dirs["qwen2_vl"], method="zero_shot"), tmp_path / "c", "h")
    b = CachedEmbedder(from_pretrained(other, method="zero_shot"), tmp_path / "c", "h")
    ea, eb = a.embed(corpus), b.embed(corpus)  # same (empty) checkpoint hash, same corpus
    assert b.misses == 1 and b.hits == 0 and not np.allclose(ea, eb)
    again = CachedEmbedder(from_pretrained(other, method="zero_shot"), tmp_path / "c", "h")
    np.testing.assert_array_equal(again.embed(corpus), eb)
    assert again.hits == 1


def test_trained_baselines_share_slqs_prompt_and_zero_shot_keeps_its_own(tiny_dirs, tmp_path):
    from slq.mlops.config import Config, ConfigError
    from slq.mlops.models import load_encoder, method_prompt

    cfg = Config()
    cfg.backbone.path, cfg.backbone.builtin = str(tiny_dirs["qwen2_vl"]), False
    cfg.prompts.text = "{text}\nDescribe the scene."
    assert [method_prompt(cfg, m) for m in ("slq", "zero_shot", "lora", "full")] == \
        ["pipeline", "summarize", "pipeline", "pipeline"]
    assert load_encoder(cfg, method="lora").prompts.text == "{text}\nDescribe the scene."
    assert load_encoder(cfg, method="zero_shot").prompts.text == SUMMARIZE_PROMPTS["text"]
    cfg.methods.prompts["lora"] = "summarize"
    assert load_encoder(cfg, method="lora").prompts.text == SUMMARIZE_PROMPTS["text"]
    cfg.methods.prompts["full"] = "mine"
    with pytest.raises((ValueError, ConfigError), match="methods.prompts.full"):
        method_prompt(cfg, "full")


def test_lora_init_is_seeded(tiny_dirs):
    def lora_a(seed):
        enc = from_pretrained(tiny_dirs["qwen2_vl"], method="lora", lora={"seed": seed})
        enc.make_trainable()
        return torch.cat([p.detach().flatten() for n, p in enc.backbone.model.named_parameters() if "lora_A" in n])

    torch.manual_seed(123)  # the global stream must not matter
    a = lora_a(0)
    torch.manual_seed(456)
    assert torch.equal(a, lora_a(0)) and not torch.equal(a, lora_a(1))


def test_compare_takes_slqs_scores_from_the_evaluate_stage_only_when_they_fit(tmp_path):
    import json

    from slq.checkpoint import checkpoint_hash, save_checkpoint
    from slq.mlops.config import Config
    from slq.mlops.comparison import scores_from_evaluate

    cfg = Config(root=str(tmp_path))
    cfg.evaluate.benchmarks = [{"name": "world", "split": cfg.evaluate.split}, {"name": "world_knowledge"},
                               {"name": "world_composed", "split": "val"}]
    ckpt = save_checkpoint(tmp_path / "ckpt", torch.zeros(2, 4), None, {"method": "slq"})
    scores = {"world": {"t2i_R@1": 0.4}, "world_knowledge": {"t2i_R@1": 0.2}, "world_composed": {"R@1": 0.1}}
    metrics = cfg.path(cfg.evaluate.metrics)
    assert scores_from_evaluate(cfg, ckpt, ["world"]) is None  # no evaluate metrics yet
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"checkpoint_hash": checkpoint_hash(ckpt), "benchmarks": scores}))
    assert scores_from_evaluate(cfg, ckpt, ["world", "world_knowledge"]) == {k: scores[k] for k in
                                                                            ("world", "world_knowledge")}
    # the comparison scores a benchmark with its evaluate entry's options (here: another split), so
    # the evaluate stage's number is the one; a benchmark the evaluate stage did not run is not there
    assert scores_from_evaluate(cfg, ckpt, ["world_composed"]) == {"world_composed": scores["world_composed"]}
    assert scores_from_evaluate(cfg, ckpt, ["world", "world_i2i"]) is None
    metrics.write_text(json.dumps({"checkpoint_hash": "0" * 16, "benchmarks": scores}))
    assert scores_from_evaluate(cfg, ckpt, ["world"]) is None  # another checkpoint's numbers


def test_backbone_note_names_what_the_lm_knows(tmp_path):
    """Under the table: the tiny backbone's taught facts, or for a real LM the everyday cues its
    own LM knows (the pretrain stage's knowledge probe) and that the world's facts were never taught."""
    import json

    from slq.mlops.config import Config
    from slq.mlops.comparison import backbone_note as _backbone_note

    cfg = Config(root=str(tmp_path))
    cfg.pretrain.knowledge = "reports/lm_knowledge.json"
    assert _backbone_note(cfg) == ""  # no pretrain stage ran
    path = cfg.path(cfg.pretrain.metrics)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fact_accuracy": 0.5, "fact_probe": {"n": 14}}))
    assert "completes 50% of the world's fact sentences correctly (14 probes" in _backbone_note(cfg)
    path.write_text(json.dumps({"fact_accuracy": 0.14, "fact_probe": {"n": 14},
                                "knowledge": {"cues": 62, "cues_known": 23}}))
    note = _backbone_note(cfg)
    assert "knows 23 of 62 everyday cues" in note and cfg.pretrain.knowledge in note and "14%" in note


def test_comparison_benchmarks_take_the_evaluate_entries_options(tmp_path):
    """Every method is scored as the evaluate stage scores SLQ: world_everyday with its `cues` (a
    path from the project folder), an entry's own split and label; a name with no entry runs on
    evaluate.split with its defaults; a benchmark the comparison cannot run is refused by name."""
    from slq.mlops.config import Config
    from slq.mlops.baselines import comparison_benchmarks

    cfg = Config(root=str(tmp_path))
    cfg.evaluate.benchmarks = [{"name": "world", "label": "world_val", "split": "val"},
                               {"name": "world_everyday", "split": "test", "cues": "reports/lm_knowledge.json"}]
    got = {label: (name, opts) for label, name, opts in
           comparison_benchmarks(cfg, ["world_val", "world_everyday", "world_knowledge"])}
    world = str(tmp_path / cfg.data.root)
    assert got["world_val"] == ("world", {"split": "val", "root": world})
    assert got["world_everyday"] == ("world_everyday", {"split": "test", "root": world,
                                                        "cues": str(tmp_path / "reports" / "lm_knowledge.json")})
    assert got["world_knowledge"] == ("world_knowledge", {"split": cfg.evaluate.split, "root": world})
    with pytest.raises(ValueError, match="methods.benchmarks: 'coco' is not one of"):
        comparison_benchmarks(cfg, ["coco"])


def test_benchmark_entries_are_keyed_by_label_and_a_label_twice_is_refused(tmp_path):
    """The one place `evaluate.benchmarks` labels are made: an entry's `label`, else its name; the
    same label twice names itself in the error (the evaluate, methods and compare stages share it)."""
    from slq.mlops.config import Config
    from slq.mlops.evaluation import benchmark_entries

    cfg = Config(root=str(tmp_path))
    cfg.evaluate.benchmarks = [{"name": "world", "label": "world_val", "split": "val"}, {"name": "world"}]
    got = benchmark_entries(cfg)
    assert list(got) == ["world_val", "world"] and got["world_val"][1]["split"] == "val"
    assert got["world"] == ("world", {"root": str(tmp_path / cfg.data.root)})
    cfg.evaluate.benchmarks.append({"name": "world_knowledge", "label": "world"})
    with pytest.raises(ValueError, match="evaluate.benchmarks: 'world' appears twice"):
        benchmark_entries(cfg)


def test_methods_workers_is_one_per_core_on_cpu_one_on_gpu_and_checked(monkeypatch, tmp_path):
    from slq.mlops.config import load_config
    from slq.mlops import baselines as methods

    cfg = load_config(None, {"backbone.device": "cpu"})  # the defaults: workers auto
    monkeypatch.setattr(methods, "cpu_count", lambda: 2)
    assert methods.resolve_workers(cfg, 3) == 2 and methods.resolve_workers(cfg, 1) == 1
    cfg.methods.workers = 8
    assert methods.resolve_workers(cfg, 3) == 3  # never more processes than methods
    cfg.methods.workers = "auto"
    cfg.backbone.device = "cuda:0"
    assert methods.resolve_workers(cfg, 3) == 1  # one at a time on a GPU
    for bad in (0, "two", True):
        cfg.methods.workers = bad
        with pytest.raises(ValueError, match="methods.workers"):
            methods.resolve_workers(cfg, 3)

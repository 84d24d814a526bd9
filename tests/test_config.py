"""One source of truth for configuration: the defaults are the paper's recipe, written once in the
library (slq.recipe.FitConfig, slq.prompts.Prompts); params.yaml says how the built-in miniature
differs, its backbone's own values in `builtin:` blocks; profiles are overlays (`extends:`)."""

import inspect
import sys
from pathlib import Path

import pytest
import yaml

from slq.mlops.config import ConfigError, load_config
from slq.prompts import Prompts
from slq.recipe import FitConfig

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Prompts()  # the reference recipe's prompts
BUILTIN_PROMPTS = {"text": "{text}\nDescribe the scene.", "image": "Describe the scene.", "multimodal": "{text}",
                   "add_generation_prompt": True, "system": None}

# The built-in default's effective recipe as it was when params.yaml was a full copy: the pipeline's
# trained weights depend on every value here, so they must not move.
DEFAULT_TRAIN = {"num_queries": 32, "init": "random", "steps": 600, "batch_size": 32, "lr": 0.1, "weight_decay": 0.0,
                 "warmup_steps": 10, "grad_clip": 1.0, "temperature": 0.07, "save_every": 100,
                 "save_every_minutes": 5.0, "seed": 0,
                 "split_forward": True, "max_text_tokens": 128, "num_workers": 0, "prefix_buckets": 1,
                 "compile_queries": False, "method": "slq", "pooling": None, "lora_r": 8, "lora_alpha": 16,
                 "out": "checkpoints/slq", "work_dir": "checkpoints/.work", "metrics": "metrics/train.json",
                 "history": "metrics/train_history.csv"}
DEFAULT_PRETRAIN = {"out": "models/tiny-qwen3-vl", "lm": "tiny", "lm_source": None,
                    "gguf": "models/SmolLM2-135M-Instruct.Q4_1.gguf", "knowledge": None,
                    "metrics": "metrics/pretrain.json", "history": "metrics/pretrain_history.csv",
                    "model_type": "qwen3_vl", "hidden_size": 128, "num_layers": 4, "vision_dim": 64, "vision_depth": 2,
                    "vocab_size": 1024, "image_pixels": 96, "n_scenes": 6000, "image_size": 64, "steps": 1800,
                    "batch_size": 40, "lr": 0.004, "vision_lr_scale": 0.0, "warmup_steps": 50, "weight_decay": 0.01,
                    "grad_clip": 1.0, "seed": 0, "mix": {"caption": 0.45, "qa_image": 0.25, "qa_text": 0.06,
                                                         "describe_text": 0.1, "knowledge_text": 0.08, "facts": 0.06},
                    "log_every": 25, "autocast": None, "attn_implementation": None}
DEFAULT_DATA = {"root": "data/world", "manifest": "manifest.jsonl", "builtin": True, "seed": 0, "n_train": 2000,
                "n_val": 200, "n_test": 1000, "captions_per_image": 2, "image_size": 64}
DEFAULT_BACKBONE = {"path": "models/tiny-qwen3-vl", "builtin": True, "dtype": "auto", "device": "auto",
                    "min_pixels": None, "max_pixels": None, "allow_mismatch": False}


def write(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_the_defaults_are_the_papers_recipe_in_one_class_each():
    t = FitConfig()
    assert (t.num_queries, t.lr, t.batch_size, t.warmup_steps, t.max_text_tokens, t.temperature) == (
        20, 5e-4, 32, 100, 128, 0.07)
    assert t.steps == 566_747 // 32  # one epoch of COCO Karpathy train + restval on one GPU
    assert Prompts().to_dict() == {"text": "{text}", "image": "", "multimodal": "{text}",
                                   "add_generation_prompt": True, "system": None}
    import slq
    import slq.backbones.base
    import slq.encoder
    import slq.train

    assert slq.train.FitConfig is slq.FitConfig is FitConfig  # `from slq.train import FitConfig` still works
    assert slq.backbones.base.Prompts is slq.Prompts is Prompts
    cfg = load_config(None)
    assert type(cfg.train) is FitConfig and type(cfg.prompts) is Prompts
    assert cfg.train == FitConfig() and cfg.prompts == REFERENCE
    for fn in (slq.encoder.SLQEncoder.from_pretrained, slq.encoder.SLQEncoder.fresh):
        assert inspect.signature(fn).parameters["num_queries"].default == FitConfig().num_queries == 20


def test_the_default_params_keep_todays_effective_values(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("params.yaml").to_dict()
    assert cfg["train"] == DEFAULT_TRAIN
    assert cfg["prompts"] == BUILTIN_PROMPTS
    assert cfg["pretrain"] == DEFAULT_PRETRAIN
    assert cfg["data"] == DEFAULT_DATA and cfg["backbone"] == DEFAULT_BACKBONE
    assert cfg["evaluate"]["modality_gap"] is True and cfg["embed"]["batch_size"] == 64
    assert [b["name"] for b in cfg["evaluate"]["benchmarks"]] == ["world", "world_composed", "world_knowledge"]
    raw = yaml.safe_load((REPO / "params.yaml").read_text())  # the built-in backbone's values are marked so
    assert raw["prompts"] == {"builtin": {"text": BUILTIN_PROMPTS["text"], "image": BUILTIN_PROMPTS["image"]}}
    assert raw["train"]["builtin"] == {"num_queries": 32, "lr": 0.1}


def test_a_real_backbone_in_params_yaml_gets_the_reference_prompts_and_recipe(tmp_path):
    """The user who points params.yaml at a real checkpoint trains it with the reference prompts,
    N_q 20 and lr 5e-4, not the built-in backbone's own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_layout import build_real_layout

    real = build_real_layout("qwen3_vl", tmp_path / "models" / "Qwen3-VL-4B-Instruct")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["backbone"].update(path=str(real), builtin=False)
    cfg = load_config(write(tmp_path / "params.yaml", raw))
    assert cfg.prompts == REFERENCE
    assert (cfg.train.num_queries, cfg.train.lr) == (20, 5e-4)
    assert cfg.train.steps == 600 and cfg.data.root == "data/world"  # the rest of the file still holds
    # changing only backbone.path (builtin left true): not the built-in backbone either
    raw["backbone"] = {"path": str(real)}
    cfg = load_config(write(tmp_path / "only_path.yaml", raw))
    assert not cfg.uses_builtin_backbone() and cfg.prompts == REFERENCE and cfg.train.num_queries == 20
    # the same through --set
    cfg = load_config(REPO / "params.yaml", [f"backbone.path={real}", "backbone.builtin=false"])
    assert cfg.prompts == REFERENCE and cfg.train.lr == 5e-4


def test_own_values_and_overrides_win_over_the_builtin_blocks(tmp_path):
    cfg = load_config(REPO / "params.yaml", {"train.lr": 0.05, "train.num_queries": 4, "prompts.image": "X"})
    assert (cfg.train.lr, cfg.train.num_queries) == (0.05, 4)
    assert (cfg.prompts.image, cfg.prompts.text) == ("X", BUILTIN_PROMPTS["text"])
    cfg = load_config(REPO / "params.yaml", ["train.builtin.lr=0.2"])
    assert cfg.train.lr == 0.2
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] in `train.builtin`"):
        load_config(REPO / "params.yaml", {"train.builtin.lrr": 0.2, "backbone.builtin": False})  # checked unused
    with pytest.raises(ConfigError, match="pretrain.builtin"):
        load_config(write(tmp_path / "p.yaml", {"pretrain": {"builtin": {"steps": 3}}}))


def test_an_overlay_extends_its_base(tmp_path):
    base = write(tmp_path / "params.yaml", {
        "pretrain": {"steps": 30, "mix": {"caption": 0.5, "facts": 0.5}},
        "corpus": {"storage": {"endpoint": "http://minio:9000"}},
        "train": {"steps": 7, "builtin": {"num_queries": 16, "lr": 0.3}},
        "evaluate": {"benchmarks": [{"name": "world"}, {"name": "world_knowledge"}]}})
    over = write(tmp_path / "pipes" / "x" / "params.yaml", {
        "extends": "../../params.yaml", "root": ".",
        "pretrain": {"lr": 0.01, "mix": {"caption": 1.0}},
        "corpus": {"storage": {"region": "eu-west-1"}},
        "train": {"out": "ck/x", "builtin": {"lr": 0.2}},
        "evaluate": {"benchmarks": [{"name": "world"}]}})
    cfg = load_config(over)
    assert cfg.root == "."  # the overlay's root, not its base's folder
    assert (cfg.pretrain.steps, cfg.pretrain.lr) == (30, 0.01)
    assert cfg.pretrain.mix == {"caption": 1.0}  # a dict setting is replaced whole, not merged
    assert (cfg.corpus.storage.endpoint, cfg.corpus.storage.region) == ("http://minio:9000", "eu-west-1")
    assert (cfg.train.steps, cfg.train.out, cfg.train.num_queries, cfg.train.lr) == (7, "ck/x", 16, 0.2)
    assert cfg.evaluate.benchmarks == [{"name": "world"}]
    assert load_config(base).root == str(tmp_path)
    write(tmp_path / "loop.yaml", {"extends": "loop.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    write(tmp_path / "orphan.yaml", {"extends": "nowhere.yaml"})
    with pytest.raises(ConfigError, match=r"not found: .*nowhere.yaml \(named by `extends`"):
        load_config(tmp_path / "orphan.yaml")


def test_the_profiles_are_overlays_of_the_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    smol = yaml.safe_load((REPO / "pipelines/smollm2/params.yaml").read_text())
    assert smol["extends"] == "../../params.yaml" and "prompts" not in smol and "data" not in smol
    cfg = load_config("pipelines/smollm2/params.yaml")
    assert cfg.uses_builtin_backbone() and cfg.prompts.to_dict() == BUILTIN_PROMPTS
    assert (cfg.train.num_queries, cfg.train.lr, cfg.train.steps) == (32, 0.1, 150)
    paper = yaml.safe_load((REPO / "params/paper-qwen3-vl-4b.yaml").read_text())
    assert "extends" not in paper and "num_queries" not in paper["train"] and "lr" not in paper["train"]
    cfg = load_config("params/paper-qwen3-vl-4b.yaml")
    assert cfg.prompts == REFERENCE and (cfg.train.num_queries, cfg.train.lr) == (20, 5e-4)

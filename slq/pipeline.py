"""The pipeline's stages in data order, and the one function every entry point calls.

    data -> validate -> pretrain -> train -> embed -> index -> evaluate -> methods -> compare -> register

(pretrain makes the built-in backbone; methods and compare put SLQ beside zero-shot, LoRA and
full fine-tuning.)

dvc.yaml (`python cli.py stage <name>`), the Prefect flow (flows/pipeline.py) and the CLI
(`slq run`, `slq stage <name>`) all go through `run_stage`; nothing is written twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from slq.config import Config

STAGES = ("validate", "pretrain", "train", "embed", "index", "evaluate", "methods", "compare", "register")


def ensure_data(cfg: Config, regenerate: bool = False) -> Path:
    """The dataset folder; the built-in synthetic world is generated there when missing."""
    root = cfg.path(cfg.data.root)
    if (root / cfg.data.manifest).exists() and not regenerate:
        return root
    if not cfg.data.builtin:
        raise FileNotFoundError(
            f"dataset manifest {root / cfg.data.manifest} not found: point data.root in params.yaml at your "
            "data (or set data.builtin: true to generate the synthetic world)"
        )
    from slq.data.world import generate_world

    return generate_world(cfg.data, root)


def run_stage(name: str, cfg: Config, method: str | None = None) -> dict:
    """Run one stage by name; returns its summary (metrics, paths). `method`: the methods stage's
    one method (dvc.yaml runs one per stage); default every method in methods.compare."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if method is not None and name != "methods":
        raise ValueError(f"--method applies to the methods stage only, not {name!r}")
    if name == "validate":
        ensure_data(cfg)
    if name == "register":
        return register(cfg)
    import importlib

    module = importlib.import_module(f"slq.stages.{name}")
    return module.run(cfg, method) if name == "methods" else module.run(cfg)


def run_pipeline(cfg: Config, start: str | None = None, stop: str | None = None, on_stage=None) -> dict:
    """Run the stages from `start` to `stop` (inclusive) in order; returns {stage: summary}."""
    names = list(STAGES)
    lo = names.index(start) if start else 0
    hi = names.index(stop) + 1 if stop else len(names)
    results = {}
    for name in names[lo:hi]:
        results[name] = run_stage(name, cfg)
        if on_stage is not None:
            on_stage(name, results[name])
    return results


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def register(cfg: Config) -> dict:
    """Gather every stage's outputs into one MLflow run, register the model, gate promotion."""
    from slq.stages import register as reg
    from slq.stages.train import data_hash

    evaluation = _read_json(cfg.path(cfg.evaluate.metrics))
    if not evaluation:
        raise FileNotFoundError(f"{cfg.evaluate.metrics} not found: run the evaluate stage first")
    training = _read_json(cfg.path(cfg.train.metrics))
    index = _read_json(cfg.path(cfg.index.out))
    # Benchmark numbers under the names the methods' runs use ("world.t2i_R@1"), so the runs compare.
    scores = {f"{bench}.{k}": v for bench, ms in (evaluation.get("benchmarks") or {}).items()
              if isinstance(ms, dict) for k, v in ms.items()}
    gap = {f"modality_gap.{k}": v for k, v in (evaluation.get("modality_gap") or {}).items()}
    flat = {k: v for k, v in evaluation.items() if not isinstance(v, (dict, list))}
    metrics = {**{f"train.{k}": v for k, v in training.items()}, **flat, **scores, **gap}
    tags = {"data_hash": data_hash(cfg), "checkpoint_hash_eval": evaluation.get("checkpoint_hash", "")}
    for table, info in index.items():
        if isinstance(info, dict) and "version" in info:
            tags[f"lancedb.{table}.version"] = info["version"]
    artifacts = {
        name: cfg.path(p)
        for name, p in [("validate", cfg.validate.report), ("evaluate", cfg.evaluate.metrics),
                        ("plots", cfg.evaluate.plots), ("train", cfg.train.metrics),
                        ("train_history", cfg.train.history), ("index", cfg.index.out)]
        if cfg.path(p).exists()
    }
    return reg.run(cfg, metrics=metrics, artifacts=artifacts, tags=tags, checkpoint_dir=cfg.path(cfg.train.out),
                   history=cfg.path(cfg.train.history))

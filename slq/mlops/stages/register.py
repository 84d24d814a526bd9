"""Register stage: gather every stage's outputs into one MLflow run, register the model, gate the
promotion (slq.mlops.tracking.register_model)."""

from __future__ import annotations

import json
from pathlib import Path

from slq.mlops import tracking
from slq.mlops.config import Config
from slq.mlops.datasets import data_hash


def run(cfg: Config) -> dict:
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
    return tracking.register_model(cfg, metrics=metrics, artifacts=artifacts, tags=tags,
                                   checkpoint_dir=cfg.path(cfg.train.out), history=cfg.path(cfg.train.history))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}

"""Register stage: gather every stage's outputs into one MLflow run, register the model, gate the
promotion (slq.mlops.tracking.register_model).

Every record it reads (metrics/eval.json, metrics/train.json, index.json) must describe the
checkpoint it registers (slq.mlops.records): another checkpoint's numbers are refused, naming both
hashes, so a registered version never carries numbers that are not its own."""

from __future__ import annotations

from slq.mlops import tracking
from slq.mlops.config import Config
from slq.mlops.datasets import data_hash
from slq.mlops.records import StaleRecordError, evaluation_key, read_bound


def run(cfg: Config) -> dict:
    ckpt = cfg.path(cfg.train.out)
    evaluation = read_bound(cfg.path(cfg.evaluate.metrics), ckpt, "evaluate")
    training = read_bound(cfg.path(cfg.train.metrics), ckpt, "train")
    index = read_bound(cfg.path(cfg.index.out), ckpt, "index")
    data = data_hash(cfg)
    key = evaluation_key(cfg, data)
    if evaluation.get("evaluation_key") != key:
        raise StaleRecordError(f"{cfg.evaluate.metrics} was measured on another evaluation (key "
                               f"{evaluation.get('evaluation_key')}; the data, split, ks and benchmarks configured now "
                               f"give {key}): rerun the evaluate stage (dvc repro evaluate)")
    # Benchmark numbers under the names the methods' runs use ("world.t2i_R@1"), so the runs compare.
    scores = {f"{bench}.{k}": v for bench, ms in (evaluation.get("benchmarks") or {}).items()
              if isinstance(ms, dict) for k, v in ms.items()}
    gap = {f"modality_gap.{k}": v for k, v in (evaluation.get("modality_gap") or {}).items()}
    flat = {k: v for k, v in evaluation.items() if not isinstance(v, (dict, list))}
    metrics = {**{f"train.{k}": v for k, v in training.items()}, **flat, **scores, **gap}
    tags = {"data_hash": data, "checkpoint_hash_eval": evaluation["checkpoint_hash"],
            "evaluation_key": key}
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
                                   checkpoint_dir=ckpt, history=cfg.path(cfg.train.history))

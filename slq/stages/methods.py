"""Methods stage: train and evaluate what SLQ is compared with (zero_shot, lora, full).

Each method gets `train`'s data, steps and batch size (its own learning rate), the same
benchmarks as SLQ's comparison rows (`methods.benchmarks`, default the world's plain and
knowledge-aware test sets) and the same budget metrics; each is logged to MLflow as its own run
(tag `method`). dvc.yaml runs one method per stage (`methods@lora`); `slq stage methods` runs all.
"""

from __future__ import annotations

import json
from pathlib import Path

from slq.config import Config
from slq.io import write_json_atomic

# evaluate.benchmarks options for the world benchmarks the comparison uses
WORLD_BENCHMARKS = ("world", "world_knowledge", "world_i2i", "world_composed")


def run(cfg: Config, method: str | None = None) -> dict:
    """Run one method (or every one in methods.compare); returns {method: metrics}."""
    names = [method] if method else list(cfg.methods.compare)
    return {m: run_method(cfg, m) for m in names}


def run_method(cfg: Config, method: str) -> dict:
    from slq.methods import METHODS
    from slq.stages.train import train_method

    mc = cfg.methods
    if method not in METHODS or method == "slq":
        raise ValueError(f"methods: unknown comparison method {method!r}; use one of "
                         f"{', '.join(m for m in METHODS if m != 'slq')} (slq itself is the train stage)")
    out = cfg.path(mc.out) / method
    mdir = cfg.path(mc.metrics)
    lr = mc.lr.get(method)
    lr = cfg.train.lr if lr is None else float(lr)
    budget = train_method(cfg, method, out, lr=lr, metrics_path=mdir / f"{method}.train.json")
    bench = evaluate_checkpoint(cfg, out, mc.benchmarks)
    metrics = {"method": method, "budget": budget, "benchmarks": bench}
    write_json_atomic(mdir / f"{method}.json", metrics)
    (mdir / f"{method}.train.json").unlink(missing_ok=True)
    metrics["mlflow_run_id"] = log_run(cfg, method, metrics, out)
    write_json_atomic(mdir / f"{method}.json", metrics)
    return metrics


def evaluate_checkpoint(cfg: Config, ckpt: Path, names) -> dict:
    """{benchmark: metrics} for a checkpoint of any method, through the embedding cache."""
    from slq.benchmarks import get_benchmark
    from slq.benchmarks.cache import CachedEmbedder
    from slq.checkpoint import checkpoint_hash
    from slq.stages.train import load_encoder

    enc = load_encoder(cfg, queries=ckpt)
    embedder = CachedEmbedder(enc, cfg.path(cfg.evaluate.cache_dir), checkpoint_hash(ckpt),
                              batch_size=cfg.embed.batch_size)
    out = {}
    for name in names:
        if name not in WORLD_BENCHMARKS:
            raise ValueError(f"methods.benchmarks: {name!r} is not one of {', '.join(WORLD_BENCHMARKS)}")
        bench = get_benchmark(name)(root=str(cfg.path(cfg.data.root)), split=cfg.evaluate.split)
        out[name] = bench.evaluate(embedder, ks=tuple(cfg.evaluate.ks)).metrics
    return out


def log_run(cfg: Config, method: str, metrics: dict, ckpt: Path) -> str | None:
    """One MLflow run per method (same experiment as the pipeline's run); returns its id."""
    import mlflow

    from slq.stages.register import _client, _number, flatten, git_commit, metric_key

    _client(cfg)
    nums = {}
    for k, v in metrics["budget"].items():
        if (n := _number(v)) is not None and not isinstance(v, bool):
            nums[f"budget.{k}"] = n
    for bench, ms in metrics["benchmarks"].items():
        for k, v in ms.items():
            if (n := _number(v)) is not None:
                nums[f"{bench}.{k}"] = n
    params = flatten({"train": {k: v for k, v in vars(cfg.train).items()}, "method": method,
                      "lr": metrics["budget"].get("lr"), "backbone": cfg.backbone.path})
    with mlflow.start_run(run_name=f"method-{method}", tags={"method": method, "git_commit": git_commit(cfg.root),
                                                             "stage": "methods"}) as run:
        mlflow.log_params({k: v[:500] for k, v in params.items()})
        mlflow.log_metrics({metric_key(k): v for k, v in nums.items()})
        mlflow.log_text(json.dumps(metrics, indent=2, default=str), "metrics.json")
        mlflow.log_artifact(str(ckpt / "slq.json"), "checkpoint")
        return run.info.run_id

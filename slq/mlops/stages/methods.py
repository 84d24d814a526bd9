"""Methods stage: train and evaluate what SLQ is compared with (zero_shot, lora, full), each with
`train`'s budget, side by side on CPU cores (slq.mlops.baselines); `slq stage methods --method lora` runs one.

A method that fails leaves its outputs (its checkpoint folder, its metrics) as they were, so its
metrics never describe a checkpoint they were not measured on; the methods that finished keep theirs."""

from __future__ import annotations

from pathlib import Path

from slq.io import Snapshot, restored_on_failure
from slq.mlops.baselines import check_method_name, resolve_workers, run_method, run_parallel
from slq.mlops.config import Config


def method_outputs(cfg: Config, method: str) -> list[Path]:
    """What one method writes: its checkpoint folder, its metrics (and the training metrics kept
    there until it is scored)."""
    mc = cfg.methods
    return [cfg.path(mc.out) / method, cfg.path(mc.metrics) / f"{method}.json",
            cfg.path(mc.metrics) / f"{method}.train.json"]


def run(cfg: Config, method: str | None = None) -> dict:
    """Run one method (or every one in methods.compare); returns {method: metrics}."""
    names = [method] if method else list(cfg.methods.compare)
    for m in names:
        check_method_name(m)
    from slq.mlops import tracking

    workers = resolve_workers(cfg, len(names))
    if workers <= 1:
        results = {}
        for m in names:
            with restored_on_failure(method_outputs(cfg, m)):
                results[m] = run_method(cfg, m)
        return results
    kept = Snapshot([p for m in names for p in method_outputs(cfg, m)])
    try:
        with tracking.children_under_active_run():  # each method's MLflow run nests under this stage's
            results = run_parallel(cfg, names, workers)
    except BaseException:
        # a method that finished wrote its metrics last; every other one's outputs go back
        kept.restore([p for m in names if not kept.replaced(method_outputs(cfg, m)[1])
                      for p in method_outputs(cfg, m)])
        raise
    finally:
        kept.discard()
    return results



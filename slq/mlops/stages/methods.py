"""Methods stage: train and evaluate what SLQ is compared with (zero_shot, lora, full), each with
`train`'s budget, side by side on CPU cores (slq.mlops.baselines); `slq stage methods --method lora` runs one."""

from __future__ import annotations

from slq.mlops.baselines import check_method_name, resolve_workers, run_method, run_parallel
from slq.mlops.config import Config


def run(cfg: Config, method: str | None = None) -> dict:
    """Run one method (or every one in methods.compare); returns {method: metrics}."""
    names = [method] if method else list(cfg.methods.compare)
    for m in names:
        check_method_name(m)
    from slq.mlops import tracking

    workers = resolve_workers(cfg, len(names))
    if workers <= 1:
        return {m: run_method(cfg, m) for m in names}
    with tracking.children_under_active_run():  # each method's MLflow run nests under this stage's
        return run_parallel(cfg, names, workers)



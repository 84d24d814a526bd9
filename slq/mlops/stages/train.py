"""Train stage: fit the shared latent queries on the training split; write the checkpoint folder.

The folder at `train.out` is a DVC output. Periodic checkpoints go to a work folder keyed by
the run's fingerprint (config, data, backbone), so a killed run resumes where it stopped, and a
run with other settings never resumes from it.
"""

from __future__ import annotations

from slq.mlops.config import Config
from slq.mlops.datasets import split_rows
from slq.mlops.models import backbone_missing
from slq.mlops.training import train_method


def precheck(cfg: Config) -> None:
    """What fails at once, before anything slow (MLflow, the model) starts. Under torchrun the
    pipeline runs it on every rank through `slq.distributed.check_on_every_rank`, so every rank says why."""
    split_rows(cfg, "train")
    backbone_missing(cfg)


def run(cfg: Config) -> dict:
    """Train `train.method` (default slq) into `train.out`."""
    from slq.mlops import tracking

    t = cfg.train
    curve = tracking.curve_logger(cfg) if cfg.register.track_stages else None  # live loss curve in MLflow
    try:
        return train_method(cfg, t.method, cfg.path(t.out), lr=t.lr, metrics_path=cfg.path(t.metrics),
                            history_path=cfg.path(t.history), on_step=curve)
    finally:
        if curve is not None:
            curve.close()

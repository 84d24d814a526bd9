"""The one gateway from the MLOps layer into the built-in miniature (`slq.miniature`).

The pipeline uses the miniature only when the built-in default is configured: `data.builtin`
(generate the synthetic world when the data folder is missing) and `backbone.builtin` with
`backbone.path` equal to `pretrain.out` (pretrain the tiny backbone). Nothing else in the library
or the MLOps layer imports `slq.miniature`; import-linter holds that.
"""

from __future__ import annotations

from pathlib import Path

from slq.io import write_atomic_dir, write_csv_atomic, write_json_atomic
from slq.mlops.config import Config

SKIPPED = "SKIPPED.txt"

# columns of the pretraining history CSV (a DVC plot)
HISTORY_FIELDS = ["step", "loss", "lr", "grad_norm", "step_time"]


def is_builtin(cfg: Config) -> bool:
    """Whether the configured backbone is the built-in one (made by the pretrain stage)."""
    return cfg.uses_builtin_backbone()


def build_backbone(cfg: Config) -> dict:
    """Pretrain the built-in backbone into `pretrain.out`; with your own backbone nothing is
    trained: the folder gets a note saying so, so `dvc repro` still has its output."""
    p = cfg.pretrain
    if not is_builtin(cfg):
        note = (f"Not pretrained: backbone.path is {cfg.backbone.path} (builtin: {cfg.backbone.builtin}), "
                f"not the built-in {p.out}.\n")
        write_atomic_dir(cfg.path(p.out), lambda tmp: (tmp / SKIPPED).write_text(note))
        metrics = {"skipped": True, "reason": note.strip()}
        write_json_atomic(cfg.path(p.metrics), metrics)
        write_csv_atomic(cfg.path(p.history), [], HISTORY_FIELDS)
        return metrics
    from slq.miniature.build import pretrain_backbone

    return pretrain_backbone(cfg)


def generate_world(cfg: Config, root: Path) -> Path:
    """Write the synthetic world into `root` (byte-identical for the same `data` settings)."""
    from slq.miniature.world import generate_world as generate

    return generate(cfg.data, root)

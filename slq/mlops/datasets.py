"""The configured dataset: the folder (the built-in world is generated there when missing), its rows
by split, and the content hash that pins them."""

from __future__ import annotations

from pathlib import Path

from slq.io import file_sha256
from slq.mlops.config import Config


def split_rows(cfg: Config, split: str) -> list[dict]:
    from slq.data import load_manifest

    rows = [r for r in load_manifest(cfg.path(cfg.data.root), cfg.data.manifest) if r["split"] == split]
    if not rows:
        raise ValueError(f"no rows with split {split!r} in {cfg.data.root}/{cfg.data.manifest}")
    return rows


def data_hash(cfg: Config) -> str:
    return file_sha256(cfg.path(cfg.data.root) / cfg.data.manifest)[:16]


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
    from slq.mlops import builtin

    return builtin.generate_world(cfg, root)

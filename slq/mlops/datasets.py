"""The configured dataset: its rows by split and the content hash that pins them."""

from __future__ import annotations

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

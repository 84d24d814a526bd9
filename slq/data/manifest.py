"""The manifest format: one JSON object per line, one row per (image, caption) pair.

Each row has `image` (a path relative to the data root), `caption`, `split` (train/val/test) and
`image_id`; readers and the validate stage work from this format alone.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_manifest(root: Path, manifest: str = "manifest.jsonl") -> list[dict]:
    """Read the manifest rows; a missing file or a bad line is an error naming the file (and line)."""
    path = Path(root) / manifest
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (generate the world or fix data.root/data.manifest)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def image_path(root: Path, row: dict) -> Path:
    """The image file of a manifest row (its `image` field is relative to the world root)."""
    return Path(root) / row["image"]

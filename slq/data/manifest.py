"""The manifest format: one JSON object per line, one row per (image, caption) pair.

Each row has `image` (a path relative to the data root), `caption`, `split` (train/val/test) and
`image_id`; readers and the validate stage work from this format alone.
"""

from __future__ import annotations

import json
from pathlib import Path


class ManifestError(ValueError):
    """The manifest cannot be read as one (another format, a bad line): the user's to fix."""


IMPORT_HINT = ("slq reads a JSONL manifest (one JSON object per line: image, caption, split, image_id); "
               "convert your data with `slq data import SOURCE --out FOLDER` (imagefolder, csv, parquet, "
               "webdataset or hf-disk)")

# leading bytes of the formats people hand over instead of a manifest
_MAGIC = ((b"PAR1", "Parquet"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip file"),
          (b"ARROW1", "Arrow"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"))


def sniff_format(path: Path) -> str | None:
    """What `path` holds when it is plainly not JSONL (Parquet, CSV, a tar, ...), else None."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf")  # a byte order mark is fine (utf-8-sig)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (WebDataset shards?)"
    first = head.lstrip()[:1]
    if first and first not in (b"{", b"["):
        line = head.split(b"\n", 1)[0]
        return "CSV" if b"," in line or b"\t" in line else "not JSON lines"
    return None


def load_manifest(root: Path, manifest: str = "manifest.jsonl") -> list[dict]:
    """Read the manifest rows; a missing file, a file of another format or a bad line is an error
    naming the file (and line), and for another format how to import it."""
    path = Path(root) / manifest
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (generate the world or fix data.root/data.manifest)")
    other = sniff_format(path)
    if other is not None:
        raise ManifestError(f"{path} is {other}, not a JSONL manifest: {IMPORT_HINT}")
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        except UnicodeDecodeError:
            raise ManifestError(f"{path} is not UTF-8 text, so not a JSONL manifest: {IMPORT_HINT}") from None
    return rows


def image_path(root: Path, row: dict) -> Path:
    """The image file of a manifest row (its `image` field is relative to the world root)."""
    return Path(root) / row["image"]

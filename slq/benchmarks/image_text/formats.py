"""Annotation files -> `Entry` lists; each reader reports malformed records to `Problems`.

- Karpathy: `dataset_coco.json` / `dataset_flickr30k.json`, every split in one file; the entries
  whose `split` is asked for are used (restval/train/val are skipped).
- CLIP_benchmark: `coco_{split}_karpathy.json` (COCO caption format: `images` with `id`,
  `file_name`, and `annotations` with `image_id`, `caption`) / `flickr30k_{split}_karpathy.txt`
  (a header line, then `image.jpg,caption` lines).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from slq.benchmarks.base import DataError
from slq.benchmarks.image_text.pairs import Entry, Problems


def read_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_karpathy(path: Path, splits: set[str], problems: Problems) -> tuple[list[Entry], dict]:
    """Entries of `splits` from a Karpathy `dataset_*.json`; the image id is its relative path."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected {{'images': [...]}} (Karpathy split format)")
    entries, other = [], {}
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im or not isinstance(im.get("sentences"), list):
            problems.add("malformed image entries", f"#{n}")
            continue
        split = im.get("split")
        if split not in splits:
            other[str(split)] = other.get(str(split), 0) + 1
            continue
        rel = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        caps = [s.get("raw") if isinstance(s, dict) else None for s in im["sentences"]]
        entries.append(Entry(rel, rel, caps))
    return entries, {"skipped_splits": other}


def read_coco_captions(path: Path, problems: Problems) -> tuple[list[Entry], dict]:
    """Entries from a COCO caption-format file (CLIP_benchmark's `coco_{split}_karpathy.json`)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: expected {{'images': [...], 'annotations': [...]}} (COCO caption format)")
    by_id: dict[str, Entry] = {}
    entries = []
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            problems.add("malformed image entries", f"#{n}")
            continue
        e = Entry(str(im["id"]), im["file_name"], [])
        entries.append(e)
        by_id.setdefault(e.key, e)  # a duplicate id is reported by `assemble`; captions go to the first
    for n, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            problems.add("malformed annotations", f"#{n}")
        elif str(a["image_id"]) not in by_id:
            problems.add("captions of unknown image ids", f"annotation #{n} (image_id {a['image_id']})")
        else:
            by_id[str(a["image_id"])].captions.append(a["caption"])
    return entries, {}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_flickr_txt(path: Path, problems: Problems) -> tuple[list[Entry], dict]:
    """Entries from CLIP_benchmark's `flickr30k_{split}_karpathy.txt` (`image,caption` lines).

    The first line is a header unless its first field names an image. An image's lines need not be
    adjacent; its captions keep file order. Image names hold no comma, captions may.
    """
    entries: dict[str, Entry] = OrderedDict()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            name, sep, caption = line.partition(",")
            if n == 1 and not name.strip().lower().endswith(IMAGE_SUFFIXES):
                continue  # header
            if not sep or not name.strip():
                problems.add("malformed lines", f"line {n}")
                continue
            name = name.strip()
            entries.setdefault(name, Entry(name, name, [])).captions.append(caption)
    return list(entries.values()), {}

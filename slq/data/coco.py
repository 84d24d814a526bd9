"""COCO captions as a training manifest: Karpathy train + restval to train on, val and test held out.

The paper's recipe trains one epoch over COCO captions, one caption per row. Its reference code
took COCO 2017 train, which holds most of the Karpathy 5K test images that COCO retrieval is
scored on; here training rows come from Karpathy `train` + `restval` only (113,287 images,
566,747 captions), and the Karpathy `val` / `test` images are written as the `val` / `test` splits,
so the validate stage can prove none of them is trained on.

    build_coco_manifest("/data/coco/dataset_coco.json", "/data/coco", "data/coco")

writes `data/coco/manifest.jsonl`, one row per caption:
`{"id": "391895-c0", "image_id": "391895", "image": ..., "caption": ..., "split": "test"}`
(`image_id` is the COCO id, the same in COCO 2014 and 2017), and `data/coco/coco.json` (source
files, their hashes, counts). Image paths: relative to the manifest's folder when the images lie
under it, else absolute (`/data/coco/val2014/COCO_val2014_000000391895.jpg`); the pipeline opens
`data.root / image`, which is the image either way.

`coco_train=captions_train2017.json` builds what the reference code trained on instead (train rows
from COCO 2017 train, images `train2017/<file_name>`): the validate stage then fails on the leak.
It exists to show the leak, not to train on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slq.io import file_sha256, write_json_atomic, write_text_atomic

VERSION = 1
SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # Karpathy -> manifest
KARPATHY_HELP = ("Karpathy's COCO split file, dataset_coco.json (in caption_datasets.zip, "
                 "cs.stanford.edu/people/karpathy/deepimagesent/)")
IMAGES_HELP = ("Put COCO 2014 train2014/ and val2014/ (cocodataset.org/#download) in one folder and pass it as "
               "--images; the Karpathy file names each image as <filepath>/<filename> under it")
N_EXAMPLES = 3


class CocoError(ValueError):
    """The input files are missing, malformed or do not match the image folder; says what to do."""


def build_coco_manifest(karpathy: str | Path, images: str | Path, out: str | Path, *,
                        manifest: str = "manifest.jsonl", coco_train: str | Path | None = None,
                        check: int = 20, progress: bool = True) -> dict:
    """Write `out/manifest` (+ `out/coco.json`) from the Karpathy split file; returns the summary.

    `check` images, spread over the list, must exist (0: skip); the validate stage checks them all.
    """
    karpathy, images, out = Path(karpathy), Path(os.path.abspath(images)), Path(os.path.abspath(out))
    if not images.is_dir():
        raise CocoError(f"image folder not found: {images}. {IMAGES_HELP}.")
    if progress and karpathy.is_file() and karpathy.stat().st_size > 10 << 20:
        print(f"reading {karpathy} ({karpathy.stat().st_size >> 20} MiB)", flush=True)
    entries = read_karpathy(karpathy)
    if coco_train is not None:
        held_out = [e for e in entries if e["split"] != "train"]
        entries = read_coco_captions(Path(coco_train), "train2017") + held_out
    prefix = image_prefix(images, out)
    check_images(entries, images, check)

    rows, counts = [], {}
    for e in _bar(entries, "coco manifest", progress):
        rel = f"{prefix}/{e['relpath']}" if prefix else e["relpath"]
        c = counts.setdefault(e["split"], {"images": 0, "rows": 0})
        c["images"] += 1
        c["rows"] += len(e["captions"])
        rows += [{"id": f"{e.get('id_prefix', '')}{e['image_id']}-c{k}", "image_id": e["image_id"], "image": rel,
                  "caption": cap, "split": e["split"]} for k, cap in enumerate(e["captions"])]
    summary = {
        "version": VERSION,
        "manifest": manifest,
        "karpathy": {"path": str(karpathy.resolve()), "sha256": file_sha256(karpathy)},
        "train_source": ({"path": str(Path(coco_train).resolve()), "sha256": file_sha256(coco_train),
                          "warning": "COCO 2017 train: holds most Karpathy test images (leak)"}
                         if coco_train is not None else "karpathy train + restval"),
        "images": str(images),
        "image_paths": "absolute" if Path(prefix).is_absolute() else "relative to this folder",
        "splits": {s: counts[s] for s in sorted(counts)},
        "n_rows": len(rows),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "coco.json", summary)
    write_text_atomic(out / manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return summary


def image_prefix(images: Path, out: Path) -> str:
    """How a manifest row names an image folder: relative to `out` when inside it, else absolute."""
    try:
        rel = images.resolve().relative_to(out.resolve())
    except ValueError:
        return str(images)
    return "" if rel == Path(".") else rel.as_posix()


def read_karpathy(path: Path) -> list[dict]:
    """{image_id, relpath, captions, split} per image of a Karpathy `dataset_coco.json`, in file order.

    image_id is the COCO id (`cocoid`; Flickr30K's file has none: the file name's stem). Splits:
    train and restval -> train, val -> val, test -> test. Empty captions are dropped; an image
    left with none, a duplicate id, an unknown split or a missing field is an error.
    """
    data = _read_json(path, KARPATHY_HELP, "--karpathy")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise CocoError(f"{path}: expected {{'images': [{{'filepath', 'filename', 'split', 'sentences', "
                        f"'cocoid'}}, ...]}} (Karpathy split format); is this {KARPATHY_HELP}?")
    entries, problems, seen = [], {}, {}
    for n, im in enumerate(data["images"]):
        where = f"images[{n}]"
        if not isinstance(im, dict) or not im.get("filename") or not isinstance(im.get("sentences"), list):
            _problem(problems, "entries without filename or sentences", where)
            continue
        if im.get("split") not in SPLITS:
            _problem(problems, f"splits not in {sorted(SPLITS)}", f"{where}: {im.get('split')!r}")
            continue
        image_id = str(im["cocoid"]) if "cocoid" in im else Path(im["filename"]).stem
        if image_id in seen:
            _problem(problems, "duplicate image ids", f"{where}: {image_id} (also images[{seen[image_id]}])")
            continue
        seen[image_id] = n
        caps = [s["raw"].strip() for s in im["sentences"] if isinstance(s, dict) and isinstance(s.get("raw"), str)
                and s["raw"].strip()]
        if not caps:
            _problem(problems, "images without a caption", f"{where}: {image_id}")
            continue
        rel = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        entries.append({"image_id": image_id, "relpath": rel, "captions": caps, "split": SPLITS[im["split"]]})
    _raise(problems, path)
    return entries


def read_coco_captions(path: Path, folder: str) -> list[dict]:
    """Train entries of a COCO caption file (captions_train2017.json); images `folder/<file_name>`."""
    data = _read_json(path, "COCO's captions_train2017.json (annotations_trainval2017.zip)", "--coco2017-train")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise CocoError(f"{path}: expected {{'images': [...], 'annotations': [...]}} (COCO caption format)")
    by_id, problems = {}, {}
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            _problem(problems, "images without id or file_name", f"images[{n}]")
            continue
        by_id[str(im["id"])] = {"image_id": str(im["id"]), "relpath": f"{folder}/{im['file_name']}",
                                "captions": [], "split": "train", "id_prefix": f"{folder}-"}  # row ids stay unique
    for n, a in enumerate(data["annotations"]):
        e = by_id.get(str(a.get("image_id"))) if isinstance(a, dict) else None
        if e is None or not isinstance(a.get("caption"), str):
            _problem(problems, "annotations without a known image_id or caption", f"annotations[{n}]")
        elif a["caption"].strip():
            e["captions"].append(a["caption"].strip())
    _raise(problems, path)
    return [e for e in by_id.values() if e["captions"]]


def check_images(entries: list[dict], images: Path, n: int) -> None:
    """`n` images spread over the list (first and last included) must be files under `images`."""
    if n <= 0 or not entries:
        return
    step = max(1, (len(entries) - 1) // max(1, n - 1))
    sample = list(dict.fromkeys([*range(0, len(entries), step)][:n - 1] + [len(entries) - 1]))
    missing = [images / entries[i]["relpath"] for i in sample if not (images / entries[i]["relpath"]).is_file()]
    if len(missing) == len(sample):
        raise CocoError(f"none of {len(sample)} sampled images is under {images} (first expected: {missing[0]}). "
                        f"{IMAGES_HELP}.")
    if missing:
        raise CocoError(f"{len(missing)} of {len(sample)} sampled images are missing under {images} "
                        f"(e.g. {', '.join(map(str, missing[:N_EXAMPLES]))}): the image folder is incomplete. "
                        f"{IMAGES_HELP}.")


def _read_json(path: Path, what: str, option: str):
    if not path.is_file():
        raise CocoError(f"{path} not found: pass {what} with {option}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise CocoError(f"{path}: not valid JSON ({getattr(e, 'msg', e)}{where}); download {what} again") from None


def _problem(problems: dict, reason: str, example: str) -> None:
    slot = problems.setdefault(reason, [0, []])
    slot[0] += 1
    if len(slot[1]) < N_EXAMPLES:
        slot[1].append(example)


def _raise(problems: dict, path: Path) -> None:
    if problems:
        desc = "; ".join(f"{n} {reason} (e.g. {', '.join(ex)})" for reason, (n, ex) in problems.items())
        raise CocoError(f"{path}: {desc}. Fix or re-download the file.")


def _bar(items: list, desc: str, progress: bool):
    if not progress or len(items) < 1000:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image")

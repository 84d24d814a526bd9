"""Data as users hold it, as a training manifest: `slq data import SOURCE --out FOLDER --format F`.

    import_data("/data/pets", "data/pets", "imagefolder")

Formats (`FORMATS`):

- `imagefolder`: the Hugging Face layout: images plus `metadata.jsonl` or `metadata.csv` whose
  `file_name` names each image (relative to the metadata file's folder) and whose caption column
  is `text` by default. Splits from `train/`, `val/` (or `validation/`, `valid/`, `dev/`) and
  `test/` subfolders, each with its own metadata file, when present.
- `csv`, `parquet`: one row per pair, an image-path column (`image`) and a caption column
  (`caption`), paths relative to the file's folder. A Parquet image cell may also be a
  `{"bytes": ..., "path": ...}` struct (what `datasets` writes). `parquet` takes a file or a
  folder of `.parquet` files.
- `webdataset`: tar shards (one `.tar`, a folder of them, or a brace pattern
  `shards-{000..009}.tar`); files sharing a key (the name up to its first dot) form one sample:
  an image (`jpg`, `jpeg`, `png`, `webp`) and a caption in `txt` or in `json` (its `caption` or
  `text` key). Read with the standard library's `tarfile` (the `webdataset` package is not needed).
- `hf-disk`: a `datasets` Dataset or DatasetDict written by `save_to_disk`, read with
  `load_from_disk` (offline): an Image column (found by its feature type unless named) and a
  caption column; a DatasetDict's keys are the splits.

A caption cell may hold a list: each caption is a row. Splits come from the source (a `split`
column, a subfolder, a DatasetDict key: `validation`, `valid` and `dev` read as `val`); without
them each image is put in a split by a seeded sha256 of its bytes (`val`, `test` fractions), so
an image, all its captions and every byte-identical copy under another name land in one split.
Byte-identical images are one image: `image_id` is the first 16 hex digits of its sha256, row ids
are `<image_id>-c<k>`. When the source itself puts one image in two splits, the held-out split
wins (test, then val) and the other rows are bad rows (a leak otherwise).

Images are always copied, under `images/<image_id><ext>` of the output (self-contained, one copy
per distinct image); `import.json` records the source, the counts and every bad row. Bad rows (a
missing or unreadable image, an empty caption, a missing field, an unknown split) are skipped and
named, or, with `strict`, stop the import. Everything is written into a temporary folder beside
`out` and renamed into place at the end: a failure leaves nothing behind, and an existing `out` is
replaced only with `force`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Iterator

from slq.io import write_atomic_dir, write_json_atomic, write_text_atomic
from slq.progress import bar

VERSION = 1
FORMATS = ("imagefolder", "csv", "parquet", "webdataset", "hf-disk")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validation": "val", "valid": "val",
               "dev": "val", "test": "test", "testing": "test"}
HELD_OUT = ("test", "val", "train")  # which split keeps an image the source puts in two
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PIL_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
N_SHOWN = 3
BAD_KINDS = ("missing image", "missing column", "missing caption", "unreadable image", "empty caption", "empty split",
             "split", "image also in split", "no image", "no caption", "not valid JSON", "not a JSON object")


class DataImportError(ValueError):
    """The source cannot be imported (not found, wrong format, a missing column, bad rows with
    --strict, an existing --out without --force); says what to do."""


class Record:
    """One source row: where it is, its image (a path or bytes), its captions, its split or None."""

    __slots__ = ("where", "image", "captions", "split")

    def __init__(self, where: str, image, captions, split=None):
        self.where, self.image, self.captions, self.split = where, image, captions, split


class Bad(Exception):
    """A bad row: why (the row is skipped)."""


def import_data(source: str | Path, out: str | Path, fmt: str | None = None, *, image_column: str | None = None,
                caption_column: str | None = None, split_column: str | None = None, val: float = 0.05,
                test: float = 0.05, seed: int = 0, force: bool = False, strict: bool = False,
                manifest: str = "manifest.jsonl", progress: bool = True) -> dict:
    """Write `out/manifest` + `out/images/` + `out/import.json` from `source`; returns the summary.

    `fmt` None: guessed from the source (`detect_format`). Column names None: the format's
    defaults (image: `image`, or a `datasets` Image column; caption: `caption`, then `text`;
    imagefolder `text` first; split: `split` when present).
    """
    src = Path(str(source))
    out = Path(os.path.abspath(out))
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise DataImportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataImportError(f"--val {val} and --test {test}: each in [0, 1), their sum below 1")
    if out.exists() and not force:
        raise DataImportError(f"{out} exists: pass --force to replace it, or choose another --out")
    if fmt != "webdataset" and not src.exists():
        raise DataImportError(f"source not found: {src}")
    captions = (caption_column,) if caption_column else (("text", "caption") if fmt == "imagefolder"
                                                          else ("caption", "text"))
    readers = {"imagefolder": read_imagefolder, "csv": read_table, "parquet": read_table,
               "webdataset": read_webdataset, "hf-disk": read_hf_disk}
    records = readers[fmt](src, fmt=fmt, image_column=image_column, captions=captions, split_column=split_column)

    summary = {}

    def write(tmp: Path) -> None:  # a failure leaves nothing; --force swaps the old folder out only at the end
        (tmp / "images").mkdir()
        summary.update(_write(records, tmp, src, fmt, val=val, test=test, seed=seed, strict=strict,
                              manifest=manifest, progress=progress))
        summary.update(out=str(out), format=fmt, columns={"image": image_column, "caption": list(captions),
                                                          "split": split_column})
        write_json_atomic(tmp / "import.json", summary)

    write_atomic_dir(out, write)
    return summary


def detect_format(source: str | Path) -> str:
    """The format of `source` from its name and contents; an error when it is not clear."""
    s = str(source)
    p = Path(s)
    if "{" in s or s.endswith(".tar"):
        return "webdataset"
    if p.suffix.lower() == ".csv":
        return "csv"
    if p.suffix.lower() == ".parquet":
        return "parquet"
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "hf-disk"
        if any(p.rglob("metadata.jsonl")) or any(p.rglob("metadata.csv")):
            return "imagefolder"
        if any(p.glob("*.tar")):
            return "webdataset"
        if any(p.glob("*.parquet")):
            return "parquet"
    raise DataImportError(f"cannot tell the format of {s}: pass --format ({', '.join(FORMATS)})")


# --- readers: each checks what it can up front (raising DataImportError), then yields Records ----

def read_imagefolder(src: Path, *, captions, split_column, **_) -> Iterator[Record]:
    if not src.is_dir():
        raise DataImportError(f"imagefolder: {src} is not a folder")
    metas = sorted(p for name in ("metadata.jsonl", "metadata.csv") for p in src.rglob(name))
    if not metas:
        raise DataImportError(f"imagefolder: no metadata.jsonl or metadata.csv under {src}: add one with a "
                              f"`file_name` column and a caption column ({captions[0]})")
    subfolder_split = {}
    for m in metas:
        top = m.relative_to(src).parts[0] if len(m.relative_to(src).parts) > 1 else None
        subfolder_split[m] = SPLIT_NAMES.get(top.lower()) if top else None
    return _imagefolder_rows(metas, subfolder_split, captions, split_column)


def _imagefolder_rows(metas, subfolder_split, captions, split_column):
    for m in metas:
        if m.suffix == ".csv":
            import pandas as pd

            df = pd.read_csv(m, dtype=str, keep_default_na=False)
            rows = ((f"{m}:line {n + 2}", r) for n, r in enumerate(df.to_dict("records")))
            _need_columns(m, list(df.columns), "file_name", captions)
        else:
            rows = _jsonl_rows(m)
        for where, r in rows:
            if not isinstance(r, dict):
                yield Record(where, Bad(r if isinstance(r, str) else "not a JSON object"), None)
                continue
            split = subfolder_split[m] or _split_of(r, split_column)
            if not r.get("file_name"):
                yield Record(where, Bad("missing column file_name"), None)
                continue
            yield Record(where, m.parent / str(r["file_name"]), _captions_of(r, captions), split)


def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:line {n}", f"not valid JSON ({e.msg})"


def read_table(src: Path, *, fmt, image_column, captions, split_column, **_) -> Iterator[Record]:
    import pandas as pd

    if fmt == "csv":
        if not src.is_file():
            raise DataImportError(f"csv: {src} is not a file (a .csv with an image-path and a caption column)")
        files = [src]
        try:
            frames = [pd.read_csv(src, dtype=str, keep_default_na=False)]
        except Exception as e:
            raise DataImportError(f"csv: cannot read {src}: {e}") from None
    else:
        files = sorted(src.glob("*.parquet")) if src.is_dir() else [src]
        if not files:
            raise DataImportError(f"parquet: no .parquet file in {src}")
        try:
            frames = [pd.read_parquet(f) for f in files]
        except Exception as e:
            raise DataImportError(f"parquet: cannot read {src}: {e}") from None
    image_column = image_column or "image"
    for f, df in zip(files, frames):
        _need_columns(f, list(df.columns), image_column, captions)
        if split_column and split_column not in df.columns:
            raise DataImportError(f"{f}: no split column {split_column!r} (columns: {', '.join(map(str, df.columns))})")
    return _table_rows(files, frames, fmt, image_column, captions, split_column or "split")


def _table_rows(files, frames, fmt, image_column, captions, split_column):
    for f, df in zip(files, frames):
        for n, r in enumerate(df.to_dict("records")):
            where = f"{f}:line {n + 2}" if fmt == "csv" else f"{f}:row {n}"
            cell = r.get(image_column)
            if isinstance(cell, dict):  # a datasets-style {"bytes", "path"} struct
                image = cell.get("bytes") or (f.parent / cell["path"] if cell.get("path") else None)
            elif isinstance(cell, str) and cell.strip():
                cell = cell.strip()
                image = (Bad(f"{cell} is a URL: download the images first, then point the column at the files")
                         if re.match(r"^[a-z]+://", cell) else f.parent / cell)
            else:
                image = None
            if image is None:
                image = Bad(f"missing image (empty {image_column} cell)")
            yield Record(where, image, _captions_of(r, captions), _split_of(r, split_column))


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{a,b}` lists too (nested in order)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        width = len(r.group(1))
        items = [str(i).zfill(width) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


def read_webdataset(src: Path, *, captions, split_column, **_) -> Iterator[Record]:
    s = str(src)
    if "{" in s:
        shards = [Path(p) for p in expand_braces(s)]
    elif src.is_dir():
        shards = sorted(src.glob("*.tar"))
    else:
        shards = [src]
    if not shards:
        raise DataImportError(f"webdataset: no .tar shard in {src}")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise DataImportError(f"webdataset: {len(missing)} shard(s) not found: {', '.join(missing[:N_SHOWN])}")
    return _webdataset_rows(shards, captions, split_column or "split")


def _webdataset_rows(shards, captions, split_column):
    for shard in shards:
        try:
            tf = tarfile.open(shard, "r|*")  # streamed: shards are read once, in order
            group, key = {}, None
            for member in tf:
                if not member.isfile():
                    continue
                d, base = os.path.split(member.name)
                k, _, ext = base.partition(".")
                k = f"{d}/{k}" if d else k
                if k != key and group:
                    yield _sample(shard, key, group, captions, split_column)
                    group = {}
                key = k
                group[ext.lower()] = tf.extractfile(member).read()
            if group:
                yield _sample(shard, key, group, captions, split_column)
            tf.close()
        except tarfile.TarError as e:
            raise DataImportError(f"webdataset: {shard} is not a readable tar file ({e})") from None


def _sample(shard, key, group, captions, split_column) -> Record:
    where = f"{shard}:{key}"
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    image = group[ext] if ext else Bad(f"no image ({'/'.join(IMAGE_EXTS)}) among {sorted(group)}")
    split, caps = None, None
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return Record(where, Bad("its json is not valid JSON"), None)
        if isinstance(meta, dict):
            split = _split_of(meta, split_column)
            caps = _captions_of(meta, captions) if any(c in meta for c in captions) else None
    if caps is None and "txt" in group:
        caps = group["txt"].decode("utf-8", errors="replace")
    if caps is None:
        caps = Bad(f"no caption: no txt, and no json with a {' or '.join(captions)} key")
    return Record(where, image, caps, split)


def read_hf_disk(src: Path, *, image_column, captions, split_column, **_) -> Iterator[Record]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataImportError("hf-disk needs the `datasets` package: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(src))
    except Exception as e:
        raise DataImportError(f"hf-disk: {src} is not a save_to_disk folder ({type(e).__name__}: {e})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    prepared = []
    for key, ds in parts:
        split = None
        if key is not None:
            split = SPLIT_NAMES.get(key.lower())
            if split is None:
                raise DataImportError(f"hf-disk: split {key!r} of {src} is not one of {sorted(SPLIT_NAMES)}: "
                                      "rename it (DatasetDict keys are the splits)")
        cols = list(ds.features)
        img = image_column or next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), "image")
        _need_columns(f"{src}" + (f"[{key}]" if key else ""), cols, img, captions)
        if split_column and key is None and split_column not in cols:
            raise DataImportError(f"{src}: no split column {split_column!r} (columns: {', '.join(cols)})")
        if isinstance(ds.features[img], datasets.Image):
            ds = ds.cast_column(img, datasets.Image(decode=False))
        prepared.append((key, ds, img, split))
    return _hf_rows(src, prepared, captions, split_column or "split")


def _hf_rows(src, prepared, captions, split_column):
    for key, ds, img, split in prepared:
        for n, r in enumerate(ds):
            where = f"{src}[{key}] row {n}" if key else f"{src} row {n}"
            cell = r.get(img)
            if isinstance(cell, dict):
                image = cell.get("bytes") or (Path(cell["path"]) if cell.get("path") else None)
            elif isinstance(cell, str) and cell:
                image = src / cell
            else:
                image = None
            if image is None:
                image = Bad(f"missing image (empty {img} cell)")
            yield Record(where, image, _captions_of(r, captions), split or _split_of(r, split_column))


def _need_columns(where, columns: list, image_column: str, captions) -> None:
    missing = ([image_column] if image_column not in columns else []) + \
        ([" or ".join(captions)] if not any(c in columns for c in captions) else [])
    if missing:
        raise DataImportError(f"{where}: missing column {', '.join(missing)} (columns: "
                              f"{', '.join(map(str, columns))}); name yours with --image-column/--caption-column")


def _captions_of(r: dict, captions):
    col = next((c for c in captions if c in r), None)
    if col is None:
        return Bad(f"missing column {' or '.join(captions)}")
    v = r[col]
    if hasattr(v, "tolist"):  # a numpy array from parquet
        v = v.tolist()
    return v


def _split_of(r: dict, split_column):
    if not split_column or split_column not in r:
        return None
    v = r[split_column]
    return "" if v is None else str(v)


# --- the writer -------------------------------------------------------------------------------

def assign_split(sha: str, val: float, test: float, seed: int) -> str:
    """The split of an image without one from its source: a seeded hash of its bytes' sha256."""
    u = int(hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()[:16], 16) / 2 ** 64
    return "test" if u < test else "val" if u < test + val else "train"


def _image_bytes(image) -> bytes:
    if isinstance(image, Bad):
        raise image
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    p = Path(image)
    if not p.is_file():
        raise Bad(f"missing image {p}")
    return p.read_bytes()


def _decode(data: bytes) -> str:
    """The file extension of a good image; Bad when PIL cannot decode every pixel."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
    except Exception as e:
        detail = "" if "BytesIO" in str(e) else f": {e}"
        raise Bad(f"unreadable image ({type(e).__name__}{detail})") from None
    return PIL_EXT.get(fmt, f".{(fmt or 'img').lower()}")


def _caption_list(caps) -> list[str]:
    if isinstance(caps, Bad):
        raise caps
    if caps is None:
        raise Bad("missing caption")
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, (list, tuple)):
        raise Bad(f"caption is a {type(caps).__name__}, not text")
    out = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
    if not out:
        raise Bad("empty caption")
    return out


def _write(records, tmp: Path, src: Path, fmt: str, *, val, test, seed, strict, manifest, progress) -> dict:
    t0 = time.perf_counter()
    images: dict[str, dict] = {}  # sha -> {image, split (from source), where, captions: [(caption, where)]}
    bad: list[dict] = []
    n_records = n_dup = 0
    total = None
    pbar = bar(total, f"import {fmt}", progress, unit="row")
    try:
        for rec in records:
            n_records += 1
            pbar.update()
            try:
                if isinstance(rec.image, Bad):
                    raise rec.image
                caps = _caption_list(rec.captions)
                split = rec.split
                if split is not None:
                    split = SPLIT_NAMES.get(split.strip().lower())
                    if split is None:
                        raise Bad(f"split {rec.split!r} is not one of {sorted(SPLIT_NAMES)}")
                data = _image_bytes(rec.image)
                sha = hashlib.sha256(data).hexdigest()
                entry = images.get(sha)
                if entry is None:
                    ext = _decode(data)
                    rel = f"images/{sha[:16]}{ext}"
                    (tmp / rel).write_bytes(data)
                    entry = images[sha] = {"image": rel, "captions": [], "splits": {}}
            except Bad as e:
                bad.append({"where": rec.where, "problem": str(e)})
                if strict:
                    break
                continue
            for c in caps:
                key = (c, split)
                if any(k == key for k, _ in entry["captions"]):
                    n_dup += 1
                    continue
                entry["captions"].append((key, rec.where))
            entry["splits"].setdefault(split, rec.where)
    finally:
        pbar.close()

    sourced = [s for e in images.values() for s in e["splits"] if s is not None]
    rows, counts = [], {}
    for sha, e in images.items():
        image_id = sha[:16]
        known = [s for s in e["splits"] if s is not None]
        if sourced and None in e["splits"]:
            for (c, s), where in e["captions"]:
                if s is None:
                    bad.append({"where": where, "problem": "empty split, though other rows of the source have one"})
        keep = next((s for s in HELD_OUT if s in known), None) if known else None
        if sourced and not known:
            continue  # all its rows were named above
        for s in known:
            if s != keep:
                for (c, s2), where in e["captions"]:
                    if s2 == s:
                        bad.append({"where": where, "problem": f"image also in split {keep} "
                                    f"(as {e['splits'][keep]}): kept there only, so it is not trained on"})
        split = keep or assign_split(sha, val, test, seed)
        caps = [c for (c, s), _ in e["captions"] if s == keep]
        if not caps:
            continue
        c_ = counts.setdefault(split, {"images": 0, "rows": 0})
        c_["images"] += 1
        c_["rows"] += len(caps)
        rows += [{"id": f"{image_id}-c{k}", "image_id": image_id, "image": e["image"], "caption": c,
                  "split": split} for k, c in enumerate(caps)]
    # images whose rows were all dropped are not kept
    used = {r["image"] for r in rows}
    for e in images.values():
        if e["image"] not in used:
            (tmp / e["image"]).unlink(missing_ok=True)
    if bad and strict:
        raise DataImportError(f"{len(bad)} bad row(s) with --strict: " + "; ".join(
            f"{b['where']}: {b['problem']}" for b in bad[:N_SHOWN]) + " (drop --strict to skip them)")
    if not rows:
        first = f" (first: {bad[0]['where']}: {bad[0]['problem']})" if bad else ""
        raise DataImportError(f"nothing to import from {src}: {n_records} source rows, {len(bad)} bad{first}")
    write_text_atomic(tmp / manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    reasons: dict[str, int] = {}
    for b in bad:
        kind = next((k for k in BAD_KINDS if b["problem"].startswith(k)), b["problem"].split(" (")[0])
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "version": VERSION,
        "manifest": manifest,
        "source": str(src),
        "splits_from": "source" if sourced else f"sha256 of the image bytes (val {val}, test {test}, seed {seed})",
        "splits": {s: counts[s] for s in sorted(counts)},
        "n_source_rows": n_records,
        "n_rows": len(rows),
        "n_images": len(used),
        "n_duplicate_captions": n_dup,
        "n_bad": len(bad),
        "bad_by_kind": reasons,
        "bad": bad,
        "seconds": round(time.perf_counter() - t0, 3),
    }

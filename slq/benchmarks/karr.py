"""KARR-Bench: knowledge-aware reasoning retrieval (COCO images, captions that need knowledge).

One caption per image, scored both ways (R@1/5/10), each query with exactly one positive: caption i
and image i. Three layouts of `root` are read, detected in this order:

1. a Hugging Face `datasets` folder written by `save_to_disk` (`dataset_dict.json` or `state.json`
   at the top), read with `datasets.load_from_disk`; a DatasetDict's `split` is used, or its only
   split when it has one (the reference code stores KARR as a single "train" split);
2. a folder of Parquet files in the Hub layout (e.g. `data/test-00000-of-00001.parquet`), read
   with `datasets.load_dataset(root)`;
3. a plain folder with `data.jsonl`: one `{"image": <path relative to root>, "text": <caption>}`
   per line, optionally with `"split"` (rows are then filtered by the `split` option).

Columns/fields `image` and `text`. In the datasets layouts images are usually stored as bytes:
they are written once, named by content hash, under `images_dir` (default: `karr_images` beside
the embedding cache) so the embedding cache can key on stable paths. `datasets` is needed only for
layouts 1 and 2 and is imported only there.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from slq.benchmarks.base import DataError, MissingData, register_benchmark
from slq.benchmarks.image_text import (
    Entry,
    ImageTextBenchmark,
    PairSet,
    Problems,
    assemble,
)
from slq.io import write_bytes_atomic


@register_benchmark("karr")
class Karr(ImageTextBenchmark):
    """KARR-Bench both ways; `t2i` = caption -> image, `i2t` = image -> caption."""

    paper: ClassVar[dict[str, float]] = {}  # slq-method.md quotes no KARR number
    options_allowed = frozenset({"prompts", "split", "max_caption_words", "images_dir"})
    option_defaults: ClassVar[dict] = {"split": "test", "max_caption_words": None}

    def detect(self) -> str:
        root = self.root
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            return "hf_disk"
        if (root / "data.jsonl").is_file():
            return "jsonl"
        if root.is_dir() and any(root.rglob("*.parquet")):
            return "hf_parquet"
        raise MissingData(
            f"benchmark 'karr': expected under {root} one of: dataset_dict.json or state.json (a `datasets` "
            "save_to_disk folder), Parquet files in the Hub layout, or data.jsonl "
            '({"image": relpath, "text": caption} per line). None was found.'
        )

    def load(self, workdir: Path) -> PairSet:
        fmt = self.detect()
        problems = Problems(f"karr ({self.root})")
        if fmt == "jsonl":
            rows, files, extra = self._read_jsonl(problems)
        else:
            out = Path(self.options.get("images_dir") or workdir / "karr_images")
            rows, files, extra = self._read_datasets(fmt, out, problems)
        entries = self._entries(rows, problems, extra)
        images, captions, txt_to_img, info = assemble(
            entries, self.root, problems, self.partial, 1, self.options["max_caption_words"],
            hint="The dataset names image files that are not there: store the images in it (a `datasets.Image` "
                 "column with bytes) or put the files at those paths (data.jsonl: relative to root).")
        assert np.array_equal(txt_to_img, np.arange(len(images)))  # one caption per image, same order
        info.update(extra, format=fmt, split=self.options["split"])
        return PairSet(images, captions, txt_to_img, files, info)

    def _entries(self, rows: list[tuple[int, str | None, object]], problems: Problems, extra: dict) -> list[Entry]:
        """One entry per (row number, image, text); identical rows are a problem, repeats of one side counted."""
        entries, seen = [], {}
        for n, image, text in rows:
            if image is None:
                problems.add("rows without an image", f"row {n}")
                continue
            if isinstance(text, list):  # a list column: the first caption is the one
                text = text[0] if text else None
            if not isinstance(text, str):
                problems.add("rows without a text", f"row {n}")
                continue
            key = (image, text.strip())
            if key in seen:
                problems.add("duplicate rows (same image and text)", f"row {n} (= row {seen[key]})")
                continue
            seen[key] = n
            entries.append(Entry(f"row {n}", image, [text]))
        extra["repeated_images"] = len(entries) - len({e.relpath for e in entries})
        extra["repeated_texts"] = len(entries) - len({e.captions[0].strip() for e in entries})
        return entries

    def _read_jsonl(self, problems: Problems):
        path = self.root / "data.jsonl"
        split = self.options["split"]
        rows, other = [], 0
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    problems.add("lines that are not JSON", f"line {n}")
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    problems.add("lines without an `image` path", f"line {n}")
                    continue
                if "split" in row and row["split"] != split:
                    other += 1
                    continue
                rows.append((n, row["image"], row.get("text")))
        return rows, [path], {"rows_of_other_splits": other}

    def _read_datasets(self, fmt: str, images_dir: Path, problems: Problems):
        try:
            import datasets
        except ImportError:
            raise MissingData(
                f"benchmark 'karr': {self.root} is a Hugging Face `datasets` folder; install the reader with "
                "`pip install datasets`, or convert it to data.jsonl (see slq/benchmarks/karr.py)"
            ) from None
        loaded = datasets.load_from_disk(str(self.root)) if fmt == "hf_disk" else datasets.load_dataset(str(self.root))
        ds, split = self._pick_split(loaded, datasets)
        missing = {"image", "text"} - set(ds.column_names)
        if missing:
            raise DataError(f"karr ({self.root}): missing column(s) {sorted(missing)}; has {ds.column_names}")
        if isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # raw bytes: no decoding, stable hash
        images_dir.mkdir(parents=True, exist_ok=True)
        rows, n = [], 0
        for batch in ds.select_columns(["image", "text"]).iter(batch_size=256):
            for image, text in zip(batch["image"], batch["text"]):
                path = self._image_file(image, images_dir, problems, n)
                if path is not False:  # False: unreadable, already reported
                    rows.append((n, path, text))
                n += 1
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        return rows, files, {"split_used": split, "images_dir": str(images_dir)}

    def _pick_split(self, loaded, datasets):
        split = self.options["split"]
        if not isinstance(loaded, datasets.DatasetDict):  # a single Dataset
            return loaded, None
        names = list(loaded.keys())
        if split in names:
            return loaded[split], split
        if len(names) == 1:
            return loaded[names[0]], names[0]
        raise DataError(f"karr ({self.root}): no split {split!r}; splits: {names}. Set the `split` option.")

    def _image_file(self, image, out: Path, problems: Problems, n: int) -> str | None | bool:
        """A file path for one `image` cell: its own path, or its bytes written once by content hash.

        None: the cell holds no image; False: its bytes are not an image (reported here).
        """
        if isinstance(image, str):
            return str(self.root / image)
        if not isinstance(image, dict):
            return None
        data, src = image.get("bytes"), image.get("path")
        if data is None:  # stored by path (relative to root, or absolute); a missing file is reported later
            return str(self.root / src) if src else None
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                suffix = "." + (im.format or "img").lower()
        except Exception:  # noqa: BLE001 - any decoding failure is a data problem, reported below
            problems.add("unreadable images", f"row {n}")
            return False
        path = out / f"{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
        if not path.exists():
            write_bytes_atomic(path, data)
        return str(path)

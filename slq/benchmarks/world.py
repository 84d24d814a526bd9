"""The built-in synthetic world (slq.data.world) as a benchmark: caption <-> image on one split.

`root` (default data/world) holds `manifest.jsonl`, one row per caption: `{id, image_id, image,
caption, split}` with `image` relative to root. All of an image's captions are kept by default
(`captions_per_image: null`). `world_i2i` draws the captions as images (the COCO/Flickr I2I
renderer) and retrieves image->image; its t2i = rendered caption -> image.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from slq.benchmarks.base import DataError, MissingData, register_benchmark, require
from slq.benchmarks.image_text import (
    Entry,
    ImageTextBenchmark,
    PairSet,
    Problems,
    assemble,
)
from slq.data.world import load_manifest


@register_benchmark("world")
class World(ImageTextBenchmark):
    """The synthetic world's `split` (default test), caption -> image and image -> caption."""

    default_root = "data/world"
    options_allowed = frozenset({"prompts", "split", "manifest", "captions_per_image", "max_caption_words",
                                 "render_dir", "font", "wrap"})
    option_defaults: ClassVar[dict] = {"split": "test", "manifest": "manifest.jsonl", "captions_per_image": None,
                       "max_caption_words": None}

    def load(self, workdir: Path) -> PairSet:
        name, split = self.options["manifest"], self.options["split"]
        (path,) = require(self.root, [name], "benchmark 'world' (generate it with the data stage)")
        try:
            rows = load_manifest(self.root, name)
        except ValueError as e:
            raise DataError(str(e)) from None
        problems = Problems(f"world ({path})")
        entries: dict[str, Entry] = {}
        ids: set = set()
        for n, r in enumerate(rows, start=1):
            if r.get("split") != split:
                continue
            if not all(isinstance(r.get(k), str) for k in ("image_id", "image", "caption")):
                problems.add("rows missing image_id/image/caption", f"row {n}")
                continue
            if r.get("id") is not None:
                if r["id"] in ids:
                    problems.add("duplicate caption ids", f"{r['id']!r} (row {n})")
                    continue
                ids.add(r["id"])
            e = entries.setdefault(r["image_id"], Entry(r["image_id"], r["image"], []))
            if e.relpath != r["image"]:
                problems.add("image ids with two image files", f"{r['image_id']!r}: {e.relpath}, {r['image']}")
                continue
            e.captions.append(r["caption"])
        if not entries and not problems.found:
            raise MissingData(f"world ({path}): no rows in split {split!r}")
        images, captions, txt_to_img, info = assemble(
            list(entries.values()), self.root, problems, self.partial, self.options["captions_per_image"],
            self.options["max_caption_words"], hint="Regenerate the world (the data stage) or fix `root`.")
        files = [path] + [p for p in [self.root / "world.json"] if p.is_file()]
        info.update(format="world", split=split, images_dir=str(self.root))
        return PairSet(images, captions, txt_to_img, files, info)


@register_benchmark("world_i2i")
class WorldI2I(World):
    """The world with captions drawn as images; t2i = rendered caption -> image."""

    render_captions = True

"""COCO 5K and Flickr30K 1K (Karpathy test splits), and their I2I variants, from local files.

Each benchmark reads one of two file formats from `root`, auto-detected (Karpathy first; see
`formats`). Images are looked up under `root/<images>/`, where `images` is an option. Left unset,
the first folder of the benchmark's `image_dirs` that holds the first listed images is used
(recorded as `info["images_dir"]`): for COCO "" (root itself: `root/val2014/COCO_val2014_*.jpg`
via Karpathy's `filepath`), then "val2014" (CLIP_benchmark's bare `file_name`), then "images"; for
Flickr30K "flickr30k-images", "images", "Images", then "" (root itself).

The I2I variants (`coco_i2i`, `flickr30k_i2i`) draw every caption as an image (`render`) and
retrieve image->image. Their "t2i" metrics are rendered caption -> photo, their "i2t" metrics
photo -> rendered caption; the paper's I2I R@1 is taken to be t2i.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

from slq.benchmarks.base import DataError, MissingData, register_benchmark
from slq.benchmarks.image_text.benchmark import ImageTextBenchmark
from slq.benchmarks.image_text.formats import (
    read_coco_captions,
    read_flickr_txt,
    read_karpathy,
)
from slq.benchmarks.image_text.pairs import PairSet, Problems, assemble, pick_images_dir


class KarpathyBenchmark(ImageTextBenchmark):
    """COCO / Flickr30K: Karpathy `dataset_*.json` or CLIP_benchmark files, auto-detected."""

    karpathy_file = ""
    clip_file = ""  # with {split}
    image_dirs: ClassVar[tuple[str, ...]] = ("",)
    expected: ClassVar[dict] = {}  # test-split sizes of the standard protocol

    def formats(self) -> dict[str, str]:
        return {"karpathy": self.karpathy_file, "clip_benchmark": self.clip_file.format(split=self.options["split"])}

    def detect(self) -> tuple[str, Path]:
        formats = self.formats()
        want = self.options.get("format")
        if want is not None and want not in formats:
            raise ValueError(f"benchmark {self.name!r}: format must be one of {sorted(formats)} or unset, got {want!r}")
        for fmt, name in formats.items():
            if (want is None or want == fmt) and (self.root / name).is_file():
                return fmt, self.root / name
        names = [formats[want]] if want else list(formats.values())
        raise MissingData(
            f"benchmark {self.name!r}: expected {' or '.join(names)} under {self.root} (not found). "
            "Point `root` in params.yaml at a local copy laid out as in docs/benchmarks-data.md."
        )

    def load(self, workdir: Path) -> PairSet:
        fmt, path = self.detect()
        split = self.options["split"]
        problems = Problems(f"{self.name} ({path})")
        extra: dict = {}
        if fmt == "karpathy":
            splits = {split} if isinstance(split, str) else set(split)
            entries, extra = read_karpathy(path, splits, problems)
        elif path.suffix == ".txt":
            entries, extra = read_flickr_txt(path, problems)
        else:
            entries, extra = read_coco_captions(path, problems)
        if not entries and not problems.found:
            raise DataError(f"{path}: no images in split {split!r}")
        images_dir = pick_images_dir(self.root, [e.relpath for e in entries], self.options.get("images"),
                                     self.image_dirs)
        images, captions, txt_to_img, info = assemble(
            entries, images_dir, problems, self.partial, self.options["captions_per_image"],
            self.options["max_caption_words"])
        info.update(extra, format=fmt, split=split, images_dir=str(images_dir))
        if split == "test" and self.expected:
            info["expected"] = dict(self.expected)
            if len(images) != self.expected["n_images"]:
                warnings.warn(f"{self.name}: {len(images)} test images, the standard protocol has "
                              f"{self.expected['n_images']}; results are not comparable to the paper's", stacklevel=2)
        return PairSet(images, captions, txt_to_img, [path], info)


@register_benchmark("coco")
class Coco(KarpathyBenchmark):
    """COCO 5K test (Karpathy split): 5,000 images, first 5 captions each (25,000) by default."""

    paper: ClassVar[dict[str, float]] = {"i2t_R@1": 69.6, "t2i_R@1": 55.4}
    karpathy_file = "dataset_coco.json"
    clip_file = "coco_{split}_karpathy.json"
    image_dirs: ClassVar[tuple[str, ...]] = ("", "val2014", "images")
    expected: ClassVar[dict] = {"n_images": 5000}


@register_benchmark("flickr30k")
class Flickr30k(KarpathyBenchmark):
    """Flickr30K 1K test (Karpathy split): 1,000 images, 5 captions each."""

    paper: ClassVar[dict[str, float]] = {"i2t_R@1": 92.0, "t2i_R@1": 81.8}
    karpathy_file = "dataset_flickr30k.json"
    clip_file = "flickr30k_{split}_karpathy.txt"
    image_dirs: ClassVar[tuple[str, ...]] = ("flickr30k-images", "images", "Images", "")
    expected: ClassVar[dict] = {"n_images": 1000}


@register_benchmark("coco_i2i")
class CocoI2I(Coco):
    """COCO 5K with captions rendered as images; t2i = rendered caption -> photo."""

    paper: ClassVar[dict[str, float]] = {"t2i_R@1": 55.4}
    render_captions = True


@register_benchmark("flickr30k_i2i")
class Flickr30kI2I(Flickr30k):
    """Flickr30K 1K with captions rendered as images; t2i = rendered caption -> photo."""

    paper: ClassVar[dict[str, float]] = {"t2i_R@1": 90.2}
    render_captions = True

"""Image-caption entries -> a checked test set: duplicates, empty captions, missing image files.

A problem raises `DataError` naming how many and the first few, unless the benchmark runs
`partial`, when the offending parts are dropped and counted in `info["dropped"]`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slq.benchmarks.base import DataError, MissingData, files_hash

N_EXAMPLES = 3  # examples quoted per problem in error messages


@dataclass
class PairSet:
    """A loaded image-text test set: gallery images, captions, and each caption's image row."""

    images: list[str]  # image file paths, one per image row
    captions: list[str]
    txt_to_img: np.ndarray  # (N_txt,) row in `images` of each caption's image
    files: list[Path]  # annotation files read (hashed into data_hash)
    info: dict = field(default_factory=dict)  # format, images_dir, dropped counts, ...
    data_hash: str = ""

    def __post_init__(self):
        if not self.data_hash and self.files:
            self.data_hash = files_hash(self.files)


@dataclass
class Entry:
    """One image and its captions as read from an annotation file."""

    key: str  # image id (duplicates are detected on it)
    relpath: str  # image path relative to the images folder
    captions: list[str]


class Problems:
    """Data problems found while loading: an error, or (partial=True) a count of what was dropped."""

    def __init__(self, what: str):
        self.what = what
        self.found: dict[str, list] = OrderedDict()  # reason -> [count, examples]

    def add(self, reason: str, example) -> None:
        slot = self.found.setdefault(reason, [0, []])
        slot[0] += 1
        if len(slot[1]) < N_EXAMPLES:
            slot[1].append(example)

    def settle(self, partial: bool) -> dict[str, int]:
        """Raise DataError listing every problem, or return {reason: count} when running partial."""
        if not self.found:
            return {}
        desc = "; ".join(f"{n} {reason} (first: {', '.join(map(str, ex))})" for reason, (n, ex) in self.found.items())
        if not partial:
            raise DataError(
                f"{self.what}: {desc}. Fix the files, or set `partial: true` on this benchmark to run on "
                "the rest (the results are then flagged partial)."
            )
        warnings.warn(f"{self.what}: running on a partial copy; dropped {desc}", stacklevel=3)
        return {reason: n for reason, (n, _) in self.found.items()}


def assemble(
    entries: list[Entry],
    images_dir: Path,
    problems: Problems,
    partial: bool,
    captions_per_image: int | None,
    max_caption_words: int | None,
    hint: str = "Put the images there or set this benchmark's `images` option to their folder (relative to root).",
) -> tuple[list[str], list[str], np.ndarray, dict]:
    """Check entries (duplicates, empty captions, missing files), cut and truncate captions.

    Returns image paths, captions, caption -> image row, and info (dropped counts, truncation).
    Problems raise DataError unless `partial`, when the offending parts are dropped.
    """
    seen: dict[str, str] = {}
    kept: list[Entry] = []
    for e in entries:
        if e.key in seen:
            problems.add("duplicate image ids", f"{e.key!r} ({e.relpath}, also {seen[e.key]})")
            continue
        seen[e.key] = e.relpath
        caps = [c.strip() for c in e.captions if isinstance(c, str) and c.strip()]
        for _ in range(len(e.captions) - len(caps)):
            problems.add("empty captions", repr(e.key))
        if not caps:
            problems.add("images without captions", repr(e.key))
            continue
        kept.append(Entry(e.key, e.relpath, caps))
    present = [e for e in kept if (images_dir / e.relpath).is_file()]
    if kept and not present:
        raise MissingData(
            f"{problems.what}: none of the {len(kept)} images was found under {images_dir} (first expected: "
            f"{images_dir / kept[0].relpath}). {hint}"
        )
    for e in kept:
        if not (images_dir / e.relpath).is_file():
            problems.add("missing image files", images_dir / e.relpath)
    dropped = problems.settle(partial)
    if not present:
        raise DataError(f"{problems.what}: no usable image-caption pairs")

    images, captions, txt_to_img = [], [], []
    n_cut = n_truncated = 0
    for row, e in enumerate(present):
        caps = e.captions
        if captions_per_image is not None and len(caps) > captions_per_image:
            n_cut += len(caps) - captions_per_image
            caps = caps[:captions_per_image]
        for c in caps:
            words = c.split()
            if max_caption_words is not None and len(words) > max_caption_words:
                c = " ".join(words[:max_caption_words])
                n_truncated += 1
            captions.append(c)
            txt_to_img.append(row)
        images.append(str(images_dir / e.relpath))
    info = {
        "dropped": dropped,
        "partial": bool(dropped),
        "captions_per_image": captions_per_image,
        "captions_cut": n_cut,  # captions beyond captions_per_image, not used
        "truncation": {"max_caption_words": max_caption_words, "n_truncated": n_truncated},
    }
    return images, captions, np.asarray(txt_to_img, dtype=np.int64), info


def pick_images_dir(root: Path, relpaths: list[str], explicit: str | None, candidates: tuple[str, ...]) -> Path:
    """`root/explicit`, or the first candidate folder holding one of the first listed images."""
    if explicit is not None:
        return root / explicit
    probe = relpaths[:20]
    for c in candidates:
        if any((root / c / r).is_file() for r in probe):
            return root / c
    return root / candidates[0]

"""Image-text retrieval: COCO 5K and Flickr30K 1K (Karpathy test splits), and their I2I variants.

Protocol (docs/benchmarks.md): exact dot-product scores between L2-normalised embeddings;
text->image R@k counts a caption as a hit when its image is in its top k; image->text R@k counts an
image as a hit when ANY of its captions is in its top k. Metrics are fractions in [0, 1]; the
paper's numbers (`paper`) are percent.

Each benchmark reads one of two file formats from `root`, auto-detected (Karpathy first):

- Karpathy: `dataset_coco.json` / `dataset_flickr30k.json`, every split in one file; the entries
  whose `split` is the `split` option are used (restval/train/val are skipped).
- CLIP_benchmark: `coco_{split}_karpathy.json` (COCO caption format: `images` with `id`,
  `file_name`, and `annotations` with `image_id`, `caption`) / `flickr30k_{split}_karpathy.txt`
  (a header line, then `image.jpg,caption` lines).

Images are looked up under `root/<images>/`, where `images` is an option. Left unset, the first
folder of the benchmark's `image_dirs` that holds the first listed images is used (recorded as
`info["images_dir"]`): for COCO "" (root itself: `root/val2014/COCO_val2014_*.jpg` via Karpathy's
`filepath`), then "val2014" (CLIP_benchmark's bare `file_name`), then "images"; for Flickr30K
"flickr30k-images", "images", "Images", then "" (root itself).

The I2I variants (`coco_i2i`, `flickr30k_i2i`) draw every caption as black DejaVuSans-40 text on
an 800x400 white canvas and retrieve image->image. Their "t2i" metrics are rendered caption ->
photo, their "i2t" metrics photo -> rendered caption; the paper's I2I R@1 is taken to be t2i.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from slq.benchmarks.base import (
    Benchmark,
    Corpus,
    DataError,
    MissingData,
    Result,
    files_hash,
    register_benchmark,
)
from slq.io import write_bytes_atomic
from slq.progress import bar as progress_bar
from slq.retrieval import image_text_ranks, recall_curve, summarize

CURVE_K = 50  # curves cover recall at k = 1..max(CURVE_K, max(ks))
N_EXAMPLES = 3  # examples quoted per problem in error messages

# The paper's recipe: the chat template with no instruction, for texts and for plain images.
# Roles (text, image, rendered = I2I captions drawn as images) are embedded with the prompts the
# checkpoint was trained with unless a benchmark or its options say otherwise: a query bank is
# trained for one prompt, and the methods it is compared with (E5-V style) have their own.
DEFAULT_PROMPTS: dict[str, dict] = {}


# --- the loaded test set --------------------------------------------------------------------------


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


# --- file formats ---------------------------------------------------------------------------------


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


# --- caption rendering (I2I) ----------------------------------------------------------------------

RENDER_VERSION = 1  # bump when the drawing changes: rendered files and embeddings are keyed on it
CANVAS = (800, 400)
FONT_SIZE = 40
MARGIN = 20


def find_font(path: str | None = None) -> str | None:
    """DejaVuSans.ttf: the given path, matplotlib's bundled copy, the system's; None = PIL's default."""
    if path is not None:
        if not Path(path).is_file():
            raise MissingData(f"I2I font file not found: {path}")
        return str(path)
    try:
        import matplotlib

        bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if bundled.is_file():
            return str(bundled)
        from matplotlib import font_manager

        found = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=False)
        if found and Path(found).is_file():
            return found
    except (ImportError, ValueError):
        pass
    system = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    return str(system) if system.is_file() else None


class CaptionRenderer:
    """Draw captions as images: black text on an 800x400 white canvas, DejaVuSans size 40.

    With `wrap` (the default) words are wrapped greedily to the canvas width minus 20 px margins
    and the block is centred vertically (text past the bottom edge is cut and counted). With
    `wrap=False` the caption is one line starting at (20, 200), as the reference code draws it.
    Files are greyscale PNGs, content-addressed (render spec + text), written once, byte-identical
    for the same font file and Pillow/FreeType versions.
    """

    def __init__(self, font: str | None = None, wrap: bool = True):
        import PIL
        from PIL import ImageFont, features

        self.font_path = find_font(font)
        if self.font_path is None:
            warnings.warn("DejaVuSans.ttf not found; rendering captions with PIL's default font", stacklevel=2)
            self.font = ImageFont.load_default(size=FONT_SIZE)
            font_id = "pil-default"
        else:
            self.font = ImageFont.truetype(self.font_path, FONT_SIZE)
            font_id = hashlib.sha256(Path(self.font_path).read_bytes()).hexdigest()[:16]
        self.wrap = wrap
        self._widths: dict[str, float] = {}  # advance of each word seen, in pixels
        ascent, descent = self.font.getmetrics()
        self.line_height = ascent + descent
        self.spec = {
            "version": RENDER_VERSION, "canvas": list(CANVAS), "mode": "L", "font_size": FONT_SIZE, "margin": MARGIN,
            "wrap": wrap, "font": self.font_path or "PIL default", "font_sha256": font_id,
            "pillow": PIL.__version__, "freetype": features.version("freetype2"),
        }
        self.spec_hash = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:12]

    def width(self, s: str) -> float:
        w = self._widths.get(s)
        if w is None:
            w = self._widths[s] = self.font.getlength(s)
        return w

    def lines(self, text: str) -> list[str]:
        """Greedy word wrap: a line's width is its words' advances plus one space advance between each.

        A word wider than a line is split by characters.
        """
        limit = CANVAS[0] - 2 * MARGIN
        space = self.width(" ")
        out, line, used = [], [], 0.0
        for word in text.split():
            while len(word) > 1 and self.width(word) > limit:  # break an overlong word
                cut = len(word) - 1
                while cut > 1 and self.font.getlength(word[:cut]) > limit:
                    cut -= 1
                if line:
                    out.append(" ".join(line))
                    line, used = [], 0.0
                out.append(word[:cut])
                word = word[cut:]
            w = self.width(word)
            if line and used + space + w > limit:
                out.append(" ".join(line))
                line, used = [], 0.0
            used = used + space + w if line else w
            line.append(word)
        if line:
            out.append(" ".join(line))
        return out

    def layout(self, text: str) -> tuple[list[tuple[int, str]], bool]:
        """(y, line) pairs to draw, and whether any text falls off the canvas."""
        if not self.wrap:
            return [(CANVAS[1] // 2, text)], self.width(text) > CANVAS[0] - MARGIN
        lines = self.lines(text)
        block = len(lines) * self.line_height
        top = max(MARGIN, (CANVAS[1] - block) // 2)
        return [(top + i * self.line_height, s) for i, s in enumerate(lines)], top + block > CANVAS[1]

    def render(self, text: str):
        """The caption as a greyscale PIL image (black text on white; the encoder converts to RGB)."""
        from PIL import Image, ImageDraw

        img = Image.new("L", CANVAS, 255)
        draw = ImageDraw.Draw(img)
        for y, line in self.layout(text)[0]:
            draw.text((MARGIN, y), line, fill=0, font=self.font)
        return img

    def render_all(self, texts: list[str], out_dir: str | Path, progress: bool = True) -> tuple[list[str], int]:
        """Render (or reuse) every caption under out_dir/<spec hash>/; returns paths and how many are cut off.

        Drawing runs here; PNG encoding (most of the time) runs in a few threads, a chunk at a time.
        """
        from concurrent.futures import ThreadPoolExecutor

        folder = Path(out_dir) / self.spec_hash
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "render.json"
        if not meta.exists():
            write_bytes_atomic(meta, (json.dumps(self.spec, sort_keys=True, indent=2) + "\n").encode())
        unique = list(dict.fromkeys(texts))
        cut = {t: self.layout(t)[1] for t in unique}
        todo = [t for t in unique if not self.path_for(out_dir, t).exists()]
        bar = progress_bar(len(todo), "render captions", progress and len(todo) >= 100)
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for i in range(0, len(todo), 64):
                chunk = [(self.render(t), self.path_for(out_dir, t)) for t in todo[i:i + 64]]
                list(pool.map(_save_png, chunk))
                bar.update(len(chunk))
        bar.close()
        return [str(self.path_for(out_dir, t)) for t in texts], sum(cut[t] for t in texts)

    def path_for(self, out_dir: str | Path, text: str) -> Path:
        """Where a caption's image lives under out_dir (content-addressed by render spec and text)."""
        return Path(out_dir) / self.spec_hash / f"{hashlib.sha256(text.encode('utf-8')).hexdigest()[:24]}.png"


def _save_png(item) -> None:
    img, path = item
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    write_bytes_atomic(path, buf.getvalue())


def work_dir(embedder) -> Path:
    """Where derived files (rendered captions, extracted images) go: beside the embedding cache."""
    cache = getattr(embedder, "dir", None)
    if cache is not None:
        return Path(cache).parent
    return Path(tempfile.gettempdir()) / "slq-benchmarks"


# --- the benchmarks -------------------------------------------------------------------------------


class ImageTextBenchmark(Benchmark):
    """Retrieval between images and captions, both ways. Subclasses implement `load`."""

    prompts: ClassVar[dict] = DEFAULT_PROMPTS
    render_captions = False  # True: I2I, captions are drawn as images and embedded as images
    options_allowed = frozenset({"prompts", "split", "images", "format", "captions_per_image",
                                 "max_caption_words", "render_dir", "font", "wrap"})
    option_defaults: ClassVar[dict] = {"split": "test", "captions_per_image": 5, "max_caption_words": None}

    def __init__(self, root=None, partial: bool = False, **options):
        unknown = set(options) - self.options_allowed
        if unknown:
            raise ValueError(f"benchmark {self.name!r}: unknown option(s) {sorted(unknown)}; "
                             f"allowed: {sorted(self.options_allowed)}")
        super().__init__(root, partial, **{**self.option_defaults, **options})
        if self.root is None and getattr(self, "default_root", None) is None:
            raise MissingData(f"benchmark {self.name!r} needs `root`: the folder holding its files "
                              "(see the README for the layout)")
        if self.root is None:
            self.root = Path(self.default_root)

    def role_prompt(self, role: str) -> dict:
        """The prompt fields one role is embedded with: the defaults, then options["prompts"][role]."""
        return {**DEFAULT_PROMPTS.get(role, {}), **type(self).prompts.get(role, {}), **self.prompts.get(role, {})}

    def load(self, workdir: Path) -> PairSet:
        raise NotImplementedError

    def evaluate(self, embedder, ks=(1, 5, 10)) -> Result:
        ks = list(ks)
        workdir = work_dir(embedder)
        pairs = self.load(workdir)
        info = {**pairs.info, "n_images": len(pairs.images), "n_texts": len(pairs.captions),
                "files": [str(f) for f in pairs.files], "data_hash": pairs.data_hash,
                "files_hash": pairs.data_hash,  # the name slq.benchmarks.report reads
                "partial_requested": self.partial, "paper": dict(self.paper)}
        if info.get("partial"):
            info["missing"] = [f"{n} {reason}" for reason, n in info["dropped"].items()]
        gallery = Corpus("image", pairs.images, self.role_prompt("image"), pairs.data_hash)
        if self.render_captions:
            renderer = CaptionRenderer(self.options.get("font"), self.options.get("wrap", True))
            out = Path(self.options.get("render_dir") or workdir / "rendered_i2i")
            paths, n_cut = renderer.render_all(pairs.captions, out)
            queries = Corpus("image", paths, self.role_prompt("rendered"), f"{pairs.data_hash}-{renderer.spec_hash}")
            info["render"] = {**renderer.spec, "render_dir": str(out / renderer.spec_hash), "n_text_cut_off": n_cut}
            info["prompts"] = {"image": gallery.prompt, "rendered": queries.prompt}
        else:
            queries = Corpus("text", pairs.captions, self.role_prompt("text"), pairs.data_hash)
            info["prompts"] = {"image": gallery.prompt, "text": queries.prompt}
        img = _embed(embedder, gallery)  # (N_img, D)
        txt = _embed(embedder, queries)  # (N_txt, D)
        depth = max(CURVE_K, *ks)
        ranks = image_text_ranks(img, txt, pairs.txt_to_img, k=depth)
        curves = {d: recall_curve(ranks[d], depth).tolist() for d in ("t2i", "i2t")}
        return Result(metrics=summarize(ranks, ks), curves=curves, info=info)


def _embed(embedder, corpus: Corpus) -> np.ndarray:
    emb = np.asarray(embedder.embed(corpus), dtype=np.float32)
    if emb.ndim != 2 or len(emb) != len(corpus.items):
        raise ValueError(f"embedder returned shape {emb.shape} for {len(corpus.items)} {corpus.kind} items")
    return emb


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
            "Point `root` in params.yaml at a local copy laid out as in the README."
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
    """COCO 5K with captions rendered as images; t2i = rendered caption -> photo (paper: R@1 55.4)."""

    paper: ClassVar[dict[str, float]] = {"t2i_R@1": 55.4}
    render_captions = True


@register_benchmark("flickr30k_i2i")
class Flickr30kI2I(Flickr30k):
    """Flickr30K 1K with captions rendered as images; t2i = rendered caption -> photo (paper: R@1 90.2)."""

    paper: ClassVar[dict[str, float]] = {"t2i_R@1": 90.2}
    render_captions = True

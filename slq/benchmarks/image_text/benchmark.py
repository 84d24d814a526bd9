"""`ImageTextBenchmark`: embed a loaded `PairSet` (through the embedder's cache) and score it.

Subclasses implement `load` (which files, which checks); this class embeds the gallery images
and the captions (or, for I2I, the captions drawn as images), ranks exactly both ways, and
returns recall at the asked ks plus recall curves up to k = max(CURVE_K, max(ks)).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from slq.benchmarks.base import Benchmark, Corpus, MissingData, Result
from slq.benchmarks.image_text.pairs import PairSet
from slq.benchmarks.image_text.render import CaptionRenderer
from slq.retrieval import image_text_ranks, recall_curve, summarize

CURVE_K = 50  # curves cover recall at k = 1..max(CURVE_K, max(ks))

# The paper's recipe: the chat template with no instruction, for texts and for plain images.
# Roles (text, image, rendered = I2I captions drawn as images) are embedded with the prompts the
# checkpoint was trained with unless a benchmark or its options say otherwise: a query bank is
# trained for one prompt, and the methods it is compared with (E5-V style) have their own.
DEFAULT_PROMPTS: dict[str, dict] = {}


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
                              "(see docs/benchmarks-data.md for the layout)")
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
                "files_hash": pairs.data_hash,  # the name slq.mlops.benchmark_report reads
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


def work_dir(embedder) -> Path:
    """Where derived files (rendered captions, extracted images) go: beside the embedding cache."""
    cache = getattr(embedder, "dir", None)
    if cache is not None:
        return Path(cache).parent
    return Path(tempfile.gettempdir()) / "slq-benchmarks"

"""The built-in synthetic world (slq.miniature.world) as a benchmark: caption <-> image on one split.

`root` (default data/world) holds `manifest.jsonl`, one row per caption: `{id, image_id, image,
caption, split}` with `image` relative to root. All of an image's captions are kept by default
(`captions_per_image: null`). `world_i2i` draws the captions as images (the COCO/Flickr I2I
renderer) and retrieves image->image; its t2i = rendered caption -> image.
"""

from __future__ import annotations

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
    require,
)
from slq.benchmarks.composed import GALLERY_PROMPT, QUERY_PROMPT
from slq.benchmarks.image_text import (
    Entry,
    ImageTextBenchmark,
    PairSet,
    Problems,
    assemble,
)
from slq.miniature.world import (
    COLOURS,
    knowledge_caption,
    load_manifest,
    load_scenes,
    render_scene,
    train_captions,
)
from slq.io import write_bytes_atomic


@register_benchmark("world")
class World(ImageTextBenchmark):
    """The synthetic world's `split` (default test), caption -> image and image -> caption."""

    default_root = "data/world"
    # False: it reads only the manifest (image, caption, split), so on your own data (data.builtin:
    # false) it is that data's own retrieval task; True: it needs the world's scene files
    needs_world: ClassVar[bool] = False
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


def _test_images(root: Path, split: str, manifest: str = "manifest.jsonl") -> list[tuple[str, str]]:
    """(image_id, relative path) of the split's distinct images, in manifest order."""
    rows = [r for r in load_manifest(root, manifest) if r.get("split") == split]
    if not rows:
        raise MissingData(f"world ({root / manifest}): no rows in split {split!r}")
    return list(dict.fromkeys((r["image_id"], r["image"]) for r in rows))


def _scenes(root: Path) -> dict:
    try:
        return load_scenes(root)
    except FileNotFoundError as e:
        raise MissingData(str(e)) from None


@register_benchmark("world_knowledge")
class WorldKnowledge(World):
    """Knowledge-aware retrieval on the world (in the spirit of KARR-Bench): each image gets one
    caption that names no shape, colour or count, only facts about them ("the shape with three
    sides in the colour of a clear sky", "(1+1) shapes"). Literal training captions never state
    these facts, so only knowledge the backbone holds can match them."""

    needs_world: ClassVar[bool] = True  # the scene files (or the world's vocabulary): the world only

    options_allowed = frozenset({"prompts", "split", "manifest", "seed"})
    option_defaults: ClassVar[dict] = {"split": "test", "manifest": "manifest.jsonl", "seed": 0}

    def load(self, workdir: Path) -> PairSet:
        import random

        images = _test_images(self.root, self.options["split"], self.options["manifest"])
        scenes = _scenes(self.root)
        missing = [i for i, _ in images if i not in scenes]
        if missing:
            raise DataError(f"world_knowledge: {len(missing)} image(s) have no scene in scenes.jsonl, "
                            f"e.g. {missing[:5]}; regenerate the world")
        captions = [knowledge_caption(scenes[i], random.Random(f"{self.options['seed']}-{i}")) for i, _ in images]
        files = [self.root / self.options["manifest"], self.root / "scenes.jsonl"]
        info = {"format": "world_knowledge", "split": self.options["split"], "images_dir": str(self.root),
                "partial": False, "captions_per_image": 1, "truncation": None, "example": captions[0]}
        return PairSet([self.root / p for _, p in images], captions, np.arange(len(images)), files, info)


@register_benchmark("world_everyday")
class WorldEveryday(World):
    """Retrieval through the frozen LM's own everyday knowledge: each scene named only by
    cues a knowledge probe showed the LM to know ("shaped like a wheel, the colour of snow"; counts
    "as many shapes as there are wheels on a bicycle"), none of them stated in any training caption.
    `cues`: the probe report (the pretrain stage writes it for a real LM: pretrain.knowledge).

    Only scenes whose every colour and shape has a known cue can be asked about, so the split's
    images are those scenes (both ways: each image has its one caption); `info` says how many of
    the split's images that is."""

    needs_world: ClassVar[bool] = True  # the scene files (or the world's vocabulary): the world only

    options_allowed = frozenset({"prompts", "split", "manifest", "seed", "cues"})
    option_defaults: ClassVar[dict] = {"split": "test", "manifest": "manifest.jsonl", "seed": 0, "cues": None}

    def load(self, workdir: Path) -> PairSet:
        import random

        from slq.miniature import knowledge

        if not self.options["cues"]:
            raise MissingData("world_everyday needs `cues`: the knowledge probe report of the backbone's LM "
                              "(pretrain.knowledge, written by the pretrain stage for a real LM)")
        cues_path = Path(self.options["cues"])
        try:
            known = knowledge.load_known(cues_path)
        except FileNotFoundError as e:
            raise MissingData(str(e)) from None
        except ValueError as e:
            raise DataError(str(e)) from None
        split, manifest = self.options["split"], self.options["manifest"]
        train = train_captions(self.root, manifest)
        try:
            knowledge.check_unseen(known, train)
        except ValueError as e:
            raise DataError(f"world_everyday: {e} (a training caption of {self.root / manifest})") from None
        images = _test_images(self.root, split, manifest)
        scenes = _scenes(self.root)
        kept, captions = [], []
        for image_id, rel in images:
            if image_id not in scenes:
                raise DataError(f"world_everyday: image {image_id!r} has no scene in scenes.jsonl; regenerate "
                                "the world")
            text = knowledge.everyday_caption(scenes[image_id], known, random.Random(f"{self.options['seed']}-{image_id}"))
            if text is not None:
                kept.append(rel)
                captions.append(text)
        if not kept:
            raise DataError(f"world_everyday: no {split} scene can be named through the known cues of {cues_path} "
                            f"({len(known)} answers known)")
        files = [self.root / manifest, self.root / "scenes.jsonl", cues_path]
        info = {"format": "world_everyday", "split": split, "images_dir": str(self.root), "partial": False,
                "captions_per_image": 1, "truncation": None, "example": captions[0], "cues": str(cues_path),
                "n_images": len(kept), "n_split_images": len(images),
                "answers_known": sorted(f"{k}:{a}" for k, a in known)}
        return PairSet([self.root / p for p in kept], captions, np.arange(len(kept)), files, info)


@register_benchmark("world_composed")
class WorldComposed(Benchmark):
    """Composed retrieval on the world (CIRR-style): reference image + "make the <shape> <colour>"
    -> the same scene with that shape recoloured. Targets are rendered from the scene file (with
    the world's renderer) next to the embedding cache; the gallery is the split's images plus
    every target, and each query's reference image is removed from its own ranking."""

    needs_world: ClassVar[bool] = True  # the scene files (or the world's vocabulary): the world only

    prompts: ClassVar[dict] = {"query": QUERY_PROMPT, "gallery": GALLERY_PROMPT}  # CIRR's: the reference's, verbatim

    def evaluate(self, embedder, ks=(1, 5, 10)) -> Result:
        import io
        import json
        import random

        from slq.benchmarks.image_text import work_dir
        from slq.retrieval import first_hit_rank, recall_curve, recall_from_ranks, topk

        root = Path(self.root or "data/world")
        split = self.options.get("split", "test")
        images = _test_images(root, split)
        scenes = _scenes(root)
        size = json.loads((root / "world.json").read_text())["image_size"] if (root / "world.json").exists() else 64
        out = Path(self.options.get("render_dir") or work_dir(embedder) / "world_composed") / f"{split}-{size}"
        out.mkdir(parents=True, exist_ok=True)
        queries, targets = [], []
        for image_id, rel in images:
            rng = random.Random(f"composed-{image_id}")
            scene = list(scenes[image_id])
            k = rng.randrange(len(scene))
            obj_size, colour, shape, pos = scene[k]
            new = rng.choice([c for c in COLOURS if c != colour])
            scene[k] = (obj_size, new, shape, pos)
            target = out / f"{image_id}-target.png"
            if not target.exists():
                buf = io.BytesIO()
                render_scene(scene, size, rng).save(buf, format="PNG")
                write_bytes_atomic(target, buf.getvalue())
            queries.append((root / rel, f"make the {shape} {new}"))
            targets.append(target)
        gallery = [root / rel for _, rel in images] + targets
        data_hash = files_hash([root / "manifest.jsonl", root / "scenes.jsonl"])
        q = embedder.embed(Corpus("multimodal", queries, self.prompts["query"], data_hash))  # (N, D)
        g = embedder.embed(Corpus("image", gallery, self.prompts["gallery"], data_hash))  # (2N, D)
        n = len(images)
        depth = max(50, *ks)
        ranked, _ = topk(q, g, depth, exclude=np.arange(n))  # the reference is not an answer
        ranks = first_hit_rank(ranked, np.arange(n) + n)
        metrics = recall_from_ranks(ranks, sorted({*ks, 50}))
        info = {"n_queries": n, "n_gallery": len(gallery), "split": split, "render_dir": str(out),
                "files_hash": data_hash, "prompts": self.prompts, "partial": False,
                "example": f"{queries[0][0].name} + {queries[0][1]!r}", "reference_excluded": True}
        return Result(metrics=metrics, curves={"recall": recall_curve(ranks, depth).tolist()}, info=info)

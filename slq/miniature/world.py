"""The built-in synthetic world: small images of coloured shapes, each with literal captions.

It exists so the whole pipeline (validate -> train -> evaluate) runs anywhere without a download,
and so text-to-image retrieval is learnable: every caption names every shape's size, colour, kind
and position, and no scene description repeats anywhere in the world.

The output is byte-identical for a given config (DVC pins it by content hash): one seeded
`random.Random`, integer pixel coordinates, PNGs without metadata, JSON with sorted keys.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from slq.mlops.config import DataConfig
from slq.data.manifest import load_manifest
from slq.io import write_atomic_dir

VERSION = 2  # bump when the rendering or captions change
SPLITS = ("train", "val", "test")
BACKGROUND = (32, 32, 32)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "pink": (250, 130, 190),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = {"small": 0.07, "large": 0.13}  # half-width as a fraction of the image side
POSITIONS = {  # centre as fractions of the image side, and how a caption says it
    "left": ((0.2, 0.5), "on the left"),
    "right": ((0.8, 0.5), "on the right"),
    "top": ((0.5, 0.2), "at the top"),
    "bottom": ((0.5, 0.8), "at the bottom"),
    "center": ((0.5, 0.5), "in the center"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SCENES = "scenes.jsonl"  # one row per image: {image_id, split, objects: [[size, colour, shape, position]]}

# World knowledge that literal captions never state: what a shape or a colour *is*. The
# knowledge-aware task describes scenes only through these facts.
SHAPE_FACTS = {
    "circle": "round shape with no corners",
    "square": "shape with four equal sides and four right angles",
    "triangle": "shape with three sides",
    "star": "shape with five points",
    "diamond": "shape whose four corners point up, down, left and right",
    "cross": "shape like a plus sign",
}
COLOUR_FACTS = {
    "red": "the colour of a ripe tomato",
    "green": "the colour of fresh grass",
    "blue": "the colour of a clear sky",
    "yellow": "the colour of a banana",
    "purple": "the colour of an aubergine",
    "orange": "the colour of a carrot",
    "pink": "the colour of a flamingo",
    "white": "the colour of snow",
}


def generate_world(cfg: DataConfig, root: Path) -> Path:
    """Write the world for `cfg` at `root` (replacing any old one) and return `root`.

    Everything is written to a temporary sibling folder first and renamed into place at the end,
    so an interrupted run never leaves a half-written world behind.
    """
    root = Path(root)
    write_atomic_dir(root, lambda tmp: _write_world(cfg, tmp))
    return root


def train_captions(root: Path, manifest: str = "manifest.jsonl") -> list[str]:
    """Every training caption of the world at `root`: the text a knowledge split must not state."""
    return [r["caption"] for r in load_manifest(root, manifest) if r.get("split") == "train"]


def load_scenes(root: Path) -> dict[str, list[tuple]]:
    """image_id -> the scene's objects (size, colour, shape, position), from scenes.jsonl."""
    path = Path(root) / SCENES
    if not path.is_file():
        raise FileNotFoundError(f"scene file not found: {path} (regenerate the world: slq data generate --force)")
    scenes = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            scenes[row["image_id"]] = [tuple(o) for o in row["objects"]]
    return scenes


def knowledge_caption(scene, rng: random.Random) -> str:
    """A caption that names no shape, colour or count: only facts about them and a sum."""
    objects = list(scene)
    rng.shuffle(objects)
    n = len(objects)
    a = rng.randint(0, n)
    count = f"({a}+{n - a}) shape{'s' if n > 1 else ''}"
    parts = [f"a {size} {SHAPE_FACTS[shape]} in {COLOUR_FACTS[colour]} {POSITIONS[pos][1]}"
             for size, colour, shape, pos in objects]
    return f"{count}: {_join(parts)}"


# --- generation ---------------------------------------------------------------------------------


def _write_world(cfg: DataConfig, out: Path) -> None:
    rng = random.Random(cfg.seed)
    counts = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    seen: set[tuple] = set()  # scene keys across all splits, so no description repeats
    rows, scenes = [], []
    with tqdm(total=sum(counts.values()), desc="world", unit="scene") as bar:
        for split in SPLITS:
            (out / "images" / split).mkdir(parents=True)
            for i in range(counts[split]):
                image_id = f"{split}-{i:05d}"
                scene = _sample_scene(rng, seen)
                rel = f"images/{split}/{image_id}.png"
                render_scene(scene, cfg.image_size, rng).save(out / rel, format="PNG", optimize=False)
                scenes.append({"image_id": image_id, "split": split, "objects": [list(o) for o in scene]})
                for k, caption in enumerate(_captions(scene, cfg.captions_per_image, rng)):
                    rows.append({"id": f"{image_id}-c{k}", "image_id": image_id, "image": rel,
                                 "caption": caption, "split": split})
                bar.update()
    with (out / cfg.manifest).open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    with (out / SCENES).open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in scenes)
    params = {"version": VERSION, "seed": cfg.seed, "n_train": cfg.n_train, "n_val": cfg.n_val,
              "n_test": cfg.n_test, "captions_per_image": cfg.captions_per_image,
              "image_size": cfg.image_size, "manifest": cfg.manifest, "colours": list(COLOURS),
              "shapes": list(SHAPES), "sizes": list(SIZES), "positions": list(POSITIONS)}
    (out / "world.json").write_text(json.dumps(params, sort_keys=True, indent=2) + "\n", encoding="utf-8")


def _sample_scene(rng: random.Random, seen: set, tries: int = 100) -> list[tuple[str, str, str, str]]:
    """1-3 shapes at distinct positions, as (size, colour, shape, position); new if at all possible."""
    for _ in range(tries):
        positions = rng.sample(list(POSITIONS), rng.randint(1, 3))
        scene = [(rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES), p) for p in positions]
        key = tuple(sorted(scene, key=lambda s: s[3]))
        if key not in seen:
            break
    seen.add(key)
    return scene


def render_scene(scene, size: int, rng: random.Random) -> Image.Image:
    """Draw the shapes on a plain background, each jittered by a pixel or two."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    jitter = max(1, size // 32)
    for shape_size, colour, shape, position in scene:
        (fx, fy), _ = POSITIONS[position]
        cx = round(fx * size) + rng.randint(-jitter, jitter)
        cy = round(fy * size) + rng.randint(-jitter, jitter)
        r = max(2, round(SIZES[shape_size] * size))
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = max(1, r // 3)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):  # alternate outer and inner vertices, starting straight up
            rad = r if k % 2 == 0 else r * 0.45
            a = math.pi * k / 5 - math.pi / 2
            points.append((cx + round(rad * math.cos(a)), cy + round(rad * math.sin(a))))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _captions(scene, n: int, rng: random.Random) -> list[str]:
    """`n` literal captions in different phrasings; each names every shape fully."""
    templates = list(_TEMPLATES)
    rng.shuffle(templates)
    out = []
    for k in range(n):
        objects = list(scene)
        rng.shuffle(objects)
        out.append(templates[k % len(templates)](objects))
    return out


def _phrase(obj, with_position: bool = True) -> str:
    size, colour, shape, position = obj
    text = f"a {size} {colour} {shape}"
    return f"{text} {POSITIONS[position][1]}" if with_position else text


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_TEMPLATES = (
    lambda objs: _join([_phrase(o) for o in objs]),
    lambda objs: f"an image of {_join([_phrase(o) for o in objs])}",
    lambda objs: "; ".join(f"{POSITIONS[o[3]][1]} there is {_phrase(o, False)}" for o in objs),
    lambda objs: f"{COUNT_WORDS[len(objs)]} shape{'s' if len(objs) > 1 else ''} on a dark background: "
    + _join([_phrase(o) for o in objs]),
    lambda objs: _join([f"{_phrase(o, False)} ({o[3]})" for o in objs]),
)

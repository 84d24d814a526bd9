"""Captions drawn as images, for the I2I benchmarks (rendered caption -> photo).

Black DejaVuSans-40 text on an 800x400 white canvas; files are content-addressed (render spec +
text) so each caption is drawn once and its embedding is cached like any image's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

from slq.benchmarks.base import MissingData
from slq.io import write_bytes_atomic
from slq.progress import bar as progress_bar

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

"""Input checking: every bad item is reported by its position and what to do about it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class InputError(ValueError):
    """A bad input item (named by its index in the call, and its path when it has one)."""


def load_image(item, index: int) -> Image.Image:
    """A PIL RGB image from a PIL image or a path; unreadable files are a clear error."""
    if isinstance(item, Image.Image):
        return item.convert("RGB") if item.mode != "RGB" else item
    if not isinstance(item, (str, Path)):
        raise InputError(f"image #{index}: expected a PIL image or a file path, got {type(item).__name__}")
    path = Path(item)
    if not path.is_file():
        raise InputError(f"image #{index} ({path}): file not found; check the path or remove the item")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(
            f"image #{index} ({path}): cannot be decoded ({e}); the file is corrupt or not an image — "
            "replace it or remove it from the input"
        ) from None


def check_text(text, index: int, what: str = "text") -> str:
    if not isinstance(text, str):
        raise InputError(f"{what} #{index}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{what} #{index} is empty; every caption or query needs some text")
    return text

"""Checks shared by the HTTP routes of the search service (slq.mlops.service's /search and
slq.mlops.openai_api's /v1/embeddings): the 4xx error, text limits, image paths under the image root
(never a URL) and image decoding."""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse


class RequestError(ValueError):
    """A request the service refuses: `status` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_text(value: str, field: str, max_chars: int) -> str:
    """`value` unless it is blank or over `max_chars` characters (checked before any tokenizing)."""
    if len(value) > max_chars:
        raise RequestError(f"{field} has {len(value):,} characters, over the limit of {max_chars:,} "
                           f"(index.max_text_chars)")
    if not value.strip():
        raise RequestError(f"{field} is empty")
    return value


def resolve_image_path(value: str, root: Path, field: str = "image_url", inline: str = "image_b64") -> Path:
    """The file that `value` (a path relative to `root`, or a file: URL / absolute path inside it)
    names; `..`, other URL schemes and anything outside `root` are refused."""
    parsed = urlparse(value)
    if parsed.scheme == "file":
        raw = unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # http, https, data, ... (one letter: a Windows drive)
        raise RequestError(f"{field}: {parsed.scheme}: URLs are not fetched; give a path under the image "
                           f"root (index.image_root), or send the image as {inline}")
    else:
        raw = value
    if not raw or "\x00" in raw:
        raise RequestError(f"{field} is empty or not a path")
    if ".." in PurePosixPath(raw).parts or ".." in Path(raw).parts:
        raise RequestError(f"{field} {value!r}: '..' is not allowed; give a path under the image root", 403)
    base = root.resolve()
    path = (Path(raw) if Path(raw).is_absolute() else base / raw).resolve()
    if not path.is_relative_to(base):
        raise RequestError(f"{field} {value!r} is outside the image root (index.image_root)", 403)
    if not path.is_file():
        raise RequestError(f"{field} {value!r}: no such file under the image root", 404)
    return path


def decode_image(data: bytes, what: str):
    """A PIL RGB image from file bytes, or a RequestError saying it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{what} cannot be decoded as an image ({str(e).splitlines()[0][:200]})") from None

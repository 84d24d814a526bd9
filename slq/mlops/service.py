"""The search service: top k of the index for a text, an image, or an image + instruction.

    slq serve --search --port 5002          # FastAPI + uvicorn on 127.0.0.1
    POST /search {"text": "a red circle", "k": 5}
    POST /search {"image_b64": "<PNG/JPEG as base64>", "target": "text"}
    POST /search {"image_url": "images/test/test-00003.png", "instruction": "make the star blue"}
    GET  /health

The query is embedded with the project's checkpoint (`train.out`) and searched with slq.mlops.search
(ANN with the index stage's tuned settings, or exact), on the tables of `split` (default
`evaluate.split`); `target` defaults to the other modality (image for text and for image +
instruction, text for an image). Every refused request gets a 4xx status and {"error": "<one
line>"}: an unknown field, text that is empty or longer than `index.max_text_chars` (counted
before anything is tokenized; a body too large for any valid request is refused before it is
read), k outside 1..`index.max_k`, an unknown target or split, an image that cannot be decoded
or is over `index.max_image_bytes`. Images come as base64 or as paths (or file: URLs) under
`index.image_root` (default `data.root`, where the tables' `image` column points); `..` and
paths outside that root are refused, and no URL is fetched. An unexpected failure is a 500
with a one-line message; the traceback goes to the server log only.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from slq.mlops.config import Config
from slq.mlops.search import TARGETS, CheckpointMismatch, Searcher, SearchError

log = logging.getLogger("slq.mlops.service")


class RequestError(ValueError):
    """A request the service refuses: `status` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class SearchRequest(BaseModel):
    """POST /search: one query (text, or an image with an optional instruction) and where to search."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    image_b64: str | None = None
    image_url: str | None = None
    instruction: str | None = None
    k: int = 10
    target: str | None = None
    split: str | None = None


FIELDS = tuple(SearchRequest.model_fields)


def parse_request(body: bytes) -> SearchRequest:
    """The request body as a SearchRequest, or a RequestError naming the first problem."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object with fields {', '.join(FIELDS)}")
    try:
        return SearchRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            raise RequestError(f"unknown field {field!r}; the fields are {', '.join(FIELDS)}") from None
        raise RequestError(f"field {field!r}: {err['msg']}") from None


def check_text(value: str, field: str, max_chars: int) -> str:
    """`value` unless it is blank or over `max_chars` characters (checked before any tokenizing)."""
    if len(value) > max_chars:
        raise RequestError(f"{field} has {len(value):,} characters, over the limit of {max_chars:,} "
                           f"(index.max_text_chars)")
    if not value.strip():
        raise RequestError(f"{field} is empty")
    return value


def resolve_image_path(value: str, root: Path) -> Path:
    """The file that `value` (a path relative to `root`, or a file: URL / absolute path inside it)
    names; `..`, other URL schemes and anything outside `root` are refused."""
    parsed = urlparse(value)
    if parsed.scheme == "file":
        raw = unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # http, https, data, ... (one letter: a Windows drive)
        raise RequestError(f"image_url: {parsed.scheme}: URLs are not fetched; give a path under the image "
                           f"root (index.image_root), or send the image as image_b64")
    else:
        raw = value
    if not raw or "\x00" in raw:
        raise RequestError("image_url is empty or not a path")
    if ".." in PurePosixPath(raw).parts or ".." in Path(raw).parts:
        raise RequestError(f"image_url {value!r}: '..' is not allowed; give a path under the image root", 403)
    base = root.resolve()
    path = (Path(raw) if Path(raw).is_absolute() else base / raw).resolve()
    if not path.is_relative_to(base):
        raise RequestError(f"image_url {value!r} is outside the image root (index.image_root)", 403)
    if not path.is_file():
        raise RequestError(f"image_url {value!r}: no such file under the image root", 404)
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


def load_image(req: SearchRequest, root: Path, max_bytes: int):
    """The request's image (image_b64 or image_url), size-capped and decoded."""
    limit = f"over the limit of {max_bytes:,} bytes (index.max_image_bytes)"
    if req.image_b64 is not None:
        text = req.image_b64
        if text.startswith("data:"):
            text = text.split(",", 1)[-1]
        if len(text) > (max_bytes + 2) // 3 * 4 + 4:
            raise RequestError(f"image_b64 is {limit}", 413)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"image_b64 is not valid base64 (starts {text[:20]!r})") from None
        return decode_image(data, "image_b64")
    path = resolve_image_path(req.image_url, root)
    if path.stat().st_size > max_bytes:
        raise RequestError(f"image_url {req.image_url!r} is {limit}", 413)
    return decode_image(path.read_bytes(), f"image_url {req.image_url!r}")


def body_limit(cfg: Config) -> int:
    """The largest body a valid request can have: a base64 image at the cap, a text and an
    instruction at the cap (each character escaped as up to 12 bytes of JSON), and room for the rest."""
    ic = cfg.index
    return (ic.max_image_bytes + 2) // 3 * 4 + 2 * 12 * ic.max_text_chars + 64 * 1024


class SearchService:
    """Embeds a request's query with the encoder and searches the index with slq.mlops.search.Searcher.

    The encoder is not assumed to be thread-safe: one query is embedded at a time.
    """

    def __init__(self, cfg: Config, encoder, checkpoint_hash: str, *, exact: bool = False, source: str = ""):
        self.cfg, self.encoder = cfg, encoder
        self.searcher = Searcher(cfg, checkpoint_hash, exact=exact, source=source or "the loaded checkpoint")
        self.image_root = cfg.path(cfg.index.image_root or cfg.data.root)
        self._encode_lock = threading.Lock()
        for target in TARGETS:  # the default split's tables: a checkpoint mismatch stops the start
            try:
                self.searcher.table(cfg.evaluate.split, target)
            except CheckpointMismatch:
                raise
            except SearchError:
                pass

    def search(self, req: SearchRequest) -> dict:
        """Check the request (every cheap check before anything is decoded or embedded), embed its
        query and search; RequestError (4xx) for anything the client must change."""
        ic = self.cfg.index
        has_image = req.image_b64 is not None or req.image_url is not None
        if req.image_b64 is not None and req.image_url is not None:
            raise RequestError("give image_b64 or image_url, not both")
        if req.text is not None and has_image:
            raise RequestError("give text, or an image (image_b64 or image_url) with an optional instruction; "
                               "an instruction goes in `instruction`")
        if req.instruction is not None and not has_image:
            raise RequestError("instruction needs an image (image_b64 or image_url); for a text query use `text`")
        if req.text is None and not has_image:
            raise RequestError("the request has no query: give text, image_b64 or image_url")
        if not 1 <= req.k <= ic.max_k:
            raise RequestError(f"k must be between 1 and {ic.max_k} (index.max_k), got {req.k}")
        if req.target is not None and req.target not in TARGETS:
            raise RequestError(f"target {req.target!r}: must be one of {', '.join(TARGETS)}")
        if req.text is not None:
            check_text(req.text, "text", ic.max_text_chars)
        if req.instruction is not None:
            check_text(req.instruction, "instruction", ic.max_text_chars)
        kind = "text" if req.text is not None else "image+instruction" if req.instruction is not None else "image"
        target = req.target or ("text" if kind == "image" else "image")
        split = req.split or self.cfg.evaluate.split
        try:
            self.searcher.table(split, target)  # an unknown split fails before anything is embedded
        except CheckpointMismatch as e:
            raise RequestError(str(e), 409) from None
        except SearchError as e:
            raise RequestError(str(e), 404) from None
        image = load_image(req, self.image_root, ic.max_image_bytes) if has_image else None
        enc = self.encoder
        with self._encode_lock:
            if kind == "text":
                vec = enc.encode_text([req.text], progress=False)[0]
            elif kind == "image":
                vec = enc.encode_image([image], progress=False)[0]
            else:
                vec = enc.encode_multimodal([(image, req.instruction)], progress=False)[0]
        out = self.searcher.search(vec, split, target, req.k)
        return {"query": kind, "target": target, "split": split, "k": req.k, **out}


def create_app(cfg: Config, encoder=None, checkpoint_dir: str | Path | None = None, *, exact: bool = False):
    """The FastAPI app. `encoder`: an SLQEncoder already loaded from `checkpoint_dir` (default
    `train.out`); None loads it as `slq search` does."""
    from slq.checkpoint import checkpoint_hash

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else cfg.path(cfg.train.out)
    if not ckpt.is_dir():
        raise SearchError(f"no checkpoint at {ckpt}: run the pipeline first (`slq run` or `dvc repro`)")
    if encoder is None:
        from slq.mlops.models import load_encoder

        encoder = load_encoder(cfg, queries=ckpt)
    service = SearchService(cfg, encoder, checkpoint_hash(ckpt), exact=exact, source=f"the checkpoint {ckpt}")
    limit = body_limit(cfg)
    app = FastAPI(title="slq search", description="Top k of the SLQ index for a text, an image or an image + "
                  "instruction.")
    app.state.service = service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("search request failed")
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/health")
    def health():
        return {"status": "ok", "checkpoint_hash": service.searcher.checkpoint_hash,
                "split": cfg.evaluate.split, "max_k": cfg.index.max_k}

    @app.post("/search")
    async def search(request: Request):
        try:
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > limit:
                raise RequestError(f"the request body ({int(size):,} bytes) is over the limit of {limit:,} bytes "
                                   f"(index.max_image_bytes, index.max_text_chars)", 413)
            chunks, got = [], 0
            async for chunk in request.stream():
                got += len(chunk)
                if got > limit:
                    raise RequestError(f"the request body is over the limit of {limit:,} bytes "
                                       f"(index.max_image_bytes, index.max_text_chars)", 413)
                chunks.append(chunk)
            req = parse_request(b"".join(chunks))
            return await run_in_threadpool(service.search, req)
        except RequestError as e:
            return error(e.status, str(e))

    return app

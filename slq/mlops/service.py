"""The search service: top k of the index for a text, an image, or an image + instruction.

    slq serve --search --port 5002          # FastAPI + uvicorn on 127.0.0.1
    POST /search {"text": "a red circle", "k": 5}
    POST /search {"image_b64": "<PNG/JPEG as base64>", "target": "text"}
    POST /search {"image_url": "images/test/test-00003.png", "instruction": "make the star blue"}
    GET  /health
    POST /v1/embeddings {"model": "slq-retriever", "input": ["a red circle"]}   (slq.mlops.openai_api)

    slq serve --search --bank knowledge=checkpoints/banks/knowledge --answer   # more banks, answers
    POST /search {"text": "a red circle", "bank": "knowledge"}
    POST /v1/embeddings {"model": "slq-retriever", "input": ["a red circle"], "bank": ["default", "knowledge"]}
    POST /answer {"question": "what is left of the red circle?", "k": 3}       (slq.mlops.answer)

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

Banks (slq.mlops.bank_set): the served checkpoint is bank `default`; `--bank NAME=CKPT` loads more
query banks onto the same backbone (one copy of the weights; a bank of another backbone is refused
by name), `--bank-index NAME=DIR` gives a bank its LanceDB index. `bank` picks one on /search and
/answer; /v1/embeddings takes one or several, several answered from one pass over each input.
`--answer` adds POST /answer: retrieve captions with a bank, then generate an answer with the same
frozen backbone (slq.mlops.answer).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slq.mlops.bank_set import DEFAULT_BANK, BankSet, UnknownBank
from slq.mlops.config import MIN_K, Config
from slq.mlops.http_inputs import RequestError, check_text, decode_image, resolve_image_path
from slq.mlops.openai_api import ERROR_RESPONSES, Embedder, EmbeddingRequest, EmbeddingResponse, OpenAIError, error_body, validation_error
from slq.mlops.search import TARGETS, CheckpointMismatch, Searcher, SearchError

log = logging.getLogger("slq.mlops.service")


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
    bank: str | None = None


FIELDS = tuple(SearchRequest.model_fields)


def search_request_schema(cfg: Config, banks: list[str] | None = None) -> dict:
    """The OpenAPI schema of the /search body, with this configuration's limits: one of a text
    query, an image as base64 or an image path (each image with an optional instruction). The
    route parses the body itself (to cap its size while it streams in), so FastAPI cannot derive this."""
    ic = cfg.index
    text = {"type": "string", "minLength": 1, "maxLength": ic.max_text_chars, "pattern": r"\S",
            "description": f"not blank, at most {ic.max_text_chars:,} characters (index.max_text_chars)"}
    none = {"type": "null"}
    common = {
        "k": {"type": "integer", "minimum": MIN_K, "maximum": ic.max_k, "default": 10,
              "description": f"how many hits, {MIN_K}..{ic.max_k} (index.max_k)"},
        "target": {"anyOf": [{"type": "string", "enum": list(TARGETS)}, none],
                   "description": "the modality searched; default: the other one (image for a text or an "
                                  "image + instruction, text for an image)"},
        "split": {"anyOf": [{"type": "string"}, none],
                  "description": "the index tables' split; default evaluate.split (an unknown one is a 404)"},
        "bank": {"anyOf": [{"type": "string", "enum": list(banks or [DEFAULT_BANK])}, none],
                 "description": f"the query bank that embeds the query and whose index is searched; default "
                                f"{DEFAULT_BANK!r} (the served checkpoint)"},
    }
    b64 = {"type": "string", "format": "image-base64", "minLength": 1, "description": "a PNG/JPEG as base64 (or a data: URI), at most "
           f"{ic.max_image_bytes:,} bytes decoded (index.max_image_bytes)"}
    url = {"type": "string", "minLength": 1, "description": "a path (or file: URL) under the image root "
           "(index.image_root); '..' and paths outside it are refused and no URL is fetched"}

    def variant(title: str, required: str, **fields) -> dict:
        props = {"text": none, "image_b64": none, "image_url": none, "instruction": none, **fields, **common}
        return {"title": title, "type": "object", "additionalProperties": False, "required": [required],
                "properties": props}

    return {"title": "SearchRequest", "description": SearchRequest.__doc__, "oneOf": [
        variant("TextQuery", "text", text=text),
        variant("ImageQuery", "image_b64", image_b64=b64, instruction={"anyOf": [text, none]}),
        variant("ImagePathQuery", "image_url", image_url=url, instruction={"anyOf": [text, none]}),
    ]}


class SearchHit(BaseModel):
    id: str | None = None
    image_id: str | None = None
    caption: str | None = None
    image: str | None = None
    split: str | None = None
    checkpoint_hash: str | None = None
    score: float


class SearchMode(BaseModel):
    """{"mode": "exact", "why"} or {"mode": "ann", "index_type", "metric", "nprobes", "refine_factor", ...}."""

    model_config = ConfigDict(extra="allow")
    mode: Literal["exact", "ann"]
    why: str | None = None


class SearchResponse(BaseModel):
    query: Literal["text", "image", "image+instruction"]
    target: Literal["image", "text"]
    split: str
    k: int
    table: str
    search: SearchMode
    hits: list[SearchHit] = Field(description="best first")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    checkpoint_hash: str
    split: str
    max_k: int
    banks: dict[str, str] = Field(description="each served bank's checkpoint hash, `default` first")
    answer: bool = Field(description="whether POST /answer is served")


MAX_NEW_TOKENS = 256


class AnswerRequest(BaseModel):
    """POST /answer: a question; the top k captions of the bank's index are the context."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="not blank, at most index.max_text_chars characters")
    k: int = Field(3, description="captions retrieved as context, 1..index.max_k")
    bank: str | None = Field(None, description="the query bank that retrieves; default 'default'")
    split: str | None = Field(None, description="the index tables' split; default evaluate.split")
    max_new_tokens: int = Field(48, ge=1, le=MAX_NEW_TOKENS, description="greedy generation's budget")


class AnswerUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AnswerResponse(BaseModel):
    answer: str
    bank: str
    hits: list[SearchHit] = Field(description="the retrieved context, best first")
    usage: AnswerUsage


class ErrorMessage(BaseModel):
    """Every refused /search or /health request: a one-line message."""

    error: str


SEARCH_ERRORS = {
    403: {"model": ErrorMessage, "description": "an image_url with '..' or outside the image root"},
    404: {"model": ErrorMessage, "description": "no index for the split or the bank, no such bank, or no "
                                                "such image file"},
    409: {"model": ErrorMessage, "description": "the index was written by another checkpoint"},
    413: {"model": ErrorMessage, "description": "the body or the image is over the limit"},
    422: {"model": ErrorMessage, "description": "the body is not JSON, has an unknown field or a bad value, "
                                                "or its image cannot be decoded"},
    500: {"model": ErrorMessage, "description": "an unexpected failure (the traceback is in the server log)"},
}


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

    def __init__(self, cfg: Config, encoder, checkpoint_hash: str, *, exact: bool = False, source: str = "",
                 banks=None, bank_indexes=None):
        self.cfg, self.encoder = cfg, encoder
        self.searcher = Searcher(cfg, checkpoint_hash, exact=exact, source=source or "the loaded checkpoint")
        self.image_root = cfg.path(cfg.index.image_root or cfg.data.root)
        self._encode_lock = threading.Lock()
        self.searcher.check_tables(cfg.evaluate.split)  # a table of another checkpoint stops the start
        self.banks = BankSet(cfg, encoder, checkpoint_hash, self.searcher, banks, bank_indexes, exact=exact,
                             source=source)

    def bank(self, name: str | None):
        """The named bank (default: the served checkpoint's) and its searcher; RequestError 404 when the
        service has no such bank or the bank no index."""
        try:
            bank = self.banks.get(name)
        except UnknownBank as e:
            raise RequestError(str(e), 404) from None
        if bank.searcher is None:
            raise RequestError(f"bank {bank.name!r} has no index to search (it embeds only): start the service "
                               f"with --bank-index {bank.name}=DIR, a LanceDB index built with its checkpoint", 404)
        return bank

    @staticmethod
    def open_table(bank, split: str, target: str) -> None:
        """The bank's table for (split, target), checked before anything is embedded: RequestError 409
        when another checkpoint wrote it, 404 when there is none."""
        try:
            bank.searcher.table(split, target)
        except CheckpointMismatch as e:
            raise RequestError(str(e), 409) from None
        except SearchError as e:
            raise RequestError(str(e), 404) from None

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
        if (why := ic.k_error(req.k)) is not None:
            raise RequestError(why)
        if req.target is not None and req.target not in TARGETS:
            raise RequestError(f"target {req.target!r}: must be one of {', '.join(TARGETS)}")
        if req.text is not None:
            check_text(req.text, "text", ic.max_text_chars)
        if req.instruction is not None:
            check_text(req.instruction, "instruction", ic.max_text_chars)
        kind = "text" if req.text is not None else "image+instruction" if req.instruction is not None else "image"
        target = req.target or ("text" if kind == "image" else "image")
        split = req.split or self.cfg.evaluate.split
        bank = self.bank(req.bank)
        self.open_table(bank, split, target)  # an unknown split fails before anything is embedded
        image = load_image(req, self.image_root, ic.max_image_bytes) if has_image else None
        enc = bank.encoder
        with self._encode_lock:
            if kind == "text":
                vec = enc.encode_text([req.text], progress=False)[0]
            elif kind == "image":
                vec = enc.encode_image([image], progress=False)[0]
            else:
                vec = enc.encode_multimodal([(image, req.instruction)], progress=False)[0]
        out = bank.searcher.search(vec, split, target, req.k)
        return {"query": kind, "target": target, "split": split, "k": req.k, **out}

    def answer(self, req: AnswerRequest, answerer) -> dict:
        """Retrieve the top k captions for the question with the bank, then generate from them with
        the same backbone (slq.mlops.answer)."""
        ic = self.cfg.index
        check_text(req.question, "question", ic.max_text_chars)
        if (why := ic.k_error(req.k)) is not None:
            raise RequestError(why)
        bank = self.bank(req.bank)
        split = req.split or self.cfg.evaluate.split
        self.open_table(bank, split, "text")
        with self._encode_lock:
            vec = bank.encoder.encode_text([req.question], progress=False)[0]
        hits = bank.searcher.search(vec, split, "text", req.k)["hits"]
        out = answerer.generate(req.question, [h.get("caption") or "" for h in hits], req.max_new_tokens)
        return {"answer": out["answer"], "bank": bank.name, "hits": hits,
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"]}}


def create_app(cfg: Config, encoder=None, checkpoint_dir: str | Path | None = None, *, exact: bool = False,
               banks=None, bank_indexes=None, answer: bool = False):
    """The FastAPI app. `encoder`: an SLQEncoder already loaded from `checkpoint_dir` (default
    `train.out`); None loads it as `slq search` does. `banks` ({name: checkpoint}) are loaded onto
    its backbone, `bank_indexes` ({name: LanceDB folder}) are their indexes (slq.mlops.bank_set);
    `answer` adds POST /answer (slq.mlops.answer)."""
    from slq.checkpoint import checkpoint_hash

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else cfg.path(cfg.train.out)
    if not ckpt.is_dir():
        raise SearchError(f"no checkpoint at {ckpt}: run the pipeline first (`slq run` or `dvc repro`)")
    if encoder is None:
        from slq.mlops.models import load_encoder

        encoder = load_encoder(cfg, queries=ckpt)
    service = SearchService(cfg, encoder, checkpoint_hash(ckpt), exact=exact, source=f"the checkpoint {ckpt}",
                            banks=banks, bank_indexes=bank_indexes)
    answerer = None
    if answer:
        from slq.mlops.answer import Answerer

        try:
            answerer = Answerer(encoder.backbone, service._encode_lock)
        except ValueError as e:
            raise SearchError(str(e)) from None
    limit = body_limit(cfg)
    app = FastAPI(title="slq search", description="Top k of the SLQ index for a text, an image or an image + "
                  "instruction.")
    app.state.service = service
    app.state.answerer = answerer

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    embedder = Embedder(cfg, encoder, service.image_root, service._encode_lock, banks=service.banks)
    app.state.embedder = embedder
    # /v1/embeddings: FastAPI reads the body whole, so its size is capped while it streams in (each of
    # up to index.max_k inputs at most one /search body); /search caps its own, below
    from slq.mlops.body_cap import BodyCap

    app.add_middleware(BodyCap, limits={"/v1/embeddings": (cfg.index.max_k * limit,
                                                           lambda msg: error_body(413, msg, code="request_too_large"))})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("search request failed")
        message = f"internal error ({type(exc).__name__}); the server log has the details"
        if request.url.path.startswith("/v1/"):
            return JSONResponse(error_body(500, message), status_code=500)
        return error(500, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """FastAPI's own refusals (a body it cannot parse, an unknown route or method) in the route's
        error shape, with their headers (Allow on a 405)."""
        message = str(exc.detail).replace("\n", " ")
        body = error_body(exc.status_code, message) if request.url.path.startswith("/v1/") else {"error": message}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        if request.url.path.startswith("/v1/"):  # OpenAI's error shape on the OpenAI-compatible routes
            e = validation_error(list(exc.errors()))
            return JSONResponse(e.body(), status_code=e.status)
        if request.url.path == "/answer":  # the service's own shape: one line
            err = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid body"}
            field = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
            return error(422, f"field {field!r}: {err.get('msg')}")
        return await request_validation_exception_handler(request, exc)

    @app.get("/health", response_model=HealthResponse, summary="the service is up, and its checkpoint",
             responses={500: SEARCH_ERRORS[500]})
    def health():
        return {"status": "ok", "checkpoint_hash": service.searcher.checkpoint_hash,
                "split": cfg.evaluate.split, "max_k": cfg.index.max_k,
                "banks": {n: b.checkpoint_hash for n, b in service.banks.banks.items()}, "answer": answerer is not None}

    @app.post("/search", summary="top k of the index for a text, an image or an image + instruction",
              responses={200: {"model": SearchResponse, "description": "the hits, best first"}, **SEARCH_ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": search_request_schema(cfg, service.banks.names)}}}})
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

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES,
              response_model_exclude_none=True,
              summary="OpenAI-compatible embeddings of texts, images and images + text")
    def embeddings(req: EmbeddingRequest):
        try:
            return embedder.embed(req)
        except OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status)

    if answerer is not None:
        @app.post("/answer", response_model=AnswerResponse, summary="retrieve captions with a bank, then answer "
                  "with the same frozen backbone", responses={k: v for k, v in SEARCH_ERRORS.items() if k != 403})
        def answer_route(req: AnswerRequest):
            try:
                return service.answer(req, answerer)
            except RequestError as e:
                return error(e.status, str(e))

    return app

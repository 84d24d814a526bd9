"""OpenAI-compatible embeddings on the search service: POST /v1/embeddings.

    {"model": "slq-retriever", "input": "a red circle"}                         one text
    {"model": "slq-retriever", "input": ["a red circle", "a blue square"]}      texts
    {"model": "slq-retriever", "input": [{"role": "user", "content": [          one item per message:
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},   an image,
        {"type": "text", "text": "make it blue"}]}]}                                 + its text
    {"model": "slq-retriever", "messages": [...]}                               vLLM's chat form: one
                                                                                embedding of all messages
    "encoding_format": "float" (default) | "base64" (little-endian float32), "dimensions", "user"

An item is a text (encode_text), an image (encode_image) or an image with text (encode_multimodal);
text parts of one item are joined with a newline, and an item has at most one image. Images come
as data: URIs (base64) or as paths / file: URLs under the image root (`index.image_root`, default
`data.root`), checked as /search checks `image_url`; no URL is fetched. `model` must be the served
model (`register.model_name`, optionally with `@alias` or `/version`), else a 404. Limits: at most
`index.max_k` items per request, each text at most `index.max_text_chars` characters (before
tokenizing), each image at most `index.max_image_bytes`. `dimensions` other than the full one is
refused: SLQ has no trained Matryoshka cut. Usage counts the backbone tokenizer's tokens of the
texts (an image counts its text part only). Errors: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import binascii
import threading
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slq.mlops.config import Config
from slq.mlops.http_inputs import RequestError, check_text, decode_image, resolve_image_path


# ---- the schema ------------------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="a data: URI (data:image/png;base64,...) or a path / file: URL under the "
                                 "image root; http(s) URLs are not fetched")


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    """A chat message as vLLM's embeddings endpoint takes it: text, or parts (at most one image)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "system"] = "user"
    content: str | list[ContentPart]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (OpenAI's body; `input` may also hold chat messages, or `messages` one chat)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the served model: register.model_name, optionally name@alias or name/version")
    input: str | list[str] | list[Message] | None = Field(
        None, description="a text, texts, or chat messages (one embedding each)")
    messages: list[Message] | None = Field(None, description="vLLM's chat form: one embedding of all the messages")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="only the full dimension (no Matryoshka cut is trained)")
    user: str | None = None
    bank: str | list[str] | None = Field(
        None, description="the query bank (default 'default', the served checkpoint), or several: each input's "
                          "embedding from every bank named, all from one pass over the input (an slq extension)")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")
    bank: str | None = Field(None, description="the bank that made it (when the request names banks)")
    input_index: int | None = Field(None, description="the input it embeds (when the request names banks: "
                                                      "`data` is input by input, bank by bank in the order asked)")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "a bad input, too long a text, too many inputs, too large an "
                                                 "image, or a `dimensions` other than the full one"},
    403: {"model": ErrorResponse, "description": "an image path outside the image root"},
    404: {"model": ErrorResponse, "description": "another model than the served one, no such bank, or no such "
                                                 "image file"},
    422: {"model": ErrorResponse, "description": "the body does not match the schema"},
    500: {"model": ErrorResponse, "description": "an unexpected failure (the traceback is in the server log)"},
}

ERROR_TYPES = {404: "not_found_error", 403: "permission_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    etype = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


class OpenAIError(RequestError):
    """A refused /v1/embeddings request: a status, a one-line message, the field and a code."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message, status)
        self.param, self.code = param, code

    def body(self) -> dict:
        return error_body(self.status, str(self), self.param, self.code)


def validation_error(errors: list) -> OpenAIError:
    """FastAPI's validation errors as one OpenAIError (422) naming the first."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid body", "type": ""}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        msg = f"unknown field {field!r}; the fields are {', '.join(EmbeddingRequest.model_fields)}"
    else:
        msg = f"field {field!r}: {err.get('msg')}" if field else str(err.get("msg"))
    return OpenAIError(msg.replace("\n", " "), 422, field, "invalid_value")


# ---- the work --------------------------------------------------------------------------------
def served_model(name: str, served: str) -> bool:
    """True if `name` is `served`, `served@alias` or `served/version`."""
    return name == served or (name.startswith(served) and name[len(served)] in "@/" and len(name) > len(served) + 1)


class Embedder:
    """Turns an EmbeddingRequest into an EmbeddingResponse body with `encoder` (one batch at a time,
    under `lock`, shared with the /search route)."""

    def __init__(self, cfg: Config, encoder, image_root: Path, lock: threading.Lock | None = None, banks=None):
        self.cfg, self.encoder, self.image_root = cfg, encoder, image_root
        self.lock = lock or threading.Lock()
        self.dim = int(encoder.backbone.hidden_size)
        self.banks = banks  # slq.mlops.bank_set.BankSet, or None: the encoder alone

    def bank_names(self, req: EmbeddingRequest) -> list[str] | None:
        """The banks asked for (None: the served checkpoint, the response as OpenAI's)."""
        if req.bank is None:
            return None
        names = [req.bank] if isinstance(req.bank, str) else list(req.bank)
        if not names:
            raise OpenAIError("bank is an empty list; name one bank or more, or leave it out", param="bank")
        if len(set(names)) != len(names):
            raise OpenAIError(f"bank names a bank twice: {names}", param="bank")
        served = self.banks.names if self.banks is not None else ["default"]
        unknown = [n for n in names if n not in served]
        if unknown:
            raise OpenAIError(f"unknown bank {unknown[0]!r}; this server serves {', '.join(map(repr, served))}",
                              404, "bank", "bank_not_found")
        return names

    def items(self, req: EmbeddingRequest) -> list[tuple[str | None, object | None, str]]:
        """The request's items as (text or None, image source or None, param), every cheap check first."""
        ic = self.cfg.index
        if (req.input is None) == (req.messages is None):
            raise OpenAIError("give `input` (a text, texts or messages) or `messages`, not both and not neither",
                              param="input")
        if req.messages is not None:
            if not req.messages:
                raise OpenAIError("messages is empty", param="messages")
            raw = [("messages", req.messages)]
        elif isinstance(req.input, str):
            raw = [("input", req.input)]
        else:
            if not req.input:
                raise OpenAIError("input is an empty list", param="input")
            raw = [(f"input[{i}]", x) for i, x in enumerate(req.input)]
        if len(raw) > ic.max_k:
            raise OpenAIError(f"{len(raw):,} inputs, over the limit of {ic.max_k} per request (index.max_k)",
                              param="input", code="too_many_inputs")
        out = []
        for param, item in raw:
            if isinstance(item, str):
                text, image = item, None
            else:
                messages = item if isinstance(item, list) else [item]
                texts, images = [], []
                for m in messages:
                    for part in [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content:
                        (texts.append(part.text) if part.type == "text" else images.append(part.image_url.url))
                if len(images) > 1:
                    raise OpenAIError(f"{param} has {len(images)} images; an item may have at most one "
                                      f"(send several items for several embeddings)", param=param)
                text = "\n".join(texts) if texts else None
                image = images[0] if images else None
                if text is None and image is None:
                    raise OpenAIError(f"{param} has neither text nor an image", param=param)
            if text is not None:
                try:
                    check_text(text, param, ic.max_text_chars)
                except RequestError as e:
                    code = "context_length_exceeded" if len(text) > ic.max_text_chars else "invalid_value"
                    raise OpenAIError(str(e), 400, param, code) from None
            if image is not None:
                self.check_image_source(image, param)
            out.append((text, image, param))
        return out

    def check_image_source(self, url: str, param: str) -> None:
        max_bytes = self.cfg.index.max_image_bytes
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if ";base64" not in head:
                raise OpenAIError(f"{param}: an image data: URI must be base64 (data:image/png;base64,...)", param=param)
            if len(data) > (max_bytes + 2) // 3 * 4 + 4:
                raise OpenAIError(f"{param}: the image is over the limit of {max_bytes:,} bytes "
                                  f"(index.max_image_bytes)", param=param, code="image_too_large")

    def load_image(self, url: str, param: str):
        max_bytes = self.cfg.index.max_image_bytes
        try:
            if url.startswith("data:"):
                data_b64 = url.partition(",")[2]
                try:
                    data = base64.b64decode(data_b64, validate=True)
                except (binascii.Error, ValueError):
                    raise OpenAIError(f"{param}: the image data: URI is not valid base64", param=param) from None
                return decode_image(data, f"{param} (image)")
            path = resolve_image_path(url, self.image_root, field=f"{param} image_url",
                                      inline="a data:image/...;base64 URI")
            if path.stat().st_size > max_bytes:
                raise OpenAIError(f"{param}: the image {url!r} is over the limit of {max_bytes:,} bytes "
                                  f"(index.max_image_bytes)", param=param, code="image_too_large")
            return decode_image(path.read_bytes(), f"{param} image {url!r}")
        except OpenAIError:
            raise
        except RequestError as e:
            raise OpenAIError(str(e), 400 if e.status == 422 else e.status, param) from None

    def count_tokens(self, texts: list[str]) -> int:
        tok = self.encoder.backbone.tokenizer
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    def embed(self, req: EmbeddingRequest) -> dict:
        """The response body; OpenAIError (4xx) for anything the client must change."""
        served = self.cfg.register.model_name
        if not served_model(req.model, served):
            raise OpenAIError(f"the model {req.model!r} does not exist here; this server serves {served!r} "
                              f"(register.model_name, optionally {served}@alias or {served}/version)",
                              404, "model", "model_not_found")
        if req.dimensions is not None and req.dimensions != self.dim:
            raise OpenAIError(f"dimensions={req.dimensions}: this model only gives its full dimension {self.dim}; "
                              f"SLQ is not trained for a Matryoshka cut", param="dimensions",
                              code="unsupported_dimensions")
        names = self.bank_names(req)
        items = self.items(req)
        if names is not None and len(items) * len(names) > self.cfg.index.max_k:
            raise OpenAIError(f"{len(items)} inputs x {len(names)} banks = {len(items) * len(names)} embeddings, over "
                              f"the limit of {self.cfg.index.max_k} per request (index.max_k)", param="bank",
                              code="too_many_inputs")
        images = {i: self.load_image(img, p) for i, (_, img, p) in enumerate(items) if img is not None}
        groups: dict[str, list[int]] = {"text": [], "image": [], "multimodal": []}
        for i, (text, img, _) in enumerate(items):
            groups["text" if img is None else "image" if text is None else "multimodal"].append(i)
        asked = names or ["default"]
        vecs = {n: np.zeros((len(items), self.dim), dtype=np.float32) for n in asked}
        inputs = {"text": lambda idx: [items[i][0] for i in idx], "image": lambda idx: [images[i] for i in idx],
                  "multimodal": lambda idx: [(images[i], items[i][0]) for i in idx]}
        with self.lock:
            for kind, idx in groups.items():
                if not idx:
                    continue
                if self.banks is None:
                    got = {"default": getattr(self.encoder, f"encode_{kind}")(inputs[kind](idx), progress=False)}
                else:  # several banks: one pass over the inputs for all of them
                    got = self.banks.encode(kind, inputs[kind](idx), asked)
                for n in asked:
                    vecs[n][idx] = got[n]
        tokens = self.count_tokens([t for t, _, _ in items if t is not None])

        def encoded(v):
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if req.encoding_format == "base64" \
                else v.tolist()

        if names is None:
            data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vecs["default"])]
        else:
            data = [{"object": "embedding", "index": i * len(names) + j, "embedding": encoded(vecs[n][i]), "bank": n,
                     "input_index": i} for i in range(len(items)) for j, n in enumerate(names)]
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

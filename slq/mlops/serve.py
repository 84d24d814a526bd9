"""Serve the retriever as an MLflow pyfunc model: a DataFrame of texts/images in, embeddings out.

    model = mlflow.pyfunc.load_model("models:/slq-retriever@champion")
    emb = model.predict(pd.DataFrame({"text": ["a red circle", None], "image": [None, b64_png]}))
    # (2, D) float32, L2-normalised; the same vectors SLQEncoder gives

Each row has a `text`, an `image` (base64 PNG/JPEG bytes or a file path), or both (a composed
query: reference image + instruction). Any other column is refused (a misspelt `txt` would
otherwise be dropped and the row embedded without it), and so is text over `max_text_chars`
characters, before anything is tokenized. The logged model carries the query checkpoint and, by
default, the backbone folder and the `slq` code, so `mlflow models serve` needs nothing else.
This is the only module of the library that imports MLflow (the register stage imports it lazily).
For top-k search against the index rather than embeddings, see slq.mlops.service (`slq serve --search`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Schema, TensorSpec
from PIL import Image, UnidentifiedImageError

from slq.mlops.config import IndexConfig
from slq.inputs import InputError

COLUMNS = ("text", "image")
# What the served model imports; pinned to the versions it was logged with.
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "safetensors", "tokenizers", "numpy",
                    "pillow", "pandas", "tqdm", "pyyaml")


def model_signature(dim: int) -> ModelSignature:
    """Output: a (rows, dim) float32 array. No input schema: MLflow drops the columns a schema
    does not name (with only a log warning), so `{"txt": [...]}` became an empty result and a
    misspelt `imgae` a text-only query; SLQPyfunc.predict checks the columns (`text`, `image`,
    optional strings) itself and refuses any other."""
    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def pip_requirements() -> list[str]:
    """An explicit requirement list (no inference: that imports the model, and can reach the network)."""
    reqs = []
    for name in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")  # drop local tags like +cpu
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def decode_image(value, row: int) -> Image.Image:
    """A PIL RGB image from a file path, base64 text (a `data:` URL prefix is allowed) or raw bytes."""
    if isinstance(value, str):
        try:
            is_file = len(value) < 4096 and Path(value).is_file()
        except OSError:  # e.g. a name too long to be a path
            is_file = False
        if is_file:
            value = Path(value).read_bytes()
        else:
            try:
                value = base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value,
                                         validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"row {row}: `image` is neither an existing file path nor base64 text "
                                 f"(starts {value[:40]!r})") from None
    if not isinstance(value, (bytes, bytearray)):
        raise InputError(f"row {row}: `image` must be a base64 string or a file path, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"row {row}: `image` cannot be decoded as PNG/JPEG ({e})") from None


def _present(value) -> bool:
    """Whether a cell holds something: None, NaN and blank strings count as missing."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


class BadInput(MlflowException, InputError):
    """A bad input column or row, as the MlflowException (INVALID_PARAMETER_VALUE) that `mlflow
    models serve` answers with 400 and this message; any other exception there becomes a generic
    message and a stack trace."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class SLQPyfunc(mlflow.pyfunc.PythonModel):
    """Embeds the rows of a DataFrame with the SLQ encoder logged alongside it.

    Artifacts: `checkpoint` (query checkpoint folder) and `backbone` (HF model folder). Without a
    `backbone` artifact the backbone path comes from model_config["backbone_path"], then from the
    checkpoint manifest. model_config["max_text_chars"] caps a row's text (default: the `index`
    section's default).
    """

    max_text_chars = IndexConfig.max_text_chars

    def load_context(self, context) -> None:
        from slq.methods import from_pretrained

        config = context.model_config or {}
        backbone = context.artifacts.get("backbone") or config.get("backbone_path")
        self.max_text_chars = int(config.get("max_text_chars") or IndexConfig.max_text_chars)
        self.encoder = from_pretrained(backbone=backbone, queries=context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """(N, D) float32 embeddings, one row per input row, in input order; a bad column or row
        raises BadInput (HTTP 400 with its message under `mlflow models serve`)."""
        try:
            return self._embed(model_input)
        except BadInput:
            raise
        except InputError as e:
            raise BadInput(str(e)) from None

    def _embed(self, model_input) -> np.ndarray:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        unknown = [str(c) for c in df.columns if c not in COLUMNS]
        if unknown:
            raise InputError(f"unknown column(s) {unknown}: the model reads only `text` and `image` "
                             f"(check the spelling)")
        if not any(c in df for c in COLUMNS):
            raise InputError("the input has no `text` or `image` column: give one (or both) per row")
        texts = df["text"].tolist() if "text" in df else [None] * len(df)
        images = df["image"].tolist() if "image" in df else [None] * len(df)
        groups: dict[str, list[int]] = {"text": [], "image": [], "both": []}
        decoded: dict[int, Image.Image] = {}
        for i, (t, im) in enumerate(zip(texts, images)):
            has_t, has_im = _present(t), _present(im)
            if not (has_t or has_im):
                raise InputError(f"row {i}: has neither `text` nor `image`; give one (or both)")
            if has_t and not isinstance(t, str):
                raise InputError(f"row {i}: `text` must be a string, got {type(t).__name__}")
            if has_t and len(t) > self.max_text_chars:
                raise InputError(f"row {i}: `text` has {len(t):,} characters, over the limit of "
                                 f"{self.max_text_chars:,}; shorten it")
            if has_im:
                decoded[i] = decode_image(im, i)
            groups["both" if has_t and has_im else "text" if has_t else "image"].append(i)

        enc = self.encoder
        out = np.zeros((len(df), enc.backbone.hidden_size), dtype=np.float32)  # (N, D)
        if rows := groups["text"]:
            out[rows] = enc.encode_text([texts[i] for i in rows], progress=False)
        if rows := groups["image"]:
            out[rows] = enc.encode_image([decoded[i] for i in rows], progress=False)
        if rows := groups["both"]:
            out[rows] = enc.encode_multimodal([(decoded[i], texts[i]) for i in rows], progress=False)
        return out


def log_model(checkpoint_dir: Path, backbone_dir: Path, dim: int, *, log_backbone: bool = True,
              registered_model_name: str | None = None, max_text_chars: int | None = None):
    """Log (in the active run) the pyfunc model with its checkpoint, backbone and `slq` code.

    With `registered_model_name` a new version of that registered model is created too.
    With log_backbone=False only the backbone's path is recorded: the model is then served only
    where that folder exists (for backbones too big to copy into every model version).
    `max_text_chars` (default: the `index` section's default) caps each row's text.
    """
    artifacts = {"checkpoint": str(checkpoint_dir)}
    model_config = {"max_text_chars": int(max_text_chars or IndexConfig.max_text_chars)}
    if log_backbone:
        artifacts["backbone"] = str(backbone_dir)
    else:
        model_config["backbone_path"] = str(Path(backbone_dir).resolve())
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=SLQPyfunc(),
        artifacts=artifacts,
        model_config=model_config,
        code_paths=[str(Path(__file__).parents[1])],  # the whole `slq` package, so the model is self-contained
        pip_requirements=pip_requirements(),
        signature=model_signature(dim),
        registered_model_name=registered_model_name,
    )

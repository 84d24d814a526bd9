"""An SLQ encoder as a sentence-transformers 6 module: `SentenceTransformer(folder, trust_remote_code=True)`.

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("exported/slq-world", trust_remote_code=True)   # a `slq export` folder
    q = model.encode_query(["a red circle on the left"])
    d = model.encode_document(["photo.jpg", pil_image, {"image": "ref.jpg", "text": "make it blue"}])
    model.similarity(q, d)

`SLQModule` is the model's one module (an input module: it takes the raw inputs and returns the
sentence embedding). It wraps the encoder `slq.methods.from_pretrained` builds from the folder's
checkpoint, so its embeddings are `SLQEncoder.encode_text / encode_image / encode_multimodal`'s:
the same prompts and chat template, L2-normalised float32, each item independent of its batch.

How sentence-transformers 6.3 loads it (read from its source, `base/model.py`,
`util/misc.py:import_module_class`): `modules.json` names the class `slq.st.SLQModule`; a class
outside the `sentence_transformers` package is imported only with `trust_remote_code=True`, for a
local folder too (no public way to register a class by import path); the dotted name is not a
`file.Class` reference to a file in the folder, so it is imported from the installed `slq`
package: the folder carries no code. Then `SLQModule.load(folder, model_kwargs=...,
processor_kwargs=...)` builds the encoder.

Inputs, as sentence-transformers 6 passes them (one list per call; it sorts them by length and
cuts batches, which changes nothing here):
- text: a string;
- image: a PIL image, a path of an existing image file (a string ending in an image extension, as
  sentence-transformers itself tells images from text, or a `pathlib.Path`), a `data:image/...`
  URI, or a uint8 array (H, W, C) or (C, H, W); URLs are refused (no network use);
- image + text: `{"image": ..., "text": ...}`, or an `(image, text)` tuple inside the list.
A `prompt` (encode_query / encode_document with the folder's prompts, or `prompt=`) is prepended
to each input's text: a text, the instruction of an image+text pair, and for an image alone its
instruction (the checkpoint's `prompts.image`). The checkpoint's own prompts always apply.

Loading options: `model_kwargs={"backbone": PATH}` (the backbone folder, when not where the
folder's `slq_module.json` says), `"dtype"` / `"torch_dtype"` (default: bfloat16 on a GPU, float32
on CPU, as slq), `"attn_implementation"`, `"allow_backbone_mismatch"`; `processor_kwargs=
{"min_pixels": ..., "max_pixels": ...}` (the image budget; default the checkpoint's).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sentence_transformers.base.modality import is_image_url_or_path, is_message_dict
from sentence_transformers.base.modules import InputModule

from slq.checkpoint import LLM_WEIGHTS, MANIFEST, WEIGHTS
from slq.export import MODULE_CONFIG, module_config
from slq.inputs import InputError, check_text, load_image

MODALITIES = ["text", "image", ("image", "text")]
MODEL_KWARGS = ("backbone", "dtype", "torch_dtype", "attn_implementation", "allow_backbone_mismatch")
PROCESSOR_KWARGS = ("min_pixels", "max_pixels")


class SLQModule(InputModule):
    """The SLQ encoder (any method) behind sentence-transformers' module interface."""

    config_file_name = MODULE_CONFIG
    config_keys = ["backbone", "backbone_fingerprint", "backbone_model_type", "method", "embedding_dimension"]
    save_in_root = True

    def __init__(self, encoder, checkpoint: str | Path | None = None):
        """`encoder`: a loaded `SLQEncoder` (or method); `checkpoint`: the folder it was loaded from,
        whose files `save` copies (None: `save` writes the encoder's own checkpoint)."""
        super().__init__()
        self.encoder = encoder  # registers the queries
        self.model = encoder.backbone.model  # registers the backbone, so the model's .to(device) moves it
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, backbone: str | Path | None = None, **options) -> SLQModule:
        """The module of a checkpoint folder (a `slq export` folder is one) on `backbone`
        (default: the path its manifest records); `options` go to `slq.methods.from_pretrained`."""
        from slq.methods import from_pretrained

        if backbone is not None and not Path(backbone).is_dir():
            raise FileNotFoundError(
                2, "backbone folder not found (pass model_kwargs={'backbone': '/path/to/backbone'}: the backbone "
                   "this model was trained on, or export with --with-backbone)", str(backbone))
        return cls(from_pretrained(backbone, checkpoint, **options), checkpoint=checkpoint)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             model_kwargs: dict | None = None, processor_kwargs: dict | None = None, **kwargs) -> SLQModule:
        """What `SentenceTransformer(folder, trust_remote_code=True, ...)` calls: the folder (a local
        one, or a Hub repository's snapshot) and its backbone (module docstring for the options)."""
        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                   revision=revision, local_files_only=local_files_only)
        if folder is None:
            raise FileNotFoundError(2, "model folder not found", str(Path(model_name_or_path, subfolder)))
        config = cls.load_config(folder)
        options = dict(model_kwargs or {})
        pixels = dict(processor_kwargs or {})
        unknown = sorted(set(options) - set(MODEL_KWARGS)) + sorted(set(pixels) - set(PROCESSOR_KWARGS))
        if unknown:
            raise ValueError(f"SLQModule does not take {unknown}: model_kwargs takes {', '.join(MODEL_KWARGS)}; "
                             f"processor_kwargs takes {', '.join(PROCESSOR_KWARGS)}")
        backbone = options.pop("backbone", None)
        if backbone is None:
            named = config.get("backbone")
            if not named:
                raise ValueError(f"{Path(folder) / MODULE_CONFIG} names no backbone: pass model_kwargs="
                                 "{'backbone': '/path/to/backbone'}")
            backbone = Path(folder) / named if not Path(named).is_absolute() else Path(named)
        dtype = options.pop("dtype", None) or options.pop("torch_dtype", None)
        options.pop("torch_dtype", None)
        return cls.from_checkpoint(folder, backbone, dtype=dtype, **options, **pixels)

    # ---- what sentence-transformers asks of a module -------------------------------------
    @property
    def modalities(self) -> list:
        return list(MODALITIES)

    @property
    def tokenizer(self):
        return self.encoder.backbone.tokenizer

    @property
    def processor(self):
        return self.encoder.backbone.processor

    def get_embedding_dimension(self) -> int:
        return int(self.encoder.backbone.hidden_size)

    def get_config_dict(self) -> dict[str, Any]:
        return module_config(self._manifest(), str(Path(self.encoder.backbone.source).resolve()))

    def _manifest(self) -> dict:
        enc = self.encoder
        if enc.manifest:
            return enc.manifest
        bb = enc.backbone
        return {"backbone": {"path": bb.source, "fingerprint": bb.fingerprint, "model_type": bb.model_type},
                "method": enc.method, "hidden_size": bb.hidden_size}

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """The batch as model inputs, one group per kind (text, image, image+text); each group's
        rows keep their positions in the batch. `kwargs` (e.g. `task`) change nothing."""
        enc = self.encoder
        groups: dict[str, list] = {"text": [], "image": [], "multimodal": []}
        for i, item in enumerate(inputs):
            kind, value = classify(item, i)
            groups[kind].append((i, value))
        prefix = prompt or ""
        parts = []
        for kind, entries in groups.items():
            if not entries:
                continue
            index = [i for i, _ in entries]
            prompts = enc.prompts
            if kind == "text":
                texts = [prefix + check_text(t, i) for i, t in entries]
                feats = enc.backbone.build_inputs(texts, None, prompts)
            elif kind == "image":
                if prefix:
                    prompts = dataclasses.replace(prompts, image=prefix + prompts.image)
                feats = enc.backbone.build_inputs(None, [as_image(im, i) for i, im in entries], prompts)
            else:
                texts = [prefix + check_text(t, i, "instruction") for i, (_, t) in entries]
                feats = enc.backbone.build_inputs(texts, [as_image(im, i) for i, (im, _) in entries], prompts)
            parts.append({"index": torch.tensor(index, dtype=torch.long), "inputs": feats})
        return {"slq_parts": parts, "slq_batch_size": len(inputs)}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Embed each group and put its rows back in batch order: `sentence_embedding` (B, D) float32."""
        enc = self.encoder
        device = enc.backbone.device
        out = torch.zeros(features["slq_batch_size"], enc.backbone.hidden_size, dtype=torch.float32, device=device)
        for part in features["slq_parts"]:
            out[part["index"].to(device)] = enc.embed_inputs(part["inputs"])
        features["sentence_embedding"] = out
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """The checkpoint's files and `slq_module.json` (the backbone by absolute path, or relative
        when it lies inside `output_path`). The backbone itself is not copied: `slq export
        --with-backbone` makes a self-contained folder."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        tmp = None
        src = self.checkpoint
        if src is None or not (src / WEIGHTS).is_file():  # an encoder of this session: its own checkpoint
            tmp = Path(tempfile.mkdtemp(prefix=".slq-save-", dir=out))
            src = self.encoder.save(tmp / "ckpt")
        try:
            for f in (WEIGHTS, MANIFEST, LLM_WEIGHTS):
                if (src / f).is_file():
                    if not _same(src / f, out / f):
                        shutil.copyfile(src / f, out / f)
                elif (out / f).is_file():  # another checkpoint's LLM weights: this one has none
                    (out / f).unlink()
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        config = self.get_config_dict()
        bb = Path(config["backbone"])
        if out.resolve() in bb.parents:
            config["backbone"] = os.path.relpath(bb, out.resolve())
        (out / self.config_file_name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# ---- inputs -------------------------------------------------------------------------------------
def classify(item, index: int) -> tuple[str, Any]:
    """("text" | "image" | "multimodal", value) of one input; an input SLQ cannot embed is an
    InputError naming its position and the forms it takes."""
    if isinstance(item, dict):
        if is_message_dict(item):
            raise InputError(f"input #{index}: chat messages are not taken (SLQ wraps each input in the backbone's "
                             "chat template itself): pass a text, an image, or {'image': ..., 'text': ...}")
        unknown = sorted(set(item) - {"text", "image"}, key=str)
        if unknown:
            raise InputError(f"input #{index}: keys {unknown} are not taken; SLQ embeds 'text', 'image', or both")
        text, image = _one(item.get("text"), index, "text"), _one(item.get("image"), index, "image")
        if text is not None and image is not None:
            return "multimodal", (image, text)
        if image is not None:
            return "image", image
        if text is not None:
            return "text", text
        raise InputError(f"input #{index}: an empty dict; give it 'text', 'image' or both")
    if isinstance(item, (tuple, list)):
        if isinstance(item, list) and item and is_message_dict(item[0]):
            raise InputError(f"input #{index}: chat messages are not taken: pass a text, an image, or "
                             "{'image': ..., 'text': ...}")
        if len(item) == 2:
            a, b = item
            if is_image(a) and isinstance(b, str) and not is_image(b):
                return "multimodal", (a, b)
            if is_image(b) and isinstance(a, str) and not is_image(a):
                return "multimodal", (b, a)
        raise InputError(f"input #{index}: a pair must be one image and one text, (image, text); SLQ embeds no "
                         "text pairs (for several inputs, pass them as separate items of the list)")
    if is_image(item):
        return "image", item
    if isinstance(item, str):
        return "text", item
    raise InputError(f"input #{index}: expected a text, an image (PIL image, image file path, uint8 array) or "
                     f"{{'image': ..., 'text': ...}}, got {type(item).__name__}")


def is_image(value) -> bool:
    """An image as sentence-transformers tells one: a PIL image, a path (or URL) with an image
    extension of an existing file, a data URI, a 3-D array; also a `pathlib.Path`."""
    if isinstance(value, Image.Image | Path):
        return True
    if isinstance(value, str):
        return is_image_url_or_path(value)
    return isinstance(value, np.ndarray | torch.Tensor) and value.ndim == 3


def as_image(value, index: int) -> Image.Image:
    """A PIL RGB image from any form `is_image` takes; URLs are refused (no network use)."""
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise InputError(f"image #{index} ({value}): URLs are not fetched; download the image and pass its path "
                         "or a PIL image")
    if isinstance(value, str) and value.startswith("data:image/"):
        try:
            head, data = value.split(",", 1)
            raw = base64.b64decode(data) if head.endswith(";base64") else data.encode()
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                return im.convert("RGB")
        except (ValueError, OSError) as e:
            raise InputError(f"image #{index}: the data URI cannot be decoded ({e})") from None
    if isinstance(value, np.ndarray | torch.Tensor):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.dtype != np.uint8:
            raise InputError(f"image #{index}: an array of {arr.dtype}; pass uint8 values 0-255 (H, W, C) or a "
                             "PIL image")
        if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    return load_image(value, index)


def _one(value, index: int, key: str):
    """A dict's value: one item (a one-item list is that item); several are an error."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise InputError(f"input #{index}: {len(value)} items under {key!r}; SLQ embeds one {key} per input")
        return value[0]
    return value

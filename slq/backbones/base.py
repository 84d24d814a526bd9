"""The backbone contract: turn texts / images / image+text into left-padded model inputs, and
run the frozen MLLM's own forward (vision tower, projector, position ids) with the shared
latent queries appended after the last real token.

The queries enter through a forward hook on the input embedding table, so every family's own
`forward` (image-token merging, mRoPE `get_rope_index`, Qwen3-VL DeepStack) runs unchanged and
the query positions are ordinary text positions after the prompt. The vocabulary head is never
called: we run `model.model`, the multimodal base model, not the generation wrapper's forward.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTERS: dict[str, type[BackboneAdapter]] = {}


class BackboneError(ValueError):
    """A backbone that cannot be loaded or used, with what to do about it."""


def register_adapter(*model_types: str):
    """Class decorator: register an adapter for one or more HF `config.model_type` values."""

    def wrap(cls):
        for mt in model_types:
            if mt in ADAPTERS and ADAPTERS[mt] is not cls:
                raise RuntimeError(f"model_type {mt!r} registered twice ({ADAPTERS[mt].__name__}, {cls.__name__})")
            ADAPTERS[mt] = cls
        cls.model_types = tuple(model_types)
        return cls

    return wrap


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter_class(model_type: str) -> type[BackboneAdapter]:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise BackboneError(
            f"unsupported backbone model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
            "Add an adapter in slq/backbones/ (one file, @register_adapter) to support another family."
        ) from None


def read_model_type(path: str | Path) -> str:
    """The `model_type` of a local checkpoint directory (or a hub id, when online)."""
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise BackboneError(f"backbone directory {p} has no config.json; point at a Hugging Face checkpoint folder")
        return json.loads(cfg.read_text())["model_type"]
    if p.exists() or str(path).startswith((".", "/")):
        raise BackboneError(f"backbone path {path} is not a directory holding a Hugging Face checkpoint")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)).model_type
    except OSError as e:
        raise BackboneError(
            f"cannot load backbone {path!r}: not a local directory, and the hub is unreachable or it does not "
            f"exist there ({e.__class__.__name__}). Download it elsewhere and pass its local directory."
        ) from None


def _image_only_processor(cls):
    """The family's own processor class with video support removed.

    Video processors need torchvision; a retriever of images and text never uses them, so
    where torchvision is missing we build the same processor without one.
    """

    class ImageOnly(cls):
        # transformers >= 5.2x derives the parts from get_attributes(); earlier 5.x reads `attributes`.
        attributes = [a for a in getattr(cls, "attributes", ["image_processor", "tokenizer", "video_processor"])
                      if a != "video_processor"]

        @classmethod
        def get_attributes(klass):
            return [a for a in cls.get_attributes() if a != "video_processor"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            self.video_processor = None
            cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kw)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def load_processor(path: str | Path, processor_cls_name: str):
    import transformers as tf

    try:
        return tf.AutoProcessor.from_pretrained(str(path))
    except (AttributeError, ImportError, OSError, TypeError, ValueError):
        # Typically: the video processor needs torchvision, absent here. Build it image-only.
        cls = getattr(tf, processor_cls_name)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
        image_processor = tf.AutoImageProcessor.from_pretrained(str(path))
        proc_cls = _image_only_processor(cls) if "video_processor" in cls.get_attributes() else cls
        return proc_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


@dataclass
class Prompts:
    """How each modality is wrapped before the queries are appended.

    Templates fill `{text}`; `image` is an optional instruction placed after a plain image.
    Defaults follow the paper's recipe: the chat template with no instruction.
    """

    text: str = "{text}"
    image: str = ""
    multimodal: str = "{text}"
    add_generation_prompt: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions that skip left padding: the first real token is position 0.  # (B, L)"""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


class BackboneAdapter:
    """One MLLM family. Subclasses set `processor_cls` and may override the hooks below."""

    model_types: tuple[str, ...] = ()
    processor_cls: str = ""
    auto_model_cls: str = "AutoModelForImageTextToText"

    def __init__(self, model, processor, source: str, revision: str | None = None):
        self.model = model  # the generation wrapper; we only call model.model (no lm_head)
        self.processor = processor
        self.source = source
        self.revision = revision
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.requires_grad_(False)
        model.eval()
        fwd = inspect.signature(self.base.forward).parameters
        self.cache_kwarg = "cache" if "cache" in fwd else "past_key_values"
        self._query_embeds: torch.Tensor | None = None  # (B, Nq, D) while a forward runs
        self.input_embeddings.register_forward_hook(self._inject_queries)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path, *, dtype=None, device=None, attn_implementation: str | None = None):
        import transformers as tf

        auto = getattr(tf, cls.auto_model_cls)
        kw = {}
        if dtype is not None:
            kw["dtype"] = dtype
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        model = auto.from_pretrained(str(path), **kw)
        if device is not None:
            model.to(device)
        processor = load_processor(path, cls.processor_cls)
        revision = getattr(model.config, "_commit_hash", None)
        return cls(model, processor, source=str(path), revision=revision)

    # ---- structure -----------------------------------------------------------------------
    @property
    def base(self):
        """The multimodal base model (vision tower + projector + decoder, no lm_head)."""
        return self.model.model

    @property
    def decoder(self):
        return self.base.language_model

    @property
    def input_embeddings(self):
        return self.model.get_input_embeddings()

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    @property
    def device(self) -> torch.device:
        return self.input_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # ---- inputs --------------------------------------------------------------------------
    def messages(self, text: str | None, with_image: bool) -> list[dict]:
        content = []
        if with_image:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def build_inputs(self, texts: Sequence[str | None], images: Sequence | None, prompts: Prompts) -> dict:
        """Left-padded model inputs for a batch: texts, images, or (image, text) pairs."""
        with_image = images is not None
        if with_image and texts is None:
            texts = [prompts.image or None] * len(images)
        elif with_image:
            texts = [prompts.multimodal.format(text=t) for t in texts]
        else:
            texts = [prompts.text.format(text=t) for t in texts]
        chats = [
            self.processor.apply_chat_template(
                self.messages(t, with_image), tokenize=False, add_generation_prompt=prompts.add_generation_prompt
            )
            for t in texts
        ]
        chats = [c[0] if isinstance(c, list) else c for c in chats]
        kw = dict(text=chats, return_tensors="pt", padding=True)
        if with_image:
            kw["images"] = list(images)
        inputs = dict(self.processor(**kw))
        return self.finish_inputs(inputs)

    def finish_inputs(self, inputs: dict) -> dict:
        """Family hook: add explicit position ids where the model would not skip left padding."""
        inputs["position_ids"] = left_pad_positions(inputs["attention_mask"])
        return inputs

    def query_positions(self, prefix_positions: torch.Tensor, n_q: int) -> torch.Tensor:
        """Queries continue the text positions after the last real token (left padding: the last column)."""
        last = prefix_positions[..., -1:]  # (..., B, 1)
        return last + 1 + torch.arange(n_q, device=last.device)  # (..., B, Nq)

    # ---- forward -------------------------------------------------------------------------
    def _inject_queries(self, module, args, output):
        q = self._query_embeds
        if q is None or output.dim() != 3 or output.shape[0] != q.shape[0]:
            return output
        n_q = q.shape[1]
        return torch.cat([output[:, :-n_q], q.to(output.dtype)], dim=1)  # (B, L+Nq, D)

    @contextmanager
    def _queries_in(self, q: torch.Tensor):
        self._query_embeds = q
        try:
            yield
        finally:
            self._query_embeds = None

    def _to_device(self, inputs: dict) -> dict:
        out = {}
        for k, v in inputs.items():
            if torch.is_tensor(v):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def forward_whole(self, inputs: dict, queries: torch.Tensor) -> torch.Tensor:
        """The whole sequence, prompt + queries, in one forward.  queries (Nq, D) -> (B, Nq, D)."""
        inputs = self._to_device(inputs)
        B = inputs["input_ids"].shape[0]
        n_q = queries.shape[0]
        ext = dict(inputs)
        ext["input_ids"] = torch.cat([inputs["input_ids"], inputs["input_ids"].new_full((B, n_q), self.pad_id)], 1)
        ext["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones((B, n_q))], 1)
        if "mm_token_type_ids" in inputs:
            ext["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], inputs["mm_token_type_ids"].new_zeros((B, n_q))], 1
            )
        if inputs.get("position_ids") is not None:
            pos = inputs["position_ids"]
            ext["position_ids"] = torch.cat([pos, self.query_positions(pos, n_q)], -1)
        q = queries.to(self.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, Nq, D)
        with self._queries_in(q):
            out = self.base(**ext, use_cache=False)
        return out.last_hidden_state[:, -n_q:]  # (B, Nq, D)

    def forward_last(self, inputs: dict) -> torch.Tensor:
        """The last real token's last hidden state (left padding: the last column).  -> (B, D)"""
        out = self.base(**self._to_device(inputs), use_cache=False)
        return out.last_hidden_state[:, -1]

    def forward_split(self, inputs: dict, queries: torch.Tensor) -> torch.Tensor:
        """Prompt under no_grad into a KV cache, then only the Nq query tokens (with autograd).

        Exact: under causal attention the prompt never sees the queries, so its keys and values
        do not depend on them. Activation memory is proportional to Nq, not to the prompt.
        """
        inputs = self._to_device(inputs)
        B = inputs["input_ids"].shape[0]
        n_q = queries.shape[0]
        captured = {}

        def grab(module, args, kwargs):
            captured["position_ids"] = kwargs.get("position_ids")

        handle = self.decoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                out = self.base(**inputs, use_cache=True)
        finally:
            handle.remove()
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        pos = captured.get("position_ids")
        if pos is None:
            pos = left_pad_positions(inputs["attention_mask"])
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones((B, n_q))], 1)
        q = queries.to(self.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, Nq, D)
        out = self.base(
            inputs_embeds=q,
            attention_mask=mask,
            position_ids=self.query_positions(pos, n_q),
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        return out.last_hidden_state  # (B, Nq, D)


def load_backbone(path: str | Path, *, dtype=None, device=None, attn_implementation: str | None = None):
    """Load a local Hugging Face MLLM checkpoint with the adapter for its `model_type`."""
    cls = get_adapter_class(read_model_type(path))
    return cls.load(path, dtype=dtype, device=device, attn_implementation=attn_implementation)

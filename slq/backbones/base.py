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
import types
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from slq.prompts import Prompts  # re-exported: slq.backbones.base.Prompts

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
    ImageOnly.__module__ = __name__  # pickled by reference to its base class (see __reduce__ below)
    ImageOnly.__reduce__ = lambda self: (_rebuild_image_only, (cls.__name__, self.image_processor,
                                                                self.tokenizer, self.chat_template))
    return ImageOnly


def _rebuild_image_only(cls_name: str, image_processor, tokenizer, chat_template):
    """Unpickle an image-only processor (DataLoader workers started with spawn get a copy)."""
    import transformers as tf

    return _image_only_processor(getattr(tf, cls_name))(image_processor=image_processor, tokenizer=tokenizer,
                                                         chat_template=chat_template)


# Where a Hugging Face folder keeps its multimodal chat template, most specific first.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def load_processor(path: str | Path, processor_cls_name: str):
    """The family's own processor, loaded from the folder, with the folder's multimodal chat template.

    Where the full processor cannot be built (its video processor needs torchvision), the same
    class is loaded without video support, still through `from_pretrained`, so the template comes
    from chat_template.json / chat_template.jinja as the full processor would take it, never from
    tokenizer_config.json's (text-only in Qwen2.5-VL's download).
    """
    import transformers as tf

    try:
        proc = tf.AutoProcessor.from_pretrained(str(path))
    except (AttributeError, ImportError, OSError, TypeError, ValueError):
        # Typically: the video processor needs torchvision, absent here. Load it image-only.
        cls = getattr(tf, processor_cls_name)
        proc_cls = _image_only_processor(cls) if "video_processor" in cls.get_attributes() else cls
        proc = proc_cls.from_pretrained(str(path))
    if not getattr(proc, "chat_template", None) and getattr(proc.tokenizer, "chat_template", None):
        proc.chat_template = proc.tokenizer.chat_template  # older folders keep it there only; probed below
    if not getattr(proc, "chat_template", None):
        raise BackboneError(
            f"backbone {path} has no chat template: expected one of {', '.join(TEMPLATE_FILES)} (or a "
            "`chat_template` in tokenizer_config.json). Copy the model's template file into the folder."
        )
    _check_template(proc, path)
    return proc


def _check_template(proc, path) -> None:
    """The template must render both a caption and an image placeholder: a text-only template
    (Qwen's tokenizer_config.json one) drops list content and every caption would embed alike."""
    probe = "slq template probe"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}]
    try:
        out = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the template cannot serve us
        raise BackboneError(f"backbone {path}: its chat template cannot render an image + text message "
                            f"({type(e).__name__}: {e}); it is a text-only template. Put the model's multimodal "
                            f"template ({' or '.join(TEMPLATE_FILES)}) in the folder.") from None
    out = out[0] if isinstance(out, list) else out
    image_token = getattr(proc, "image_token", None)
    if probe not in out or (image_token and image_token not in out):
        raise BackboneError(f"backbone {path}: its chat template drops the message's text or image "
                            f"(rendered {out[:200]!r}); put the model's multimodal template "
                            f"({' or '.join(TEMPLATE_FILES)}) in the folder.")


def set_pixel_budget(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """Bound the pixels (and so the visual tokens) the processor gives an image; returns the limits in force.

    Qwen-VL processors resize every image to between `min_pixels` and `max_pixels` pixels (in
    patch x merge units) keeping its aspect ratio; None keeps the folder's own setting. A family
    whose processor resizes to a fixed size (LLaVA) has no budget to set.
    """
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    has_budget = size is not None and _size_get(size, "longest_edge") is not None
    if not has_budget:
        if min_pixels is not None or max_pixels is not None:
            raise BackboneError(
                f"{type(ip).__name__} resizes every image to a fixed size; min_pixels / max_pixels do not apply. "
                "Leave backbone.min_pixels and backbone.max_pixels null for this backbone."
            )
        return {}
    lo = min_pixels if min_pixels is not None else _size_get(size, "shortest_edge")
    hi = max_pixels if max_pixels is not None else _size_get(size, "longest_edge")
    if lo is not None and hi is not None and lo > hi:
        raise BackboneError(f"min_pixels {lo} is above max_pixels {hi}: lower min_pixels or raise max_pixels")
    if min_pixels is not None or max_pixels is not None:
        new = {"shortest_edge": lo, "longest_edge": hi}
        try:
            ip.size = type(size)(**new)
        except TypeError:
            ip.size = new
        for name, value in (("min_pixels", lo), ("max_pixels", hi)):
            if hasattr(ip, name):
                setattr(ip, name, value)
    return {"min_pixels": lo, "max_pixels": hi}


def _size_get(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class InputBuilder:
    """Raw texts / images -> left-padded model inputs, for one family's processor.

    Holds the processor and prompts only (no model), so DataLoader workers can build batches
    while the model computes. `max_text_tokens` bounds a templated text sequence (training:
    the reference truncates at 128); the caption is cut, the template is kept whole.
    """

    def __init__(self, family: type[BackboneAdapter], processor, image_token_id: int | None = None):
        self.family = family
        self.processor = processor
        self.image_token_id = image_token_id

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def visual_tokens(self, inputs: dict) -> int:
        """Visual tokens in a built batch (Qwen-VL: patches from image_grid_thw, merge x merge patches
        per token); 0 where the processor does not state them."""
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return 0
        merge = getattr(getattr(self.processor, "image_processor", None), "merge_size", None) or 2
        return int(thw.prod(-1).sum()) // (merge * merge)

    def messages(self, text: str | None, with_image: bool, system: str | None) -> list[dict]:
        content = []
        if with_image:
            content.append({"type": "image"})
        if text:  # the reference's image with an empty instruction renders as the image alone
            content.append({"type": "text", "text": text})
        msgs = [{"role": "user", "content": content}]
        if system is not None:
            msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return msgs

    def render(self, text: str | None, with_image: bool, prompts: Prompts) -> str:
        chat = self.processor.apply_chat_template(
            self.messages(text, with_image, prompts.system), tokenize=False,
            add_generation_prompt=prompts.add_generation_prompt)
        return chat[0] if isinstance(chat, list) else chat

    def _truncate(self, text: str, prompts: Prompts, max_tokens: int) -> str:
        n = len(self.tokenizer(self.render(text, False, prompts), add_special_tokens=False)["input_ids"])
        if n <= max_tokens:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(1, len(ids) - (n - max_tokens))
        return self.tokenizer.decode(ids[:keep])

    def build(self, texts: Sequence[str | None] | None, images: Sequence | None, prompts: Prompts,
              max_text_tokens: int | None = None) -> dict:
        """Left-padded model inputs for a batch: texts, images, or (image, text) pairs."""
        with_image = images is not None
        if with_image and texts is None:
            texts = [prompts.image] * len(images)
        elif with_image:
            texts = [prompts.multimodal.format(text=t) for t in texts]
        else:
            texts = [prompts.text.format(text=t) for t in texts]
            if max_text_tokens:
                texts = [self._truncate(t, prompts, max_text_tokens) for t in texts]
        chats = [self.render(t, with_image, prompts) for t in texts]
        kw = dict(text=chats, return_tensors="pt", padding=True)
        if with_image:
            kw["images"] = list(images)
        self.tokenizer.padding_side = "left"
        inputs = dict(self.processor(**kw))
        return self.family.finish_inputs(inputs, self.image_token_id)


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions that skip left padding: the first real token is position 0.  # (B, L)"""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


# Per-token fields of a processor's output (moved together when a batch is re-padded).
TOKEN_FIELDS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def right_padded_with_slots(inputs: dict, n_q: int, pad_id: int) -> tuple[dict, torch.Tensor]:
    """A left-padded batch re-laid right-padded, with `n_q` slots right after each row's last real
    token: [real tokens, slots, pads].  -> (inputs, slots (B, L+Nq) bool)

    Under causal attention every query row of a right-padded batch sees at least its row's first
    token, so no attention row is fully masked. Left padding gives each pad row a fully masked
    softmax, whose backward is NaN in bf16 SDPA kernels on GPU (docs/benchmarks.md): the
    whole-sequence path (LoRA, full fine-tuning, SLQ without the split) back-propagates through
    every row, so it runs right-padded. Same embeddings either way (padding invariance).
    """
    mask = inputs["attention_mask"]
    B, L = mask.shape
    n = mask.long().sum(-1)  # (B,) real tokens per row
    j = torch.arange(L + n_q, device=mask.device)  # new column index
    src = (j.unsqueeze(0) + (L - n).unsqueeze(1)).clamp(max=L - 1)  # (B, L+Nq) old column of a real token
    real = j.unsqueeze(0) < n.unsqueeze(1)  # (B, L+Nq)
    slots = (j.unsqueeze(0) >= n.unsqueeze(1)) & (j.unsqueeze(0) < (n + n_q).unsqueeze(1))
    out = dict(inputs)
    for k in TOKEN_FIELDS:
        if k in inputs and torch.is_tensor(inputs[k]):
            moved = inputs[k].gather(1, src)
            out[k] = torch.where(real, moved, torch.zeros_like(moved))
    out["input_ids"] = torch.where(real, out["input_ids"], torch.full_like(out["input_ids"], pad_id))
    out["attention_mask"] = (real | slots).to(mask.dtype)
    if inputs.get("position_ids") is not None:  # explicit 1-D positions: count real tokens and slots
        out["position_ids"] = left_pad_positions(out["attention_mask"])
    return out, slots


class HookNotFired(RuntimeError):
    """A hook the forward relies on did not run (a wrapped or compiled model?)."""


class BackboneAdapter:
    """One MLLM family. Subclasses set `processor_cls` and may override the hooks below."""

    model_types: tuple[str, ...] = ()
    processor_cls: str = ""
    auto_model_cls: str = "AutoModelForImageTextToText"
    # The decoder state SLQ pools: its `last_hidden_state`, the output after the final norm, in every
    # family (bench/check_hidden_state.py). Recorded in each checkpoint; a checkpoint trained on
    # another state ("pre_norm": the last layer's output before the final norm) is refused.
    hidden_state: str = "final_norm"

    def __init__(self, model, processor, source: str, revision: str | None = None, *,
                 min_pixels: int | None = None, max_pixels: int | None = None):
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
        self.inputs = InputBuilder(type(self), processor, getattr(model.config, "image_token_id", None))
        self.pixel_budget: dict = set_pixel_budget(processor, min_pixels, max_pixels)  # the limits in force
        # the ones set over the folder's own (recorded in checkpoints, applied again on load)
        self.pixel_override = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                               if v is not None}
        self._query_embeds: torch.Tensor | None = None  # (B, Nq, D) while a forward runs
        self._query_slots: torch.Tensor | None = None  # (B, L+Nq) bool: where the queries go
        self._injected = False
        self._fingerprint: str | None = None
        self._query_step = None  # compile_queries(): the compiled query step
        self._cache_multiple = 1
        self.input_embeddings.register_forward_hook(self._inject_queries)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path, *, dtype=None, device=None, attn_implementation: str | None = None,
             min_pixels: int | None = None, max_pixels: int | None = None):
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
        return cls(model, processor, source=str(path), revision=revision, min_pixels=min_pixels,
                   max_pixels=max_pixels)

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the backbone's weights and config (slq.backbones.fingerprint)."""
        if self._fingerprint is None:
            from slq.backbones.fingerprint import backbone_fingerprint

            self._fingerprint = backbone_fingerprint(self.source)
        return self._fingerprint

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

    @property
    def chat_template(self) -> str:
        return self.processor.chat_template

    @property
    def chat_template_sha256(self) -> str:
        import hashlib

        return hashlib.sha256((self.chat_template or "").encode()).hexdigest()

    # ---- inputs --------------------------------------------------------------------------
    def build_inputs(self, texts: Sequence[str | None] | None, images: Sequence | None, prompts: Prompts,
                     max_text_tokens: int | None = None) -> dict:
        """Left-padded model inputs for a batch: texts, images, or (image, text) pairs."""
        return self.inputs.build(texts, images, prompts, max_text_tokens)

    @classmethod
    def finish_inputs(cls, inputs: dict, image_token_id: int | None) -> dict:
        """Family hook: add explicit position ids where the model would not skip left padding."""
        inputs["position_ids"] = left_pad_positions(inputs["attention_mask"])
        return inputs

    def query_positions(self, prefix_positions: torch.Tensor, n_q: int) -> torch.Tensor:
        """Queries continue the text positions after the last real token (left padding: the last column)."""
        last = prefix_positions[..., -1:]  # (..., B, 1)
        return last + 1 + torch.arange(n_q, device=last.device)  # (..., B, Nq)

    # ---- forward -------------------------------------------------------------------------
    def _inject_queries(self, module, args, output):
        q, slots = self._query_embeds, self._query_slots
        if q is None or output.dim() != 3 or output.shape[0] != q.shape[0]:
            return output
        self._injected = True
        if slots.shape != output.shape[:2]:
            raise HookNotFired(f"query slots {tuple(slots.shape)} do not match the embedded input "
                               f"{tuple(output.shape[:2])}")
        src = q.to(output.dtype).reshape(-1)  # row-major: each row's Nq slots in order
        return output.masked_scatter(slots.unsqueeze(-1).expand_as(output), src)  # (B, L, D)

    @contextmanager
    def _queries_in(self, q: torch.Tensor, slots: torch.Tensor):
        self._query_embeds, self._query_slots, self._injected = q, slots, False
        try:
            yield
        finally:
            self._query_embeds = self._query_slots = None
        if not self._injected:
            raise HookNotFired(
                f"the queries were not injected: the input-embedding hook on {type(self.input_embeddings).__name__} "
                "did not run (a wrapped or compiled model whose embedding layer is not the one registered?). "
                "Load the backbone with slq.backbones.load_backbone and do not replace its modules."
            )

    def _to_device(self, inputs: dict) -> dict:
        out = {}
        for k, v in inputs.items():
            if torch.is_tensor(v):
                # pinned (DataLoader pin_memory on GPU): copied while the previous step still computes
                v = v.to(self.device, non_blocking=v.device.type == "cpu" and v.is_pinned())
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def forward_whole(self, inputs: dict, queries: torch.Tensor) -> torch.Tensor:
        """The whole sequence, prompt + queries, in one forward.  queries (Nq, D) -> (B, Nq, D).

        Run right-padded with the queries right after each row's last real token
        (`right_padded_with_slots`): no attention row is fully masked, so the backward is finite.
        """
        n_q = queries.shape[0]
        ext, slots = right_padded_with_slots(self._to_device(inputs), n_q, self.pad_id)
        B = slots.shape[0]
        q = queries.to(self.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, Nq, D)
        with self._queries_in(q, slots):
            out = self.base(**ext, use_cache=False)
        D = out.last_hidden_state.shape[-1]
        return out.last_hidden_state[slots].view(B, n_q, D)  # (B, Nq, D)

    def forward_last(self, inputs: dict) -> torch.Tensor:
        """The last real token's last hidden state.  -> (B, D)

        Right-padded, like `forward_whole`, so that training through it has no fully masked row.
        """
        inputs = self._to_device(inputs)
        ext, _ = right_padded_with_slots(inputs, 0, self.pad_id)
        last = ext["attention_mask"].long().sum(-1) - 1  # (B,)
        out = self.base(**ext, use_cache=False)
        return out.last_hidden_state[torch.arange(last.shape[0], device=last.device), last]  # (B, D)

    def forward_split(self, inputs: dict, queries: torch.Tensor, buckets: int = 1) -> torch.Tensor:
        """Prompt under no_grad into a KV cache, then only the Nq query tokens (with autograd).

        Exact: under causal attention the prompt never sees the queries, so its keys and values
        do not depend on them. Activation memory is proportional to Nq, not to the prompt.

        `buckets` > 1 runs the prompt in up to that many groups of rows of similar length, each
        padded only to its own longest row (`plan_buckets`), and lays their caches back into the
        batch's left-padded layout; the query step is one batched forward as before. Same
        result (an item's states do not depend on its batch: positions skip the left padding),
        less compute on padding.
        """
        inputs = self._to_device(inputs)
        B = inputs["input_ids"].shape[0]
        n_q = queries.shape[0]
        mask = inputs["attention_mask"]
        width = mask.shape[1]
        if self._query_step is not None:  # compiled: cache widths rounded up, so few shapes recompile
            width = -(-width // self._cache_multiple) * self._cache_multiple
        groups = plan_buckets(mask.long().sum(-1).tolist(), buckets) if buckets > 1 else [list(range(B))]
        if len(groups) == 1 and width == mask.shape[1]:
            cache, pos = self._prefix(inputs)
        else:
            parts = [(idx, *self._prefix(self.select_rows(inputs, idx) if len(groups) > 1 else inputs))
                     for idx in groups]
            cache, pos = merge_prefixes(parts, B, width)
            mask = torch.cat([mask.new_zeros((B, width - mask.shape[1])), mask], 1)
        mask = torch.cat([mask, mask.new_ones((B, n_q))], 1)
        q = queries.to(self.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, Nq, D)
        step = self._query_step or self._query_forward
        return step(q, mask, self.query_positions(pos, n_q), cache)  # (B, Nq, D)

    def _query_forward(self, q: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The Nq query tokens against the prompt's cache: the queries are the whole input here
        (no embedding lookup, no hook).  q (B, Nq, D) -> last hidden states (B, Nq, D)"""
        out = self.base(inputs_embeds=q, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{self.cache_kwarg: cache})
        return out.last_hidden_state

    def compile_queries(self, mode: str | None = None, cache_multiple: int = 64) -> None:
        """Compile the split forward's query step (forward and backward) with torch.compile: it
        runs only Nq tokens per row, so eager kernel launches, not arithmetic, bound it.

        `mode` defaults to "reduce-overhead" (CUDA graphs) on GPU, the default elsewhere. Cache
        widths are rounded up to `cache_multiple` (left padding, masked) so that batches of other
        lengths reuse a compiled graph instead of compiling again. Same result as eager.
        """
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self._cache_multiple = max(1, int(cache_multiple))
        self._query_step = torch.compile(self._query_forward, mode=mode, dynamic=False)

    @torch.no_grad()
    def _prefix(self, inputs: dict):
        """The prompt's forward into a KV cache.  -> (cache, the decoder's position ids (..., B, L))"""
        captured = {}

        def grab(module, args, kwargs):
            captured["position_ids"] = kwargs.get("position_ids")

        handle = self.decoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.base(**inputs, use_cache=True)
        finally:
            handle.remove()
        if "position_ids" not in captured:
            raise HookNotFired(
                f"the decoder's pre-hook on {type(self.decoder).__name__} did not run, so the prompt's positions "
                "are unknown (a wrapped or compiled model?). Use split_forward: false, or load the backbone "
                "with slq.backbones.load_backbone and do not replace its modules."
            )
        pos = captured["position_ids"]
        if pos is None:
            raise HookNotFired(
                f"{type(self.base).__name__} called its decoder without position_ids, so the queries' positions "
                "cannot continue the prompt's (mRoPE). This transformers version or model is not supported by "
                "the split forward: use split_forward: false."
            )
        return getattr(out, "cache", None) or getattr(out, "past_key_values", None), pos

    def select_rows(self, inputs: dict, rows: list[int]) -> dict:
        """The sub-batch of `rows` of a left-padded batch, cut to its own longest row.

        Per-token fields and explicit positions are indexed by row; images follow their rows:
        a (B, C, H, W) `pixel_values` by row, Qwen-VL's flat patches (one image per row, sized
        by `image_grid_thw`) by each image's span.
        """
        mask = inputs["attention_mask"]
        idx = torch.tensor(rows, device=mask.device)
        width = int(mask[idx].long().sum(-1).max())
        out = dict(inputs)
        for k in (*TOKEN_FIELDS, "position_ids"):
            v = inputs.get(k)
            if torch.is_tensor(v):
                out[k] = v.index_select(-2, idx)[..., -width:]
        pix, thw = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if thw is not None:
            if thw.shape[0] != mask.shape[0]:
                raise ValueError(f"bucketed prefix needs one image per row; this batch has {thw.shape[0]} images "
                                 f"for {mask.shape[0]} rows: use buckets=1")
            ends = thw.prod(-1).cumsum(0).tolist()
            starts = [0, *ends[:-1]]
            out["pixel_values"] = torch.cat([pix[starts[r]:ends[r]] for r in rows])
            out["image_grid_thw"] = thw[idx]
        elif torch.is_tensor(pix):
            out["pixel_values"] = pix[idx]
        return out


def plan_buckets(lengths: Sequence[int], max_buckets: int, tolerance: float = 0.02) -> list[list[int]]:
    """Rows grouped by length into at most `max_buckets` groups so that the padded tokens
    (sum over groups of rows x longest row) are fewest; the fewest groups within `tolerance`
    of the best are taken (each group is one more forward). -> row indices per group, shortest first.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    sl = [int(lengths[i]) for i in order]
    k_max = max(1, min(max_buckets, n))
    inf = float("inf")
    # best[k][j]: fewest padded tokens for the first j sorted rows in k groups; cut[k][j]: where the last starts
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    best[0][0] = 0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + (j - i) * sl[j - 1]
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    floor = min(best[k][n] for k in range(1, k_max + 1))
    k = next(k for k in range(1, k_max + 1) if best[k][n] <= floor * (1 + tolerance))
    groups, j = [], n
    while k > 0:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def _cache_layers(cache) -> list:
    """(keys, values) holders of a transformers cache: its layers (5.x) or its per-layer lists (4.x)."""
    if hasattr(cache, "layers"):
        return list(cache.layers)
    return [types.SimpleNamespace(keys=k, values=v) for k, v in zip(cache.key_cache, cache.value_cache)]


def merge_prefixes(parts: list, batch: int, width: int):
    """Caches and positions of row groups -> one cache and positions in the batch's left-padded
    layout (B rows, `width` columns, each row's tokens right-aligned; pad keys/values are zero and
    masked out).  parts: [(rows, cache, positions (..., b, w)), ...] -> (cache, positions (..., B, width))
    """
    _, cache, pos0 = parts[0]
    layers = [_cache_layers(c) for _, c, _ in parts]
    merged = []
    for li, layer in enumerate(layers[0]):
        kv = []
        for name in ("keys", "values"):
            t = getattr(layer, name)
            full = t.new_zeros((batch, *t.shape[1:-2], width, t.shape[-1]))
            for (rows, _, _), group in zip(parts, layers):
                g = getattr(group[li], name)
                full[torch.tensor(rows, device=g.device), ..., width - g.shape[-2]:, :] = g
            kv.append(full)
        merged.append(kv)
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, merged):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in merged]
        cache.value_cache[:] = [v for _, v in merged]
    pos = pos0.new_zeros((*pos0.shape[:-2], batch, width))
    for rows, _, p in parts:
        pos[..., torch.tensor(rows, device=p.device), width - p.shape[-1]:] = p
    return cache, pos


def load_backbone(path: str | Path, *, dtype=None, device=None, attn_implementation: str | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None):
    """Load a local Hugging Face MLLM checkpoint with the adapter for its `model_type`."""
    cls = get_adapter_class(read_model_type(path))
    return cls.load(path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                    min_pixels=min_pixels, max_pixels=max_pixels)

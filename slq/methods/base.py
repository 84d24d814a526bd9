"""The method registry, the base class every method subclasses, and the loader that picks a
method's class by name (a fresh encoder's `method`, or a checkpoint manifest's).

This module sits above `slq.encoder`, which never imports it: `SLQEncoder.from_pretrained` builds
its own class; `from_pretrained` here finds the class a name or a checkpoint asks for, then calls
that class's `from_pretrained`.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slq.backbones.base import Prompts
from slq.checkpoint import load_llm_weights, manifest_method, read_manifest
from slq.encoder import SLQEncoder, as_prompts, new_queries
from slq.recipe import FitConfig

_REGISTRY: dict[str, type[MethodEncoder]] = {}
METHODS = types.MappingProxyType(_REGISTRY)  # name -> class, in registration order (read-only view)

DEFAULT_METHOD = "slq"  # a fresh encoder's method when none is named

POOLINGS = ("queries", "last_token")
_POOLING_WORDS = {"queries": "its queries", "last_token": "the last token"}
_POOLING_MANIFEST = {"queries": "mean_of_query_states_l2", "last_token": "last_token_state_l2"}

# E5-V's prompts, adapted to "the above": the instruction after the content, then the assistant
# turn opens and the last token's state is the embedding.
SUMMARIZE_PROMPTS = {
    "text": "{text}\nSummarize the above sentence in one word:",
    "image": "Summarize the above image in one word:",
    "multimodal": "{text}\nSummarize the above image and text in one word:",
    "add_generation_prompt": True,
}


class MethodError(ValueError):
    """An unknown method, or a setting the method does not take; says what the choices are."""


def register_method(name: str):
    """Class decorator: register a method (a `MethodEncoder` subclass) under `name`, the string
    `train.method`, `methods.compare` and a checkpoint's manifest (`method`) use."""

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, MethodEncoder)):
            raise TypeError(f"@register_method({name!r}): {cls!r} is not a MethodEncoder subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"method {name!r} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type[MethodEncoder]:
    """The class registered as `name`; an unknown name is a MethodError listing the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MethodError(
            f"unknown method {name!r}: use one of {', '.join(_REGISTRY)}. Add a method in slq/methods/ "
            "(one file, @register_method)."
        ) from None


def check_method(method: str, pooling: str | None) -> str:
    """The pooling `method` uses (its default when `pooling` is None); errors name the choices."""
    klass = get_method(method)
    if pooling is None or pooling in klass.poolings:
        return klass.resolve_pooling(pooling)
    if pooling not in POOLINGS:
        raise MethodError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    takes = (f"pools by {_POOLING_WORDS[klass.poolings[0]]} (pooling: {klass.poolings[0]})"
             if len(klass.poolings) == 1 else f"pools by one of {', '.join(klass.poolings)}")
    others = [repr(n) for n, c in _REGISTRY.items() if pooling in c.poolings]
    if len(others) > 1:
        others = [", ".join(others[:-1]), others[-1]]
    hint = f"; {pooling} pooling is {' or '.join(others)}" if others else ""
    raise MethodError(f"method {method!r} {takes}{hint}")


def reference_method() -> str:
    """The method the others are compared with (SLQ; trained by the train stage, not the methods stage)."""
    names = [n for n, c in _REGISTRY.items() if c.reference]
    if len(names) != 1:
        raise RuntimeError(f"exactly one registered method must be the reference, not {names}")
    return names[0]


def compared_methods() -> list[str]:
    """The registered methods the reference is compared with, in registration order."""
    return [n for n, c in _REGISTRY.items() if not c.reference]


class MethodEncoder(SLQEncoder):
    """The base of the registered methods: SLQEncoder's inputs, batching and checkpoint folder; a
    method sets what differs in the attributes below and overrides the hooks it needs
    (`train_llm`, `llm_tensors`, `load_llm`, `method_manifest`, `manifest_options`)."""

    method = "?"  # set by @register_method
    poolings: tuple[str, ...] = ("last_token",)  # the poolings it takes; the first is its default
    split_exact = False  # the prompt's states do not depend on what trains (the split forward is exact)
    trains = True  # whether it trains at all (zero_shot: no)
    reference = False  # the method the others are compared with (SLQ: the train stage's)
    default_prompt = "pipeline"  # the pipeline's prompts: "pipeline" (the `prompts` section) or "summarize"
    default_lr: float | None = None  # the pipeline's learning rate when methods.lr names none (None: train.lr)

    def __init__(self, backbone, queries, prompts: Prompts | None = None, *, pooling: str | None = None,
                 **options):
        """`options` another method takes (e.g. `lora`) are ignored, so one set of settings builds any method."""
        self.pooling = self.resolve_pooling(pooling)  # before SLQEncoder's check that query pooling has queries
        super().__init__(backbone, queries, prompts)
        self._llm_params: list[nn.Parameter] = []

    @classmethod
    def fresh(cls, adapter, *, num_queries: int = FitConfig.num_queries, init: str = "random", seed: int = 0,
              prompts: Prompts | dict | None = None, pooling: str | None = None, **options) -> MethodEncoder:
        """An untrained encoder: queries only for query pooling; last-token pooling reads the E5-V
        style summarize prompt unless `prompts` are given."""
        pooling = cls.resolve_pooling(pooling)
        queries = new_queries(adapter, num_queries, init, seed) if pooling == "queries" else None
        if prompts is None and pooling == "last_token":
            prompts = dict(SUMMARIZE_PROMPTS)
        return cls(adapter, queries, as_prompts(prompts), pooling=pooling, **options)

    def make_trainable(self) -> None:
        """Unfreeze what the method trains in the LLM (`train_llm`), once."""
        if not self._llm_params:
            self._llm_params = list(self.train_llm())

    def train_llm(self) -> list[nn.Parameter]:
        """Make the LLM weights the method trains trainable and return them: none by default."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The queries (if any) and the method's LLM weights."""
        return super().trainable_parameters() + list(self._llm_params)

    def embed_inputs(self, inputs: dict, split: bool = False, buckets: int = 1) -> torch.Tensor:
        if self.pooling == "last_token":
            return F.normalize(self.backbone.forward_last(inputs).float(), dim=-1)  # (B, D)
        return super().embed_inputs(inputs, split, buckets)

    def method_manifest(self) -> dict:
        return {**super().method_manifest(), "pooling": _POOLING_MANIFEST[self.pooling]}

    def load_llm_strict(self, ckpt_dir: str | Path, expected: set[str], keep_trainable: bool) -> None:
        """Copy a checkpoint's LLM weights into the backbone, strictly: exactly the `expected`
        decoder tensors, each of its shape. `keep_trainable`: leave requires_grad as it is (resume);
        else the whole LLM is frozen afterwards (a loaded model only embeds)."""
        tensors = load_llm_weights(ckpt_dir)
        state = self.backbone.decoder.state_dict()
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"checkpoint LLM weights do not fit the backbone ({self.method}): missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in tensors.items():
                if tuple(v.shape) != tuple(state[k].shape):
                    raise ValueError(f"checkpoint LLM weight {k} has shape {tuple(v.shape)}, the backbone's is "
                                     f"{tuple(state[k].shape)}")
                state[k].copy_(v.to(state[k].dtype))  # state_dict tensors share storage with the parameters
        if not keep_trainable:
            for p in self.backbone.decoder.parameters():
                p.requires_grad_(False)


def from_pretrained(backbone: str | Path | None = None, queries: str | Path | None = None, *,
                    method: str | None = None, pooling: str | None = None, lora=None, **kwargs) -> SLQEncoder:
    """The encoder of any registered method, as `SLQEncoder.from_pretrained` takes its arguments:
    a fresh one of `method` (default slq) with its `pooling` and options (`lora`: a LoraSpec or
    dict, for lora), or a checkpoint's (`queries`), whose manifest's `method` picks the class (a
    manifest without one: slq) and whose manifest decides the pooling and options."""
    if queries is not None:
        klass = get_method(manifest_method(read_manifest(queries)))
        return klass.from_pretrained(backbone, queries, **kwargs)
    name = method or DEFAULT_METHOD
    klass = get_method(name)
    check_method(name, pooling)  # a bad pooling fails before the backbone loads, naming who takes it
    return klass.from_pretrained(backbone, pooling=pooling, lora=lora, **kwargs)

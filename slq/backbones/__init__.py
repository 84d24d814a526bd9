"""Backbone adapters, registered once and chosen by the Hugging Face `config.model_type`.

Adding an MLLM family is one new module that subclasses `BackboneAdapter` and decorates it
with `@register_adapter("model_type", ...)`.
"""

# Importing the family modules registers them.
from slq.backbones import llava as _llava  # noqa: E402,F401
from slq.backbones import qwen_vl as _qwen_vl  # noqa: E402,F401
from slq.backbones.base import (
    ADAPTERS,
    BackboneAdapter,
    BackboneError,
    get_adapter_class,
    load_backbone,
    read_model_type,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "ADAPTERS",
    "BackboneAdapter",
    "BackboneError",
    "get_adapter_class",
    "load_backbone",
    "read_model_type",
    "register_adapter",
    "supported_model_types",
]

"""LLaVA (CLIP-style vision tower + projector + a 1-D RoPE LLM such as Llama).

One-dimensional positions: always explicit, skipping the left padding.
"""

from slq.backbones.base import BackboneAdapter, register_adapter


@register_adapter("llava")
class LlavaAdapter(BackboneAdapter):
    processor_cls = "LlavaProcessor"

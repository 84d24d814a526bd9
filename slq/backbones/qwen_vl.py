"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: 3-D rotary positions (mRoPE), Qwen3-VL DeepStack.

With images, positions come from the model's own `get_rope_index` (called inside its forward
from `mm_token_type_ids`); the queries then continue the text positions after the last real
token. Text-only inputs get explicit positions that skip the left padding (the model would
otherwise count pads). DeepStack features are added only at image-token positions, never at
query positions, so the query step needs no visual input.
"""

from __future__ import annotations

import torch

from slq.backbones.base import BackboneAdapter, left_pad_positions, register_adapter


class _QwenVL(BackboneAdapter):
    @classmethod
    def finish_inputs(cls, inputs: dict, image_token_id: int | None) -> dict:
        if "pixel_values" in inputs:
            if "mm_token_type_ids" not in inputs:  # older processors: derive it from the image token
                inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).int()
            inputs["position_ids"] = None  # the model's get_rope_index, which reads the attention mask
        else:
            inputs.pop("mm_token_type_ids", None)
            inputs["position_ids"] = left_pad_positions(inputs["attention_mask"])
        return inputs

    def query_positions(self, prefix_positions: torch.Tensor, n_q: int) -> torch.Tensor:
        # (R, B, L) with R = 3 mRoPE axes (or 4 with a leading text row); each axis continues
        # from its own maximum, which is what get_rope_index gives text tokens after an image.
        last = prefix_positions.amax(dim=-1, keepdim=True)  # (R, B, 1) or (B, 1)
        return last + 1 + torch.arange(n_q, device=last.device)  # (R, B, Nq)


@register_adapter("qwen2_vl")
class Qwen2VLAdapter(_QwenVL):
    processor_cls = "Qwen2VLProcessor"


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(_QwenVL):
    processor_cls = "Qwen2_5_VLProcessor"


@register_adapter("qwen3_vl")
class Qwen3VLAdapter(_QwenVL):
    processor_cls = "Qwen3VLProcessor"

"""`full`: every LLM weight trained contrastively (the vision tower stays frozen); last-token pooling."""

from __future__ import annotations

from pathlib import Path

import torch

from slq.methods.base import MethodEncoder, register_method


def unfreeze_llm(adapter) -> list[torch.nn.Parameter]:
    """Full fine-tuning: every parameter of the LLM trains; the vision tower stays frozen."""
    params = list(adapter.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


@register_method("full")
class Full(MethodEncoder):
    """Full fine-tuning of the LLM; a checkpoint holds every LLM weight (`llm.safetensors`)."""

    poolings = ("last_token",)
    default_lr = 4e-4

    def train_llm(self) -> list[torch.nn.Parameter]:
        return unfreeze_llm(self.backbone)

    def llm_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.backbone.decoder.state_dict().items()}

    def load_llm(self, ckpt_dir: str | Path, resume: bool) -> None:
        """Every LLM weight, strictly; a loaded (not resumed) model is frozen afterwards."""
        self.load_llm_strict(ckpt_dir, set(self.backbone.decoder.state_dict()), keep_trainable=resume)

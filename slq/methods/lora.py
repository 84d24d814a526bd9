"""`lora`: LoRA adapters (peft) on the LLM's linear layers, trained contrastively; pooling by the
last token (with the zero-shot prompt, as E5-V) or by latent queries trained alongside."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slq.methods.base import MethodEncoder, register_method

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 16
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    seed: int = 0  # LoRA's A matrices start random: seeded, so a rerun trains the same adapters


def apply_lora(adapter, spec: LoraSpec) -> list[torch.nn.Parameter]:
    """Inject LoRA layers into the adapter's LLM (not the vision tower); returns their parameters.

    The adapters are kept in float32 whatever the backbone's dtype (peft casts the layer's input
    to them and the result back), so a bf16 backbone's LoRA weights do not round at every step.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(spec.targets),
                     bias="none")
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(spec.seed)
        inject_adapter_in_model(cfg, adapter.decoder)
    params = []
    for name, p in adapter.decoder.named_parameters():
        trainable = "lora_" in name
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    if not params:
        raise ValueError(f"no LoRA target module among {spec.targets} in {adapter.source}")
    adapter.decoder.to(adapter.device)
    with torch.no_grad():
        for p in params:
            p.data = p.data.float()
    return params


@register_method("lora")
class LoRA(MethodEncoder):
    """LoRA layers injected into the LLM (on first training step, or when a checkpoint loads); a
    checkpoint holds the LoRA tensors (`llm.safetensors`) and its manifest the `LoraSpec`."""

    poolings = ("last_token", "queries")
    default_lr = 2e-3

    def __init__(self, backbone, queries, prompts=None, *, pooling: str | None = None,
                 lora: LoraSpec | dict | None = None, **options):
        super().__init__(backbone, queries, prompts, pooling=pooling, **options)
        self.lora = LoraSpec(**lora) if isinstance(lora, dict) else lora

    @classmethod
    def manifest_options(cls, manifest: dict) -> dict:
        return {**super().manifest_options(manifest), "lora": manifest.get("lora")}

    def train_llm(self) -> list[torch.nn.Parameter]:
        """The LoRA layers (injected unless they are there already: a resumed run)."""
        if not any("lora_" in n for n, _ in self.backbone.decoder.named_parameters()):
            apply_lora(self.backbone, self.lora or LoraSpec())
        params = [p for n, p in self.backbone.decoder.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def method_manifest(self) -> dict:
        return {**super().method_manifest(), "lora": asdict(self.lora or LoraSpec())}

    def llm_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.backbone.decoder.state_dict().items()
                if "lora_" in k}

    def load_llm(self, ckpt_dir: str | Path, resume: bool) -> None:
        """Exactly the LoRA tensors; a loaded model first gets its LoRA layers, a resumed one
        (`resume`) has them and keeps training."""
        if not resume:
            apply_lora(self.backbone, self.lora or LoraSpec())
        expected = {k for k in self.backbone.decoder.state_dict() if "lora_" in k}
        self.load_llm_strict(ckpt_dir, expected, keep_trainable=resume)

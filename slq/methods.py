"""The ways of turning an MLLM into an embedder that SLQ is compared with, as in the paper.

- `slq`: the backbone frozen; shared latent queries appended to every input; mean of their last
  hidden states. Trains the queries (+ temperature).
- `zero_shot`: no training. An E5-V style instruction ("Summarize the above ... in one word:")
  and the last token's last hidden state.
- `lora`: LoRA adapters (peft) on the LLM's linear layers, trained contrastively; pooling by the
  last token (with the zero-shot prompt, as E5-V) or by latent queries trained alongside.
- `full`: every LLM weight trained contrastively (the vision tower stays frozen); last-token pooling.

`slq.encoder.SLQEncoder` is SLQ; `MethodEncoder` here subclasses it for the other three, so all
four share the inputs, batching, loss, evaluation and checkpoint folder. A checkpoint records the
method, and holds the queries and, for `lora`/`full`, the changed LLM weights;
`SLQEncoder.from_pretrained` returns the encoder its method needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slq.backbones.base import Prompts
from slq.checkpoint import load_llm_weights
from slq.encoder import SLQEncoder, as_prompts, new_queries

METHODS = ("slq", "zero_shot", "lora", "full")
POOLINGS = ("queries", "last_token")

# E5-V's prompts, adapted to "the above": the instruction after the content, then the assistant
# turn opens and the last token's state is the embedding.
SUMMARIZE_PROMPTS = {
    "text": "{text}\nSummarize the above sentence in one word:",
    "image": "Summarize the above image in one word:",
    "multimodal": "{text}\nSummarize the above image and text in one word:",
    "add_generation_prompt": True,
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 16
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    seed: int = 0  # LoRA's A matrices start random: seeded, so a rerun trains the same adapters


def check_method(method: str, pooling: str | None) -> str:
    """The pooling a method uses (its default when `pooling` is None); errors name the choices."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    default = "queries" if method == "slq" else "last_token"
    pooling = pooling or default
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    if method == "slq" and pooling != "queries":
        raise ValueError("method 'slq' pools by its queries; last-token pooling is 'zero_shot', 'lora' or 'full'")
    if method in ("zero_shot", "full") and pooling != "last_token":
        raise ValueError(f"method {method!r} pools by the last token (pooling: last_token)")
    return pooling


class MethodEncoder(SLQEncoder):
    """`zero_shot`, `lora` or `full` behind SLQEncoder's API: what differs is the pooling (the last
    token's state, or latent queries for `lora`), what trains in the LLM, and the LLM weights a
    checkpoint holds."""

    method = "zero_shot"  # class defaults; every instance sets its own
    pooling = "last_token"

    def __init__(self, backbone, queries, prompts: Prompts | None = None, *, method: str = "zero_shot",
                 pooling: str | None = None, lora: LoraSpec | dict | None = None):
        pooling = check_method(method, pooling)
        if method == "slq":
            raise ValueError("method 'slq' is slq.encoder.SLQEncoder")
        if pooling == "queries" and queries is None:
            raise ValueError(f"method {method!r} with query pooling needs queries")
        super().__init__(backbone, queries, prompts)
        self.method, self.pooling = method, pooling
        self.lora = LoraSpec(**lora) if isinstance(lora, dict) else lora
        self._llm_params: list[nn.Parameter] = []

    @classmethod
    def fresh(cls, adapter, *, num_queries: int = 20, init: str = "random", seed: int = 0,
              prompts: Prompts | dict | None = None, method: str = "zero_shot", pooling: str | None = None,
              lora: LoraSpec | dict | None = None) -> MethodEncoder:
        """An untrained encoder: queries only for query pooling; last-token pooling reads the E5-V
        style summarize prompt unless `prompts` are given."""
        pooling = check_method(method, pooling)
        queries = new_queries(adapter, num_queries, init, seed) if pooling == "queries" else None
        if prompts is None and pooling == "last_token":
            prompts = dict(SUMMARIZE_PROMPTS)
        return cls(adapter, queries, as_prompts(prompts), method=method, pooling=pooling, lora=lora)

    def make_trainable(self) -> None:
        """Unfreeze what the method trains in the LLM: the LoRA layers (injected on first call) or
        every LLM weight; nothing for zero_shot."""
        if self._llm_params:
            return
        if self.method == "lora":
            if not any("lora_" in n for n, _ in self.backbone.decoder.named_parameters()):
                apply_lora(self.backbone, self.lora or LoraSpec())
            self._llm_params = [p for n, p in self.backbone.decoder.named_parameters() if "lora_" in n]
            for p in self._llm_params:
                p.requires_grad_(True)
        elif self.method == "full":
            self._llm_params = unfreeze_llm(self.backbone)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The queries (if any) and the method's LLM weights."""
        return super().trainable_parameters() + list(self._llm_params)

    def embed_inputs(self, inputs: dict, split: bool = False, buckets: int = 1) -> torch.Tensor:
        if self.pooling == "last_token":
            return F.normalize(self.backbone.forward_last(inputs).float(), dim=-1)  # (B, D)
        return super().embed_inputs(inputs, split, buckets)

    def method_manifest(self) -> dict:
        out = {**super().method_manifest(), "pooling": "mean_of_query_states_l2" if self.pooling == "queries"
               else "last_token_state_l2"}
        if self.method == "lora":
            out["lora"] = asdict(self.lora or LoraSpec())
        return out

    def llm_tensors(self) -> dict[str, torch.Tensor]:
        return llm_delta(self.backbone, self.method)

    def load_llm(self, ckpt_dir: str | Path, resume: bool) -> None:
        """Exactly the LLM weights the method trains; a loaded model first gets its LoRA layers,
        a resumed one (`resume`) has them and keeps training."""
        load_llm_delta(self.backbone, self.method, load_llm_weights(ckpt_dir), self.lora,
                       inject=not resume, keep_trainable=resume)


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


def unfreeze_llm(adapter) -> list[torch.nn.Parameter]:
    """Full fine-tuning: every parameter of the LLM trains; the vision tower stays frozen."""
    params = list(adapter.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def llm_delta(adapter, method: str) -> dict[str, torch.Tensor]:
    """The LLM weights a method changed, to store beside the queries (empty for slq/zero_shot)."""
    if method == "lora":
        return {k: v.detach().float().cpu().contiguous() for k, v in adapter.decoder.state_dict().items()
                if "lora_" in k}
    if method == "full":
        return {k: v.detach().float().cpu().contiguous() for k, v in adapter.decoder.state_dict().items()}
    return {}


def load_llm_delta(adapter, method: str, tensors: dict[str, torch.Tensor], lora: LoraSpec | None,
                   *, inject: bool = True, keep_trainable: bool = False) -> None:
    """Put a checkpoint's LLM weights into the backbone, strictly: every tensor the method trains
    (all LoRA tensors; every LLM tensor for `full`) and nothing else. `inject`: add the LoRA
    layers first (a freshly loaded backbone); `keep_trainable`: leave requires_grad as it is (resume)."""
    if method == "lora" and inject:
        apply_lora(adapter, lora or LoraSpec())
    if method not in ("lora", "full"):
        if tensors:
            raise ValueError(f"checkpoint holds LLM weights ({len(tensors)} tensors) but method {method!r} "
                             "trains none: the checkpoint is damaged or its manifest's method is wrong")
        return
    state = adapter.decoder.state_dict()
    expected = {k for k in state if method == "full" or "lora_" in k}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint LLM weights do not fit the backbone ({method}): missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(state[k].shape):
                raise ValueError(f"checkpoint LLM weight {k} has shape {tuple(v.shape)}, the backbone's is "
                                 f"{tuple(state[k].shape)}")
            state[k].copy_(v.to(state[k].dtype))  # state_dict tensors share storage with the parameters
    if not keep_trainable:
        for p in adapter.decoder.parameters():
            p.requires_grad_(False)

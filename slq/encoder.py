"""SLQEncoder: a frozen MLLM + shared latent queries -> L2-normalised embeddings.

    enc = SLQEncoder.from_pretrained("path/to/Qwen3-VL-4B-Instruct", queries="checkpoints/slq")
    txt = enc.encode_text(["a dog on a sofa"])            # (1, D) float32
    img = enc.encode_image(["photo.jpg"])                  # (1, D)
    cmp = enc.encode_multimodal([("ref.jpg", "make it red")])

An item's embedding does not depend on the rest of its batch (left padding, positions that
skip the pads), so inputs are freely re-ordered into length-sorted batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slq.backbones import BackboneAdapter, load_backbone
from slq.backbones.base import Prompts
from slq.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_llm_weights,
    save_checkpoint,
)
from slq.inputs import check_text, load_image
from slq.methods import (
    SUMMARIZE_PROMPTS,
    LoraSpec,
    apply_lora,
    check_method,
    llm_delta,
    load_llm_delta,
    unfreeze_llm,
)
from slq.queries import LatentQueries


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class SLQEncoder(nn.Module):
    """A frozen MLLM + shared latent queries (method `slq`), or one of the methods it is compared
    with (`zero_shot`, `lora`, `full`: see slq.methods), behind one encode API."""

    def __init__(self, backbone: BackboneAdapter, queries: LatentQueries | None, prompts: Prompts | None = None,
                 *, method: str = "slq", pooling: str | None = None, lora: LoraSpec | None = None):
        super().__init__()
        self.pooling = check_method(method, pooling)
        self.method = method
        self.lora = lora
        if self.pooling == "queries" and queries is None:
            raise ValueError(f"method {method!r} with query pooling needs queries")
        if queries is not None and queries.hidden_size != backbone.hidden_size:
            raise CheckpointError(
                f"queries have hidden size {queries.hidden_size} but backbone {backbone.source} "
                f"({backbone.model_type}) has {backbone.hidden_size}"
            )
        self.backbone = backbone
        self.queries = queries.to(backbone.device) if queries is not None else None
        self.prompts = prompts or Prompts()
        self.manifest: dict = {}
        self._llm_params: list[nn.Parameter] = []

    @property
    def num_queries(self) -> int:
        return self.queries.num_queries if self.queries is not None else 0

    def make_trainable(self) -> None:
        """Unfreeze what the method trains in the LLM (LoRA layers or every weight; nothing for slq)."""
        if self.method == "lora" and not self._llm_params:
            if not any("lora_" in n for n, _ in self.backbone.decoder.named_parameters()):
                apply_lora(self.backbone, self.lora or LoraSpec())
            self._llm_params = [p for n, p in self.backbone.decoder.named_parameters() if "lora_" in n]
            for p in self._llm_params:
                p.requires_grad_(True)
        elif self.method == "full" and not self._llm_params:
            self._llm_params = unfreeze_llm(self.backbone)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What training updates: the queries (if any) and the method's LLM weights."""
        return ([self.queries.weight] if self.queries is not None else []) + list(self._llm_params)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        backbone: str | Path | None = None,
        queries: str | Path | None = None,
        *,
        num_queries: int = 20,
        init: str = "random",
        seed: int = 0,
        prompts: Prompts | dict | None = None,
        dtype=None,
        device=None,
        attn_implementation: str | None = None,
        method: str = "slq",
        pooling: str | None = None,
        lora: LoraSpec | dict | None = None,
    ) -> SLQEncoder:
        """Load a backbone (local HF checkpoint folder) and queries (a checkpoint folder or a fresh init).

        With `queries` given, `backbone` defaults to the path recorded in its manifest.
        """
        ckpt = None
        if queries is not None:
            ckpt = load_checkpoint(queries)
            backbone = backbone or ckpt[2]["backbone"]["path"]
        if backbone is None:
            raise ValueError("give a backbone directory, or a query checkpoint that records one")
        dev = resolve_device(device)
        adapter = load_backbone(backbone, dtype=resolve_dtype(dtype, dev), device=dev,
                                attn_implementation=attn_implementation)
        if ckpt is not None:
            q, _, manifest = ckpt
            want = manifest["backbone"]
            if want.get("model_type") != adapter.model_type or manifest["hidden_size"] != adapter.hidden_size:
                raise CheckpointError(
                    f"checkpoint {queries} was trained on a {want.get('model_type')} backbone with hidden size "
                    f"{manifest['hidden_size']}; {backbone} is {adapter.model_type} with hidden size "
                    f"{adapter.hidden_size}. Load it onto the backbone it was trained with."
                )
            lq = None
            if q.shape[0]:
                lq = LatentQueries(q.shape[0], q.shape[1])
                with torch.no_grad():
                    lq.weight.copy_(q)
            prompts = prompts or manifest.get("prompts")
            method = manifest.get("method", "slq")
            pooling = manifest.get("pooling_mode", "queries")
            lora = manifest.get("lora")
            lora = LoraSpec(**lora) if isinstance(lora, dict) else lora
            load_llm_delta(adapter, method, load_llm_weights(queries), lora)
        else:
            pooling = check_method(method, pooling)
            lq = None
            if pooling == "queries":
                lq = LatentQueries(num_queries, adapter.hidden_size)
                cls._init_queries(lq, adapter, init, seed)
            if prompts is None and pooling == "last_token":
                prompts = dict(SUMMARIZE_PROMPTS)
            manifest = {}
        if isinstance(prompts, dict):
            prompts = Prompts(**prompts)
        if isinstance(lora, dict):
            lora = LoraSpec(**lora)
        enc = cls(adapter, lq, prompts, method=method, pooling=pooling, lora=lora)
        enc.manifest = manifest
        return enc

    @staticmethod
    def _init_queries(lq: LatentQueries, adapter: BackboneAdapter, init: str, seed: int) -> None:
        if init == "random":
            lq.reset_random(torch.Generator().manual_seed(seed))
        elif init.startswith("text:"):
            ids = adapter.tokenizer(init[5:], add_special_tokens=False)["input_ids"]
            emb = adapter.input_embeddings.weight[torch.tensor(ids, device=adapter.device)]
            lq.init_from_embeddings(emb.detach().cpu())
        else:
            raise ValueError(f"unknown query init {init!r}: use 'random' or 'text:<words>'")

    def save(self, out_dir: str | Path, log_temp: torch.Tensor | None = None, **manifest) -> Path:
        """Write the checkpoint folder; `manifest` adds training config, data hashes, metrics."""
        bb = self.backbone
        base = {
            "backbone": {"path": bb.source, "revision": bb.revision, "model_type": bb.model_type,
                         "hidden_size": bb.hidden_size},
            "method": self.method,
            "pooling_mode": self.pooling,
            "pooling": "mean_of_query_states_l2" if self.pooling == "queries" else "last_token_state_l2",
            "prompts": self.prompts.to_dict(),
        }
        if self.method == "lora":
            base["lora"] = asdict(self.lora or LoraSpec())
        q = self.queries.weight if self.queries is not None else torch.zeros(0, bb.hidden_size)
        return save_checkpoint(out_dir, q, log_temp, {**base, **manifest}, llm=llm_delta(bb, self.method))

    def load_trained(self, ckpt_dir: str | Path) -> torch.Tensor | None:
        """Copy a checkpoint's queries and LLM weights into this encoder (resume); returns its log_temp."""
        q, log_temp, _ = load_checkpoint(ckpt_dir)
        with torch.no_grad():
            if self.queries is not None:
                self.queries.weight.copy_(q.to(self.queries.weight.device))
            llm = load_llm_weights(ckpt_dir)
            if llm:
                self.backbone.decoder.load_state_dict({k: v.to(self.backbone.dtype) for k, v in llm.items()},
                                                      strict=False)
        return log_temp

    @contextlib.contextmanager
    def using_prompts(self, prompts: Prompts | dict | None):
        """Temporarily encode with other prompts (e.g. a benchmark's own instruction); None or {}
        keeps the encoder's own."""
        if not prompts:
            yield self
            return
        saved = self.prompts
        self.prompts = Prompts(**prompts) if isinstance(prompts, dict) else prompts
        try:
            yield self
        finally:
            self.prompts = saved

    # ---- forward -------------------------------------------------------------------------
    def embed_inputs(self, inputs: dict, split: bool = False) -> torch.Tensor:
        """Model inputs -> L2-normalised fp32 embeddings (B, D), differentiable in what trains."""
        if self.pooling == "last_token":
            return F.normalize(self.backbone.forward_last(inputs).float(), dim=-1)  # (B, D)
        q = self.queries(self.backbone.dtype)  # (Nq, D)
        fwd = self.backbone.forward_split if split else self.backbone.forward_whole
        h = fwd(inputs, q)  # (B, Nq, D)
        return F.normalize(h.float().mean(dim=1), dim=-1)  # (B, D)

    def prepare(self, texts=None, images=None, offset: int = 0) -> dict:
        """Check and turn raw items into model inputs; errors name the item's index."""
        if texts is not None:
            texts = [check_text(t, offset + i) for i, t in enumerate(texts)]
        if images is not None:
            images = [load_image(im, offset + i) for i, im in enumerate(images)]
        return self.backbone.build_inputs(texts, images, self.prompts)

    @torch.no_grad()
    def _encode(self, n: int, make_batch, order, batch_size: int, progress, desc: str) -> np.ndarray:
        out = np.zeros((n, self.backbone.hidden_size), dtype=np.float32)
        bar = _progress(n, desc, progress, batch_size)
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if self.backbone.device.type == "cuda"
               else contextlib.nullcontext())
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            with ctx:
                emb = self.embed_inputs(make_batch(idx))
            out[idx] = emb.cpu().numpy()
            bar.update(len(idx))
        bar.close()
        return out

    def encode_text(self, texts: Sequence[str], batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        texts = [check_text(t, i) for i, t in enumerate(texts)]
        order = np.argsort([len(t) for t in texts], kind="stable")  # less padding per batch
        return self._encode(len(texts), lambda idx: self.backbone.build_inputs(
            [texts[i] for i in idx], None, self.prompts), order, batch_size, progress, "encode text")

    def encode_image(self, images: Sequence, batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        def batch(idx):
            return self.backbone.build_inputs(None, [load_image(images[i], i) for i in idx], self.prompts)

        return self._encode(len(images), batch, np.arange(len(images)), batch_size, progress, "encode images")

    def encode_multimodal(self, pairs: Sequence[tuple], batch_size: int = 32,
                          progress: bool | None = None) -> np.ndarray:
        """(image, instruction text) pairs, e.g. composed queries: reference image + modification."""
        texts = [check_text(t, i, "instruction") for i, (_, t) in enumerate(pairs)]

        def batch(idx):
            imgs = [load_image(pairs[i][0], i) for i in idx]
            return self.backbone.build_inputs([texts[i] for i in idx], imgs, self.prompts)

        return self._encode(len(pairs), batch, np.arange(len(pairs)), batch_size, progress, "encode image+text")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, progress: bool | None, batch_size: int):
    if progress is False or (progress is None and total <= batch_size):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item")

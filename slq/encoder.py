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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slq.backbones import BackboneAdapter, load_backbone
from slq.backbones.base import Prompts
from slq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from slq.inputs import check_text, load_image
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
    def __init__(self, backbone: BackboneAdapter, queries: LatentQueries, prompts: Prompts | None = None):
        super().__init__()
        if queries.hidden_size != backbone.hidden_size:
            raise CheckpointError(
                f"queries have hidden size {queries.hidden_size} but backbone {backbone.source} "
                f"({backbone.model_type}) has {backbone.hidden_size}"
            )
        self.backbone = backbone
        self.queries = queries.to(backbone.device)
        self.prompts = prompts or Prompts()
        self.manifest: dict = {}

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
            lq = LatentQueries(q.shape[0], q.shape[1])
            with torch.no_grad():
                lq.weight.copy_(q)
            prompts = prompts or manifest.get("prompts")
        else:
            lq = LatentQueries(num_queries, adapter.hidden_size)
            cls._init_queries(lq, adapter, init, seed)
            manifest = {}
        if isinstance(prompts, dict):
            prompts = Prompts(**prompts)
        enc = cls(adapter, lq, prompts)
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
            "pooling": "mean_of_query_states_l2",
            "prompts": self.prompts.to_dict(),
        }
        return save_checkpoint(out_dir, self.queries.weight, log_temp, {**base, **manifest})

    @contextlib.contextmanager
    def using_prompts(self, prompts: Prompts | dict | None):
        """Temporarily encode with other prompts (e.g. a benchmark's own instruction)."""
        if prompts is None:
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
        """Model inputs -> L2-normalised fp32 embeddings (B, D), differentiable in the queries."""
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

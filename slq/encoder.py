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
from slq.progress import bar
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
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        allow_backbone_mismatch: bool = False,
    ) -> SLQEncoder:
        """Load a backbone (local HF checkpoint folder) and queries (a checkpoint folder or a fresh init).

        With `queries` given, `backbone` defaults to the path recorded in its manifest, the prompts
        default to the ones it was trained with, and the backbone must be the one it was trained
        on (same content fingerprint; `allow_backbone_mismatch=True` overrides, at your risk).
        `min_pixels` / `max_pixels` bound the pixels, and so the visual tokens, of each image
        (Qwen-VL processors); None keeps the checkpoint's, else the backbone folder's own settings.
        """
        ckpt = None
        if queries is not None:
            ckpt = load_checkpoint(queries)
            backbone = backbone or ckpt[2]["backbone"]["path"]
            budget = ckpt[2].get("pixel_override") or {}
            min_pixels = min_pixels if min_pixels is not None else budget.get("min_pixels")
            max_pixels = max_pixels if max_pixels is not None else budget.get("max_pixels")
        if backbone is None:
            raise ValueError("give a backbone directory, or a query checkpoint that records one")
        dev = resolve_device(device)
        adapter = load_backbone(backbone, dtype=resolve_dtype(dtype, dev), device=dev,
                                attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
        if ckpt is not None:
            q, _, manifest = ckpt
            check_backbone(manifest, adapter, queries, allow_backbone_mismatch)
            _check_template(manifest, adapter, queries)
            lq = None
            if q.shape[0]:
                lq = LatentQueries(q.shape[0], q.shape[1])
                with torch.no_grad():
                    lq.weight.copy_(q)
            prompts = prompts or manifest.get("prompts") or {}
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
            prompts = Prompts.from_dict(prompts)
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
        """Write the checkpoint folder; `manifest` adds training config, data hashes, metrics.

        The manifest pins the backbone (content fingerprint) and records the prompts, the chat
        template's hash and the exact strings it renders, so the checkpoint is used as trained.
        """
        bb = self.backbone
        base = {
            "backbone": {"path": bb.source, "revision": bb.revision, "model_type": bb.model_type,
                         "hidden_size": bb.hidden_size, "fingerprint": bb.fingerprint},
            "method": self.method,
            "pooling_mode": self.pooling,
            "pooling": "mean_of_query_states_l2" if self.pooling == "queries" else "last_token_state_l2",
            "prompts": self.prompts.to_dict(),
            "template": self.rendered_prompts(),
            "pixel_budget": bb.pixel_budget,  # in force while training (audit)
            "pixel_override": bb.pixel_override,  # set over the folder's own: applied again on load
        }
        if self.method == "lora":
            base["lora"] = asdict(self.lora or LoraSpec())
        q = self.queries.weight if self.queries is not None else torch.zeros(0, bb.hidden_size)
        return save_checkpoint(out_dir, q, log_temp, {**base, **manifest}, llm=llm_delta(bb, self.method))

    def load_trained(self, ckpt_dir: str | Path) -> torch.Tensor | None:
        """Copy a checkpoint's queries and LLM weights into this encoder (resume); returns its log_temp.

        Strict: the query bank must have this encoder's shape, and LLM weights must be exactly
        the ones this method trains (every LoRA tensor, or every LLM tensor for full fine-tuning).
        """
        q, log_temp, manifest = load_checkpoint(ckpt_dir)
        mine = tuple(self.queries.weight.shape) if self.queries is not None else (0, self.backbone.hidden_size)
        if tuple(q.shape) != mine:
            raise CheckpointError(f"{ckpt_dir}: queries of shape {tuple(q.shape)} do not fit this encoder's {mine} "
                                  f"(method {manifest.get('method')!r} vs {self.method!r})")
        with torch.no_grad():
            if self.queries is not None:
                self.queries.weight.copy_(q.to(self.queries.weight.device))
            llm = load_llm_weights(ckpt_dir)
            if llm or self.method in ("lora", "full"):
                load_llm_delta(self.backbone, self.method, llm, self.lora, inject=False, keep_trainable=True)
        return log_temp

    def rendered_prompts(self) -> dict:
        """The chat template's sha256 and the exact strings it renders around a caption / an image."""
        b = self.backbone.inputs
        return {"chat_template_sha256": self.backbone.chat_template_sha256,
                "text": b.render(self.prompts.text.format(text="<caption>"), False, self.prompts),
                "image": b.render(self.prompts.image, True, self.prompts),
                "multimodal": b.render(self.prompts.multimodal.format(text="<instruction>"), True, self.prompts)}

    @contextlib.contextmanager
    def using_prompts(self, prompts: Prompts | dict | None):
        """Temporarily encode with other prompts (e.g. a benchmark's own instruction); None or {}
        keeps the encoder's own."""
        if not prompts:
            yield self
            return
        saved = self.prompts
        self.prompts = Prompts.from_dict(prompts) if isinstance(prompts, dict) else prompts
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

    def prepare(self, texts=None, images=None, offset: int = 0, max_text_tokens: int | None = None) -> dict:
        """Check and turn raw items into model inputs; errors name the item's index."""
        if texts is not None:
            texts = [check_text(t, offset + i) for i, t in enumerate(texts)]
        if images is not None:
            images = [load_image(im, offset + i) for i, im in enumerate(images)]
        return self.backbone.build_inputs(texts, images, self.prompts, max_text_tokens)

    @torch.no_grad()
    def _encode(self, kind: str, items: list, order, batch_size: int, progress, num_workers: int) -> np.ndarray:
        """Embed `items` in batches of `order`'s indices; a DataLoader builds the inputs (in
        `num_workers` processes when > 0) while the model runs. Runs in the backbone's dtype."""
        n = len(items)
        out = np.zeros((n, self.backbone.hidden_size), dtype=np.float32)
        batches = [np.asarray(order[s:s + batch_size]) for s in range(0, n, batch_size)]
        data = EncodeBatches(self.backbone.inputs, self.prompts, kind, items, batches)
        loader = make_loader(data, range(len(batches)), num_workers, self.backbone.device)
        bar = _progress(n, f"encode {kind}", progress, batch_size)
        visual = 0
        for idx, inputs in loader:
            emb = self.embed_inputs(inputs)
            out[idx] = emb.cpu().numpy()
            bar.update(len(idx))
            visual += self.backbone.inputs.visual_tokens(inputs)
            if visual:
                bar.set_postfix(visual_tokens_per_item=f"{visual / max(1, bar.n):.0f}")
        bar.close()
        return out

    def encode_text(self, texts: Sequence[str], batch_size: int = 32, progress: bool | None = None,
                    num_workers: int = 0) -> np.ndarray:
        texts = [check_text(t, i) for i, t in enumerate(texts)]
        order = np.argsort([len(t) for t in texts], kind="stable")  # less padding per batch
        return self._encode("text", texts, order, batch_size, progress, num_workers)

    def encode_image(self, images: Sequence, batch_size: int = 32, progress: bool | None = None,
                     num_workers: int = 0) -> np.ndarray:
        return self._encode("image", list(images), np.arange(len(images)), batch_size, progress, num_workers)

    def encode_multimodal(self, pairs: Sequence[tuple], batch_size: int = 32,
                          progress: bool | None = None, num_workers: int = 0) -> np.ndarray:
        """(image, instruction text) pairs, e.g. composed queries: reference image + modification."""
        texts = [check_text(t, i, "instruction") for i, (_, t) in enumerate(pairs)]
        items = [(im, t) for (im, _), t in zip(pairs, texts)]
        return self._encode("multimodal", items, np.arange(len(pairs)), batch_size, progress, num_workers)


def check_backbone(manifest: dict, adapter: BackboneAdapter, ckpt, allow_mismatch: bool = False) -> None:
    """A checkpoint's queries belong to the backbone they were trained on: same family and width,
    and the same content fingerprint (weights + config). Errors name both."""
    want = manifest["backbone"]
    if want.get("model_type") != adapter.model_type or manifest["hidden_size"] != adapter.hidden_size:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained on a {want.get('model_type')} backbone with hidden size "
            f"{manifest['hidden_size']}; {adapter.source} is {adapter.model_type} with hidden size "
            f"{adapter.hidden_size}. Load it onto the backbone it was trained with."
        )
    fp = want.get("fingerprint")
    if fp is None:
        import warnings

        warnings.warn(f"checkpoint {ckpt} records no backbone fingerprint (written by an older slq): only the "
                      "family and width were checked", stacklevel=3)
        return
    if fp != adapter.fingerprint and not allow_mismatch:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained on backbone {want.get('path')} (fingerprint {fp}), but "
            f"{adapter.source} has other weights or config (fingerprint {adapter.fingerprint}): its queries "
            "would load silently onto a different model. Point at the backbone it was trained with, or pass "
            "allow_backbone_mismatch=True (backbone.allow_mismatch: true) if you mean it."
        )


def _check_template(manifest: dict, adapter: BackboneAdapter, ckpt) -> None:
    """Warn when the backbone folder's chat template is not the one the checkpoint was trained with
    (the weights can be the same while a template file was edited or swapped)."""
    import warnings

    want = (manifest.get("template") or {}).get("chat_template_sha256")
    have = adapter.chat_template_sha256
    if want and want != have:
        warnings.warn(f"{adapter.source}'s chat template (sha256 {have[:12]}) is not the one checkpoint {ckpt} was "
                      f"trained with ({want[:12]}): inputs will not be wrapped as in training; the rendered "
                      "strings it was trained with are in its slq.json under `template`", stacklevel=3)


class EncodeBatches(torch.utils.data.Dataset):
    """Batch i of an encoding job -> (item indices, model inputs). Holds no model (see InputBuilder)."""

    def __init__(self, builder, prompts: Prompts, kind: str, items: list, batches: list[np.ndarray]):
        self.builder, self.prompts, self.kind, self.items, self.batches = builder, prompts, kind, items, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i: int):
        idx = self.batches[i]
        if self.kind == "text":
            return idx, self.builder.build([self.items[j] for j in idx], None, self.prompts)
        if self.kind == "image":
            return idx, self.builder.build(None, [load_image(self.items[j], int(j)) for j in idx], self.prompts)
        imgs = [load_image(self.items[j][0], int(j)) for j in idx]
        return idx, self.builder.build([self.items[j][1] for j in idx], imgs, self.prompts)


def make_loader(dataset, indices, num_workers: int, device: torch.device, prefetch: int = 2):
    """A DataLoader that yields dataset[i] for i in `indices`, built ahead in worker processes
    (spawned: fork is unsafe beside threads, Lance and a Prefect server) and pinned on GPU."""
    kw = {}
    if num_workers > 0:
        kw = dict(num_workers=num_workers, prefetch_factor=prefetch, multiprocessing_context="spawn",
                  persistent_workers=False)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=list(indices), collate_fn=_identity,
                                       pin_memory=device.type == "cuda", **kw)


def _identity(x):
    return x


def _progress(total: int, desc: str, progress: bool | None, batch_size: int):
    """Shown when asked (True), or by default (None) for more than one batch."""
    return bar(total, desc, show=bool(progress) or (progress is None and total > batch_size))

"""SLQEncoder: a frozen MLLM + shared latent queries -> L2-normalised embeddings.

    enc = SLQEncoder.from_pretrained("path/to/Qwen3-VL-4B-Instruct", queries="checkpoints/slq")
    txt = enc.encode_text(["a dog on a sofa"])            # (1, D) float32
    img = enc.encode_image(["photo.jpg"])                  # (1, D)
    cmp = enc.encode_multimodal([("ref.jpg", "make it red")])

An item's embedding does not depend on the rest of its batch (left padding, positions that
skip the pads), so inputs are freely re-ordered into length-sorted batches.

This class is SLQ's encoder and the base of every method (`slq.methods`: one registered
subclass per method, keeping its inputs, batching and checkpoint folder). `X.from_pretrained`
builds class X and loads only checkpoints of X's method; `slq.methods.from_pretrained` (the
registry, above this module, which never imports it) picks the class by a method's name or by
the one a checkpoint records.
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
from slq.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_llm_weights,
    manifest_method,
    read_manifest,
    save_checkpoint,
)
from slq.inputs import check_text, load_image
from slq.progress import bar
from slq.queries import LatentQueries
from slq.recipe import FitConfig


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class SLQEncoder(nn.Module):
    """A frozen MLLM + shared latent queries behind one encode API; only the queries train."""

    method = "slq"  # the name of its method (slq.methods registers a class per method)
    pooling = "queries"  # the mean of the queries' last hidden states
    poolings: tuple[str, ...] = ("queries",)  # the poolings the method takes; the first is its default
    split_exact = True  # the prompt's states do not depend on what trains: the split forward is exact

    def __init__(self, backbone: BackboneAdapter, queries: LatentQueries | None, prompts: Prompts | None = None):
        super().__init__()
        if queries is None and self.pooling == "queries":
            raise ValueError(f"method {self.method!r} pools by its queries: give it a LatentQueries bank")
        if queries is not None and queries.hidden_size != backbone.hidden_size:
            raise CheckpointError(
                f"queries have hidden size {queries.hidden_size} but backbone {backbone.source} "
                f"({backbone.model_type}) has {backbone.hidden_size}"
            )
        self.backbone = backbone
        self.queries = queries.to(backbone.device) if queries is not None else None
        self.prompts = prompts or Prompts()
        self.manifest: dict = {}

    @property
    def num_queries(self) -> int:
        return self.queries.num_queries if self.queries is not None else 0

    def make_trainable(self) -> None:
        """Unfreeze what the method trains in the LLM: nothing for SLQ (the queries always train)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What training updates besides the temperature: the queries."""
        return [self.queries.weight] if self.queries is not None else []

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        backbone: str | Path | None = None,
        queries: str | Path | None = None,
        *,
        num_queries: int = FitConfig.num_queries,
        init: str = "random",
        seed: int = 0,
        prompts: Prompts | dict | None = None,
        dtype=None,
        device=None,
        attn_implementation: str | None = None,
        method: str | None = None,
        pooling: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        allow_backbone_mismatch: bool = False,
        **method_options,
    ) -> SLQEncoder:
        """Load a backbone (local HF checkpoint folder) and queries (a checkpoint folder or a fresh init).

        With `queries` given, `backbone` defaults to the path recorded in its manifest, the prompts
        default to the ones it was trained with, and the backbone must be the one it was trained
        on (same content fingerprint; `allow_backbone_mismatch=True` overrides, at your risk).
        `min_pixels` / `max_pixels` bound the pixels, and so the visual tokens, of each image
        (Qwen-VL processors); None keeps the checkpoint's, else the backbone folder's own settings.
        The encoder is this class's method: `method`, when given, must name it, and so must a
        checkpoint's manifest (`slq.methods.from_pretrained` picks the class for any method).
        `pooling` and `method_options` (e.g. `lora`, a LoraSpec or dict) are the method's own, for
        a fresh encoder; a checkpoint's manifest decides them for a trained one.
        """
        options = {"pooling": pooling, **method_options}
        manifest: dict = {}
        if queries is not None:
            manifest = read_manifest(queries)
            method = manifest_method(manifest)
            backbone = backbone or manifest["backbone"]["path"]
            budget = manifest.get("pixel_override") or {}
            min_pixels = min_pixels if min_pixels is not None else budget.get("min_pixels")
            max_pixels = max_pixels if max_pixels is not None else budget.get("max_pixels")
            prompts = prompts or manifest.get("prompts") or {}
            options = cls.manifest_options(manifest)
        if method is not None and method != cls.method:
            where = f"checkpoint {queries} records method {method!r}" if queries is not None else f"method {method!r}"
            raise ValueError(f"{cls.__name__}.from_pretrained builds method {cls.method!r}, but {where}: load it "
                             "with slq.methods.from_pretrained, which picks the method's class")
        options["pooling"] = cls.resolve_pooling(options.get("pooling"))
        if backbone is None:
            raise ValueError("give a backbone directory, or a query checkpoint that records one")
        dev = resolve_device(device)
        adapter = load_backbone(backbone, dtype=resolve_dtype(dtype, dev), device=dev,
                                attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
        if queries is None:
            return cls.fresh(adapter, num_queries=num_queries, init=init, seed=seed, prompts=prompts, **options)
        check_backbone(manifest, adapter, queries, allow_backbone_mismatch)
        check_hidden_state(manifest, adapter, queries)
        check_template(manifest, adapter, queries)
        enc = cls.fresh(adapter, num_queries=manifest["num_queries"], prompts=prompts, **options)
        enc._copy_trained(queries, resume=False)
        enc.manifest = manifest
        return enc

    @classmethod
    def resolve_pooling(cls, pooling: str | None) -> str:
        """`pooling`, or the method's default when None; one the method does not take is an error."""
        if pooling is None:
            return cls.poolings[0]
        if pooling not in cls.poolings:
            raise ValueError(f"method {cls.method!r} takes pooling {' or '.join(cls.poolings)}, not {pooling!r}")
        return pooling

    @classmethod
    def manifest_options(cls, manifest: dict) -> dict:
        """The options `fresh` takes, as a checkpoint's manifest records them (`method_manifest`)."""
        return {"pooling": manifest.get("pooling_mode", "queries")}  # written before the methods existed: queries

    @classmethod
    def fresh(cls, adapter: BackboneAdapter, *, num_queries: int = FitConfig.num_queries, init: str = "random",
              seed: int = 0, prompts: Prompts | dict | None = None, pooling: str | None = None,
              **method_options) -> SLQEncoder:
        """An untrained encoder on a loaded backbone: SLQ's (query pooling). Options that other
        methods take (e.g. `lora`) are ignored, so one set of settings builds any method."""
        cls.resolve_pooling(pooling)
        return cls(adapter, new_queries(adapter, num_queries, init, seed), as_prompts(prompts))

    def save(self, out_dir: str | Path, log_temp: torch.Tensor | None = None, **manifest) -> Path:
        """Write the checkpoint folder; `manifest` adds training config, data hashes, metrics.

        The manifest pins the backbone (content fingerprint) and records the method, the prompts,
        the chat template's hash and the exact strings it renders, so the checkpoint is used as
        trained.
        """
        bb = self.backbone
        base = {
            "backbone": {"path": bb.source, "revision": bb.revision, "model_type": bb.model_type,
                         "hidden_size": bb.hidden_size, "fingerprint": bb.fingerprint},
            **self.method_manifest(),
            "prompts": self.prompts.to_dict(),
            "template": self.rendered_prompts(),
            "pixel_budget": bb.pixel_budget,  # in force while training (audit)
            "pixel_override": bb.pixel_override,  # set over the folder's own: applied again on load
            "hidden_state": bb.hidden_state,  # the decoder state pooled (after its final norm): checked on load
        }
        q = self.queries.weight if self.queries is not None else torch.zeros(0, bb.hidden_size)
        return save_checkpoint(out_dir, q, log_temp, {**base, **manifest}, llm=self.llm_tensors())

    def method_manifest(self) -> dict:
        """What the checkpoint's manifest records about the method (read back by from_pretrained)."""
        return {"method": self.method, "pooling_mode": self.pooling, "pooling": "mean_of_query_states_l2"}

    def llm_tensors(self) -> dict[str, torch.Tensor]:
        """The LLM weights the method changed, saved beside the queries: none for SLQ."""
        return {}

    def load_trained(self, ckpt_dir: str | Path) -> torch.Tensor | None:
        """Copy a checkpoint's queries and LLM weights into this encoder (resume); returns its log_temp.

        Strict: the query bank must have this encoder's shape, and LLM weights must be exactly
        the ones this method trains (none for SLQ).
        """
        return self._copy_trained(ckpt_dir, resume=True)

    def _copy_trained(self, ckpt_dir: str | Path, resume: bool) -> torch.Tensor | None:
        q, log_temp, manifest = load_checkpoint(ckpt_dir)
        mine = tuple(self.queries.weight.shape) if self.queries is not None else (0, self.backbone.hidden_size)
        if tuple(q.shape) != mine:
            raise CheckpointError(f"{ckpt_dir}: queries of shape {tuple(q.shape)} do not fit this encoder's {mine} "
                                  f"(method {manifest.get('method')!r} vs {self.method!r})")
        if self.queries is not None:
            with torch.no_grad():
                self.queries.weight.copy_(q.to(self.queries.weight.device))
        self.load_llm(ckpt_dir, resume)
        return log_temp

    def load_llm(self, ckpt_dir: str | Path, resume: bool) -> None:
        """Put the checkpoint's LLM weights into the backbone. SLQ trains none: a checkpoint that
        holds some is refused. `resume`: into an encoder that is training (a method's override)."""
        tensors = load_llm_weights(ckpt_dir)
        if tensors:
            raise ValueError(f"checkpoint holds LLM weights ({len(tensors)} tensors) but method {self.method!r} "
                             "trains none: the checkpoint is damaged or its manifest's method is wrong")

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
        self.prompts = as_prompts(prompts)
        try:
            yield self
        finally:
            self.prompts = saved

    # ---- forward -------------------------------------------------------------------------
    def embed_inputs(self, inputs: dict, split: bool = False, buckets: int = 1) -> torch.Tensor:
        """Model inputs -> L2-normalised fp32 embeddings (B, D), differentiable in what trains.

        `split`: the prompt under no_grad into a KV cache, then the queries (exact; see
        `BackboneAdapter.forward_split`), its prompt in up to `buckets` length groups.
        """
        q = self.queries(self.backbone.dtype)  # (Nq, D)
        if split:
            h = self.backbone.forward_split(inputs, q, buckets=buckets)  # (B, Nq, D)
        else:
            h = self.backbone.forward_whole(inputs, q)
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


def new_queries(adapter: BackboneAdapter, num_queries: int, init: str, seed: int) -> LatentQueries:
    """A fresh query bank: seeded random, or `text:<words>` (the words' token embeddings, cycled)."""
    lq = LatentQueries(num_queries, adapter.hidden_size)
    if init == "random":
        lq.reset_random(torch.Generator().manual_seed(seed))
    elif init.startswith("text:"):
        ids = adapter.tokenizer(init[5:], add_special_tokens=False)["input_ids"]
        emb = adapter.input_embeddings.weight[torch.tensor(ids, device=adapter.device)]
        lq.init_from_embeddings(emb.detach().cpu())
    else:
        raise ValueError(f"unknown query init {init!r}: use 'random' or 'text:<words>'")
    return lq


def as_prompts(prompts: Prompts | dict | None) -> Prompts | None:
    return Prompts.from_dict(prompts) if isinstance(prompts, dict) else prompts


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


def check_hidden_state(manifest: dict, adapter: BackboneAdapter, ckpt) -> None:
    """The queries were trained on one decoder state (after the final norm, or before it: they
    differ, e.g. in Qwen3-VL, vllm issue 33167); pooling another would give other embeddings with no
    error. A checkpoint that records none was written before the record existed, when slq pooled
    the post-norm state, as it does now."""
    want = manifest.get("hidden_state", "final_norm")
    if want != adapter.hidden_state:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained on the decoder's {want!r} hidden state, but slq's {adapter.model_type} "
            f"adapter pools {adapter.hidden_state!r}: its embeddings would not be the trained ones. Load it with "
            "the tool that trained it, or retrain the queries here (docs/serving.md, 'Which hidden state')")


def check_template(manifest: dict, adapter: BackboneAdapter, ckpt) -> None:
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
        kw = {"num_workers": num_workers, "prefetch_factor": prefetch, "multiprocessing_context": "spawn",
              "persistent_workers": False}
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=list(indices), collate_fn=_identity,
                                       pin_memory=device.type == "cuda", **kw)


def _identity(x):
    return x


def _progress(total: int, desc: str, progress: bool | None, batch_size: int):
    """Shown when asked (True), or by default (None) for more than one batch."""
    return bar(total, desc, show=bool(progress) or (progress is None and total > batch_size))

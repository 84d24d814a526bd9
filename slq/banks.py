"""Many query banks on one frozen backbone, every bank's embedding from one pass over the prompt.

SLQ never changes the backbone, so one loaded MLLM can carry K named query banks (one per
domain, task or customer). The queries come after the prompt and attend causally, so the
prompt's keys and values are the same for every bank: K banks cost one prompt forward plus
K x N_q query tokens, not K prompt forwards.

    enc = MultiBankEncoder.from_pretrained({"captions": "ckpt/a", "knowledge": "ckpt/b"})
    out = enc.encode_image(["photo.jpg"])     # {"captions": (1, D), "knowledge": (1, D)} float32

How a batch runs (`forward_banks_split`, the default): the prompt once into a KV cache (as
`BackboneAdapter.forward_split` does, optionally in length buckets), then all the banks' query
tokens, concatenated, in ONE forward against that cache, with

- a 4-D attention mask in which each bank's queries see the prompt's real tokens and their own
  bank's queries only, causally within the bank (what a single bank sees);
- positions as if each bank were alone: bank k's queries get exactly the positions a single
  bank of its size gets (`adapter.query_positions`: mRoPE continuation for the Qwen-VL
  families, 1-D for LLaVA), so banks overlap in position, never in attention.

Each bank's states are then those of a single-bank forward (exact up to float rounding), and
banks may have different N_q. `forward_banks_whole` is the same in one whole-sequence forward
(prompt + all banks' slots, right-padded as `forward_whole` runs): the model computes the
prompt's positions itself (mRoPE `get_rope_index`), then a pre-hook on the decoder replaces
the 2-D mask with the bank mask and shifts each bank's slot positions back to a single bank's.

Prompts: a bank keeps the prompts it was trained with (its checkpoint's manifest). Banks share
a prompt pass only when their `Prompts` are equal, since another prompt is another token
sequence and another KV cache; `encode_*` groups the banks by prompts (`prompt_groups`) and
runs one prompt pass per group per batch, each followed by one query forward for the group's
banks. With the default prompts every bank is in one group.

One backbone, so one pixel budget: a bank whose checkpoint was trained with another pixel
override (its images tokenized otherwise), on another backbone (content fingerprint), or by a
method that changes the backbone or pools otherwise (LoRA, full fine-tuning, last token) is
refused by name. The 4-D mask needs the `sdpa` or `eager` attention implementation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slq.backbones import BackboneAdapter, load_backbone
from slq.backbones.base import (
    HookNotFired,
    Prompts,
    merge_prefixes,
    plan_buckets,
    right_padded_with_slots,
)
from slq.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_llm_weights,
    manifest_method,
    read_manifest,
)
from slq.encoder import (
    EncodeBatches,
    SLQEncoder,
    _progress,
    as_prompts,
    check_backbone,
    check_template,
    make_loader,
    resolve_device,
    resolve_dtype,
)
from slq.inputs import check_text
from slq.queries import LatentQueries

BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MASK_ATTENTION = ("sdpa", "eager")  # implementations that read a custom additive 4-D mask


class BankError(ValueError):
    """A bank that cannot join (or be asked of) a multi-bank encoder, with what to do about it."""


# ---- masks and positions -------------------------------------------------------------------

def _segments(sizes: Sequence[int], device) -> torch.Tensor:
    """Bank id (1..K) of each of the sum(sizes) query slots, in order.  -> (T,)"""
    return torch.repeat_interleave(torch.arange(1, len(sizes) + 1, device=device),
                                   torch.tensor(list(sizes), device=device))


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> the additive float mask sdpa and eager attention add to the scores."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def bank_query_mask(prefix_mask: torch.Tensor, sizes: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The query step's mask: rows are the banks' query tokens, columns the cached prompt then
    the query tokens. Query i of bank k sees the row's real prompt tokens, and query j of the
    same bank where j <= i.  prefix_mask (B, L) 1 = real -> (B, 1, T, L+T) additive, T = sum(sizes)"""
    B, _ = prefix_mask.shape
    seg = _segments(sizes, prefix_mask.device)  # (T,)
    T = seg.shape[0]
    idx = torch.arange(T, device=seg.device)
    own = (seg.unsqueeze(1) == seg.unsqueeze(0)) & (idx.unsqueeze(0) <= idx.unsqueeze(1))  # (T, T)
    prompt = prefix_mask.bool().unsqueeze(1).expand(B, T, -1)  # (B, T, L)
    allowed = torch.cat([prompt, own.unsqueeze(0).expand(B, -1, -1)], dim=-1)  # (B, T, L+T)
    return _additive(allowed, dtype).unsqueeze(1)


def bank_whole_mask(n_real: torch.Tensor, sizes: Sequence[int], width: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole-sequence mask of a right-padded batch [real tokens, bank 1 slots, ..., bank K
    slots, pads]: real tokens attend causally among themselves, bank k's slots to the real
    tokens and causally to their own bank, a pad only to itself (no row is fully masked).
    n_real (B,) -> (B, 1, W, W) additive"""
    dev = n_real.device
    seg_slots = _segments(sizes, dev)  # (T,)
    T = seg_slots.shape[0]
    col = torch.arange(width, device=dev)
    rel = col.unsqueeze(0) - n_real.unsqueeze(1)  # (B, W): index into the slots
    in_slots = (rel >= 0) & (rel < T)
    seg = torch.where(in_slots, seg_slots[rel.clamp(0, T - 1)], torch.full_like(rel, -1))
    seg = torch.where(rel < 0, torch.zeros_like(seg), seg)  # (B, W): 0 real, k bank, -1 pad
    si, sj = seg.unsqueeze(2), seg.unsqueeze(1)  # (B, W, 1), (B, 1, W)
    causal = col.unsqueeze(0) <= col.unsqueeze(1)  # (W, W): key j <= query i
    allowed = causal & (((sj == 0) & (si >= 0)) | ((sj == si) & (si > 0)))
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=dev)
    return _additive(allowed, dtype).unsqueeze(1)


def bank_slot_shift(n_real: torch.Tensor, sizes: Sequence[int], width: int) -> torch.Tensor:
    """How far each column's position is moved back so that every bank's slots start where a
    single bank's would: bank k's slots by the number of slots before it.  -> (B, W) long"""
    offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()], device=n_real.device)
    seg_slots = _segments(sizes, n_real.device) - 1  # (T,) bank index 0..K-1
    T = seg_slots.shape[0]
    rel = torch.arange(width, device=n_real.device).unsqueeze(0) - n_real.unsqueeze(1)
    in_slots = (rel >= 0) & (rel < T)
    return torch.where(in_slots, offsets[seg_slots[rel.clamp(0, T - 1)]], torch.zeros_like(rel))


def check_mask_support(adapter: BackboneAdapter) -> None:
    impl = getattr(adapter.decoder.config, "_attn_implementation", None) or "eager"
    if impl not in MASK_ATTENTION:
        raise BankError(f"multi-bank encoding needs a custom 4-D attention mask, which the {impl!r} attention "
                        f"implementation does not take: load the backbone with attn_implementation='sdpa' "
                        "(or 'eager')")


# ---- the forwards --------------------------------------------------------------------------

def forward_banks_split(adapter: BackboneAdapter, inputs: dict, queries: Sequence[torch.Tensor],
                        buckets: int = 1) -> list[torch.Tensor]:
    """The prompt once into a KV cache, then every bank's queries in one forward.
    queries: K tensors (Nq_k, D) -> K last-hidden-state tensors (B, Nq_k, D)."""
    check_mask_support(adapter)
    inputs = adapter._to_device(inputs)
    B = inputs["input_ids"].shape[0]
    sizes = [int(q.shape[0]) for q in queries]
    mask = inputs["attention_mask"]
    groups = plan_buckets(mask.long().sum(-1).tolist(), buckets) if buckets > 1 else [list(range(B))]
    if len(groups) == 1:
        cache, pos = adapter._prefix(inputs)
    else:
        parts = [(idx, *adapter._prefix(adapter.select_rows(inputs, idx))) for idx in groups]
        cache, pos = merge_prefixes(parts, B, mask.shape[1])
    positions = torch.cat([adapter.query_positions(pos, n) for n in sizes], dim=-1)  # (..., B, T)
    attn = bank_query_mask(mask, sizes, adapter.dtype)
    q = torch.cat([x.to(adapter.dtype) for x in queries]).unsqueeze(0).expand(B, -1, -1)  # (B, T, D)
    out = adapter.base(inputs_embeds=q, attention_mask=attn, position_ids=positions, use_cache=True,
                       **{adapter.cache_kwarg: cache})
    return list(out.last_hidden_state.split(sizes, dim=1))


def forward_banks_whole(adapter: BackboneAdapter, inputs: dict, queries: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Prompt and every bank's query slots in one whole-sequence forward (right-padded, as
    `forward_whole`).  queries: K tensors (Nq_k, D) -> K tensors (B, Nq_k, D)."""
    check_mask_support(adapter)
    sizes = [int(q.shape[0]) for q in queries]
    total = sum(sizes)
    inputs = adapter._to_device(inputs)
    n_real = inputs["attention_mask"].long().sum(-1)  # (B,)
    ext, slots = right_padded_with_slots(inputs, total, adapter.pad_id)
    B, W = slots.shape
    attn = bank_whole_mask(n_real, sizes, W, adapter.dtype)
    shift = bank_slot_shift(n_real, sizes, W)
    seen = {}

    def to_banks(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None or pos.shape[-2:] != (B, W):
            raise HookNotFired(f"{type(adapter.base).__name__} called its decoder without position ids of the "
                               f"batch's shape ({B}, {W}): multi-bank whole-sequence encoding cannot place the "
                               "banks' queries; use the split forward (split=True)")
        seen["fired"] = True
        return args, {**kwargs, "position_ids": pos - shift, "attention_mask": attn}

    handle = adapter.decoder.register_forward_pre_hook(to_banks, with_kwargs=True)
    q = torch.cat([x.to(adapter.dtype) for x in queries]).unsqueeze(0).expand(B, -1, -1)  # (B, T, D)
    try:
        with adapter._queries_in(q, slots):
            out = adapter.base(**ext, use_cache=False)
    finally:
        handle.remove()
    if not seen:
        raise HookNotFired(f"the decoder's pre-hook on {type(adapter.decoder).__name__} did not run (a wrapped "
                           "or compiled model?); load the backbone with slq.backbones.load_backbone")
    D = out.last_hidden_state.shape[-1]
    return list(out.last_hidden_state[slots].view(B, total, D).split(sizes, dim=1))


# ---- the encoder ---------------------------------------------------------------------------

class MultiBankEncoder(nn.Module):
    """One frozen backbone + K named LatentQueries banks; `encode_*` -> {bank name: (N, D) float32}."""

    def __init__(self, backbone: BackboneAdapter, banks: Mapping[str, LatentQueries] | None = None,
                 prompts: Prompts | dict | None = None):
        """`banks` all take `prompts` (default: the reference recipe's); `add_bank` gives a bank its own."""
        super().__init__()
        self.backbone = backbone
        self.banks = nn.ModuleDict()
        self.prompts: dict[str, Prompts] = {}
        self.manifests: dict[str, dict] = {}
        for name, q in (banks or {}).items():
            self.add_bank(name, q, prompts)

    # ---- construction ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.banks.keys())

    def num_queries(self, name: str) -> int:
        return self.banks[self._known(name)].num_queries

    def add_bank(self, name: str, queries: LatentQueries, prompts: Prompts | dict | None = None,
                 manifest: dict | None = None) -> None:
        if not isinstance(name, str) or not BANK_NAME.match(name):
            raise BankError(f"bank name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                            "letter or digit")
        if name in self.banks:
            raise BankError(f"bank {name!r} is already loaded: give each bank its own name")
        if queries.hidden_size != self.backbone.hidden_size:
            raise BankError(f"bank {name!r}: its queries have hidden size {queries.hidden_size}, the backbone "
                            f"{self.backbone.source} ({self.backbone.model_type}) has {self.backbone.hidden_size}; "
                            "load it onto the backbone it was trained on")
        self.banks[name] = queries.to(self.backbone.device)
        self.prompts[name] = as_prompts(prompts) or Prompts()
        self.manifests[name] = dict(manifest or {})

    def add_checkpoint(self, name: str, ckpt: str | Path, allow_backbone_mismatch: bool = False) -> None:
        """Load a query checkpoint as bank `name`; refused, by name, unless it is an SLQ bank trained on
        this backbone (same family, width and content fingerprint) with this pixel budget."""
        try:
            manifest = read_manifest(ckpt)
        except CheckpointError as e:
            raise BankError(f"bank {name!r}: {e}") from None
        method = manifest_method(manifest)
        if method != SLQEncoder.method or manifest.get("pooling_mode", "queries") != "queries":
            raise BankError(f"bank {name!r}: checkpoint {ckpt} was trained by method {method!r} "
                            f"(pooling {manifest.get('pooling_mode')!r}), which changes the backbone or pools "
                            "otherwise; only SLQ query banks share one frozen backbone. Serve it on its own")
        try:
            check_backbone(manifest, self.backbone, ckpt, allow_backbone_mismatch)
        except CheckpointError as e:
            raise BankError(f"bank {name!r}: {e}") from None
        override = manifest.get("pixel_override") or {}
        if override != (self.backbone.pixel_override or {}):
            raise BankError(f"bank {name!r}: checkpoint {ckpt} was trained with pixel override {override or 'none'}, "
                            f"this backbone is loaded with {self.backbone.pixel_override or 'none'}: its images "
                            "would be tokenized otherwise. Load the banks that share a pixel budget together")
        if load_llm_weights(ckpt):
            raise BankError(f"bank {name!r}: checkpoint {ckpt} holds LLM weights; an SLQ bank holds none")
        check_template(manifest, self.backbone, ckpt)
        q, _, _ = load_checkpoint(ckpt)
        lq = LatentQueries(q.shape[0], q.shape[1])
        with torch.no_grad():
            lq.weight.copy_(q)
        self.add_bank(name, lq, manifest.get("prompts") or {}, manifest)

    @classmethod
    def from_pretrained(cls, banks: Mapping[str, str | Path], backbone: str | Path | None = None, *, dtype=None,
                        device=None, attn_implementation: str | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None, allow_backbone_mismatch: bool = False) -> MultiBankEncoder:
        """Load one backbone (default: the one the first bank's manifest records, with its pixel
        override) and every named bank checkpoint onto it."""
        if not banks:
            raise BankError("give at least one bank: {name: checkpoint folder}")
        first_name, first = next(iter(banks.items()))
        try:
            manifest = read_manifest(first)
        except CheckpointError as e:
            raise BankError(f"bank {first_name!r}: {e}") from None
        backbone = backbone or manifest["backbone"]["path"]
        budget = manifest.get("pixel_override") or {}
        min_pixels = min_pixels if min_pixels is not None else budget.get("min_pixels")
        max_pixels = max_pixels if max_pixels is not None else budget.get("max_pixels")
        dev = resolve_device(device)
        adapter = load_backbone(backbone, dtype=resolve_dtype(dtype, dev), device=dev,
                                attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
        enc = cls(adapter)
        for name, ckpt in banks.items():
            enc.add_checkpoint(name, ckpt, allow_backbone_mismatch)
        return enc

    @classmethod
    def from_encoders(cls, encoders: Mapping[str, SLQEncoder]) -> MultiBankEncoder:
        """Banks from single-bank SLQ encoders that share one loaded backbone (the same object)."""
        if not encoders:
            raise BankError("give at least one encoder: {name: SLQEncoder}")
        adapter = next(iter(encoders.values())).backbone
        enc = cls(adapter)
        for name, e in encoders.items():
            if e.backbone is not adapter:
                raise BankError(f"bank {name!r}: its encoder holds another backbone object; load the encoders onto "
                                "one backbone (SLQEncoder.fresh(adapter, ...)) or use MultiBankEncoder.from_pretrained")
            if type(e).method != SLQEncoder.method or e.queries is None or e.llm_tensors():
                raise BankError(f"bank {name!r}: method {type(e).method!r} is not an SLQ query bank on a frozen "
                                "backbone")
            enc.add_bank(name, e.queries, e.prompts, e.manifest)
        return enc

    def _known(self, name: str) -> str:
        if name not in self.banks:
            raise BankError(f"unknown bank {name!r}; loaded: {', '.join(self.names) or 'none'}")
        return name

    def prompt_groups(self, names: Sequence[str] | None = None) -> list[tuple[Prompts, list[str]]]:
        """The asked banks grouped by equal prompts, in order of first appearance: one prompt pass each."""
        groups: list[tuple[Prompts, list[str]]] = []
        for name in (self.names if names is None else [self._known(n) for n in dict.fromkeys(names)]):
            p = self.prompts[name]
            for gp, members in groups:
                if gp == p:
                    members.append(name)
                    break
            else:
                groups.append((p, [name]))
        return groups

    # ---- forward ---------------------------------------------------------------------------
    def embed_inputs(self, inputs: dict, names: Sequence[str] | None = None, split: bool = True,
                     buckets: int = 1) -> dict[str, torch.Tensor]:
        """Model inputs -> {bank: L2-normalised fp32 (B, D)} for banks that share the prompts the
        inputs were built with, all from one pass (see the module's docstring)."""
        names = self.names if names is None else [self._known(n) for n in names]
        qs = [self.banks[n](self.backbone.dtype) for n in names]
        if split:
            hs = forward_banks_split(self.backbone, inputs, qs, buckets=buckets)
        else:
            hs = forward_banks_whole(self.backbone, inputs, qs)
        return {n: F.normalize(h.float().mean(dim=1), dim=-1) for n, h in zip(names, hs)}

    @torch.no_grad()
    def _encode(self, kind: str, items: list, order, names, batch_size: int, progress, num_workers: int,
                split: bool, buckets: int) -> dict[str, np.ndarray]:
        n = len(items)
        D = self.backbone.hidden_size
        out: dict[str, np.ndarray] = {}
        batches = [np.asarray(order[s:s + batch_size]) for s in range(0, n, batch_size)]
        for prompts, members in self.prompt_groups(names):
            for m in members:
                out[m] = np.zeros((n, D), dtype=np.float32)
            data = EncodeBatches(self.backbone.inputs, prompts, kind, items, batches)
            loader = make_loader(data, range(len(batches)), num_workers, self.backbone.device)
            bar = _progress(n, f"encode {kind} ({', '.join(members)})", progress, batch_size)
            for idx, inputs in loader:
                for m, emb in self.embed_inputs(inputs, members, split=split, buckets=buckets).items():
                    out[m][idx] = emb.cpu().numpy()
                bar.update(len(idx))
            bar.close()
        return out

    def encode_text(self, texts: Sequence[str], banks: Sequence[str] | None = None, batch_size: int = 32,
                    progress: bool | None = None, num_workers: int = 0, split: bool = True,
                    buckets: int = 1) -> dict[str, np.ndarray]:
        texts = [check_text(t, i) for i, t in enumerate(texts)]
        order = np.argsort([len(t) for t in texts], kind="stable")  # less padding per batch
        return self._encode("text", texts, order, banks, batch_size, progress, num_workers, split, buckets)

    def encode_image(self, images: Sequence, banks: Sequence[str] | None = None, batch_size: int = 32,
                     progress: bool | None = None, num_workers: int = 0, split: bool = True,
                     buckets: int = 1) -> dict[str, np.ndarray]:
        return self._encode("image", list(images), np.arange(len(images)), banks, batch_size, progress,
                            num_workers, split, buckets)

    def encode_multimodal(self, pairs: Sequence[tuple], banks: Sequence[str] | None = None, batch_size: int = 32,
                          progress: bool | None = None, num_workers: int = 0, split: bool = True,
                          buckets: int = 1) -> dict[str, np.ndarray]:
        """(image, instruction text) pairs, e.g. composed queries: reference image + modification."""
        texts = [check_text(t, i, "instruction") for i, (_, t) in enumerate(pairs)]
        items = [(im, t) for (im, _), t in zip(pairs, texts)]
        return self._encode("multimodal", items, np.arange(len(pairs)), banks, batch_size, progress, num_workers,
                            split, buckets)


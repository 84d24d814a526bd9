"""fit(): train an encoder's trainable part and the temperature contrastively (symmetric InfoNCE).

What trains is the method's (slq.methods): for SLQ the shared latent queries alone, the backbone
frozen; for the compared methods LoRA adapters or the whole LLM; zero-shot trains nothing. AdamW
over those and the log-temperature (the temperature without weight decay), linear
warm-up then cosine decay, gradient clipping, periodic checkpoints for resume (by step and by time). The model runs in
the backbone's own dtype (`backbone.dtype`); what trains is kept in float32 (queries, LoRA
adapters, and for full fine-tuning an fp32 master copy of the LLM weights). A DataLoader builds
the next batches (image decoding, the processor) while the model computes. A run killed at any point and
restarted with the same arguments resumes from its last checkpoint and ends with the same
result as an uninterrupted run: the batch at step s is a pure function of (seed, s).

Multi-GPU: launch the same script under `torchrun --nproc_per_node=N ...`; each rank takes its
shard of every global batch, negatives are gathered across ranks (`slq.loss.gather_features`)
and the gradients are reduced so that every rank applies the global-batch gradient.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slq.io import write_atomic_dir
from slq.loss import ContrastiveLoss, is_distributed, sync_gradients
from slq.recipe import FitConfig  # re-exported: slq.train.FitConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    log_temp: torch.Tensor | None = None
    start_cosine: dict | None = None  # the first batch's mean pairwise cosine per side (`batch_spread`)

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def _pair(item, i: int) -> tuple:
    """(image, caption, id) from a dict row or an (image, caption) tuple."""
    if isinstance(item, dict):
        return item["image"], item["caption"], item.get("id", i)
    image, caption = item[:2]
    return image, caption, i


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> torch.Tensor:
    """The rows of the global batch at `step`: a per-epoch seeded permutation, last partial batch dropped."""
    per_epoch = n // global_batch
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[j * global_batch:(j + 1) * global_batch]


def check_enough_data(n_pairs: int, global_batch: int) -> None:
    if n_pairs < global_batch:
        raise ValueError(f"{n_pairs} training pairs are fewer than one global batch ({global_batch}); "
                         "lower train.batch_size or add data")


COLLAPSED_COSINE = 0.98  # the first batch's embeddings this alike: the loss starts at chance and moves slowly


def batch_spread(emb: torch.Tensor) -> float:
    """Mean cosine between the distinct rows of a batch of embeddings: near 1 when every input gets
    almost the same vector (a real LM's last hidden states often share one dominant direction)."""
    e = torch.nn.functional.normalize(emb.detach().float(), dim=-1)
    n = e.shape[0]
    if n < 2:
        return float("nan")
    return float(((e @ e.T).sum() - n) / (n * (n - 1)))


def warn_if_collapsed(spread: dict) -> None:
    """A warning when the first batch's embeddings are nearly collinear on either side."""
    import warnings

    bad = {k: v for k, v in spread.items() if v > COLLAPSED_COSINE}
    if bad:
        said = ", ".join(f"{k} {v:.3f}" for k, v in bad.items())
        warnings.warn(f"the first batch's embeddings are nearly collinear (mean pairwise cosine: {said}; above "
                      f"{COLLAPSED_COSINE}): the backbone gives every input almost the same vector, so the loss "
                      "starts at chance and falls slowly. Expect many more steps, a lower train.temperature, "
                      "or check that the backbone can tell its inputs apart (docs/methods.md, the real-LM backbone)",
                      RuntimeWarning, stacklevel=3)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    encoder,
    data: Sequence,
    cfg: FitConfig,
    work_dir: str | Path | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FitResult:
    """Train what `encoder`'s method trains (the queries for slq; LoRA or LLM weights for lora/full)
    and the temperature on (image, caption) pairs; returns per-step metrics.

    `work_dir/last` holds the latest checkpoint (queries, temperature, optimiser, step), written every
    `cfg.save_every` steps or `cfg.save_every_minutes` after the last one, whichever comes first, and at
    the end; when it exists the run resumes from it. `stop_after` ends the call early (as a kill
    would) and `clock` (seconds) times the checkpoints, for tests.
    """
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    global_batch = cfg.batch_size * world
    check_enough_data(len(data), global_batch)
    minutes = cfg.save_every_minutes
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"train.save_every_minutes is {minutes!r}: give a number of minutes > 0, or null to save "
                         "by step only (train.save_every)")
    device = encoder.backbone.device
    loss_fn = ContrastiveLoss(cfg.temperature).to(device)
    encoder.make_trainable()
    trained = encoder.trainable_parameters()
    if not trained:
        raise ValueError(f"method {encoder.method!r} has nothing to train")
    # The split forward is exact only when the prompt's states do not depend on what trains.
    split = cfg.split_forward and encoder.split_exact
    if split and cfg.compile_queries:
        encoder.backbone.compile_queries()
    result = FitResult()
    start = 0
    last = Path(work_dir) / "last" if work_dir is not None else None
    resume = last is not None and (last / "train_state.pt").exists()
    if resume:
        log_temp = encoder.load_trained(last / "queries")
        with torch.no_grad():
            loss_fn.log_temp.copy_(log_temp)
    master = MasterWeights(trained)  # fp32 copies of what trains in a lower precision (full fine-tuning in bf16)
    opt = torch.optim.AdamW([{"params": master.params, "weight_decay": cfg.weight_decay},
                             {"params": [loss_fn.log_temp], "weight_decay": 0.0}], lr=cfg.lr)
    params = [*master.params, loss_fn.log_temp]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    if resume:
        start = _resume(last, opt, sched, result)
        result.resumed_from = start
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train queries", unit="step")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    from slq.encoder import make_loader

    steps = StepBatches(encoder.backbone.inputs, encoder.prompts, data, global_batch, cfg, rank)
    loader = iter(make_loader(steps, range(start, end), cfg.num_workers, device))
    saved_at = clock()
    for step in range(start, end):
        t0 = time.perf_counter()
        ids, img_inputs, txt_inputs = next(loader)
        if split and cfg.compile_queries:  # CUDA graphs: a new iteration (the last one's backward is done)
            torch.compiler.cudagraph_mark_step_begin()
        img = encoder.embed_inputs(img_inputs, split=split, buckets=cfg.prefix_buckets)
        txt = encoder.embed_inputs(txt_inputs, split=split, buckets=cfg.prefix_buckets)
        loss = loss_fn(img, txt)
        if result.start_cosine is None:
            result.start_cosine = {"image": batch_spread(img), "text": batch_spread(txt)}
            if rank == 0:
                warn_if_collapsed(result.start_cosine)
        if not torch.isfinite(loss):
            kept = f"the last good checkpoint is kept at {last}" if last is not None else "no checkpoint was written"
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step} (batch ids {ids[:8]}...); {kept}. "
                "Lower train.lr, check those items, or resume from the checkpoint."
            )
        opt.zero_grad(set_to_none=True)  # (the bf16 model grads were cleared by master.grads_in)
        loss.backward()
        sync_gradients(trained, loss_fn.log_temp)
        master.grads_in()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            # Seen with split_forward=False in bf16 on left-padded batches (SDPA backward through
            # fully masked pad rows): the loss is finite but every query gradient is NaN.
            kept = f"the last good checkpoint is kept at {last}" if last is not None else "no checkpoint was written"
            raise TrainingDiverged(
                f"non-finite gradient at step {step} (loss {loss.item():.4f}); nothing was updated and {kept}. "
                "Use train.split_forward: true (exact, and free of this failure) or float32."
            )
        opt.step()
        master.weights_out()
        sched.step()
        rec = {"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
               "temperature": loss_fn.temperature.item(), "grad_norm": float(grad_norm),
               "step_time": time.perf_counter() - t0}
        result.history.append(rec)
        done = step + 1
        if last is not None and rank == 0 and (done % cfg.save_every == 0 or done == cfg.steps or (
                minutes is not None and clock() - saved_at >= 60 * minutes)):
            _save_state(last, encoder, loss_fn, opt, sched, done, result.history, cfg)
            saved_at = clock()
        if bar is not None:
            bar.update(1)
            vis = encoder.backbone.inputs.visual_tokens(img_inputs) / max(1, len(ids))
            bar.set_postfix(loss=f"{rec['loss']:.4f}", t=f"{rec['temperature']:.3f}",
                            **({"visual_tokens_per_image": f"{vis:.0f}"} if vis else {}))
        if on_step is not None:
            on_step(rec)
    if bar is not None:
        bar.close()
    result.steps = end
    result.log_temp = loss_fn.log_temp.detach().cpu()
    return result


def _save_state(last: Path, encoder, loss_fn, opt, sched, step: int, history: list[dict], cfg: FitConfig):
    def write(tmp: Path):
        encoder.save(tmp / "queries", log_temp=loss_fn.log_temp, training=cfg.loop_settings(), step=step)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                   tmp / "train_state.pt")
        (tmp / "history.json").write_text(json.dumps(history))

    write_atomic_dir(last, write)


def _resume(last: Path, opt, sched, result: FitResult) -> int:
    state = torch.load(last / "train_state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    result.history = json.loads((last / "history.json").read_text())
    return int(state["step"])


class MasterWeights:
    """fp32 master copies of trained parameters held in a lower precision (bf16 full fine-tuning).

    The optimiser steps the fp32 copies (`params`); their gradients come from the model's
    (`grads_in`) and the updated weights go back to the model rounded once (`weights_out`), so
    small updates accumulate instead of vanishing in bf16 rounding. fp32 parameters (the queries,
    LoRA adapters) are used as they are.
    """

    def __init__(self, model_params: list[torch.nn.Parameter]):
        self.pairs = []
        self.params = []
        for p in model_params:
            if p.dtype == torch.float32:
                self.params.append(p)
            else:
                m = torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, m))
                self.params.append(m)

    def grads_in(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def weights_out(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)


class StepBatches(torch.utils.data.Dataset):
    """Step s -> (row ids, image inputs, text inputs) of this rank's share of the global batch at s.

    A pure function of (seed, s), so DataLoader workers and the training process build the same
    batch, and a resumed run continues with the same ones. Holds no model (see InputBuilder).
    """

    def __init__(self, builder, prompts, data: Sequence, global_batch: int, cfg: FitConfig, rank: int):
        self.builder, self.prompts, self.data = builder, prompts, data
        self.global_batch, self.cfg, self.rank = global_batch, cfg, rank

    def __len__(self):
        return self.cfg.steps

    def __getitem__(self, step: int):
        from slq.inputs import check_text, load_image

        b = self.cfg.batch_size
        idx = batch_indices(step, len(self.data), self.global_batch, self.cfg.seed)[self.rank * b:(self.rank + 1) * b]
        rows = [_pair(self.data[i], int(i)) for i in idx]
        images = [load_image(r[0], int(i)) for r, i in zip(rows, idx)]
        texts = [check_text(r[1], int(i), "caption") for r, i in zip(rows, idx)]
        img = self.builder.build(None, images, self.prompts)
        txt = self.builder.build(texts, None, self.prompts, self.cfg.max_text_tokens)
        return [r[2] for r in rows], img, txt


# ---- rank-aware helpers for a stage launched under torchrun --------------------------------------
# In a single process (WORLD_SIZE unset or 1) each of them is a plain call: no group, no collective.



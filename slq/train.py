"""fit(): train the shared latent queries (and the temperature) contrastively; nothing else moves.

AdamW over the queries and log-temperature only, linear warm-up then cosine decay, gradient
clipping, bf16 autocast on GPU, periodic checkpoints for resume. A run killed at any point and
restarted with the same arguments resumes from its last checkpoint and ends with the same
result as an uninterrupted run: the batch at step s is a pure function of (seed, s).

Multi-GPU: launch the same script under `torchrun --nproc_per_node=N ...`; each rank takes its
shard of every global batch, negatives are gathered across ranks (`slq.loss.gather_features`)
and the gradients are reduced so that every rank applies the global-batch gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slq.io import write_atomic_dir
from slq.loss import ContrastiveLoss, is_distributed, sync_gradients


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class FitConfig:
    steps: int = 1000
    batch_size: int = 32  # per rank
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    temperature: float = 0.07
    save_every: int = 100
    seed: int = 0
    split_forward: bool = True  # prefix under no_grad into a KV cache; only the queries under autograd


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    log_temp: torch.Tensor | None = None

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
) -> FitResult:
    """Train what `encoder`'s method trains (the queries for slq; LoRA or LLM weights for lora/full)
    and the temperature on (image, caption) pairs; returns per-step metrics.

    `work_dir/last` holds the latest checkpoint (queries, temperature, optimiser, step); when it
    exists the run resumes from it. `stop_after` ends the call early (as a kill would), for tests.
    """
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    global_batch = cfg.batch_size * world
    if len(data) < global_batch:
        raise ValueError(f"{len(data)} training pairs are fewer than one global batch ({global_batch}); "
                         "lower train.batch_size or add data")
    device = encoder.backbone.device
    loss_fn = ContrastiveLoss(cfg.temperature).to(device)
    encoder.make_trainable()
    trained = encoder.trainable_parameters()
    if not trained:
        raise ValueError(f"method {encoder.method!r} has nothing to train")
    params = [*trained, loss_fn.log_temp]
    # The split forward is exact only when the prompt's states do not depend on what trains.
    split = cfg.split_forward and encoder.method == "slq"
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    result = FitResult()
    start = 0
    last = Path(work_dir) / "last" if work_dir is not None else None
    if last is not None and (last / "train_state.pt").exists():
        start = _resume(last, encoder, loss_fn, opt, sched, result)
        result.resumed_from = start
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train queries", unit="step")
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        idx = batch_indices(step, len(data), global_batch, cfg.seed)[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        rows = [_pair(data[i], int(i)) for i in idx]
        with autocast:
            img = encoder.embed_inputs(encoder.prepare(images=[r[0] for r in rows]), split=split)
            txt = encoder.embed_inputs(encoder.prepare(texts=[r[1] for r in rows]), split=split)
        loss = loss_fn(img, txt)
        if not torch.isfinite(loss):
            kept = f"the last good checkpoint is kept at {last}" if last is not None else "no checkpoint was written"
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step} (batch ids {[r[2] for r in rows][:8]}...); {kept}. "
                "Lower train.lr, check those items, or resume from the checkpoint."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(trained, loss_fn.log_temp)
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
        sched.step()
        rec = {"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
               "temperature": loss_fn.temperature.item(), "grad_norm": float(grad_norm),
               "step_time": time.perf_counter() - t0}
        result.history.append(rec)
        done = step + 1
        if last is not None and rank == 0 and (done % cfg.save_every == 0 or done == cfg.steps):
            _save_state(last, encoder, loss_fn, opt, sched, done, result.history, cfg)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", t=f"{rec['temperature']:.3f}")
        if on_step is not None:
            on_step(rec)
    if bar is not None:
        bar.close()
    result.steps = end
    result.log_temp = loss_fn.log_temp.detach().cpu()
    return result


def _save_state(last: Path, encoder, loss_fn, opt, sched, step: int, history: list[dict], cfg: FitConfig):
    def write(tmp: Path):
        encoder.save(tmp / "queries", log_temp=loss_fn.log_temp, training=asdict(cfg), step=step)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                   tmp / "train_state.pt")
        (tmp / "history.json").write_text(json.dumps(history))

    write_atomic_dir(last, write)


def _resume(last: Path, encoder, loss_fn, opt, sched, result: FitResult) -> int:
    log_temp = encoder.load_trained(last / "queries")
    with torch.no_grad():
        loss_fn.log_temp.copy_(log_temp)
    state = torch.load(last / "train_state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    result.history = json.loads((last / "history.json").read_text())
    return int(state["step"])


def init_distributed_from_env() -> bool:
    """Join the process group torchrun set up (WORLD_SIZE > 1); no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    if torch.cuda.is_available():  # before the process group, so NCCL binds this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True

"""Training one method from the pipeline's configuration: the budget every compared method shares,
the resume folder keyed by what changes the result, and the checkpoint and metrics it writes.

Used by the train stage (SLQ), the methods stage (zero-shot, LoRA, full fine-tuning) and the seed study.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from slq.io import write_csv_atomic, write_json_atomic
from slq.mlops.config import Config
from slq.mlops.datasets import data_hash, split_rows
from slq.mlops.models import backbone_missing, ensure_backbone, load_encoder, method_prompt, portable_backbone


# columns of the per-step history CSV (a DVC plot)
HISTORY_FIELDS = ["step", "loss", "lr", "temperature", "grad_norm", "step_time"]


def train_method(cfg: Config, method: str, out: Path, *, lr: float, metrics_path: Path,
                 history_path: Path | None = None, on_step=None, progress: bool = True,
                 side_by_side: int = 1) -> dict:
    """Train one method on the training split with `train`'s budget; write its checkpoint and metrics.

    Budget metrics are the same for every method: trainable parameters, mean step time, wall time
    and peak memory (GPU: allocator peak; CPU: the process's peak resident set), with the
    conditions they were measured under: CPU threads, and how many methods ran at once
    (`side_by_side`, set by the methods stage). `on_step` and `progress` go to `slq.train.fit`.
    """
    from slq.methods import get_method
    from slq.train import check_enough_data
    from slq.distributed import check_on_every_rank, distributed_from_env, world_size

    # Under torchrun: every rank checks the data and the backbone folder, and the ranks agree on the
    # outcome (a bad setting stops every rank, each saying why; nothing waits), then rank 0 alone
    # pretrains the built-in backbone, and rank 0 alone writes the outputs while the others wait.
    root = cfg.path(cfg.data.root)
    global_batch = cfg.train.batch_size * world_size()

    def checks() -> list[dict]:
        rows = [{"image": root / r["image"], "caption": r["caption"], "id": r["id"]} for r in split_rows(cfg, "train")]
        backbone_missing(cfg)
        if get_method(method).trains:  # as fit() checks it, but before any rank waits
            check_enough_data(len(rows), global_batch)
        return rows

    with distributed_from_env():
        data = check_on_every_rank(checks, f"the checks before training {method}")
        return _train_method(cfg, method, out, data, lr=lr, metrics_path=metrics_path, history_path=history_path,
                             on_step=on_step, progress=progress, side_by_side=side_by_side)


def _train_method(cfg: Config, method: str, out: Path, data: list[dict], *, lr: float, metrics_path: Path,
                  history_path: Path | None, on_step, progress: bool, side_by_side: int) -> dict:
    import torch

    from slq.checkpoint import checkpoint_hash
    from slq.distributed import agree, is_main_process, on_rank_zero, world_size
    from slq.train import fit

    backbone = on_rank_zero(lambda: ensure_backbone(cfg), "make the built-in backbone")
    agree((backbone / "config.json").is_file(), f"whether the backbone {backbone} exists (it must be on a "
          "filesystem every rank sees)")
    if not is_main_process():  # rank 0 shows the progress and the warnings, once
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    enc = load_encoder(cfg, method=method)
    world = world_size()
    fit_cfg = fit_config(cfg, lr)
    cuda = enc.backbone.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    hist, result, work = [], None, None
    if enc.trains:
        work = work_folder(cfg, method, lr, str(enc.backbone.source), world)
        on_rank_zero(lambda: tidy_work(work), f"tidy the resume folders in {work.parent}")
        # Every rank reads work/last only after all ranks got here (rank 0 writes it only during fit),
        # and all of them must see the same one: a run that resumes on some ranks only would deadlock.
        agree(_resume_state(work), f"the resume state in {work} (train.work_dir must be on a filesystem every "
              "rank sees)")
        try:
            result = fit(enc, data, fit_cfg, work, on_step=on_step, progress=progress and is_main_process())
        except BaseException:  # stopped (an error, Ctrl-C): a checkpoint stays for the resume, an empty folder not
            if is_main_process():
                remove_empty(work, work.parent)
            raise
        hist = result.history
    wall = time.perf_counter() - t0

    def write_outputs() -> dict:  # rank 0 only
        metrics = {
            "method": method,
            "pooling": enc.pooling,
            "prompt": method_prompt(cfg, method),
            "final_loss": result.final_loss if result else None,
            "loss_first10": _mean(h["loss"] for h in hist[:10]),
            "loss_last10": _mean(h["loss"] for h in hist[-10:]),
            "temperature": hist[-1]["temperature"] if hist else None,
            "start_cosine": result.start_cosine if result else None,  # near 1: collapsed at the start
            "steps": result.steps if result else 0,
            "resumed_from": result.resumed_from if result else 0,
            "lr": lr if result else None,
            "trainable_params": sum(p.numel() for p in enc.trainable_parameters()) + (1 if result else 0),
            "step_time_mean": _mean(h["step_time"] for h in hist),
            "wall_time_s": wall,
            "peak_memory_gib": _peak_memory_gib(cuda),
            "peak_memory_kind": "cuda_allocated" if cuda else "process_rss",
            "threads": None if cuda else torch.get_num_threads(),
            "side_by_side": side_by_side,
            "n_pairs": len(data),
        }
        if world > 1:
            metrics["world_size"] = world  # train.batch_size is per rank: the global batch is batch_size x this
        manifest_training = ({**fit_cfg.loop_settings(), "method": method} if result
                             else {"method": method, "trained": False})
        if world > 1 and result:
            manifest_training["world_size"] = world
        # The checkpoint is a DVC-cached output: no timings (they differ on every run) and the backbone
        # path as configured (relative to the project), so the same result hashes the same anywhere.
        saved = enc.save(out, log_temp=result.log_temp if result else None, training=manifest_training,
                         data={"manifest": f"{cfg.data.root}/{cfg.data.manifest}", "manifest_sha256": data_hash(cfg),
                               "n_pairs": len(data)},
                         backbone=portable_backbone(cfg, enc.backbone),
                         metrics={k: v for k, v in metrics.items() if v is not None and k not in TIMING_KEYS})
        metrics["checkpoint_hash"] = checkpoint_hash(saved)
        write_json_atomic(metrics_path, metrics)
        if history_path is not None:
            write_csv_atomic(history_path, hist, HISTORY_FIELDS)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # finished: nothing left to resume
            remove_empty(work.parent)  # train.work_dir too, when no other run's resume folder is in it
        return metrics

    return on_rank_zero(write_outputs, f"write the checkpoint {out} and the metrics")


# measurements of the run, not of its result: kept out of DVC-cached outputs (they change on every run)
TIMING_KEYS = ("step_time_mean", "wall_time_s", "peak_memory_gib", "peak_memory_kind", "threads", "side_by_side")


def fit_config(cfg: Config, lr: float):
    """`train` (slq.recipe.FitConfig, what slq.train.fit reads) with the method's learning rate."""
    return replace(cfg.train, lr=lr)


# train settings that do not change a run's result: a killed run resumes across changes to them
RESULT_NEUTRAL = ("out", "metrics", "history", "work_dir", "num_workers", "save_every", "save_every_minutes",
                  "prefix_buckets", "compile_queries")


def work_folder(cfg: Config, method: str, lr: float, backbone_source: str, world: int = 1) -> Path:
    """The resume folder of a run: keyed by everything that changes its result (settings, data,
    backbone, prompts), with the global batch (train.batch_size x ranks) in place of the per-rank
    one, so a run on 2 ranks x B resumes one on 1 x 2B (the same trajectory) and not one on 2 x 2B."""
    t = dict(asdict(cfg.train), batch_size=cfg.train.batch_size * world)
    for k in RESULT_NEUTRAL:  # where outputs go and how batches are built ahead change nothing
        t.pop(k, None)
    fingerprint = hashlib.sha256(json.dumps(
        [t, method, lr, data_hash(cfg), backbone_source, asdict(cfg.prompts)], sort_keys=True
    ).encode()).hexdigest()[:12]
    return cfg.path(cfg.train.work_dir) / fingerprint


def tidy_work(work: Path) -> None:
    """Before a run: what killed runs left in `train.work_dir`: unfinished or set-aside copies of this
    run's checkpoint (slq.io.tidy_atomic_dir), and empty resume folders of any run."""
    from slq.io import tidy_atomic_dir

    tidy_atomic_dir(work / "last")
    if work.parent.is_dir():
        remove_empty(*work.parent.iterdir())


def remove_empty(*folders: Path) -> None:
    """Remove each folder that is empty, in order (one in use by another run is not empty: kept)."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:  # not empty, not a folder, or gone
            pass


def _resume_state(work: Path) -> tuple | None:
    """What `fit` would resume from in `work` (None: a fresh start); compared across ranks."""
    state = work / "last" / "train_state.pt"
    return ("last", state.stat().st_size) if state.is_file() else None


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _peak_memory_gib(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)

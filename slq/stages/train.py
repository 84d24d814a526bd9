"""Train stage: fit the shared latent queries on the training split; write the checkpoint folder.

The folder at `train.out` is a DVC output. Periodic checkpoints go to a work folder keyed by
the run's fingerprint (config, data, backbone), so a killed run resumes where it stopped, and a
run with other settings never resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

from slq.config import Config
from slq.io import file_sha256, write_csv_atomic, write_json_atomic

# columns of the per-step history CSV (a DVC plot)
HISTORY_FIELDS = ["step", "loss", "lr", "temperature", "grad_norm", "step_time"]


def ensure_backbone(cfg: Config) -> Path:
    """The backbone directory; the built-in one is pretrained there (pretrain stage) when missing."""
    path = cfg.path(cfg.backbone.path)
    if not backbone_missing(cfg):
        return path
    from slq.stages import pretrain

    print(f"backbone {path} missing: pretraining the built-in one (the pretrain stage)", flush=True)
    pretrain.run(cfg)
    return path


def backbone_missing(cfg: Config) -> bool:
    """Whether the backbone folder is still to be made (the built-in one, missing). A missing folder
    that is not the built-in one is a FileNotFoundError: nothing can make it."""
    path = cfg.path(cfg.backbone.path)
    if (path / "config.json").is_file():
        return False
    from slq.stages import pretrain

    if not pretrain.is_builtin(cfg):
        raise FileNotFoundError(
            f"backbone directory {path} not found: set backbone.path in params.yaml to a local Hugging Face "
            f"checkpoint folder (or to pretrain.out, {cfg.pretrain.out}, for the built-in pretrained one)"
        )
    return True


def load_encoder(cfg: Config, queries: Path | None = None, method: str | None = None):
    """The encoder for `method` (default train.method) on the configured backbone, or a checkpoint's."""
    from slq.encoder import SLQEncoder
    from slq.methods import LoraSpec

    t = cfg.train
    method = method or t.method
    pooling = t.pooling if method == t.method else cfg.methods.pooling.get(method)
    prompts = asdict(cfg.prompts) if method_prompt(cfg, method) == "pipeline" else None
    return SLQEncoder.from_pretrained(
        ensure_backbone(cfg), queries, num_queries=t.num_queries, init=t.init, seed=t.seed,
        prompts=prompts if queries is None else None, dtype=cfg.backbone.dtype, device=cfg.backbone.device,
        method=method, pooling=pooling, lora=LoraSpec(r=t.lora_r, alpha=t.lora_alpha, seed=t.seed),
        min_pixels=cfg.backbone.min_pixels, max_pixels=cfg.backbone.max_pixels,
        allow_backbone_mismatch=cfg.backbone.allow_mismatch,
    )


PROMPT_CHOICES = ("pipeline", "summarize")


def method_prompt(cfg: Config, method: str) -> str:
    """"pipeline" (the `prompts` section, SLQ's) or "summarize" (slq.methods.SUMMARIZE_PROMPTS,
    the E5-V style instruction read at the last token) for `method`; SLQ always uses `prompts`."""
    if method == "slq":
        return "pipeline"
    choice = cfg.methods.prompts.get(method, "summarize" if method == "zero_shot" else "pipeline")
    if choice not in PROMPT_CHOICES:
        raise ValueError(f"methods.prompts.{method}: {choice!r} is not one of {', '.join(PROMPT_CHOICES)} "
                         "(pipeline: the prompts section, as SLQ; summarize: the E5-V style one-word prompt)")
    return choice


def split_rows(cfg: Config, split: str) -> list[dict]:
    from slq.data.world import load_manifest

    rows = [r for r in load_manifest(cfg.path(cfg.data.root), cfg.data.manifest) if r["split"] == split]
    if not rows:
        raise ValueError(f"no rows with split {split!r} in {cfg.data.root}/{cfg.data.manifest}")
    return rows


def data_hash(cfg: Config) -> str:
    return file_sha256(cfg.path(cfg.data.root) / cfg.data.manifest)[:16]


def precheck(cfg: Config) -> None:
    """What fails at once, before anything slow (MLflow, the model) starts. Under torchrun the
    pipeline runs it on every rank through `slq.train.check_on_every_rank`, so every rank says why."""
    split_rows(cfg, "train")
    backbone_missing(cfg)


def run(cfg: Config) -> dict:
    """Train `train.method` (default slq) into `train.out`."""
    from slq import tracking

    t = cfg.train
    curve = tracking.curve_logger(cfg) if cfg.register.track_stages else None  # live loss curve in MLflow
    try:
        return train_method(cfg, t.method, cfg.path(t.out), lr=t.lr, metrics_path=cfg.path(t.metrics),
                            history_path=cfg.path(t.history), on_step=curve)
    finally:
        if curve is not None:
            curve.close()


def train_method(cfg: Config, method: str, out: Path, *, lr: float, metrics_path: Path,
                 history_path: Path | None = None, on_step=None, progress: bool = True,
                 side_by_side: int = 1) -> dict:
    """Train one method on the training split with `train`'s budget; write its checkpoint and metrics.

    Budget metrics are the same for every method: trainable parameters, mean step time, wall time
    and peak memory (GPU: allocator peak; CPU: the process's peak resident set), with the
    conditions they were measured under: CPU threads, and how many methods ran at once
    (`side_by_side`, set by the methods stage). `on_step` and `progress` go to `slq.train.fit`.
    """
    from slq.train import check_enough_data, check_on_every_rank, distributed_from_env, world_size

    # Under torchrun: every rank checks the data and the backbone folder, and the ranks agree on the
    # outcome (a bad setting stops every rank, each saying why; nothing waits), then rank 0 alone
    # pretrains the built-in backbone, and rank 0 alone writes the outputs while the others wait.
    root = cfg.path(cfg.data.root)
    global_batch = cfg.train.batch_size * world_size()

    def checks() -> list[dict]:
        rows = [{"image": root / r["image"], "caption": r["caption"], "id": r["id"]} for r in split_rows(cfg, "train")]
        backbone_missing(cfg)
        if method != "zero_shot":  # as fit() checks it, but before any rank waits
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
    from slq.train import agree, fit, is_main_process, on_rank_zero, world_size

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
    if method != "zero_shot":
        work = work_folder(cfg, method, lr, str(enc.backbone.source), world)
        # Every rank reads work/last only after all ranks got here (rank 0 writes it only during fit),
        # and all of them must see the same one: a run that resumes on some ranks only would deadlock.
        agree(_resume_state(work), f"the resume state in {work} (train.work_dir must be on a filesystem every "
              "rank sees)")
        result = fit(enc, data, fit_cfg, work, on_step=on_step, progress=progress and is_main_process())
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
        manifest_training = {**asdict(fit_cfg), "method": method} if result else {"method": method, "trained": False}
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
        return metrics

    return on_rank_zero(write_outputs, f"write the checkpoint {out} and the metrics")


# measurements of the run, not of its result: kept out of DVC-cached outputs (they change on every run)
TIMING_KEYS = ("step_time_mean", "wall_time_s", "peak_memory_gib", "peak_memory_kind", "threads", "side_by_side")


def portable_backbone(cfg: Config, bb) -> dict:
    """The manifest's backbone entry with the path as params.yaml gives it (relative to the project
    when it is inside it), not this machine's absolute path; the fingerprint pins the weights."""
    path = Path(bb.source)
    try:
        shown = path.resolve().relative_to(Path(cfg.root).resolve()).as_posix()
    except ValueError:
        shown = str(path)
    return {"path": shown, "revision": bb.revision, "model_type": bb.model_type, "hidden_size": bb.hidden_size,
            "fingerprint": bb.fingerprint}


def fit_config(cfg: Config, lr: float):
    """The training loop's share of `train` (slq.train.FitConfig), with the method's learning rate."""
    from slq.train import FitConfig

    fit_cfg = FitConfig(**{f.name: getattr(cfg.train, f.name) for f in fields(FitConfig)})
    fit_cfg.lr = lr
    return fit_cfg


# train settings that do not change a run's result: a killed run resumes across changes to them
RESULT_NEUTRAL = ("out", "metrics", "history", "work_dir", "num_workers", "save_every", "prefix_buckets",
                  "compile_queries")


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

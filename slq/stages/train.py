"""Train stage: fit the shared latent queries on the training split; write the checkpoint folder.

The folder at `train.out` is a DVC output. Periodic checkpoints go to a work folder keyed by
the run's fingerprint (config, data, backbone), so a killed run resumes where it stopped, and a
run with other settings never resumes from it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

from slq.config import Config
from slq.io import file_sha256, write_json_atomic


def ensure_backbone(cfg: Config) -> Path:
    """The backbone directory; the built-in tiny model is built there when it is missing."""
    path = cfg.path(cfg.backbone.path)
    if (path / "config.json").is_file():
        return path
    if not cfg.backbone.builtin:
        raise FileNotFoundError(
            f"backbone directory {path} not found: set backbone.path in params.yaml to a local Hugging Face "
            "checkpoint folder (or backbone.builtin to a tiny model type to build one)"
        )
    from slq.backbones.tiny import build_tiny_backbone
    from slq.data.world import load_manifest

    root = cfg.path(cfg.data.root)
    corpus = [r["caption"] for r in load_manifest(root, cfg.data.manifest)] if (root / cfg.data.manifest).exists() else []
    return build_tiny_backbone(cfg.backbone.builtin, path, corpus=corpus)


def load_encoder(cfg: Config, queries: Path | None = None):
    from slq.encoder import SLQEncoder

    t = cfg.train
    return SLQEncoder.from_pretrained(
        ensure_backbone(cfg), queries, num_queries=t.num_queries, init=t.init, seed=t.seed,
        prompts=asdict(cfg.prompts), dtype=cfg.backbone.dtype, device=cfg.backbone.device,
    )


def split_rows(cfg: Config, split: str) -> list[dict]:
    from slq.data.world import load_manifest

    rows = [r for r in load_manifest(cfg.path(cfg.data.root), cfg.data.manifest) if r["split"] == split]
    if not rows:
        raise ValueError(f"no rows with split {split!r} in {cfg.data.root}/{cfg.data.manifest}")
    return rows


def data_hash(cfg: Config) -> str:
    return file_sha256(cfg.path(cfg.data.root) / cfg.data.manifest)[:16]


def run(cfg: Config) -> dict:
    import torch

    from slq.checkpoint import checkpoint_hash
    from slq.train import FitConfig, fit, init_distributed_from_env

    t = cfg.train
    init_distributed_from_env()
    root = cfg.path(cfg.data.root)
    data = [{"image": root / r["image"], "caption": r["caption"], "id": r["id"]} for r in split_rows(cfg, "train")]
    enc = load_encoder(cfg)
    fit_cfg = FitConfig(**{f.name: getattr(t, f.name) for f in fields(FitConfig)})  # the loop's share of `train`
    fingerprint = hashlib.sha256(json.dumps(
        [asdict(t), data_hash(cfg), str(enc.backbone.source), asdict(cfg.prompts)], sort_keys=True).encode()
    ).hexdigest()[:12]
    work = cfg.path(t.work_dir) / fingerprint
    if enc.backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fit(enc, data, fit_cfg, work)
    wall = time.perf_counter() - t0
    hist = result.history
    metrics = {
        "final_loss": result.final_loss,
        "loss_first10": sum(h["loss"] for h in hist[:10]) / max(1, len(hist[:10])),
        "loss_last10": sum(h["loss"] for h in hist[-10:]) / max(1, len(hist[-10:])),
        "temperature": hist[-1]["temperature"] if hist else t.temperature,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "trainable_params": enc.queries.weight.numel() + 1,
        "step_time_mean": sum(h["step_time"] for h in hist) / max(1, len(hist)),
        "wall_time_s": wall,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30 if enc.backbone.device.type == "cuda"
                            else None),
        "n_pairs": len(data),
    }
    out = enc.save(cfg.path(t.out), log_temp=result.log_temp, training=asdict(fit_cfg),
                   data={"manifest": f"{cfg.data.root}/{cfg.data.manifest}", "manifest_sha256": data_hash(cfg),
                         "n_pairs": len(data)},
                   metrics={k: v for k, v in metrics.items() if v is not None})
    metrics["checkpoint_hash"] = checkpoint_hash(out)
    write_json_atomic(cfg.path(t.metrics), metrics)
    _write_history(cfg.path(t.history), hist)
    shutil.rmtree(work, ignore_errors=True)  # finished: nothing left to resume
    return metrics


def _write_history(path: Path, hist: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "temperature", "grad_norm", "step_time"])
        w.writeheader()
        w.writerows(hist)
    tmp.replace(path)

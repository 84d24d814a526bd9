"""A query checkpoint is a small folder: `queries.safetensors` + `slq.json` (the manifest).

The manifest records everything needed to rebuild and audit the encoder: backbone id/path,
revision, model_type, hidden size, N_q, pooling, prompts, training config, data hashes and
metrics. Folders are written to a temporary sibling and renamed, so a crash never leaves a
half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from slq.io import file_sha256, write_atomic_dir

WEIGHTS = "queries.safetensors"
LLM_WEIGHTS = "llm.safetensors"  # the LLM weights the method changed (methods that train some)
MANIFEST = "slq.json"
FORMAT = "slq-queries/1"
LEGACY_METHOD = "slq"  # the method of a manifest that records none (written before the methods existed)

if TYPE_CHECKING:  # torch is imported where tensors are made; hashing a checkpoint needs none
    import torch


class CheckpointError(ValueError):
    pass


def checkpoint_hash(ckpt_dir: str | Path) -> str:
    """Content hash of the learned tensors (the manifest's metrics may change; the model does not)."""
    ckpt_dir = Path(ckpt_dir)
    h = file_sha256(ckpt_dir / WEIGHTS)
    if (ckpt_dir / LLM_WEIGHTS).is_file():
        import hashlib

        h = hashlib.sha256((h + file_sha256(ckpt_dir / LLM_WEIGHTS)).encode()).hexdigest()
    return h[:16]


def save_checkpoint(out_dir, queries: torch.Tensor, log_temp: torch.Tensor | None, manifest: dict,
                    llm: dict[str, torch.Tensor] | None = None) -> Path:
    """`queries` may have zero rows (a last-token method); `llm` holds LoRA or fine-tuned LLM weights."""
    from safetensors.torch import save_file

    tensors = {"queries": queries.detach().float().cpu().contiguous()}
    if log_temp is not None:
        tensors["log_temp"] = log_temp.detach().float().cpu().reshape(1).contiguous()
    manifest = {"format": FORMAT, **manifest, "num_queries": int(queries.shape[0]),
                "hidden_size": int(queries.shape[1])}

    def write(tmp: Path):
        save_file(tensors, str(tmp / WEIGHTS))
        if llm:
            save_file(llm, str(tmp / LLM_WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")

    return write_atomic_dir(out_dir, write)


def read_manifest(ckpt_dir: str | Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MANIFEST
    if not path.is_file() or not (ckpt_dir / WEIGHTS).is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not an SLQ checkpoint: expected {WEIGHTS} and {MANIFEST} in it"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def manifest_method(manifest: dict) -> str:
    """The method a checkpoint's manifest records (the name slq.methods registers its class under)."""
    return manifest.get("method", LEGACY_METHOD)


def load_checkpoint(ckpt_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(queries (Nq, D) fp32, log_temp or None, manifest)."""
    from safetensors.torch import load_file

    manifest = read_manifest(ckpt_dir)
    tensors = load_file(str(Path(ckpt_dir) / WEIGHTS))
    q = tensors["queries"]
    if tuple(q.shape) != (manifest["num_queries"], manifest["hidden_size"]):
        raise CheckpointError(f"{ckpt_dir}: queries shape {tuple(q.shape)} disagrees with the manifest")
    lt = tensors.get("log_temp")
    return q, (lt.reshape(()) if lt is not None else None), manifest


def load_llm_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LLM weights a checkpoint holds ({} for a method that trains none in the LLM)."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / LLM_WEIGHTS
    return load_file(str(path)) if path.is_file() else {}

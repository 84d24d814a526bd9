"""Records bound to the checkpoint they describe.

Every stage output that describes a checkpoint (the embeddings' meta.json, index.json and the
LanceDB tables, metrics/eval.json, metrics/train.json, each method's metrics) records that
checkpoint's hash (`slq.checkpoint.checkpoint_hash`: the learned tensors). Every reader checks it
here before using the record, so a stage never reports, indexes or registers another
checkpoint's numbers: a stale file (its stage failed, or was not rerun) is one line naming both
hashes and the stage to rerun.

The gate compares numbers only when they were measured the same way: `evaluation_key` names the
data, split, ks and benchmark list a run's metrics come from, and a champion scored under another
key is not compared (slq.mlops.tracking).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from slq.mlops.config import Config


class StaleRecordError(ValueError):
    """A record describes another checkpoint than the one the stage uses (the user's to fix: rerun a stage)."""


def bound_hash(record: dict, what: str | Path, ckpt: str | Path, rerun: str, key: str = "checkpoint_hash") -> str:
    """The checkpoint's hash, once `record` (read from `what`) is shown to describe it.

    `rerun`: the stage that rewrites the record (named in the error, with its dvc command).
    """
    from slq.checkpoint import checkpoint_hash

    have = checkpoint_hash(ckpt)
    got = record.get(key)
    if got is None:
        raise StaleRecordError(f"{what} records no checkpoint hash, so it cannot be shown to describe {ckpt} "
                               f"({have}): rerun the {rerun} stage (dvc repro {rerun})")
    if str(got) != have:
        raise StaleRecordError(f"{what} describes checkpoint {got}, but {ckpt} is checkpoint {have}: "
                               f"rerun the {rerun} stage (dvc repro {rerun})")
    return have


def read_bound(path: Path, ckpt: str | Path, rerun: str, key: str = "checkpoint_hash") -> dict:
    """A JSON record at `path`, checked to describe `ckpt` (a missing file names the stage to run)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {rerun} stage first (dvc repro {rerun})")
    record = json.loads(path.read_text())
    bound_hash(record, path, ckpt, rerun, key)
    return record


def evaluation_key(cfg: Config, data_hash: str) -> str:
    """What the evaluate stage's numbers depend on besides the checkpoint: the data (its hash), the
    split, the ks and the benchmark list with their options. Two runs' numbers compare only under
    one key."""
    from slq.mlops.evaluation import benchmark_plan

    ev = cfg.evaluate
    entries = benchmark_plan(cfg)[0]  # as run on this data (your own data skips the world's)
    what = {"data": data_hash, "split": ev.split, "ks": list(ev.ks),
            "benchmarks": {label: dict(sorted(e.items())) for label, e in entries.items()}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

"""Embed stage: embed every evaluation split's images and captions with the trained checkpoint.

Writes, per split, `{split}_image.npy|.jsonl` (one row per distinct image) and
`{split}_text.npy|.jsonl` (one row per caption), plus `meta.json` naming the checkpoint.
"""

from __future__ import annotations

import json

import numpy as np

from slq.checkpoint import checkpoint_hash
from slq.mlops.config import Config
from slq.io import write_atomic_dir, write_json_atomic
from slq.mlops.datasets import data_hash, split_rows
from slq.mlops.models import load_encoder, portable_backbone


def run(cfg: Config) -> dict:
    ckpt = cfg.path(cfg.train.out)
    enc = load_encoder(cfg, queries=ckpt)
    root = cfg.path(cfg.data.root)
    bs = cfg.embed.batch_size
    counts = {}
    outputs = {}
    for split in cfg.embed.splits:
        rows = split_rows(cfg, split)
        images = list(dict.fromkeys(r["image_id"] for r in rows))  # distinct, in manifest order
        path_of = {r["image_id"]: r["image"] for r in rows}
        w = cfg.embed.num_workers
        img = enc.encode_image([root / path_of[i] for i in images], batch_size=bs, progress=True, num_workers=w)
        txt = enc.encode_text([r["caption"] for r in rows], batch_size=bs, progress=True, num_workers=w)
        outputs[split] = (
            img, [{"image_id": i, "image": path_of[i], "split": split} for i in images],
            txt, [{"id": r["id"], "image_id": r["image_id"], "caption": r["caption"], "split": split} for r in rows],
        )
        counts[split] = {"images": len(images), "texts": len(rows)}
    meta = {"checkpoint_hash": checkpoint_hash(ckpt), "dim": enc.backbone.hidden_size,
            "backbone": portable_backbone(cfg, enc.backbone)["path"], "backbone_fingerprint": enc.backbone.fingerprint,
            "model_type": enc.backbone.model_type,
            "num_queries": enc.num_queries, "method": enc.method, "prompts": enc.prompts.to_dict(),
            "data_hash": data_hash(cfg), "splits": counts}

    def write(tmp):
        for split, (img, img_rows, txt, txt_rows) in outputs.items():
            for name, arr, rs in (("image", img, img_rows), ("text", txt, txt_rows)):
                np.save(tmp / f"{split}_{name}.npy", arr)
                (tmp / f"{split}_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        write_json_atomic(tmp / "meta.json", meta)

    write_atomic_dir(cfg.path(cfg.embed.out), write)
    return meta



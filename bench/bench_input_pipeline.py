"""Items/s of training and encoding with the input pipeline in-process vs in DataLoader workers.

Images are JPEG files on disk (decoded and run through the processor per batch, as at COCO
scale). Needs only torch, transformers, tokenizers, PIL. Usage:
    python bench/bench_input_pipeline.py [--family qwen3_vl] [--workers 0 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from slq.miniature.tiny import build_tiny_backbone  # noqa: E402
from slq.encoder import SLQEncoder  # noqa: E402
from slq.train import FitConfig, fit  # noqa: E402


def make_images(root: Path, n: int, side: int) -> list[dict]:
    rows = []
    for i in range(n):
        im = Image.new("RGB", (side, side), (i * 37 % 255, i * 91 % 255, i * 13 % 255))
        d = ImageDraw.Draw(im)
        d.ellipse([side // 4, side // 4, side * 3 // 4, side * 3 // 4], fill=(255 - i % 255, 40, 90))
        p = root / f"{i:05d}.jpg"
        im.save(p, quality=90)
        rows.append({"image": str(p), "caption": f"a shape number {i} in colour {i % 7} on a plain background",
                     "id": i})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3_vl")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--side", type=int, default=640, help="image side in pixels (JPEG on disk)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"machine": f"{platform.machine()} {torch.get_num_threads()} torch threads", "device": args.device,
           "family": args.family, "image_side": args.side, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bb = build_tiny_backbone(args.family, tmp / "bb", hidden_size=128, num_layers=4, vision_dim=64)
        rows = make_images(tmp, args.n, args.side)
        for w in args.workers:
            enc = SLQEncoder.from_pretrained(bb, num_queries=8, device=args.device, max_pixels=224 * 224)
            cfg = FitConfig(steps=args.steps, batch_size=args.batch, warmup_steps=1, save_every=10**9, num_workers=w)
            t0 = time.perf_counter()
            fit(enc, rows, cfg, progress=False)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            enc.encode_image([r["image"] for r in rows], batch_size=32, progress=False, num_workers=w)
            enc_s = time.perf_counter() - t0
            run = {"num_workers": w, "train_pairs_per_s": args.steps * args.batch / train_s,
                   "encode_images_per_s": len(rows) / enc_s, "train_s": train_s, "encode_s": enc_s}
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

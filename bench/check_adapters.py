"""Every adapter on the machine at hand: split == whole (embeddings and query gradients) on a
left-padded batch, and padding invariance, for text, image and image+text inputs.

Needs only torch, transformers, tokenizers, PIL (runs on the GPU machine, which lacks the MLOps
tools). Usage: python bench/check_adapters.py [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from slq.miniature.tiny import TINY_TYPES, build_tiny_backbone  # noqa: E402
from slq.encoder import SLQEncoder  # noqa: E402

IMAGES = [Image.new("RGB", (60, 90), "red"), Image.new("RGB", (120, 60), "blue"), Image.new("RGB", (56, 56), "green")]
TEXTS = ["a red circle on the left", "hi", "a much longer caption about a small blue square at the top right"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(enc: SLQEncoder) -> dict:
    out = {}
    q = enc.queries.weight
    batches = {"text": enc.prepare(texts=TEXTS), "image": enc.prepare(images=IMAGES),
               "multimodal": enc.prepare(texts=["make it blue", "x", "turn it into a star"], images=IMAGES)}
    for kind, inputs in batches.items():
        res = []
        for split in (False, True):
            q.grad = None
            emb = enc.embed_inputs(inputs, split=split)
            (emb * torch.linspace(-1, 1, emb.numel(), device=emb.device).reshape(emb.shape)).sum().backward()
            res.append((emb.detach().float(), q.grad.detach().float().clone()))
        out[f"{kind}_emb_rel"] = rel(res[1][0], res[0][0])
        out[f"{kind}_grad_rel"] = rel(res[1][1], res[0][1])
        out[f"{kind}_finite"] = bool(torch.isfinite(res[1][1]).all())
    alone = enc.encode_text(TEXTS[:1])[0]
    padded = enc.encode_text(TEXTS, batch_size=3)[0]
    out["pad_invariance_text_maxdiff"] = float(abs(alone - padded).max())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/check_adapters.json")
    args = ap.parse_args()
    import transformers

    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mt in TINY_TYPES:
            t0 = time.perf_counter()
            path = build_tiny_backbone(mt, Path(tmp) / mt)
            for dtype in ("float32", "bfloat16"):
                enc = SLQEncoder.from_pretrained(path, num_queries=4, dtype=dtype, device=args.device)
                r = check(enc)
                report["results"][f"{mt}/{dtype}"] = r
                print(f"{mt:11s} {dtype:9s} " + "  ".join(
                    f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
            print(f"  ({time.perf_counter() - t0:.1f}s)")
    fp32_ok = all(v[k] < 1e-4 for name, v in report["results"].items() if name.endswith("float32")
                  for k in v if k.endswith("_rel"))
    finite = all(v[k] for v in report["results"].values() for k in v if k.endswith("_finite"))
    report["fp32_split_equals_whole"] = fp32_ok
    report["bf16_split_grads_finite"] = finite
    print(f"fp32 split == whole (rel < 1e-4): {'PASS' if fp32_ok else 'FAIL'}; "
          f"split grads finite in all dtypes: {'PASS' if finite else 'FAIL'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The compared methods (slq, slq without the split, lora, full) trained in bf16 on left-padded
batches of a Qwen3-VL-4B-shaped random model: no NaN, fp32 trained weights, step time, memory.

This is what the methods stage runs (`slq.train.fit` through `SLQEncoder`), without the MLOps
tools the GPU machine lacks. The processor, tokenizer and chat template come from a folder laid
out like the real Qwen3-VL-4B-Instruct download (tests/real_layout.py); the model is built from
that config at the real sizes (36 layers x 2560, vision depth 24) with random weights.

    python bench/gpu_methods_bf16.py --out bench/results/gpu_methods_bf16.json      # on a GPU
    python bench/gpu_methods_bf16.py --tiny --device cpu --dtype float32 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

REAL_TEXT = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=9728)
REAL_MROPE = [24, 20, 20]
REAL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                   deepstack_visual_indexes=[5, 11, 17])

WORDS = "a red circle next to a small blue square on a wooden table in a bright kitchen with plants".split()


def pairs(n: int, seed: int = 0):
    """Images of several sizes and captions of 3 to ~90 words: every batch is left-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w, h = [(448, 448), (640, 360), (320, 480), (224, 224)][i % 4]
        im = Image.new("RGB", (w, h), tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
        ImageDraw.Draw(im).ellipse([w // 4, h // 4, w // 2, h // 2], fill=(200, 30, 30))
        k = 3 + int(torch.randint(0, 88, (1,), generator=g))
        out.append((im, " ".join(WORDS[j % len(WORDS)] for j in range(i, i + k))))
    return out


def build(folder: Path, tiny: bool, device: str, dtype: torch.dtype, max_pixels: int | None = None):
    import transformers as tf

    from slq.backbones.base import load_processor
    from slq.backbones.qwen_vl import Qwen3VLAdapter

    cfg = json.loads((folder / "config.json").read_text())
    if not tiny:
        cfg["text_config"].update(REAL_TEXT, initializer_range=0.02)
        cfg["text_config"]["rope_scaling"]["mrope_section"] = REAL_MROPE
        cfg["vision_config"].update(REAL_VISION, initializer_range=0.02)
    config = tf.Qwen3VLConfig(**cfg)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(prev)
    model.to(device=device, dtype=dtype)
    processor = load_processor(folder, "Qwen3VLProcessor")
    return Qwen3VLAdapter(model, processor, source=str(folder), max_pixels=max_pixels)


def run_method(folder, method: str, split: bool, args, dtype) -> dict:
    from slq.backbones.base import Prompts
    from slq.methods import LoraSpec, get_method
    from slq.queries import LatentQueries
    from slq.train import FitConfig, TrainingDiverged, fit

    adapter = build(folder, args.tiny, args.device, dtype, args.max_pixels or None)
    klass = get_method(method)
    q = None
    if klass.poolings[0] == "queries":
        q = LatentQueries(20, adapter.hidden_size)
        q.reset_random(torch.Generator().manual_seed(0))
    enc = klass(adapter, q, Prompts(), lora=LoraSpec())  # (methods other than lora ignore `lora`)
    lr = {"slq": 5e-4, "lora": 2e-4, "full": 1e-5}[method]
    cfg = FitConfig(steps=args.steps, batch_size=args.batch, lr=lr, warmup_steps=1, save_every=10**9,
                    split_forward=split, num_workers=args.workers)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rec = {"method": method, "split_forward": split, "steps": args.steps, "batch": args.batch, "lr": lr}
    try:
        res = fit(enc, pairs(args.steps * args.batch + args.batch), cfg, progress=False)
        rec.update(ok=True, losses=[round(h["loss"], 4) for h in res.history],
                   grad_norms=[round(h["grad_norm"], 4) for h in res.history],
                   step_time_s=sum(h["step_time"] for h in res.history[1:]) / max(1, len(res.history) - 1))
    except TrainingDiverged as e:
        rec.update(ok=False, error=str(e))
    rec["wall_s"] = time.perf_counter() - t0
    rec["trained_dtypes"] = sorted({str(p.dtype) for p in enc.trainable_parameters()})
    rec["backbone_dtype"] = str(adapter.dtype)
    if cuda:
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del enc, adapter
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="the folder's tiny sizes instead of Qwen3-VL-4B's")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    ap.add_argument("--methods", default="slq:split,slq:whole,lora,full")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from real_layout import build_real_layout

    dtype = getattr(torch, args.dtype)
    out = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "dtype": args.dtype, "model": "tiny" if args.tiny else "Qwen3-VL-4B-shaped",
           "runs": []}
    import transformers

    out["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_real_layout("qwen3_vl", Path(tmp) / "Qwen3-VL-4B-Instruct")
        for spec in args.methods.split(","):
            method, _, way = spec.partition(":")
            rec = run_method(folder, method, way != "whole", args, dtype)
            out["runs"].append(rec)
            print(json.dumps(rec), flush=True)
    out["all_finite"] = all(r.get("ok") for r in out["runs"])
    print("ALL FINITE" if out["all_finite"] else "SOME RUN DIVERGED", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

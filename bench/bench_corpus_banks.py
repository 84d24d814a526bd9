"""What `slq corpus embed --bank ...` costs end to end: K banks in one run against K single-bank runs.

The same folder as bench/bench_banks.py (laid out like Qwen3-VL-4B-Instruct's, scaled down;
`--wide`: decoder hidden 512 x 4 layers) and a corpus of `--items` images (noise, 576 x 544 px ->
306 visual tokens each) and as many captions (24-36 tokens), written as a manifest with PNG files.
K query checkpoints of 20 queries on that backbone (different seeds).

For K = 1, 2, 4 (`--banks`), in this process (`--engine local`, the in-process engine) or on a
local Ray instance (`--engine ray`, one actor):

  * `one run`: `embed_corpus` with `banks={bank0: ..., bank(K-1): ...}`: every bank's table from one
    pass over the corpus (images read and tokenized once, the prompt once, all banks' queries in
    one forward);
  * `K runs`: `embed_corpus` once per checkpoint, each into its own table, what K banks cost
    without one pass.

Wall seconds per configuration (model load, image decoding and the processor included, each run's
own), median of `--repeats` after one untimed warm-up run; every run writes fresh tables. Usage:

    python bench/bench_corpus_banks.py --out bench/results/corpus_banks_cpu.json
    python bench/bench_corpus_banks.py --wide --out bench/results/corpus_banks_cpu_wide.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def build_corpus(root: Path, items: int, tokenizer) -> Path:
    """`items` noise images and `items` captions of 24-36 tokens, as a manifest beside its images."""
    import numpy as np
    from PIL import Image

    from bench_banks import CAPTION

    rng = np.random.default_rng(0)
    ids = tokenizer(CAPTION, add_special_tokens=False)["input_ids"]
    rows = []
    (root / "images").mkdir(parents=True)
    for i, n in enumerate(np.linspace(24, 36, items).round().astype(int)):
        Image.fromarray(rng.integers(0, 256, (544, 576, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"id": f"img-{i}", "image": f"images/{i}.png"})
        rows.append({"id": f"txt-{i}", "text": tokenizer.decode(ids[:n])})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/slq-bench-banks"))
    ap.add_argument("--wide", action="store_true", help="decoder hidden 512 x 4 layers instead of 64 x 2")
    ap.add_argument("--banks", default="1,2,4")
    ap.add_argument("--items", type=int, default=32, help="images, and as many captions")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="local", choices=("local", "ray"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from bench_banks import build_folder
    from slq.backbones import load_backbone
    from slq.encoder import SLQEncoder
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus

    ks = [int(k) for k in args.banks.split(",")]
    folder = build_folder(args.work, args.wide)
    tmp = Path(tempfile.mkdtemp(prefix="bench_corpus_banks_"))
    ray_started = False
    try:
        adapter = load_backbone(folder, dtype=torch.float32, device="cpu")
        manifest = build_corpus(tmp / "corpus", args.items, adapter.tokenizer)
        ckpts = {f"bank{i}": str(SLQEncoder.fresh(adapter, num_queries=20, seed=i).save(tmp / f"bank{i}"))
                 for i in range(max(ks))}
        del adapter
        if args.engine == "ray":
            import ray

            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
            ray_started = True
        runs = 0

        def run(**kw) -> float:
            nonlocal runs
            runs += 1
            job = EmbedJob(str(manifest), db_uri=str(tmp / "db"), table=f"r{runs}", engine=args.engine, actors=1,
                           batch_size=args.batch_size, commit_rows=64, dtype="float32", device="cpu",
                           progress=False, **kw)
            s = embed_corpus(job)
            assert s["embedded"] == 2 * args.items, s
            return s["seconds"]

        run(checkpoint=ckpts["bank0"])  # warm-up: first imports and allocations, not timed
        samples: dict[tuple, list[float]] = {}
        for rep in range(args.repeats):
            for k in ks:
                names = list(ckpts)[:k]
                samples.setdefault((k, "one run"), []).append(
                    run(checkpoint=None, banks={n: ckpts[n] for n in names}))
                samples.setdefault((k, "K runs"), []).append(sum(run(checkpoint=ckpts[n]) for n in names))
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    base = statistics.median(samples[(1, "K runs")])
    rows = [{"banks": k, "mode": mode, "wall_s": round(statistics.median(v), 3),
             "x_one_bank": round(statistics.median(v) / base, 2),
             "items_per_s": round(2 * args.items / statistics.median(v), 2)} for (k, mode), v in samples.items()]
    print(f"\n{'banks':>5}  {'mode':<8} {'wall s':>7} {'x one':>6} {'items/s':>8}")
    for r in rows:
        print(f"{r['banks']:>5}  {r['mode']:<8} {r['wall_s']:>7.2f} {r['x_one_bank']:>6.2f} {r['items_per_s']:>8.2f}")
    out = {"machine": f"{os.cpu_count()}-core CPU, no GPU ({platform.processor() or platform.machine()})",
           "folder": "tests/real_layout.py qwen3_vl" + (" widened (--wide)" if args.wide else ""),
           "engine": args.engine, "items": {"images": args.items, "captions": args.items},
           "batch_size": args.batch_size, "num_queries": 20, "repeats": args.repeats,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

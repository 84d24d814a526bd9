"""Throughput of `slq corpus embed` on Ray Data: 1 vs 2 CPU actors, beside the in-process engine.

The corpus: the built-in world's test images and one caption each (--items, half of each kind),
embedded with the built-in backbone (models/tiny-qwen3-vl, copied; a random tiny Qwen3-VL when it is not
there) and a fresh 32-query checkpoint, into a local Lance table per configuration. Ray starts once
(its start-up is reported apart); each configuration's wall time includes its actors' start and
model load. "steady items/s" counts only the rows committed after the first commit, over the time
between the first and the last commit (Lance version timestamps), which leaves out the actors'
start. The in-process engine runs with 2 torch threads, then with 1. Usage:

    nice -n 10 python bench/bench_corpus_ray.py [--items 1000] [--out bench/results/corpus_ray.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = [  # (name, engine, actors, cpus per actor)
    ("ray, 1 actor x 1 CPU", "ray", 1, 1),
    ("ray, 2 actors x 1 CPU", "ray", 2, 1),
    ("ray, 1 actor x 2 CPUs", "ray", 1, 2),
    ("in-process, 2 torch threads", "local", 0, 2),
    ("in-process, 1 torch thread", "local", 0, 1),
]


def build_corpus(root: Path, items: int) -> Path:
    """Half images, half captions from the world's test split (its own manifest), or drawn shapes."""
    world = REPO / "data" / "world"
    rows = []
    if (world / "manifest.jsonl").is_file():
        seen = set()
        for line in (world / "manifest.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["split"] != "test" or r["image_id"] in seen:
                continue
            seen.add(r["image_id"])
            rows.append({"id": r["image_id"], "image": str(world / r["image"])})
            rows.append({"id": r["id"], "text": r["caption"]})
            if len(rows) >= items:
                break
    else:
        from PIL import Image, ImageDraw

        for i in range(items // 2):
            im = Image.new("RGB", (64, 64), "black")
            ImageDraw.Draw(im).ellipse([8 + i % 20, 8, 40 + i % 20, 40], fill=(i * 37 % 255, 200, 90))
            im.save(root / f"{i}.png")
            rows += [{"id": f"img-{i}", "image": str(root / f"{i}.png")}, {"id": f"txt-{i}", "text": f"shape {i}"}]
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:items]))
    return path


def build_checkpoint(root: Path) -> tuple[Path, str]:
    from slq.encoder import SLQEncoder

    builtin = REPO / "models" / "tiny-qwen3-vl"
    backbone = root / "backbone"
    if (builtin / "config.json").is_file():
        shutil.copytree(builtin, backbone)
        what = "built-in tiny Qwen3-VL (models/tiny-qwen3-vl)"
    else:
        from slq.miniature.tiny import build_tiny_backbone

        build_tiny_backbone("qwen3_vl", backbone)
        what = "random tiny Qwen3-VL (build_tiny_backbone)"
    enc = SLQEncoder.from_pretrained(backbone, num_queries=32, seed=0)
    return enc.save(root / "ckpt"), what


def steady_rate(db: str, table: str) -> float | None:
    """Rows per second between the first and the last commit (Lance version timestamps)."""
    import lance

    ds = lance.dataset(f"{db}/{table}.lance")
    versions = [v for v in ds.versions() if v["version"] >= 2]  # version 1: the empty table
    if len(versions) < 2:
        return None
    first = lance.dataset(f"{db}/{table}.lance", version=versions[0]["version"]).count_rows()
    span = (versions[-1]["timestamp"] - versions[0]["timestamp"]).total_seconds()
    return (ds.count_rows() - first) / span if span > 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--commit-rows", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "corpus_ray.json"))
    args = ap.parse_args()

    import ray

    from slq.mlops.corpus.embed import EmbedJob, embed_corpus

    root = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    try:
        manifest = build_corpus(root, args.items)
        ckpt, backbone = build_checkpoint(root)
        t = time.perf_counter()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
        results = []
        for name, engine, actors, cpus in CONFIGS:
            db = str(root / "db")
            table = f"t{len(results)}"
            job = EmbedJob(str(manifest), str(ckpt), db, table=table, engine=engine, actors=max(actors, 1),
                           cpus_per_actor=max(cpus, 1), batch_size=args.batch_size, commit_rows=args.commit_rows,
                           progress=False)
            load = os.getloadavg()[0]
            if engine == "local":
                import torch

                torch.set_num_threads(cpus)
            s = embed_corpus(job)
            rate = steady_rate(db, table)
            results.append({"config": name, "engine": engine, "actors": actors, "cpus_per_actor": cpus,
                            "items": s["embedded"], "wall_s": s["seconds"], "items_per_s": s["items_per_s"],
                            "steady_items_per_s": round(rate, 2) if rate else None, "commits": s["commits"],
                            "load_avg_1min_before": round(load, 2)})
            print(json.dumps(results[-1]), flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    import torch

    out = {"machine": f"{os.cpu_count()}-core CPU, no GPU ({platform.processor() or platform.machine()}), "
                      "shared with other jobs",
           "backbone": backbone, "num_queries": 32, "items": args.items, "batch_size": args.batch_size,
           "commit_rows": args.commit_rows, "ray_start_s": round(ray_start, 2), "ray_num_cpus": 4,
           "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

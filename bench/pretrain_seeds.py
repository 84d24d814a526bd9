"""How much of the built-in result is the pretraining seed's?

Pretrains the built-in backbone with other seeds (the pretrain stage's own code and params.yaml,
only `pretrain.seed` and any --set values changed), then trains each method on it with the default budget and scores
it on the world's plain and knowledge-aware test sets, through the same functions as the
`train`, `methods` and `evaluate` stages. It also greedily captions some test images with each
backbone and counts how often each object's colour and shape words come out right, so a
backbone's generative skill can be set beside its retrieval numbers.

Not a test, and slow: about 9 min of pretraining per seed and 1-2 min per method on 2 CPU cores.
A seed whose backbone folder already exists under --work is not pretrained again (the stage is
deterministic from its seed), so a rerun only trains and scores.

    PYTHONPATH=. python bench/pretrain_seeds.py --seeds 0 1 2 --methods slq lora full
    PYTHONPATH=. python bench/pretrain_seeds.py --set pretrain.steps=1800 --work /tmp/slq-seeds-1800 \
        --out bench/results/pretrain_seeds_1800.json          # another recipe: its own --work

Needs the world data (`dvc repro data` first). Writes nothing under the project: the backbones,
checkpoints and embedding cache go under --work; the results go to --out (JSON, one row per seed
and method) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def caption_accuracy(backbone_dir: Path, cfg, n: int) -> dict:
    """Greedy captions of the first `n` test scenes: the share of objects whose colour, shape,
    and "colour shape" words appear in the caption."""
    from PIL import Image

    from slq.data.world import load_manifest, load_scenes
    from slq.pretrain import describe_image, load_generative

    root = cfg.path(cfg.data.root)
    first = {}
    for r in load_manifest(root, cfg.data.manifest):
        if r["split"] == cfg.evaluate.split:
            first.setdefault(r["image_id"], r)
    scenes = load_scenes(root)
    backbone = load_generative(backbone_dir)
    hits = {"colour": 0, "shape": 0, "colour_shape": 0}
    objects = 0
    for image_id in sorted(first)[:n]:
        with Image.open(root / first[image_id]["image"]) as im:
            text = describe_image(backbone, im.convert("RGB"))
        for _size, colour, shape, _pos in scenes[image_id]:
            objects += 1
            hits["colour"] += colour in text
            hits["shape"] += shape in text
            hits["colour_shape"] += f"{colour} {shape}" in text
    return {k: v / max(objects, 1) for k, v in hits.items()} | {"objects": objects}


def run_seed(seed: int, methods: list[str], work: Path, params: Path, n_captions: int,
             overrides: dict) -> list[dict]:
    from slq.config import load_config
    from slq.stages import pretrain
    from slq.stages.methods import evaluate_checkpoint
    from slq.stages.train import train_method

    base = work / f"seed{seed}"
    backbone = base / "backbone"
    cfg = load_config(params, {
        **overrides, "pretrain.seed": seed, "pretrain.out": str(backbone), "backbone.path": str(backbone),
        "backbone.builtin": True, "pretrain.metrics": str(base / "pretrain.json"),
        "pretrain.history": str(base / "pretrain_history.csv"), "train.work_dir": str(base / "work"),
        "evaluate.cache_dir": str(base / "embed_cache"),
    })
    if not (cfg.path(cfg.data.root) / cfg.data.manifest).is_file():
        raise SystemExit(f"no world data at {cfg.data.root}: run `dvc repro data` (or `python cli.py stage data`) first")
    if (backbone / "config.json").is_file():
        saved = json.loads((backbone / "pretrain.json").read_text())
        want = {k: v for k, v in asdict(cfg.pretrain).items() if k not in ("out", "metrics", "history")}
        differ = sorted(k for k, v in want.items() if saved["config"].get(k) != v)
        if differ:
            raise SystemExit(f"{backbone} was pretrained with other settings ({', '.join(differ)}): "
                             "give this recipe its own --work, or delete that folder")
        print(f"seed {seed}: reusing the backbone in {backbone}", flush=True)
        pre = saved["metrics"]
    else:
        print(f"seed {seed}: pretraining into {backbone}", flush=True)
        pre = pretrain.run(cfg)
    caps = caption_accuracy(backbone, cfg, n_captions) if n_captions else {}
    rows = []
    for method in methods:
        lr = cfg.train.lr if method == "slq" else cfg.methods.lr.get(method)
        lr = cfg.train.lr if lr is None else float(lr)
        ckpt = base / method
        t0 = time.perf_counter()
        budget = train_method(cfg, method, ckpt, lr=lr, metrics_path=base / f"{method}.train.json")
        scores = evaluate_checkpoint(cfg, ckpt, ["world", "world_knowledge"])
        row = {
            "seed": seed, "method": method, "lr": lr,
            "pretrain_wall_s": pre.get("wall_time_s"), "pretrain_loss_last10": pre.get("loss_last10"),
            "fact_accuracy": pre.get("fact_accuracy"), "caption": caps,
            "loss_first10": budget["loss_first10"], "loss_last10": budget["loss_last10"],
            "train_wall_s": budget["wall_time_s"], "wall_s": time.perf_counter() - t0,
            "world": scores["world"], "world_knowledge": scores["world_knowledge"],
        }
        print(json.dumps({k: row[k] for k in ("seed", "method")} | {
            "t2i_R@1": scores["world"].get("t2i_R@1"), "knowledge_t2i_R@1": scores["world_knowledge"].get("t2i_R@1")}),
            flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    out = [("| seed | pretrain loss | facts | caption colour / shape / both | method | first / last loss "
            "| world t2i R@1 / R@10 | knowledge t2i R@1 / R@10 |"),
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, w, k = r["caption"], r["world"], r["world_knowledge"]
        cap = f"{f(c.get('colour'), 2)} / {f(c.get('shape'), 2)} / {f(c.get('colour_shape'), 2)}" if c else "-"
        out.append(f"| {r['seed']} | {f(r['pretrain_loss_last10'])} | {f(r['fact_accuracy'], 2)} | {cap} | {r['method']} "
                   f"| {f(r['loss_first10'], 2)} / {f(r['loss_last10'], 2)} | {f(w.get('t2i_R@1'))} / {f(w.get('t2i_R@10'))} "
                   f"| {f(k.get('t2i_R@1'))} / {f(k.get('t2i_R@10'))} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["slq", "lora", "full"],
                    choices=["slq", "zero_shot", "lora", "full"])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slq-pretrain-seeds"))
    ap.add_argument("--captions", type=int, default=80, help="test images to caption per backbone (0: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pretrain_seeds.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params.yaml value (YAML-parsed), e.g. pretrain.steps=1800; "
                         "a backbone already under --work is reused whatever its settings, so give each recipe its own --work")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. pretrain.steps=1800")
        overrides[key] = yaml.safe_load(value)
    random.seed(0)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        rows += run_seed(seed, args.methods, args.work.resolve(), args.params, args.captions, overrides)
        tmp = args.out.with_suffix(".tmp")  # after every seed, so a stopped run keeps what it measured
        tmp.write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=2) + "\n")
        tmp.replace(args.out)
    print(table(rows))


if __name__ == "__main__":
    main()

"""How much of the built-in result is the pretraining seed's?

A thin caller of the seed study (slq/miniature/study.py, also `slq study seeds`): pretrains the built-in
backbone with other seeds (the pretrain stage's own code and params.yaml, only `pretrain.seed` and
any --set values changed), trains each method on it with the default budget and scores it on the
world's plain and knowledge-aware test sets, through the same functions as the `train`, `methods`
and `evaluate` stages. It also greedily captions some test images with each backbone and counts
how often each object's colour and shape words come out right, so a backbone's generative skill
can be set beside its retrieval numbers. This script keeps its own row-per-(seed, method) JSON and
table; `slq study seeds` writes the spread over seeds and the paired differences.

Not a test, and slow: about 9 min of pretraining per seed and 1-2 min per method on 2 CPU cores.
Finished seeds are kept under --work, keyed by the recipe (`<work>/<recipe key>/seed_<k>/`), so a
rerun with the same settings only adds new seeds or methods, and another recipe never reuses them.

    PYTHONPATH=. python bench/pretrain_seeds.py --seeds 0 1 2 --methods slq lora full
    PYTHONPATH=. python bench/pretrain_seeds.py --set pretrain.steps=1800 \
        --out bench/results/pretrain_seeds_1800.json

Needs the world data (`dvc repro data` first). Writes nothing under the project: the backbones,
checkpoints and embedding cache go under --work; the results go to --out (JSON, one row per seed
and method) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rows_of(results: list[dict], methods: list[str]) -> list[dict]:
    """One row per (seed, method), as this script has always written them."""
    rows = []
    for r in results:
        pre = r.get("pretrain", {})
        for m in methods:
            b = r["budget"][m]
            rows.append({"seed": r["seed"], "method": m, "lr": b.get("lr"),
                         "pretrain_wall_s": pre.get("wall_time_s"), "pretrain_loss_last10": pre.get("loss_last10"),
                         "fact_accuracy": pre.get("fact_accuracy"), "caption": r.get("captions", {}),
                         "loss_first10": b.get("loss_first10"), "loss_last10": b.get("loss_last10"),
                         "train_wall_s": b.get("wall_time_s"), **r["scores"][m]})
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
    from slq.io import write_json_atomic
    from slq.methods import METHODS
    from slq.miniature import study
    from slq.mlops.config import load_config, parse_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["slq", "lora", "full"],
                    choices=list(METHODS))
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slq-pretrain-seeds"))
    ap.add_argument("--jobs", type=int, default=1, help="seeds at once, one process each (default 1)")
    ap.add_argument("--captions", type=int, default=80, help="test images to caption per backbone (0: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pretrain_seeds.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params.yaml value (YAML-parsed), e.g. pretrain.steps=1800")
    args = ap.parse_args()
    overrides = parse_set(args.set)
    cfg = load_config(args.params, overrides)
    res = study.run_study(cfg, args.seeds, args.work.resolve(), methods=args.methods, splits=study.SPLITS,
                          jobs=args.jobs, captions=args.captions)
    rows = rows_of(res.results, args.methods)
    write_json_atomic(args.out, {"overrides": overrides, "recipe_key": res.key, "rows": rows})
    print(table(rows))
    if res.failed:
        raise SystemExit("failed: " + "; ".join(f"seed {s}: {e}" for s, e in res.failed.items()))


if __name__ == "__main__":
    main()

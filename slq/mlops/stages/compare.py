"""Compare stage: SLQ beside zero-shot, LoRA and full fine-tuning, on plain and knowledge retrieval.

Reads the train stage's budget (metrics/train.json), scores SLQ's checkpoint on the comparison
benchmarks (through the embedding cache the evaluate stage filled), reads each method's metrics,
and writes the table as markdown (`methods.report`), as DVC metrics (`methods.summary`, metrics/compare.json) and
into docs/results.md between the `slq:methods` markers (when methods.readme names it). The text under the table is generated from the
numbers: which method leads where, and how much of its plain recall each keeps on the knowledge
split; nothing in it is written by hand. Last, as the last stage that reports, it writes the run's
whole report (`methods.html`, reports/report.html; slq.mlops.report: losses, recall curves, this comparison, the data
validation) as one page that needs no network.
"""

from __future__ import annotations

import json

from slq.io import write_json_atomic, write_text_atomic
from slq.mlops.comparison import backbone_note, render, scores_from_evaluate, update_readme
from slq.mlops.config import Config
from slq.mlops.records import bound_hash, read_bound


def run(cfg: Config) -> dict:
    from slq.mlops.baselines import evaluate_checkpoint

    from slq.mlops.evaluation import method_benchmarks

    mc = cfg.methods
    benchmarks = method_benchmarks(cfg)  # on your own data: its own task, not the world's
    rows = {}
    ckpt = cfg.path(cfg.train.out)
    slq_budget = read_bound(cfg.path(cfg.train.metrics), ckpt, "train")
    scores = scores_from_evaluate(cfg, ckpt, benchmarks)
    if scores is None:  # the evaluate stage did not score these (other split, benchmarks or checkpoint)
        scores = evaluate_checkpoint(cfg, ckpt, benchmarks)
    rows[cfg.train.method] = {"budget": slq_budget, "benchmarks": scores}
    for m in mc.compare:
        path = cfg.path(mc.metrics) / f"{m}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the methods stage for {m!r} first "
                                    f"(dvc repro methods, or slq stage methods --method {m})")
        rows[m] = json.loads(path.read_text())
        # each method's numbers must be its checkpoint's (a method that failed leaves its old file)
        bound_hash(rows[m].get("budget") or {}, path, cfg.path(mc.out) / m, "methods")
    table = render(rows, benchmarks)
    note = backbone_note(cfg)
    text = f"{table}\n{note}" if note else table
    write_text_atomic(cfg.path(mc.report), "# Methods compared\n\n" + text)
    summary = {m: {"budget": {k: r["budget"].get(k) for k in ("trainable_params", "step_time_mean", "wall_time_s",
                                                                "peak_memory_gib", "steps")},
                   **{b: r["benchmarks"].get(b, {}) for b in benchmarks}} for m, r in rows.items()}
    write_json_atomic(cfg.path(mc.summary), summary)
    if mc.readme:
        update_readme(cfg.path(mc.readme), text)
    from slq.mlops.report import ReportInputs, write_report

    write_report(cfg.path(mc.html), ReportInputs.from_config(cfg, compare_metrics=cfg.path(mc.summary)))
    return summary



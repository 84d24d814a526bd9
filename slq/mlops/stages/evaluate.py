"""Evaluate stage: exact image<->text recall@k on one split's embeddings.

Reads the embed stage's `{split}_image` / `{split}_text` files, ranks by exact dot product
(`slq.retrieval`, no ANN), and writes DVC metrics JSON and a recall-vs-k plots CSV. Captions map
to their image through `image_id`, so an image with several captions has several positives.
"""

from __future__ import annotations

from slq.io import write_json_atomic, write_text_atomic
from slq.mlops.config import Config
from slq.mlops.datasets import data_hash
from slq.mlops.records import bound_hash, evaluation_key
from slq.mlops.evaluation import benchmark_plan, run_benchmarks, txt_to_img
from slq.mlops.index import load_embeddings, read_meta
from slq.retrieval import image_text_ranks, recall_curve, summarize

CURVE_K = 50  # the plots CSV covers k = 1..max(CURVE_K, max(ks))


def run(cfg: Config) -> dict:
    """Score `cfg.evaluate.split`; write metrics JSON and plots CSV; return the metrics."""
    ev = cfg.evaluate
    emb_dir = cfg.path(cfg.embed.out)
    meta = read_meta(emb_dir)
    bound_hash(meta, emb_dir / "meta.json", cfg.path(cfg.train.out), "embed")  # the current checkpoint's vectors only
    img, img_rows = load_embeddings(emb_dir, ev.split, "image")  # (N_img, D)
    txt, txt_rows = load_embeddings(emb_dir, ev.split, "text")  # (N_txt, D)
    caption_image = txt_to_img(img_rows, txt_rows)  # (N_txt,)

    max_k = max(CURVE_K, *ev.ks)
    ranks = image_text_ranks(img, txt, caption_image, k=max_k)
    metrics = {
        **summarize(ranks, ev.ks),
        "n_images": len(img_rows),
        "n_texts": len(txt_rows),
        "checkpoint_hash": str(meta["checkpoint_hash"]),
        # what the numbers were measured on: the data the vectors came from, split, ks, benchmarks (the gate's check)
        "evaluation_key": evaluation_key(cfg, str(meta.get("data_hash") or data_hash(cfg))),
    }
    if ev.benchmarks or ev.modality_gap:
        bench, gap = run_benchmarks(cfg)
        if bench:
            metrics["benchmarks"] = bench
        if gap:
            metrics["modality_gap"] = {"trained": gap["trained_gap_l2"], "untrained": gap["untrained_gap_l2"]}
    skipped = benchmark_plan(cfg)[1]
    if skipped:  # your own data: the world's benchmarks that need its scene files, and why
        metrics["skipped_benchmarks"] = skipped
    write_json_atomic(cfg.path(ev.metrics), metrics)
    curves = {d: recall_curve(ranks[d], max_k) for d in ("t2i", "i2t")}
    lines = ["k,t2i,i2t"] + [
        f"{k},{curves['t2i'][k - 1]:.6f},{curves['i2t'][k - 1]:.6f}" for k in range(1, max_k + 1)
    ]
    write_text_atomic(cfg.path(ev.plots), "\n".join(lines) + "\n")
    return metrics



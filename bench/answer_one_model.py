"""Retrieval and answers from one copy of a frozen backbone, in one process (slq.mlops.answer), on a
project where a pipeline has run: its checkpoint embeds the test split's captions and each
question, the top 3 captions are the context, and the same loaded model generates the answer.

    python bench/answer_one_model.py --out bench/results/answer_builtin.json
    python bench/answer_one_model.py -p pipelines/smollm2/params.yaml --out bench/results/answer_smollm2.json

Run from the project folder. Prints and records the process's resident memory after loading,
after retrieval and after generation (VmRSS / VmHWM), the model's weight bytes (what a second
copy for generation would add), the seconds per answer, and each question's context and answer.
The backbone's answer quality is not the point (the built-in one is tiny); one model doing both is.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUESTIONS = ["Where is the red circle?", "What is next to the blue square?", "Which shape is green?",
             "Is there a star in the picture?", "What is on the left?"]


def memory() -> dict:
    """This process's resident memory and its peak (MiB), read as bench_serve reads the server's."""
    from bench_serve import status_kib

    return status_kib("self")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--params", default="params.yaml")
    ap.add_argument("--captions", type=int, default=400, help="test-split captions embedded as the corpus")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from slq.mlops.answer import Answerer
    from slq.mlops.config import load_config
    from slq.mlops.datasets import split_rows
    from slq.mlops.models import load_encoder

    cfg = load_config(args.params)
    ckpt = cfg.path(cfg.train.out)
    if not ckpt.is_dir():
        raise SystemExit(f"no checkpoint at {ckpt}: run that pipeline first")
    enc = load_encoder(cfg, queries=ckpt)
    answerer = Answerer(enc.backbone)
    assert answerer.model is enc.backbone.model  # one copy: the model that embeds also generates
    weights = sum(p.numel() * p.element_size() for p in enc.backbone.model.parameters())
    res = {"params": args.params, "backbone": str(enc.backbone.source), "model_type": enc.backbone.model_type,
           "dtype": str(enc.backbone.dtype), "weight_mib": round(weights / 2**20, 1), "machine": platform.node(),
           "loaded": memory()}
    captions = list(dict.fromkeys(r["caption"] for r in split_rows(cfg, "test")))[:args.captions]
    t0 = time.perf_counter()
    corpus = enc.encode_text(captions, progress=False)
    res["corpus"] = {"captions": len(captions), "embed_s": round(time.perf_counter() - t0, 2)}
    qv = enc.encode_text(QUESTIONS, progress=False)
    res["after_retrieval"] = memory()
    answers, t0 = [], time.perf_counter()
    for q, v in zip(QUESTIONS, qv):
        top = np.argsort(-(corpus @ v), kind="stable")[:3]
        ctx = [captions[i] for i in top]
        out = answerer.generate(q, ctx, args.max_new_tokens)
        answers.append({"question": q, "context": ctx, "answer": out["answer"],
                        "completion_tokens": out["completion_tokens"]})
    res["answer_s_mean"] = round((time.perf_counter() - t0) / len(QUESTIONS), 3)
    res["after_answers"] = memory()
    res["answer_added_mib"] = round(res["after_answers"]["rss_mib"] - res["after_retrieval"]["rss_mib"], 1)
    res["answers"] = answers
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

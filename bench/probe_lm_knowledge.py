"""Which everyday facts does the frozen LM know?

Ranks the world's answer words after each cue's question by the LM's own log-likelihood
(slq.miniature.knowledge.probe) and reports, per colour, shape and count, the cues it knows.

    PYTHONPATH=. python bench/probe_lm_knowledge.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out bench/results/lm_knowledge_smollm2.json

`--gguf` takes the extracted GGUF (`slq backbone smollm2` writes it) or a LLaVA folder built
around it; the two give the same answers (the wrapper keeps every LM weight).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="the .gguf file, or a LLaVA / causal-LM folder")
    ap.add_argument("--out", default=None, help="JSON with every row")
    args = ap.parse_args(argv)

    from slq.miniature import knowledge
    from slq.miniature.smollm2 import load_lm_folder

    t0 = time.perf_counter()
    model, tok = load_lm_folder(args.gguf)
    load_s = time.perf_counter() - t0
    rows = knowledge.probe(model, tok)
    probe_s = time.perf_counter() - t0 - load_s
    known = knowledge.known_cues(rows)
    print(f"{'kind':<7}{'answer':<10}{'known cues':<60}unknown (best guess)")
    for kind in ("colour", "shape", "count"):
        for answer in knowledge.answers(kind):
            mine = [r for r in rows if r["kind"] == kind and r["expected"] == answer]
            yes = ", ".join(r["cue"] for r in mine if r["known"]) or "-"
            no = ", ".join(f"{r['cue']} ({r['best']})" for r in mine if not r["known"])
            print(f"{kind:<7}{answer:<10}{yes:<60}{no}")
    n_known = sum(r["known"] for r in rows)
    answers_known = len(known)
    n_answers = sum(len(knowledge.answers(k)) for k in ("colour", "shape", "count"))
    print(f"\n{n_known}/{len(rows)} cues known; {answers_known}/{n_answers} answers have at least one known cue "
          f"(load {load_s:.1f} s, probe {probe_s:.1f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"source": Path(args.gguf).name, "rows": rows,
                                              "cues_known": n_known, "cues": len(rows),
                                              "answers_with_a_known_cue": answers_known, "answers": n_answers,
                                              "load_s": load_s, "probe_s": probe_s}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

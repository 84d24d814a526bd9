"""SLQ beside zero-shot, LoRA and full fine-tuning: the comparison table, the reading under it
(generated from the numbers, never written by hand) and the results page it is copied into.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from slq.io import write_text_atomic
from slq.mlops.config import Config


BEGIN = "<!-- slq:methods:begin (written by the compare stage; do not edit) -->"


END = "<!-- slq:methods:end -->"


KS = ("R@1", "R@5", "R@10")


def scores_from_evaluate(cfg: Config, ckpt: Path, names) -> dict | None:
    """SLQ's scores on `names` as the evaluate stage wrote them (metrics/eval.json), or None when
    that file is missing or is not for this checkpoint, or lacks one of them; then the caller scores
    the checkpoint itself. A comparison benchmark is scored with its `evaluate.benchmarks` entry's
    options (`slq.mlops.baselines.comparison_benchmarks`), so the evaluate stage's number is the
    same one. Saves loading the model a second time."""
    from slq.checkpoint import checkpoint_hash
    from slq.mlops.evaluation import benchmark_entries

    path = cfg.path(cfg.evaluate.metrics)
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    if str(ev.get("checkpoint_hash")) != checkpoint_hash(ckpt):
        return None
    scored = set(benchmark_entries(cfg))
    got = ev.get("benchmarks") or {}
    if not all(n in scored and n in got for n in names):
        return None
    return {n: got[n] for n in names}


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render(rows: dict, benchmarks) -> str:
    """The comparison as markdown: recall table, budget table, and what the numbers say."""
    lines = []
    heads = []
    for b in benchmarks:
        heads += [f"{b} t2i {k}" for k in KS] + [f"{b} i2t {k}" for k in KS]
    lines.append("| method | " + " | ".join(heads) + " |")
    lines.append("|---|" + "---:|" * len(heads))
    for m, r in rows.items():
        vals = []
        for b in benchmarks:
            ms = r["benchmarks"].get(b, {})
            vals += [_fmt(ms.get(f"t2i_{k}")) for k in KS] + [_fmt(ms.get(f"i2t_{k}")) for k in KS]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += ["", "| method | pooling | prompt | trainable params | steps | step time (s) | wall time (s) | "
                  "peak memory (GiB) | CPU threads |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for m, r in rows.items():
        b = r["budget"]
        wall = _fmt(b.get("wall_time_s"), 1)
        if b.get("resumed_from"):
            wall += f" (resumed at step {b['resumed_from']})"
        lines.append(f"| {m} | {b.get('pooling', 'queries')} | {b.get('prompt', 'pipeline')} | "
                     f"{_fmt(b.get('trainable_params'))} | "
                     f"{_fmt(b.get('steps'))} | {_fmt(b.get('step_time_mean'))} | {wall} | "
                     f"{_fmt(b.get('peak_memory_gib'), 2)} ({b.get('peak_memory_kind', 'process_rss')}) | "
                     f"{_threads(b)} |")
    lines += ["", *reading(rows, benchmarks), *_timing_note(rows)]
    return "\n".join(lines) + "\n"


def _threads(budget: dict) -> str:
    t, n = budget.get("threads"), budget.get("side_by_side") or 1
    if t is None:
        return "-"
    return f"{t}, {n} methods at once" if n > 1 else str(t)


def _timing_note(rows: dict) -> list[str]:
    """Say so when the step and wall times were measured under different CPU conditions."""
    conds = {(r["budget"].get("threads"), r["budget"].get("side_by_side") or 1)
             for r in rows.values() if r["budget"].get("steps") and r["budget"].get("threads") is not None}
    if len(conds) <= 1:
        return []
    return ["- Step and wall times were measured under different CPU conditions (threads, methods running at "
            "once; the methods stage runs the baselines side by side, `methods.workers`), so they compare "
            "only roughly; `methods.workers: 1` runs each alone, as the train stage runs SLQ."]


MIN_R1_FOR_RETENTION = 0.01  # below this plain t2i R@1 a knowledge/plain ratio is noise


def _r1(r: dict, bench: str) -> float | None:
    v = r["benchmarks"].get(bench, {}).get("t2i_R@1")
    return v if isinstance(v, (int, float)) else None


def reading(rows: dict, benchmarks) -> list[str]:
    """Plain statements read off the table (t2i R@1): the leader on every benchmark, then, on each
    knowledge split (every benchmark after the first, plain one), SLQ against each method and how
    much of its plain recall each method keeps there."""
    out = []
    plain, knows = benchmarks[0], list(benchmarks[1:])
    for bench in [plain, *knows]:
        scored = {m: v for m, r in rows.items() if (v := _r1(r, bench)) is not None}
        if scored:
            best = max(scored, key=scored.get)
            out.append(f"- **{bench}**: best t2i R@1 is {best} ({scored[best]:.3f}); "
                       + ", ".join(f"{m} {v:.3f}" for m, v in scored.items() if m != best) + ".")
    from slq.methods import compared_methods, reference_method

    ref = reference_method()
    if ref not in rows or not knows:
        return out
    for know in knows:
        s_k = _r1(rows[ref], know)
        for m in (m for m in rows if m in compared_methods()):
            o_k = _r1(rows[m], know)
            if s_k is None or o_k is None:
                continue
            verdict = "beats" if s_k > o_k else ("ties" if s_k == o_k else "does not beat")
            out.append(f"- On {know}, SLQ {verdict} {m} (t2i R@1 {s_k:.3f} vs {o_k:.3f}).")
    for m, r in rows.items():
        p = _r1(r, plain)
        if p is not None and p < MIN_R1_FOR_RETENTION:
            out.append(f"- {m} is near chance on {plain} (t2i R@1 {p:.3f}): its retention is not meaningful.")
            continue
        for know in knows:
            k = _r1(r, know)
            if p and k is not None:
                out.append(f"- {m} keeps {100 * k / p:.0f}% of its plain t2i R@1 on {know} ({k:.3f} / {p:.3f}).")
    return out


def backbone_note(cfg: Config) -> str:
    """What the pretrained backbone itself knows, when the pretrain stage ran: the world's taught
    facts (its fact probe), and for a real LM the everyday cues its own LM knows (the knowledge probe)."""
    path = cfg.path(cfg.pretrain.metrics)
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    if m.get("skipped") or "fact_accuracy" not in m:
        return ""
    n = m.get("fact_probe", {}).get("n", "?")
    k = m.get("knowledge")
    if not k:
        return (f"- The frozen backbone completes {m['fact_accuracy']:.0%} of the world's fact sentences correctly "
                f"({n} probes; pretrain stage), so the knowledge the knowledge split needs is in the backbone "
                "to the degree shown.\n")
    report = cfg.pretrain.knowledge or "pretrain.knowledge"
    return (f"- The frozen LM knows {k['cues_known']} of {k['cues']} everyday cues by the knowledge probe "
            f"({report}); world_everyday names scenes through those only. It completes "
            f"{m['fact_accuracy']:.0%} of the world's own fact sentences ({n} probes): world_knowledge asks for "
            "facts this backbone was never taught.\n")


def readme_table(cfg: Config) -> str:
    """The methods report's table for the results page (docs/results.md), stamped with where it came from (commit, machine)."""
    import datetime
    import os
    import platform
    import subprocess

    report = cfg.path(cfg.methods.report)
    if not report.is_file():
        raise FileNotFoundError(f"{cfg.methods.report} not found: run the pipeline first (dvc repro)")
    table = report.read_text(encoding="utf-8").split("# Methods compared\n\n", 1)[-1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cfg.root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    day = datetime.date.today().isoformat()
    return (f"{table}\n_Copied by `slq readme` on {day} from the run of commit {commit} on a {os.cpu_count()}-core "
            f"{cpu} machine ({platform.system()}); another machine's backbone gives other numbers._\n")


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the markers; a page without them is left alone (returns False)."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(readme, f"{head}{BEGIN}\n{table}{END}{tail}")
    return True

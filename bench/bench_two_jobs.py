"""Two training jobs on one machine: each one's step speed side by side against its speed alone,
with the project's CPU thread defaults (`slq.threads`) and without them (`SLQ_THREADS=off`, the
behaviour before: torch's and OpenMP's own defaults, idle threads spinning).

Each job is a fresh process that does what the `slq` CLI does at its start (`apply_thread_defaults`,
before torch loads), then trains SLQ with `slq.train.fit` as the train stage does: a random tiny
Qwen3-VL of the built-in backbone's shape (hidden 128, 4 layers, vision 64, images at 96 px),
32 queries, batch 32, lr 0.1, the built-in prompts, on a small synthetic world (64 px images).
For each setting: the jobs alone, one after the other, then two started side by side; a job's
speed side by side counts only the steps it ran while the other job was running too.

    PYTHONPATH=. python bench/bench_two_jobs.py --out bench/results/two_jobs.json

Also checks that the setting changes no result: every job's final queries and temperature hash
alike (same seed, same data, same thread count). Prints the load average before each run: other
work on the machine makes every number worse. Writes only under a temporary folder and --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = {"before": {"SLQ_THREADS": "off"},  # torch's and OpenMP's own defaults (libgomp spins 300,000 rounds)
            "after": {},  # the project's defaults (slq.threads: a short spin)
            "passive": {"SLQ_THREADS_WAIT": "passive"}}  # the passive wait (no spin)
WARMUP = 3  # first steps of a job left out of its speed (allocations, first batches)
TARGET = 0.40  # each job side by side keeps at least this share of its speed alone


def build(work: Path, n_scenes: int) -> tuple[Path, Path]:
    """The tiny backbone and the world, once for every job (random weights: speed, not scores)."""
    from slq.miniature.tiny import build_tiny_backbone
    from slq.miniature.world import generate_world
    from slq.mlops.config import DataConfig

    world = generate_world(DataConfig(n_train=n_scenes, n_val=2, n_test=2, image_size=64), work / "world")
    captions = [json.loads(line)["caption"] for line in (world / "manifest.jsonl").read_text().splitlines()]
    backbone = build_tiny_backbone("qwen3_vl", work / "backbone", hidden_size=128, num_layers=4, vision_dim=64,
                                   vision_depth=2, image_pixels=96, vocab_size=1024,
                                   corpus=captions + ["Describe the scene."])
    return backbone, world


def job(backbone: Path, world: Path, steps: int, out: Path) -> None:
    """One training job, in this (fresh) process; writes its step times and result hash to `out`."""
    from slq.threads import apply_thread_defaults

    applied = apply_thread_defaults()  # what the CLI does first
    import hashlib

    import torch

    from slq.encoder import SLQEncoder
    from slq.prompts import Prompts
    from slq.train import FitConfig, fit

    rows = [json.loads(line) for line in (world / "manifest.jsonl").read_text().splitlines()]
    data = [{"image": world / r["image"], "caption": r["caption"], "id": r["id"]} for r in rows if r["split"] == "train"]
    prompts = Prompts(text="{text}\nDescribe the scene.", image="Describe the scene.")
    enc = SLQEncoder.from_pretrained(str(backbone), num_queries=32, seed=0, prompts=prompts, dtype="float32",
                                     device="cpu")
    stamps = []
    cfg = FitConfig(steps=steps, batch_size=32, lr=0.1, warmup_steps=2, save_every=10**9, save_every_minutes=None)
    res = fit(enc, data, cfg, progress=False, on_step=lambda rec: stamps.append((time.time(), rec["step_time"])))
    h = hashlib.sha256(enc.queries.weight.detach().numpy().tobytes() + res.log_temp.numpy().tobytes()).hexdigest()
    out.write_text(json.dumps({"applied": applied, "threads": torch.get_num_threads(),
                               "wait_policy": os.environ.get("OMP_WAIT_POLICY") or (
                                   f"spin {os.environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in os.environ else None), "stamps": stamps,
                               "final_loss": res.final_loss, "result_sha256": h[:16]}))


def launch(setting: str, backbone: Path, world: Path, steps: int, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "SLQ_THREADS",
                                                                 "SLQ_THREADS_WAIT", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}
    env.update(SETTINGS[setting], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--job", str(backbone), str(world), str(out), "--steps", str(steps)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_jobs(setting: str, n: int, backbone: Path, world: Path, steps: int, tmp: Path, tag: str) -> list[dict]:
    procs = [(launch(setting, backbone, world, steps, tmp / f"{tag}-{i}.json"), tmp / f"{tag}-{i}.json")
             for i in range(n)]
    results = []
    for p, out in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"job {out.name} failed (exit {p.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.read_text()))
    return results


def step_mean(stamps: list, during: tuple[float, float] | None = None) -> float:
    """Mean step time after the warm-up, or of the steps that ended inside `during` (both jobs running)."""
    times = [dt for t, dt in stamps[WARMUP:] if during is None or during[0] <= t - dt and t <= during[1]]
    if not times:
        raise SystemExit("no step of one job ran while the other was running: raise --steps")
    return sum(times) / len(times)


def overlap(a: list, b: list) -> tuple[float, float]:
    """The wall-clock span in which both jobs were past their warm-up and still training."""
    return max(a[WARMUP][0] - a[WARMUP][1], b[WARMUP][0] - b[WARMUP][1]), min(a[-1][0], b[-1][0])


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps per job")
    ap.add_argument("--steps-before", type=int, default=20,
                    help="steps per job side by side without the defaults (they run ~30x slower)")
    ap.add_argument("--repeats", type=int, default=2, help="alone / side-by-side measurements per setting")
    ap.add_argument("--scenes", type=int, default=128, help="training scenes of the world (2 captions each)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--job", nargs=3, metavar=("BACKBONE", "WORLD", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.job:
        job(Path(a.job[0]), Path(a.job[1]), a.steps, Path(a.job[2]))
        return
    rows, hashes = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone, world = build(tmp, a.scenes)
        for rep in range(a.repeats):
            for setting in a.settings:
                steps_pair = a.steps if setting == "after" else a.steps_before
                load_alone = load()
                alone = run_jobs(setting, 1, backbone, world, a.steps, tmp, f"{setting}-{rep}-alone")[0]
                load_pair = load()
                t0 = time.perf_counter()
                pair = run_jobs(setting, 2, backbone, world, steps_pair, tmp, f"{setting}-{rep}-pair")
                wall = time.perf_counter() - t0
                during = overlap(pair[0]["stamps"], pair[1]["stamps"])
                base = step_mean(alone["stamps"])
                side = [step_mean(p["stamps"], during) for p in pair]
                row = {"setting": setting, "repeat": rep, "threads": alone["threads"],
                       "wait_policy": alone["wait_policy"], "applied": alone["applied"],
                       "alone_step_s": round(base, 4), "side_by_side_step_s": [round(s, 4) for s in side],
                       "kept_share": [round(base / s, 3) for s in side], "pair_wall_s": round(wall, 1),
                       "load_before_alone": round(load_alone, 2), "load_before_pair": round(load_pair, 2),
                       "alone_result": alone["result_sha256"]}
                hashes.add(alone["result_sha256"])
                if steps_pair == a.steps:
                    hashes.update(p["result_sha256"] for p in pair)
                rows.append(row)
                print(f"{setting:6s} #{rep}: {row['threads']} threads, wait {row['wait_policy'] or 'unset'}; alone "
                      f"{base:.3f} s/step (load {load_alone:.1f}); side by side {side[0]:.3f} / {side[1]:.3f} s/step "
                      f"(load {load_pair:.1f}): keeps {row['kept_share'][0]:.0%} / {row['kept_share'][1]:.0%}",
                      flush=True)
    summary = {}
    for setting in a.settings:
        mine = [r for r in rows if r["setting"] == setting]
        summary[setting] = {"alone_step_s_best": min(r["alone_step_s"] for r in mine),
                            "kept_share_worst": min(min(r["kept_share"]) for r in mine),
                            "kept_share_best": max(max(r["kept_share"]) for r in mine)}
    same = len(hashes) == 1
    print(f"\nresults: {'identical in every run' if same else 'DIFFER: ' + ', '.join(sorted(hashes))}")
    for setting, s in summary.items():
        print(f"{setting:6s}: alone {s['alone_step_s_best']:.3f} s/step; side by side each keeps "
              f"{s['kept_share_worst']:.0%}-{s['kept_share_best']:.0%} of it (target {TARGET:.0%})")
    if a.out:
        from slq.io import write_json_atomic

        write_json_atomic(a.out, {"machine": {"cpu": platform.processor() or platform.machine(),
                                              "cores": os.cpu_count(), "python": platform.python_version()},
                                  "steps": a.steps, "steps_before": a.steps_before, "rows": rows,
                                  "summary": summary, "results_identical": same, "target": TARGET})


if __name__ == "__main__":
    main()

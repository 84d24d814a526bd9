"""Which CPU kernels decide the bits of a pretrained backbone?

Two hosts of the same type (Intel Xeon) gave the built-in backbone bit for bit; an AMD EPYC host
gave another one from the same code, seed and thread count. This script looks for the cause on
one machine: it pretrains the built-in backbone for a few steps (the pretrain stage's own code,
params.yaml's recipe, only `pretrain.steps` shortened) in fresh processes that differ in one
setting each, and prints the sha256 of each run's weights and its last loss:

- the thread count (1 and 2),
- MKL's code path (`MKL_CBWR`: COMPATIBLE, AVX2, AVX512; unset lets MKL choose per CPU),
- oneDNN's instruction set (`ONEDNN_MAX_CPU_ISA`: AVX2),
- torch's own kernels' instruction set (`ATEN_CPU_CAPABILITY`: avx2).

Runs whose weights hash alike computed the same numbers. A setting that changes the hash here is
a setting that two machines choosing it differently would disagree on.

    PYTHONPATH=. python bench/kernel_paths.py --steps 30 --out bench/results/kernel_paths.json

Needs the world data (`slq data generate`). Writes only under a temporary folder and --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = [
    ("default, 1 thread", {}, 1),
    ("default, 2 threads", {}, 2),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, 1),
    ("MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"}, 1),
    ("MKL_CBWR=AVX512", {"MKL_CBWR": "AVX512"}, 1),
    ("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, 1),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("all three on AVX2", {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("all three: COMPATIBLE, AVX2, avx2", {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                           "ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("default, 1 thread, again", {}, 1),
]


def one_run(steps: int, threads: int, out: Path) -> dict:
    """In this process: pretrain `steps` steps at `threads` threads into `out`; the weights' hash."""
    import torch

    torch.set_num_threads(threads)
    from slq.mlops.config import load_config
    from slq.io import file_sha256
    from slq.miniature.pretrain import pretrain
    from slq.miniature.build import held_out_scenes

    cfg = load_config(ROOT / "params.yaml", {"pretrain.steps": steps})
    res = pretrain(cfg.pretrain, out, exclude=held_out_scenes(cfg), root=cfg.path("."))
    return {"sha256": file_sha256(out / "model.safetensors")[:16],
            "last_loss": res.history[-1]["loss"], "wall_s": round(res.wall_time_s, 1),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", nargs=2, metavar=("THREADS", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(a.steps, int(a.one[0]), Path(a.one[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, env, threads) in enumerate(SETTINGS):
            run_env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            cmd = [sys.executable, __file__, "--steps", str(a.steps), "--one", str(threads), f"{tmp}/run{i}"]
            p = subprocess.run(cmd, env=run_env, capture_output=True, text=True, cwd=ROOT)
            if p.returncode:
                raise SystemExit(f"{name}: failed\n{p.stderr[-3000:]}")
            row = {"setting": name, "threads": threads, **json.loads(p.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{name:36s} {row['sha256']}  loss {row['last_loss']:.8f}  {row['wall_s']} s  "
                  f"({row['cpu_capability']})", flush=True)
    base = rows[0]["sha256"]
    print("\nsame weights as the 1-thread default: "
          + ", ".join(r["setting"] for r in rows[1:] if r["sha256"] == base))
    print("other weights: " + ", ".join(r["setting"] for r in rows[1:] if r["sha256"] != base))
    if a.out:
        from slq.io import write_json_atomic
        from slq.miniature.study import machine

        write_json_atomic(a.out, {"steps": a.steps, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()

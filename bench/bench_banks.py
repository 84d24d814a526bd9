"""What K query banks on one backbone cost: one pass (slq.banks) against K separate passes.

Builds a folder laid out like the real Qwen3-VL-4B-Instruct download, scaled down
(tests/real_layout.py; `--wide` widens its decoder to hidden 512 x 4 layers so that the decoder,
not the vision tower, carries most of the work, as in the real model), loads it once, and times
on batches of realistic prompt lengths:

  * image: noise images of 576 x 544 px -> 306 visual tokens each (Qwen3-VL: 32 x 32 px a token);
  * text: captions of 24-36 tokens (padded batches), in the folder's chat template.

For K = 1, 2, 4, 8 banks of N_q queries (default 20, the paper's recipe):

  * `separate`: K single-bank SLQEncoder passes (`embed_inputs`, the whole-sequence forward that
    `encode_*` uses), i.e. what serving K banks costs without slq.banks;
  * `one pass (split)`: MultiBankEncoder, the prompt once into a KV cache, then all K x N_q query
    tokens in one forward (the default);
  * `one pass (whole)`: MultiBankEncoder, prompt and all banks' slots in one whole forward.

Per batch: median wall seconds and median process CPU seconds over `--repeats` (configurations
interleaved within each repeat, so that other jobs on the cores slow all alike), the ratio to
one bank alone (`separate` at K = 1), where the time goes (vision tower, the decoder over the
prompt, the query step; from forward hooks), and the peak resident memory a batch adds (VmHWM
reset through /proc/self/clear_refs after malloc_trim, minus the RSS before the call). Inputs
are built once, outside the timings (the processor's cost is bank-independent; it is printed).

    python bench/bench_banks.py --out bench/results/banks_cpu.json            # ~3 min on 2 cores
    python bench/bench_banks.py --wide --out bench/results/banks_cpu_wide.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

CAPTION = ("a small red circle to the left of a large blue square under a green triangle near the top right "
           "corner of the picture, with a yellow star below the square and a white line across the bottom")


# ---- the folder ------------------------------------------------------------------------------

def build_folder(work: Path, wide: bool) -> Path:
    import real_layout

    out = work / ("qwen3_vl-wide" if wide else "qwen3_vl")
    if (out / "model.safetensors").is_file():
        return out
    if wide:
        base = real_layout._CONFIGS["qwen3_vl"]

        def widened(init: float) -> dict:
            cfg = base(init)
            cfg["text_config"].update(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=64)
            cfg["text_config"]["rope_scaling"]["mrope_section"] = [12, 10, 10]  # sums to head_dim / 2
            cfg["vision_config"]["out_hidden_size"] = 512
            return cfg

        real_layout._CONFIGS["qwen3_vl"] = widened
        try:
            return real_layout.build_real_layout("qwen3_vl", out, weights_dtype="float32")
        finally:
            real_layout._CONFIGS["qwen3_vl"] = base
    return real_layout.build_real_layout("qwen3_vl", out, weights_dtype="float32")


# ---- measuring -------------------------------------------------------------------------------

class Phases:
    """Wall seconds spent in the vision tower, in the decoder over the prompt, and in the decoder's
    other calls (the query step of the split forward; prompt + queries in a whole forward)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.acc = {"vision": 0.0, "prompt decoder": 0.0, "query step / whole decoder": 0.0}
        self._in_prefix = False
        self._t: dict[str, float] = {}
        base = adapter.base
        vision = getattr(base, "visual", None) or getattr(base, "vision_tower", None)
        for name, mod in (("vision", vision), ("decoder", adapter.decoder)):
            mod.register_forward_pre_hook(lambda m, a, name=name: self._start(name))
            mod.register_forward_hook(lambda m, a, o, name=name: self._stop(name))
        real_prefix = adapter._prefix

        def prefix(inputs):
            self._in_prefix = True
            try:
                return real_prefix(inputs)
            finally:
                self._in_prefix = False

        adapter._prefix = prefix  # instance attribute: forward_split and slq.banks call it

    def _start(self, name):
        self._t[name] = time.perf_counter()

    def _stop(self, name):
        dt = time.perf_counter() - self._t.pop(name)
        if name == "vision":
            self.acc["vision"] += dt
        elif self._in_prefix:
            self.acc["prompt decoder"] += dt
        else:
            self.acc["query step / whole decoder"] += dt

    def reset(self):
        for k in self.acc:
            self.acc[k] = 0.0


def timed(fn, phases: Phases) -> tuple[float, float, dict]:
    phases.reset()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, dict(phases.acc)


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_mib(fn) -> float | None:
    """Peak resident memory the call adds: freed heap returned to the OS first, the high-water
    mark reset, then VmHWM after the call minus VmRSS before it."""
    if _LIBC is None:
        return None
    import gc

    gc.collect()
    _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


# ---- the run ---------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slq-bench-banks"))
    ap.add_argument("--wide", action="store_true", help="decoder hidden 512 x 4 layers instead of 64 x 2")
    ap.add_argument("--banks", default="1,2,4,8")
    ap.add_argument("--num-queries", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", default="image,text")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image

    from slq.backbones import load_backbone
    from slq.banks import MultiBankEncoder
    from slq.encoder import SLQEncoder

    ks = [int(k) for k in args.banks.split(",")]
    folder = build_folder(args.work, args.wide)
    adapter = load_backbone(folder, dtype=torch.float32, device="cpu")
    singles = {f"bank{i}": SLQEncoder.fresh(adapter, num_queries=args.num_queries, seed=i) for i in range(max(ks))}
    multi = MultiBankEncoder.from_encoders(singles)
    phases = Phases(adapter)
    enc0 = singles["bank0"]
    rng = np.random.default_rng(0)

    inputs, shapes = {}, {}
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        if kind == "image":
            images = [Image.fromarray(rng.integers(0, 256, (544, 576, 3), dtype=np.uint8)) for _ in range(args.batch)]
            inputs[kind] = enc0.prepare(images=images)
        elif kind == "text":
            ids = adapter.tokenizer(CAPTION, add_special_tokens=False)["input_ids"]
            lengths = np.linspace(24, 36, args.batch).round().astype(int)
            caps = [adapter.tokenizer.decode(ids[:n]) for n in lengths]
            inputs[kind] = enc0.prepare(texts=caps)
            shapes["caption_tokens"] = [len(adapter.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in caps]
        else:
            raise SystemExit(f"--kinds: unknown kind {kind!r}; use image and/or text")
        m = inputs[kind]["attention_mask"]
        shapes[kind] = {"prompt_tokens_mean": float(m.sum(-1).float().mean()), "padded_width": int(m.shape[1]),
                        "visual_tokens_per_item": adapter.inputs.visual_tokens(inputs[kind]) / args.batch,
                        "processor_s_per_batch": round(time.perf_counter() - t0, 3)}
        print(f"{kind}: {shapes[kind]}", flush=True)

    def configs(kind):
        x = inputs[kind]
        for k in ks:
            names = list(singles)[:k]
            yield (kind, k, "separate"), (lambda x=x, names=names: [singles[n].embed_inputs(x) for n in names])
            yield (kind, k, "one pass (split)"), (lambda x=x, names=names: multi.embed_inputs(x, names))
            yield (kind, k, "one pass (whole)"), (lambda x=x, names=names: multi.embed_inputs(x, names, split=False))

    plan = [c for kind in inputs for c in configs(kind)]
    samples: dict[tuple, list] = {key: [] for key, _ in plan}
    start = time.perf_counter()
    with torch.no_grad():
        for _, fn in plan:  # warm-up
            fn()
        for r in range(args.repeats):
            for key, fn in plan:
                samples[key].append(timed(fn, phases))
            print(f"repeat {r + 1}/{args.repeats} done ({time.perf_counter() - start:.0f} s)", flush=True)
        memory = {key: peak_extra_mib(fn) for key, fn in plan}

    rows = []
    for key, runs in samples.items():
        kind, k, mode = key
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        ph = {name: round(statistics.median(p[name] for _, _, p in runs), 4) for name in runs[0][2]}
        rows.append({"kind": kind, "banks": k, "mode": mode, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                     "wall_all": [round(w, 4) for w, _, _ in runs], "phases_s": ph,
                     "peak_extra_mib": None if memory[key] is None else round(memory[key], 1)})
    one = {kind: next(r for r in rows if r["kind"] == kind and r["banks"] == 1 and r["mode"] == "separate")
           for kind in inputs}
    for r in rows:
        r["x_one_bank_wall"] = round(r["wall_s"] / one[r["kind"]]["wall_s"], 3)
        r["x_one_bank_cpu"] = round(r["cpu_s"] / one[r["kind"]]["cpu_s"], 3)

    print(f"\n{'kind':<6}{'K':>3}  {'mode':<18}{'wall s':>8}{'x one':>7}{'cpu s':>8}{'x one':>7}{'+MiB':>7}"
          "   vision / prompt decoder / query step or whole decoder (s)")
    for r in rows:
        ph = r["phases_s"]
        print(f"{r['kind']:<6}{r['banks']:>3}  {r['mode']:<18}{r['wall_s']:>8.3f}{r['x_one_bank_wall']:>7.2f}"
              f"{r['cpu_s']:>8.3f}{r['x_one_bank_cpu']:>7.2f}{r['peak_extra_mib'] or float('nan'):>7.0f}   "
              f"{ph['vision']:.3f} / {ph['prompt decoder']:.3f} / {ph['query step / whole decoder']:.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")

    if args.out:
        import transformers

        cfg = adapter.model.config.get_text_config()
        result = {
            "what": "K query banks: one pass (slq.banks) vs K separate single-bank passes, per batch",
            "folder": "tests/real_layout.py qwen3_vl" + (" widened (--wide)" if args.wide else ""),
            "decoder": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers},
            "batch": args.batch, "num_queries": args.num_queries, "repeats": args.repeats, "shapes": shapes,
            "machine": platform.node(), "processor": platform.processor() or platform.machine(),
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The methods SLQ is compared with (zero_shot, lora, full), trained and scored side by side.

Each method gets `train`'s data, steps and batch size (its own learning rate), the same
benchmarks as SLQ's comparison rows (`methods.benchmarks`, default the world's plain and
knowledge-aware test sets) and the same budget metrics; each is logged to MLflow as its own run
(tag `method`). `slq stage methods --method lora` runs one.

The methods are independent, so on a CPU machine they run side by side, one process each
(`methods.workers`, default `auto`: one per CPU core, at most one per method; on a GPU machine one
at a time, as each may need the whole GPU). At the built-in model's size one thread per process
does nearly the work of two, so side by side finishes sooner with the same numbers (measured:
docs/methods.md). Each worker's output goes to `logs/methods/<method>.log` (outside the
DVC-cached outputs: a log holds times and process ids); the parent shows one progress bar per
method, and each method's MLflow run (nested under the stage's) gets its training curve live and
its scores when it finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from slq.io import write_json_atomic
from slq.mlops import tracking
from slq.mlops.config import Config


# evaluate.benchmarks options for the world benchmarks the comparison uses
WORLD_BENCHMARKS = ("world", "world_knowledge", "world_i2i", "world_composed", "world_everyday")


class MethodFailed(RuntimeError):
    """One or more compared methods failed; the others' results are kept."""


def check_method_name(method: str) -> None:
    from slq.methods import METHODS, compared_methods, reference_method

    if method not in METHODS or METHODS[method].reference:
        raise ValueError(f"methods: unknown comparison method {method!r}; use one of "
                         f"{', '.join(compared_methods())} ({reference_method()} itself is the train stage)")


def resolve_workers(cfg: Config, n_methods: int) -> int:
    """How many methods run at once: `methods.workers`, or for `auto` one per CPU core (capped at
    the number of methods) on a CPU machine and 1 when the backbone goes on a GPU."""
    w = cfg.methods.workers
    if w != "auto" and not (isinstance(w, int) and not isinstance(w, bool) and w >= 1):
        raise ValueError(f"methods.workers: {w!r} is neither 'auto' nor a whole number >= 1 "
                         "(how many compared methods run at once)")
    if w == "auto":
        w = 1 if uses_gpu(cfg) else cpu_count()
    return max(1, min(int(w), n_methods))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def uses_gpu(cfg: Config) -> bool:
    """Whether the backbone runs on a CUDA GPU (device cuda*, or auto with one present)."""
    dev = str(cfg.backbone.device)
    if dev != "auto":
        return dev.startswith("cuda")
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        return False  # no NVIDIA driver: skip importing torch (~3 s) just to learn that
    import torch

    return torch.cuda.is_available()


def train_and_score(cfg: Config, method: str, on_event=None, side_by_side: int = 1) -> dict:
    """Train `method` with `train`'s budget, score it on `methods.benchmarks`; write its metrics
    (without the MLflow run id, which `finish_method` adds). `on_event(kind, value)` hears
    ("step", n) after each training step and ("evaluate", None) when scoring starts."""
    from slq.mlops.models import method_lr
    from slq.mlops.training import train_method

    check_method_name(method)
    mc = cfg.methods
    out = cfg.path(mc.out) / method
    mdir = cfg.path(mc.metrics)
    lr = method_lr(cfg, method)
    from slq.mlops import tracking

    on_step = (lambda rec: on_event("step", rec["step"])) if on_event else None
    track = cfg.register.track_stages
    with (tracking.stage_run(cfg, "methods", run_name=f"method-{method}", tags={"method": method})
          if track else contextlib.nullcontext()) as run:
        curve = tracking.curve_logger(cfg) if run is not None else None  # the method's loss curve, live
        budget = train_method(cfg, method, out, lr=lr, metrics_path=mdir / f"{method}.train.json",
                              on_step=tracking.chain(on_step, curve), progress=on_event is None,
                              side_by_side=side_by_side)
        if curve is not None:
            curve.close()
        if on_event:
            on_event("evaluate", None)
        from slq.mlops.evaluation import method_benchmarks

        bench = evaluate_checkpoint(cfg, out, method_benchmarks(cfg))
    metrics = {"method": method, "budget": budget, "benchmarks": bench}
    if run is not None:
        metrics["mlflow_run_id"] = run.info.run_id  # finish_method logs the scores into this run
    write_json_atomic(mdir / f"{method}.json", metrics)
    (mdir / f"{method}.train.json").unlink(missing_ok=True)
    return metrics


def finish_method(cfg: Config, method: str, metrics: dict) -> dict:
    """Log a scored method to MLflow and write its metrics with the run id."""
    metrics["mlflow_run_id"] = tracking.log_method_run(cfg, method, metrics, cfg.path(cfg.methods.out) / method)
    write_json_atomic(cfg.path(cfg.methods.metrics) / f"{method}.json", metrics)
    return metrics


def run_method(cfg: Config, method: str) -> dict:
    """One method, in this process: train, score, log."""
    return finish_method(cfg, method, train_and_score(cfg, method))


def log_path(cfg: Config, method: str) -> Path:
    return cfg.path("logs/methods") / f"{method}.log"


def worker_init(threads: int) -> None:
    """A spawned worker's initializer: BLAS threads and no bars, before torch is imported."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["TQDM_DISABLE"] = "1"  # the parent draws the bars


@contextlib.contextmanager
def worker_output(log: Path, mode: str, threads: int, label: str):
    """In a spawned worker: stdout and stderr (the file descriptors and sys's streams) go to `log`
    (opened with `mode`), torch runs `threads` threads, and an exception's traceback is written
    there before it propagates (the parent names the log). Descriptors 1 and 2 stay on the log."""
    import sys
    import traceback

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, mode, buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        import torch

        torch.set_num_threads(threads)
        print(f"{label}: {threads} thread(s), pid {os.getpid()}", flush=True)
        try:
            yield f
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def _worker(cfg: Config, method: str, threads: int, queue, workers: int) -> dict:
    """A spawned process: train and score one method with its output in its log file."""

    def on_event(kind, value):
        queue.put((method, kind, value))
        if kind == "evaluate" or (kind == "step" and value % 25 == 0):
            print(f"method {method}: {kind}{'' if value is None else f' {value}'}", flush=True)

    with worker_output(log_path(cfg, method), "w", threads, f"method {method}"):
        metrics = train_and_score(cfg, method, on_event=on_event, side_by_side=workers)
    print(json.dumps(metrics, indent=2, default=str), flush=True)
    return metrics


def _order(names: list[str]) -> list[str]:
    """Longest first: the methods that train before those that only embed (zero_shot)."""
    from slq.methods import get_method

    return sorted(names, key=lambda m: not get_method(m).trains)


def run_parallel(cfg: Config, names: list[str], workers: int) -> dict:
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    from slq.methods import get_method

    threads = max(1, cpu_count() // workers)
    steps = cfg.train.steps
    print(f"methods: {', '.join(names)} on {workers} worker processes x {threads} thread(s); "
          f"logs in {cfg.path('logs/methods')}/<method>.log", flush=True)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    manager = ctx.Manager()
    events = manager.Queue()
    bars = {m: tqdm(total=steps if get_method(m).trains else 0, desc=f"{m:>9}", unit="step", position=i, leave=True)
            for i, m in enumerate(names)}
    for m in names:
        bars[m].set_postfix_str("waiting")
    results, failed = {}, {}

    def drain():
        while True:
            try:
                m, kind, value = events.get_nowait()
            except queue_mod.Empty:
                return
            if kind == "step":
                bars[m].update(value - bars[m].n)
                bars[m].set_postfix_str("train")
            elif kind == "evaluate":
                bars[m].set_postfix_str("evaluate")

    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_init, initargs=(threads,)) as pool:
            pending = {pool.submit(_worker, cfg, m, threads, events, workers): m for m in _order(names)}
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for fut in done:
                    m = pending.pop(fut)
                    try:
                        metrics = fut.result()
                    except Exception as e:  # keep the others running; report every failure at the end
                        failed[m] = e
                        bars[m].set_postfix_str("FAILED")
                        continue
                    results[m] = finish_method(cfg, m, metrics)
                    bars[m].set_postfix_str("done")
    finally:
        drain()
        for b in bars.values():
            b.close()
        manager.shutdown()
    if failed:
        lines = [f"  {m}: {type(e).__name__}: {e} (log: {log_path(cfg, m)})" for m, e in failed.items()]
        kept = f"; kept: {', '.join(results)}" if results else ""
        raise MethodFailed("methods failed:\n" + "\n".join(lines) + kept)
    return {m: results[m] for m in names}


def evaluate_checkpoint(cfg: Config, ckpt: Path, names) -> dict:
    """{benchmark: metrics} for a checkpoint of any method, through the embedding cache."""
    from slq.benchmarks import get_benchmark
    from slq.benchmarks.cache import CachedEmbedder
    from slq.checkpoint import checkpoint_hash
    from slq.mlops.models import load_encoder

    enc = load_encoder(cfg, queries=ckpt)
    embedder = CachedEmbedder(enc, cfg.path(cfg.evaluate.cache_dir), checkpoint_hash(ckpt),
                              batch_size=cfg.embed.batch_size)
    return {label: get_benchmark(name)(**options).evaluate(embedder, ks=tuple(cfg.evaluate.ks)).metrics
            for label, name, options in comparison_benchmarks(cfg, names)}


def comparison_benchmarks(cfg: Config, names) -> list[tuple[str, str, dict]]:
    """(label, benchmark name, options) for each of `methods.benchmarks`: the `evaluate.benchmarks`
    entry of that label gives its options (world_everyday's `cues`, a split), so every method is
    scored exactly as the evaluate stage scores SLQ; a name not there runs with its defaults on
    `evaluate.split`."""
    from slq.mlops.evaluation import OWN_DATA, benchmark_entries, benchmark_options

    entries = benchmark_entries(cfg)
    out = []
    for label in names:
        default = {"name": "world" if label == OWN_DATA else label}  # `data`: your data's task (world on it)
        name, options = entries[label] if label in entries else benchmark_options(cfg, default)[1:]
        options = dict(options)
        if name not in WORLD_BENCHMARKS:
            raise ValueError(f"methods.benchmarks: {label!r} is not one of {', '.join(WORLD_BENCHMARKS)}")
        options.setdefault("split", cfg.evaluate.split)
        out.append((label, name, options))
    return out

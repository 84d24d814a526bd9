"""ANN vs exact search in LanceDB at scale: build time, recall@k against exact search, single-query
latency, over a grid of (nprobes, refine_factor) settings, and the setting the index stage's tuner
(slq.mlops.stages.index.tune) picks.

The data stand in for real embeddings: unit vectors drawn around a few thousand unit centres
(uneven cluster sizes; the spread around a centre is anisotropic, see World), float32. They are
generated in chunks and streamed into the Lance table, so memory stays bounded at any --n; the
exact top-k of the held-out queries (drawn the same way, never in the table) is accumulated chunk
by chunk on the way. The table lives in a scratch folder outside the repository and is deleted at
the end, also when `timeout` stops the run (--keep to keep it); what was measured is written either way.

Not a test. Smoke run first, then the full size (in the background, niced, bounded); the
recorded run (bench/results/ann_1m.json, docs/benchmarks.md):
    PYTHONPATH=. python bench/bench_ann.py --n 20000 --dim 256 --centres 300 --subspace 64 --out /tmp/smoke.json
    PYTHONPATH=. nice -n 10 timeout 60m python bench/bench_ann.py --n 1000000 --dim 2560 --centres 3000 \
        --partitions 500 --iterations 10 --metric l2 --nprobes 10,20,40,80,160 --refine 0,10,30,60 \
        --out bench/results/ann_1m.json > /tmp/ann_1m.log 2>&1 &
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slq.mlops.config import IndexConfig  # noqa: E402
from slq.io import write_json_atomic  # noqa: E402
from slq.mlops.index import RecallTargetError, ann_params, build_ann, tune, vector_query  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


class World:
    """Clustered unit vectors: `centres` unit centres with log-normal weights; a point is its centre
    plus Gaussian noise of norm ~`spread`, renormalised (cosine to its centre ~ 1/sqrt(1+spread^2)).

    Real embeddings are anisotropic: most of their variance lies in far fewer directions than
    their size. With `subspace` > 0 the noise lies mostly (share 1 - `iso`) in a random subspace
    of that many directions, with a power-law spectrum (variance of direction i ~ 1/i); subspace 0
    gives isotropic noise, the hardest case for quantisation.
    """

    def __init__(self, dim: int, centres: int, spread: float, seed: int, subspace: int = 0, iso: float = 0.1):
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((centres, dim), dtype=np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)  # (C, D)
        w = rng.lognormal(0.0, 1.0, centres)
        self.weights = w / w.sum()
        self.dim, self.spread, self.subspace, self.iso = dim, spread, subspace, iso
        if subspace:
            basis, _ = np.linalg.qr(rng.standard_normal((dim, subspace)))  # (D, r) orthonormal columns
            scale = 1.0 / np.sqrt(np.arange(1, subspace + 1))
            self.mix = (basis * (scale / np.linalg.norm(scale))).T.astype(np.float32)  # (r, D), total variance 1

    def draw(self, rng, n: int) -> np.ndarray:
        which = rng.choice(len(self.centres), size=n, p=self.weights)
        iso = rng.standard_normal((n, self.dim), dtype=np.float32) / self.dim ** 0.5  # (n, D), norm ~1
        if self.subspace:
            low = rng.standard_normal((n, self.subspace), dtype=np.float32) @ self.mix  # (n, D), norm ~1
            noise = np.sqrt(1 - self.iso) * low + np.sqrt(self.iso) * iso
        else:
            noise = iso
        x = self.centres[which] + self.spread * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x  # (n, D) float32


class TopK:
    """A running exact top-k (by dot product) of fixed queries over row chunks."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = queries, k
        self.idx = np.full((len(queries), 0), -1, dtype=np.int64)
        self.score = np.full((len(queries), 0), -np.inf, dtype=np.float32)

    def add(self, chunk: np.ndarray, offset: int) -> None:
        s = self.q @ chunk.T  # (Q, B)
        kk = min(self.k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        idx = np.concatenate([self.idx, part + offset], axis=1)
        score = np.concatenate([self.score, np.take_along_axis(s, part, axis=1)], axis=1)
        order = np.argsort(-score, axis=1, kind="stable")[:, : self.k]
        self.idx, self.score = np.take_along_axis(idx, order, 1), np.take_along_axis(score, order, 1)


def write_table(db, name: str, world: World, n: int, chunk: int, seed: int, truth: TopK) -> float:
    """Stream n generated rows (id, vector) into a new table; the exact top-k grows on the way."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), world.dim))])
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()

    def batches():
        for lo in range(0, n, chunk):
            x = world.draw(rng, min(chunk, n - lo))
            truth.add(x, lo)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), world.dim)
            yield pa.record_batch([pa.array(np.arange(lo, lo + len(x), dtype=np.int64)), vec], schema=schema)
            if (lo // chunk) % 10 == 0:
                log(f"  wrote {lo + len(x):,} / {n:,} rows")

    db.create_table(name, data=pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite")
    return time.perf_counter() - t0


def measure(tbl, queries: np.ndarray, truth: list[set], k: int, settings: dict | None) -> dict:
    """Recall@k against exact and per-query wall time (one query at a time, ids fetched)."""
    for q in queries[:3]:  # warm-up
        vector_query(tbl, q, k, settings, ["id"]).to_arrow()
    times, hits = [], 0
    for q, want in zip(queries, truth):
        t0 = time.perf_counter()
        got = vector_query(tbl, q, k, settings, ["id"]).to_arrow().column("id").to_pylist()
        times.append((time.perf_counter() - t0) * 1e3)
        hits += len(want.intersection(got))
    return {"recall": hits / (k * len(truth)), "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95)), "mean_ms": float(np.mean(times))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="table rows")
    ap.add_argument("--dim", type=int, default=2560, help="vector size (Qwen3-VL-4B's hidden size)")
    ap.add_argument("--centres", type=int, default=3000)
    ap.add_argument("--spread", type=float, default=0.75, help="noise norm around a centre (0.75: cosine ~0.8 to it)")
    ap.add_argument("--subspace", type=int, default=256, help="directions holding most of the noise; 0: isotropic")
    ap.add_argument("--iso", type=float, default=0.1, help="share of the noise variance that is isotropic")
    ap.add_argument("--queries", type=int, default=200, help="held-out queries for recall and latency")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=10_000, help="rows generated and written at a time")
    ap.add_argument("--index-type", default="IVF_PQ", choices=["IVF_PQ", "IVF_HNSW_SQ"])
    ap.add_argument("--metric", default="l2", choices=["l2", "cosine", "dot"], help="the index's distance")
    ap.add_argument("--partitions", type=int, default=None, help="IVF partitions (default: sqrt(n))")
    ap.add_argument("--sub-vectors", type=int, default=None, help="PQ sub-vectors (default: dim/16)")
    ap.add_argument("--iterations", type=int, default=50, help="k-means iterations (IVF and PQ training)")
    ap.add_argument("--nprobes", default="5,10,20,40,80")
    ap.add_argument("--refine", default="0,5,10,20,50", help="refine factors; 0 = no re-rank")
    ap.add_argument("--exact-queries", type=int, default=3, help="queries timed with exact search")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--goal-ms", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", default="/tmp/slq_ann_bench")
    ap.add_argument("--keep", action="store_true", help="keep the scratch table")
    ap.add_argument("--out", default="bench/results/ann_1m.json")
    args = ap.parse_args()

    import lancedb

    def stop(signum, frame):  # `timeout` sends SIGTERM: still record what was measured, delete the data
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    nprobes = [int(v) for v in args.nprobes.split(",")]
    refine = [int(v) or None for v in args.refine.split(",")]
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "mem_gib": round(mem_total_gib(), 1), "gpu": None,
                    "cpu": cpu_model(), "python": platform.python_version(),
                    "lancedb": lancedb.__version__, "numpy": np.__version__},
        "data": {"n": args.n, "dim": args.dim, "centres": args.centres, "spread": args.spread,
                 "subspace": args.subspace, "iso": args.iso if args.subspace else 1.0,
                 "queries": args.queries, "k": args.k, "dtype": "float32", "seed": args.seed,
                 "raw_gib": round(args.n * args.dim * 4 / 2**30, 2)},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg_at_start": os.getloadavg(),  # the cores are shared: how busy they were
    }
    log(f"{args.n:,} x {args.dim} float32 ({result['data']['raw_gib']} GiB), {args.centres} centres -> {scratch}")
    try:
        world = World(args.dim, args.centres, args.spread, args.seed, args.subspace, args.iso)
        queries = world.draw(np.random.default_rng(args.seed + 2), args.queries)  # (Q, D), held out
        truth_acc = TopK(queries, args.k)
        db = lancedb.connect(str(scratch))
        result["write_s"] = write_table(db, "bench", world, args.n, args.chunk, args.seed, truth_acc)
        truth = [set(row.tolist()) for row in truth_acc.idx]
        tbl = db.open_table("bench")
        log(f"written in {result['write_s']:.0f} s; peak RSS {peak_rss_gib():.1f} GiB")

        ic = IndexConfig(ann_type=args.index_type, ann_metric=args.metric, num_partitions=args.partitions,
                         num_sub_vectors=args.sub_vectors, max_iterations=args.iterations, recall_k=args.k,
                         recall_target=args.target, nprobes=nprobes, refine_factors=refine)
        params = ann_params(ic, args.n, args.dim)
        log(f"building {params}")
        result["index"] = {**params, "build_s": build_ann(tbl, params)}
        stats = tbl.index_stats("vector_idx")
        result["index"]["num_indexed_rows"] = int(stats.num_indexed_rows)
        log(f"built in {result['index']['build_s']:.0f} s; peak RSS {peak_rss_gib():.1f} GiB")

        exact = measure(tbl, queries[: args.exact_queries], truth[: args.exact_queries], args.k, None)
        result["exact"] = {"p50_ms": exact["p50_ms"], "p95_ms": exact["p95_ms"], "queries": args.exact_queries,
                           "recall": exact["recall"]}
        log(f"exact: p50 {exact['p50_ms']:.1f} ms (recall {exact['recall']:.3f}, the check of the ground truth)")

        sweep = result["sweep"] = []  # filled as measured: a stopped run keeps its points
        for r in refine:
            for npb in nprobes:
                m = measure(tbl, queries, truth, args.k, {"metric": args.metric, "nprobes": npb, "refine_factor": r})
                sweep.append({"nprobes": npb, "refine_factor": r, **m})
                log(f"nprobes {npb:4d} refine {r!s:>4}: recall@{args.k} {m['recall']:.3f}  "
                    f"p50 {m['p50_ms']:.2f} ms  p95 {m['p95_ms']:.2f} ms")

        t0 = time.perf_counter()
        try:
            tuned = tune(tbl, queries, truth, ic, "bench")
            result["tuned"] = {k: tuned[k] for k in ("nprobes", "refine_factor", "recall")}
            chosen = {"metric": args.metric, "nprobes": tuned["nprobes"], "refine_factor": tuned["refine_factor"]}
            m = measure(tbl, queries, truth, args.k, chosen)
            result["tuned"].update(p50_ms=m["p50_ms"], p95_ms=m["p95_ms"])
        except RecallTargetError as e:
            result["tuned"] = {"error": str(e)}
        result["tuned"]["tune_s"] = time.perf_counter() - t0
        log(f"tuner picks: {result['tuned']}")

        ok = [s for s in sweep if s["recall"] >= args.target]
        fastest_ok = min(ok, key=lambda s: s["p50_ms"]) if ok else None
        result["goal"] = {"recall_at_least": args.target, "p50_ms_below": args.goal_ms,
                          "met": bool(fastest_ok and fastest_ok["p50_ms"] < args.goal_ms),
                          "fastest_at_target": fastest_ok,
                          "best_recall": max(sweep, key=lambda s: (s["recall"], -s["p50_ms"]))}
        result["peak_rss_gib"] = round(peak_rss_gib(), 2)
    except BaseException as e:
        result["stopped"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        result["load_avg_at_end"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(args.out, result)
        log(f"results -> {args.out}")


if __name__ == "__main__":
    main()

"""LanceDB tables of embeddings: load the embed stage's vectors into LanceDB tables, one per (split, modality).

Each table row carries its vector, ids, caption, image path, split and the checkpoint hash that
produced it. Every write is a new LanceDB table version; the versions go to `cfg.index.out` so a
metric can always be traced to the exact table state.

An ANN index is built only for tables of at least `index.ann_min_rows` rows (small tables are
searched exactly; evaluation never uses the index). An index is measured before it is used:
recall@k of ANN against exact search on held-out query vectors (a fixed-seed sample of the other
modality's vectors of the same split, i.e. real queries for that table), with the search settings
(IVF probes, exact re-rank factor) raised step by step over the `index.nprobes` x
`index.refine_factors` grid until recall reaches `index.recall_target`. The chosen settings go into
`cfg.index.out` beside the table's version (slq.mlops.search reads them there); build time, recall and
single-query latency go to `cfg.index.metrics`, so no wall time lands in a cached output. When no
setting of the grid reaches the target the stage fails (RecallTargetError) rather than serve an
index that misses results.

lancedb and pyarrow are imported inside functions: lancedb's import is slow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from slq.mlops.config import Config, IndexConfig


MODALITIES = ("image", "text")


METRIC = "dot"  # exact search: embeddings are L2-normalised; dot = cosine and matches the evaluate stage


ANN_TYPES = ("IVF_PQ", "IVF_HNSW_SQ")


ANN_METRICS = ("l2", "cosine", "dot")  # for unit vectors: |q - v|^2 = 2 - 2 q.v, cosine distance = 1 - q.v


COLUMNS = ["id", "image_id", "caption", "image", "split", "checkpoint_hash"]  # what a search returns


EXACT_LATENCY_QUERIES = 10  # exact search on a large table is slow; a few queries show its latency


class RecallTargetError(ValueError):
    """No setting of the tuning grid brings the ANN index to `index.recall_target`."""


def load_embeddings(emb_dir: Path, split: str, modality: str) -> tuple[np.ndarray, list[dict]]:
    """The embed stage's `{split}_{modality}.npy` (N, D) and its `.jsonl` rows, checked to agree."""
    npy, jsonl = emb_dir / f"{split}_{modality}.npy", emb_dir / f"{split}_{modality}.jsonl"
    for f in (npy, jsonl):
        if not f.exists():
            raise FileNotFoundError(f"embeddings file missing: {f} (run the embed stage for split {split!r})")
    vectors = np.load(npy).astype(np.float32, copy=False)  # (N, D)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if vectors.ndim != 2 or len(vectors) != len(rows):
        raise ValueError(f"{npy} has shape {vectors.shape} but {jsonl} has {len(rows)} rows")
    return vectors, rows


def read_meta(emb_dir: Path) -> dict:
    """The embed stage's meta.json ({"checkpoint_hash", "dim", "backbone", ...})."""
    path = emb_dir / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"embeddings file missing: {path} (run the embed stage)")
    return json.loads(path.read_text())


def table_name(cfg: Config, split: str, modality: str) -> str:
    return f"{cfg.index.table_prefix}_{split}_{modality}"


def arrow_table(vectors: np.ndarray, rows: list[dict], modality: str, image_paths: dict, checkpoint_hash: str):
    """Rows as a pyarrow table; ids are stored as strings so every table shares one schema."""
    import pyarrow as pa

    n, dim = vectors.shape
    image_ids = [str(r["image_id"]) for r in rows]
    return pa.table(
        {
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim),
            "id": [str(r["id"]) if modality == "text" else str(r["image_id"]) for r in rows],
            "image_id": image_ids,
            "caption": [r.get("caption", "") if modality == "text" else "" for r in rows],
            "image": [str(image_paths.get(i, "")) for i in image_ids],
            "split": [str(r.get("split", "")) for r in rows],
            "checkpoint_hash": [checkpoint_hash] * n,
        }
    )


# ---- the ANN index: build, query, measure, tune --------------------------------------------
def check_settings(ic: IndexConfig) -> None:
    """The `index` section's ANN settings, checked before any table is written."""
    if ic.ann_type not in ANN_TYPES:
        raise ValueError(f"index.ann_type {ic.ann_type!r}: must be one of {', '.join(ANN_TYPES)}")
    if ic.ann_metric not in ANN_METRICS:
        raise ValueError(f"index.ann_metric {ic.ann_metric!r}: must be one of {', '.join(ANN_METRICS)}")
    if not 0 < ic.recall_target <= 1:
        raise ValueError(f"index.recall_target {ic.recall_target}: must be in (0, 1]")
    if ic.recall_k < 1 or ic.recall_queries < 1:
        raise ValueError(f"index.recall_k ({ic.recall_k}) and index.recall_queries ({ic.recall_queries}) "
                         f"must be at least 1")
    for key, grid, none_ok in (("nprobes", ic.nprobes, False), ("refine_factors", ic.refine_factors, True)):
        vals = [v for v in grid if not (none_ok and v is None)]
        if not grid or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in vals) \
                or vals != sorted(set(vals)) or (none_ok and None in grid and grid[0] is not None):
            raise ValueError(f"index.{key} {grid!r}: must be a non-empty ascending list of positive integers"
                             + (" (null, for no re-rank, only first)" if none_ok else ""))
    for key in ("num_partitions", "num_sub_vectors", "max_iterations"):
        v = getattr(ic, key)
        if v is not None and v < 1:
            raise ValueError(f"index.{key} {v}: must be at least 1, or null for the default")


def sub_vectors(dim: int, wanted: int | None) -> int:
    """PQ sub-vectors: `wanted` (which must divide dim), or the largest divisor of dim <= dim / 16."""
    if wanted is not None:
        if dim % wanted:
            raise ValueError(f"index.num_sub_vectors {wanted} does not divide the vector size {dim}; "
                             f"choose a divisor of {dim} (or null)")
        return wanted
    return max(d for d in range(1, max(1, dim // 16) + 1) if dim % d == 0)


def ann_params(ic: IndexConfig, rows: int, dim: int) -> dict:
    """The index to build for a table of `rows` vectors of size `dim`."""
    params = {"index_type": ic.ann_type, "metric": ic.ann_metric,
              "num_partitions": ic.num_partitions or max(1, round(rows ** 0.5)), "max_iterations": ic.max_iterations}
    if ic.ann_type == "IVF_PQ":
        params["num_sub_vectors"] = sub_vectors(dim, ic.num_sub_vectors)
    return params


def build_ann(tbl, params: dict) -> float:
    """Build the ANN index `params` (ann_params) on the table's vector column; its build time in s."""
    from lancedb.index import IvfHnswSq, IvfPq

    common = {"distance_type": params["metric"], "num_partitions": params["num_partitions"],
              "max_iterations": params["max_iterations"]}
    if params["index_type"] == "IVF_PQ":
        config = IvfPq(num_sub_vectors=params["num_sub_vectors"], **common)
    else:
        config = IvfHnswSq(**common)
    t0 = time.perf_counter()
    tbl.create_index("vector", config=config)  # the column first: with config=, it is the column
    return time.perf_counter() - t0


def vector_query(tbl, vector, k: int, settings: dict | None = None, columns: list[str] | None = None):
    """The top-k query for `vector`: through the ANN index with `settings` ({"metric", "nprobes",
    "refine_factor"}), or exact by dot product (the index bypassed) when settings is None. The one
    place that turns settings into a query, so what was tuned is what is served."""
    metric = METRIC if settings is None else settings.get("metric", METRIC)
    q = tbl.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector").distance_type(metric)
    if settings is None:
        q = q.bypass_vector_index()
    else:
        q = q.nprobes(int(settings["nprobes"]))
        if settings.get("refine_factor"):
            q = q.refine_factor(int(settings["refine_factor"]))
    return q.select([*(columns or COLUMNS), "_distance"]).limit(k)


def similarity(distance: float, metric: str = METRIC) -> float:
    """The dot product q.v of unit vectors from LanceDB's `_distance` under `metric` (dot and
    cosine distances are 1 - q.v, l2 is the squared distance 2 - 2 q.v)."""
    return 1.0 - float(distance) / 2 if metric == "l2" else 1.0 - float(distance)


def exact_neighbours(vectors: np.ndarray, ids, queries: np.ndarray, k: int) -> list[set]:
    """The ids of each query's exact top-k rows by dot product (the ground truth for recall)."""
    from slq.retrieval import topk

    idx, _ = topk(queries, vectors, k)  # (Q, k)
    ids = np.asarray(ids)
    return [set(ids[row].tolist()) for row in idx]


def ann_recall(tbl, queries: np.ndarray, truth: list[set], k: int, settings: dict, id_column: str = "id") -> float:
    """The share of the queries' exact top-k rows that ANN search returns in its top k (the mean
    of |ANN top-k ∩ exact top-k| / k when the table has at least k rows)."""
    hits = 0
    for q, want in zip(queries, truth):
        got = vector_query(tbl, q, k, settings, [id_column]).to_arrow().column(id_column).to_pylist()
        hits += len(want.intersection(got))
    return hits / max(1, sum(len(want) for want in truth))


def latency_ms(tbl, queries: np.ndarray, k: int, settings: dict | None, warmup: int = 3) -> dict:
    """p50 / p95 wall time of single top-k queries (rows fetched as a search returns them), in ms."""
    for q in queries[:warmup]:
        vector_query(tbl, q, k, settings).to_list()
    times = []
    for q in queries:
        t0 = time.perf_counter()
        vector_query(tbl, q, k, settings).to_list()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def tune(tbl, queries: np.ndarray, truth: list[set], ic: IndexConfig, name: str, id_column: str = "id") -> dict:
    """The cheapest settings of the grid found to reach `ic.recall_target`, by greedy ascent.

    From the lowest (nprobes, refine_factor), each step raises whichever of the two brings the
    higher recall (nprobes on a tie), until the target is met. Returns {"nprobes", "refine_factor",
    "recall", "tried": [{"nprobes", "refine_factor", "recall"}, ...]}; raises RecallTargetError
    naming the table, the best recall reached and what to change when the grid runs out.
    """
    grid_n, grid_r, k = list(ic.nprobes), list(ic.refine_factors), ic.recall_k
    seen: dict[tuple[int, int], float] = {}

    def recall(i: int, j: int) -> float:
        if (i, j) not in seen:
            settings = {"metric": ic.ann_metric, "nprobes": grid_n[i], "refine_factor": grid_r[j]}
            seen[(i, j)] = ann_recall(tbl, queries, truth, k, settings, id_column)
        return seen[(i, j)]

    i = j = 0
    while recall(i, j) < ic.recall_target:
        steps = [(a, b) for a, b in ((i + 1, j), (i, j + 1)) if a < len(grid_n) and b < len(grid_r)]
        if not steps:
            (bi, bj), best = max(seen.items(), key=lambda kv: kv[1])
            raise RecallTargetError(
                f"table {name}: ANN recall@{k} reached at most {best:.3f} (nprobes {grid_n[bi]}, refine_factor "
                f"{grid_r[bj]}), below index.recall_target {ic.recall_target}; add larger index.nprobes / "
                f"index.refine_factors, build a finer index (index.num_sub_vectors, index.ann_type), lower the "
                f"target, or raise index.ann_min_rows to search this table exactly")
        i, j = max(steps, key=lambda s: recall(*s))  # max keeps the first (the nprobes step) on a tie
    tried = [{"nprobes": grid_n[a], "refine_factor": grid_r[b], "recall": r} for (a, b), r in seen.items()]
    return {"nprobes": grid_n[i], "refine_factor": grid_r[j], "recall": recall(i, j), "tried": tried}


def sample_queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` rows of `vectors` (all of them when there are fewer), drawn with `seed`, in row order."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))
    return vectors[pick]


def index_table(tbl, vectors: np.ndarray, ids, queries: np.ndarray, ic: IndexConfig, name: str) -> tuple[dict, dict]:
    """Build, tune and time the ANN index of one table.

    Returns (settings for cfg.index.out, measurements for cfg.index.metrics).
    """
    params = ann_params(ic, len(vectors), vectors.shape[1])
    truth = exact_neighbours(vectors, ids, queries, ic.recall_k)
    build_s = build_ann(tbl, params)
    t0 = time.perf_counter()
    tuned = tune(tbl, queries, truth, ic, name)
    tune_s = time.perf_counter() - t0
    chosen = {"nprobes": tuned["nprobes"], "refine_factor": tuned["refine_factor"]}
    ann_lat = latency_ms(tbl, queries, ic.recall_k, {**params, **chosen})
    exact_lat = latency_ms(tbl, queries[:EXACT_LATENCY_QUERIES], ic.recall_k, None, warmup=1)
    settings = {**params, **chosen, "recall_k": ic.recall_k, "recall": tuned["recall"],
                "recall_target": ic.recall_target, "recall_queries": len(queries), "tried": tuned["tried"]}
    metrics = {**params, **chosen, f"recall_at_{ic.recall_k}": tuned["recall"], "build_s": build_s,
               "tune_s": tune_s, **ann_lat, "exact_p50_ms": exact_lat["p50_ms"]}
    return settings, metrics

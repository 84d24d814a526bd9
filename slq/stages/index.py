"""Index stage: load the embed stage's vectors into LanceDB tables, one per (split, modality).

Each table row carries its vector, ids, caption, image path, split and the checkpoint hash that
produced it. Every write is a new LanceDB table version; the versions go to `cfg.index.out` so a
metric can always be traced to the exact table state. An ANN index is built only for large tables
(`cfg.index.ann_min_rows`): below ~100K rows exact search is fast and evaluation is exact anyway.
lancedb and pyarrow are imported inside functions (lancedb takes ~1.4 s to import).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slq.config import Config
from slq.io import write_json_atomic

MODALITIES = ("image", "text")
METRIC = "dot"  # embeddings are L2-normalised; dot = cosine and matches the evaluate stage


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


def _arrow_table(vectors: np.ndarray, rows: list[dict], modality: str, image_paths: dict, checkpoint_hash: str):
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


def run(cfg: Config) -> dict:
    """Write one LanceDB table per (split, modality) and record rows/versions in cfg.index.out."""
    import lancedb
    from lancedb.index import HnswSq

    emb_dir = cfg.path(cfg.embed.out)
    checkpoint_hash = str(read_meta(emb_dir)["checkpoint_hash"])
    db = lancedb.connect(str(cfg.path(cfg.index.uri)))
    report: dict = {}
    for split in cfg.embed.splits:
        data = {m: load_embeddings(emb_dir, split, m) for m in MODALITIES}
        image_paths = {str(r["image_id"]): r.get("image", "") for r in data["image"][1]}
        for modality, (vectors, rows) in data.items():
            name = table_name(cfg, split, modality)
            tbl = db.create_table(
                name, data=_arrow_table(vectors, rows, modality, image_paths, checkpoint_hash), mode="overwrite"
            )
            ann = len(rows) >= cfg.index.ann_min_rows
            if ann:  # the column comes first: with config=, the positional argument is the column
                tbl.create_index("vector", config=HnswSq(distance_type=METRIC))
            report[name] = {"rows": len(rows), "version": int(tbl.version), "ann": ann}
    report["checkpoint_hash"] = checkpoint_hash
    write_json_atomic(cfg.path(cfg.index.out), report)
    return report


def search(cfg: Config, query_vector, table: str, k: int = 5) -> list[dict]:
    """Exact top-k rows of `table` by dot product, best first, each with its "score".

    Bypasses any ANN index, so results match the evaluate stage's matrix product.
    """
    import lancedb

    tbl = lancedb.connect(str(cfg.path(cfg.index.uri))).open_table(table)
    query = np.asarray(query_vector, dtype=np.float32)  # (D,)
    rows = (
        tbl.search(query, vector_column_name="vector")
        .distance_type(METRIC)
        .bypass_vector_index()
        .select(["id", "image_id", "caption", "image", "split", "checkpoint_hash"])
        .limit(k)
        .to_list()
    )
    for r in rows:
        r["score"] = 1.0 - r["_distance"]  # LanceDB's dot distance is 1 - q.v
    return rows

"""Index stage: load the embed stage's vectors into LanceDB tables, one per (split, modality), build
and tune an ANN index for the large ones, and record versions and search settings (slq.mlops.index).

LanceDB updates its folder in place, so the tables are written in a copy of it, swapped in only
once every table is built: a failure (a missing split, a recall target not met) leaves the tables
that index.json names as they were."""

from __future__ import annotations

from pathlib import Path

from slq.io import staged_dir, write_json_atomic
from slq.mlops.config import Config
from slq.mlops.records import bound_hash
from slq.mlops.index import (
    MODALITIES,
    arrow_table,
    check_settings,
    index_table,
    load_embeddings,
    read_meta,
    sample_queries,
    table_name,
)


def run(cfg: Config) -> dict:
    """Write one LanceDB table per (split, modality), index the large ones, and record rows,
    versions and tuned search settings in cfg.index.out, measurements in cfg.index.metrics."""
    ic = cfg.index
    check_settings(ic)
    with staged_dir(cfg.path(ic.uri), copy=True) as db_dir:  # the tables' versions go on from the old ones
        report, metrics = _tables(cfg, db_dir)
    write_json_atomic(cfg.path(ic.metrics), metrics)
    write_json_atomic(cfg.path(ic.out), report)
    return report


def _tables(cfg: Config, db_dir: Path) -> tuple[dict, dict]:
    """Every table written into the LanceDB folder `db_dir`: (report, metrics)."""
    import lancedb

    ic = cfg.index
    emb_dir = cfg.path(cfg.embed.out)
    # the vectors must be the current checkpoint's: a stale embed folder is refused, naming both hashes
    checkpoint_hash = bound_hash(read_meta(emb_dir), emb_dir / "meta.json", cfg.path(cfg.train.out), "embed")
    db = lancedb.connect(str(db_dir))
    report: dict = {}
    metrics: dict = {}
    for split in cfg.embed.splits:
        data = {m: load_embeddings(emb_dir, split, m) for m in MODALITIES}
        image_paths = {str(r["image_id"]): r.get("image", "") for r in data["image"][1]}
        for modality, (vectors, rows) in data.items():
            name = table_name(cfg, split, modality)
            arrow = arrow_table(vectors, rows, modality, image_paths, checkpoint_hash)
            tbl = db.create_table(name, data=arrow, mode="overwrite")
            entry: dict = {"rows": len(rows), "ann": len(rows) >= ic.ann_min_rows}
            measured: dict = {"rows": len(rows), "index_type": "exact"}
            if entry["ann"]:
                other = data["text" if modality == "image" else "image"][0]
                queries = sample_queries(other, ic.recall_queries, ic.seed)
                entry["search"], ann = index_table(tbl, vectors, arrow.column("id").to_pylist(), queries, ic, name)
                measured.update(ann)
            entry["version"] = int(tbl.version)
            report[name], metrics[name] = entry, measured
    report["checkpoint_hash"] = checkpoint_hash
    return report, metrics

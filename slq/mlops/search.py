"""Search the index stage's LanceDB tables with query vectors, as `slq search` and the search
service (slq.mlops.service) do.

A table is searched through its ANN index with the settings the index stage tuned for it (read
from `cfg.index.out`) when three things agree: the table has a vector index, the index stage
recorded settings for it, and they were recorded for the table version now on disk. Otherwise
the search is exact (the index bypassed), which is always correct, only slower; each result says
which way it was searched. Before a table is searched, every row's checkpoint hash must equal the
hash of the checkpoint whose encoder makes the query vectors: vectors of another checkpoint live in
another space, and their scores would be meaningless.

lancedb is imported inside functions: its import is slow, and `slq --help` must stay fast.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from slq.mlops.config import Config
from slq.mlops.index import COLUMNS, METRIC, similarity, table_name, vector_query

TARGETS = ("image", "text")


class SearchError(ValueError):
    """A search that cannot run as asked (no index, no such split); the message says what to do."""


class CheckpointMismatch(SearchError):
    """The table's vectors were written by another checkpoint than the one embedding the queries."""


def lance_tables(db) -> list[str]:
    """Every table name of a LanceDB connection (the listing is paged)."""
    names, token = [], None
    while True:
        res = db.list_tables(page_token=token)
        names += list(res.tables)
        token = res.page_token
        if not token:
            return names


def _index_dir(cfg: Config):
    """The index's LanceDB folder (index.uri), or SearchError when the index stage has not made it."""
    uri = cfg.path(cfg.index.uri)
    if not uri.is_dir():
        raise SearchError(f"no LanceDB index at {uri}: run the pipeline first (`slq run` or `dvc repro`)")
    return uri


def _no_table(cfg: Config, names: list[str], split: str, target: str) -> SearchError:
    """The error for a (split, target) without a table among `names`: it lists the splits that have one."""
    prefix, suffix = f"{cfg.index.table_prefix}_", f"_{target}"
    splits = sorted(n[len(prefix):-len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix))
    article = "an" if target == "image" else "a"
    return SearchError(f"no index for split {split!r} (table {table_name(cfg, split, target)}); splits with "
                       f"{article} {target} index: {', '.join(splits) or 'none'} (the index stage indexes "
                       "embed.splits)")


def index_table(cfg: Config, split: str, target: str) -> str:
    """The name of the index's LanceDB table of (split, target), checked to exist (SearchError: no
    index yet, or none for that split), without opening it or loading an encoder."""
    import lancedb

    names = lance_tables(lancedb.connect(str(_index_dir(cfg))))
    name = table_name(cfg, split, target)
    if name not in names:
        raise _no_table(cfg, names, split, target)
    return name


def check_checkpoint(tbl, name: str, expected: str, source: str = "the loaded checkpoint") -> None:
    """CheckpointMismatch unless every row of `tbl` carries checkpoint hash `expected`."""
    quoted = expected.replace("'", "''")
    if tbl.count_rows(f"checkpoint_hash != '{quoted}'") == 0:
        return
    found = tbl.search().where(f"checkpoint_hash != '{quoted}'").select(["checkpoint_hash"]).limit(1).to_list()
    raise CheckpointMismatch(
        f"table {name} was written by checkpoint {found[0]['checkpoint_hash']}, not by {source} ({expected}): "
        f"re-run the embed and index stages with this checkpoint (`dvc repro index`), or search with the "
        f"checkpoint that wrote the table")


def ann_settings(tbl, entry: dict | None) -> tuple[dict | None, str]:
    """(settings, why): the tuned ANN settings for `tbl` from its index-report entry, or None and
    the reason the table is searched exactly."""
    if not entry or not entry.get("search"):
        return None, "no tuned ANN index (the table is below index.ann_min_rows, or the index stage has not run)"
    if int(entry.get("version", -1)) != int(tbl.version):
        return None, (f"the ANN settings were tuned for table version {entry.get('version')}, the table is at "
                      f"version {tbl.version} (re-run the index stage)")
    if not tbl.list_indices():
        return None, "the table has no vector index (re-run the index stage)"
    return entry["search"], ""


class Searcher:
    """Top-k search over one project's index for query vectors of the checkpoint `checkpoint_hash`.

    Tables are opened (and their checkpoint checked) on first use and kept open, so a service sees
    one consistent table version and its settings until it restarts. `exact=True` bypasses every
    ANN index. Safe to share between threads.
    """

    def __init__(self, cfg: Config, checkpoint_hash: str, *, exact: bool = False,
                 source: str = "the loaded checkpoint"):
        import lancedb

        uri = _index_dir(cfg)
        self.cfg, self.checkpoint_hash, self.exact, self.source = cfg, checkpoint_hash, exact, source
        self.db = lancedb.connect(str(uri))
        report = cfg.path(cfg.index.out)
        self.report = json.loads(report.read_text()) if report.is_file() else {}
        self._open: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def check_tables(self, split: str) -> None:
        """Open `split`'s tables that exist: one written by another checkpoint raises CheckpointMismatch
        (a service stops at its start); a table not built yet is no error here."""
        for target in TARGETS:
            try:
                self.table(split, target)
            except CheckpointMismatch:
                raise
            except SearchError:
                pass

    def table(self, split: str, target: str) -> tuple[str, object, dict | None, str]:
        """(name, table, ANN settings or None, why exact) for (split, target), opened and checked once."""
        if target not in TARGETS:
            raise SearchError(f"target {target!r}: must be one of {', '.join(TARGETS)}")
        name = table_name(self.cfg, split, target)
        with self._lock:
            if name not in self._open:
                names = lance_tables(self.db)
                if name not in names:
                    raise _no_table(self.cfg, names, split, target)
                tbl = self.db.open_table(name)
                check_checkpoint(tbl, name, self.checkpoint_hash, self.source)
                settings, why = (None, "exact search was asked for") if self.exact else \
                    ann_settings(tbl, self.report.get(name))
                self._open[name] = (name, tbl, settings, why)
            return self._open[name]

    def search(self, vector, split: str, target: str, k: int) -> dict:
        """{"table", "search": {"mode": "ann", nprobes, refine_factor, ...} or {"mode": "exact", "why"},
        "hits": [{id, image_id, caption, image, split, checkpoint_hash, score}, ...]} best first;
        score is the dot product (cosine for the pipeline's normalised vectors)."""
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        name, tbl, settings, why = self.table(split, target)
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)  # (D,)
        rows = vector_query(tbl, vec, k, settings, COLUMNS).to_list()
        metric = METRIC if settings is None else settings.get("metric", METRIC)
        hits = [{**{c: r[c] for c in COLUMNS}, "score": similarity(r["_distance"], metric)} for r in rows]
        if settings is None:
            mode = {"mode": "exact", "why": why}
        else:
            mode = {"mode": "ann", **{key: settings.get(key) for key in
                                      ("index_type", "metric", "nprobes", "refine_factor", "recall", "recall_k")}}
        return {"table": name, "search": mode, "hits": hits}

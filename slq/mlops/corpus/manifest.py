"""The corpus manifest: one row per item to embed, JSONL or Parquet, on local disk or S3.

Each row has an `id` (unique: it is the table's key, and what a resumed run skips) and a `text`,
an `image` (a path or URI), or both (embedded together, as a composed item: the image with the
text as its instruction). Other columns are ignored. A relative image path is taken from the
manifest's folder (or S3 prefix). Every problem is found before any work starts and names the row.
"""

from __future__ import annotations

import json
from pathlib import Path

from slq.mlops.corpus import storage
from slq.mlops.corpus.errors import CorpusError

KINDS = ("text", "image", "multimodal")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _present(value) -> bool:
    """Whether a cell holds something: None, NaN (Parquet/pandas nulls) and blank strings do not."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def _raw_rows(uri: str, options: dict[str, str]) -> list[dict]:
    suffix = Path(uri.split("?", 1)[0]).suffix.lower()
    if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise CorpusError(f"manifest {uri}: unknown format {suffix or '(no suffix)'!r}; give a .jsonl or .parquet "
                          "file with an `id` and a `text` and/or `image` per row")
    try:
        data = storage.read_bytes(uri, options)
    except FileNotFoundError:
        raise CorpusError(f"manifest not found: {uri}") from None
    if suffix in PARQUET_SUFFIXES:
        import io

        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise CorpusError(f"manifest {uri}: not a readable Parquet file ({e})") from None
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"manifest {uri} line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise CorpusError(f"manifest {uri} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_manifest(uri: str | Path, options: dict[str, str] | None = None):
    """The checked manifest as a pyarrow table: id, text, image (absolute path or URI), kind.

    Raises CorpusError naming the row (JSONL line or Parquet row number, and its id) for a missing
    or duplicate id, a row with neither text nor image, or a value that is not a string."""
    import pyarrow as pa

    uri = storage.absolute(uri)
    options = options or {}
    where = "line" if Path(uri).suffix.lower() in JSONL_SUFFIXES else "row"
    base = storage.parent(uri)
    ids, texts, images, kinds = [], [], [], []
    seen: dict[str, int] = {}
    for n, row in enumerate(_raw_rows(uri, options), 1):
        rid = row.get("id")
        if not _present(rid) or not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise CorpusError(f"manifest {uri} {where} {n}: no `id` (got {rid!r}); every row needs a unique "
                              "string id")
        rid = str(rid)
        if rid in seen:
            raise CorpusError(f"manifest {uri}: id {rid!r} appears in {where}s {seen[rid]} and {n}; ids must be "
                              "unique (they are the table's key)")
        seen[rid] = n
        text, image = row.get("text"), row.get("image")
        has_t, has_im = _present(text), _present(image)
        if not (has_t or has_im):
            raise CorpusError(f"manifest {uri} {where} {n}: item {rid!r} has neither `text` nor `image`; give one "
                              "(or both) or remove the row")
        for name, value, has in (("text", text, has_t), ("image", image, has_im)):
            if has and not isinstance(value, str):
                raise CorpusError(f"manifest {uri} {where} {n}: item {rid!r}: `{name}` must be a string, got "
                                  f"{type(value).__name__}")
        ids.append(rid)
        texts.append(text if has_t else None)
        images.append(storage.join(base, image) if has_im else None)
        kinds.append("multimodal" if has_t and has_im else "text" if has_t else "image")
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                     "image": pa.array(images, pa.string()), "kind": pa.array(kinds, pa.string())})


def length_sorted(table):
    """Rows grouped by kind and, within a kind, by text length: batches cut from this order hold
    one kind each and little padding (an item's vector does not depend on its batch)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(table) == 0:
        return table
    lengths = pc.fill_null(pc.utf8_length(table.column("text")), 0)
    kind_rank = pc.index_in(table.column("kind"), value_set=pa.array(KINDS))
    keyed = table.append_column("_kind", kind_rank).append_column("_len", lengths)
    order = pc.sort_indices(keyed, sort_keys=[("_kind", "ascending"), ("_len", "ascending")])
    return table.take(order)

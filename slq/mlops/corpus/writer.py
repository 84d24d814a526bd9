"""Append embedded corpus rows to a Lance table (a LanceDB table) at a local path or s3:// URI.

The table is `<db_uri>/<table>.lance`, the layout LanceDB reads, so `lancedb.connect(db_uri)
.open_table(table)` searches it. Writing is split in two so it can be spread over machines:

- `write_fragments` (any process, e.g. a Ray worker) writes data files and returns their
  fragment metadata as JSON; the data is invisible to readers until committed;
- `CorpusTable.commit` (the driver) adds fragments to the table in ONE Lance commit (an Append):
  a new table version holding all of those rows, or none of them if the process dies first.

`CorpusTable.append` does both for an Arrow table in one process. Why this is safe to resume:
the set of committed ids is exactly the `id` column of the latest version; a run reads it once,
embeds only the others, and `commit` refuses ids already committed. Fragments written but never
committed (a killed run) are unreferenced files that no version reads (Lance's
`cleanup_old_versions` removes them).

Every table belongs to one checkpoint: its schema metadata records the checkpoint hash and the
backbone fingerprint, and opening it with another checkpoint is refused (vectors of two query
banks are not comparable). One writer per table at a time: `commit` fails when another writer
committed in between.
"""

from __future__ import annotations

import json

from slq.mlops.corpus.errors import CorpusError

FORMAT = "slq-corpus/1"
META_FORMAT, META_CKPT, META_BACKBONE = b"slq.format", b"slq.checkpoint_hash", b"slq.backbone_fingerprint"
COLUMNS = ("id", "vector", "text", "image", "kind", "checkpoint_hash", "backbone_fingerprint")


def dataset_uri(db_uri: str, table: str) -> str:
    """The Lance dataset of LanceDB table `table` in the database at `db_uri`."""
    return f"{str(db_uri).rstrip('/')}/{table}.lance"


def corpus_schema(dim: int, checkpoint_hash: str, backbone_fingerprint: str):
    """The table's columns; the metadata names the checkpoint and backbone every vector came from."""
    import pyarrow as pa

    return pa.schema(
        [pa.field("id", pa.string(), nullable=False),
         pa.field("vector", pa.list_(pa.float32(), dim)),
         pa.field("text", pa.string()),
         pa.field("image", pa.string()),
         pa.field("kind", pa.string()),
         pa.field("checkpoint_hash", pa.string()),
         pa.field("backbone_fingerprint", pa.string())],
        metadata={META_FORMAT: FORMAT.encode(), META_CKPT: checkpoint_hash.encode(),
                  META_BACKBONE: backbone_fingerprint.encode()},
    )


def open_dataset(uri: str, storage_options: dict[str, str] | None = None):
    """The Lance dataset at `uri`, or None when there is none."""
    import lance

    try:
        return lance.dataset(uri, storage_options=storage_options or None)
    except (ValueError, OSError, FileNotFoundError) as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None
        raise CorpusError(f"cannot open {uri}: {e} (for s3://, check corpus.storage in params.yaml and the AWS_* "
                          "environment variables)") from None


def write_fragments(uri: str, data, schema, storage_options: dict[str, str] | None = None) -> list[str]:
    """Write `data` (an Arrow table in `schema`) as data files of the dataset at `uri`, uncommitted;
    returns each fragment's metadata as JSON for `CorpusTable.commit`."""
    import lance.fragment

    if len(data) == 0:
        return []
    frags = lance.fragment.write_fragments(data.select(schema.names).cast(schema), uri, schema=schema,
                                           storage_options=storage_options or None)
    return [json.dumps(f.to_json()) for f in frags]


class CorpusTable:
    """One corpus table opened (or created, empty) for appending by this process.

    Refuses a table written with another checkpoint or backbone, or one that is not a corpus table.
    """

    def __init__(self, db_uri: str, table: str, schema, storage_options: dict[str, str] | None = None):
        import lance
        import pyarrow as pa

        self.uri = dataset_uri(db_uri, table)
        self.schema = schema
        self.storage_options = storage_options or {}
        ds = open_dataset(self.uri, self.storage_options)
        if ds is None:
            try:
                ds = lance.write_dataset(pa.Table.from_pylist([], schema=schema), self.uri, schema=schema,
                                         mode="create", storage_options=self.storage_options or None)
            except OSError as e:  # another run created it first: use theirs, checked like any other
                if "already exists" not in str(e):
                    raise
                ds = lance.dataset(self.uri, storage_options=self.storage_options or None)
        self._check(ds.schema)
        self.version = ds.version
        self._committed: set[str] | None = None

    def _check(self, have) -> None:
        meta = have.metadata or {}
        want = self.schema.metadata
        if meta.get(META_FORMAT) != FORMAT.encode():
            raise CorpusError(f"{self.uri} exists but was not written by `slq corpus embed` (no {FORMAT} metadata); "
                              "choose another table name (--table) or database URI")
        if meta.get(META_CKPT) != want[META_CKPT] or meta.get(META_BACKBONE) != want[META_BACKBONE]:
            raise CorpusError(
                f"{self.uri} holds vectors of checkpoint {meta.get(META_CKPT, b'?').decode()} (backbone fingerprint "
                f"{meta.get(META_BACKBONE, b'?').decode()}); this run embeds with checkpoint "
                f"{want[META_CKPT].decode()} (backbone {want[META_BACKBONE].decode()}). Vectors of two checkpoints "
                "are not comparable: write to another table (--table), or delete this one to re-embed the corpus")
        if have.field("vector").type != self.schema.field("vector").type:
            raise CorpusError(f"{self.uri}: its vector column is {have.field('vector').type}, this checkpoint's "
                              f"vectors are {self.schema.field('vector').type}; write to another table (--table)")

    def committed_ids(self) -> set[str]:
        """The ids in the table's latest version (read once; `commit` keeps the set current)."""
        if self._committed is None:
            import lance

            ds = lance.dataset(self.uri, storage_options=self.storage_options or None)
            self.version = ds.version
            self._committed = set(ds.to_table(columns=["id"]).column("id").to_pylist())
        return self._committed

    def commit(self, fragments: list[str], ids: list[str]) -> int:
        """Add written fragments (JSON from `write_fragments`) holding exactly `ids` in one commit;
        returns the new version. Refuses ids already committed and a table another writer moved on."""
        import lance
        from lance.fragment import FragmentMetadata

        committed = self.committed_ids()
        twice = [i for i in ids if i in committed]
        if twice or len(set(ids)) != len(ids):
            raise CorpusError(f"{self.uri}: refusing to commit id(s) {sorted(set(twice))[:5] or 'repeated in one chunk'} "
                              "a second time; each id is written once")
        if not fragments:
            return self.version
        latest = lance.dataset(self.uri, storage_options=self.storage_options or None).version
        if latest != self.version:
            raise CorpusError(f"{self.uri}: another writer committed version {latest} while this run was writing "
                              f"(it expected {self.version}); run one `slq corpus embed` per table at a time. Rerun "
                              "this one: it embeds only the ids not yet committed")
        op = lance.LanceOperation.Append([FragmentMetadata.from_json(f) for f in fragments])
        ds = lance.LanceDataset.commit(self.uri, op, read_version=self.version,
                                       storage_options=self.storage_options or None)
        self.version = ds.version
        committed.update(ids)
        return self.version

    def append(self, data) -> int:
        """Write an Arrow table of rows (columns as `corpus_schema`) and commit it once."""
        ids = data.column("id").to_pylist()
        return self.commit(write_fragments(self.uri, data, self.schema, self.storage_options), ids)


def table_status(db_uri: str, table: str, storage_options: dict[str, str] | None = None) -> dict:
    """Rows, version, items per kind and the checkpoint of a corpus table (`slq corpus status`)."""
    from collections import Counter

    from slq.mlops.corpus.storage import absolute

    uri = dataset_uri(absolute(db_uri), table)
    ds = open_dataset(uri, storage_options)
    if ds is None:
        raise CorpusError(f"no corpus table at {uri}; `slq corpus embed` creates it")
    meta = ds.schema.metadata or {}
    kinds = Counter(ds.to_table(columns=["kind"]).column("kind").to_pylist()) if META_FORMAT in meta else {}
    return {"table": uri, "version": ds.version, "rows": ds.count_rows(), "fragments": len(ds.get_fragments()),
            "kinds": dict(kinds), "checkpoint_hash": meta.get(META_CKPT, b"").decode() or None,
            "backbone_fingerprint": meta.get(META_BACKBONE, b"").decode() or None}

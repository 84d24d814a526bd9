"""Embed a corpus manifest into a Lance/LanceDB table: on Ray Data, or in this process.

    summary = embed_corpus(EmbedJob(manifest="corpus.jsonl", checkpoint="checkpoints/slq",
                                    db_uri="s3://bucket/lancedb", actors=4))

Both engines run the same steps on the same code: the manifest is checked and the ids already in
the table are dropped; the rest is sorted by kind and text length (batches of one kind and little
padding); `CorpusEmbedder` (the model loaded once, through `slq.methods.from_pretrained` on the
checkpoint, as every other consumer loads it) turns a batch into rows; `write_chunk` writes a
chunk of `commit_rows` rows as Lance fragments; the driver commits each chunk once
(`CorpusTable.commit`). The Ray engine runs the embedder in an actor pool (one actor per GPU, or N
CPU actors) and the fragment writes as Ray tasks, so vectors never pass through the driver; only
fragment metadata and ids do.

Resume and write-once: a chunk is in the table entirely (one commit) or not at all. After a kill,
a rerun reads the table's ids, embeds only the others and refuses to commit an id twice, so every
id ends up in the table exactly once and no committed item is embedded again. The unit of lost work
is the chunks in flight at the kill.

A bad item (its image missing or undecodable) does not stop the run: its row is left out, the
other rows are committed, and the run ends with an error naming every such id (at most
`max_errors` of them; past that the run stops). Fix or remove them and rerun: only they are
embedded then.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

from slq.mlops.corpus import storage
from slq.mlops.corpus.errors import CorpusError
from slq.mlops.corpus.manifest import length_sorted, read_manifest
from slq.mlops.corpus.writer import CorpusTable, corpus_schema, write_fragments

ENGINES = ("ray", "local")
# Test hook: after this many commits the driver kills itself with SIGKILL (no cleanup, no flush),
# as a pre-emption or OOM kill would, so the resume path can be tested on the real code.
KILL_AFTER_COMMITS_ENV = "SLQ_CORPUS_KILL_AFTER_COMMITS"
BLOCK_BATCHES = 4  # most batches per Ray input block (one actor task): fewer tasks, yet work for every actor


@dataclass
class EmbedJob:
    """Everything one run needs, as plain values (what the CLI fills from params.yaml and its options)."""

    manifest: str  # JSONL or Parquet: id, text and/or image; a local path or s3:// URI
    checkpoint: str  # a query checkpoint folder (its manifest names the backbone)
    db_uri: str  # the LanceDB database: a local folder or s3://bucket/prefix
    table: str = "corpus"
    engine: str = "ray"  # ray | local (this process)
    address: str | None = None  # a Ray cluster to join; None: RAY_ADDRESS, else a local Ray instance
    actors: int = 1  # embedding actors (Ray); one per GPU on a GPU cluster
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_size: int = 32  # items per model call
    commit_rows: int = 1024  # items per Lance commit: the most a kill can lose per chunk in flight
    max_errors: int = 100  # items that cannot be embedded before the run stops
    backbone: str | None = None  # the backbone folder on the workers; None: the checkpoint's
    dtype: str = "auto"
    device: str = "auto"
    storage_options: dict = field(default_factory=dict)  # storage.storage_options(...)
    progress: bool = True

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise CorpusError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        for name in ("actors", "batch_size", "commit_rows"):
            if int(getattr(self, name)) < 1:
                raise CorpusError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise CorpusError(f"{name} must be a number >= 0 (gpus_per_actor may be null: auto), got {value!r}")
        if not self.cpus_per_actor:
            raise CorpusError("cpus_per_actor must be more than 0")
        if not self.table or "/" in self.table:
            raise CorpusError(f"table name {self.table!r}: give a plain name (no '/')")


def checkpoint_identity(checkpoint: str) -> tuple[str, str, int]:
    """(checkpoint hash, backbone fingerprint, vector width) read from the checkpoint folder, without
    loading a model (the driver of a Ray job may have no GPU or no backbone)."""
    from slq.checkpoint import CheckpointError, checkpoint_hash, read_manifest

    if not os.path.isdir(checkpoint):
        raise CorpusError(f"checkpoint folder not found: {checkpoint}; train one (`slq stage train` writes "
                          "train.out) or pass --checkpoint")
    try:
        manifest = read_manifest(checkpoint)
    except CheckpointError as e:
        raise CorpusError(str(e)) from None
    fingerprint = (manifest.get("backbone") or {}).get("fingerprint") or "unrecorded"
    return checkpoint_hash(checkpoint), fingerprint, int(manifest["hidden_size"])


class CorpusEmbedder:
    """A batch of manifest rows (Arrow) -> rows of the corpus table, plus an `error` column (null,
    or why that item could not be embedded). Loads the encoder once: one per Ray actor."""

    def __init__(self, checkpoint: str, checkpoint_hash: str, backbone: str | None = None, dtype: str = "auto",
                 device: str = "auto", storage_options: dict | None = None, threads: int | None = None):
        from slq.checkpoint import checkpoint_hash as hash_of
        from slq.methods import from_pretrained

        if threads:
            import torch

            torch.set_num_threads(threads)
        have = hash_of(checkpoint)
        if have != checkpoint_hash:
            raise CorpusError(f"checkpoint {checkpoint} here has hash {have}, the run embeds with {checkpoint_hash}: "
                              "every node must see the same checkpoint folder")
        self.encoder = from_pretrained(backbone=backbone, queries=checkpoint, dtype=dtype, device=device)
        self.encoder.eval()
        self.checkpoint_hash = checkpoint_hash
        self.fingerprint = self.encoder.backbone.fingerprint
        self.storage_options = storage_options or {}

    def _image(self, uri: str, item_id: str):
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            data = storage.read_bytes(uri, self.storage_options)
        except (FileNotFoundError, IsADirectoryError):
            raise CorpusError(f"item {item_id!r}: image {uri} not found; fix its path in the manifest or remove "
                              "the row") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise CorpusError(f"item {item_id!r}: image {uri} cannot be decoded ({e}); replace the file or remove "
                              "the row") from None

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        rows = batch.to_pylist()
        enc = self.encoder
        vectors = np.zeros((len(rows), enc.backbone.hidden_size), dtype=np.float32)  # (B, D)
        errors: list[str | None] = [None] * len(rows)
        images = {}
        for i, r in enumerate(rows):
            if r["kind"] != "text":
                try:
                    images[i] = self._image(r["image"], r["id"])
                except CorpusError as e:
                    errors[i] = str(e)
        for kind in ("text", "image", "multimodal"):
            idx = [i for i, r in enumerate(rows) if r["kind"] == kind and errors[i] is None]
            if not idx:
                continue
            bs = len(idx)
            if kind == "text":
                vectors[idx] = enc.encode_text([rows[i]["text"] for i in idx], batch_size=bs, progress=False)
            elif kind == "image":
                vectors[idx] = enc.encode_image([images[i] for i in idx], batch_size=bs, progress=False)
            else:
                vectors[idx] = enc.encode_multimodal([(images[i], rows[i]["text"]) for i in idx], batch_size=bs,
                                                     progress=False)
        n, dim = vectors.shape
        return pa.table({
            "id": [r["id"] for r in rows],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim),
            "text": pa.array([r["text"] for r in rows], pa.string()),
            "image": pa.array([r["image"] for r in rows], pa.string()),
            "kind": [r["kind"] for r in rows],
            "checkpoint_hash": [self.checkpoint_hash] * n,
            "backbone_fingerprint": [self.fingerprint] * n,
            "error": pa.array(errors, pa.string()),
        })


def write_chunk(batch, uri: str, schema, storage_options: dict | None = None):
    """Embedded rows -> one row: the fragments written for the good rows (JSON), their ids, and the
    errors of the others. Runs as a Ray task (or in-process); commits nothing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.is_null(batch.column("error"))
    good, bad = batch.filter(ok), batch.filter(pc.invert(ok))
    strings = pa.list_(pa.string())
    return pa.table({"fragments": pa.array([write_fragments(uri, good, schema, storage_options)], strings),
                     "ids": pa.array([good.column("id").to_pylist()], strings),
                     "errors": pa.array([bad.column("error").to_pylist()], strings)})


class _Committer:
    """The driver's side: commits each written chunk once, counts, shows progress, stops on too
    many bad items."""

    def __init__(self, table: CorpusTable, total: int, job: EmbedJob):
        from slq.progress import bar

        self.table, self.job = table, job
        self.embedded = self.commits = 0
        self.errors: list[str] = []
        self.bar = bar(total, "embedded + committed", show=job.progress)
        kill = os.environ.get(KILL_AFTER_COMMITS_ENV)
        self.kill_after = int(kill) if kill else None

    def __call__(self, written) -> None:
        for frags, ids, errs in zip(*(written.column(c).to_pylist() for c in ("fragments", "ids", "errors"))):
            self.errors.extend(errs)
            if ids:
                self.table.commit(frags, ids)
                self.embedded += len(ids)
                self.commits += 1
                self.bar.update(len(ids))
                if self.kill_after is not None and self.commits >= self.kill_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
            if len(self.errors) > self.job.max_errors:
                raise CorpusError(f"more than {self.job.max_errors} items could not be embedded, stopping; the "
                                  f"first: {'; '.join(self.errors[:5])}")


def embed_corpus(job: EmbedJob) -> dict:
    """Embed the manifest's items not yet in the table, commit them in chunks, and return a summary
    (counts, table version, throughput). Raises CorpusError naming what to fix."""
    import pyarrow as pa
    import pyarrow.compute as pc

    job.check()
    start = time.perf_counter()
    ckpt_hash, fingerprint, dim = checkpoint_identity(job.checkpoint)
    items = read_manifest(job.manifest, job.storage_options)
    schema = corpus_schema(dim, ckpt_hash, fingerprint)
    table = CorpusTable(storage.absolute(job.db_uri), job.table, schema, job.storage_options)
    committed = table.committed_ids()
    before = len(committed)
    known = pc.is_in(items.column("id"), value_set=pa.array(list(committed), pa.string()))
    already = int(pc.sum(known).as_py() or 0)
    pending = length_sorted(items.filter(pc.invert(known)))
    committer = _Committer(table, len(pending), job)
    try:
        if len(pending):
            (_run_ray if job.engine == "ray" else _run_local)(job, pending, table, ckpt_hash, committer)
    finally:
        committer.bar.close()
    seconds = time.perf_counter() - start
    summary = {"table": table.uri, "version": table.version, "engine": job.engine,
               "actors": job.actors if job.engine == "ray" else 0, "manifest_items": len(items),
               "already_committed": already, "embedded": committer.embedded, "commits": committer.commits,
               "failed": len(committer.errors), "rows": len(table.committed_ids()),
               "not_in_manifest": before - already,  # ids committed earlier that the manifest no longer has
               "checkpoint_hash": ckpt_hash, "backbone_fingerprint": fingerprint,
               "seconds": round(seconds, 3), "items_per_s": round(committer.embedded / seconds, 3) if seconds else None}
    if committer.errors:
        shown = "\n  ".join(committer.errors[:20])
        more = f"\n  ... and {len(committer.errors) - 20} more" if len(committer.errors) > 20 else ""
        err = CorpusError(f"{len(committer.errors)} item(s) could not be embedded (the other {committer.embedded} "
                          f"were committed to {table.uri}):\n  {shown}{more}\nFix or remove them and rerun: only the "
                          "ids not in the table are embedded")
        err.summary = summary
        raise err
    return summary


def _run_local(job: EmbedJob, pending, table: CorpusTable, ckpt_hash: str, commit: _Committer) -> None:
    """The in-process engine: the same embedder, chunks and commits as on Ray, one after another."""
    import pyarrow as pa

    embedder = CorpusEmbedder(job.checkpoint, ckpt_hash, job.backbone, job.dtype, job.device, job.storage_options)
    for start in range(0, len(pending), job.commit_rows):
        chunk = pending.slice(start, job.commit_rows)
        rows = pa.concat_tables([embedder(chunk.slice(s, job.batch_size))
                                 for s in range(0, len(chunk), job.batch_size)])
        commit(write_chunk(rows, table.uri, table.schema, job.storage_options))


def _run_ray(job: EmbedJob, pending, table: CorpusTable, ckpt_hash: str, commit: _Committer) -> None:
    """Ray Data: input blocks -> embedding actors -> fragment-writing tasks -> the driver commits."""
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        address = job.address or os.environ.get("RAY_ADDRESS")  # set for the entrypoint of `ray job submit`
        if address:
            ray.init(address=address)
        else:  # the actors' CPUs plus room for the read and write tasks
            ray.init(address="local", num_cpus=math.ceil(job.actors * job.cpus_per_actor) + 2,
                     include_dashboard=False, _node_ip_address="127.0.0.1")  # a local instance: loopback only
        started = True
    try:
        gpus = job.gpus_per_actor
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and job.device != "cpu" else 0
        # whole batches per block, up to BLOCK_BATCHES, and at least two blocks per actor when there are enough
        per_actor = len(pending) // (job.actors * 2 * job.batch_size)
        block = job.batch_size * max(1, min(BLOCK_BATCHES, per_actor))
        ds = ray.data.from_arrow([pending.slice(s, block) for s in range(0, len(pending), block)])
        ds = ds.map_batches(
            CorpusEmbedder, batch_size=job.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"checkpoint": storage.absolute(job.checkpoint), "checkpoint_hash": ckpt_hash,
                                   "backbone": storage.absolute(job.backbone) if job.backbone else None,
                                   "dtype": job.dtype, "device": job.device, "storage_options": job.storage_options,
                                   "threads": max(1, int(job.cpus_per_actor)) if not gpus else None},
            compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=job.cpus_per_actor, num_gpus=gpus)
        ds = ds.map_batches(write_chunk, batch_size=job.commit_rows, batch_format="pyarrow",
                            fn_kwargs={"uri": table.uri, "schema": table.schema,
                                       "storage_options": job.storage_options})
        try:
            for written in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                commit(written)
        except CorpusError:
            raise
        except Exception as e:  # a worker's error arrives wrapped in Ray's; say it in one line
            raise _unwrap(e) from e
    finally:
        if started:
            ray.shutdown()


_USER_ERRORS = ("CorpusError", "CheckpointError", "BackboneError", "InputError", "FileNotFoundError")


def _unwrap(e: Exception) -> Exception:
    """A Ray error whose cause is one of the user's errors (say a backbone folder missing on a node)
    -> CorpusError with that message; anything else unchanged."""
    text = str(e)
    found = max((m for name in _USER_ERRORS for m in re.finditer(rf"(?m)^\s*(?:\w+\.)*{name}: ", text)),
                key=lambda m: m.start(), default=None)
    if found is None:
        return e
    return CorpusError(f"in a Ray worker: {text[found.end():].strip()}")


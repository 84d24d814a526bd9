"""Embed a corpus manifest into Lance/LanceDB tables: on Ray Data, or in this process.

    summary = embed_corpus(EmbedJob(manifest="corpus.jsonl", checkpoint="checkpoints/slq",
                                    db_uri="s3://bucket/lancedb", actors=4))
    # several query banks on one backbone, every bank's vector from one pass over the corpus:
    summary = embed_corpus(EmbedJob(manifest="corpus.jsonl", db_uri="s3://bucket/lancedb",
                                    banks={"captions": "ckpt/a", "knowledge": "ckpt/b"}))

One checkpoint writes one table (`table`). With `banks`, every bank writes its own table in the
same LanceDB database (`<table>_<bank>`), and the model runs once per item for all of them:
`slq.banks.MultiBankEncoder` runs the prompt once and every bank's queries in one forward, so K
banks cost one pass over the corpus (docs/banks.md). The banks must share one backbone (content
fingerprint), as a service carrying several banks does.

Both engines run the same steps on the same code: the manifest is checked and the ids already in
the table are dropped; the rest is sorted by kind and text length (batches of one kind and little
padding); `CorpusEmbedder` (the model loaded once, through `slq.methods.from_pretrained` on the
checkpoint, as every other consumer loads it) turns a batch into rows; `write_chunk` writes a
chunk of `commit_rows` rows as Lance fragments; the driver commits each chunk once
(`CorpusTable.commit`). The Ray engine runs the embedder in an actor pool (one actor per GPU, or N
CPU actors) and the fragment writes as Ray tasks, so vectors never pass through the driver; only
fragment metadata and ids do.

Resume and write-once: a chunk is in a table entirely (one commit) or not at all. After a kill,
a rerun reads each table's ids, embeds only the items some table lacks, with the banks that lack
them, and refuses to commit an id twice, so every id ends up in every table exactly once and no
committed vector is computed again. The unit of lost work is the chunks in flight at the kill.

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
TABLE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # what LanceDB accepts as a table name
BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as slq.banks.BANK_NAME (without importing torch)


@dataclass
class EmbedJob:
    """Everything one run needs, as plain values (what the CLI fills from params.yaml and its options)."""

    manifest: str  # JSONL or Parquet: id, text and/or image; a local path or s3:// URI
    checkpoint: str | None  # a query checkpoint folder (its manifest names the backbone); None with `banks`
    db_uri: str  # the LanceDB database: a local folder or s3://bucket/prefix
    table: str = "corpus"  # the table; with `banks`, the prefix of each bank's table (<table>_<bank>)
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
    banks: dict[str, str] = field(default_factory=dict)  # {bank name: checkpoint}: one pass, a table per bank

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
        if not self.table or not TABLE_NAME.match(self.table):
            raise CorpusError(f"table name {self.table!r}: give a plain name (letters, digits, '_', '-', '.'; "
                              "no '/')")
        if self.banks and self.checkpoint:
            raise CorpusError("give --checkpoint or --bank, not both: with --bank, name every bank (e.g. --bank "
                              f"default={self.checkpoint})")
        if not self.banks and not self.checkpoint:
            raise CorpusError("no checkpoint: give --checkpoint (or corpus.checkpoint / train.out) or --bank NAME=CKPT")
        for name in self.banks:
            if not isinstance(name, str) or not BANK_NAME.match(name):
                raise CorpusError(f"bank name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                                  "letter or digit")


@dataclass(frozen=True)
class Target:
    """One bank and the table its vectors go to."""

    bank: str | None  # None: the job's single checkpoint
    checkpoint: str
    checkpoint_hash: str
    fingerprint: str
    dim: int
    table: str

    @property
    def label(self) -> str:
        return f"bank {self.bank!r} ({self.checkpoint})" if self.bank else f"checkpoint {self.checkpoint}"


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


def bank_table(table: str, bank: str) -> str:
    """The table of bank `bank` in a run whose table (prefix) is `table`."""
    return f"{table}_{bank}"


def job_targets(job: EmbedJob) -> list[Target]:
    """The job's tables: its checkpoint's, or one per bank; banks must share one backbone."""
    if not job.banks:
        return [Target(None, job.checkpoint, *checkpoint_identity(job.checkpoint), job.table)]
    out = []
    for name, ckpt in job.banks.items():
        try:
            identity = checkpoint_identity(ckpt)
        except CorpusError as e:
            raise CorpusError(f"bank {name!r}: {e}") from None
        out.append(Target(name, ckpt, *identity, bank_table(job.table, name)))
    first = out[0]
    for t in out[1:]:
        if (t.fingerprint, t.dim) != (first.fingerprint, first.dim):
            raise CorpusError(f"{t.label} was trained on backbone {t.fingerprint} (width {t.dim}), {first.label} on "
                              f"{first.fingerprint} (width {first.dim}): banks embedded in one pass share one backbone. "
                              "Embed them in separate runs")
    return out


class CorpusEmbedder:
    """A batch of manifest rows (Arrow, with `targets`: the tables each item still needs) -> the rows
    plus a `vector:<table>` column per target and an `error` column (null, or why that item could not
    be embedded). Loads the model once (one per Ray actor): the checkpoint's encoder for one
    target, a MultiBankEncoder holding every bank for several."""

    def __init__(self, targets: list[Target], backbone: str | None = None, dtype: str = "auto",
                 device: str = "auto", storage_options: dict | None = None, threads: int | None = None):
        from slq.checkpoint import checkpoint_hash as hash_of

        if threads:
            import torch

            torch.set_num_threads(threads)
        for t in targets:
            have = hash_of(t.checkpoint)
            if have != t.checkpoint_hash:
                raise CorpusError(f"{t.label} here has hash {have}, the run embeds with {t.checkpoint_hash}: every "
                                  "node must see the same checkpoint folder")
        self.targets = {t.table: t for t in targets}
        if len(targets) == 1 and targets[0].bank is None:
            from slq.methods import from_pretrained

            self.encoder = from_pretrained(backbone=backbone, queries=targets[0].checkpoint, dtype=dtype,
                                           device=device)
        else:
            from slq.banks import BankError, MultiBankEncoder

            try:
                self.encoder = MultiBankEncoder.from_pretrained({t.bank: t.checkpoint for t in targets},
                                                                backbone=backbone, dtype=dtype, device=device)
            except BankError as e:
                raise CorpusError(str(e)) from None
        self.encoder.eval()
        self.dim = self.encoder.backbone.hidden_size
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

    def _encode(self, kind: str, items: list, tables: tuple[str, ...]) -> dict:
        """{table: (N, D)} for `tables`, all from one pass over `items`."""
        method = getattr(self.encoder, f"encode_{kind}")
        if self.targets[tables[0]].bank is None:  # the single checkpoint's own encoder
            return {tables[0]: method(items, batch_size=len(items), progress=False)}
        out = method(items, banks=[self.targets[t].bank for t in tables], batch_size=len(items), progress=False)
        return {t: out[self.targets[t].bank] for t in tables}

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        rows = batch.to_pylist()
        vectors = {t: np.zeros((len(rows), self.dim), dtype=np.float32) for t in self.targets}  # (B, D) each
        errors: list[str | None] = [None] * len(rows)
        images = {}
        for i, r in enumerate(rows):
            if r["kind"] != "text":
                try:
                    images[i] = self._image(r["image"], r["id"])
                except CorpusError as e:
                    errors[i] = str(e)
        for kind in ("text", "image", "multimodal"):
            groups: dict[tuple[str, ...], list[int]] = {}  # the tables an item needs -> its rows: one pass each
            for i, r in enumerate(rows):
                if r["kind"] == kind and errors[i] is None:
                    groups.setdefault(tuple(r["targets"]), []).append(i)
            for tables, idx in groups.items():
                if kind == "text":
                    items = [rows[i]["text"] for i in idx]
                elif kind == "image":
                    items = [images[i] for i in idx]
                else:
                    items = [(images[i], rows[i]["text"]) for i in idx]
                for t, v in self._encode(kind, items, tables).items():
                    vectors[t][idx] = v
        columns = {c: batch.column(c) for c in ("id", "text", "image", "kind", "targets")}
        columns["error"] = pa.array(errors, pa.string())
        for t, v in vectors.items():
            columns[f"vector:{t}"] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float32()), self.dim)
        return pa.table(columns)


def write_chunk(batch, tables: list[tuple[str, str, object]], storage_options: dict | None = None):
    """Embedded rows -> a row per table (table name, uri, schema): the fragments written for the good
    rows that table still needs (JSON) and their ids; the errors of the bad rows go in the first row.
    Runs as a Ray task (or in-process); commits nothing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from slq.mlops.corpus.writer import META_BACKBONE, META_CKPT

    ok = pc.is_null(batch.column("error"))
    good_needs = [want if g else () for g, want in zip(ok.to_pylist(), batch.column("targets").to_pylist())]
    out = {"table": [], "fragments": [], "ids": [], "errors": []}
    for n, (name, uri, schema) in enumerate(tables):
        mask = pa.array([name in want for want in good_needs])
        good = batch.filter(mask)
        meta = schema.metadata
        rows = pa.table({
            "id": good.column("id"), "vector": good.column(f"vector:{name}"), "text": good.column("text"),
            "image": good.column("image"), "kind": good.column("kind"),
            "checkpoint_hash": pa.array([meta[META_CKPT].decode()] * len(good), pa.string()),
            "backbone_fingerprint": pa.array([meta[META_BACKBONE].decode()] * len(good), pa.string())})
        out["table"].append(name)
        out["fragments"].append(write_fragments(uri, rows, schema, storage_options))
        out["ids"].append(good.column("id").to_pylist())
        out["errors"].append(batch.filter(pc.invert(ok)).column("error").to_pylist() if n == 0 else [])
    strings = pa.list_(pa.string())
    return pa.table({"table": pa.array(out["table"], pa.string()), "fragments": pa.array(out["fragments"], strings),
                     "ids": pa.array(out["ids"], strings), "errors": pa.array(out["errors"], strings)})


class _Committer:
    """The driver's side: commits each written chunk once per table, counts, shows progress, stops on
    too many bad items."""

    def __init__(self, tables: dict[str, CorpusTable], total: int, job: EmbedJob):
        from slq.progress import bar

        self.tables, self.job = tables, job
        self.commits = 0
        self.written = {name: 0 for name in tables}
        self.done: set[str] = set()  # ids committed to some table in this run
        self.errors: list[str] = []
        self.bar = bar(total, "embedded + committed", show=job.progress)
        kill = os.environ.get(KILL_AFTER_COMMITS_ENV)
        self.kill_after = int(kill) if kill else None

    @property
    def embedded(self) -> int:
        return len(self.done)

    def __call__(self, written) -> None:
        for name, frags, ids, errs in zip(*(written.column(c).to_pylist()
                                            for c in ("table", "fragments", "ids", "errors"))):
            self.errors.extend(errs)
            if ids:
                self.tables[name].commit(frags, ids)
                self.written[name] += len(ids)
                self.commits += 1
                new = set(ids) - self.done
                self.done |= new
                self.bar.update(len(new))
                if self.kill_after is not None and self.commits >= self.kill_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
            if len(self.errors) > self.job.max_errors:
                raise CorpusError(f"more than {self.job.max_errors} items could not be embedded, stopping; the "
                                  f"first: {'; '.join(self.errors[:5])}")


def embed_corpus(job: EmbedJob) -> dict:
    """Embed the manifest's items not yet in every table, commit them in chunks, and return a summary
    (counts, table versions, throughput). Raises CorpusError naming what to fix."""
    import pyarrow as pa

    job.check()
    start = time.perf_counter()
    targets = job_targets(job)
    items = read_manifest(job.manifest, job.storage_options)
    db = storage.absolute(job.db_uri)
    tables = {t.table: CorpusTable(db, t.table, corpus_schema(t.dim, t.checkpoint_hash, t.fingerprint),
                                   job.storage_options) for t in targets}
    ids = items.column("id").to_pylist()
    committed = {name: tbl.committed_ids() for name, tbl in tables.items()}
    needs = [[name for name in tables if i not in committed[name]] for i in ids]
    # per table, before the run: manifest ids it has, and ids it has that the manifest no longer lists
    already = {name: len(ids) - sum(name in n for n in needs) for name in tables}
    stale = {name: len(committed[name]) - already[name] for name in tables}
    keep = pa.array([bool(n) for n in needs])
    pending = items.append_column("targets", pa.array(needs, pa.list_(pa.string()))).filter(keep)
    pending = length_sorted(pending)
    committer = _Committer(tables, len(pending), job)
    try:
        if len(pending):
            (_run_ray if job.engine == "ray" else _run_local)(job, pending, tables, targets, committer)
    finally:
        committer.bar.close()
    seconds = time.perf_counter() - start

    def table_summary(t: Target) -> dict:
        tbl = tables[t.table]
        return {"table": tbl.uri, "version": tbl.version, "already_committed": already[t.table],
                "embedded": committer.written[t.table], "rows": len(tbl.committed_ids()),
                "not_in_manifest": stale[t.table], "checkpoint_hash": t.checkpoint_hash}

    common = {"engine": job.engine, "actors": job.actors if job.engine == "ray" else 0, "manifest_items": len(items)}
    if job.banks:
        summary = {"table": db, **common, "already_committed": len(items) - len(pending),
                   "embedded": committer.embedded, "commits": committer.commits, "failed": len(committer.errors),
                   "backbone_fingerprint": targets[0].fingerprint,
                   "banks": {t.bank: table_summary(t) for t in targets}}
    else:
        one = table_summary(targets[0])
        summary = {"table": one["table"], "version": one["version"], **common,
                   "already_committed": one["already_committed"], "embedded": committer.embedded,
                   "commits": committer.commits, "failed": len(committer.errors), "rows": one["rows"],
                   "not_in_manifest": one["not_in_manifest"], "checkpoint_hash": one["checkpoint_hash"],
                   "backbone_fingerprint": targets[0].fingerprint}
    summary.update({"seconds": round(seconds, 3),
                    "items_per_s": round(committer.embedded / seconds, 3) if seconds else None})
    if committer.errors:
        shown = "\n  ".join(committer.errors[:20])
        more = f"\n  ... and {len(committer.errors) - 20} more" if len(committer.errors) > 20 else ""
        where = db if job.banks else next(iter(tables.values())).uri
        err = CorpusError(f"{len(committer.errors)} item(s) could not be embedded (the other {committer.embedded} "
                          f"were committed to {where}):\n  {shown}{more}\nFix or remove them and rerun: only the "
                          "ids not in the table are embedded")
        err.summary = summary
        raise err
    return summary


def _table_specs(tables: dict[str, CorpusTable]) -> list[tuple[str, str, object]]:
    return [(name, tbl.uri, tbl.schema) for name, tbl in tables.items()]


def _run_local(job: EmbedJob, pending, tables: dict[str, CorpusTable], targets: list[Target],
               commit: _Committer) -> None:
    """The in-process engine: the same embedder, chunks and commits as on Ray, one after another."""
    import pyarrow as pa

    embedder = CorpusEmbedder(targets, job.backbone, job.dtype, job.device, job.storage_options)
    specs = _table_specs(tables)
    for start in range(0, len(pending), job.commit_rows):
        chunk = pending.slice(start, job.commit_rows)
        rows = pa.concat_tables([embedder(chunk.slice(s, job.batch_size))
                                 for s in range(0, len(chunk), job.batch_size)])
        commit(write_chunk(rows, specs, job.storage_options))


def _run_ray(job: EmbedJob, pending, tables: dict[str, CorpusTable], targets: list[Target],
             commit: _Committer) -> None:
    """Ray Data: input blocks -> embedding actors -> fragment-writing tasks -> the driver commits."""
    import dataclasses

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
        on_workers = [dataclasses.replace(t, checkpoint=storage.absolute(t.checkpoint)) for t in targets]
        ds = ds.map_batches(
            CorpusEmbedder, batch_size=job.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"targets": on_workers,
                                   "backbone": storage.absolute(job.backbone) if job.backbone else None,
                                   "dtype": job.dtype, "device": job.device, "storage_options": job.storage_options,
                                   "threads": max(1, int(job.cpus_per_actor)) if not gpus else None},
            compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=job.cpus_per_actor, num_gpus=gpus)
        ds = ds.map_batches(write_chunk, batch_size=job.commit_rows, batch_format="pyarrow",
                            fn_kwargs={"tables": _table_specs(tables), "storage_options": job.storage_options})
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


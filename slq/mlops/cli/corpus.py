"""`slq corpus`: embed a large corpus into LanceDB (Ray Data or in-process, local or S3 storage),
resumably, and the status of a corpus table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import JsonOpt, ParamsOpt, SetOpt, config, print_json, print_table, user_errors

app = typer.Typer(help="Embed a large corpus into LanceDB: Ray Data or in-process, local or S3 storage.",
                  no_args_is_help=True)


@app.command("embed")
@user_errors
def corpus_embed(
        manifest: str = typer.Argument(..., help="JSONL or Parquet with `id` and `text` and/or `image` (path or URI) "
                                                  "per row; a local path or s3:// URI."),
        checkpoint: Optional[Path] = typer.Option(None, help="Query checkpoint folder (default: corpus.checkpoint, "
                                                             "else train.out); on a cluster, at this path on every node."),
        uri: Optional[str] = typer.Option(None, "--uri", help="LanceDB database: a folder or s3://bucket/prefix "
                                                            "(default: corpus.uri)."),
        table: Optional[str] = typer.Option(None, help="Table name (default: corpus.table)."),
        engine: Optional[str] = typer.Option(None, help="ray (Ray Data actor pool) | local (this process); "
                                                        "default: corpus.engine."),
        no_ray: bool = typer.Option(False, "--no-ray", help="Embed in this process (= --engine local)."),
        address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: corpus.address; none: a local "
                                                         "Ray instance)."),
        actors: Optional[int] = typer.Option(None, help="Embedding actors: one per GPU, or N CPU actors."),
        batch_size: Optional[int] = typer.Option(None, help="Items per model call."),
        commit_rows: Optional[int] = typer.Option(None, help="Items per Lance commit (what a kill can lose)."),
        cpus_per_actor: Optional[float] = typer.Option(None, help="CPUs per actor (its torch threads on CPU)."),
        gpus_per_actor: Optional[float] = typer.Option(None, help="GPUs per actor (default: 1 on a GPU cluster)."),
        backbone: Optional[str] = typer.Option(None, help="Backbone folder on the workers (default: the one the "
                                                           "checkpoint records)."),
        bank: Optional[list[str]] = typer.Option(None, "--bank", help="NAME=CKPT, repeatable: query banks on one "
                                                 "backbone, every bank's vector from one pass over the corpus, each "
                                                 "bank in its own table <table>_<NAME> of the same database."),
        progress: bool = typer.Option(True, help="Progress bars."),
        params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Embed a corpus into a LanceDB table, resumably: a rerun embeds only the ids not yet committed.

    slq corpus embed corpus.jsonl --checkpoint checkpoints/slq --uri s3://bucket/lancedb --actors 4

    slq corpus embed corpus.jsonl --bank default=checkpoints/slq --bank q16=checkpoints/banks/q16
    (tables corpus_default and corpus_q16, one pass over the corpus for both)
    """
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus
    from slq.mlops.corpus.storage import is_remote, storage_options

    cfg = config(params, set_)
    c = cfg.corpus
    banks = _banks(bank, cfg)
    ckpt = checkpoint if banks else checkpoint or cfg.path(c.checkpoint or cfg.train.out)  # both given: refused
    db_uri = uri or (c.uri if is_remote(c.uri) else str(cfg.path(c.uri)))
    job = EmbedJob(
        manifest=manifest, checkpoint=str(ckpt) if ckpt else None, banks=banks, db_uri=db_uri, table=table or c.table,
        engine="local" if no_ray else (engine or c.engine), address=address or c.address,
        actors=actors or c.actors, cpus_per_actor=cpus_per_actor or c.cpus_per_actor,
        gpus_per_actor=gpus_per_actor if gpus_per_actor is not None else c.gpus_per_actor,
        batch_size=batch_size or c.batch_size, commit_rows=commit_rows or c.commit_rows, max_errors=c.max_errors,
        backbone=backbone, dtype=cfg.backbone.dtype, device=cfg.backbone.device,
        storage_options=storage_options(c.storage.endpoint, c.storage.region), progress=progress and not as_json)
    _show("corpus embed -> {}", embed_corpus(job), as_json)


@app.command("status")
@user_errors
def corpus_status(uri: Optional[str] = typer.Option(None, "--uri", help="LanceDB database (default: corpus.uri)."),
                  table: Optional[str] = typer.Option(None, help="Table name (default: corpus.table)."),
                  bank: Optional[list[str]] = typer.Option(None, "--bank", help="NAME, repeatable: the table of that "
                                                           "bank (<table>_<NAME>), as `corpus embed --bank` wrote it."),
                  params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Rows, version and checkpoint of a corpus table (or of each bank's table)."""
    from slq.mlops.corpus.embed import bank_table
    from slq.mlops.corpus.storage import is_remote, storage_options
    from slq.mlops.corpus.writer import table_status

    cfg = config(params, set_)
    c = cfg.corpus
    db_uri = uri or (c.uri if is_remote(c.uri) else str(cfg.path(c.uri)))
    options = storage_options(c.storage.endpoint, c.storage.region)
    name = table or c.table
    if not bank:
        _show("corpus table {}", table_status(db_uri, name, options), as_json)
        return
    records = {b: table_status(db_uri, bank_table(name, b), options) for b in dict.fromkeys(bank)}
    if as_json:
        print_json(records)
    else:
        for record in records.values():
            _show("corpus table {}", record, False)


def _banks(items: Optional[list[str]], cfg) -> dict[str, str]:
    """--bank NAME=CKPT items -> {name: checkpoint folder} (relative paths from the params' root)."""
    from slq.mlops.bank_set import parse_pairs
    from slq.mlops.corpus import CorpusError

    try:
        pairs = parse_pairs(items, "--bank")
    except ValueError as e:
        raise CorpusError(str(e)) from None
    return {name: str(cfg.path(path)) for name, path in pairs.items()}


def _show(title: str, record: dict, as_json: bool) -> None:
    """A summary as JSON, or as a two-column table titled with its table URI (a bank's own record as
    `banks.<name>.<key>` rows)."""
    if as_json:
        print_json(record)
        return
    rows = []
    for k, v in record.items():
        if k == "banks":  # {bank: its table's record}
            rows += [{"": f"{k}.{bank}.{kk}", "value": vv} for bank, sub in v.items() for kk, vv in sub.items()]
        else:
            rows.append({"": k, "value": v})
    print_table(title.format(record["table"]), rows, ["", "value"], keep=("value",))

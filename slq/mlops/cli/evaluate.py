"""`slq evaluate` (a checkpoint on registered benchmarks) and `slq metrics` (the latest metrics
files), and how metrics are shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from slq.mlops.cli.common import JsonOpt, ParamsOpt, SetOpt, config, console, fail, print_json, print_table, \
    user_errors


def _numbers(d: dict, prefix: str = "") -> dict:
    """The numbers (and flags) of a metrics dict, nested dicts flattened as a.b; text left out."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def show_metrics(metrics: dict, title: str = "retrieval metrics"):
    rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float))]
    print_table(title, rows, ["metric", "value"])


def _side_by_side(title: str, columns: dict[str, dict]):
    """One row per metric, one column per source (a benchmark, a run); blank where it has none."""
    keys = list(dict.fromkeys(k for m in columns.values() for k in m))
    rows = [{"metric": k, **{name: m.get(k) for name, m in columns.items()}} for k in keys]
    print_table(title, rows, ["metric", *columns], keep=("metric",))


def show_evaluation(ev: dict, source: str, split: str, reports: dict | None = None):
    """The evaluate stage's metrics: its split, every benchmark of its report side by side, the
    modality gap; `reports`: benchmark files in the report folder that eval.json does not hold."""
    show_metrics({k: v for k, v in ev.items() if k not in ("benchmarks", "modality_gap")},
                 f"evaluate: {split} split")
    benches = {name: _numbers(m) for name, m in (ev.get("benchmarks") or {}).items() if isinstance(m, dict)}
    benches.update({f"{name} (report file)": _numbers(m) for name, m in (reports or {}).items()})
    if benches:
        _side_by_side(f"benchmarks ({source})", benches)
    if isinstance(ev.get("modality_gap"), dict):
        show_metrics(_numbers(ev["modality_gap"]), "modality gap")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e}); rerun the stage that writes it")


@user_errors
def evaluate(benchmark: Optional[list[str]] = typer.Option(
                 None, "--benchmark", "-b", help="NAME or NAME=ROOT (repeatable); default: evaluate.benchmarks"),
             checkpoint: Optional[Path] = typer.Option(None, help="A query checkpoint folder (default: train.out); "
                                                       "its manifest names the backbone."),
             partial: bool = typer.Option(False, help="Run on the present part of a partial dataset (flagged)."),
             mteb_tasks: Optional[list[str]] = typer.Option(
                 None, "--mteb", help="An MTEB / MIEB task name (repeatable), e.g. Flickr30kT2IRetrieval: run with "
                 "mteb on data already in the local Hugging Face cache (nothing is downloaded)."),
             params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt):
    """Evaluate a checkpoint on registered benchmarks; writes the report to evaluate.report_dir.

    slq evaluate --checkpoint ckpt/ -b coco=/data/coco -b cirr=/data/cirr
    slq evaluate --checkpoint ckpt/ --mteb Flickr30kT2IRetrieval
    """
    cfg = config(params, set_)
    if mteb_tasks:
        return _evaluate_mteb(cfg, mteb_tasks, checkpoint)
    from slq.benchmarks import DataError, MissingData
    from slq.methods import from_pretrained
    from slq.mlops.evaluation import run_benchmarks

    ckpt = Path(checkpoint) if checkpoint else cfg.path(cfg.train.out)
    if benchmark:
        cfg.evaluate.benchmarks = [
            {"name": b.split("=", 1)[0], **({"root": b.split("=", 1)[1]} if "=" in b else {}), "partial": partial}
            for b in benchmark]
    if not cfg.evaluate.benchmarks:
        fail("no benchmark given: use -b NAME=ROOT or list them under evaluate.benchmarks in params.yaml")
    cfg.train.out = str(ckpt)
    try:
        enc = from_pretrained(queries=ckpt, dtype=cfg.backbone.dtype, device=cfg.backbone.device)
        metrics, _ = run_benchmarks(cfg, encoder=enc, with_gap=False)
    except (MissingData, DataError, ValueError) as e:
        fail(str(e))
    for name, m in metrics.items():
        show_metrics(m, name)
    console().print(f"report: {cfg.path(cfg.evaluate.report_dir) / 'benchmarks.md'}")


def _evaluate_mteb(cfg, names: list[str], checkpoint: Optional[Path]):
    """`slq evaluate --mteb`: named MTEB / MIEB tasks, offline, on the local Hugging Face cache."""
    import os

    # offline before huggingface_hub / datasets are imported: a task not in the cache fails, never downloads
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import mteb
    except ImportError:
        fail('--mteb needs mteb: pip install "mteb>=2,<3"')
    import datasets.config
    import huggingface_hub.constants as hub

    hub.HF_HUB_OFFLINE = True  # in case huggingface_hub was imported before the variable was set
    datasets.config.HF_HUB_OFFLINE = True
    try:
        tasks = list(mteb.get_tasks(tasks=names))
    except Exception as e:  # an unknown name: mteb says which
        fail(f"--mteb: {e}")
    known = {t.metadata.name for t in tasks}
    if missing := [n for n in names if n not in known]:
        fail(f"--mteb: unknown MTEB task(s): {', '.join(missing)}")
    where = f"Hugging Face datasets cache {datasets.config.HF_DATASETS_CACHE} and hub cache {hub.HF_HUB_CACHE}"
    for task in tasks:
        try:
            task.load_data()
        except Exception as e:  # not in the cache (offline), or unreadable there
            fail(f"MTEB task {task.metadata.name}: dataset {task.metadata.dataset.get('path')} "
                 f"(revision {task.metadata.dataset.get('revision')}) is not in the {where} "
                 f"({type(e).__name__}); download it with network access first (e.g. mteb.get_task("
                 f"{task.metadata.name!r}).load_data() without HF_HUB_OFFLINE)")
    from slq.methods import from_pretrained
    from slq.mteb import SLQMtebEncoder

    ckpt = Path(checkpoint) if checkpoint else cfg.path(cfg.train.out)
    enc = from_pretrained(queries=ckpt, dtype=cfg.backbone.dtype, device=cfg.backbone.device)
    model = SLQMtebEncoder(enc, name=f"slq/{ckpt.name}")
    result = mteb.evaluate(model, tasks, cache=None, co2_tracker=False, show_progress_bar=False)
    for tr in result.task_results:
        for split, subsets in tr.scores.items():
            for sc in subsets:
                show_metrics({k: v for k, v in sc.items() if isinstance(v, (int, float)) and not k.startswith("nauc")},
                             f"mteb {tr.task_name} ({split}, {sc.get('hf_subset', 'default')})")


@user_errors
def metrics(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Show the latest metrics: the evaluate stage's split, every benchmark of its report, and training."""
    cfg = config(params, set_)
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
        fail(f"no metrics yet at {ev_path} or {tr_path}: run `slq run` or `dvc repro` first")
    if as_json:
        print_json(out)
        return
    if "evaluate" in out or reports:
        show_evaluation(out.get("evaluate") or {}, cfg.evaluate.metrics, cfg.evaluate.split, reports)
    if "train" in out:
        show_metrics(out["train"], "train")

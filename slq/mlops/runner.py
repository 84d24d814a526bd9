"""The pipeline's stages in data order, and the one function every entry point calls.

    data -> validate -> pretrain -> train -> embed -> index -> evaluate -> methods -> compare -> register

(pretrain makes the built-in backbone; methods and compare put SLQ beside zero-shot, LoRA and
full fine-tuning.)

dvc.yaml (`python cli.py stage <name>`), the Prefect flow (flows/pipeline.py) and the CLI
(`slq run`, `slq stage <name>`) all go through `run_stage`; nothing is written twice.

A stage that fails changes nothing it does not own and leaves what it owns as it was: its outputs
(`stage_outputs`, the paths dvc.yaml lists for it) are put back however far it got (slq.io.Snapshot;
the methods stage does so per method, keeping the methods that finished), and it opens no MLflow
run, nor a store, before it has something to record (slq.mlops.tracking.stage_run).
"""

from __future__ import annotations

import json
from pathlib import Path

from slq.mlops.config import Config
from slq.threads import apply_thread_defaults

apply_thread_defaults()  # before a stage loads torch: threads that share the machine (slq/threads.py)

STAGES = ("validate", "pretrain", "train", "embed", "index", "evaluate", "methods", "compare", "register")


def run_stage(name: str, cfg: Config, method: str | None = None) -> dict:
    """Run one stage by name; returns its summary (metrics, paths). `method`: the methods stage's
    one method (dvc.yaml runs one per stage); default every method in methods.compare."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if method is not None and name != "methods":
        raise ValueError(f"--method applies to the methods stage only, not {name!r}")
    import importlib

    from slq.mlops import tracking

    module = importlib.import_module(f"slq.mlops.stages.{name}")
    track = cfg.register.track_stages
    with _stage_group(module):
        if hasattr(module, "precheck"):  # bad settings fail before the MLflow run opens, on every rank
            from slq.distributed import check_on_every_rank  # (under torchrun the ranks agree on it)

            check_on_every_rank(lambda: module.precheck(cfg), f"stage {name}'s checks")
        with tracking.stage_run(cfg, name) if track else _no_run() as run, _kept_on_failure(name, cfg):
            result = module.run(cfg, method) if name == "methods" else module.run(cfg)
            if run is not None and name != "register":  # register logs its own run in full
                tracking.log_summary(result)
    if track and name == "register":
        tracking.finish_parent(cfg)  # the last stage: the pipeline's MLflow run is complete
    return result


def _stage_group(module):
    """Under torchrun, the process group of a stage with checks (`precheck`): joined once, for the
    checks and the stage alike (a torch stage's own `distributed_from_env` then leaves it alone),
    because a gloo group torn down and made again at once can miss its peers. Elsewhere nothing."""
    if not hasattr(module, "precheck"):
        return _no_run()
    from slq.distributed import distributed_from_env

    return distributed_from_env()


def _no_run():
    import contextlib

    return contextlib.nullcontext(None)


def stage_outputs(name: str, cfg: Config) -> list[Path]:
    """The files and folders stage `name` writes (dvc.yaml's outs, metrics and plots of the stage).
    The methods stage's are per method (slq.mlops.stages.methods.method_outputs)."""
    p = cfg.path
    report = p(cfg.validate.report)
    outs = {
        "validate": [report, report.with_suffix(".html"), cfg.validate.data_docs],
        "pretrain": [cfg.pretrain.out, cfg.pretrain.metrics, cfg.pretrain.history, cfg.pretrain.knowledge],
        "train": [cfg.train.out, cfg.train.metrics, cfg.train.history],
        "embed": [cfg.embed.out],
        "index": [cfg.index.uri, cfg.index.out, cfg.index.metrics],
        "evaluate": [cfg.evaluate.metrics, cfg.evaluate.plots, cfg.evaluate.report_dir],
        "methods": [],
        "compare": [cfg.methods.report, cfg.methods.summary, cfg.methods.html, cfg.methods.readme],
        "register": [cfg.register.out],
    }[name]
    return [p(x) for x in outs if x]


def _kept_on_failure(name: str, cfg: Config):
    """The stage's outputs put back as they were if it raises (on rank 0 of a torchrun job, which
    alone writes them)."""
    import contextlib
    import os

    from slq.io import restored_on_failure

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return restored_on_failure(stage_outputs(name, cfg))


def prepare(params: str | Path, overrides: dict | None = None, log=print) -> tuple[Config, bool]:
    """The config of a whole-pipeline run (the Prefect flow, `slq run`), and whether DVC keeps its
    books: in a DVC project run on its own params.yaml, overrides are first written into
    params.yaml (comments kept), as `dvc exp run -S` does, so dvc.lock describes what ran."""
    from slq.mlops import lineage
    from slq.mlops.config import load_config

    cfg = load_config(params, overrides or {})  # checks the file and every override before writing
    root = lineage.dvc_root(cfg)
    if overrides and root is not None and Path(params).resolve() == root / "params.yaml":
        lineage.apply_overrides(Path(params), overrides)
        log(f"params.yaml updated with {', '.join(f'{k}={v!r}' for k, v in overrides.items())} (as `dvc exp run -S` "
            "does): commit it, or `git checkout params.yaml`")
        cfg, overrides = load_config(params), {}
    why_not = lineage.tracked(cfg, params, overrides)
    if why_not:
        log(f"every stage runs and nothing is recorded in dvc.lock: {why_not}")
    return cfg, why_not is None


def run_or_skip(name: str, cfg: Config, dvc: bool, log=print) -> dict:
    """Run one stage; with `dvc`, skip it when DVC says it is up to date (returning what its
    outputs hold, with "skipped": True) and record it in dvc.lock when it ran, as `dvc repro` would."""
    from slq.mlops import lineage

    if dvc and lineage.up_to_date(cfg, name):
        log(f"stage {name}: unchanged (deps, params and outs match dvc.lock), skipped")
        return {"skipped": True, **stage_summary(name, cfg)}
    result = run_stage(name, cfg)
    if dvc:
        if name == "validate":
            for f in lineage.pin_data(cfg):
                log(f"{f} now pins the validated data")
        lineage.record(cfg, name)
    return result


def stage_summary(name: str, cfg: Config) -> dict:
    """What a skipped stage last produced, from its own metrics or report file."""
    path = {"evaluate": cfg.evaluate.metrics, "compare": cfg.methods.summary, "register": cfg.register.out,
            "train": cfg.train.metrics, "pretrain": cfg.pretrain.metrics}.get(name)
    return _read_json(cfg.path(path)) if path else {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}

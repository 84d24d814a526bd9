"""The pipeline as a Prefect flow: each stage a task with retries, chained in data order.

    data -> validate -> pretrain -> train -> embed -> index -> evaluate -> methods -> compare -> register
         and, before the default's register, each query bank of the bank set (dvc.yaml's bank_* stages):
         train -> embed -> index -> evaluate -> register

The tasks call the same `slq.mlops.runner.run_stage` as dvc.yaml and the CLI, and in a DVC project
they mean what `dvc repro` means: a stage whose deps, params and outs match dvc.lock is skipped,
one that ran is recorded in dvc.lock (slq.mlops.lineage), so a nightly run retrains nothing when nothing
changed and leaves `dvc status` clean. A failed training task retries and resumes from its last
periodic checkpoint; a failed validation never retries (the data will not fix itself). The flow
publishes the metrics as a table artifact.

Schedule it:   slq flow serve --cron "0 3 * * *"      (UI: `prefect server start`, 127.0.0.1:4200)
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import contextlib
from pathlib import Path

from slq.mlops.runner import STAGES, prepare, run_or_skip, run_stage

BANK_STAGES = ("train", "embed", "index", "evaluate", "register")  # dvc.yaml's bank_<stage>@<bank> stages

RETRIES = {"validate": 0, "pretrain": 1, "train": 1, "embed": 1, "index": 2, "evaluate": 1, "methods": 1,
           "compare": 1, "register": 2}


def _retryable(task_, task_run, state) -> bool:
    """Retry unless the failure is bad data or bad config (which a retry cannot fix)."""
    from slq.mlops.config import ConfigError
    from slq.mlops.validation import ValidationFailed

    try:
        state.result()
    except (ValidationFailed, ConfigError):
        return False
    except Exception:
        return True
    return False


def _stage_task(name: str):
    @task(name=name, retries=RETRIES[name], retry_delay_seconds=2, retry_condition_fn=_retryable)
    def stage_task(cfg, dvc: bool = False):
        """Run the stage; with `dvc`, skip it when DVC says it is up to date and record it in
        dvc.lock when it ran, as `dvc repro` would (slq.mlops.runner.run_or_skip)."""
        log = get_run_logger()
        log.info("stage %s", name)
        return run_or_skip(name, cfg, dvc, log=log.info)

    return stage_task


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


def bank_set(root: str | Path) -> list[str]:
    """The query banks dvc.yaml's bank_* stages train (their `foreach` list, the same in each); each
    bank's params overlay is params/banks/<bank>.yaml. None in a project without them."""
    import yaml

    dvc_yaml = Path(root) / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []
    stages = yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}
    lists = {f"bank_{s}": stages[f"bank_{s}"].get("foreach") for s in BANK_STAGES if f"bank_{s}" in stages}
    if not lists:
        return []
    first = next(iter(lists.values()))
    if len(lists) != len(BANK_STAGES) or any(v != first for v in lists.values()) or not isinstance(first, list):
        raise ValueError(f"{dvc_yaml}: the bank_* stages ({', '.join(f'bank_{s}' for s in BANK_STAGES)}) must "
                         f"all be there with the same foreach list of bank names; found {lists}")
    return [str(b) for b in first]


@contextlib.contextmanager
def _parent_kept_open(cfg):
    """A bank's register stage closes the pipeline's MLflow run, as every register stage does (under
    `dvc repro` it is the last stage); in the flow the default's register comes last, so the run is
    reopened after a bank's: one run holds the whole flow's stages."""
    import os

    from slq.mlops.tracking import PARENT_ENV

    parent = os.environ.get(PARENT_ENV)
    try:
        yield
    finally:
        if parent and os.environ.get(PARENT_ENV) != parent:
            from slq.mlops.tracking import mlflow_client

            mlflow_client(cfg).update_run(parent, status="RUNNING")
            os.environ[PARENT_ENV] = parent


@task(name="bank-stage", retries=1, retry_delay_seconds=5)
def bank_stage_task(stage: str, bank: str, params: str, root: str, dvc: bool = False) -> dict:
    """One stage of one bank, with the bank's params overlay; with `dvc`, skipped when dvc.lock says
    `bank_<stage>@<bank>` is up to date and recorded there when it ran, as `dvc repro` would."""
    from slq.mlops import lineage
    from slq.mlops.config import load_config

    log = get_run_logger()
    cfg = load_config(params, {"root": root})  # the overlay's paths are the project's
    target = f"bank_{stage}@{bank}"
    if dvc and lineage.up_to_date(cfg, target):
        log.info(f"stage {target}: unchanged (deps, params and outs match dvc.lock), skipped")
        return {"skipped": True}
    with _parent_kept_open(cfg) if stage == "register" else contextlib.nullcontext():
        result = run_stage(stage, cfg)
    if dvc:
        lineage.record(cfg, target)
    return result


def _log(message: str) -> None:
    """The flow run's logger, or stdout when called outside a run (slq_pipeline.fn in a test)."""
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().info(message)
    except MissingContextError:
        print(message)


def parse_overrides(overrides: dict | list[str] | None) -> dict:
    """The flow's overrides as typed values: a string value is parsed as YAML, as `--set` does on the
    CLI ({"train.steps": "50"} -> 50, "[1, 5]" -> a list), so a deployment run typed in the UI and
    `slq flow run --set` mean the same; a list of "section.key=value" strings is accepted too."""
    from slq.mlops.config import parse_set, parse_value

    if isinstance(overrides, (list, tuple)):
        return parse_set(overrides)
    return {str(k): parse_value(str(k), v) if isinstance(v, str) else v for k, v in (overrides or {}).items()}


@flow(name="slq-pipeline", log_prints=True)
def slq_pipeline(params: str = "params.yaml", overrides: dict | list[str] | None = None) -> dict:
    """Run every stage in order; returns {stage: summary}.

    In a DVC project with its own params.yaml, each stage is skipped when DVC's hashes say it is up
    to date and recorded in dvc.lock when it runs, so the flow and `dvc repro` agree and the flow
    leaves `dvc status` clean. Overrides are written into params.yaml first (comments kept), as
    `dvc exp run -S` does, so the record describes what ran. Elsewhere every stage runs.
    A params file that does not exist fails the run before any stage (never a run on the defaults);
    override values given as strings are YAML (`parse_overrides`).
    """
    cfg, dvc = prepare(params, parse_overrides(overrides), log=_log)
    results = {}
    root = Path(cfg.root).resolve()
    banks = bank_set(root)
    for name in STAGES:
        if name == "register":  # last: it closes the pipeline's MLflow run
            for bank in banks:
                overlay = root / "params" / "banks" / f"{bank}.yaml"
                for stage in BANK_STAGES:
                    results[f"bank_{stage}@{bank}"] = bank_stage_task(stage, bank, str(overlay), str(root), dvc=dvc)
        results[name] = STAGE_TASKS[name](cfg, dvc=dvc)
    publish(results)
    return results


def publish(results: dict) -> None:
    """Metrics as a Prefect table artifact (needs a key to show in the UI) and a short summary."""
    ev = results.get("evaluate", {})
    rows = [{"metric": k, "value": round(float(v), 4)} for k, v in ev.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    create_table_artifact(key="slq-metrics", table=rows, description="Retrieval metrics of this run")
    cmp = {m: r for m, r in results.get("compare", {}).items() if isinstance(r, dict) and "budget" in r}
    if cmp:
        table = [{"method": m, **{f"{b}.{k}": round(float(v), 4) for b, ms in r.items() if b != "budget"
                                  for k, v in ms.items() if k.startswith(("t2i_R@", "i2t_R@"))},
                  "trainable_params": r["budget"].get("trainable_params")} for m, r in cmp.items()]
        create_table_artifact(key="slq-methods", table=table,
                              description="SLQ beside zero-shot, LoRA and full fine-tuning (plain and knowledge)")
    reg = results.get("register", {})
    if reg:
        create_markdown_artifact(
            key="slq-registration",
            markdown=f"**{reg.get('model_name')} v{reg.get('version')}**: "
                     f"{'promoted to @' + str(reg.get('alias')) if reg.get('promoted') else 'not promoted'}"
                     f" — {reg.get('reason')}",
        )


def deployment(name: str = "slq-nightly", cron: str = "0 3 * * *", params: str = "params.yaml"):
    """The scheduled deployment of the flow (a cron schedule; parameters = the params file)."""
    return slq_pipeline.to_deployment(name=name, cron=cron, parameters={"params": params},
                                      description="SLQ pipeline: validate, pretrain, train, embed, index, evaluate, "
                                                  "methods, compare, register")


def serve_deployment(name: str = "slq-nightly", cron: str = "0 3 * * *", params: str = "params.yaml"):
    """Register the deployment and serve it until interrupted (it shows in the Prefect UI)."""
    from prefect import serve

    serve(deployment(name, cron, params))


if __name__ == "__main__":
    slq_pipeline()

"""The pipeline as a Prefect flow: each stage a task with retries, chained in data order.

    data -> validate -> train -> embed -> index -> evaluate -> register

The tasks call the same `slq.pipeline.run_stage` as dvc.yaml and the CLI. A failed training
task retries and resumes from its last periodic checkpoint; a failed validation never retries
(the data will not fix itself). The flow publishes the metrics as a table artifact.

Schedule it:   slq flow serve --cron "0 3 * * *"      (UI: `prefect server start`, 127.0.0.1:4200)
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from slq.pipeline import STAGES, run_stage

RETRIES = {"validate": 0, "pretrain": 1, "train": 1, "embed": 1, "index": 2, "evaluate": 1, "methods": 1,
           "compare": 1, "register": 2}


def _retryable(task_, task_run, state) -> bool:
    """Retry unless the failure is bad data or bad config (which a retry cannot fix)."""
    from slq.config import ConfigError
    from slq.stages.validate import ValidationFailed

    try:
        state.result()
    except (ValidationFailed, ConfigError):
        return False
    except Exception:
        return True
    return False


def _stage_task(name: str):
    @task(name=name, retries=RETRIES[name], retry_delay_seconds=2, retry_condition_fn=_retryable)
    def stage_task(cfg):
        get_run_logger().info("stage %s", name)
        return run_stage(name, cfg)

    return stage_task


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


def parse_overrides(overrides: dict | list[str] | None) -> dict:
    """The flow's overrides as typed values: a string value is parsed as YAML, as `--set` does on the
    CLI ({"train.steps": "50"} -> 50, "[1, 5]" -> a list), so a deployment run typed in the UI and
    `slq flow run --set` mean the same; a list of "section.key=value" strings is accepted too."""
    import re

    import yaml

    from slq.config import ConfigError

    if isinstance(overrides, (list, tuple)):
        items = []
        for item in overrides:
            key, sep, raw = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r}: expected section.key=value")
            items.append((key.strip(), raw))
    else:
        items = list((overrides or {}).items())
    out = {}
    for key, value in items:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"override {key}={value!r}: the value is not valid YAML ({e})") from None
            # YAML 1.1 (PyYAML) reads 1e-3 as text; 1e-3 means the number, as in YAML 1.2 (and load_config)
            if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
                value = float(value)
        out[str(key)] = value
    return out


@flow(name="slq-pipeline", log_prints=True)
def slq_pipeline(params: str = "params.yaml", overrides: dict | list[str] | None = None) -> dict:
    """Run every stage in order; returns {stage: summary}.

    A params file that does not exist fails the run before any stage (never a run on the defaults);
    override values given as strings are YAML (`parse_overrides`).
    """
    from slq.config import load_config

    cfg = load_config(params, parse_overrides(overrides))
    results = {}
    for name in STAGES:
        results[name] = STAGE_TASKS[name](cfg)
    publish(results)
    return results


def publish(results: dict) -> None:
    """Metrics as a Prefect table artifact (needs a key to show in the UI) and a short summary."""
    ev = results.get("evaluate", {})
    rows = [{"metric": k, "value": round(float(v), 4)} for k, v in ev.items() if isinstance(v, (int, float))]
    create_table_artifact(key="slq-metrics", table=rows, description="Retrieval metrics of this run")
    cmp = results.get("compare", {})
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

"""MLflow runs of one pipeline execution: a parent run, a nested run per stage and per method.

    pipeline (parent)
      ├── validate, pretrain, train, embed, index, evaluate   (one nested run per stage that ran)
      ├── method-zero_shot, method-lora, method-full         (the methods stage, one per method)
      ├── compare
      └── register                                             (the model, its version, the gate)

A stage that DVC (or the Prefect flow) skips because nothing changed gets no run: the tree shows
what actually ran. Stages run in separate processes under `dvc repro`, so the parent is found, not
passed: the newest RUNNING pipeline run of this workspace (`SLQ_MLFLOW_PARENT_RUN` names it
explicitly, and is set for this process and its children once found). The register stage, the
last one, finishes it; a pipeline that failed part-way keeps its parent open, so the rerun's
stages join the same tree, unless it is older than `STALE_HOURS`.

Training curves (loss, temperature, lr, grad norm by step) are logged while training runs,
flushed every few steps, so the MLflow UI shows the curve grow.

MLflow is imported inside the functions; without it (a GPU box with only torch and transformers)
nothing is tracked and the stage says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path

from slq.config import Config

PARENT_ENV = "SLQ_MLFLOW_PARENT_RUN"
STALE_HOURS = 12
ROLE = "slq.role"
WORKSPACE = "slq.workspace"
CURVE_KEYS = ("loss", "temperature", "lr", "grad_norm")
_warned = False


def available() -> bool:
    """Whether MLflow can be imported here (once-only note on stderr when it cannot)."""
    global _warned
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if not _warned:
            print("note: mlflow is not installed here: this stage is not tracked", file=sys.stderr)
            _warned = True
        return False
    return True


def workspace_key(cfg: Config) -> str:
    """Identifies this project folder on this machine (runs of two checkouts never share a parent)."""
    return hashlib.sha256(str(Path(cfg.root).resolve()).encode()).hexdigest()[:16]


def parent_run_id(cfg: Config, create: bool = True) -> str | None:
    """The pipeline run this process's stages nest under: named by SLQ_MLFLOW_PARENT_RUN, else the
    newest RUNNING pipeline run of this workspace (not stale), else a new one (when `create`)."""
    from mlflow.exceptions import MlflowException

    from slq.stages.register import _client, git_commit

    client = _client(cfg)
    key = workspace_key(cfg)
    named = os.environ.get(PARENT_ENV)
    if named:
        try:
            run = client.get_run(named)
            if run.info.status == "RUNNING" and run.data.tags.get(WORKSPACE) == key:
                return named
        except MlflowException:
            pass
    exp = client.get_experiment_by_name(cfg.register.experiment)
    open_runs = client.search_runs(
        [exp.experiment_id], f"tags.`{ROLE}` = 'pipeline' and tags.`{WORKSPACE}` = '{key}' "
        "and attributes.status = 'RUNNING'", order_by=["attributes.start_time DESC"], max_results=5)
    now_ms = time.time() * 1000
    for run in open_runs:
        if now_ms - run.info.start_time < STALE_HOURS * 3600 * 1000:
            os.environ[PARENT_ENV] = run.info.run_id
            return run.info.run_id
        client.set_terminated(run.info.run_id, "KILLED")  # abandoned long ago: a new pipeline run starts
    if not create:
        return None
    commit = git_commit(cfg.root)
    run = client.create_run(exp.experiment_id, run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={ROLE: "pipeline", WORKSPACE: key, "git_commit": commit,
                                  "workspace": str(Path(cfg.root).resolve())})
    os.environ[PARENT_ENV] = run.info.run_id
    return run.info.run_id


def finish_parent(cfg: Config, status: str = "FINISHED") -> str | None:
    """End the open pipeline run (the register stage does, after registering); returns its id."""
    if not available():
        return None
    from slq.stages.register import _client

    run_id = parent_run_id(cfg, create=False)
    if run_id:
        _client(cfg).set_terminated(run_id, status)
    os.environ.pop(PARENT_ENV, None)
    return run_id


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, run_name: str | None = None, tags: dict | None = None):
    """A nested run under the pipeline's parent, active while the block runs; yields it (None when
    MLflow is not installed or this is not rank 0 of a torchrun job)."""
    if not available() or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    import mlflow

    active = mlflow.active_run()  # nest under the run of the stage that called (the methods stage)
    parent = active.info.run_id if active is not None else parent_run_id(cfg)
    with mlflow.start_run(run_name=run_name or stage, nested=True, parent_run_id=parent,
                          tags={"stage": stage, ROLE: "stage", WORKSPACE: workspace_key(cfg), **(tags or {})}) as run:
        yield run


@contextlib.contextmanager
def children_under_active_run():
    """Processes started inside this block nest their runs under this process's active run (the
    methods stage's workers under the `methods` run), not directly under the pipeline's."""
    run = None
    if "mlflow" in sys.modules:
        import mlflow

        run = mlflow.active_run()
    before = os.environ.get(PARENT_ENV)
    if run is not None:
        os.environ[PARENT_ENV] = run.info.run_id
    try:
        yield
    finally:
        if run is not None:
            if before is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = before


def log_summary(summary: dict, prefix: str = "") -> None:
    """A stage's summary: its finite numbers as metrics of the active run (nested dicts flattened)."""
    import math

    import mlflow

    from slq.stages.register import metric_key

    nums = {}

    def walk(d: dict, pre: str):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{pre}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                nums[metric_key(f"{pre}{k}")] = float(v)

    walk(summary, prefix)
    if nums and mlflow.active_run() is not None:
        mlflow.log_metrics(nums)


class CurveLogger:
    """`on_step` for a training loop: each step's loss, temperature, lr and grad norm as MLflow
    metrics `<prefix>.<name>` by step, sent every `flush_every` steps (and at `close`)."""

    def __init__(self, client, run_id: str, prefix: str = "train", flush_every: int = 10):
        self.client, self.run_id, self.prefix, self.flush_every = client, run_id, prefix, flush_every
        self.pending: list = []

    def __call__(self, rec: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(rec["step"])
        self.pending += [Metric(f"{self.prefix}.{k}", float(rec[k]), ts, step)
                         for k in CURVE_KEYS if rec.get(k) is not None]
        if step % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []

    close = flush


def curve_logger(cfg: Config, prefix: str = "train") -> CurveLogger | None:
    """A CurveLogger for the active run, or None when nothing is tracked here."""
    if not available():
        return None
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    from slq.stages.register import _client

    return CurveLogger(_client(cfg), run.info.run_id, prefix)


def chain(*callbacks):
    """One on_step calling each callback that is not None."""
    cbs = [c for c in callbacks if c is not None]
    if not cbs:
        return None
    return lambda rec: [c(rec) for c in cbs] and None

"""All of slq's MLflow code: the tracking store, the runs of a pipeline execution, the model
registry (versions, the gated alias), and the look-ups the CLI shows.

Runs of one pipeline execution: a parent run, a nested run per stage and per method.

    pipeline (parent)
      ├── validate, pretrain, train, embed, index, evaluate   (one nested run per stage that ran)
      ├── method-zero_shot, method-lora, method-full         (the methods stage, one per method)
      ├── compare
      └── register                                             (the model, its version, the gate)

A stage that DVC (or the Prefect flow) skips because nothing changed gets no run: the tree shows
what actually ran. A stage's run (and the parent, and the store itself) is opened only once the
stage has something to record: its first training-curve points, a method's run, the registry, or
its summary when it succeeds; it is dated from the stage's start. A stage that fails before then
records nothing; where the store does not exist yet, even the curve waits for the stage to
succeed, so a failed stage creates no `mlflow.db` (one exception: side-by-side method workers need
the methods run to nest under, so it opens when they start). Stages run in separate processes
under `dvc repro`, so the parent is found, not passed: the newest RUNNING pipeline run of this
workspace (`SLQ_MLFLOW_PARENT_RUN` names it explicitly, and is set for this process and its
children once found). The register stage, the last one, finishes it; a pipeline that failed
part-way keeps its parent open, so the rerun's stages join the same tree, unless it is older than
`STALE_HOURS`.

Training curves (loss, temperature, lr, grad norm by step) are logged while training runs,
flushed every few steps, so the MLflow UI shows the curve grow (once the store exists).

The registry: the register stage logs one run with the whole config, the evaluation metrics,
lineage tags and the servable pyfunc model (`slq.mlops.serve`); the new version becomes
`register.alias` ("champion") only when there is none yet or it beats the champion on
`register.gate_metric`; the decision and its reason go to the run's tags and `register.out`.

MLflow is imported inside the functions; without it (a GPU box with only torch and transformers)
nothing is tracked and the stage says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from slq.checkpoint import checkpoint_hash, manifest_method, read_manifest
from slq.io import write_json_atomic
from slq.mlops.config import Config
from slq.mlops.lineage import git_commit

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


def parent_run_id(cfg: Config, create: bool = True, start_ms: int | None = None) -> str | None:
    """The pipeline run this process's stages nest under: named by SLQ_MLFLOW_PARENT_RUN, else the
    newest RUNNING pipeline run of this workspace (not stale), else a new one (when `create`; dated
    `start_ms`, default now)."""
    from mlflow.exceptions import MlflowException


    client = mlflow_client(cfg)
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
    start_ms = int(time.time() * 1000) if start_ms is None else int(start_ms)
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(start_ms / 1000))
    run = client.create_run(exp.experiment_id, run_name=f"pipeline-{stamp}", start_time=start_ms,
                            tags={ROLE: "pipeline", WORKSPACE: key, "git_commit": commit,
                                  "workspace": str(Path(cfg.root).resolve())})
    os.environ[PARENT_ENV] = run.info.run_id
    return run.info.run_id


def finish_parent(cfg: Config, status: str = "FINISHED") -> str | None:
    """End the open pipeline run (the register stage does, after registering); returns its id."""
    if not available():
        return None

    run_id = parent_run_id(cfg, create=False)
    if run_id:
        mlflow_client(cfg).set_terminated(run_id, status)
    os.environ.pop(PARENT_ENV, None)
    return run_id


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, run_name: str | None = None, tags: dict | None = None):
    """A nested run under the pipeline's parent for the block; yields its `StageRun` (None when
    MLflow is not installed or this is not rank 0 of a torchrun job). The run opens when the block
    first records something (`active_run`) or, at the latest, when the block succeeds; a block that
    fails before then leaves no run and no new store."""
    if not available() or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    run = StageRun(cfg, run_name or stage, {"stage": stage, ROLE: "stage", WORKSPACE: workspace_key(cfg), **(tags or {})})
    _stage_runs.append(run)
    try:
        yield run
        run.open()
    except BaseException as e:
        run.close(e)
        raise
    else:
        run.close(None)
    finally:
        _stage_runs.remove(run)


_stage_runs: list = []  # this process's StageRuns, outermost first, opened or still pending


class StageRun:
    """One stage's (or method's) nested run, opened on first use: `open()` (also through `info`)
    opens the enclosing pending runs first, so the run nests as if opened at once, and dates it
    from when the stage started."""

    def __init__(self, cfg: Config, run_name: str, tags: dict):
        self.cfg, self.run_name, self.tags = cfg, run_name, tags
        self.start_ms = int(time.time() * 1000)
        self.active = None  # mlflow's ActiveRun, once opened
        self.waiting: list = []  # curves held back until the run opens (no store yet: _StageCurve)

    @property
    def info(self):
        return self.open().info

    def open(self):
        if self.active is None:
            for run in _stage_runs[:_stage_runs.index(self) + 1]:
                run._start()
        return self.active

    def _start(self) -> None:
        if self.active is not None:
            return
        import mlflow
        from mlflow.tracking.context import registry
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        client = mlflow_client(self.cfg)
        active = mlflow.active_run()  # nest under the run of the stage that called (the methods stage)
        parent = active.info.run_id if active is not None else parent_run_id(self.cfg, start_ms=self.start_ms)
        # as mlflow.start_run(nested=True, parent_run_id=...) would, with the stage's start time
        tags = registry.resolve_tags({**self.tags, MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: self.run_name})
        exp = client.get_experiment_by_name(self.cfg.register.experiment)
        run = client.create_run(exp.experiment_id, start_time=self.start_ms, tags=tags, run_name=self.run_name)
        self.active = mlflow.start_run(run_id=run.info.run_id, nested=True)
        waiting, self.waiting = self.waiting, []
        for curve in waiting:
            curve.flush()

    def close(self, error: BaseException | None) -> None:
        """End the run if it was opened: FINISHED, or FAILED when the block raised `error`."""
        if self.active is not None:
            self.active.__exit__(type(error) if error else None, error, None)


def active_run():
    """The active MLflow run, after opening this process's pending stage runs (None when nothing is
    tracked here): for code that records into the stage's run."""
    if _stage_runs:
        _stage_runs[-1].open()
    if "mlflow" not in sys.modules:
        return None
    import mlflow

    return mlflow.active_run()


@contextlib.contextmanager
def children_under_active_run():
    """Processes started inside this block nest their runs under this process's active run (the
    methods stage's workers under the `methods` run), not directly under the pipeline's."""
    run = active_run()  # the stage's run opens here: the children need a run to nest under
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

    nums = {}

    def walk(d: dict, pre: str):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{pre}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                nums[metric_key(f"{pre}{k}")] = float(v)

    walk(summary, prefix)
    if nums and active_run() is not None:
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

    def close(self) -> None:
        self.flush()


class _StageCurve(CurveLogger):
    """A CurveLogger for a stage's run that opens it with its first points (a stage that fails
    before its first step records nothing). Where the tracking store does not exist yet, the points
    wait for the stage to succeed: a failed stage never creates the store."""

    def __init__(self, cfg: Config, prefix: str, stage: StageRun):
        super().__init__(None, None, prefix)
        self.cfg, self.stage = cfg, stage

    def flush(self) -> None:
        if not self.pending:
            return
        if self.run_id is None:
            if self.stage.active is None and not _store_exists(self.cfg):
                if self not in self.stage.waiting:
                    self.stage.waiting.append(self)
                return
            self.client, self.run_id = mlflow_client(self.cfg), self.stage.open().info.run_id
        super().flush()


def curve_logger(cfg: Config, prefix: str = "train") -> CurveLogger | None:
    """A CurveLogger for the stage's run (opened with the curve's first points) or the active run;
    None when nothing is tracked here."""
    if not available():
        return None
    if _stage_runs:
        return _StageCurve(cfg, prefix, _stage_runs[-1])
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    return CurveLogger(mlflow_client(cfg), run.info.run_id, prefix)


def chain(*callbacks):
    """One on_step calling each callback that is not None."""
    cbs = [c for c in callbacks if c is not None]
    if not cbs:
        return None
    return lambda rec: [c(rec) for c in cbs] and None


def log_method_run(cfg: Config, method: str, metrics: dict, ckpt: Path) -> str | None:
    """One MLflow run per method (same experiment as the pipeline's run); returns its id."""
    import mlflow


    mlflow_client(cfg)
    nums = {}
    for k, v in metrics["budget"].items():
        if (n := number(v)) is not None and not isinstance(v, bool):
            nums[f"budget.{k}"] = n
    for bench, ms in metrics["benchmarks"].items():
        for k, v in ms.items():
            if (n := number(v)) is not None:
                nums[f"{bench}.{k}"] = n
    params = flatten({"train": {k: v for k, v in vars(cfg.train).items()}, "method": method,
                      "lr": metrics["budget"].get("lr"), "backbone": cfg.backbone.path})
    tags = {"method": method, "git_commit": git_commit(cfg.root), "stage": "methods"}
    existing = metrics.get("mlflow_run_id")  # the run that logged the training curve, reopened
    run_ctx = (mlflow.start_run(run_id=existing, nested=mlflow.active_run() is not None, tags=tags) if existing
               else mlflow.start_run(run_name=f"method-{method}", nested=mlflow.active_run() is not None, tags=tags))
    with run_ctx as run:
        mlflow.log_params({k: v[:500] for k, v in params.items()})
        mlflow.log_metrics({metric_key(k): v for k, v in nums.items()})
        mlflow.log_text(json.dumps(metrics, indent=2, default=str), "metrics.json")
        mlflow.log_artifact(str(ckpt / "slq.json"), "checkpoint")
        return run.info.run_id


# ---- the model registry: store set-up, one run per pipeline execution, versions, gated promotion ----


ENV_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true"}


# ---- setup ---------------------------------------------------------------------------------
def tracking_uri(cfg: Config) -> str:
    """cfg.register.tracking_uri with a relative sqlite path taken from the project root."""
    uri = cfg.register.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(cfg.path(uri[len(prefix):]).resolve())
    return uri


def artifact_location(cfg: Config) -> str | None:
    """Where new experiments store artifacts: the configured URI; else, for a tracking server, None
    (the server's own artifact store, `mlflow-artifacts:/...`: the same URI on every machine), and
    for a local store ./mlartifacts as a file URI."""
    loc = cfg.register.artifact_location
    if loc and "://" in loc:
        return loc
    if not loc and tracking_uri(cfg).startswith(("http://", "https://")):
        return None
    return cfg.path(loc or "mlartifacts").resolve().as_uri()


def mlflow_client(cfg: Config):
    """Point MLflow at the configured store and experiment (created on first use); the client."""
    import mlflow
    from mlflow import MlflowClient

    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(cfg.register.experiment)
    if exp is None:
        exp_id = client.create_experiment(cfg.register.experiment, artifact_location=artifact_location(cfg))
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return client


# ---- helpers -------------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.005", ...}; lists as JSON, so params stay comparable."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def metric_key(name: str) -> str:
    """An MLflow-legal metric name: "t2i_R@1" -> "t2i_R_at_1" (MLflow rejects "@")."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def number(v) -> float | None:
    """A finite float, or None for missing/NaN/non-numeric values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def backbone_dir(cfg: Config, manifest: dict) -> Path:
    """The checkpoint's backbone folder: the manifest's path (as is, then from the root), else the config's."""
    recorded = manifest.get("backbone", {}).get("path")
    for cand in ([Path(recorded), cfg.path(recorded)] if recorded else []) + [cfg.path(cfg.backbone.path)]:
        if cand.is_dir():
            return cand.resolve()
    raise FileNotFoundError(f"backbone folder not found: checkpoint records {recorded!r}, "
                            f"config has {cfg.backbone.path!r} (root {cfg.root})")


def _champion(client, cfg: Config):
    """The version holding the alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(cfg.register.model_name, cfg.register.alias)
    except MlflowException:
        return None


def _version_scored(client, cfg: Config, mv) -> tuple[float | None, str | None]:
    """(gate metric, evaluation key) of the run that registered `mv`: both from one run, so the
    number is known to come from that evaluation (slq.mlops.records.evaluation_key)."""
    run = client.get_run(mv.run_id)
    return number(run.data.metrics.get(metric_key(cfg.register.gate_metric))), run.data.tags.get("evaluation_key")


def _gate(client, cfg: Config, version: int, metric: float | None, force: bool = False,
          key: str | None = None) -> dict:
    """Decide whether `version` (scoring `metric` under evaluation `key`) takes the alias; set it if
    so. The decision dict. Numbers measured under different evaluation keys (other data, split, ks
    or benchmarks) are never compared: such a version is kept out until promoted by hand."""
    rc = cfg.register
    champ = _champion(client, cfg)
    prev_v = int(champ.version) if champ else None
    prev_m, prev_key = _version_scored(client, cfg, champ) if champ else (None, None)
    gm = rc.gate_metric
    if prev_v == version:
        promoted, reason = False, f"version {version} already holds @{rc.alias}"
    elif force:
        promoted, reason = True, f"forced promotion (gate skipped; {gm}={metric}, champion had {prev_m})"
    elif metric is None:
        promoted, reason = False, f"version {version} has no finite {gm} metric; cannot pass the gate"
    elif champ is None:
        promoted, reason = True, f"no @{rc.alias} yet; version {version} ({gm}={metric:.6g}) becomes it"
    elif prev_key != key:
        promoted, reason = False, (
            f"@{rc.alias} (version {prev_v}) was scored on another evaluation (data, split, ks or benchmarks: "
            f"key {prev_key}, version {version} has {key}), so their {gm} do not compare; kept "
            f"(promote by hand: slq promote {version} --force)")
    elif prev_m is None:
        promoted, reason = True, f"@{rc.alias} (version {prev_v}) has no {gm}; version {version} replaces it"
    elif metric > prev_m:
        promoted, reason = True, f"{gm} {metric:.6g} > {prev_m:.6g} of @{rc.alias} (version {prev_v})"
    else:
        promoted, reason = False, f"{gm} {metric:.6g} <= {prev_m:.6g} of @{rc.alias} (version {prev_v}); kept"
    if promoted:
        client.set_registered_model_alias(rc.model_name, rc.alias, str(version))
    return {
        "promoted": promoted,
        "reason": reason,
        "version": version,
        "gate_metric": gm,
        "metric": metric,
        "previous_champion_version": prev_v,
        "previous_champion_metric": prev_m,
        "champion_version": version if promoted else prev_v,
    }


def _decision_tags(decision: dict) -> dict[str, str]:
    keys = ("promoted", "reason", "version", "previous_champion_version", "previous_champion_metric")
    return {f"promotion.{k}": str(decision[k]) for k in keys}


# ---- the stage -----------------------------------------------------------------------------
def register_model(
    cfg: Config,
    *,
    metrics: dict,
    params: dict | None = None,
    artifacts: dict[str, Path] | None = None,
    tags: dict | None = None,
    checkpoint_dir: Path | None = None,
    history: Path | None = None,
) -> dict:
    """Log this pipeline execution as one MLflow run, register the model, gate the promotion.

    `metrics`: evaluation results (numbers become metrics named by `metric_key`, anything else
    a `metric.<name>` tag); `params`: extra params on top of the flattened config; `artifacts`:
    name -> file or folder (logged under that name); `tags`: lineage such as the data hash and
    LanceDB table versions; `checkpoint_dir`: the query checkpoint (default cfg.train.out);
    `history`: the training history CSV, logged as per-step metrics (train.loss, ... by step).
    Returns (and writes to cfg.register.out) the run, version and promotion decision.
    """
    import mlflow

    from slq.mlops import serve

    rc = cfg.register
    ckpt = Path(checkpoint_dir or cfg.path(cfg.train.out)).resolve()
    manifest = read_manifest(ckpt)
    backbone = backbone_dir(cfg, manifest)
    missing = [f"{k}: {p}" for k, p in (artifacts or {}).items() if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"artifacts to log are missing: {', '.join(missing)}")
    client = mlflow_client(cfg)

    nums = {metric_key(k): n for k, v in metrics.items() if (n := number(v)) is not None}
    run_tags = {
        "git_commit": git_commit(cfg.root),
        "method": str(manifest_method(manifest)),
        "checkpoint_hash": checkpoint_hash(ckpt),
        "backbone": str(backbone),
        **{f"metric.{k}": str(v) for k, v in metrics.items() if number(v) is None},
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    active = active_run()  # a caller that opened the pipeline's run keeps it as the one run
    run_ctx = contextlib.nullcontext(active) if active else mlflow.start_run(
        run_name=f"register-{run_tags['checkpoint_hash']}")
    with run_ctx as r:
        mlflow.log_params({**flatten(cfg.to_dict()), **flatten(params or {})})
        mlflow.log_metrics(nums)
        if history is not None and Path(history).is_file():
            log_history(client, r.info.run_id, Path(history))
        mlflow.set_tags(run_tags)
        for name, p in (artifacts or {}).items():
            p = Path(p)
            (mlflow.log_artifacts if p.is_dir() else mlflow.log_artifact)(str(p), artifact_path=name)
        fingerprint = str((manifest.get("backbone") or {}).get("fingerprint"))
        version = existing_version(client, rc.model_name, run_tags["checkpoint_hash"], fingerprint)
        if version is None:  # a new model: log and register it
            info = serve.log_model(ckpt, backbone, int(manifest["hidden_size"]), log_backbone=rc.log_backbone,
                                   registered_model_name=rc.model_name, max_text_chars=cfg.index.max_text_chars)
            version = int(info.registered_model_version)
            client.set_model_version_tag(rc.model_name, str(version), "checkpoint_hash", run_tags["checkpoint_hash"])
            client.set_model_version_tag(rc.model_name, str(version), "backbone_fingerprint", fingerprint)
        else:  # the same queries on the same backbone: its version already exists
            mlflow.set_tag("reused_model_version", str(version))
        decision = _gate(client, cfg, version, nums.get(metric_key(rc.gate_metric)), key=run_tags.get("evaluation_key"))
        mlflow.set_tags(_decision_tags(decision))
        run_id = r.info.run_id
        experiment_id = r.info.experiment_id

    report = {
        **decision,
        "run_id": run_id,
        "experiment_id": experiment_id,
        "model_name": rc.model_name,
        "alias": rc.alias,
        "model_uri": f"models:/{rc.model_name}/{version}",
        "tracking_uri": tracking_uri(cfg),
        "checkpoint_hash": run_tags["checkpoint_hash"],
        "git_commit": run_tags["git_commit"],
    }
    write_json_atomic(cfg.path(rc.out), report)
    return report


def log_history(client, run_id: str, path: Path) -> int:
    """A training history CSV (one row per step) as MLflow metric series `train.<name>` by step:
    the loss curve in the UI, sent as the live curve is (slq.mlops.tracking.CurveLogger). Returns the
    number of steps logged."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    curve = CurveLogger(client, run_id, "train", flush_every=len(rows) + 1)  # one send, in batches
    for row in rows:
        curve({"step": row["step"], **{k: row[k] for k in CURVE_KEYS if row.get(k) not in (None, "")}})
    curve.close()
    return len(rows)


def existing_version(client, model_name: str, ckpt_hash: str, fingerprint: str) -> int | None:
    """The registered version holding this checkpoint (same learned tensors, same backbone), if any:
    registering it again would only add an identical version."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    same = [int(v.version) for v in versions
            if v.tags.get("checkpoint_hash") == ckpt_hash and v.tags.get("backbone_fingerprint", fingerprint) == fingerprint]
    return min(same) if same else None


# ---- CLI helpers ---------------------------------------------------------------------------
def promote(cfg: Config, version: int, force: bool = False) -> dict:
    """Manually give `version` the alias: through the same gate as `run`, unless `force`."""
    rc = cfg.register
    client = mlflow_client(cfg)
    mv = client.get_model_version(rc.model_name, str(version))
    metric, key = _version_scored(client, cfg, mv)
    decision = _gate(client, cfg, int(version), metric, force=force, key=key)
    for k, v in _decision_tags(decision).items():
        client.set_model_version_tag(rc.model_name, str(version), f"manual_{k}", v)
    return {**decision, "model_name": rc.model_name, "alias": rc.alias, "run_id": mv.run_id}


def list_runs(cfg: Config, n: int = 10) -> list[dict]:
    """The newest `n` runs of the experiment: id, time, status, gate metric, version, promotion."""
    import datetime as dt

    client = mlflow_client(cfg)
    exp = client.get_experiment_by_name(cfg.register.experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=n)
    gm = metric_key(cfg.register.gate_metric)
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "stage": r.data.tags.get("stage") or r.data.tags.get("slq.role"),  # "pipeline" for a parent
            "parent_run_id": r.data.tags.get("mlflow.parentRunId"),
            "start_time": dt.datetime.fromtimestamp(r.info.start_time / 1000, dt.timezone.utc).isoformat(),
            "status": r.info.status,
            gm: r.data.metrics.get(gm),
            "version": r.data.tags.get("promotion.version"),
            "promoted": r.data.tags.get("promotion.promoted"),
            "git_commit": r.data.tags.get("git_commit"),
        }
        for r in runs
    ]


def show_run(cfg: Config, run_id: str) -> dict:
    """Everything about one run: params, metrics, tags (MLflow's own hidden), artifacts, versions."""
    client = mlflow_client(cfg)
    r = client.get_run(run_id)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    return {
        "run_id": run_id,
        "run_name": r.info.run_name,
        "status": r.info.status,
        "experiment_id": r.info.experiment_id,
        "artifact_uri": r.info.artifact_uri,
        "params": dict(r.data.params),
        "metrics": dict(r.data.metrics),
        "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
        "artifacts": [a.path for a in client.list_artifacts(run_id)],
        "model_versions": [  # search results lack aliases: fetch each version
            {"name": v.name, "version": int(v.version),
             "aliases": list(client.get_model_version(v.name, v.version).aliases)} for v in versions],
    }


# ---- read-only look-ups (the CLI's): they never create a store, and say what is missing ------
class TrackingError(LookupError):
    """What was looked up is not there (no tracking store, registered model, version, alias or run);
    the message says what to do. The CLI prints it as one `error: ...` line."""


def _not_found(e) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _store_exists(cfg: Config) -> bool:
    """Whether the tracking store is there already (a sqlite file; a server or folder: yes)."""
    try:
        existing_store(cfg)
    except TrackingError:
        return False
    return True


def existing_store(cfg: Config) -> str:
    """The tracking URI; for a sqlite store, TrackingError when its file does not exist (MLflow would
    create a new empty store there and report "no runs")."""
    uri = tracking_uri(cfg)
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        db = Path(uri[len(prefix):].split("?", 1)[0])
        if not db.is_file():
            raise TrackingError(f"no MLflow tracking store at {db}: run the pipeline first (`slq run` or "
                                f"`dvc repro`), or run slq from the project folder (or -p its params.yaml)")
    return uri


def model_version(cfg: Config, version: int | None):
    """The registered version `version` (None: the alias's), or TrackingError naming the versions there are."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = existing_store(cfg)
    rc = cfg.register
    client = MlflowClient(uri, uri)
    try:
        client.get_registered_model(rc.model_name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        raise TrackingError(f"no registered model {rc.model_name!r} in {uri}: run the pipeline (its register "
                            f"stage) first") from e
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{rc.model_name}'"))
    have = f"versions: {', '.join(map(str, versions)) or 'none'}"
    try:
        if version is None:
            return client.get_model_version_by_alias(rc.model_name, rc.alias)
        return client.get_model_version(rc.model_name, str(version))
    except MlflowException as e:
        if version is None:
            raise TrackingError(f"{rc.model_name} has no @{rc.alias} yet: promote a version with "
                                f"`slq promote N` ({have})") from e
        if not _not_found(e) and version >= 1:
            raise
        raise TrackingError(f"{rc.model_name} has no version {version} ({have}; `slq runs list` shows which "
                            f"run made each)") from e


def run_info(cfg: Config, run_id: str) -> dict:
    """show_run() of a run that must exist in an existing store (TrackingError otherwise)."""
    from mlflow.exceptions import MlflowException

    store = existing_store(cfg)
    try:
        return show_run(cfg, run_id)
    except MlflowException as e:
        if not _not_found(e):
            raise
        raise TrackingError(f"no run {run_id!r} in {store}: `slq runs list` shows the run ids") from e


def compare_runs(cfg: Config, run_ids: list[str]) -> dict:
    """Params and metrics of runs side by side: {"runs": [{run_id, run_name, status}], "params": {key:
    [value per run]}, "metrics": {...}, "differ": {"params": [keys], "metrics": [keys]}} (a key that a
    run lacks: None there)."""
    infos = [run_info(cfg, r) for r in run_ids]
    table = {}
    for section in ("params", "metrics"):
        keys = sorted({k for i in infos for k in i[section]})
        table[section] = {k: [i[section].get(k) for i in infos] for k in keys}
    differ = {sec: [k for k, vs in rows.items() if len({json.dumps(v) for v in vs}) > 1]
              for sec, rows in table.items()}
    return {"runs": [{k: i[k] for k in ("run_id", "run_name", "status")} for i in infos], **table, "differ": differ}

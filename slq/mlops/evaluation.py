"""Scoring a checkpoint: the configured benchmarks (through the embedding cache), the pipeline's own
split from the embed stage's vectors, and the modality gap of trained against untrained queries.
Used by the evaluate, methods and compare stages and the seed study.
"""

from __future__ import annotations

import hashlib

import numpy as np

from slq.mlops.config import Config
from slq.mlops.index import load_embeddings, read_meta


def txt_to_img(img_rows: list[dict], txt_rows: list[dict]) -> np.ndarray:
    """Each caption's image row index, via image_id."""
    index = {str(r["image_id"]): i for i, r in enumerate(img_rows)}
    missing = sorted({str(r["image_id"]) for r in txt_rows} - set(index))
    if missing:
        raise ValueError(f"{len(missing)} caption image_id(s) have no image embedding, e.g. {missing[:5]}")
    return np.array([index[str(r["image_id"])] for r in txt_rows], dtype=np.int64)


PATH_OPTIONS = ("root", "image_root", "submission_dir", "render_dir", "images_dir", "cues")


def benchmark_options(cfg: Config, entry: dict) -> tuple[str, str, dict]:
    """(label, name, options) of one `evaluate.benchmarks` entry: paths taken from the project folder,
    and the world benchmarks on `data.root` unless the entry names another root."""
    entry = dict(entry)
    name = entry.pop("name")
    label = entry.pop("label", name)
    for key in PATH_OPTIONS:
        if entry.get(key) is not None:
            entry[key] = str(cfg.path(entry[key]))
    if name.startswith("world") and entry.get("root") is None:
        entry["root"] = str(cfg.path(cfg.data.root))
    return label, name, entry


OWN_DATA = "data"  # the label of your own data's retrieval task (data.builtin: false)


def _needs_world(name: str) -> bool:
    from slq.benchmarks import get_benchmark

    return bool(getattr(get_benchmark(name), "needs_world", False))


def benchmark_plan(cfg: Config) -> tuple[dict[str, dict], dict[str, str], dict[str, str]]:
    """`evaluate.benchmarks` as run on this project's data: (entries by label, skipped {label: why},
    renamed {configured label: label}).

    On the built-in world every entry runs. On your own data (data.builtin: false) the world's
    benchmarks that read the pipeline's data folder change meaning: those that need the world's
    scene files are skipped (they run only on the world), and the plain one (`world`: caption <->
    image on the manifest's split) is your data's own retrieval task, labelled `data`. So the
    default list, written for the world, becomes your data's task with no edit; an entry with its
    own `root` runs as given. A label given twice is an error."""
    kept: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for entry in cfg.evaluate.benchmarks:
        entry = dict(entry)
        name = entry["name"]
        label = entry.get("label", name)
        if not cfg.data.builtin and name.startswith("world") and entry.get("root") is None:
            if _needs_world(name):
                skipped[label] = (f"{name} runs only on the built-in world (it needs the world's scene files); "
                                  f"data.root {cfg.data.root} is your own data (data.builtin: false)")
                continue
            if "label" not in entry:
                renamed[label], label = OWN_DATA, OWN_DATA
        if label in kept:
            raise ValueError(f"evaluate.benchmarks: {label!r} appears twice; give one a `label`")
        kept[label] = entry
    if (skipped or renamed) and OWN_DATA not in kept:  # the world's list on your data: your data's task instead
        kept[OWN_DATA] = {"name": "world"}
    return kept, skipped, renamed


def benchmark_entries(cfg: Config) -> dict[str, tuple[str, dict]]:
    """The benchmarks to run by label: {label: (name, options)}, each resolved by
    `benchmark_options`. The one place the labels are made (the evaluate, methods and compare
    stages all read them here; `benchmark_plan` says which run on your own data)."""
    out = {}
    for label, entry in benchmark_plan(cfg)[0].items():
        _, name, options = benchmark_options(cfg, entry)
        out[label] = (name, options)
    return out


def method_benchmarks(cfg: Config) -> list[str]:
    """`methods.benchmarks` as labels of `benchmark_entries`: on your own data the world-only ones
    are dropped and `world` is your data's task (`data`), as in `benchmark_plan`."""
    kept, skipped, renamed = benchmark_plan(cfg)
    out: list[str] = []
    for label in cfg.methods.benchmarks:
        if label in skipped:
            continue
        if label in renamed:
            label = renamed[label]
        elif label not in kept and not cfg.data.builtin and label.startswith("world"):  # run with its defaults
            if _needs_world(label):
                continue
            label = OWN_DATA if label == "world" else label
        if label not in out:
            out.append(label)
    return out


def run_benchmarks(cfg: Config, encoder=None, with_gap: bool | None = None) -> tuple[dict, dict | None]:
    """Run every benchmark in `evaluate.benchmarks` with the trained checkpoint; write the report.

    Embeddings go through a cache keyed by (checkpoint hash, data hash, prompt, items), so a
    second evaluation (another k, a re-run) does not embed again.
    """
    from slq.benchmarks import get_benchmark
    from slq.benchmarks.cache import CachedEmbedder
    from slq.mlops.benchmark_report import modality_gap, pca_scatter_png, write_report
    from slq.checkpoint import checkpoint_hash
    from slq.mlops.models import load_encoder

    ev = cfg.evaluate
    ckpt = cfg.path(cfg.train.out)
    ckpt_hash = checkpoint_hash(ckpt)
    encoder = encoder or load_encoder(cfg, queries=ckpt)
    embedder = CachedEmbedder(encoder, cfg.path(ev.cache_dir), ckpt_hash, batch_size=cfg.embed.batch_size)
    _reuse_embed_stage(cfg, embedder, ckpt_hash)
    results = {label: _evaluate_one(label, name, options, embedder, ev.ks)
               for label, (name, options) in benchmark_entries(cfg).items()}
    out = cfg.path(ev.report_dir)
    with_gap = ev.modality_gap if with_gap is None else with_gap
    gap = _modality_gap(cfg, out, modality_gap, pca_scatter_png) if with_gap else None
    meta = {"backbone": encoder.backbone.source, "revision": encoder.backbone.revision,
            "model_type": encoder.backbone.model_type, "num_queries": encoder.num_queries, "method": encoder.method,
            "checkpoint_hash": ckpt_hash, "prompts": encoder.prompts.to_dict(),
            "image_resolution": _pixel_budget(encoder), "caption_truncation": "none unless a benchmark sets it",
            "embeddings": f"{embedder.misses - embedder.reused} corpora embedded, {embedder.reused} from the embed "
                          f"stage, {embedder.hits} from the cache"}
    write_report(out, results, meta, gap=gap)
    return {label: r.metrics for label, r in results.items()}, gap


def _evaluate_one(label: str, name: str, options: dict, embedder, ks):
    """One benchmark's result; missing data names the benchmark and how to run without it."""
    from slq.benchmarks import MissingData, get_benchmark

    try:
        return get_benchmark(name)(**options).evaluate(embedder, ks=tuple(ks))
    except MissingData as e:
        raise MissingData(f"benchmark {label!r}: {e}; to run without it, remove its entry from evaluate.benchmarks "
                          "in params.yaml") from None


def _reuse_embed_stage(cfg: Config, embedder, ckpt_hash: str) -> None:
    """Hand the embed stage's vectors to the benchmark cache, so a benchmark over the same images
    and captions (the world's test split) is not embedded a second time. Only when they were
    made by this checkpoint with the prompts the encoder has now."""
    emb_dir = cfg.path(cfg.embed.out)
    try:
        meta = read_meta(emb_dir)
    except FileNotFoundError:
        return
    prompts = embedder.encoder.prompts.to_dict()
    if str(meta.get("checkpoint_hash")) != str(ckpt_hash) or meta.get("prompts") != prompts:
        return
    root = cfg.path(cfg.data.root)
    for split in meta.get("splits", {}):
        img, img_rows = load_embeddings(emb_dir, split, "image")
        txt, txt_rows = load_embeddings(emb_dir, split, "text")
        embedder.prefill("image", [root / r["image"] for r in img_rows], img, prompts)
        embedder.prefill("text", [r["caption"] for r in txt_rows], txt, prompts)


def _pixel_budget(encoder) -> str:
    """The processor's image size limits, as the processor states them."""
    size = getattr(getattr(encoder.backbone.processor, "image_processor", None), "size", None)
    fields = {k: getattr(size, k, None) for k in ("shortest_edge", "longest_edge", "height", "width")}
    return ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None) or str(size)


def _modality_gap(cfg: Config, out, modality_gap, pca_scatter_png) -> dict:
    """Gap between image and text embeddings of the eval split: trained queries vs the same
    backbone with untrained queries (the init the training started from)."""
    from slq.benchmarks.base import Corpus
    from slq.benchmarks.cache import CachedEmbedder
    from slq.mlops.datasets import data_hash, split_rows
    from slq.mlops.models import load_encoder

    emb_dir = cfg.path(cfg.embed.out)
    img, _ = load_embeddings(emb_dir, cfg.evaluate.split, "image")
    txt, _ = load_embeddings(emb_dir, cfg.evaluate.split, "text")
    gap = {"trained": modality_gap(img, txt)}
    pca_scatter_png(img, txt, out / "pca_trained.png", "trained queries")
    base = load_encoder(cfg)  # fresh queries from train.init / train.seed
    # Through the embedding cache, keyed by the untrained queries themselves: they depend only on
    # the backbone and train.init/seed/num_queries, so a re-evaluation (a new checkpoint) reuses them.
    q = base.queries
    untrained = hashlib.sha256(q.weight.detach().cpu().numpy().tobytes()).hexdigest()[:16] if q is not None else "-"
    embedder = CachedEmbedder(base, cfg.path(cfg.evaluate.cache_dir), f"untrained-{base.method}-{untrained}",
                              batch_size=cfg.embed.batch_size)
    root = cfg.path(cfg.data.root)
    rows = split_rows(cfg, cfg.evaluate.split)
    images = list(dict.fromkeys(r["image"] for r in rows))
    b_img = embedder.embed(Corpus("image", [root / p for p in images], None, data_hash(cfg)))
    b_txt = embedder.embed(Corpus("text", [r["caption"] for r in rows], None, data_hash(cfg)))
    gap["untrained"] = modality_gap(b_img, b_txt)
    pca_scatter_png(b_img, b_txt, out / "pca_untrained.png", "untrained queries")
    flat = {f"{role}_{k}": v for role, g in gap.items() for k, v in g.items()}
    return {**flat, "untrained_embeddings": f"{embedder.misses} corpora embedded, {embedder.hits} from the cache",
            "plot": str(out / "pca_trained.png"), "plot_untrained": "pca_untrained.png"}

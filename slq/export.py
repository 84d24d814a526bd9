"""A portable model folder from a checkpoint: what `slq export` writes.

    from slq.export import export_model
    export_model("checkpoints/slq", "exported/slq-world", metrics="metrics/eval.json")

The folder holds the checkpoint's own files (`queries.safetensors`, `slq.json`, and
`llm.safetensors` for a method that trains LLM weights, byte for byte), a model card
(`README.md`, with the Hugging Face metadata header) and the sentence-transformers files
(`modules.json`, `config_sentence_transformers.json`, `slq_module.json`: the module `slq.st.SLQModule`
and where its backbone is). The backbone is named by its path and content fingerprint; with
`with_backbone=True` it is copied into `backbone/` and the folder is self-contained (move it,
upload it: it loads anywhere `slq` is installed). The layout is a Hugging Face model repository
(`huggingface_hub.upload_folder` takes it as it is); nothing here uses the network.

The folder is written to a temporary sibling and renamed into place, so a failed export leaves
nothing half-written; an existing folder is replaced only with `force=True`.

Loading it back:

    enc = slq.methods.from_pretrained(backbone, folder)            # the SLQ encoder (any method)
    model = SentenceTransformer(folder, trust_remote_code=True)    # sentence-transformers >= 6

sentence-transformers 6 imports any module class outside its own package only with
`trust_remote_code=True`, local folders included. The class is `slq.st.SLQModule`, imported from
the installed `slq` package: the folder carries no code, and nothing of it is executed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from slq.checkpoint import LLM_WEIGHTS, MANIFEST, WEIGHTS, checkpoint_hash, manifest_method, read_manifest
from slq.io import write_atomic_dir

MODULE_CLASS = "slq.st.SLQModule"  # modules.json's `type` (tests check it names the class)
MODULE_CONFIG = "slq_module.json"  # the module's own config (SLQModule.config_file_name)
BACKBONE_DIR = "backbone"  # where --with-backbone copies the backbone, inside the folder
CARD = "README.md"
ST_CONFIG = "config_sentence_transformers.json"
ST_MODULES = "modules.json"
ST_REQUIREMENT = ">=6,<7"  # the sentence-transformers the module is written against
PIPELINE_TAG = "sentence-similarity"  # sentence-transformers' own tag for embedding models
TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "slq", "multimodal", "retrieval",
        "image-text-retrieval"]
# backbone files that are not the model (a git checkout, a download's lock files)
BACKBONE_IGNORE = (".git", ".cache", ".huggingface", "*.lock", ".DS_Store")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ExportError(ValueError):
    """The export cannot be made as asked (an existing folder, a backbone that is not the
    checkpoint's, metrics of another checkpoint); the message says what to do."""


@dataclass
class Export:
    """What `export_model` wrote: the folder, and what its card could not fill in by itself."""

    path: Path
    method: str
    base_model: str
    license: str
    backbone: str  # the backbone path slq_module.json names (relative to the folder with --with-backbone)
    with_backbone: bool
    files: list[str]
    size_bytes: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def export_model(checkpoint: str | Path, out: str | Path, *, with_backbone: bool = False,
                 metrics: str | Path | dict | None = None, split: str = "test", force: bool = False,
                 backbone: str | Path | None = None, base_model: str | None = None, license: str | None = None,
                 query_prompt: str = "", document_prompt: str = "", name: str | None = None) -> Export:
    """Write `out`: the checkpoint as a model folder for slq and sentence-transformers (module docstring).

    `metrics`: the evaluate stage's metrics JSON (a path or its dict), shown in the card with
    benchmark, split and protocol; its `checkpoint_hash` must be this checkpoint's. `split`: the
    data split its top-level metrics were computed on (params `evaluate.split`). `backbone`: where
    the backbone is on this machine when not at the path `slq.json` records (its fingerprint must
    match). `base_model` / `license`: the card's, when the backbone's own files do not say.
    `query_prompt` / `document_prompt`: sentence-transformers prompts that `encode_query` /
    `encode_document` prepend to each input's text (default none: the checkpoint's own prompts
    always apply, inside the module).
    """
    ckpt = Path(checkpoint)
    manifest = read_manifest(ckpt)
    out = Path(out)
    _check_target(ckpt, out, force)
    bb = manifest.get("backbone") or {}
    recorded = bb.get("path")
    bb_path = Path(backbone) if backbone is not None else Path(recorded) if recorded else None
    if bb_path is None:
        raise ExportError(f"{ckpt / MANIFEST} records no backbone path: pass the backbone's folder (--backbone)")
    warnings: list[str] = []
    found = bb_path.is_dir()
    if found:
        _check_fingerprint(bb_path, bb.get("fingerprint"), ckpt, verify=with_backbone or backbone is not None)
    elif with_backbone or backbone is not None:
        raise ExportError(f"backbone folder {bb_path} not found: pass the folder the checkpoint was trained on "
                          "(--backbone PATH)")
    else:
        warnings.append(f"backbone {bb_path} is not on this machine: the card's base_model and license could not "
                        "be read from it, and the folder loads only where that path holds the backbone (or pass "
                        "model_kwargs={'backbone': PATH} when loading)")
    if found:
        b, o = bb_path.resolve(), out.resolve()
        if b == o or o in b.parents or (with_backbone and b in o.parents):
            raise ExportError(f"{out} and the backbone {bb_path} overlap: export to a folder outside the backbone")
    card_meta = _backbone_card(bb_path) if found else {}
    if base_model is None:
        base_model = _hub_id(bb_path, card_meta)
        if base_model is None:
            base_model = str(bb_path.resolve() if found else bb_path)  # absolute: never mistaken for a Hub id
            warnings.append(f"base_model is the local path {base_model}: neither the backbone's Hugging Face cache "
                            "path nor its config.json names its Hub id; set it with --base-model before uploading")
    license_fields = {k: card_meta[k] for k in ("license", "license_name", "license_link") if card_meta.get(k)}
    if license is not None:
        license_fields = {"license": license}
    if not license_fields.get("license"):
        license_fields = {"license": "other"}
        warnings.append("license: other — the backbone's README.md states no license; set the backbone's license "
                        "in README.md's header (or pass --license) before publishing")
    eval_metrics = _read_metrics(metrics, ckpt)
    if eval_metrics is not None and "checkpoint_hash" not in eval_metrics:
        warnings.append("the metrics record no checkpoint_hash: they could not be checked against this checkpoint")
    st_backbone = BACKBONE_DIR if with_backbone else str(bb_path.resolve())
    method = manifest_method(manifest)
    name = name or out.name
    st_prompts = {"query": query_prompt, "document": document_prompt}

    def write(tmp: Path):
        files = [WEIGHTS, MANIFEST] + ([LLM_WEIGHTS] if (ckpt / LLM_WEIGHTS).is_file() else [])
        for f in files:
            shutil.copyfile(ckpt / f, tmp / f)
            os.chmod(tmp / f, 0o644)
        if with_backbone:
            shutil.copytree(bb_path, tmp / BACKBONE_DIR, ignore=shutil.ignore_patterns(*BACKBONE_IGNORE))
        _write_json(tmp / ST_MODULES, [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}])
        _write_json(tmp / ST_CONFIG, st_config(st_prompts))
        _write_json(tmp / MODULE_CONFIG, module_config(manifest, st_backbone))
        card = model_card(manifest, name=name, base_model=base_model, license_fields=license_fields,
                          backbone=bb_path.resolve() if found else bb_path, with_backbone=with_backbone,
                          metrics=eval_metrics, split=split, st_prompts=st_prompts, ckpt_hash=checkpoint_hash(ckpt),
                          files=files)
        (tmp / CARD).write_text(card, encoding="utf-8")

    write_atomic_dir(out, write)
    listed = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in listed)
    return Export(path=out, method=method, base_model=base_model, license=license_fields["license"],
                  backbone=st_backbone, with_backbone=with_backbone, files=listed, size_bytes=size,
                  warnings=warnings)


# ---- the sentence-transformers files ------------------------------------------------------------
def st_config(prompts: dict) -> dict:
    """config_sentence_transformers.json: the prompts, cosine similarity, the package versions."""
    versions = {name: _version(dist) for name, dist in
                (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"),
                 ("pytorch", "torch"), ("slq", "slq"))}
    return {"model_type": "SentenceTransformer",
            "__version__": {k: v for k, v in versions.items() if v},
            "prompts": dict(prompts), "default_prompt_name": None, "similarity_fn_name": "cosine",
            "requirements": {"sentence-transformers": {
                "specifier": ST_REQUIREMENT,
                "reason": "slq.st.SLQModule is written against sentence-transformers 6"}}}


def module_config(manifest: dict, backbone: str) -> dict:
    """slq_module.json: the backbone (a path relative to the folder, or absolute) and what it must be."""
    bb = manifest.get("backbone") or {}
    return {"backbone": backbone, "backbone_fingerprint": bb.get("fingerprint"),
            "backbone_model_type": bb.get("model_type"), "method": manifest_method(manifest),
            "embedding_dimension": manifest.get("hidden_size")}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ---- checks -------------------------------------------------------------------------------------
def _check_target(ckpt: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} exists: pass --force to replace it (it is swapped for the new folder whole)")
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder: remove it or choose another output")
    c, o = ckpt.resolve(), out.resolve()
    if c == o or o in c.parents:
        raise ExportError(f"{out} holds the checkpoint {ckpt}: export to another folder")


def _check_fingerprint(path: Path, want: str | None, ckpt: Path, verify: bool) -> None:
    """The backbone that is copied (or named instead of the recorded one) must be the checkpoint's."""
    if not verify or not want:
        return
    from slq.backbones.fingerprint import backbone_fingerprint

    have = backbone_fingerprint(path)
    if have != want:
        raise ExportError(f"backbone {path} has fingerprint {have}, but {ckpt} was trained on fingerprint {want}: "
                          "point --backbone at the backbone it was trained on")


def _read_metrics(metrics, ckpt: Path) -> dict | None:
    if metrics is None:
        return None
    if isinstance(metrics, dict):
        data = metrics
    else:
        path = Path(metrics)
        if not path.is_file():
            raise FileNotFoundError(2, "metrics file not found", str(path))
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{path} is not JSON ({e}): pass the evaluate stage's metrics (metrics/eval.json)") \
                from None
        if not isinstance(data, dict):
            raise ExportError(f"{path} holds a {type(data).__name__}, not the evaluate stage's metrics object")
    want, have = data.get("checkpoint_hash"), checkpoint_hash(ckpt)
    if want is not None and str(want) != have:
        raise ExportError(f"the metrics were computed for checkpoint {want}, not {ckpt} ({have}): evaluate this "
                          "checkpoint (slq evaluate) or leave --metrics out")
    return data


# ---- the backbone's own card --------------------------------------------------------------------
def read_card_header(path: Path) -> dict:
    """The YAML metadata header of a model card (README.md between the leading `---` lines); {} if none."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return {}
    m = re.match(r"^\ufeff?---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _backbone_card(path: Path) -> dict:
    return read_card_header(path / "README.md")


def _hub_id(path: Path, card: dict) -> str | None:
    """The backbone's Hub id: from a Hugging Face cache path (models--org--name/snapshots/rev), else
    config.json's `_name_or_path` when it names a Hub id (not a local path); None otherwise."""
    for part in Path(os.path.abspath(path)).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    try:
        name = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (FileNotFoundError, json.JSONDecodeError, OSError, AttributeError):
        name = None
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


# ---- the model card -----------------------------------------------------------------------------
def _benchmark_rows(metrics: dict, manifest: dict, split: str) -> list[dict]:
    """(benchmark, split, protocol, metric, value) rows of the evaluate stage's metrics JSON: its
    top-level numbers are the held-out split of the data the pipeline trained on, `benchmarks` the
    registered benchmarks it ran (each on its own test split)."""
    data = manifest.get("data") or {}
    own = data.get("manifest") or "the training data"
    rows = []
    n = f"{metrics.get('n_texts', '?')} captions, {metrics.get('n_images', '?')} images"
    own_split = str(metrics.get("split", split))
    for k, v in metrics.items():
        if _is_number(v) and not k.startswith("n_"):
            rows.append({"benchmark": own, "split": own_split, "protocol": _protocol(k), "where": n, "metric": k,
                         "value": v})
    for bench, values in (metrics.get("benchmarks") or {}).items():
        for k, v in (values or {}).items():
            if _is_number(v):
                rows.append({"benchmark": bench, "split": "the benchmark's test split", "protocol": _protocol(k),
                             "where": f"the benchmark's corpus (slq.benchmarks `{bench}`)", "metric": k,
                             "value": v})
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _protocol(metric: str) -> str:
    if metric.startswith("t2i_"):
        return "text->image recall@k (a caption's image in the top k)"
    if metric.startswith("i2t_"):
        return "image->text recall@k (any of the image's captions in the top k)"
    if metric == "mean_R":
        return "mean_R: the mean of those recalls"
    if metric.startswith("R@"):
        return "recall@k (a query's target in the top k)"
    return metric


def _benchmark_table(rows: list[dict]) -> str:
    """One row per benchmark: its split, its protocol (what each metric measures) and its numbers."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["benchmark"], r["split"], r["where"]), []).append(r)
    table = []
    for (bench, split, where), rs in by.items():
        protocols = list(dict.fromkeys(r["protocol"] for r in rs))
        table.append({"benchmark": f"`{bench}`", "split": split,
                      "protocol": "; ".join(protocols) + f"; exact cosine search over {where}",
                      "metrics": ", ".join(f"{r['metric']} {_fmt(r['value'])}" for r in sorted(
                          rs, key=lambda r: _metric_order(r["metric"])))})
    return _md_table(table, ["benchmark", "split", "protocol", "metrics"])


def _metric_order(name: str):
    m = re.search(r"@(\d+)$", name)
    return (name.split("@")[0], int(m.group(1)) if m else 0)


def _eval_results(rows: list[dict], name: str):
    from huggingface_hub import EvalResult

    out = []
    for r in rows:
        task = "text-to-image-retrieval" if r["metric"].startswith("t2i_") else \
            "image-to-text-retrieval" if r["metric"].startswith("i2t_") else "retrieval"
        bench = r["benchmark"]
        m = re.search(r"R@(\d+)", r["metric"])
        out.append(EvalResult(task_type=task, dataset_type=bench, dataset_name=bench, dataset_split=r["split"],
                              metric_type=f"recall_at_{m.group(1)}" if m else r["metric"],
                              metric_name=r["metric"], metric_value=float(r["value"])))
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines)


def model_card(manifest: dict, *, name: str, base_model: str, license_fields: dict, backbone: Path,
               with_backbone: bool, metrics: dict | None, split: str, st_prompts: dict, ckpt_hash: str,
               files: list[str]) -> str:
    """README.md: the Hugging Face metadata header, then the model, data, metrics, prompts and usage."""
    from huggingface_hub import ModelCardData

    bb = manifest.get("backbone") or {}
    method = manifest_method(manifest)
    rows = _benchmark_rows(metrics, manifest, split) if metrics else []
    header = ModelCardData(base_model=base_model, library_name="sentence-transformers", pipeline_tag=PIPELINE_TAG,
                           tags=list(TAGS), model_name=name, eval_results=_eval_results(rows, name) or None,
                           **license_fields).to_yaml()
    bb_where = f"`{BACKBONE_DIR}/` (copied here)" if with_backbone else f"`{backbone}` (not copied)"
    load_bb = f"folder + \"/{BACKBONE_DIR}\"" if with_backbone else json.dumps(str(backbone))
    data = manifest.get("data") or {}
    training = manifest.get("training") or {}
    prompts = manifest.get("prompts") or {}
    template = manifest.get("template") or {}
    lic = license_fields.get("license")
    parts = [f"---\n{header}\n---\n", f"# {name}\n",
             f"A multimodal retriever made with SLQ (Shared Latent Queries): method "
             f"`{method}` on the frozen backbone `{base_model}`. Texts, images and image+text pairs are embedded "
             f"into one space ({manifest.get('hidden_size')} dimensions, L2-normalised; cosine similarity).\n",
             "## Model\n",
             _md_table([
                 {"field": "method", "value": method},
                 {"field": "pooling", "value": f"{manifest.get('pooling_mode', 'queries')} "
                                               f"({manifest.get('pooling', '')})"},
                 {"field": "hidden state", "value": f"{manifest.get('hidden_state', 'final_norm')} (the decoder's "
                                                    "output the queries are read from; docs: serving, vLLM)"},
                 {"field": "latent queries", "value": manifest.get("num_queries")},
                 {"field": "embedding dimension", "value": manifest.get("hidden_size")},
                 {"field": "backbone", "value": f"{bb.get('path')} ({bb.get('model_type')}), here {bb_where}"},
                 {"field": "backbone fingerprint", "value": f"`{bb.get('fingerprint')}` (content hash of its "
                                                            "weights and config; checked on load)"},
                 {"field": "checkpoint hash", "value": f"`{ckpt_hash}`"},
                 {"field": "files", "value": ", ".join(f"`{f}`" for f in files)},
             ], ["field", "value"]) + "\n",
             "## Training data\n"]
    if data:
        parts.append(_md_table([{"field": k, "value": f"`{v}`" if isinstance(v, str) else v}
                                for k, v in data.items()], ["field", "value"]) + "\n")
        parts.append("`manifest_sha256` is the content hash of the data manifest the checkpoint was trained on "
                     "(from its `slq.json`).\n")
    else:
        parts.append("The checkpoint's `slq.json` records no training data (an untrained or zero-shot encoder).\n")
    if training:
        keep = ("steps", "batch_size", "lr", "temperature", "seed", "max_text_tokens", "warmup_steps", "method")
        parts.append("Training settings: " + ", ".join(f"{k}={training[k]}" for k in keep if k in training) + ".\n")
    parts.append("## Evaluation\n")
    if rows:
        parts.append("From the evaluate stage's metrics (`metrics/eval.json`), computed for this checkpoint "
                     f"(hash `{ckpt_hash}`).\n")
        parts.append(_benchmark_table(rows) + "\n")
    else:
        parts.append("No benchmark metrics were exported with this model (`slq export --metrics "
                     "metrics/eval.json`).\n")
    run = {k: v for k, v in (manifest.get("metrics") or {}).items() if not isinstance(v, (dict, list))}
    if run:
        parts.append("The training run's own numbers (from `slq.json`; not a retrieval benchmark):\n")
        parts.append(_md_table([{"metric": k, "value": v} for k, v in run.items()], ["metric", "value"]) + "\n")
    parts += ["## Prompts\n",
              "Every input is wrapped in the backbone's chat template with these prompts before the latent queries "
              "are appended (the module applies them; they are the checkpoint's, from `slq.json`):\n",
              _md_table([{"field": k, "value": json.dumps(v)} for k, v in prompts.items()], ["field", "value"])
              + "\n"]
    if template:
        parts.append("Rendered (`<caption>` / `<instruction>` stand for the input's text):\n")
        for k in ("text", "image", "multimodal"):
            if k in template:
                parts.append(f"- {k}: `{json.dumps(template[k])}`")
        parts.append("")
    parts.append("sentence-transformers prompts (`config_sentence_transformers.json`), prepended to an input's text "
                 "(an image alone: to its instruction) by `encode_query` / `encode_document`: "
                 + ", ".join(f"{k}={json.dumps(v)}" for k, v in st_prompts.items()) + ".\n")
    parts += ["## Usage\n",
              "Install `slq` (this repository's package) and, for the second way, `sentence-transformers>=6,<7`.\n",
              "With slq:\n",
              "```python\nimport slq.methods\n\n"
              "folder = \"path/to/this/folder\"\n"
              f"enc = slq.methods.from_pretrained({load_bb}, folder)\n"
              "t = enc.encode_text([\"a red circle on the left\"])\n"
              "i = enc.encode_image([\"photo.jpg\"])\n"
              "m = enc.encode_multimodal([(\"photo.jpg\", \"make it blue\")])\n"
              "scores = t @ i.T  # cosine (the embeddings are L2-normalised)\n```\n",
              "With sentence-transformers:\n",
              "```python\nfrom PIL import Image\nfrom sentence_transformers import SentenceTransformer\n\n"
              "model = SentenceTransformer(\"path/to/this/folder\", trust_remote_code=True)\n"
              "q = model.encode_query([\"a red circle on the left\"])\n"
              "d = model.encode_document([\"photo.jpg\", Image.open(\"other.png\"), "
              "{\"image\": \"photo.jpg\", \"text\": \"make it blue\"}])\n"
              "print(model.similarity(q, d))\n```\n",
              "`trust_remote_code=True` is what sentence-transformers 6 asks before it imports a module class of "
              "another package (here `slq.st.SLQModule`, from the installed `slq`); this folder holds no code. "
              "Strings that are paths of existing image files are images; an image+text pair is a "
              "`{\"image\": ..., \"text\": ...}` dict or an `(image, text)` tuple inside a list. "
              "Encode one modality per call (sentence-transformers refuses batches that mix them).\n"]
    if not with_backbone:
        parts.append("The backbone is not in this folder: the module loads it from the path in `slq_module.json`. "
                     "Elsewhere, pass its folder: `SentenceTransformer(folder, trust_remote_code=True, "
                     "model_kwargs={\"backbone\": \"/path/to/backbone\"})`. It must be the backbone with the "
                     "fingerprint above: a different one is refused.\n")
    parts += ["## License\n",
              (f"`{lic}`, as the backbone's model card states (or as given at export); the trained queries are a "
               "derivative of the backbone, under its terms.\n" if (lic and lic != "other")
               or license_fields.get("license_name") else
               "**Not set.** The backbone's README.md states no license, so the header says `license: other`. "
               "Set `license:` (and `license_name` / `license_link` for a custom one) to the backbone's license "
               "before publishing: the trained queries are a derivative of the backbone, under its terms.\n")]
    return "\n".join(parts)

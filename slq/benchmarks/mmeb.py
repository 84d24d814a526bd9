"""MMEB v1 (Massive Multimodal Embedding Benchmark): 36 datasets, hit@1 among ~1,000 candidates.

Layout under `root` (one folder per dataset, named exactly as in `DATASETS`):

    root/<dataset>/test.jsonl      one query per line:
        {"qry_inst": str, "qry_text": str, "qry_img_path": str | "" | null,
         "tgt_inst": str, "tgt_text": [str, ...], "tgt_img_path": [str | "" | null, ...] | null}
        the FIRST target is the positive; the rest are its candidates' negatives (~1,000 in all)
    root/images/...                the MMEB image archive; every *_img_path is relative to it

Embedding. A query is `qry_inst + " " + qry_text` (+ the image when `qry_img_path` is set); a
candidate is `tgt_inst + " " + tgt_text[i]` (+ the image `tgt_img_path[i]`). The instruction enters
through the prompt mechanism: items with the same instruction and kind (text / image /
multimodal) form one `Corpus` whose prompt template has the instruction in front of `{text}` (for
an image without text, the instruction is the prompt's image instruction). Within a dataset
every distinct (kind, prompt, item) is embedded once, however many queries list it. A leading
`<|image_1|>` placeholder (MMEB's Phi-3-V image token) is dropped from texts: the image goes
through the backbone's own chat template.

Scoring. hit@1 per query: the positive (index 0) must score highest among that query's own
candidates. Ties: a query is a miss unless the positive is the first maximum in candidate order,
as `np.argmax(scores) == 0` in the MMEB reference code; since the positive is listed first, an
exact tie between the positive and a negative counts as a hit (`info["ties_at_top"]` counts those
queries). Per dataset: mean over queries. Per meta-task, IND, OOD and overall: unweighted mean
over the datasets that ran (the VLM2Vec convention; overall is not the mean of meta-task means).
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import numpy as np

from slq.benchmarks.base import (
    Benchmark,
    Corpus,
    DataError,
    Embedder,
    MissingData,
    Result,
    files_hash,
    register_benchmark,
)

# dataset -> (meta-task, split): 10 classification, 10 VQA, 12 retrieval, 4 grounding; 20 IND, 16 OOD.
DATASETS: dict[str, tuple[str, str]] = {
    "ImageNet-1K": ("classification", "IND"),
    "N24News": ("classification", "IND"),
    "HatefulMemes": ("classification", "IND"),
    "VOC2007": ("classification", "IND"),
    "SUN397": ("classification", "IND"),
    "Place365": ("classification", "OOD"),
    "ImageNet-A": ("classification", "OOD"),
    "ImageNet-R": ("classification", "OOD"),
    "ObjectNet": ("classification", "OOD"),
    "Country211": ("classification", "OOD"),
    "OK-VQA": ("vqa", "IND"),
    "A-OKVQA": ("vqa", "IND"),
    "DocVQA": ("vqa", "IND"),
    "InfographicsVQA": ("vqa", "IND"),
    "ChartQA": ("vqa", "IND"),
    "Visual7W": ("vqa", "IND"),
    "ScienceQA": ("vqa", "OOD"),
    "VizWiz": ("vqa", "OOD"),
    "GQA": ("vqa", "OOD"),
    "TextVQA": ("vqa", "OOD"),
    "VisDial": ("retrieval", "IND"),
    "CIRR": ("retrieval", "IND"),
    "VisualNews_t2i": ("retrieval", "IND"),
    "VisualNews_i2t": ("retrieval", "IND"),
    "MSCOCO_t2i": ("retrieval", "IND"),
    "MSCOCO_i2t": ("retrieval", "IND"),
    "NIGHTS": ("retrieval", "IND"),
    "WebQA": ("retrieval", "IND"),
    "FashionIQ": ("retrieval", "OOD"),
    "Wiki-SS-NQ": ("retrieval", "OOD"),
    "OVEN": ("retrieval", "OOD"),
    "EDIS": ("retrieval", "OOD"),
    "MSCOCO": ("grounding", "IND"),
    "RefCOCO": ("grounding", "OOD"),
    "RefCOCO-Matching": ("grounding", "OOD"),
    "Visual7W-Pointing": ("grounding", "OOD"),
}
META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("IND", "OOD")
FILE = "test.jsonl"
IMAGES = "images"

_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>\s*")


@functools.lru_cache(maxsize=1 << 16)
def _clean(text) -> str:
    return _IMAGE_TOKEN.sub("", text or "").strip()


def _escape(s: str) -> str:
    """Literal text inside a str.format template."""
    return s.replace("{", "{{").replace("}", "}}")


def _side(inst: str, text: str, img: str | None) -> tuple[str, str, object]:
    """(kind, instruction, corpus item) for one query or candidate."""
    if img is None and not text:  # instruction alone: it is the text
        return "text", "", inst
    if img is None:
        return "text", inst, text
    return ("multimodal", inst, (img, text)) if text else ("image", inst, img)


def _prompt(kind: str, inst: str, base: dict) -> dict:
    """The role's base Prompts fields with the instruction put in front of the text (or as the image one)."""
    prompt = dict(base)
    if inst and kind == "image":
        prompt["image"] = " ".join(s for s in (inst, base.get("image", "")) if s)
    elif inst:
        prompt[kind] = base.get(kind, "{text}").replace("{text}", _escape(inst) + " {text}", 1)
    return prompt


@register_benchmark("mmeb")
class MMEB(Benchmark):
    """MMEB v1. Options: `datasets` (names to run; default all 36). See the module docstring."""

    paper: ClassVar[dict[str, float]] = {"classification": 60.9}
    # Base Prompts fields per role (unset fields fall back to the encoder's); a record's instruction
    # is put in front of `{text}` (default template "{text}") or becomes the image instruction.
    prompts: ClassVar[dict[str, dict]] = {"query": {}, "candidate": {}}

    def evaluate(self, embedder: Embedder, ks=(1, 5, 10)) -> Result:
        names, missing = self._select()
        per_ds, ranks, info = {}, {}, {"files": {}, "counts": {}, "ties_at_top": {}}
        for name in names:
            path = self.root / name / FILE
            queries = self._read(name, path)
            data_hash = files_hash([path])
            r, ties = self._rank(queries, embedder, data_hash)
            ranks[name] = r
            per_ds[name] = float(np.mean(r == 0))
            info["files"][name] = data_hash
            info["counts"][name] = {"queries": len(queries), "candidates": int(sum(len(q[1]) for q in queries))}
            info["ties_at_top"][name] = ties

        metrics = {**_aggregate(per_ds), **per_ds}
        max_k = max(ks)
        curves = {g: np.mean([_curve(ranks[n], max_k) for n in members], axis=0).tolist()
                  for g, members in _groups(names).items()}
        info.update(
            datasets_run=names,
            missing=missing,
            partial=bool(missing),
            subset=sorted(names) if self.options.get("datasets") else [],
            files_hash=files_hash([self.root / n / FILE for n in names]),
            prompts=self.prompts,
            metric="hit@1 (fraction); positive = first target; ties go to the first maximum",
        )
        return Result(metrics=metrics, curves=curves, info=info)

    # ---- files ---------------------------------------------------------------------------
    def _select(self) -> tuple[list[str], list[str]]:
        """Datasets to run (table order) and the missing ones; MissingData unless partial."""
        wanted = self.options.get("datasets") or list(DATASETS)
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        unknown = [d for d in wanted if d not in DATASETS]
        if unknown:
            raise ValueError(f"mmeb: unknown dataset(s) {unknown}; MMEB v1 has: {', '.join(DATASETS)}")
        if self.root is None:
            raise MissingData("mmeb: no `root` given; point it at a local MMEB copy (see slq/benchmarks/mmeb.py)")
        wanted = [d for d in DATASETS if d in wanted]
        missing = [d for d in wanted if not (self.root / d / FILE).is_file()]
        present = [d for d in wanted if d not in missing]
        if missing and (not self.partial or not present):
            raise MissingData(
                f"mmeb: {len(missing)} of {len(wanted)} dataset(s) missing under {self.root}: "
                f"{', '.join(missing)} (expected <root>/<dataset>/{FILE}). Point `root` at a full copy, "
                "choose `datasets`, or set `partial: true` to run the present ones."
            )
        return present, missing

    def _read(self, name: str, path: Path) -> list[tuple]:
        """[(query side, [candidate sides])], sides = (inst, text, image path or None); checks every record."""
        img_root = self.root / IMAGES
        out, problems, absent = [], [], []

        checked: dict[str, str] = {}

        def img(rel):
            if not rel:
                return None
            if rel not in checked:
                checked[rel] = str(img_root / rel)
                if not (img_root / rel).is_file():
                    absent.append(str(rel))
            return checked[rel]

        for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                texts = rec["tgt_text"]
                imgs = rec.get("tgt_img_path") or [None] * len(texts)
                if not isinstance(texts, list) or not texts or len(imgs) != len(texts):
                    raise ValueError("tgt_text must be a non-empty list, tgt_img_path empty or of the same length")
                q = (_clean(rec.get("qry_inst")), _clean(rec.get("qry_text")), img(rec.get("qry_img_path")))
                t_inst = _clean(rec.get("tgt_inst"))
                cands = [(t_inst, _clean(t), img(i)) for t, i in zip(texts, imgs)]
                empty = [s for s in [q, *cands] if not (s[0] or s[1] or s[2])]
                if empty:
                    raise ValueError(f"{len(empty)} side(s) with no instruction, text or image")
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"line {ln}: {type(e).__name__}: {e}")
                continue
            out.append((q, cands))
        if absent and not img_root.is_dir():
            raise MissingData(f"mmeb/{name}: the image folder {img_root} is missing (the MMEB image archive)")
        if problems or absent or not out:
            msg = [f"mmeb/{name} ({path}):"]
            if problems:
                msg.append(f"{len(problems)} bad record(s), e.g. {'; '.join(problems[:3])}")
            if absent:
                msg.append(f"{len(absent)} image(s) not found under {img_root}, e.g. {', '.join(absent[:3])}")
            if not out and not problems:
                msg.append("no records")
            raise DataError(" ".join(msg))
        return out

    # ---- embedding and scoring -----------------------------------------------------------
    def _rank(self, queries: list[tuple], embedder: Embedder, data_hash: str) -> tuple[np.ndarray, int]:
        """Rank of each query's positive among its candidates (0 = hit), and how many won on a tie."""
        groups: dict[tuple, dict] = defaultdict(dict)  # (kind, prompt JSON) -> item -> row in its group
        seen: dict[tuple, tuple] = {}  # (role, side) -> (group, row): most sides repeat across queries

        @functools.cache
        def group(role, kind, inst):
            return kind, json.dumps(_prompt(kind, inst, self.prompts.get(role, {})), sort_keys=True)

        def ref(role, side):
            if (role, side) not in seen:
                kind, inst, item = _side(*side)
                rows = groups[g := group(role, kind, inst)]
                seen[(role, side)] = (g, rows.setdefault(item, len(rows)))
            return seen[(role, side)]

        refs = [[ref("query", q)] + [ref("candidate", c) for c in cands] for q, cands in queries]
        mats, offset = [], {}
        for (kind, prompt), rows in groups.items():
            e = np.asarray(embedder.embed(Corpus(kind, list(rows), json.loads(prompt), data_hash)), np.float32)
            if e.ndim != 2 or e.shape[0] != len(rows) or not np.isfinite(e).all():
                raise ValueError(f"embedder returned {e.shape} (or non-finite values) for {len(rows)} {kind} items")
            offset[(kind, prompt)] = sum(len(m) for m in mats)
            mats.append(e)
        emb = np.concatenate(mats)  # (N_unique, D)
        idx = [np.array([offset[g] + r for g, r in row]) for row in refs]  # (1 + C,) query, then candidates
        return _positive_ranks(emb, idx)


def _positive_ranks(emb: np.ndarray, idx: list[np.ndarray], chunk: int = 256) -> tuple[np.ndarray, int]:
    """Per query, how many candidates score strictly above the positive (candidate 0), and how many
    queries the positive won on an exact tie.

    A block of queries sharing their candidates (classification labels, VQA answers) is scored as
    one (B, U) matrix over its distinct candidates; otherwise each query against its own distinct
    candidates. Either way a repeated candidate is scored once, so duplicates tie exactly.
    """
    ranks, ties = np.empty(len(idx), dtype=np.int64), 0
    for lo in range(0, len(idx), chunk):
        block = idx[lo:lo + chunk]
        uniq, inv = np.unique(np.concatenate([r[1:] for r in block]), return_inverse=True)
        cuts = np.cumsum([len(r) - 1 for r in block])[:-1]
        if len(uniq) * len(block) <= 4 * len(inv):  # shared candidates
            S = emb[[r[0] for r in block]] @ emb[uniq].T  # (B, U)
            scores = [S[j, i] for j, i in enumerate(np.split(inv, cuts))]
        else:
            scores = []
            for r in block:
                u, i = np.unique(r[1:], return_inverse=True)
                scores.append((emb[u] @ emb[r[0]])[i])  # (C,)
        for j, s in enumerate(scores):
            ranks[lo + j] = int((s[1:] > s[0]).sum())  # the positive is listed first: it wins every tie
            ties += int(ranks[lo + j] == 0 and bool((s[1:] == s[0]).any()))
    return ranks, ties


def _groups(names: list[str]) -> dict[str, list[str]]:
    """Meta-task, IND/OOD and overall -> the datasets among `names` in it (empty groups left out)."""
    g = {m: [n for n in names if DATASETS[n][0] == m] for m in META_TASKS}
    g |= {s.lower(): [n for n in names if DATASETS[n][1] == s] for s in SPLITS}
    g["overall"] = list(names)
    return {k: v for k, v in g.items() if v}


def _aggregate(per_ds: dict[str, float]) -> dict[str, float]:
    return {g: float(np.mean([per_ds[n] for n in members])) for g, members in _groups(list(per_ds)).items()}


def _curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    return np.array([np.mean(ranks < k) for k in range(1, max_k + 1)])  # (max_k,) hit@k

"""Composed image retrieval: a reference image plus a modification text retrieves the target image.

CIRR (`cirr`), under `root`:

    captions/cap.rc2.{split}.json        [{pairid, reference, target_hard, target_soft, caption,
                                           img_set: {members: [names]}}]  (test1: no targets)
    image_splits/split.rc2.{split}.json  {name: "./dev/dev-....png"}, paths relative to `image_root`
                                         (option; default `root`)

    Gallery: every image of the split, in the split file's order. A query is the reference image
    with the caption. The reference is removed from its own ranking. R@1/5/10/50 over the whole
    gallery; R_subset@1/2/3 within img_set.members minus the reference (a target outside its
    members is a miss, counted in info["counts"]["target_outside_subset"]); "avg" is
    (R@5 + R_subset@1) / 2, CIRR's headline mean. test1 has no targets: it writes the CIRR server's
    submission files (top-50 over the gallery, top-3 within members) to option `submission_dir`
    (also written for val when the option is set, to check the format).

FashionIQ (`fashioniq`), under `root`:

    captions/cap.{dress,shirt,toptee}.{split}.json  [{candidate, target, captions: [c1, c2]}]
    image_splits/split.{category}.{split}.json      [image ids]
    images/{id}.{image_ext}                         (option; default jpg)

    Per category, the gallery is that category's split images (the candidate is not removed, as in
    the reference evaluation). A query is embedded with "c1 and c2" and with "c2 and c1"; the two
    embeddings are summed and L2-normalised. R@10 and R@50 per category and their mean over the
    categories run (option `categories`; default all three).

Scores are exact dot products (`slq.retrieval.topk`); on equal scores the lower gallery index
(file order) ranks first, also within a CIRR subset. Metrics are fractions in [0, 1]; `paper`
holds the paper's numbers in percent. Bad data (duplicate pairids or image ids, references,
targets or members missing from the image split, missing or undecodable image files, malformed
rows) raises `DataError` with counts and first examples; with `partial: true` those rows (and
images) are dropped, the rest is scored, and info["partial"] / info["dropped"] say so.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from slq.benchmarks.base import (
    Benchmark,
    Corpus,
    DataError,
    Embedder,
    Result,
    files_hash,
    register_benchmark,
    require,
)
from slq.io import write_text_atomic
from slq.retrieval import first_hit_rank, recall_curve, recall_from_ranks, topk

CURVE_K = 50  # curves and the CIRR submission cover k = 1..50
SUBSET_KS = (1, 2, 3)
EXAMPLES = 5  # examples per problem in a DataError message

# The reference's (E5-V style) instructions, verbatim with their leading space (CnFaker/SLQ
# eval_qwen_on_coco.py), as Prompts fields per role.
CIR_QUERY_PROMPT = " Modify this image with {text}. Describe modified image in one word: "
CIR_GALLERY_PROMPT = " Describe this image in one word: "
QUERY_PROMPT = {"multimodal": CIR_QUERY_PROMPT}
GALLERY_PROMPT = {"image": CIR_GALLERY_PROMPT}
FIQ_CATEGORIES = ("dress", "shirt", "toptee")


# ---- shared checks -----------------------------------------------------------------------------
class _Problems:
    """Bad rows and images by reason, each with its examples; raised or counted at the end."""

    def __init__(self):
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        self.by_reason.setdefault(reason, []).append(example)

    def settle(self, what: str, partial: bool) -> dict[str, int]:
        """{reason: count} when partial (or clean); otherwise DataError listing every reason."""
        counts = {r: len(v) for r, v in self.by_reason.items()}
        if counts and not partial:
            lines = [f"  {r}: {len(v)} (e.g. {'; '.join(v[:EXAMPLES])})" for r, v in self.by_reason.items()]
            raise DataError(
                f"{what}: {sum(counts.values())} problem(s):\n" + "\n".join(lines) +
                "\nFix the files, or set `partial: true` on this benchmark to drop these and score the rest."
            )
        return counts


def _read_json(path: Path, kind: type, root: Path):
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, kind):
        raise DataError(f"{path.relative_to(root)}: expected a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def _probe(path: Path, verify: bool) -> tuple[str | None, str]:
    """(None or 'missing_image' / 'unreadable_image', a size+mtime stamp for the cache key)."""
    try:
        st = path.stat()
    except OSError:
        return "missing_image", ""
    if verify:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.verify()
        except Exception:  # noqa: BLE001 - PIL raises many types for a bad file
            return "unreadable_image", ""
    return None, f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _scan_images(paths: list[Path], verify: bool) -> tuple[list[str | None], str]:
    """Per image: None when usable, else why not; plus one fingerprint of all usable files."""
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        probes = list(pool.map(lambda p: _probe(p, verify), paths))
    stamp = hashlib.sha256("\n".join(s for _, s in probes).encode()).hexdigest()[:16]
    return [why for why, _ in probes], stamp


def _nonempty(what: str, rows: list, dropped: dict) -> None:
    if not rows:
        raise DataError(f"{what}: no usable queries left (dropped: {dropped or 'none'})")


def _curve(ranks: np.ndarray, max_k: int) -> list[float]:
    return recall_curve(ranks, max_k).tolist()


def _clean(caption) -> str:
    """A caption without surrounding blanks or trailing full stops ('' if it is not a string)."""
    return caption.strip().rstrip(".").strip() if isinstance(caption, str) else ""


# ---- CIRR ----------------------------------------------------------------------------------------
@dataclass
class _CirrData:
    names: list[str]  # gallery image names, split-file order
    paths: list[str]
    rows: list[dict]  # usable caption rows
    files: list[Path]
    dropped: dict[str, int]
    corpus_hash: str  # annotation files + image stamps (cache key)
    counts: dict[str, int] = field(default_factory=dict)


@register_benchmark("cirr")
class CIRR(Benchmark):
    """CIRR. Options: `split` (val | test1 | train; default val), `image_root` (default `root`),
    `submission_dir` (required for test1), `check_images` (decode-check every image; default true),
    `prompts` ({"query": {...}, "gallery": {...}})."""

    paper: ClassVar[dict[str, float]] = {"R@5": 63.5}
    prompts: ClassVar[dict[str, dict]] = {"query": QUERY_PROMPT, "gallery": GALLERY_PROMPT}

    @property
    def split(self) -> str:
        return str(self.options.get("split", "val"))

    def evaluate(self, embedder: Embedder, ks=(1, 5, 10)) -> Result:
        test = self.split == "test1"
        out_dir = self.options.get("submission_dir")
        if test and not out_dir:
            raise ValueError("cirr split test1 has no targets: set `submission_dir` to write the server files")
        d = self._load(has_targets=not test)
        gal = embedder.embed(Corpus("image", d.paths, self.prompts["gallery"], d.corpus_hash))  # (G, D)
        index = {n: i for i, n in enumerate(d.names)}
        items = [(d.paths[index[r["reference"]]], _clean(r["caption"])) for r in d.rows]
        qry = embedder.embed(Corpus("multimodal", items, self.prompts["query"], d.corpus_hash))  # (Q, D)

        ref = np.array([index[r["reference"]] for r in d.rows], dtype=np.int64)  # (Q,)
        members = _member_matrix([[index[m] for m in r["img_set"]["members"]] for r in d.rows], ref)  # (Q, M)
        depth = max((CURVE_K, *ks))
        top, _ = topk(qry, gal, depth, exclude=ref)  # (Q, k); the reference scores -inf
        sub = _rank_within(qry, gal, members)  # (Q, M) gallery indices, best first, -1 pads last

        info = self._info(d)
        if out_dir:
            info["submission_files"] = self._submit(Path(out_dir), d, top, sub)
        if test:
            return Result(metrics={}, curves={}, info=info)

        tgt = np.array([index[r["target_hard"]] for r in d.rows], dtype=np.int64)  # (Q,)
        ranks = first_hit_rank(top, tgt)  # (Q,)
        hit = sub == tgt[:, None]  # (Q, M)
        sub_ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), np.inf)  # (Q,)
        info["counts"]["target_outside_subset"] = int((~hit.any(axis=1)).sum())
        metrics = recall_from_ranks(ranks, sorted({1, 5, 10, 50, *ks}))
        metrics.update({f"R_subset@{k}": v for k, v in
                        ((k, float(np.mean(sub_ranks < k))) for k in SUBSET_KS)})
        metrics["avg"] = (metrics["R@5"] + metrics["R_subset@1"]) / 2
        curves = {"recall": _curve(ranks, depth), "recall_subset": _curve(sub_ranks, max(SUBSET_KS))}
        return Result(metrics=metrics, curves=curves, info=info)

    # -- data --
    def _load(self, has_targets: bool) -> _CirrData:
        split, root = self.split, self.root
        cap_rel, split_rel = f"captions/cap.rc2.{split}.json", f"image_splits/split.rc2.{split}.json"
        files = require(root, [cap_rel, split_rel], f"CIRR {split}")
        rows = _read_json(files[0], list, root)
        name_to_rel = _read_json(files[1], dict, root)
        image_root = Path(self.options.get("image_root", root))

        probs = _Problems()
        names = list(name_to_rel)
        paths = [image_root / str(name_to_rel[n]) for n in names]
        why, stamp = _scan_images(paths, bool(self.options.get("check_images", True)))
        for n, p, w in zip(names, paths, why):
            if w:
                probs.add(w, f"{n} -> {p}")
        bad = {n for n, w in zip(names, why) if w}
        split_names = set(names)
        seen, keep = set(), []
        for i, r in enumerate(rows):
            reason, example = _cirr_row_problem(r, i, seen, split_names, bad, has_targets, split_rel)
            if reason:
                probs.add(reason, example)
            else:
                keep.append(r)
        dropped = probs.settle(f"CIRR {split} ({cap_rel}, {split_rel})", self.partial)
        _nonempty(f"CIRR {split}", keep, dropped)
        good = [(n, str(p)) for n, p in zip(names, paths) if n not in bad]
        data_hash = files_hash(files)
        return _CirrData(
            names=[n for n, _ in good], paths=[p for _, p in good], rows=keep, files=files, dropped=dropped,
            corpus_hash=f"{data_hash}-{stamp}",
            counts={"queries": len(keep), "gallery": len(good), "queries_in_file": len(rows),
                    "gallery_in_file": len(names)},
        )

    def _info(self, d: _CirrData) -> dict:
        return {
            "split": self.split,
            "counts": dict(d.counts),
            "files": [str(p.relative_to(self.root)) for p in d.files],
            "data_hash": files_hash(d.files),
            "prompts": self.prompts,
            "reference_excluded": True,
            "partial": bool(self.partial),
            "dropped": d.dropped,
        }

    def _submit(self, out_dir: Path, d: _CirrData, top: np.ndarray, sub: np.ndarray) -> list[str]:
        """The CIRR server's two files: top-50 over the gallery and top-3 within the members."""
        n_top = min(CURVE_K, len(d.names) - 1)  # the reference (scored -inf) never enters
        recall, subset = {}, {}
        for r, t, s in zip(d.rows, top, sub):
            key = str(r["pairid"])
            recall[key] = [d.names[j] for j in t[:n_top]]
            subset[key] = [d.names[j] for j in s[: max(SUBSET_KS)] if j >= 0]
        out = []
        for metric, preds in (("recall", recall), ("recall_subset", subset)):
            path = out_dir / f"cirr_{self.split}_{metric}.json"
            write_text_atomic(path, json.dumps({"version": "rc2", "metric": metric, **preds}) + "\n")
            out.append(str(path))
        return out


def _cirr_row_problem(r, i: int, seen: set, split_names: set, bad: set, has_targets: bool,
                      split_rel: str) -> tuple[str | None, str]:
    """(reason, example) for an unusable caption row, or (None, "")."""
    if not isinstance(r, dict):
        return "malformed_row", f"row {i} is a {type(r).__name__}"
    pid = r.get("pairid")
    img_set = r.get("img_set")
    members = img_set.get("members") if isinstance(img_set, dict) else None
    need = ["pairid", "reference", "caption"] + (["target_hard"] if has_targets else [])
    missing = [k for k in need if r.get(k) is None] + ([] if isinstance(members, list) else ["img_set.members"])
    if missing:
        return "malformed_row", f"row {i} (pairid {pid}) lacks {', '.join(missing)}"
    if pid in seen:
        return "duplicate_pairid", f"pairid {pid} (row {i})"
    seen.add(pid)
    if not _clean(r["caption"]):
        return "empty_caption", f"pairid {pid}"
    refs = [("reference", r["reference"])] + ([("target", r["target_hard"])] if has_targets else [])
    for role, name in refs + [("member", m) for m in members]:
        if name not in split_names:
            return f"dangling_{role}", f"pairid {pid}: {role} {name!r} not in {split_rel}"
    for role, name in refs + [("member", m) for m in members]:
        if name in bad:
            return "query_with_bad_image", f"pairid {pid}: {role} {name!r} is missing or unreadable"
    if has_targets and r["target_hard"] == r["reference"]:
        return "target_is_reference", f"pairid {pid}"
    return None, ""


def _member_matrix(members: list[list[int]], ref: np.ndarray) -> np.ndarray:
    """Each query's subset without its reference (or repeats), padded with -1.  # (Q, M)"""
    rows = [list(dict.fromkeys(m for m in ms if m != r)) for ms, r in zip(members, ref)]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _rank_within(qry: np.ndarray, gal: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Members sorted per query by (score desc, gallery index asc); -1 pads stay last.  # (Q, M)"""
    score = np.full(members.shape, -np.inf)  # (Q, M)
    for j in range(members.shape[1]):  # one member column at a time: O(Q * D) memory
        ok = members[:, j] >= 0
        score[ok, j] = np.einsum("qd,qd->q", qry[ok], gal[members[ok, j]])
    pad_last = np.where(members < 0, np.iinfo(np.int64).max, members)
    order = np.lexsort((pad_last, -score), axis=-1)  # primary: -score; then gallery index
    return np.take_along_axis(members, order, axis=1)


# ---- FashionIQ -----------------------------------------------------------------------------------
@dataclass
class _FiqCategory:
    name: str
    ids: list[str]  # gallery ids, split-file order
    paths: list[str]
    rows: list[dict]
    files: list[Path]
    corpus_hash: str
    counts: dict[str, int]


@register_benchmark("fashioniq")
class FashionIQ(Benchmark):
    """FashionIQ. Options: `split` (default val), `categories` (default dress, shirt, toptee),
    `image_ext` (default jpg), `check_images` (default true), `prompts` ({"query", "gallery"})."""

    paper: ClassVar[dict[str, float]] = {"mean_R@50": 43.1}
    # The reference's instructions, per category (toptee is called "shirt"), leading space
    # included; `options.prompts` replaces them for every category.
    prompts: ClassVar[dict[str, dict]] = {}
    caption_orders: ClassVar[tuple[str, ...]] = ("c1, c2", "c2, c1")  # embedded separately, summed

    def category_prompts(self, category: str) -> dict[str, dict]:
        if self.prompts:
            return {"query": QUERY_PROMPT, "gallery": GALLERY_PROMPT, **self.prompts}
        name = "shirt" if category == "toptee" else category
        return {"query": {"multimodal": f" Change the style of this {name} to {{text}}. Describe this modified "
                                        f"{name} in one word based on its style: "},
                "gallery": {"image": f" Describe this {name} in one word based on its style: "}}

    @staticmethod
    def query_text(first: str, second: str) -> str:
        """The reference's modification text: both captions, quoted, comma-separated."""
        return '"' + ", ".join(c.strip(".?, ") for c in (first, second)) + '"'

    def evaluate(self, embedder: Embedder, ks=(1, 5, 10)) -> Result:
        cats, dropped = self._load()
        rank_ks = sorted({10, 50, *ks})
        depth = max((CURVE_K, *ks))
        metrics, curves, counts = {}, {}, {}
        for c in cats:
            ranks = self._rank(embedder, c, depth)  # (Q,)
            metrics.update({f"{c.name}_{k}": v for k, v in recall_from_ranks(ranks, rank_ks).items()})
            curves[f"recall_{c.name}"] = _curve(ranks, depth)
            counts[c.name] = c.counts
        for k in rank_ks:
            metrics[f"mean_R@{k}"] = float(np.mean([metrics[f"{c.name}_R@{k}"] for c in cats]))
        curves["recall"] = np.mean([curves[f"recall_{c.name}"] for c in cats], axis=0).tolist()
        files = [f for c in cats for f in c.files]
        info = {
            "split": self.split,
            "categories": [c.name for c in cats],
            "counts": counts,
            "files": [str(p.relative_to(self.root)) for p in files],
            "data_hash": files_hash(files),
            "prompts": {c.name: self.category_prompts(c.name) for c in cats},
            "caption_orders": list(self.caption_orders),
            "reference_excluded": False,
            "partial": bool(self.partial),
            "dropped": dropped,
        }
        return Result(metrics=metrics, curves=curves, info=info)

    @property
    def split(self) -> str:
        return str(self.options.get("split", "val"))

    def _rank(self, embedder: Embedder, c: _FiqCategory, depth: int) -> np.ndarray:
        """First-hit rank of each query's target in its category's gallery.  # (Q,)"""
        prompts = self.category_prompts(c.name)
        gal = embedder.embed(Corpus("image", c.paths, prompts["gallery"], c.corpus_hash))  # (G, D)
        index = {n: i for i, n in enumerate(c.ids)}
        qry = 0
        for swap in (False, True):
            items = []
            for r in c.rows:
                c1, c2 = _clean(r["captions"][0]), _clean(r["captions"][1])
                items.append((c.paths[index[r["candidate"]]], self.query_text(*((c2, c1) if swap else (c1, c2)))))
            qry = qry + embedder.embed(Corpus("multimodal", items, prompts["query"], c.corpus_hash))  # (Q, D)
        qry = qry / np.maximum(np.linalg.norm(qry, axis=1, keepdims=True), 1e-12)  # (Q, D)
        top, _ = topk(qry, gal, depth)  # (Q, k)
        return first_hit_rank(top, np.array([index[r["target"]] for r in c.rows], dtype=np.int64))

    # -- data --
    def _load(self) -> tuple[list[_FiqCategory], dict[str, int]]:
        cats = list(self.options.get("categories", FIQ_CATEGORIES))
        unknown = sorted(set(cats) - set(FIQ_CATEGORIES))
        if unknown or not cats:
            raise ValueError(f"fashioniq categories must be among {FIQ_CATEGORIES}, got {cats}")
        split = self.split
        rels = [r for c in cats for r in (f"captions/cap.{c}.{split}.json", f"image_splits/split.{c}.{split}.json")]
        require(self.root, rels, f"FashionIQ {split}")
        probs = _Problems()
        out = [self._load_category(c, probs) for c in cats]
        dropped = probs.settle(f"FashionIQ {split} ({', '.join(cats)})", self.partial)
        for c in out:
            _nonempty(f"FashionIQ {split} {c.name}", c.rows, dropped)
        return out, dropped

    def _load_category(self, cat: str, probs: _Problems) -> _FiqCategory:
        split, root = self.split, self.root
        cap_rel, split_rel = f"captions/cap.{cat}.{split}.json", f"image_splits/split.{cat}.{split}.json"
        files = [root / cap_rel, root / split_rel]
        rows = _read_json(files[0], list, root)
        listed = [str(x) for x in _read_json(files[1], list, root)]
        ids = list(dict.fromkeys(listed))
        for x, n in Counter(listed).items():
            if n > 1:
                probs.add("duplicate_image_id", f"{cat}: {x!r} listed {n} times in {split_rel}")
        ext = str(self.options.get("image_ext", "jpg")).lstrip(".")
        paths = [root / "images" / f"{x}.{ext}" for x in ids]
        why, stamp = _scan_images(paths, bool(self.options.get("check_images", True)))
        for x, p, w in zip(ids, paths, why):
            if w:
                probs.add(w, f"{cat}: {p}")
        bad = {x for x, w in zip(ids, why) if w}
        id_set, keep = set(ids), []
        for i, r in enumerate(rows):
            reason, example = _fiq_row_problem(r, f"{cap_rel}[{i}]", id_set, bad, split_rel)
            if reason:
                probs.add(reason, example)
            else:
                keep.append({**r, "candidate": str(r["candidate"]), "target": str(r["target"])})
        good = [(x, str(p)) for x, p in zip(ids, paths) if x not in bad]
        return _FiqCategory(
            name=cat, ids=[x for x, _ in good], paths=[p for _, p in good], rows=keep, files=files,
            corpus_hash=f"{files_hash(files)}-{stamp}",
            counts={"queries": len(keep), "gallery": len(good), "queries_in_file": len(rows),
                    "gallery_in_file": len(listed)},
        )


def _fiq_row_problem(r, where: str, ids: set, bad: set, split_rel: str) -> tuple[str | None, str]:
    if not isinstance(r, dict) or r.get("candidate") is None or r.get("target") is None:
        return "malformed_row", f"{where} lacks candidate or target"
    caps = r.get("captions")
    if not isinstance(caps, list) or len(caps) != 2 or not all(_clean(c) for c in caps):
        return "bad_captions", f"{where}: captions must be two non-empty strings, got {caps!r}"
    for role in ("candidate", "target"):
        if str(r[role]) not in ids:
            return f"dangling_{role}", f"{where}: {role} {r[role]!r} not in {split_rel}"
    for role in ("candidate", "target"):
        if str(r[role]) in bad:
            return "query_with_bad_image", f"{where}: {role} {r[role]!r} is missing or unreadable"
    return None, ""

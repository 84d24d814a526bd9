"""Exact retrieval and recall@k over embedding matrices (numpy only).

Scores are dot products, so L2-normalised embeddings give cosine similarity. Everything here
is exact: evaluation must not depend on an approximate index. The unit passed around is the
*first-hit rank*: for each query, the 0-based position of its first positive in its ranking
(`inf` when no positive is among the ranked top k). Recall@k is then `mean(rank < k)`, which is
the CLIP_benchmark definition: a query is a hit at k if ANY of its positives is in its top k.

Tie rule: on exactly equal scores the lower gallery index ranks first, so results do not
depend on the chunk size, on argpartition's internals or on the platform's sort.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

Positives = Sequence[Iterable[int]] | np.ndarray


def topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    chunk: int = 1024,
    exclude: np.ndarray | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k gallery items per query by dot product, best first.

    The (Q, G) score matrix is built `chunk` queries at a time, so memory is O(chunk * G).
    `exclude` drops gallery items per query: shape (Q,) or (Q, m) gallery indices, negative =
    nothing (e.g. the reference image in composed retrieval). Dropped items score -inf, so they
    only appear when k exceeds the items left. k is clipped to the gallery size.
    Ties: lower gallery index first. Scores must not be NaN. Returns (indices (Q, k) int64, scores (Q, k)).
    """
    dtype = np.result_type(queries, gallery, np.float32)  # float32 stays float32; ints become float
    queries, gallery = np.asarray(queries, dtype=dtype), np.asarray(gallery, dtype=dtype)
    n_q, n_g = len(queries), len(gallery)
    if k < 1 or n_g == 0:
        raise ValueError(f"need k >= 1 and a non-empty gallery, got k={k}, gallery {gallery.shape}")
    k = min(int(k), n_g)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64).reshape(n_q, -1)  # (Q, m)
    out_idx = np.empty((n_q, k), dtype=np.int64)
    out_score = np.empty((n_q, k), dtype=dtype)
    for lo in range(0, n_q, chunk):
        s = queries[lo : lo + chunk] @ gallery.T  # (C, G)
        if exclude is not None:
            rows, cols = np.nonzero(exclude[lo : lo + chunk] >= 0)
            s[rows, exclude[lo : lo + chunk][rows, cols]] = -np.inf
        out_idx[lo : lo + chunk], out_score[lo : lo + chunk] = _topk_rows(s, k)
    return out_idx, out_score


def topk_both_ways(a: np.ndarray, b: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """`topk(a, b, k)[0]` and `topk(b, a, k)[0]` from one pass over the (A, B) score matrix.

    Each chunk of rows of a @ b.T gives a's top-k directly and, column-wise, candidates for b's
    top-k, merged into a running (B, k) best list. Same results and tie rule as `topk` (lower
    index first: earlier chunks hold lower indices and the merge sort is stable), half the
    matrix products.
    """
    dtype = np.result_type(a, b, np.float32)
    a, b = np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)
    if k < 1 or len(a) == 0 or len(b) == 0:
        raise ValueError(f"need k >= 1 and non-empty inputs, got k={k}, {a.shape}, {b.shape}")
    k_ab, k_ba = min(int(k), len(b)), min(int(k), len(a))
    ab = np.empty((len(a), k_ab), dtype=np.int64)
    ba_idx = ba_score = None
    for lo in range(0, len(a), chunk):
        s = a[lo : lo + chunk] @ b.T  # (C, B)
        ab[lo : lo + chunk], _ = _topk_rows(s, k_ab)
        idx, score = _topk_rows(np.ascontiguousarray(s.T), min(k_ba, len(s)))  # (B, <=k) within the chunk
        idx = idx + lo
        if ba_idx is not None:
            idx, score = np.concatenate([ba_idx, idx], 1), np.concatenate([ba_score, score], 1)
            order = np.argsort(-score, axis=1, kind="stable")[:, :k_ba]
            idx, score = np.take_along_axis(idx, order, 1), np.take_along_axis(score, order, 1)
        ba_idx, ba_score = idx, score
    return ab, ba_idx


def _topk_rows(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each row of s (C, G), sorted by (score desc, index asc)."""
    kth = np.partition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k, None]  # (C, 1) k-th best score
    keep = s >= kth  # (C, G); exactly k per row unless the k-th score is tied
    tied = keep.sum(axis=1) > k  # (C,)
    if tied.any():  # keep every score above the k-th, then the lowest-index ties up to k
        st, kt = s[tied], kth[tied]
        eq = st == kt
        need = k - (st > kt).sum(axis=1, keepdims=True)
        keep[tied] = (st > kt) | (eq & (np.cumsum(eq, axis=1) <= need))
    idx = np.nonzero(keep)[1].reshape(len(s), k)  # (C, k), ascending index per row
    top = np.take_along_axis(s, idx, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")  # score desc; stable keeps index asc on ties
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(top, order, axis=1)


def _pairs(positives: Positives, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Positives as flat (query, gallery) index arrays.

    Accepts a list of sets/iterables, a (Q,) array (one positive each) or a (Q, P) array
    padded with negative values.
    """
    if isinstance(positives, np.ndarray) and positives.dtype != object:
        pos = positives.reshape(n_queries, -1)  # (Q, P)
        q = np.repeat(np.arange(n_queries), pos.shape[1])
        g = pos.ravel().astype(np.int64)
        keep = g >= 0
        return q[keep], g[keep]
    if len(positives) != n_queries:
        raise ValueError(f"{len(positives)} positive sets for {n_queries} queries")
    lists = [np.fromiter(p, dtype=np.int64) for p in positives]
    q = np.repeat(np.arange(n_queries), [len(p) for p in lists])
    g = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
    return q, g


def first_hit_rank(ranked_indices: np.ndarray, positives: Positives) -> np.ndarray:
    """0-based rank of each query's first positive in its ranking; inf if none is ranked.

    ranked_indices: (Q, K) gallery indices, best first. Returns (Q,) float.
    """
    ranked = np.asarray(ranked_indices, dtype=np.int64)
    n_q, depth = ranked.shape
    q, g = _pairs(positives, n_q)
    n = int(max(ranked.max(initial=0), g.max(initial=0))) + 1
    hits = np.isin(np.arange(n_q)[:, None] * n + ranked, q * n + g)  # (Q, K) bool
    return np.where(hits.any(axis=1), hits.argmax(axis=1), np.inf)


def recall_from_ranks(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """{"R@k": fraction of queries whose first positive is in their top k}."""
    ranks = np.asarray(ranks)
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def recall_at_k(ranked_indices: np.ndarray, positives: Positives, ks: Iterable[int]) -> dict[str, float]:
    """Recall@k for each k: a query hits at k if ANY of its positives is in its top k."""
    ks = list(ks)
    depth = np.shape(ranked_indices)[1]
    if max(ks) > depth:
        raise ValueError(f"recall@{max(ks)} needs rankings of depth >= {max(ks)}, got {depth}")
    return recall_from_ranks(first_hit_rank(ranked_indices, positives), ks)


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """Recall at k = 1..max_k from first-hit ranks, as a (max_k,) array (for plots)."""
    ranks = np.asarray(ranks)
    return np.array([np.mean(ranks < k) for k in range(1, max_k + 1)], dtype=np.float64)


def image_text_ranks(
    img_emb: np.ndarray, txt_emb: np.ndarray, txt_to_img: np.ndarray, k: int, chunk: int = 1024
) -> dict[str, np.ndarray]:
    """First-hit ranks both ways, searched to depth k.

    t2i: each caption's positive is its image. i2t: each image's positives are all its
    captions (txt_to_img[j] == i). Returns {"t2i": (N_txt,), "i2t": (N_img,)}.
    """
    txt_to_img = np.asarray(txt_to_img, dtype=np.int64)  # (N_txt,)
    if txt_to_img.shape != (len(txt_emb),) or not np.all((txt_to_img >= 0) & (txt_to_img < len(img_emb))):
        raise ValueError("txt_to_img must give, for each caption, its image's row in img_emb")
    t2i, i2t = topk_both_ways(txt_emb, img_emb, k, chunk)  # (N_txt, k), (N_img, k)
    by_image = [set() for _ in range(len(img_emb))]
    for j, i in enumerate(txt_to_img):
        by_image[i].add(j)
    return {"t2i": first_hit_rank(t2i, txt_to_img), "i2t": first_hit_rank(i2t, by_image)}


def summarize(ranks: dict[str, np.ndarray], ks: Iterable[int]) -> dict[str, float]:
    """{"t2i_R@k", "i2t_R@k", ..., "mean_R"} from image_text_ranks output."""
    ks = list(ks)
    out = {f"{d}_{name}": v for d in ("t2i", "i2t") for name, v in recall_from_ranks(ranks[d], ks).items()}
    out["mean_R"] = float(np.mean(list(out.values())))
    return out


def image_text_recall(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    txt_to_img: np.ndarray,
    ks: Iterable[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Image-text retrieval recall both ways plus their mean (RSUM / 2 len(ks))."""
    ks = list(ks)
    return summarize(image_text_ranks(img_emb, txt_emb, txt_to_img, max(ks), chunk), ks)

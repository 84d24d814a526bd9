"""slq.retrieval: exact top-k, recall@k and image-text recall, checked by hand and by brute force."""

import numpy as np
import pytest

from slq.retrieval import (
    first_hit_rank,
    image_text_ranks,
    image_text_recall,
    recall_at_k,
    recall_curve,
    topk,
)


def brute_topk(q, g, k, exclude=None):
    """Reference: the full score matrix, sorted by (score desc, index asc)."""
    s = (q @ g.T).astype(np.float64)  # (Q, G)
    if exclude is not None:
        for i, e in enumerate(exclude):
            if e >= 0:
                s[i, e] = -np.inf
    order = np.array([np.lexsort((np.arange(len(g)), -row)) for row in s])
    return order[:, :k]


def brute_recall(ranked, positives, k):
    return np.mean([bool(set(r[:k]) & set(p)) for r, p in zip(ranked, positives)])


# --- topk ---------------------------------------------------------------------------------


def test_topk_hand_worked():
    g = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)  # (4, 2)
    q = np.array([[1, 0], [0, 1]], dtype=np.float32)  # (2, 2)
    idx, score = topk(q, g, k=3)
    np.testing.assert_array_equal(idx, [[0, 2, 1], [1, 2, 0]])
    np.testing.assert_allclose(score, [[1, 0.6, 0], [1, 0.8, 0]])


def test_topk_ties_lower_index_wins():
    g = np.ones((6, 3), dtype=np.float32)  # every item ties
    g[4] = 2.0  # except one clear winner
    idx, score = topk(np.ones((2, 3), np.float32), g, k=3)
    np.testing.assert_array_equal(idx, [[4, 0, 1], [4, 0, 1]])
    np.testing.assert_allclose(score[:, 0], 6.0)


def test_topk_ties_at_the_cut_are_resolved_by_index():
    # Scores for one query: [1, 3, 2, 2, 2, 0]; top-2 must be [1, 2], not 3 or 4.
    g = np.array([[1], [3], [2], [2], [2], [0]], dtype=np.float32)
    for k, want in [(2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 3, 4]), (5, [1, 2, 3, 4, 0])]:
        idx, _ = topk(np.ones((1, 1), np.float32), g, k=k)
        assert idx[0].tolist() == want


def test_topk_exclude_drops_the_item_per_query():
    g = np.eye(4, dtype=np.float32)
    q = np.eye(4, dtype=np.float32)[:3] + 0.1 * np.eye(4, dtype=np.float32)[[1, 2, 3]]
    # query 0 is closest to item 0 then 1; drop item 0 for query 0 only, nothing for query 2.
    idx, score = topk(q, g, k=2, exclude=[0, 2, -1])
    assert idx[0].tolist() == [1, 2]  # 0 gone; 2 and 3 tie at 0 -> lower index
    assert idx[1].tolist() == [1, 0]  # 2 gone (query 1 = e1 + 0.1 e2)
    assert idx[2].tolist() == [2, 3]  # nothing excluded
    assert np.isfinite(score).all()


def test_topk_exclude_several_and_k_beyond_what_is_left():
    g = np.eye(3, dtype=np.float32)
    idx, score = topk(np.ones((1, 3), np.float32), g, k=3, exclude=[[0, 2]])
    assert idx[0].tolist() == [1, 0, 2]  # excluded items come last, in index order
    assert score[0, 0] == 1 and np.isneginf(score[0, 1:]).all()


def test_topk_clips_k_to_gallery():
    idx, _ = topk(np.ones((2, 2), np.float32), np.ones((3, 2), np.float32), k=10)
    assert idx.shape == (2, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_matches_brute_force_argsort(seed):
    rng = np.random.default_rng(seed)
    # Small integers: exact float arithmetic and many exact ties, the hard case.
    q = rng.integers(-2, 3, size=(97, 5)).astype(np.float32)
    g = rng.integers(-2, 3, size=(61, 5)).astype(np.float32)
    exclude = rng.integers(-1, 61, size=97)
    for k in (1, 7, 61):
        np.testing.assert_array_equal(topk(q, g, k, chunk=16)[0], brute_topk(q, g, k))
        np.testing.assert_array_equal(topk(q, g, k, chunk=16, exclude=exclude)[0], brute_topk(q, g, k, exclude))


def test_topk_random_unit_vectors_match_brute_force():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((200, 32))
    g = rng.standard_normal((150, 32))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    idx, score = topk(q, g, 10)
    np.testing.assert_array_equal(idx, brute_topk(q, g, 10))
    np.testing.assert_allclose(score, np.take_along_axis(q @ g.T, idx, axis=1))


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1000, 64)).astype(np.float32)
    g = rng.standard_normal((300, 64)).astype(np.float32)
    full_idx, full_score = topk(q, g, 10, chunk=len(q))
    for chunk in (1, 7, 128, 999):
        idx, score = topk(q, g, 10, chunk=chunk)
        np.testing.assert_array_equal(idx, full_idx)
        np.testing.assert_allclose(score, full_score, rtol=1e-6)


# --- recall -------------------------------------------------------------------------------


def test_recall_several_positives_hand_worked():
    ranked = np.array([[3, 1, 4], [0, 2, 1], [5, 6, 7]])
    positives = [{1, 9}, {2, 0}, {9}]
    # q0: first positive (1) at rank 1; q1: 0 at rank 0; q2: none.
    np.testing.assert_array_equal(first_hit_rank(ranked, positives), [1, 0, np.inf])
    assert recall_at_k(ranked, positives, [1, 2, 3]) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 2 / 3}


def test_recall_single_positive_array_and_padded_array():
    ranked = np.array([[3, 1], [0, 2], [5, 6]])
    assert recall_at_k(ranked, np.array([1, 0, 6]), [1, 2]) == {"R@1": 1 / 3, "R@2": 1.0}
    padded = np.array([[1, -1], [2, 7], [-1, -1]])  # negative = padding
    assert recall_at_k(ranked, padded, [1, 2]) == {"R@1": 0.0, "R@2": 2 / 3}


def test_recall_rejects_k_deeper_than_ranking():
    with pytest.raises(ValueError, match="depth"):
        recall_at_k(np.zeros((2, 3), int), np.array([0, 0]), [5])


def test_recall_matches_brute_force_on_random_data():
    rng = np.random.default_rng(5)
    ranked = np.stack([rng.permutation(50)[:20] for _ in range(300)])
    positives = [set(rng.choice(50, size=rng.integers(1, 6), replace=False).tolist()) for _ in range(300)]
    got = recall_at_k(ranked, positives, [1, 5, 10, 20])
    for k in (1, 5, 10, 20):
        assert got[f"R@{k}"] == pytest.approx(brute_recall(ranked, positives, k))


def test_recall_curve_is_monotone_and_agrees():
    ranks = np.array([0, 2, 2, np.inf, 4])
    np.testing.assert_allclose(recall_curve(ranks, 6), [0.2, 0.2, 0.6, 0.6, 0.8, 0.8])


# --- image-text ----------------------------------------------------------------------------


def test_image_text_recall_hand_worked():
    img = np.eye(3, dtype=np.float32)  # (3, 3)
    # captions 0,1 -> image 0; 2 -> image 1; 3 -> image 2 but it points at image 1.
    txt = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.8, 0.6]], dtype=np.float32)
    txt_to_img = np.array([0, 0, 1, 2])
    r = image_text_recall(img, txt, txt_to_img, ks=(1, 2))
    assert r["t2i_R@1"] == 0.75 and r["t2i_R@2"] == 1.0
    # i2t: image 0 -> caption 0 first (hit); image 1 -> caption 2 (hit); image 2 -> caption 3 (hit).
    assert r["i2t_R@1"] == 1.0 and r["i2t_R@2"] == 1.0
    assert r["mean_R"] == pytest.approx((0.75 + 1 + 1 + 1) / 4)


def test_image_text_recall_matches_brute_force():
    rng = np.random.default_rng(6)
    img = rng.standard_normal((40, 16)).astype(np.float32)
    txt_to_img = np.repeat(np.arange(40), 3)
    txt = img[txt_to_img] + 1.5 * rng.standard_normal((120, 16)).astype(np.float32)
    r = image_text_recall(img, txt, txt_to_img, ks=(1, 5, 10))
    t2i, i2t = brute_topk(txt, img, 10), brute_topk(img, txt, 10)
    caps = [set(np.flatnonzero(txt_to_img == i)) for i in range(40)]
    for k in (1, 5, 10):
        assert r[f"t2i_R@{k}"] == pytest.approx(brute_recall(t2i, [{i} for i in txt_to_img], k))
        assert r[f"i2t_R@{k}"] == pytest.approx(brute_recall(i2t, caps, k))
    assert set(r) == {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"mean_R"}
    assert 0 < r["t2i_R@1"] < 1  # noisy enough to be a real check


def test_image_text_ranks_rejects_bad_mapping():
    with pytest.raises(ValueError, match="txt_to_img"):
        image_text_ranks(np.eye(2), np.eye(2), np.array([0, 2]), k=1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_topk_both_ways_equals_two_topk_calls_with_ties(chunk):
    from slq.retrieval import topk_both_ways

    rng = np.random.default_rng(0)
    a = rng.integers(-2, 3, size=(23, 4)).astype(np.float32)  # small integers: many exact ties
    b = rng.integers(-2, 3, size=(11, 4)).astype(np.float32)
    ab, ba = topk_both_ways(a, b, 5, chunk)
    np.testing.assert_array_equal(ab, topk(a, b, 5)[0])
    np.testing.assert_array_equal(ba, topk(b, a, 5)[0])

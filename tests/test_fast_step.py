"""The fast training step: the prompt in length buckets, the query step compiled.

Same embeddings and query gradients as the plain split path (fp32), checked on a tiny model of
a real class; plan_buckets checked against a brute force over every grouping of the rows.
"""

import itertools
import random

import pytest
import torch
from PIL import Image

from slq.backbones.base import plan_buckets
from slq.encoder import SLQEncoder


def padded(lengths, groups):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def brute_force(lengths, k):
    """Fewest padded tokens over every assignment of rows to at most k groups (not only sorted runs)."""
    n = len(lengths)
    best = float("inf")
    for labels in itertools.product(range(k), repeat=n):
        groups = [[i for i in range(n) if labels[i] == g] for g in range(k)]
        best = min(best, padded(lengths, [g for g in groups if g]))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_plan_is_optimal_and_a_partition(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 7), rng.randint(1, 4)
    lengths = [rng.randint(1, 40) for _ in range(n)]
    groups = plan_buckets(lengths, k, tolerance=0.0)
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert 1 <= len(groups) <= k and all(groups)
    assert padded(lengths, groups) == brute_force(lengths, k)


def test_equal_lengths_stay_one_group():
    assert plan_buckets([30] * 8, 4) == [list(range(8))]


def test_fewer_groups_when_the_saving_is_within_tolerance():
    lengths = [100] * 31 + [101]
    assert len(plan_buckets(lengths, 4, tolerance=0.0)) == 2  # saves 31 padded tokens of 3232
    assert len(plan_buckets(lengths, 4)) == 1  # under 2%: one forward


def test_groups_are_runs_of_similar_length():
    lengths = [300, 12, 290, 15, 150, 160]
    groups = plan_buckets(lengths, 3)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[12, 15], [150, 160], [290, 300]]


TEXTS = ["a red circle on the left", "hi", "a much longer caption about a small blue square at the top right",
         "two green triangles", "a star"]
IMAGES = [Image.new("RGB", (60, 90), "red"), Image.new("RGB", (120, 60), "blue"), Image.new("RGB", (56, 56), "green"),
          Image.new("RGB", (90, 90), "white"), Image.new("RGB", (64, 120), "black")]


def _step(enc, inputs, buckets):
    """Embeddings and the queries' gradient of a fixed linear loss, through the split path."""
    q = enc.queries.weight
    q.grad = None
    emb = enc.embed_inputs(inputs, split=True, buckets=buckets)
    (emb * torch.linspace(-1, 1, emb.numel()).reshape(emb.shape)).sum().backward()
    out = emb.detach().clone(), q.grad.clone()
    q.grad = None
    return out


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_compiled_bucketed_step_equals_plain_split(tiny_dirs, family):
    """torch.compile of the query step (cache widths rounded up to a multiple: the two text
    batches share one compiled shape) plus the bucketed prompt: the plain split's embeddings and
    query gradients, to ~1e-5, for text and image+text batches of different widths."""
    torch.manual_seed(0)
    plain = SLQEncoder.from_pretrained(tiny_dirs[family], num_queries=4, seed=1)
    fast = SLQEncoder.from_pretrained(tiny_dirs[family], num_queries=4, seed=1)
    fast.backbone.compile_queries(cache_multiple=64)
    batches = [plain.prepare(texts=TEXTS), plain.prepare(texts=["hi", "a b", "c", "red", "blue square"]),
               plain.prepare(texts=["make it blue", "x", "turn the red circle into a big star", "flip", "zoom in"],
                             images=IMAGES)]
    widths = [b["attention_mask"].shape[1] for b in batches]
    assert len(set(widths)) == len(batches), widths  # every batch a different prompt width
    for inputs in batches:
        e1, g1 = _step(plain, inputs, 1)
        ef, gf = _step(fast, inputs, 3)
        torch.testing.assert_close(ef, e1, rtol=1e-5, atol=1e-6)
        assert (gf - g1).norm() / g1.norm() < 1e-5
        assert g1.norm() > 0
    assert fast.backbone._query_step is not None and plain.backbone._query_step is None


def test_training_with_the_fast_step_follows_the_plain_trajectory(tiny_dirs, color_pairs):
    """A few optimiser steps with prefix_buckets + compile_queries land on the plain run's queries."""
    from slq.train import FitConfig, fit

    runs = []
    for fast in (False, True):
        torch.manual_seed(0)
        enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=1)
        cfg = FitConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, prefix_buckets=3 if fast else 1,
                        compile_queries=fast)
        res = fit(enc, color_pairs, cfg, progress=False)
        runs.append((enc.queries.weight.detach().clone(), [r["loss"] for r in res.history]))
    (q1, l1), (qf, lf) = runs
    assert l1 == pytest.approx(lf, rel=1e-5)
    torch.testing.assert_close(qf, q1, rtol=1e-4, atol=1e-6)

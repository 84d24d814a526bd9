"""SLQ in mteb 2.x: the encoder wrapper, local t2i tasks, mteb's scores = the project's, `slq evaluate --mteb`."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")

from PIL import Image  # noqa: E402

from slq.data import image_path  # noqa: E402
from slq.methods import from_pretrained  # noqa: E402
from slq.miniature.tiny import build_tiny_backbone  # noqa: E402
from slq.miniature.world import generate_world  # noqa: E402
from slq.mlops.config import DataConfig  # noqa: E402
from slq.mteb import SLQMtebEncoder, coco_t2i_task, manifest_t2i_task  # noqa: E402
from slq.retrieval import image_text_ranks, recall_from_ranks  # noqa: E402
from mteb._evaluators import retrieval_metrics  # noqa: E402

KS = (1, 5, 10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mteb")
    # 20 test images x 1 caption = 20 queries (recall@10 not trivial): every recall@k is a multiple of 0.05 (exact after mteb's rounding)
    world = generate_world(DataConfig(seed=0, n_train=4, n_val=2, n_test=20, captions_per_image=1, image_size=64),
                           tmp / "world")
    enc = from_pretrained(build_tiny_backbone("qwen2_vl", tmp / "bb"), num_queries=4, seed=0)
    return world, enc


def project_scores(enc, root, rows, image_ids):
    """The project's t2i recall@k (slq.retrieval) and nDCG@10 computed here from its first-hit ranks."""
    first = {}
    for r in rows:
        first.setdefault(r["image_id"], r)
    images = [Image.open(image_path(root, first[i])).convert("RGB") for i in image_ids]
    index = {iid: n for n, iid in enumerate(image_ids)}
    img, txt = enc.encode_image(images, progress=False), enc.encode_text([r["caption"] for r in rows], progress=False)
    ranks = image_text_ranks(img, txt, np.array([index[r["image_id"]] for r in rows]), k=len(image_ids))["t2i"]
    out = {f"recall_at_{k}": v for k, v in zip(KS, recall_from_ranks(ranks, KS).values())}
    out["ndcg_at_10"] = float(np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)))  # 0-based rank
    return out


def run_mteb(model, task, monkeypatch):
    """mteb's reported scores, and the unrounded means of its own per-query scores (pytrec_eval)."""
    seen = {}
    real = retrieval_metrics.parse_metrics_from_scores

    def spy(scores, k_values):
        seen["per_query"] = scores
        return real(scores, k_values)

    monkeypatch.setattr(retrieval_metrics, "parse_metrics_from_scores", spy)
    res = mteb.evaluate(model, [task], cache=None, co2_tracker=False, show_progress_bar=False)
    reported = res.task_results[0].scores["test"][0]
    pq = seen["per_query"].values()
    exact = {f"recall_at_{k}": float(np.mean([s[f"recall_{k}"] for s in pq])) for k in KS}
    exact["ndcg_at_10"] = float(np.mean([s["ndcg_cut_10"] for s in pq]))
    return reported, exact


def test_meta_declares_image_and_text(setup):
    meta = SLQMtebEncoder(setup[1]).mteb_model_meta
    assert set(meta.modalities) == {"image", "text"}
    assert meta.similarity_fn_name == "dot"


def test_mteb_scores_equal_the_project_evaluator(setup, monkeypatch):
    world, enc = setup
    task, rows, image_ids = manifest_t2i_task(world, "test")
    assert len(rows) == 20 and len(image_ids) == 20
    ours = project_scores(enc, world, rows, image_ids)
    reported, exact = run_mteb(SLQMtebEncoder(enc), task, monkeypatch)
    diff = max(abs(exact[k] - ours[k]) for k in ours)
    print(f"\nmteb vs slq.retrieval: {ours} max|diff| {diff:.2e}")
    assert diff < 1e-6
    for k in KS:  # recall at 20 queries is exact in mteb's 5-decimal rounding
        assert abs(reported[f"recall_at_{k}"] - ours[f"recall_at_{k}"]) < 1e-6
    assert abs(reported["ndcg_at_10"] - ours["ndcg_at_10"]) <= 5e-6  # mteb rounds to 5 decimals
    assert reported["main_score"] == reported["ndcg_at_10"]


class ShuffledImages(SLQMtebEncoder):
    """A planted error: the image embeddings come back in the wrong order."""

    def encode(self, inputs, **kwargs):
        out = super().encode(inputs, **kwargs)
        if "image" in inputs.dataset.features:
            out = out[np.random.default_rng(0).permutation(len(out))]
        return out


def test_a_planted_error_is_caught(setup, monkeypatch):
    world, enc = setup
    task, rows, image_ids = manifest_t2i_task(world, "test")
    ours = project_scores(enc, world, rows, image_ids)
    _, exact = run_mteb(ShuffledImages(enc), task, monkeypatch)
    assert max(abs(exact[k] - ours[k]) for k in ours) > 1e-3


def make_coco(root):
    """A COCO folder: val2014 JPEGs (two test, one val) and Karpathy's dataset_coco.json."""
    images = []
    for n, (split, cocoid) in enumerate([("val", 73), ("test", 74), ("test", 133), ("test", 200)]):
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (56, 56), (60 * n % 256, 200 - 40 * n, 90)).save(root / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": cocoid, "imgid": n,
                       "sentids": [], "sentences": [{"raw": f"photo {cocoid} caption {k}", "tokens": [], "imgid": n}
                                                    for k in range(5)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_coco_folder_task_matches_too(setup, tmp_path, monkeypatch):
    enc = setup[1]
    src = make_coco(tmp_path / "coco")
    task, rows, image_ids = coco_t2i_task(src / "dataset_coco.json", src, tmp_path / "out", check=0)
    assert len(rows) == 15 and len(image_ids) == 3
    ours = project_scores(enc, tmp_path / "out", rows, image_ids)
    _, exact = run_mteb(SLQMtebEncoder(enc), task, monkeypatch)
    assert max(abs(exact[k] - ours[k]) for k in ours) < 1e-6


def test_cli_missing_mteb_data_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli

    for var in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / "hf"))
    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        cli.app, ["evaluate", "--mteb", "Flickr30kT2IRetrieval", "--checkpoint", str(tmp_path / "none")])
    assert res.exit_code == 1, res.output
    out = res.output.strip()  # stdout and stderr together
    assert "Traceback" not in out and isinstance(res.exception, SystemExit)
    line = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, out
    assert "Flickr30kT2IRetrieval" in line[0] and "mteb/flickr30kt2i" in line[0] and "cache" in line[0]
    unknown = CliRunner().invoke(cli.app, ["evaluate", "--mteb", "NoSuchTask123"])
    assert unknown.exit_code == 1 and "NoSuchTask123" in unknown.output

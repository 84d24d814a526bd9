"""Evaluate stage on hand-built embeddings: perfect texts give R@1 = 1, shuffled texts give chance."""

import csv
import json

import numpy as np
import pytest

from slq.mlops.config import Config
from slq.mlops.stages import evaluate

N_IMG, CAPS, DIM = 200, 2, 64


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_checkpoint(cfg: Config) -> str:
    """A query checkpoint at cfg.train.out (the records name its hash); returns the hash."""
    import torch

    from slq.checkpoint import checkpoint_hash, save_checkpoint

    save_checkpoint(cfg.path(cfg.train.out), torch.ones(2, DIM), None, {"hidden_size": DIM})
    return checkpoint_hash(cfg.path(cfg.train.out))


def write_embeddings(out, split, img, txt, txt_to_img, checkpoint_hash="abc123"):
    """The embed stage's file contract for one split."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{split}_image.npy", img)
    np.save(out / f"{split}_text.npy", txt)
    with open(out / f"{split}_image.jsonl", "w") as f:
        for i in range(len(img)):
            f.write(json.dumps({"image_id": i, "image": f"images/{i}.png", "split": split}) + "\n")
    with open(out / f"{split}_text.jsonl", "w") as f:
        for j, i in enumerate(txt_to_img):
            f.write(json.dumps({"id": j, "image_id": int(i), "caption": f"c{j}", "split": split}) + "\n")
    (out / "meta.json").write_text(json.dumps({"checkpoint_hash": checkpoint_hash, "dim": DIM, "backbone": "tiny",
                                               "data_hash": "d0"}))


def make_cfg(tmp_path, shuffle: bool) -> Config:
    rng = np.random.default_rng(0)
    img = unit(rng.standard_normal((N_IMG, DIM)))  # (N_img, D)
    txt_to_img = np.repeat(np.arange(N_IMG), CAPS)  # (N_txt,)
    txt = unit(img[txt_to_img] + 0.01 * rng.standard_normal((N_IMG * CAPS, DIM)))  # (N_txt, D)
    if shuffle:  # texts no longer sit next to their image
        txt = txt[rng.permutation(len(txt))]
    cfg = Config(root=str(tmp_path))
    write_embeddings(tmp_path / cfg.embed.out, cfg.evaluate.split, img, txt, txt_to_img, write_checkpoint(cfg))
    return cfg


def test_matching_texts_give_perfect_recall_and_files(tmp_path):
    cfg = make_cfg(tmp_path, shuffle=False)
    metrics = evaluate.run(cfg)
    assert json.loads(cfg.path(cfg.evaluate.metrics).read_text()) == metrics
    for d in ("t2i", "i2t"):
        for k in cfg.evaluate.ks:
            assert metrics[f"{d}_R@{k}"] == 1.0
    assert metrics["mean_R"] == 1.0
    assert metrics["n_images"] == N_IMG and metrics["n_texts"] == N_IMG * CAPS
    assert metrics["checkpoint_hash"] == json.loads((cfg.path(cfg.embed.out) / "meta.json").read_text())["checkpoint_hash"]

    rows = list(csv.DictReader(cfg.path(cfg.evaluate.plots).open()))
    assert [int(r["k"]) for r in rows] == list(range(1, 51))
    assert all(float(r["t2i"]) == 1.0 and float(r["i2t"]) == 1.0 for r in rows)
    leftovers = [p for p in cfg.path(cfg.evaluate.metrics).parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_embeddings_of_another_checkpoint_are_refused(tmp_path):
    from slq.mlops.records import StaleRecordError

    cfg = make_cfg(tmp_path, shuffle=False)
    meta = cfg.path(cfg.embed.out) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "checkpoint_hash": "0123456789abcdef"}))
    with pytest.raises(StaleRecordError, match="describes checkpoint 0123456789abcdef, but .* is checkpoint [0-9a-f]{16}"):
        evaluate.run(cfg)
    assert not cfg.path(cfg.evaluate.metrics).exists()  # nothing written


def test_shuffled_texts_give_chance(tmp_path):
    cfg = make_cfg(tmp_path, shuffle=True)
    metrics = evaluate.run(cfg)
    # chance: t2i R@k = k / N_img; i2t R@k ~ 1 - (1 - k/N_txt)^CAPS ~ k / N_img as well.
    for k in (1, 5, 10):
        assert metrics[f"t2i_R@{k}"] < 3 * k / N_IMG + 0.02
        assert metrics[f"i2t_R@{k}"] < 3 * k / N_IMG + 0.02
    rows = list(csv.DictReader(cfg.path(cfg.evaluate.plots).open()))
    t2i = [float(r["t2i"]) for r in rows]
    assert t2i == sorted(t2i) and 0.1 < t2i[-1] < 0.4  # chance at k=50 is 0.25


def test_ks_beyond_50_extend_the_curve(tmp_path):
    cfg = make_cfg(tmp_path, shuffle=False)
    cfg.evaluate.ks = [1, 80]
    metrics = evaluate.run(cfg)
    assert set(metrics) >= {"t2i_R@1", "t2i_R@80", "i2t_R@1", "i2t_R@80", "mean_R"}
    assert len(cfg.path(cfg.evaluate.plots).read_text().splitlines()) == 81  # header + k = 1..80


def test_missing_embeddings_name_the_file(tmp_path):
    cfg = make_cfg(tmp_path, shuffle=False)
    (cfg.path(cfg.embed.out) / "test_image.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test_image.npy"):
        evaluate.run(cfg)
    assert not cfg.path(cfg.evaluate.metrics).exists()


def test_caption_of_unknown_image_is_an_error(tmp_path):
    cfg = make_cfg(tmp_path, shuffle=False)
    path = cfg.path(cfg.embed.out) / "test_text.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"id": 0, "image_id": 9999, "caption": "x", "split": "test"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="9999"):
        evaluate.run(cfg)

"""Multi-process training on CPU (gloo): 2 ranks x half a batch == 1 process x the whole batch.

Checks that `gather_features` + `sync_gradients` give every rank the exact gradient of the
global-batch loss (queries and temperature), and that `fit` under WORLD_SIZE=2 follows the same
trajectory as a single process with the doubled batch.
"""

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_k, _v)

import socket

import pytest
import torch

WORLD = 2
N_PAIRS = 8
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan",
          "black", "pink", "brown", "gray", "navy", "olive", "teal", "maroon"]
SHAPES = ["circle", "square"]


def _pairs(n: int):
    """n (image, caption) pairs: a coloured shape on a light background, captions of varied length."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        color, shape = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS) + i) % 2]
        im = Image.new("RGB", (56, 56), "lightgray")
        d = ImageDraw.Draw(im)
        (d.ellipse if shape == "circle" else d.rectangle)([12, 12, 44, 44], fill=color)
        caption = f"a {color} {shape}" + (" in the middle of a plain grey picture" if i % 3 == 0 else "")
        out.append((im, caption))
    return out


def _encoder(backbone_dir):
    from slq.encoder import SLQEncoder

    return SLQEncoder.from_pretrained(backbone_dir, num_queries=4, seed=7, device="cpu", dtype="float32")


def _grads(enc, pairs, split: bool):
    """Loss on `pairs` (gathered across ranks when a group is up), backward, sync; the two gradients."""
    from slq.loss import ContrastiveLoss, sync_gradients

    loss_fn = ContrastiveLoss(0.07)
    q = enc.queries.weight
    q.grad = None
    img = enc.embed_inputs(enc.prepare(images=[p[0] for p in pairs]), split=split)
    txt = enc.embed_inputs(enc.prepare(texts=[p[1] for p in pairs]), split=split)
    loss = loss_fn(img, txt)
    loss.backward()
    sync_gradients(q, loss_fn.log_temp)
    return {"loss": loss.detach(), "queries": q.grad.detach().clone(),
            "log_temp": loss_fn.log_temp.grad.detach().clone()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world: int, port: int) -> None:
    """Set the env:// variables torchrun would set, then join through the project's own entry point."""
    from slq.distributed import init_distributed_from_env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert init_distributed_from_env()
    assert torch.distributed.get_backend() == "gloo"


# ---- rank body (module level so that the spawn start method can pickle it) ------------------------
def _fit_cfg(batch_size: int):
    from slq.train import FitConfig

    return FitConfig(steps=3, batch_size=batch_size, lr=1e-3, warmup_steps=1, grad_clip=1.0, seed=3,
                     save_every=1000)


def _worker(rank: int, world: int, port: int, backbone_dir: str, out_dir: str) -> None:
    """One rank: (1) the gradient of its half of the batch, synced; (2) `fit` for 3 steps from a fresh init."""
    from slq.train import fit

    _join_group(rank, world, port)
    try:
        enc = _encoder(backbone_dir)
        per = N_PAIRS // world
        shard = _pairs(N_PAIRS)[rank * per:(rank + 1) * per]
        grads = {f"split={s}": _grads(enc, shard, split=s) for s in (True, False)}
        torch.save(grads, os.path.join(out_dir, f"grads_rank{rank}.pt"))

        enc = _encoder(backbone_dir)
        res = fit(enc, _pairs(2 * N_PAIRS), _fit_cfg(N_PAIRS // world), progress=False)
        torch.save({"queries": enc.queries.weight.detach().clone(), "log_temp": res.log_temp,
                    "losses": [h["loss"] for h in res.history]}, os.path.join(out_dir, f"fit_rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


# ---- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    from slq.miniature.tiny import build_tiny_backbone

    return build_tiny_backbone("qwen2_vl", tmp_path_factory.mktemp("ddp") / "qwen2_vl")


@pytest.fixture(scope="module")
def rank_results(backbone_dir, tmp_path_factory):
    """Spawn the 2 ranks once (process start-up dominates the cost) and load what each saved."""
    import torch.multiprocessing as mp

    assert not torch.distributed.is_initialized()
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(backbone_dir), str(out)), nprocs=WORLD, join=True,
             start_method="spawn")
    return {kind: [torch.load(out / f"{kind}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
            for kind in ("grads", "fit")}


@pytest.mark.slow
def test_two_ranks_get_the_full_batch_gradient(backbone_dir, rank_results):
    ranks = rank_results["grads"]

    enc = _encoder(backbone_dir)  # the same init as every rank
    for key in ("split=True", "split=False"):
        ref = _grads(enc, _pairs(N_PAIRS), split=key == "split=True")
        assert ref["queries"].abs().max() > 0 and ref["log_temp"].abs() > 0
        for r, got in enumerate(ranks):
            g = got[key]
            torch.testing.assert_close(g["loss"], ref["loss"], rtol=1e-5, atol=1e-6, msg=f"{key} rank {r} loss")
            scale = ref["queries"].abs().max().item()
            torch.testing.assert_close(g["queries"], ref["queries"], rtol=1e-4, atol=1e-4 * scale,
                                       msg=lambda m, key=key, r=r: f"{key} rank {r} query gradient: {m}")
            torch.testing.assert_close(g["log_temp"], ref["log_temp"], rtol=1e-4, atol=1e-7,
                                       msg=lambda m, key=key, r=r: f"{key} rank {r} log_temp gradient: {m}")


@pytest.mark.slow
def test_fit_on_two_ranks_matches_one_process(backbone_dir, rank_results):
    from slq.train import fit

    ranks = rank_results["fit"]

    enc = _encoder(backbone_dir)
    q0 = enc.queries.weight.detach().clone()
    res = fit(enc, _pairs(2 * N_PAIRS), _fit_cfg(N_PAIRS), progress=False)
    q = enc.queries.weight.detach()
    assert (q - q0).abs().max() > 1e-3  # the queries moved far more than the tolerance
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["queries"], q, rtol=0, atol=1e-5, msg=lambda m, r=r: f"rank {r} queries: {m}")
        torch.testing.assert_close(got["log_temp"], res.log_temp, rtol=0, atol=1e-6)
        assert got["losses"] == pytest.approx([h["loss"] for h in res.history], abs=1e-5)

"""fit(): learning, resume after a kill, divergence handling; and bad input errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from slq.checkpoint import load_checkpoint
from slq.encoder import SLQEncoder
from slq.inputs import InputError
from slq.train import FitConfig, TrainingDiverged, batch_indices, fit


@pytest.fixture
def enc(tiny_dirs):
    return SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3)


def test_batches_depend_only_on_seed_and_step():
    a = batch_indices(7, 100, 16, seed=1)
    assert torch.equal(a, batch_indices(7, 100, 16, seed=1))
    assert not torch.equal(a, batch_indices(7, 100, 16, seed=2))
    epoch = torch.cat([batch_indices(s, 100, 16, seed=1) for s in range(6)])
    assert len(set(epoch.tolist())) == 96  # no repeats within an epoch


@pytest.mark.slow
def test_fit_lowers_the_loss(enc, color_pairs):
    cfg = FitConfig(steps=240, batch_size=16, lr=5e-2, warmup_steps=10, save_every=1000)
    res = fit(enc, color_pairs, cfg, progress=False)
    hist = res.history
    assert set(res.start_cosine) == {"image", "text"} and all(-1 <= v <= 1 for v in res.start_cosine.values())
    first = np.mean([h["loss"] for h in hist[:20]])
    last = np.mean([h["loss"] for h in hist[-20:]])
    assert last < first - 0.5, (first, last)
    assert hist[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at zero


def test_batch_spread_and_the_collapse_warning():
    """The start-of-training check: orthogonal rows spread 0, one repeated direction spreads 1 (scale
    does not matter), and only a spread above COLLAPSED_COSINE on some side warns, naming that side."""
    import warnings

    from slq.train import COLLAPSED_COSINE, batch_spread, warn_if_collapsed

    assert batch_spread(torch.eye(4)) == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[1.0, 2.0, 3.0]]) * torch.tensor([[1.0], [2.0], [0.5]])
    assert batch_spread(same) == pytest.approx(1.0, abs=1e-6)
    pair = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # 45 degrees: cos = 0.7071
    assert batch_spread(pair) == pytest.approx(2 ** -0.5, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_collapsed({"image": 0.5, "text": COLLAPSED_COSINE})
    with pytest.warns(RuntimeWarning, match=r"nearly collinear .*text 0\.996") as got:
        warn_if_collapsed({"image": 0.5, "text": 0.996})
    assert "image" not in str(got[0].message)


def test_resume_after_kill_matches_uninterrupted(tiny_dirs, color_pairs, tmp_path):
    cfg = FitConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, save_every=2, seed=5)
    whole = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3)
    ref = fit(whole, color_pairs, cfg, tmp_path / "a", progress=False)

    killed = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3)
    fit(killed, color_pairs, cfg, tmp_path / "b", progress=False, stop_after=3)  # dies after step 3
    restarted = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3)
    res = fit(restarted, color_pairs, cfg, tmp_path / "b", progress=False)
    assert res.resumed_from == 2  # the last checkpoint before the kill
    torch.testing.assert_close(restarted.queries.weight, whole.queries.weight, rtol=0, atol=1e-6)
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], abs=1e-6)
    q, log_temp, manifest = load_checkpoint(tmp_path / "b" / "last" / "queries")
    assert manifest["step"] == 6 and torch.equal(q, whole.queries.weight.detach())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(enc, color_pairs, tmp_path):
    cfg = FitConfig(steps=10, batch_size=8, lr=1e-2, warmup_steps=1, save_every=2)

    def poison(rec):
        if rec["step"] == 2:
            with torch.no_grad():
                enc.queries.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="at step 2 .*last good checkpoint"):
        fit(enc, color_pairs, cfg, tmp_path, progress=False, on_step=poison)
    q, _, manifest = load_checkpoint(tmp_path / "last" / "queries")
    assert manifest["step"] == 2 and torch.isfinite(q).all()


def test_nan_gradient_with_finite_loss_stops_before_the_update(enc, color_pairs, tmp_path):
    cfg = FitConfig(steps=10, batch_size=8, lr=1e-2, warmup_steps=1, save_every=2)
    hooks = []

    def poison(rec):
        if rec["step"] == 2:
            hooks.append(enc.queries.weight.register_hook(lambda g: g * float("nan")))

    with pytest.raises(TrainingDiverged, match="non-finite gradient at step 2"):
        fit(enc, color_pairs, cfg, tmp_path, progress=False, on_step=poison)
    hooks[0].remove()
    assert torch.isfinite(enc.queries.weight).all()  # the bad step never reached the optimiser
    q, _, manifest = load_checkpoint(tmp_path / "last" / "queries")
    assert manifest["step"] == 2 and torch.equal(q, enc.queries.weight.detach())


def test_too_little_data_is_a_clear_error(enc, color_pairs):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        fit(enc, color_pairs[:3], FitConfig(steps=1, batch_size=8), progress=False)


def test_bad_inputs_name_the_item(enc, tmp_path):
    corrupt = tmp_path / "bad.png"
    Image.new("RGB", (40, 40), "red").save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:30])
    ok = Image.new("RGB", (40, 40), "blue")
    with pytest.raises(InputError, match=r"image #1 .*bad\.png.*cannot be decoded"):
        enc.encode_image([ok, corrupt])
    with pytest.raises(InputError, match=r"image #0 .*not found"):
        enc.encode_image([tmp_path / "missing.jpg"])
    with pytest.raises(InputError, match="text #2 is empty"):
        enc.encode_text(["a", "b", "  "])
    with pytest.raises(InputError, match="instruction #0 is empty"):
        enc.encode_multimodal([(ok, "")])


def test_huge_image_is_resized_to_the_pixel_budget(enc):
    huge = Image.new("RGB", (3000, 2000), "red")
    inputs = enc.prepare(images=[huge])
    ip = enc.backbone.processor.image_processor
    budget = ip.size["longest_edge"] if hasattr(ip, "size") else ip.max_pixels
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert h * w * 14 * 14 <= budget
    assert enc.encode_image([huge]).shape == (1, enc.backbone.hidden_size)


def test_time_based_checkpoints_resume_exactly(tiny_dirs, color_pairs, tmp_path):
    """Checkpoints also come by time (`save_every_minutes`), whichever of step and time comes first; a run
    killed after one resumes from it and ends as an uninterrupted run. The clock is injected: a step
    takes one minute, a checkpoint is due 2.5 minutes after the last, so saves fall at steps 4 and 7."""
    cfg = FitConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, save_every=1000, save_every_minutes=2.5, seed=5)
    whole = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3)
    ref = fit(whole, color_pairs, cfg, progress=False)

    def run(work, stop_after=None, saves=None):
        now = [0.0]
        enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3)

        def tick(rec):
            now[0] += 60.0
            if saves is not None and (work / "last").is_dir():
                saves.add(load_checkpoint(work / "last" / "queries")[2]["step"])

        return enc, fit(enc, color_pairs, cfg, work, progress=False, stop_after=stop_after, on_step=tick,
                        clock=lambda: now[0])

    saves = set()
    run(tmp_path / "a", saves=saves)
    assert saves == {4, 7, 8}  # by time (4, 7) and at the end; save_every=1000 alone would give only 8
    run(tmp_path / "b", stop_after=6)  # killed after step 6: the last checkpoint is step 4's
    restarted, res = run(tmp_path / "b")
    assert res.resumed_from == 4
    torch.testing.assert_close(restarted.queries.weight, whole.queries.weight, rtol=0, atol=1e-6)
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], abs=1e-6)


def test_time_based_checkpoints_on_the_real_clock(tiny_dirs, color_pairs, tmp_path):
    """With the real clock and an interval shorter than a step, every step is saved: a kill after
    step 3 loses nothing. `None` turns the time-based checkpoints off (steps only)."""
    cfg = FitConfig(steps=5, batch_size=8, lr=1e-2, warmup_steps=1, save_every=1000, save_every_minutes=1e-6, seed=1)
    enc = SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3)
    fit(enc, color_pairs, cfg, tmp_path / "a", progress=False, stop_after=3)
    assert load_checkpoint(tmp_path / "a" / "last" / "queries")[2]["step"] == 3
    res = fit(SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3), color_pairs, cfg,
              tmp_path / "a", progress=False)
    assert res.resumed_from == 3 and res.steps == 5

    off = FitConfig(steps=5, batch_size=8, lr=1e-2, warmup_steps=1, save_every=1000, save_every_minutes=None)
    fit(SLQEncoder.from_pretrained(tiny_dirs["qwen2_vl"], num_queries=4, seed=3), color_pairs, off, tmp_path / "b",
        progress=False, stop_after=3)
    assert not (tmp_path / "b").exists()  # nothing saved before the end


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "5"])
def test_save_every_minutes_must_be_positive(enc, color_pairs, bad):
    cfg = FitConfig(steps=1, batch_size=8, save_every_minutes=bad)
    with pytest.raises(ValueError, match=r"^train\.save_every_minutes is .*: give a number of minutes > 0, or null"):
        fit(enc, color_pairs, cfg, progress=False)


# ---- the pipeline's resume folders (slq.mlops.training): none left empty after a finished or stopped run ----

@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """A tiny world (16 training scenes) and a tiny random backbone, as a params.yaml the loader reads."""
    import yaml

    from slq.miniature.tiny import build_tiny_backbone
    from slq.miniature.world import generate_world
    from slq.mlops.config import DataConfig

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("work_folders")
    data = {"root": "data/world", "n_train": 16, "n_val": 2, "n_test": 2, "image_size": 64}
    generate_world(DataConfig(**data), root / "data/world")
    backbone = build_tiny_backbone("qwen2_vl", root / "backbone")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(data, builtin=False)
    params["backbone"].update(path=str(backbone), builtin=False, dtype="float32", device="cpu")
    params["train"].update(steps=4, num_queries=4, lr=0.05, warmup_steps=1, batch_size=8, seed=3)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


def _train(params, tag: str, on_step=None, **train):
    from slq.mlops.config import load_config
    from slq.mlops.training import train_method

    cfg = load_config(params, {f"train.{k}": v for k, v in train.items()})
    out = params.parent / tag
    return cfg, train_method(cfg, "slq", out / "ckpt", lr=cfg.train.lr, metrics_path=out / "train.json",
                             on_step=on_step, progress=False)


def _stop_at(step: int):
    def on_step(rec):
        if rec["step"] == step:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the run

    return on_step


def test_no_empty_work_folder_after_a_finished_run(tiny_project):
    cfg, metrics = _train(tiny_project, "done", work_dir="done/.work", save_every=1)
    assert metrics["steps"] == 4 and (tiny_project.parent / "done" / "ckpt").is_dir()
    assert not cfg.path(cfg.train.work_dir).exists()  # the run's resume folder and train.work_dir are gone
    assert sorted(p.name for p in (tiny_project.parent / "done").iterdir()) == ["ckpt", "train.json"]


def test_a_stopped_run_keeps_its_checkpoint_and_no_empty_folder(tiny_project):
    work = tiny_project.parent / "stopped" / ".work"
    with pytest.raises(KeyboardInterrupt):  # stopped before its first checkpoint: nothing to keep
        _train(tiny_project, "stopped", _stop_at(1), work_dir="stopped/.work", save_every=100)
    assert not work.exists()
    with pytest.raises(KeyboardInterrupt):  # stopped after step 2's checkpoint: kept, and nothing else
        _train(tiny_project, "stopped", _stop_at(3), work_dir="stopped/.work", save_every=2)
    (run,) = work.iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["last"]
    _, metrics = _train(tiny_project, "stopped", work_dir="stopped/.work", save_every=2)
    assert metrics["resumed_from"] == 2 and metrics["steps"] == 4
    assert not work.exists()


def test_what_a_killed_run_left_is_tidied_by_the_next(tiny_project):
    """A SIGKILL runs no clean-up: an empty resume folder (another run's), an unfinished checkpoint copy
    and a set-aside one in this run's folder. The next run tidies them, resumes, and leaves nothing."""
    from slq.mlops.training import work_folder

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_project, "killed", _stop_at(3), work_dir="killed/.work", save_every=2)
    work = tiny_project.parent / "killed" / ".work"
    (run,) = work.iterdir()
    (work / "0123456789ab").mkdir()  # an empty resume folder
    (run / ".last.tmp-x1y2").mkdir()
    (run / ".last.tmp-x1y2" / "train_state.pt").write_bytes(b"half")
    (run / "last").rename(run / ".last.old-12345")  # killed between write_atomic_dir's two renames
    cfg, metrics = _train(tiny_project, "killed", work_dir="killed/.work", save_every=2)
    assert work_folder(cfg, "slq", cfg.train.lr, str(cfg.path(cfg.backbone.path))) == run
    assert metrics["resumed_from"] == 2  # the set-aside checkpoint was put back
    assert not work.exists()

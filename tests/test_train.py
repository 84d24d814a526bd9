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

"""Training without clean references (semray.selfsup): blind-spot masks (Noise2Void, structN2V along the
fast-scan axis), the masked loss, Noise2Noise pairs, their pipeline stage, and tiny Ray Train runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_base, train_config

from semray.config.base import ConfigError, load_config
from semray.config.data import DatasetConfig
from semray.config.loss import loss_config
from semray.config.model import UNetConfig
from semray.config.noise import NoiseConfig
from semray.config.train import TrainConfig
from semray.data import add_noise_batch, render_record
from semray.metrics import psnr
from semray.selfsup import (
    SelfSupervisedObjective,
    add_noise_pair_batch,
    apply_blind_spot,
    blind_segment_offsets,
    masked_loss,
    replacement_offsets,
    sample_blind_pixels,
)
from semray.train.crops import CropSpec, crop_batch, crop_frames
from semray.train.pipeline import selfsup_noise_batch

# ------------------------------------------------------------------------------------ mask geometry


def test_segment_and_replacement_offsets_known_values() -> None:
    np.testing.assert_array_equal(blind_segment_offsets(0), [[0, 0]])
    np.testing.assert_array_equal(blind_segment_offsets(2, "x"), [[0, -2], [0, -1], [0, 0], [0, 1], [0, 2]])
    np.testing.assert_array_equal(blind_segment_offsets(1, "y"), [[-1, 0], [0, 0], [1, 0]])
    assert len(replacement_offsets(2, 0)) == 24  # 5x5 window minus the pixel itself
    assert len(replacement_offsets(2, 2, "x")) == 20  # minus the whole 5-px row segment
    assert len(replacement_offsets(1, 4, "x")) == 6  # a segment longer than the window blocks its row
    offs = replacement_offsets(3, 2, "y")
    assert not ((offs[:, 1] == 0) & (np.abs(offs[:, 0]) <= 2)).any()
    with pytest.raises(ValueError, match="radius"):
        replacement_offsets(0, 0)
    with pytest.raises(ValueError, match="axis"):
        blind_segment_offsets(1, "z")  # type: ignore[arg-type]


@pytest.mark.parametrize(("shape", "fraction"), [((64, 64), 0.02), ((32, 48), 0.1), ((16, 16), 0.002)])
def test_masks_hit_the_configured_fraction(shape: tuple[int, int], fraction: float) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.random((6, *shape), dtype=np.float32)
    for half in (0, 2):
        b = apply_blind_spot(noisy, fraction, rng, half_length=half)
        want = max(1, round(fraction * shape[0] * shape[1]))
        np.testing.assert_array_equal(b.mask.sum(axis=(1, 2)), want)  # distinct pixels, exact count
        assert b.blinded[b.mask].all()
        # everything outside the blinded pixels is untouched
        np.testing.assert_array_equal(b.inputs[~b.blinded], noisy[~b.blinded])
    pix = sample_blind_pixels(3, (10, 20), 0.5, np.random.default_rng(1))
    assert pix.shape == (3, 100, 2) and pix[..., 0].max() < 10 and pix[..., 1].max() < 20


@pytest.mark.parametrize(("half", "axis"), [(0, "x"), (2, "x"), (3, "y")])
def test_blinded_pixels_hold_only_values_from_outside_the_segment(half: int, axis: str) -> None:
    """One blind pixel per crop, many crops (borders included): every altered pixel must hold the original
    value of a pixel of the window *outside* the blinded segment, never one of the segment."""
    n, h, w, radius = 400, 9, 9, 2
    noisy = np.arange(n * h * w, dtype=np.float32).reshape(n, h, w)  # unique values -> positions
    b = apply_blind_spot(
        noisy, 1 / (h * w), np.random.default_rng(3), half_length=half, axis=axis, radius=radius
    )
    seg = {tuple(o) for o in blind_segment_offsets(half, axis)}
    allowed = {tuple(o) for o in replacement_offsets(radius, half, axis)}
    altered_any = 0
    for i in range(n):
        ((cy, cx),) = np.argwhere(b.mask[i])
        for y, x in np.argwhere(b.blinded[i]):
            assert (y - cy, x - cx) in seg
            src = int(b.inputs[i, y, x]) - i * h * w
            sy, sx = divmod(src, w)
            assert (sy - cy, sx - cx) in allowed, (i, (cy, cx), (y, x), (sy, sx))
            altered_any += 1
    assert altered_any >= n  # every crop was altered (at least its centre)


def test_masked_loss_only_sees_masked_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 1, 16, 16, generator=g, requires_grad=True)
    target = torch.rand(4, 1, 16, 16, generator=g)
    mask = torch.rand(4, 1, 16, 16, generator=g) < 0.1
    loss = masked_loss(pred, target, mask)
    manual = ((pred.detach() - target)[mask] ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(manual), rel=1e-6)
    loss.backward()
    assert pred.grad is not None
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).all()
    changed = pred.detach().clone()
    changed[~mask] += 10.0  # anything outside the mask: no effect
    assert float(masked_loss(changed, target, mask)) == pytest.approx(float(loss.detach()), rel=1e-6)
    l1 = masked_loss(pred.detach(), target, mask, "l1")
    assert float(l1) == pytest.approx(float((pred.detach() - target)[mask].abs().mean()), rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        masked_loss(pred, target, torch.zeros_like(mask))


# --------------------------------------------------- the constructed case: row-correlated noise


def _row_correlated_noise(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Zero-mean unit-variance noise correlated along x only: white noise summed over 3 neighbours in a row
    (correlation 2/3 at lag 1, 1/3 at lag 2, 0 beyond); rows are independent. float32 (n, h, w)."""
    white = rng.standard_normal((n, h, w + 2))
    return ((white[:, :, :-2] + white[:, :, 1:-1] + white[:, :, 2:]) / np.sqrt(3.0)).astype(np.float32)


def _train_blind_spot_on_pure_noise(half: int, steps: int = 200) -> dict[str, float]:
    """Train a tiny fully convolutional net with a blind-spot objective on pure noise (no signal at all: the
    ideal output is 0 everywhere) and measure how much of the noise it passes through."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x = _row_correlated_noise(rng, 8, 32, 32)
        b = apply_blind_spot(x, 0.05, rng, half_length=half, axis="x", radius=2)
        pred = net(torch.from_numpy(b.inputs)[:, None])
        loss = masked_loss(pred, torch.from_numpy(x)[:, None], torch.from_numpy(b.mask)[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    test_rng = np.random.default_rng(99)
    x = _row_correlated_noise(test_rng, 8, 64, 64)
    with torch.no_grad():
        y = net(torch.from_numpy(x)[:, None]).numpy()[:, 0]
        b = apply_blind_spot(x, 0.05, test_rng, half_length=half, axis="x", radius=2)
        ym = net(torch.from_numpy(b.inputs)[:, None]).numpy()[:, 0]
    out, noise = y[:, 4:-4, 4:-4].ravel(), x[:, 4:-4, 4:-4].ravel()
    return {
        # fraction of the input noise that reappears in the output when denoising (plain input)
        "noise_transfer": float(np.cov(out, noise)[0, 1] / noise.var()),
        "output_std": float(out.std()),
        # how well the net predicts a blind pixel's noise from what the mask leaves visible
        "blind_pixel_corr": float(np.corrcoef(ym[b.mask], x[b.mask])[0, 1]),
    }


def test_structured_mask_removes_the_row_correlated_artefact() -> None:
    plain = _train_blind_spot_on_pure_noise(half=0)
    struct = _train_blind_spot_on_pure_noise(half=2)
    print(f"\nplain N2V mask: {plain}\nstructN2V mask (half_length 2 along x): {struct}")
    # plain blind spot: the row neighbours give the blind pixel's noise away -> the noise is "learned"
    assert plain["blind_pixel_corr"] > 0.5
    assert plain["noise_transfer"] > 0.5
    assert plain["output_std"] > 0.5
    # structured mask: nothing correlated is visible -> output ~ constant, noise not passed through
    assert abs(struct["blind_pixel_corr"]) < 0.15
    assert abs(struct["noise_transfer"]) < 0.15
    assert struct["output_std"] < 0.3
    assert plain["noise_transfer"] - abs(struct["noise_transfer"]) > 0.4


# ------------------------------------------------------------------------------ Noise2Noise pairs


def _clean_batch(n: int, side: int = 48, seed: int = 2) -> dict[str, np.ndarray]:
    dcfg = load_config(DatasetConfig, {"height": side, "width": side, "seed": seed})
    recs = [render_record(dcfg, "train", i) for i in range(n)]
    return {
        "image_id": np.asarray([r["image_id"] for r in recs], dtype=object),
        "clean": np.stack([r["clean"] for r in recs]),
        "defect_mask": np.stack([r["defect_mask"] for r in recs]),
    }


def test_noise_pair_frame1_is_the_pipeline_noise_and_frame2_is_independent() -> None:
    batch = _clean_batch(4)
    noise = NoiseConfig()
    pair = add_noise_pair_batch(batch, noise, 7, epoch=3)
    ref = add_noise_batch(batch, noise, 7, epoch=3)
    np.testing.assert_array_equal(pair["noisy"], ref["noisy"])  # frame 1 = the supervised pipeline's noise
    np.testing.assert_array_equal(pair["noise_dose_e_per_px"], ref["noise_dose_e_per_px"])  # same settings
    assert pair["noisy2"].shape == pair["noisy"].shape and pair["noisy2"].dtype == np.float32
    r1 = (pair["noisy"] - batch["clean"]).ravel()
    r2 = (pair["noisy2"] - batch["clean"]).ravel()
    assert abs(np.corrcoef(r1, r2)[0, 1]) < 0.1  # independent realisations
    assert 0.7 < r2.std() / r1.std() < 1.4  # same noise level
    again = add_noise_pair_batch(batch, noise, 7, epoch=3)
    np.testing.assert_array_equal(again["noisy2"], pair["noisy2"])


def test_selfsup_stage_crops_both_frames_at_the_same_windows() -> None:
    batch = _clean_batch(3)
    noisy = selfsup_noise_batch(batch, NoiseConfig().model_dump(mode="json"), 5, 2, "n2n")
    crop = CropSpec(32, 0.5, True, False)
    crops = crop_frames(noisy, "n2n", crop, 2, 5, 2)
    plain = crop_batch(noisy, crop, 2, 5, 2)
    np.testing.assert_array_equal(crops["clean"], plain["clean"])
    np.testing.assert_array_equal(crops["noisy"], plain["noisy"])
    # frame 2 cut at the same windows: cropping (noisy2 - clean) equals noisy2 crop - clean crop
    diff = crop_batch({**noisy, "noisy": noisy["noisy2"] - noisy["clean"]}, crop, 2, 5, 2)
    np.testing.assert_allclose(crops["noisy2"] - crops["clean"], diff["noisy"], atol=1e-6)
    assert "noisy2" not in crop_frames(noisy, "structn2v", crop, 2, 5, 2)
    # acquired frames in the shard are used as they are
    acquired = {**batch, "noisy": batch["clean"] + 0.25}
    out = selfsup_noise_batch(acquired, NoiseConfig(), 5, 4, "n2v")
    np.testing.assert_array_equal(out["noisy"], batch["clean"] + 0.25)
    assert (out["noise_epoch"] == 4).all() and np.isnan(out["noise_dose_e_per_px"]).all()
    with pytest.raises(ValueError, match="noisy2"):
        selfsup_noise_batch(acquired, NoiseConfig(), 5, 4, "n2n")


def test_objective_prepares_inputs_targets_and_masks() -> None:
    noisy = torch.rand(2, 1, 32, 32)
    ss = SelfSupervisedObjective(
        loss_config(objective="structn2v", mask={"fraction": 0.05, "half_length": 3})
    )
    inp, target, mask = ss.prepare(noisy, None, np.random.default_rng(0))
    assert mask is not None and int(mask.sum()) == 2 * round(0.05 * 32 * 32)
    assert torch.equal(target, noisy) and not torch.equal(inp, noisy)
    total, parts = ss.loss(inp, target, mask)
    assert parts["total"] == pytest.approx(float(total)) and "structn2v_mse" in parts
    n2n = SelfSupervisedObjective(loss_config(objective="n2n"))
    second = torch.rand(2, 1, 32, 32)
    assert n2n.prepare(noisy, second, np.random.default_rng(0))[1] is second
    with pytest.raises(ValueError, match="noisy2"):
        n2n.prepare(noisy, None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="supervised"):
        SelfSupervisedObjective(loss_config())
    with pytest.raises(ConfigError, match=r"loss.mask.fraction"):
        load_config(TrainConfig, {"loss": {"objective": "n2v", "mask": {"fraction": 0.5}}})
    with pytest.raises(ConfigError, match=r"loss.objective"):
        load_config(TrainConfig, {"loss": {"objective": "n2s"}})


def test_shipped_selfsup_configs_validate() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    n2v = load_config(TrainConfig, root / "n2v_example.yaml")
    n2n = load_config(TrainConfig, root / "n2n_example.yaml")
    full = load_config(TrainConfig, root / "stage3_full.yaml")
    assert n2v.loss.objective == "structn2v" and n2v.loss.mask.axis == "x"
    assert n2n.loss.objective == "n2n"
    for c in (n2v, n2n):  # comparable with the supervised stage-3 run
        assert c.data == full.data and c.model == full.model and c.optim == full.optim


@pytest.mark.slow
def test_noise2noise_approaches_supervised_on_the_same_data() -> None:
    """Same tiny U-Net, images, noise draws, steps and seed; the target is clean (supervised) or an
    independent second noisy scan (N2N). Seen on a loaded 2-core machine: noisy 12.9 dB, supervised 21.7 dB,
    N2N 22.5 dB (at 100 steps the two differ by less than their run-to-run spread)."""
    from semray.models.unet import build_model

    torch.set_num_threads(1)
    batch = _clean_batch(20, side=32)
    noise = NoiseConfig.model_validate({"shot": {"dose_e_per_px": {"low": 16, "high": 16}}})
    test = add_noise_pair_batch({k: v[16:] for k, v in batch.items()}, noise, 11, 0)
    results: dict[str, float] = {}
    for kind in ("supervised", "n2n"):
        torch.manual_seed(0)
        net = build_model(UNetConfig(base_width=8, depth=2))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for step in range(100):
            idx = np.random.default_rng(step).choice(16, 8, replace=False)
            pair = add_noise_pair_batch({k: v[idx] for k, v in batch.items()}, noise, 11, step + 1)
            x = torch.from_numpy(pair["noisy"])[:, None]
            target = torch.from_numpy(
                np.asarray(pair["clean" if kind == "supervised" else "noisy2"], np.float32)
            )
            loss = ((net(x) - target[:, None]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            den = net(torch.from_numpy(test["noisy"])[:, None]).clamp(0, 1).numpy()[:, 0]
        results[kind] = float(np.mean([psnr(d, c) for d, c in zip(den, test["clean"], strict=True)]))
    noisy = float(np.mean([psnr(n, c) for n, c in zip(test["noisy"], test["clean"], strict=True)]))
    gap = results["supervised"] - results["n2n"]
    print(
        f"\nPSNR noisy {noisy:.2f} dB, supervised {results['supervised']:.2f} dB, "
        f"N2N {results['n2n']:.2f} dB, gap supervised - N2N {gap:.2f} dB"
    )
    assert results["supervised"] > noisy + 3.0
    assert results["n2n"] > noisy + 3.0
    assert gap < 1.5


# ------------------------------------------------------------------------------ tiny Ray Train runs


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", ["structn2v", "n2n"])
def test_tiny_ray_train_run_per_objective(
    objective: str, tiny_shards: Path, tmp_path: Path, ray_local: None
) -> None:
    from semray.train import train

    base = tiny_train_base(tiny_shards, tmp_path)
    base["loss"] = {"kind": "l1", "objective": objective, "mask": {"fraction": 0.05}}  # replaced, not merged
    base["mlflow"] = {"enabled": False}
    cfg = train_config(
        base,
        optim={"epochs": 2},
        scaling={"num_workers": 1},
        checkpoint=None,
        validation={"figure_images": 4},
    )
    result = train(cfg)
    m = result.last_metrics
    assert m["epoch"] == 1 and m["step"] == 8  # 8 images x 2 crops / batch 4 = 4 steps per epoch
    assert f"train_{objective}_mse" in m and np.isfinite(m["train_loss"])
    assert np.isfinite(m["val_psnr"]) and np.isfinite(m["val_loss"])  # validated against clean
    assert (Path(result.model_dir) / "model.safetensors").is_file()

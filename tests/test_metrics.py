"""Metrics: agreement with scikit-image, torch/numpy consistency, edge and defect-aware behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from semray.metrics import (
    PSNR_MAX_DB,
    affine_psnr,
    clean_psnr_estimate,
    compute_metrics,
    defect_contrast,
    defect_psnr,
    defect_recall,
    defect_region,
    edge_preservation,
    frame_pair_noise_variance,
    gradient_correlation,
    ms_ssim,
    ms_ssim_torch,
    noisy_reference_psnr_bound,
    psnr,
    psnr_torch,
    ssim,
    ssim_torch,
)

H, W = 96, 128
BLOBS = [(20, 20), (50, 70), (80, 36), (70, 116)]  # all centred in dark gaps between lines


def _lines(h: int = H, w: int = W) -> np.ndarray:
    """Vertical lines 8 px wide on an 8 px gap, slightly soft edges: the defect-free reference."""
    x = np.arange(w)
    img = np.tile(np.where((x // 8) % 2 == 1, 0.7, 0.2), (h, 1))
    return ndi.gaussian_filter(img, 0.7)


def _with_blobs(ref: np.ndarray, blobs=BLOBS, radius2: int = 4, value: float = 0.95):
    yy, xx = np.mgrid[: ref.shape[0], : ref.shape[1]]
    mask = np.zeros(ref.shape, bool)
    for cy, cx in blobs:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius2
    clean = ref.copy()
    clean[mask] = value
    return clean, mask


def _noise(shape, sigma: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sigma, shape)


# ------------------------------------------------------------------------------- full-image
@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2])
def test_psnr_and_ssim_agree_with_skimage(sigma: float):
    clean = _lines()
    den = np.clip(clean + _noise(clean.shape, sigma, 0), 0, 1)
    assert psnr(clean, den) == pytest.approx(peak_signal_noise_ratio(clean, den, data_range=1.0), rel=1e-9)
    sk = structural_similarity(
        clean, den, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(clean, den) == pytest.approx(sk, abs=1e-6)


def test_ssim_agrees_with_skimage_on_an_odd_size():
    clean = _lines(37, 53)
    den = np.clip(clean + _noise(clean.shape, 0.1, 1), 0, 1).astype(np.float32)
    sk = structural_similarity(
        clean,
        den.astype(np.float64),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(clean, den) == pytest.approx(sk, abs=1e-6)


def test_identical_images_score_perfectly():
    clean = _lines()
    assert psnr(clean, clean) == PSNR_MAX_DB
    assert ssim(clean, clean) == pytest.approx(1.0)
    assert ms_ssim(clean, clean) == pytest.approx(1.0)
    assert edge_preservation(clean, clean) == 1.0
    assert gradient_correlation(clean, clean) == pytest.approx(1.0)


def test_ms_ssim_falls_with_noise_and_handles_small_images():
    clean = _lines(200, 200)
    values = [ms_ssim(clean, np.clip(clean + _noise(clean.shape, s, 2), 0, 1)) for s in (0.02, 0.1, 0.3)]
    assert values[0] > values[1] > values[2] and 0.0 < values[2] < 1.0
    small = _lines(64, 64)  # fewer scales used automatically
    assert 0.0 < ms_ssim(small, np.clip(small + _noise(small.shape, 0.1, 3), 0, 1)) < 1.0


def test_torch_batch_versions_match_numpy_per_image():
    clean = _lines(64, 64)
    dens = [np.clip(clean + _noise(clean.shape, s, 4), 0, 1) for s in (0.02, 0.1)]
    t_clean = torch.from_numpy(np.stack([clean, clean])[:, None])
    t_den = torch.from_numpy(np.stack(dens)[:, None])
    p = psnr_torch(t_den, t_clean)
    s = ssim_torch(t_den, t_clean)
    m = ms_ssim_torch(t_den, t_clean, weights=(0.0448, 0.2856, 0.3001), win_size=11)
    for i, den in enumerate(dens):
        assert p[i].item() == pytest.approx(psnr(clean, den), rel=1e-9)
        assert s[i].item() == pytest.approx(ssim(clean, den), abs=1e-9)
        assert m[i].item() == pytest.approx(ms_ssim(clean, den), abs=1e-9)
    assert psnr_torch(t_clean, t_clean)[0].item() == pytest.approx(PSNR_MAX_DB)


def test_edge_preservation_penalises_spurious_and_missing_edges():
    clean = _lines()
    assert edge_preservation(clean, np.clip(clean + _noise(clean.shape, 0.25, 5), 0, 1)) < 0.8
    missing = clean.copy()
    missing[:, 40:56] = 0.2  # one line erased
    f1 = edge_preservation(clean, missing)
    assert 0.5 < f1 < 0.95


def test_gradient_correlation_penalises_blur_and_noise():
    clean = _lines()
    blurred = ndi.gaussian_filter(clean, 2.0)
    noisy = np.clip(clean + _noise(clean.shape, 0.05, 6), 0, 1)
    assert gradient_correlation(clean, blurred) < 0.85
    assert gradient_correlation(clean, noisy) < 0.98
    assert math.isnan(gradient_correlation(np.full((16, 16), 0.5), noisy[:16, :16]))


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="NaN"):
        psnr(np.zeros((8, 8)), np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="defect_mask shape"):
        defect_recall(_lines(), _lines(), np.zeros((4, 4), bool), _lines())


# -------------------------------------------------------------------------------- defects
@pytest.mark.parametrize("use_reference", [True, False], ids=["reference", "no-reference"])
def test_defect_metrics_stay_high_when_defects_are_kept(use_reference: bool):
    ref = _lines()
    clean, mask = _with_blobs(ref)
    r = ref if use_reference else None
    for seed in range(3):
        kept = np.clip(clean + _noise(clean.shape, 0.04, seed), 0, 1)  # a mediocre denoiser
        assert defect_recall(clean, kept, mask, r) == 1.0
        assert defect_contrast(clean, kept, mask, r) > 0.85
    assert defect_recall(clean, clean, mask, r) == 1.0
    assert defect_contrast(clean, clean, mask, r) == pytest.approx(1.0)


@pytest.mark.parametrize("use_reference", [True, False], ids=["reference", "no-reference"])
def test_defect_contrast_is_polarity_aware(use_reference: bool):
    ref = _lines()
    clean, mask = _with_blobs(ref)
    r = ref if use_reference else None
    inverted = np.clip(2 * ref - clean, 0, 1)  # every defect with the opposite sign, same size
    assert defect_contrast(clean, inverted, mask, r) == pytest.approx(0.0, abs=0.05)
    if use_reference:  # without one, the ring mixes in pattern contrast (the fallback's known weakness)
        half = ref + 0.5 * (clean - ref)  # kept at half strength
        assert defect_contrast(clean, half, mask, r) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("use_reference", [True, False], ids=["reference", "no-reference"])
def test_defect_metrics_drop_when_defects_are_blurred_away(use_reference: bool):
    ref = _lines()
    clean, mask = _with_blobs(ref)
    r = ref if use_reference else None
    blurred = ndi.gaussian_filter(clean, 2.5)
    assert defect_recall(clean, blurred, mask, r) == 0.0
    assert defect_contrast(clean, blurred, mask, r) < 0.5
    # PSNR alone hides it: the over-smoothed image is not catastrophically bad by PSNR
    assert psnr(clean, blurred) > 18


def _smear_locally(clean: np.ndarray, sigma: float) -> np.ndarray:
    """Blur only a 13 x 13 window around each defect, leaving the rest of the field exact."""
    out = clean.copy()
    blurred = ndi.gaussian_filter(clean, sigma)
    for cy, cx in BLOBS:
        out[cy - 6 : cy + 7, cx - 6 : cx + 7] = blurred[cy - 6 : cy + 7, cx - 6 : cx + 7]
    return out


def test_detector_threshold_is_half_the_clean_defect_signature():
    ref = _lines()
    clean, mask = _with_blobs(ref)
    # sigma 1 keeps ~75 % of the smoothed peak, sigma 2.5 ~40 %: one side of the 50 % line each
    assert defect_recall(clean, _smear_locally(clean, 1.0), mask, ref) == 1.0
    assert defect_recall(clean, _smear_locally(clean, 2.5), mask, ref) == 0.0
    assert defect_contrast(clean, _smear_locally(clean, 1.0), mask, ref) > defect_contrast(
        clean, _smear_locally(clean, 2.5), mask, ref
    )


def test_noise_floor_keeps_residual_noise_from_finding_faint_defects():
    """A faint defect (+0.1) painted over, with heavy residual noise: noise alone must not count."""
    ref = _lines()
    clean, mask = _with_blobs(ref, value=0.3)  # blobs sit on 0.2 gaps: signature 0.1
    hits = [defect_recall(clean, ref + _noise(ref.shape, 0.15, seed), mask, ref) for seed in range(10)]
    assert max(hits) == 0.0
    assert defect_recall(clean, clean, mask, ref) == 1.0


def test_painted_over_defects_are_missed_even_with_residual_noise():
    """Residual noise must not fire the detector: the defect-free field plus noise finds nothing."""
    ref = _lines()
    clean, mask = _with_blobs(ref)
    for seed in range(5):
        erased = np.clip(ref + _noise(ref.shape, 0.08, seed), 0, 1)
        assert defect_recall(clean, erased, mask, ref) == 0.0
        assert abs(defect_contrast(clean, erased, mask, ref)) < 0.15
    # and the 'erased' image still wins on PSNR against the noisy image that kept every defect
    noisy = np.clip(clean + _noise(ref.shape, 0.08, 9), 0, 1)
    assert psnr(clean, ref) > psnr(clean, noisy)


def test_defect_recall_counts_instances():
    ref = _lines()
    clean, mask = _with_blobs(ref)
    partly = clean.copy()
    for cy, cx in BLOBS[:2]:  # erase two of the four defects locally
        partly[cy - 4 : cy + 5, cx - 4 : cx + 5] = ref[cy - 4 : cy + 5, cx - 4 : cx + 5]
    assert defect_recall(clean, partly, mask, ref) == 0.5
    assert defect_contrast(clean, partly, mask, ref) == pytest.approx(0.5, abs=0.01)


def test_dark_defect_polarity():
    """An open (missing piece of a bright line): filling the gap erases it; darkening keeps it."""
    ref = _lines()
    clean = ref.copy()
    mask = np.zeros(ref.shape, bool)
    mask[40:46, 8:16] = True  # gap in the line spanning x = 8..15
    clean[mask] = 0.2
    filled = ref.copy()
    assert defect_recall(clean, clean, mask, ref) == 1.0
    assert defect_recall(clean, filled, mask, ref) == 0.0
    assert defect_contrast(clean, filled, mask, ref) == pytest.approx(0.0, abs=1e-6)
    # a bright artefact in the gap is the wrong polarity: not a detection
    wrong = ref.copy()
    wrong[mask] = 1.0
    assert defect_recall(clean, wrong, mask, ref) == 0.0


def test_compute_metrics_keys_and_nan_without_defects():
    ref = _lines()
    clean, mask = _with_blobs(ref)
    den = np.clip(clean + _noise(clean.shape, 0.03, 7), 0, 1).astype(np.float32)
    m = compute_metrics(clean, den, mask, ref)
    assert set(m) == {
        "psnr",
        "ssim",
        "ms_ssim",
        "edge_preservation",
        "gradient_correlation",
        "defect_psnr",
        "defect_contrast",
        "defect_recall",
        "defect_recall_clean",
        "defect_count",
    }
    assert m["defect_count"] == 4 and m["defect_recall_clean"] == 1.0 and m["defect_recall"] == 1.0
    assert all(isinstance(v, float) for v in m.values())
    for no_defects in (None, np.zeros_like(mask)):
        m0 = compute_metrics(clean, den, no_defects, ref)
        assert math.isnan(m0["defect_contrast"]) and math.isnan(m0["defect_recall"])
        assert math.isnan(m0["defect_psnr"])
        assert m0["defect_count"] == 0 and m0["psnr"] == pytest.approx(m["psnr"])


def test_defect_psnr_scores_only_the_grown_defect_region():
    ref = _lines()
    clean, mask = _with_blobs(ref)
    region = defect_region(mask)
    assert region.sum() > mask.sum() and not (mask & ~region).any()  # grown, contains the mask
    # an error of 0.1 on the region only: defect PSNR is exactly 20 dB, whole-image PSNR much higher
    err = clean.astype(np.float64).copy()
    err[region] += 0.1
    assert defect_psnr(clean, err, mask) == pytest.approx(20.0, abs=1e-9)
    assert psnr(clean, err) > 30
    # an error outside the region leaves it untouched (capped at PSNR_MAX_DB)
    out = clean.astype(np.float64).copy()
    out[~region] += 0.1
    assert defect_psnr(clean, out, mask) == PSNR_MAX_DB
    # smearing the defects away costs far more defect PSNR than whole-image PSNR
    smeared = _smear_locally(clean, 2.5)
    assert psnr(clean, smeared) - defect_psnr(clean, smeared, mask) > 8
    assert math.isnan(defect_psnr(clean, clean, np.zeros_like(mask)))
    with pytest.raises(ValueError, match="defect_mask shape"):
        defect_psnr(clean, clean, mask[:-1])


# ------------------------------------------------------------------ scoring against a noisy reference
def test_affine_psnr_removes_gain_and_offset_and_scores_the_rest() -> None:
    """ref = 0.5 + 0.2 x + 0.01 n with x, n, 1 mutually orthogonal: the fit of out = 0.3 + 0.05 x is
    exactly a = 4, b = -0.7 and leaves 0.01 n, mean square 1e-4, so 40 dB."""
    yy, xx = np.mgrid[:32, :48]
    x, n = (-1.0) ** (yy + xx), (-1.0) ** yy  # checkerboard and row stripes
    ref, out = 0.5 + 0.2 * x + 0.01 * n, 0.3 + 0.05 * x
    p, a, b = affine_psnr(ref, out)
    assert a == pytest.approx(4.0) and b == pytest.approx(-0.7)
    assert p == pytest.approx(40.0, abs=1e-9)
    assert psnr(ref, out) < 20  # unfitted, the gain and offset dominate
    assert affine_psnr(ref, 0.1 * ref - 0.02)[0] == PSNR_MAX_DB
    assert affine_psnr(ref, np.full(ref.shape, 0.3))[1:] == pytest.approx((0.0, float(ref.mean())))
    with pytest.raises(ValueError, match="same shape"):
        affine_psnr(ref, out[:-1])


def test_frame_pair_noise_variance_recovers_the_noise_of_repeated_scans() -> None:
    clean = _lines()
    frames = [clean + _noise(clean.shape, 0.02, seed) for seed in range(4)]
    assert frame_pair_noise_variance(frames) == pytest.approx(0.02**2, rel=0.03)
    assert frame_pair_noise_variance([clean, clean + 0.1]) == pytest.approx(0.0, abs=1e-15)  # offsets cancel
    with pytest.raises(ValueError, match="at least two"):
        frame_pair_noise_variance(frames[:1])


def test_noisy_reference_bound_and_the_implied_clean_psnr() -> None:
    assert noisy_reference_psnr_bound(1e-4, 1) == pytest.approx(40.0)
    assert noisy_reference_psnr_bound(1e-4, 3) == pytest.approx(40.0 + 10 * math.log10(3))
    with pytest.raises(ValueError):
        noisy_reference_psnr_bound(0.0, 3)
    # an output 1e-4 (MSE) from the clean image, scored against a reference with noise variance 1e-4
    assert clean_psnr_estimate(10 * math.log10(1 / 2e-4), 1e-4) == pytest.approx(40.0)
    assert math.isnan(clean_psnr_estimate(40.0, 1e-4))  # no closer to the reference than its own noise
    clean = _lines()
    ref = clean + _noise(clean.shape, 0.01 / math.sqrt(3), 1)  # a 3-frame average of sigma 0.01 frames
    out = clean + _noise(clean.shape, 0.005, 2)
    implied = clean_psnr_estimate(psnr(ref, out), 0.01**2 / 3)
    assert implied == pytest.approx(psnr(clean, out), abs=0.3)
    assert psnr(ref, clean) == pytest.approx(noisy_reference_psnr_bound(0.01**2, 3), abs=0.1)

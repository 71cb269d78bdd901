"""Classical denoisers: quality on a known image, noise estimation, edge cases, Ray fan-out."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from semray.classical import (
    METHODS,
    anscombe,
    default_params,
    denoise_classical,
    denoise_many,
    estimate_noise_sigma,
    estimate_poisson_gaussian,
    inverse_anscombe,
    runtime_per_megapixel,
)


def piecewise_lines(shape: tuple[int, int] = (96, 96)) -> np.ndarray:
    """Piecewise-constant blocks plus thin bright lines and a dark contact, float32 in [0.1, 0.9]."""
    h, w = shape
    img = np.full(shape, 0.3, np.float32)
    img[h // 5 : 3 * h // 5, w // 8 : w // 2] = 0.6
    img[:, 3 * w // 4 : 3 * w // 4 + 4] = 0.9
    img[h // 10 : h : 12, : w // 2] = 0.8  # 1-px horizontal lines
    yy, xx = np.mgrid[:h, :w]
    img[np.hypot(yy - 0.75 * h, xx - 0.3 * w) < 6] = 0.1
    return img


def smooth_image(shape: tuple[int, int] = (96, 96)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    return (0.5 + 0.2 * np.sin(xx / 13.0) * np.cos(yy / 17.0)).astype(np.float32)


def add_noise(clean: np.ndarray, sigma: float, seed: int, clip: bool = True) -> np.ndarray:
    noisy = clean + np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return (np.clip(noisy, 0.0, 1.0) if clip else noisy).astype(np.float32)


def psnr(clean: np.ndarray, x: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(clean, x, data_range=1.0))


# Gain over the noisy input (20.1 dB at sigma 0.1) each method must reach on the 96x96 test image with
# sigma estimated from the image; ~15% under what the tuned rules gave when written (bm3d 16.5,
# nlm 11.2, tv 7.2, bilateral 4.4, gaussian 3.6, median 1.0: a 3x3 median erases the 1-px lines).
MIN_GAIN_DB = {"bm3d": 14.0, "nlm": 9.5, "bilateral": 3.5, "gaussian": 3.0, "median": 0.6, "tv": 6.0}


@pytest.fixture(scope="module")
def noisy_pair() -> tuple[np.ndarray, np.ndarray]:
    clean = piecewise_lines()
    return clean, add_noise(clean, 0.1, seed=0)


@pytest.fixture(scope="module")
def blind_outputs(noisy_pair: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Each method's output with sigma estimated (the clean image is never seen); BM3D runs once."""
    return {m: denoise_classical(noisy_pair[1], m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_improves_psnr_blind(
    method: str, noisy_pair: tuple[np.ndarray, np.ndarray], blind_outputs: dict[str, np.ndarray]
) -> None:
    clean, noisy = noisy_pair
    gain = psnr(clean, blind_outputs[method]) - psnr(clean, noisy)
    assert gain > MIN_GAIN_DB[method], f"{method}: only {gain:.2f} dB better than the noisy input"


def test_bm3d_is_the_strongest_classical_method(
    noisy_pair: tuple[np.ndarray, np.ndarray], blind_outputs: dict[str, np.ndarray]
) -> None:
    scores = {m: psnr(noisy_pair[0], out) for m, out in blind_outputs.items()}
    assert max(scores, key=scores.__getitem__) == "bm3d", scores


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1, 0.15, 0.2])
@pytest.mark.parametrize("make", [piecewise_lines, smooth_image])
def test_noise_sigma_estimate_within_tolerance(sigma: float, make) -> None:
    clean = make((128, 128))
    estimates = [estimate_noise_sigma(add_noise(clean, sigma, seed=s, clip=False)) for s in range(3)]
    rel = np.abs(np.array(estimates) / sigma - 1.0)
    assert rel.max() < 0.12, f"sigma={sigma}: estimates {estimates}"


def test_noise_sigma_of_clean_and_constant_images_is_small() -> None:
    assert estimate_noise_sigma(np.full((20, 30), 0.4, np.float32)) == pytest.approx(0.0, abs=1e-7)
    assert estimate_noise_sigma(piecewise_lines((128, 128))) < 0.01


def test_noise_sigma_ignores_scan_line_offsets() -> None:
    """Documented limit: row-constant offsets cancel in the diagonal wavelet band."""
    clean = smooth_image((128, 128))
    noisy = add_noise(clean, 0.05, seed=1, clip=False)
    offsets = np.random.default_rng(2).normal(0.0, 0.1, (128, 1)).astype(np.float32)
    assert estimate_noise_sigma(noisy + offsets) == pytest.approx(estimate_noise_sigma(noisy), rel=0.05)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(37, 53), (7, 5), (8, 8), (1, 9)])
def test_shape_dtype_range_preserved(method: str, shape: tuple[int, int]) -> None:
    noisy = add_noise(np.full(shape, 0.5, np.float32), 0.2, seed=3)
    noisy[0, 0] = 1.0  # saturated pixel: output must still be clipped to [0, 1]
    out = denoise_classical(noisy, method, sigma=None if min(shape) > 1 else 0.2)
    assert out.shape == shape
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_constant_image_is_returned_unchanged(method: str) -> None:
    img = np.full((24, 31), 0.37, np.float32)
    out = denoise_classical(img, method)
    np.testing.assert_array_equal(out, img)
    assert out is not img


def test_integer_inputs_are_rescaled_like_io() -> None:
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    u16 = u8.astype(np.uint16) * 257  # same intensities in 16-bit
    ref = denoise_classical(u8.astype(np.float32) / 255.0, "tv", sigma=0.1)
    np.testing.assert_allclose(denoise_classical(u8, "tv", sigma=0.1), ref, atol=1e-6)
    np.testing.assert_allclose(denoise_classical(u16, "tv", sigma=0.1), ref, atol=1e-6)


@pytest.mark.parametrize(
    ("image", "exc", "match"),
    [
        (np.zeros((4, 4), np.int32), TypeError, "int32"),
        (np.zeros((4, 4), bool), TypeError, "bool"),
        (np.zeros((2, 4, 4), np.float32), ValueError, "2-D"),
        (np.zeros((0, 4), np.float32), ValueError, "empty"),
        (np.array([[0.1, np.nan], [0.2, 0.3]], np.float32), ValueError, "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(image: np.ndarray, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        denoise_classical(image, "gaussian")


def test_unknown_method_error_names_it_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="'wiener'") as info:
        denoise_classical(np.zeros((8, 8), np.float32), "wiener")
    assert all(m in str(info.value) for m in METHODS)


def test_unknown_parameter_and_bad_sigma_are_errors() -> None:
    img = add_noise(piecewise_lines((32, 32)), 0.1, seed=5)
    with pytest.raises(ValueError, match="patch_sise"):
        denoise_classical(img, "nlm", patch_sise=5)
    with pytest.raises(ValueError, match="sigma"):
        denoise_classical(img, "tv", sigma=-0.1)
    with pytest.raises(ValueError, match="odd"):
        denoise_classical(img, "median", size=4)


def test_overrides_change_the_result_and_defaults_are_the_rules() -> None:
    img = add_noise(piecewise_lines((48, 48)), 0.1, seed=6)
    by_default = denoise_classical(img, "tv", sigma=0.1)
    np.testing.assert_array_equal(
        by_default, denoise_classical(img, "tv", sigma=0.1, **default_params("tv", 0.1))
    )
    assert not np.allclose(by_default, denoise_classical(img, "tv", sigma=0.1, weight=0.5))


@pytest.mark.parametrize("method", METHODS)
def test_smoothing_strength_grows_with_sigma(method: str) -> None:
    """Every rule is monotone: a noisier image never gets weaker smoothing."""
    lo, hi = default_params(method, 0.02), default_params(method, 0.3)
    for key, v in lo.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert hi[key] >= v, f"{method}.{key}: {v} at sigma 0.02 but {hi[key]} at sigma 0.3"


def test_anscombe_stabilises_poisson_variance_and_inverse_is_unbiased() -> None:
    rng = np.random.default_rng(7)
    gain, read_sigma = 0.01, 0.005
    for counts in (3.0, 10.0, 50.0):
        z = gain * rng.poisson(counts, 200_000) + rng.normal(0.0, read_sigma, 200_000)
        t = anscombe(z, gain, read_sigma)
        assert t.var() == pytest.approx(1.0, rel=0.12 if counts < 5 else 0.05)
        # exact-unbiased-inverse property: mapping E[f(z)] back gives the true mean
        back = inverse_anscombe(np.array([t.mean()]), gain, read_sigma)[0]
        assert back == pytest.approx(gain * counts, rel=0.03)


def test_poisson_gaussian_fit_recovers_parameters() -> None:
    rng = np.random.default_rng(8)
    clean = np.tile(np.linspace(0.1, 0.9, 256, dtype=np.float32), (256, 1))
    gain, read_sigma = 0.004, 0.02
    noisy = gain * rng.poisson(clean / gain) + rng.normal(0.0, read_sigma, clean.shape)
    g, s = estimate_poisson_gaussian(noisy.astype(np.float32))
    assert g == pytest.approx(gain, rel=0.2)
    assert s == pytest.approx(read_sigma, rel=0.25)


def test_vst_bm3d_helps_on_low_dose_poisson_noise() -> None:
    clean = piecewise_lines((64, 64))
    # 100 electrons at full scale: noise std 0.03 in the dark, 0.095 at the brightest line. Measured
    # on SEM-like images: +0.8 dB here, +0.4 dB at 20 e-, but -0.4 dB at 5 e- (hence vst is opt-in).
    gain = 1.0 / 100.0
    noisy = (gain * np.random.default_rng(9).poisson(clean / gain)).astype(np.float32)
    plain = psnr(clean, denoise_classical(noisy, "bm3d"))
    stabilised = psnr(clean, denoise_classical(noisy, "bm3d", vst=True))
    assert stabilised > plain + 0.4, (plain, stabilised)


def test_denoise_many_serial_keeps_order_and_per_image_sigma() -> None:
    imgs = [add_noise(piecewise_lines((24 + i, 30)), 0.05 * (i + 1), seed=i) for i in range(3)]
    sigmas = [0.05, 0.1, 0.15]
    out = denoise_many(imgs, "tv", sigma=sigmas, use_ray=False)
    for img, s, o in zip(imgs, sigmas, out, strict=True):
        np.testing.assert_array_equal(o, denoise_classical(img, "tv", sigma=s))
    with pytest.raises(ValueError, match="2 sigmas for 3 images"):
        denoise_many(imgs, "tv", sigma=[0.1, 0.2], use_ray=False)
    assert denoise_many([], "tv", use_ray=False) == []
    same = denoise_many(imgs[:2], "tv", sigma=np.float32(0.1), use_ray=False)  # numpy scalar sigma
    np.testing.assert_array_equal(same[1], denoise_classical(imgs[1], "tv", sigma=float(np.float32(0.1))))
    with pytest.raises(ValueError, match="weigth"):
        denoise_many(imgs, "tv", weigth=0.1)


@pytest.mark.ray
def test_denoise_many_with_ray_matches_serial(ray_local: None) -> None:
    imgs = [add_noise(piecewise_lines((32 + 3 * i, 40 - i)), 0.1, seed=10 + i) for i in range(4)]
    sigmas = [0.05, 0.1, 0.15, 0.2]  # distinct per image, so a reordering would show
    serial = denoise_many(imgs, "tv", sigma=sigmas, use_ray=False)
    parallel = denoise_many(imgs, "tv", sigma=sigmas)  # Ray is initialised, so this fans out
    assert len(parallel) == len(imgs)
    for s, p in zip(serial, parallel, strict=True):
        assert p.shape == s.shape and p.dtype == np.float32
        np.testing.assert_allclose(p, s, atol=1e-6)


def test_runtime_per_megapixel_is_positive_and_scaled() -> None:
    img = add_noise(piecewise_lines((64, 64)), 0.1, seed=11)
    t = runtime_per_megapixel("gaussian", img, repeats=2, sigma=0.1)
    # a 64x64 blur takes ~0.1 ms (25 ms/MP); 4 s/MP = 16 ms leaves room for a loaded CI machine
    assert 0.0 < t < 4.0
    with pytest.raises(ValueError, match="repeats"):
        runtime_per_megapixel("gaussian", img, repeats=0)

"""Noise calibration: recovers known parameters from images made by our own noise model, measures the
fast-axis correlation's sign and length, and the CLI writes a NoiseConfig the synthesis stage loads.

Recovery errors measured while building (4 wafers of 256 x 256, dose 1000 e/px, read noise 0.015, row
offset 0.01, 8-bit ADC, 5 seeds): dose/Poisson gain within 6.7 %, read noise within 12 %, row offset
within 12.6 %. At dose 200 read noise is not measurable (SE > 100 %; reported as not detected).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from bench_modules import load_benchmark
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter
from scipy.signal import lfilter

from semray.calibrate import (
    CalibrationConfig,
    Estimate,
    calibrate,
    charging_fit_images,
    fit_mean_variance,
    jitter_estimate,
    noise_config_from_estimates,
    quantization_grid,
    row_noise_scale,
    uncharge,
    white_floor,
)
from semray.cli import main
from semray.config.base import ConfigError, load_config
from semray.config.noise import NoiseConfig
from semray.config.synth import SynthConfig
from semray.io import ImageMeta, write_image
from semray.noise import apply_noise, charging, poisson_gaussian_coefficients, sample_params, synthesize
from semray.synth import render_wafer

PATTERNS = ("lines", "contacts", "tin_balls", "contacts_staggered")
# Vertical gratings only: a horizontal grating is flagged and left out of the row estimates.
SYNTH = SynthConfig(defect_probability=0.0, line_horizontal_probability=0.0)


def _wafers(seed: int, patterns: tuple[str, ...] = PATTERNS, size: int = 256) -> list[np.ndarray]:
    return [render_wafer(p, (size, size), np.random.default_rng([seed, i]), SYNTH).clean for i, p in enumerate(patterns)]  # fmt: skip


def _params(*components: str, **values: float):
    base = dict(dose_e_per_px=1000.0, se_yield_min=0.2, se_yield_max=1.2, detector_gain_cv=0.5)
    p = sample_params(NoiseConfig().only(*components), np.random.default_rng(0))
    return p.replace(**(base | values))


def _noisy(cleans: list[np.ndarray], params, seed: int) -> list[np.ndarray]:
    return [apply_noise(c, params, np.random.default_rng([seed, 9, i])) for i, c in enumerate(cleans)]


@pytest.fixture(scope="module")
def recovered():
    """Calibration of four wafers with shot, gain, read noise, row offsets and an 8-bit ADC."""
    params = _params(
        "shot",
        "detector_gain",
        "read_noise",
        "scan_lines",
        "quantization",
        read_noise_sigma=0.015,
        scan_line_offset_sigma=0.01,
        scan_line_gain_sigma=0.0,
        bit_depth=8,
        quant_black_level=-0.02,
        quant_white_level=1.04,
    )
    return params, calibrate(_noisy(_wafers(0), params, 0))


def test_recovers_dose_gain_read_noise_and_row_offset(recovered) -> None:
    params, result = recovered
    e = result.estimates
    a_true, _ = poisson_gaussian_coefficients(params)
    errors = {
        "poisson_a": e["poisson_a"].value / a_true - 1,
        "dose": e["dose_e_per_px"].value / params.dose_e_per_px - 1,
        "read_noise": e["read_noise_sigma"].value / params.read_noise_sigma - 1,
        "row_offset": e["scan_line_offset_sigma"].value / params.scan_line_offset_sigma - 1,
    }
    print("relative recovery errors:", {k: round(v, 3) for k, v in errors.items()})
    assert abs(errors["poisson_a"]) < 0.10
    assert abs(errors["dose"]) < 0.10
    assert abs(errors["read_noise"]) < 0.15
    assert abs(errors["row_offset"]) < 0.20
    # Each estimate's own standard error is honest about the size of its error (within 3 SE).
    for key, name in (("dose_e_per_px", "dose"), ("read_noise_sigma", "read_noise")):
        assert abs(e[key].value - e[key].value / (1 + errors[name])) < 3 * e[key].stderr + 1e-12


def test_fitted_config_switches_on_exactly_the_present_components(recovered) -> None:
    params, result = recovered
    cfg = result.noise_config
    on = {name for name, sub in cfg if sub.enabled}
    assert on == {"shot", "detector_gain", "read_noise", "scan_lines", "quantization"}
    assert cfg.quantization.bit_depth == 8
    # Only the grid offset modulo one step is identifiable: the fitted grid must be the true one.
    step = (params.quant_white_level - params.quant_black_level) / 255
    assert result.estimates["quant_step"].value == pytest.approx(step, rel=1e-4)
    offset = (cfg.quantization.quant_black_level.low - params.quant_black_level) / step
    assert offset == pytest.approx(round(offset), abs=0.02)
    dose = cfg.shot.dose_e_per_px
    assert dose.log and dose.low < params.dose_e_per_px * 1.1 and dose.high > params.dose_e_per_px * 0.9
    assert not result.estimates["fast_axis_noise_corr"].detected  # our model's noise is white along x
    assert cfg.shot.se_yield_min.low == cfg.shot.se_yield_min.high == 0.2  # assumptions pinned


def test_fitted_config_synthesises_noise_of_the_measured_level(recovered) -> None:
    _, result = recovered
    flat = np.full((64, 64), 0.4, dtype=np.float32)
    a, b = result.estimates["poisson_a"].value, result.estimates["poisson_b"].value
    noisy, drawn = synthesize(flat, result.noise_config, np.random.default_rng(3))
    # Row offsets add their variance on top of the pixel noise; both come from the fitted config.
    expected = a * 0.4 + b + drawn.scan_line_offset_sigma**2
    assert float(np.var(noisy)) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize(
    ("b_coef", "a_coef", "lag1"),
    [([1.0], [1.0, -0.5], 0.5), ([1.0], [1.0, -0.3], 0.3), ([1.0, -0.5], [1.0], -0.4)],
    ids=["lowpass-0.5", "lowpass-0.3", "overshoot"],
)
def test_fast_axis_noise_correlation_sign_and_length(b_coef, a_coef, lag1) -> None:
    """Noise filtered along x (a detector low-pass, or an overshooting response) on wafer images."""
    cleans = _wafers(7, ("contacts", "tin_balls", "lines"))
    imgs = []
    for i, c in enumerate(cleans):
        n = lfilter(b_coef, a_coef, np.random.default_rng([8, i]).standard_normal(c.shape), axis=1)
        imgs.append(np.clip(c + 0.03 * n / n.std(), 0, 1).astype(np.float32))
    e = calibrate(imgs).estimates
    rho = e["fast_axis_noise_corr"]
    assert rho.detected and np.sign(rho.value) == np.sign(lag1)
    assert rho.value == pytest.approx(lag1, abs=0.08)
    if lag1 > 0:  # exponential correlation: length -1 / ln(rho)
        assert e["fast_axis_corr_length_px"].value == pytest.approx(-1 / math.log(lag1), rel=0.2)
    assert abs(e["slow_axis_noise_corr"].value) < 0.1


def _bright_blobs(seed: int, size: int = 256) -> np.ndarray:
    """Bright disks on a flat background: mirror-symmetric along x, as the charging estimator assumes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 0.3)
    for _ in range(40):
        cy, cx, r = rng.uniform(10, size - 10), rng.uniform(30, size - 30), rng.uniform(3, 7)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.85
    return gaussian_filter(img, 0.8).astype(np.float32)


@pytest.mark.parametrize("decay", [4.0, 12.0])
def test_charging_tail_sign_and_decay_on_symmetric_specimen(decay: float) -> None:
    cleans = [_bright_blobs(i) for i in range(3)]
    charged = _params("shot", "detector_gain", "read_noise", "charging", read_noise_sigma=0.01,
                      charging_strength=0.3, charging_decay_px=decay, dose_e_per_px=200.0)  # fmt: skip
    fit, _ = charging_fit_images(_noisy(cleans, charged, 1), 0.6, 24, 48.0)
    assert fit.detected(3.0, 2.0) and fit.strength > 0  # a bright tail
    assert fit.strength == pytest.approx(0.3, rel=0.35)
    assert fit.decay_px == pytest.approx(decay, rel=0.4)


@pytest.mark.parametrize("seed", [1, 5])
def test_no_charging_tail_is_not_detected(seed: int) -> None:
    """Seed 5 is the worst of six measured: 4.5 SEs, but at the shortest decay of the grid."""
    cleans = [_bright_blobs(i) for i in range(3)]
    plain = _params("shot", "detector_gain", "read_noise", read_noise_sigma=0.01, dose_e_per_px=200.0)
    fit, _ = charging_fit_images(_noisy(cleans, plain, seed), 0.6, 24, 48.0)
    assert not fit.detected(3.0, 2.0)


def test_charging_enters_config_only_when_asked() -> None:
    est = {
        "dose_e_per_px": Estimate(300.0, 10.0),
        "read_noise_sigma": Estimate(0.0, 0.01, False),
        "scan_line_offset_sigma": Estimate(0.0, 0.001, False),
        "scan_line_gain_sigma": Estimate(0.0, 0.001, False),
        "line_jitter_px": Estimate(0.0, 0.01, False),
        "drift_amplitude": Estimate(0.0, 0.01, False),
        "drift_corr_rows": Estimate(50.0, 50.0, False),
        "charging_strength": Estimate(0.3, 0.03),
        "charging_decay_px": Estimate(8.0, 1.0),
        "quant_step": Estimate(0.0, 0.0, False),
    }
    assert not noise_config_from_estimates(est, CalibrationConfig()).charging.enabled
    cfg = noise_config_from_estimates(est, CalibrationConfig(fit_charging=True))
    assert cfg.charging.enabled
    assert cfg.charging.charging_decay_px.low <= 8.0 <= cfg.charging.charging_decay_px.high
    assert cfg.charging.charging_decay_px.high - cfg.charging.charging_decay_px.low < 3.0  # narrow


def test_line_jitter_recovered_and_absent_when_off() -> None:
    cleans = _wafers(3, ("lines", "tin_balls"))
    a, b = 1.25 / 1000, 1.25 / 1000 * 0.2 + 0.015**2
    for jitter, expect in ((0.15, 0.15), (0.0, 0.0)):
        comps = ("shot", "detector_gain", "read_noise") + (("line_jitter",) if jitter else ())
        p = _params(*comps, read_noise_sigma=0.015, line_jitter_px=jitter)
        prods = np.concatenate([jitter_estimate(z, a, b) for z in _noisy(cleans, p, 2)])
        est = math.sqrt(max(prods.mean() / 2, 0.0))
        assert est == pytest.approx(expect, abs=0.2 * 0.15)


def test_quantization_grid() -> None:
    codes = np.random.default_rng(0).integers(0, 256, (64, 64))
    assert quantization_grid((codes / 255.0).astype(np.float32)) == pytest.approx((1 / 255, 0.0), abs=1e-7)
    step, black = quantization_grid(-0.02 + codes * (1.06 / 255))
    assert step == pytest.approx(1.06 / 255, rel=1e-6)
    assert ((black + 0.02) / step) == pytest.approx(round((black + 0.02) / step), abs=1e-3)
    assert -step < black <= 0
    assert quantization_grid(np.random.default_rng(1).random((64, 64))) is None


def test_white_floor_ignores_periodic_harmonics() -> None:
    """A row pattern repeating every 20 rows (a blurred contact array: a few harmonics, each 3-20x
    the white level) on top of second-differenced white row offsets of variance 1e-4."""
    rng = np.random.default_rng(4)
    x = 0.01 * rng.standard_normal(2048)
    phase = 2 * np.pi * np.arange(x.size - 2) / 20.0
    pattern = 0.02 * np.sin(phase) + 0.01 * np.sin(2 * phase + 1.0) + 0.005 * np.sin(3 * phase + 2.0)
    seq = x[1:-1] - 0.5 * (x[:-2] + x[2:])
    level, n_eff = white_floor(seq + pattern)
    assert level == pytest.approx(1e-4, rel=3 / math.sqrt(n_eff))
    plain_var = float(np.var(seq + pattern)) / 1.5  # what a plain variance would report
    assert plain_var > 2 * level


def test_fit_mean_variance_recovers_line_and_ignores_outliers() -> None:
    rng = np.random.default_rng(5)
    mean = rng.uniform(0.1, 0.8, 4000)
    true = 0.004 * mean + 0.0005
    var = true * rng.chisquare(30, mean.size) / 30
    var[:200] *= 3.0  # patches with leftover structure only ever add variance
    a, b, cov, keep = fit_mean_variance(mean, var)
    assert a == pytest.approx(0.004, rel=0.05)
    assert b == pytest.approx(0.0005, rel=0.1)
    assert keep[:200].mean() < 0.2 and keep[200:].mean() > 0.95
    assert np.all(np.isfinite(cov))


@settings(max_examples=15, deadline=None)
@given(
    strength=st.floats(-0.5, 2.0),
    decay=st.floats(0.5, 40.0),
    threshold=st.floats(0.2, 0.9),
    seed=st.integers(0, 2**16),
)
def test_uncharge_inverts_charging(strength: float, decay: float, threshold: float, seed: int) -> None:
    # Above threshold the inverse recursion multiplies an error by a - strength * (1 - a) per column
    # (a = exp(-1/decay)): beyond |.| = 1 it is unstable and float32 rounding of the input grows without
    # bound (strength 2, decay 0.5: x1.59 per column), so exact inversion is only testable inside.
    a = np.exp(-1.0 / decay)
    assume(abs(a - strength * (1.0 - a)) < 0.95)
    clean = np.random.default_rng(seed).random((8, 40)).astype(np.float32)
    charged = charging(clean, strength, decay, threshold)
    np.testing.assert_allclose(uncharge(charged, strength, decay, threshold), clean, atol=1e-4)


def test_calibration_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="assumed_se_yield_max"):
        load_config(CalibrationConfig, {"assumed_se_yield_min": 0.5, "assumed_se_yield_max": 0.4})
    with pytest.raises(ConfigError, match="patch_px"):
        load_config(CalibrationConfig, {"patch_px": 2})


def test_cli_round_trip(tmp_path: Path) -> None:
    params = _params("shot", "detector_gain", "read_noise", "scan_lines", "quantization",
                     read_noise_sigma=0.015, scan_line_offset_sigma=0.01, scan_line_gain_sigma=0.0,
                     bit_depth=8, quant_black_level=0.0, quant_white_level=1.0, dose_e_per_px=600.0)  # fmt: skip
    folder = tmp_path / "lot"
    for i, z in enumerate(_noisy(_wafers(1, ("contacts", "tin_balls"), 160), params, 4)):
        write_image(folder / f"img{i}.png", z, ImageMeta(dtype="uint8", shape=z.shape, format="png"))
    out = tmp_path / "cal" / "noise.yaml"
    assert main(["calibrate-noise", str(folder), "--out", str(out), "--set", "n_synthetic=1"]) == 0
    cfg = load_config(NoiseConfig, out)
    assert cfg.shot.enabled and cfg.quantization.enabled and cfg.quantization.bit_depth == 8
    estimates = json.loads(out.with_suffix(".json").read_text())
    assert estimates["images"] == [str(folder / "img0.png"), str(folder / "img1.png")]
    assert estimates["estimates"]["dose_e_per_px"]["value"] == pytest.approx(600.0, rel=0.25)
    assert set(estimates["assumptions"]) >= {"se_yield_min", "se_yield_max", "detector_gain_cv"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    noisy, _ = synthesize(np.full((32, 32), 0.5, np.float32), cfg, np.random.default_rng(0))
    assert noisy.shape == (32, 32)


def test_cli_reports_missing_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["calibrate-noise", str(tmp_path / "empty"), "--out", str(tmp_path / "n.yaml")]) == 2
    assert "calibrate-noise: error" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Row offsets under noise correlated along the fast axis (issue 20)
# --------------------------------------------------------------------------------------------------


def _adapt_domain(offset: float) -> list[np.ndarray]:
    """benchmarks/adapt_domains.py's gauss_ar1 (wafers + Gaussian noise sigma 0.1, AR(1) 0.5 along x), 4
    images of 256 px, plus row offsets of sigma ``offset`` (clipped again)."""
    dom = load_benchmark("adapt_domains")
    noisy = dom.scans(dom.DOMAINS["gauss_ar1"], dom.render_fields(4, 256, seed=1), 0.1, seed=1)
    rng = np.random.default_rng(12)
    return [
        np.clip(z + offset * rng.standard_normal((z.shape[0], 1)), 0, 1).astype(np.float32) for z in noisy
    ]


def _bandwidth_lot(offset: float) -> list[np.ndarray]:
    """Our noise model at 1000 e-/px with its bandwidth component (lag-1 0.5 along x) and, for
    ``offset > 0``, row offsets of that sigma; 4 wafers of 256 px."""
    comps = ("shot", "detector_gain", "read_noise", "bandwidth") + (("scan_lines",) if offset else ())
    extra = {"scan_line_offset_sigma": offset, "scan_line_gain_sigma": 0.0} if offset else {}
    p = _params(*comps, read_noise_sigma=0.015, fast_axis_corr=0.5, slow_axis_corr=0.0, **extra)
    return _noisy(_wafers(1), p, 2)


@pytest.mark.parametrize("lot", [_adapt_domain, _bandwidth_lot], ids=["adapt-domain", "noise-model"])
def test_row_offset_under_fast_axis_correlated_noise(lot) -> None:
    """Before, the per-row noise floor counted the noise as white along x: with lag-1 0.5 a row mean
    varies ~3x more, and 4 such images of 1024 px without any row offset read 0.0061 +- 0.00015,
    detected and written into the NoiseConfig."""
    if lot is _bandwidth_lot and "bandwidth" not in NoiseConfig.model_fields:
        pytest.skip("NoiseConfig has no bandwidth component on this branch")
    none = calibrate(lot(0.0))
    o = none.estimates["scan_line_offset_sigma"]
    print("no offsets:", o, none.estimates["fast_axis_noise_corr"])
    assert not o.detected and not none.noise_config.scan_lines.enabled
    some = calibrate(lot(0.01))
    o = some.estimates["scan_line_offset_sigma"]
    print("offset 0.01:", o, some.estimates["fast_axis_noise_corr"])
    assert o.detected and o.value == pytest.approx(0.01, rel=0.2)


def test_ar1_quadratic_is_the_variance_of_a_weighted_sum_of_ar1_noise() -> None:
    from semray.calibrate.common import ar1_quadratic

    u = np.random.default_rng(0).random((3, 40))
    lag = np.abs(np.arange(40)[:, None] - np.arange(40)[None, :])
    for rho in (0.0, 0.5, -0.4):
        np.testing.assert_allclose(
            ar1_quadratic(u, rho), np.einsum("ai,ij,aj->a", u, rho**lag, u), rtol=1e-12
        )
    # Monte Carlo: a mean of 256 AR(1) pixels at 0.5 varies (1 + rho) / (1 - rho) ~ 3x the white value.
    x = lfilter([math.sqrt(0.75)], [1.0, -0.5], np.random.default_rng(1).standard_normal((4000, 356)), axis=1)
    w = np.full(256, 1 / 256)
    assert float(np.var(x[:, 100:] @ w)) == pytest.approx(float(ar1_quadratic(w, 0.5)), rel=0.06)
    assert float(ar1_quadratic(w, 0.5)) == pytest.approx(3.0 / 256, rel=0.02)


def test_row_noise_scale_measures_the_noise_not_the_offsets() -> None:
    """Rows of AR(1) noise (lag-1 0.5) with large row offsets: the spread of row segments measures the
    noise; 1 for the true model, ~3x for a white model, ~1/2 for a model with twice the variance."""
    rng = np.random.default_rng(2)
    e = lfilter([math.sqrt(0.75)], [1.0, -0.5], rng.standard_normal((1000, 300)), axis=1)[:, 44:]
    e += 0.5 * rng.standard_normal((e.shape[0], 1))  # row offsets, 7x the row mean's noise
    one = np.ones_like(e)
    assert row_noise_scale(e, one, one, one, 0.5) == pytest.approx(1.0, abs=0.05)
    # White model: 8 runs of 32 px; a mean of n AR(1) pixels has variance f(n) / n of the white one's,
    # f(n) = (1 + rho) / (1 - rho) - 2 rho (1 - rho**n) / ((1 - rho)**2 n): (8 f(32) - f(256)) / 7.
    f = [3.0 - 4.0 * (1 - 0.5**n) / n for n in (32, 256)]
    assert row_noise_scale(e, one, one, one, 0.0) == pytest.approx((8 * f[0] - f[1]) / 7, rel=0.05)
    assert row_noise_scale(e, one, one, math.sqrt(2) * one, 0.5) == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------------------------------
# Low dose: the censored model, noise correlation, closure (issue 20)
# --------------------------------------------------------------------------------------------------

REAL_CROP = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-sem" / "low_dose_sem_crop.tif"
)


def test_censored_moments_match_the_noise_model_at_low_dose() -> None:
    """Mean, variance and clipped fractions of semray.noise's pixels at 2 e-/px, where most pixels
    of dark and bright regions sit at 0 or 1, against the censored model (Monte Carlo, 40k pixels)."""
    from semray.calibrate.censored import censored_moments

    p = _params("shot", "detector_gain", "read_noise", dose_e_per_px=2.0, read_noise_sigma=0.03)
    a, b = poisson_gaussian_coefficients(p)
    levels = np.array([0.05, 0.3, 0.6, 0.95])
    z = apply_noise(np.repeat(levels[:, None], 40_000, 1).astype(np.float32), p, np.random.default_rng(1))
    mean, var, f_lo, f_hi = censored_moments(levels, a, b, 0.0, 1.0, 0.2, 0.5)
    np.testing.assert_allclose(mean, z.mean(1), atol=0.01)
    np.testing.assert_allclose(var, z.var(1), rtol=0.03)
    np.testing.assert_allclose(f_lo, (z <= 0).mean(1), atol=0.01)
    np.testing.assert_allclose(f_hi, (z >= 1).mean(1), atol=0.01)
    assert f_lo[0] > 0.5 and f_hi[-1] > 0.3  # censoring really matters here


# Row offsets large enough to stand out of the per-row pixel noise of 256-px rows at each dose.
LOW_DOSE_CASES = [(2.0, 0.05), (8.0, 0.03), (32.0, 0.02), (128.0, 0.02)]

READ_NOISE_BELOW_32 = (
    "read noise {error:+.0%} at {dose:g} e-/px (b {b_error:+.1%}); below 32 e-/px read_sigma**2 = "
    "b - a y0 / dY is 2 % (2 e-/px) and 7 % (8 e-/px) of b, so 15 % on the read noise needs b within "
    "0.6 % and 2.2 %. Measured causes: at 2 e-/px the censored fit itself (b +4.4 % on a mosaic of flat "
    "8 x 8 patches, no pattern); at 8 e-/px not the fit (+0.7 % on that mosaic) but the wafers' flat "
    "patches, which at this noise include intensity steps the flatness test cannot see (their variances "
    "lie 5 % below the model at observed means 0.2-0.35 and match it at 0.1-0.2), tilting the line"
)


@pytest.mark.parametrize(("dose", "offset"), LOW_DOSE_CASES, ids=[f"dose{d:g}" for d, _ in LOW_DOSE_CASES])
def test_recovers_dose_and_row_offset_from_low_to_high_dose(dose: float, offset: float) -> None:
    """At 2-32 e-/px most flat patches lie within 3 sigma of black or white (they used to be dropped,
    and calibration failed with 'too few flat patches'); the censored fit recovers the Poisson gain.
    Read noise within 15 % is asserted from 32 e-/px up; below, a miss is an xfail that states it."""
    read = 0.05
    params = _params("shot", "detector_gain", "read_noise", "scan_lines", dose_e_per_px=dose,
                     read_noise_sigma=read, scan_line_offset_sigma=offset, scan_line_gain_sigma=0.0)  # fmt: skip
    result = calibrate(_noisy(_wafers(0), params, 1))
    e = result.estimates
    a_true, _ = poisson_gaussian_coefficients(params)
    errors = {
        "poisson_a": e["poisson_a"].value / a_true - 1,
        "dose": e["dose_e_per_px"].value / dose - 1,
        "row_offset": e["scan_line_offset_sigma"].value / offset - 1,
        "read_noise": e["read_noise_sigma"].value / read - 1,
    }
    print(f"dose {dose}: relative errors", {k: round(v, 3) for k, v in errors.items()}, result.warnings)
    assert abs(errors["poisson_a"]) < 0.10 and abs(errors["dose"]) < 0.10
    assert abs(errors["row_offset"]) < 0.20
    assert result.estimates["adc_window_low"].detected  # pixels pile up at 0 at every one of these doses
    if dose < 32 and abs(errors["read_noise"]) >= 0.15:
        b_true = poisson_gaussian_coefficients(params)[1]
        b_error = e["poisson_b"].value / b_true - 1
        pytest.xfail(READ_NOISE_BELOW_32.format(error=errors["read_noise"], dose=dose, b_error=b_error))
    assert abs(errors["read_noise"]) < 0.15


CORRELATION_AT_128 = (
    "measured 0.68 for a true 0.4 (0.94 before the AR(1)-first fit): pattern left in the flat patches. "
    "On the patches that pass with the true noise model, the noise alone reads 0.46 but the noisy image "
    "0.95: after the per-line quadratic and the column mean, the pattern still holds 14 % of the lag-0 "
    "power, and a smooth residue reads as strong correlation (8-px lines keep little of a correlation's "
    "decay). A quadratic across the patch's lines too leaves 2 %, and with the flatness test corrected "
    "for the correlation reads 0.42 (8 seeds: 0.419 +- 0.02), but it loses most of the information: "
    "test_fast_axis_noise_correlation_sign_and_length[lowpass-0.5] then reads 0.64 and 1000 e-/px "
    "spreads 0.25-0.71 over 8 seeds"
)


@pytest.mark.parametrize(
    "dose", [8.0, pytest.param(128.0, marks=pytest.mark.xfail(reason=CORRELATION_AT_128, strict=False))]
)
def test_fast_axis_correlation_of_the_noise_model_is_recovered(dose: float) -> None:
    """Lag-1 within 0.05 of the noise model's own bandwidth component (AR(1) along x)."""
    if "bandwidth" not in NoiseConfig.model_fields:
        pytest.skip("NoiseConfig has no bandwidth component on this branch (the noise branch adds it)")
    cfg = NoiseConfig().only("shot", "detector_gain", "read_noise", "bandwidth")
    p = sample_params(cfg, np.random.default_rng(0)).replace(
        dose_e_per_px=dose, read_noise_sigma=0.02, fast_axis_corr=0.4, slow_axis_corr=0.0
    )
    result = calibrate(_noisy(_wafers(2, ("contacts", "tin_balls", "lines")), p, 3))
    rho = result.estimates["fast_axis_noise_corr"]
    assert rho.detected and rho.value == pytest.approx(0.4, abs=0.05)
    assert result.noise_config.bandwidth.enabled


def test_closure_summary_gives_the_verdict_first() -> None:
    """The CLI's closure line: within target with the largest errors, or where it misses; no data is
    said to be unmeasured, never met."""
    from semray.calibrate.closure import closure_summary

    ok = {
        "mv_bin_mean": [0.2, 0.5, None],
        "mv_rel_error": [0.05, -0.08, None],
        "mv_rel_error_max": 0.08,
        "acf_x_real": [0.1, 0.05, 0.0],
        "acf_x_synthetic": [0.12, 0.04, 0.0],
        "acf_y_real": [0.0] * 3,
        "acf_y_synthetic": [0.01] * 3,
        "acf_abs_error_max": 0.02,
    }
    line = closure_summary(ok, 4, 10)
    assert line.startswith("closure: within target (on 4 of 10 images)")
    assert "variance within 8.0 %" in line and "autocorrelation within 0.020" in line
    bad = ok | {"mv_rel_error": [0.05, -0.3, 0.12], "mv_rel_error_max": 0.3}
    line = closure_summary(bad, 1)
    assert line.startswith("closure: MISSES target (on 1 image)")
    assert "-30 % off the real one at intensity 0.5" in line and "autocorrelation" not in line
    no_acf = ok | {"acf_x_real": [None] * 3, "acf_y_real": [None] * 3, "acf_abs_error_max": None}
    line = closure_summary(no_acf, 2)
    assert line.startswith("closure: within target") and "autocorrelation not measured" in line
    assert closure_summary({}, 2).startswith("closure: not measured")


def test_cli_calibrates_every_page_of_a_multipage_tiff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each page is an image of its own, named ``file.tif[page k]`` as ``semray adapt`` names it, and
    the terminal says whether the fit's look-alikes reproduce the images (the JSON's closure)."""
    from sem_files import write_multipage

    stack = tmp_path / "stack.tif"
    write_multipage(stack, pages=3, shape=(128, 160))
    out = tmp_path / "cal" / "noise.yaml"
    assert main(["calibrate-noise", str(stack), "--out", str(out), "--set", "n_synthetic=1"]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    names = [f"{stack}[page {k}]" for k in range(3)]
    assert payload["images"] == [str(stack)] and payload["pages"] == names
    assert len(payload["per_image"]) == 3 and payload["closure"]["images"] == names
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("closure:")]
    assert len(lines) == 1
    c = payload["closure"]
    if c["mv_within_target"] and c["acf_within_target"]:
        assert lines[0].startswith("closure: within target (on 3 images)")
        assert f"variance within {100 * c['mv_rel_error_max']:.1f} %" in lines[0]
    else:
        assert lines[0].startswith("closure: MISSES target (on 3 images)")


def test_cli_refuses_a_thumbnail_page_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A reduced-resolution preview page (NewSubfileType bit 0) is refused by name, as ``semray adapt``
    refuses it, instead of being calibrated on (its noise is averaged down) or dropped silently."""
    import tifffile
    from sem_files import write_multipage

    data = write_multipage(tmp_path / "src.tif", pages=1, shape=(128, 160))
    bad = tmp_path / "with_thumb.tif"
    with tifffile.TiffWriter(bad) as tw:
        tw.write(data[0], photometric="minisblack")
        tw.write(data[0][::4, ::4], photometric="minisblack", subfiletype=1)
    out = tmp_path / "n.yaml"
    assert main(["calibrate-noise", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}[page 1]: reduced-resolution preview page (thumbnail)" in err
    assert f"{bad}[page 0]" not in err and not out.exists()


def test_constant_image_is_a_clear_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flat = np.full((64, 64), 0.5, np.float32)
    path = tmp_path / "flat.png"
    write_image(path, flat, ImageMeta(dtype="uint8", shape=flat.shape, format="png"))
    assert main(["calibrate-noise", str(path), "--out", str(tmp_path / "n.yaml")]) == 2
    err = capsys.readouterr().err
    assert "flat.png" in err and "constant" in err
    assert not (tmp_path / "n.yaml").exists()


@pytest.mark.skipif(not REAL_CROP.is_file(), reason=f"real low-dose crop not present at {REAL_CROP}")
def test_real_low_dose_crop_calibrates_with_closure(tmp_path: Path) -> None:
    """The real fast-scan image (noise std ~0.19 of the range) failed with 'too few flat patches'."""
    from semray.calibrate import run_calibration

    result = run_calibration([REAL_CROP], tmp_path / "noise.yaml", CalibrationConfig(n_synthetic=1))
    load_config(NoiseConfig, tmp_path / "noise.yaml")
    closure = json.loads((tmp_path / "noise.json").read_text())["closure"]
    print(
        "closure:",
        {k: closure[k] for k in ("mv_rel_error", "acf_abs_error_max", "row_psd_log10_ratio_bands")},
    )
    assert result.estimates["poisson_a"].detected
    assert math.isfinite(closure["mv_rel_error_max"]) and math.isfinite(closure["acf_abs_error_max"])
    assert len(closure["acf_x_real"]) == 3 and len(closure["mv_rel_error"]) == 10


def test_concat_rows_joins_per_block_fields_and_keeps_shared_ones() -> None:
    from semray.calibrate.charging import RidgeSums

    decays = np.array([2.0, 8.0])
    a = RidgeSums(np.ones((1, 3, 4)), np.ones((1, 3, 2, 4)), np.ones((1, 3)), decays)
    b = RidgeSums(2 * np.ones((2, 3, 4)), 2 * np.ones((2, 3, 2, 4)), 2 * np.ones((2, 3)), decays.copy())
    c = RidgeSums.concat([a, b])
    assert c.p.shape == (3, 3, 4) and c.m.shape == (3, 3, 2, 4) and c.n.shape == (3, 3)
    np.testing.assert_array_equal(c.n[:, 0], [1.0, 2.0, 2.0])  # block order kept
    assert c.decays is decays  # the shared grid is taken from the first item, not stacked


def test_variance_under_non_ar1_fast_axis_correlation_with_row_offsets() -> None:
    """Noise correlated along x with a shape no AR(1) has (white noise convolved along x with
    ``[1, 1, -0.5]``: lag-1 +0.22, lag-2 -0.22) plus row offsets: the variance comes from the y samples,
    whose row offsets are removed over the full row, so it needs no model of the x correlation (the
    AR(1) corrections as before gave 1.13x; now 0.99x)."""
    sigma, kernel = 0.04, np.array([1.0, 1.0, -0.5])
    rng = np.random.default_rng(5)
    imgs = []
    for clean in _wafers(3):
        white = rng.standard_normal((clean.shape[0], clean.shape[1] + 2))
        noise = np.apply_along_axis(np.convolve, 1, white, kernel, "valid") / np.linalg.norm(kernel)
        rows = 0.01 * rng.standard_normal((clean.shape[0], 1))
        imgs.append((0.2 + 0.6 * clean + sigma * noise + rows).astype(np.float32))
    e = calibrate(imgs).estimates
    assert e["fast_axis_noise_corr"].detected
    var = e["poisson_a"].value * 0.5 + e["poisson_b"].value
    print("variance / truth:", var / sigma**2)
    assert var == pytest.approx(sigma**2, rel=0.10)

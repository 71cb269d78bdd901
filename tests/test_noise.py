"""Physical SEM noise model: statistics match the physics, every component has a signature that
vanishes when it is switched off, draws are deterministic and stable, config errors name the field."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats
from scipy.ndimage import gaussian_filter

from semray.config.base import ConfigError, load_config
from semray.config.noise import COMPONENTS, PHYSICAL_ORDER, NoiseConfig, NoiseParams, NoiseRange
from semray.noise import (
    EXACT_COUNT_LIMIT,
    adc_window,
    apply_noise,
    bandwidth_filter,
    clean_target,
    counts_to_intensity,
    detector_gain_noise,
    drift_profile,
    expected_se_counts,
    image_rng,
    poisson_gaussian_coefficients,
    poisson_small,
    quantize,
    read_noise,
    sample_params,
    shot_noise,
    synthesize,
)


def _params(*enabled: str, **values: float) -> NoiseParams:
    """Default-sampled parameters with exactly ``enabled`` components on and some values pinned."""
    p = sample_params(NoiseConfig().only(*enabled), np.random.default_rng(123))
    return p.replace(**values)


def _wafer(h: int = 128, w: int = 160) -> np.ndarray:
    """A wafer-like test pattern: line/space grating with bright edges, contact holes below."""
    x = np.arange(w)
    line = (x % 32 >= 8) & (x % 32 < 24)
    img = np.where(line, 0.45, 0.22)[None, :].repeat(h, axis=0)
    edge = np.convolve(np.r_[False, line[1:] != line[:-1]].astype(float), np.ones(3), "same") > 0
    img[:, edge] = 0.9
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy % 40) - 20, (xx % 40) - 20)
    lower = yy >= h // 2
    img[lower & (r < 10)] = 0.08
    img[lower & (np.abs(r - 10.5) < 1.2)] = 0.85
    return gaussian_filter(img, 0.8).astype(np.float32)


def _psnr(noisy: np.ndarray, clean: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((noisy.astype(np.float64) - clean) ** 2)))


def _flat_levels(levels: list[float], rows: int, width: int) -> np.ndarray:
    return np.repeat(np.asarray(levels, dtype=np.float32), rows)[:, None].repeat(width, axis=1)


# ------------------------------------------------------------------------------------------------
# Determinism and random streams
# ------------------------------------------------------------------------------------------------


def test_same_seed_gives_same_bytes_and_other_ids_differ() -> None:
    clean = _wafer(96, 77)
    a, pa = synthesize(clean, NoiseConfig(), image_rng(5, "wafer-1", epoch=2))
    b, pb = synthesize(clean, NoiseConfig(), image_rng(5, "wafer-1", epoch=2))
    assert a.tobytes() == b.tobytes() and pa == pb
    c, _ = synthesize(clean, NoiseConfig(), image_rng(5, "wafer-2", epoch=2))
    d, _ = synthesize(clean, NoiseConfig(), image_rng(5, "wafer-1", epoch=3))
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_image_rng_is_a_stable_derivation() -> None:
    # Literal values computed once: a salted hash() or another derivation would change them.
    assert image_rng(0, "a").random() == pytest.approx(0.6353107967449789, abs=0)
    # The documented derivation, recomputed independently of the implementation.
    key = int.from_bytes(hashlib.blake2b(b"lot3/w12/img_0042.tif", digest_size=8).digest(), "little")
    expect = np.random.default_rng([7, 4, key]).random(3)
    np.testing.assert_array_equal(image_rng(7, "lot3/w12/img_0042.tif", epoch=4).random(3), expect)
    with pytest.raises(ValueError, match="seed"):
        image_rng(-1, "a")


def test_output_is_float32_in_unit_range_for_any_shape_and_input_untouched() -> None:
    clean = np.random.default_rng(0).random((37, 53))  # float64, odd sizes
    before = clean.copy()
    out, _ = synthesize(clean, NoiseConfig(), image_rng(1, "odd"))
    assert out.dtype == np.float32 and out.shape == (37, 53)
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(clean, before)
    with pytest.raises(ValueError, match="H, W"):
        apply_noise(np.zeros((2, 3, 4)), _params(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN"):
        apply_noise(np.full((4, 4), np.nan), _params(), np.random.default_rng(0))


def test_disabling_a_component_leaves_the_others_draws_unchanged() -> None:
    clean = np.full((64, 96), 0.5, dtype=np.float32)
    read_only = _params("read_noise", read_noise_sigma=0.02)
    both = read_only.replace(scan_lines_enabled=True, scan_line_offset_sigma=0.05, scan_line_gain_sigma=0.0)
    a = apply_noise(clean, read_only, image_rng(0, "x"))
    b = apply_noise(clean, both, image_rng(0, "x"))
    # Same read-noise draws: the difference is one offset per row, constant along the row.
    diff = (b - a).astype(np.float64)
    assert np.abs(diff - diff.mean(axis=1, keepdims=True)).max() < 1e-6
    assert diff.mean(axis=1).std() > 0.02


def test_all_components_off_returns_the_clean_image() -> None:
    clean = _wafer(40, 50)
    out = apply_noise(clean, _params(), image_rng(0, "off"))
    np.testing.assert_array_equal(out, clean)


# ------------------------------------------------------------------------------------------------
# Shot noise, detector gain, read noise: the Poisson-Gaussian relation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.03, 0.7, 3.3, 9.5, 19.9])
def test_poisson_small_matches_the_poisson_pmf(lam: float) -> None:
    draws = poisson_small(np.full((200, 1000), lam, dtype=np.float32), np.random.default_rng(11))
    assert draws.dtype == np.float32 and draws.shape == (200, 1000)
    counts = np.bincount(draws.astype(np.int64).ravel())
    k = np.arange(counts.size)
    expected = stats.poisson.pmf(k, np.float32(lam)) * draws.size
    keep = expected > 5
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    assert stats.chi2.sf(chi2, max(int(keep.sum()) - 1, 1)) > 1e-3
    assert draws.mean() == pytest.approx(lam, rel=0.02, abs=0.002)
    with pytest.raises(ValueError):
        poisson_small(np.array([EXACT_COUNT_LIMIT]), np.random.default_rng(0))


def test_shot_noise_is_poisson_across_the_exact_and_normal_regimes() -> None:
    lam = np.repeat(np.array([2.0, 12.0, 19.5, 20.5, 60.0, 400.0], dtype=np.float32), 20000).reshape(6, -1)
    counts = shot_noise(lam, np.random.default_rng(2))
    np.testing.assert_allclose(counts.mean(axis=1), lam[:, 0], rtol=0.01)
    np.testing.assert_allclose(counts.var(axis=1), lam[:, 0], rtol=0.05)
    assert np.all(counts[:3] == np.round(counts[:3]))  # exact regime: integer counts


@pytest.mark.parametrize(("dose", "gain_cv"), [(8.0, 0.0), (8.0, 0.6), (200.0, 0.0), (200.0, 0.5)])
def test_variance_follows_the_poisson_gaussian_relation(dose: float, gain_cv: float) -> None:
    """var(I) = a * I + b with a, b implied by dose, SE yield, gain CV and read noise (no clipping)."""
    levels = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    clean = _flat_levels(levels, 64, 256)
    y0, y1, sigma = 0.2, 1.2, 0.01
    rng = np.random.default_rng(3)
    sig = shot_noise(expected_se_counts(clean, dose, y0, y1), rng)
    if gain_cv:
        sig = detector_gain_noise(sig, gain_cv, rng)
    noisy = read_noise(counts_to_intensity(sig, dose, y0, y1), sigma, rng).reshape(len(levels), -1)
    mean, var = noisy.mean(axis=1), noisy.var(axis=1)
    np.testing.assert_allclose(mean, levels, atol=0.01)  # unbiased
    params = _params(
        "shot",
        "read_noise",
        dose_e_per_px=dose,
        se_yield_min=y0,
        se_yield_max=y1,
        read_noise_sigma=sigma,
        detector_gain_enabled=bool(gain_cv),
        detector_gain_cv=gain_cv,
    )
    a, b = poisson_gaussian_coefficients(params)
    assert a == pytest.approx((1 + gain_cv**2) / (dose * (y1 - y0)))
    np.testing.assert_allclose(var, a * np.asarray(levels) + b, rtol=0.06)
    slope, intercept = np.polyfit(mean, var, 1)
    assert slope == pytest.approx(a, rel=0.1)
    assert intercept == pytest.approx(b, rel=0.15)


@pytest.mark.parametrize("dose", [6.0, 300.0])
def test_detector_gain_noise_multiplies_the_variance_by_one_plus_cv_squared(dose: float) -> None:
    cv = 0.6
    clean = np.full((128, 256), 0.5, dtype=np.float32)
    p = _params("shot", dose_e_per_px=dose, se_yield_min=0.2, se_yield_max=1.2, quantization_enabled=False)
    plain = apply_noise(clean, p, image_rng(0, "gain")).astype(np.float64)
    with_gain = apply_noise(
        clean, p.replace(detector_gain_enabled=True, detector_gain_cv=cv), image_rng(0, "gain")
    ).astype(np.float64)
    if dose < 10:  # low dose: stay clear of the [0, 1] clip by checking counts directly
        lam = expected_se_counts(clean, dose, 0.2, 1.2)
        rng = np.random.default_rng(9)
        plain = shot_noise(lam, rng).astype(np.float64)
        with_gain = detector_gain_noise(shot_noise(lam, rng), cv, rng).astype(np.float64)
    assert with_gain.mean() == pytest.approx(plain.mean(), rel=0.01)
    assert with_gain.var() / plain.var() == pytest.approx(1 + cv**2, rel=0.06)


@pytest.mark.parametrize(("n", "cv"), [(1, 0.7), (3, 0.5), (25, 0.3)])
def test_detector_gain_sum_is_gamma_distributed(n: int, cv: float) -> None:
    counts = np.full((400, 500), n, dtype=np.float32)
    out = detector_gain_noise(counts, cv, np.random.default_rng(6)).ravel().astype(np.float64)
    gamma = stats.gamma(a=n / cv**2, scale=cv**2)
    assert stats.kstest(out, gamma.cdf).statistic < 0.006  # Wilson-Hilferty: <= 0.003 + sampling
    assert out.mean() == pytest.approx(n, rel=0.005)
    assert out.var() == pytest.approx(n * cv**2, rel=0.02)
    zeros = detector_gain_noise(np.zeros((3, 4), np.float32), cv, np.random.default_rng(0))
    np.testing.assert_array_equal(zeros, 0.0)


def test_apply_noise_matches_the_predicted_variance_end_to_end() -> None:
    levels = [0.2, 0.35, 0.5, 0.65, 0.8]
    clean = _flat_levels(levels, 48, 256)
    p = _params(
        "shot",
        "detector_gain",
        "read_noise",
        dose_e_per_px=300.0,
        se_yield_min=0.15,
        se_yield_max=1.3,
        detector_gain_cv=0.5,
        read_noise_sigma=0.01,
    )
    noisy = apply_noise(clean, p, image_rng(0, "pg")).reshape(len(levels), -1).astype(np.float64)
    a, b = poisson_gaussian_coefficients(p)
    np.testing.assert_allclose(noisy.var(axis=1), a * np.asarray(levels) + b, rtol=0.1)


def test_default_range_spans_low_to_mild_psnr() -> None:
    """Dose at the low end of the default range: ~12 dB; at the high end: >= 25 dB (all components on)."""
    cfg = NoiseConfig()
    clean = _wafer()
    dose = cfg.shot.dose_e_per_px
    psnr = {}
    for end in ("low", "high"):
        vals = []
        for i in range(12):
            rng = image_rng(0, f"psnr-{i}")
            p = sample_params(cfg, rng).replace(dose_e_per_px=getattr(dose, end))
            vals.append(_psnr(apply_noise(clean, p, rng), clean))
        psnr[end] = float(np.median(vals))
    assert 10.5 <= psnr["low"] <= 14.0, psnr
    assert psnr["high"] >= 25.0, psnr


# ------------------------------------------------------------------------------------------------
# Structured artefacts: scan lines, jitter, charging, drift, quantisation
# ------------------------------------------------------------------------------------------------


def _row_mean_excess(noisy: np.ndarray, clean: np.ndarray) -> float:
    """Variance of row means of the residual over what independent pixel noise alone would give."""
    resid = noisy.astype(np.float64) - clean
    return float(resid.mean(axis=1).var() / (resid.var(axis=1).mean() / resid.shape[1]))


def test_scan_line_offsets_are_row_correlated_and_vanish_when_off() -> None:
    clean = np.full((256, 256), 0.5, dtype=np.float32)
    base = _params("shot", dose_e_per_px=300.0, scan_line_offset_sigma=0.02, scan_line_gain_sigma=0.0)
    off = apply_noise(clean, base, image_rng(0, "sl"))
    on = apply_noise(clean, base.replace(scan_lines_enabled=True), image_rng(0, "sl"))
    assert _row_mean_excess(on, clean) > 20
    assert _row_mean_excess(off, clean) < 2
    row_offsets = (on.astype(np.float64) - clean).mean(axis=1)
    assert row_offsets.std() == pytest.approx(0.02, rel=0.2)


def test_scan_line_gain_scales_rows_multiplicatively() -> None:
    clean = np.tile(np.r_[np.full(32, 0.2), np.full(32, 0.8)].astype(np.float32), (128, 1))
    p = _params("scan_lines", scan_line_offset_sigma=0.0, scan_line_gain_sigma=0.03)
    out = apply_noise(clean, p, image_rng(0, "gain-rows")).astype(np.float64)
    rel = out / clean - 1.0
    np.testing.assert_allclose(rel[:, :32], rel[:, 32:], atol=1e-5)  # same relative change per row
    assert rel[:, 0].std() == pytest.approx(0.03, rel=0.25)


def test_line_jitter_shifts_edges_row_to_row_only_when_enabled() -> None:
    x = np.arange(96)
    clean = np.tile(np.clip((x - 47.5) / 4.0 + 0.5, 0, 1).astype(np.float32), (400, 1))  # vertical edge
    p = _params("line_jitter", line_jitter_px=0.5)
    on = apply_noise(clean, p, image_rng(0, "jit")).astype(np.float64)
    off = apply_noise(clean, p.replace(line_jitter_enabled=False), image_rng(0, "jit"))
    # Sampling a rising edge at x + dx adds dx * (total rise = 1) to the row sum (telescoping sum of
    # the linear interpolant), so the row-sum change is the row's shift in pixels.
    shifts = on.sum(axis=1) - clean.astype(np.float64).sum(axis=1)
    assert shifts.std() == pytest.approx(0.5, rel=0.15)
    assert abs(shifts.mean()) < 0.1
    assert np.abs(np.diff(shifts)).mean() > 0.3  # changes from row to row
    np.testing.assert_array_equal(off, clean)


def test_charging_leaves_a_positive_decaying_tail_right_of_bright_features() -> None:
    clean = np.full((8, 120), 0.2, dtype=np.float32)
    clean[:, 40:50] = 0.9
    decay = 6.0
    p = _params("charging", charging_strength=0.3, charging_decay_px=decay, charging_threshold=0.6)
    out = apply_noise(clean, p, image_rng(0, "chg")).astype(np.float64)
    resid = out - clean
    assert np.all(resid[:, :41] == 0)  # nothing before (or on the first pixel of) the feature
    tail = resid[0, 50:80]
    assert tail[0] > 0.02 and np.all(np.diff(tail) < 0) and np.all(tail > 0)
    assert tail[int(decay)] / tail[0] == pytest.approx(np.exp(-1.0), rel=0.02)
    off = apply_noise(clean, p.replace(charging_enabled=False), image_rng(0, "chg"))
    np.testing.assert_array_equal(off, clean)
    dark = np.full((8, 120), 0.5, dtype=np.float32)  # below threshold: no charging at all
    np.testing.assert_array_equal(apply_noise(dark, p, image_rng(0, "chg")), dark)


def test_drift_is_a_low_frequency_row_trend() -> None:
    clean = np.full((512, 64), 0.5, dtype=np.float32)
    p = _params("drift", drift_amplitude=0.03, drift_corr_rows=40.0)
    out = apply_noise(clean, p, image_rng(0, "drift")).astype(np.float64)
    resid = out - clean
    np.testing.assert_allclose(resid, resid[:, :1].repeat(64, axis=1), atol=1e-6)  # constant along rows
    trend = resid[:, 0]
    assert np.corrcoef(trend[:-1], trend[1:])[0, 1] > 0.98  # smooth from row to row
    assert trend.std() > 0.005
    off = apply_noise(clean, p.replace(drift_enabled=False), image_rng(0, "drift"))
    np.testing.assert_array_equal(off, clean)


def test_drift_profile_has_the_requested_rms() -> None:
    rng = np.random.default_rng(4)
    prof = np.stack([drift_profile(256, 0.02, 30.0, rng) for _ in range(200)])
    assert np.sqrt(np.mean(prof**2)) == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("bits", [8, 12])
def test_quantisation_gives_at_most_two_to_the_bit_depth_levels(bits: int) -> None:
    clean = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (200, 1))
    p = _params("read_noise", "quantization", read_noise_sigma=0.05, bit_depth=bits)
    on = apply_noise(clean, p, image_rng(0, "q"))
    off = apply_noise(clean, p.replace(quantization_enabled=False), image_rng(0, "q"))
    assert np.unique(on).size <= 2**bits
    assert np.unique(off).size > 2**bits
    step = (p.quant_white_level - p.quant_black_level) / (2**bits - 1)
    assert np.abs(on.astype(np.float64) - off).max() <= step / 2 + 1e-6


def test_quantize_maps_the_window_to_codes() -> None:
    x = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(quantize(x, 8), [[0.0, 0.0, 128 / 255, 1.0, 1.0]], atol=1e-7)
    out = quantize(x, 8, black=0.25, white=0.75)
    np.testing.assert_allclose(out, [[0.25, 0.25, 0.25 + 0.5 * 128 / 255, 0.75, 0.75]], atol=1e-6)
    with pytest.raises(ValueError, match="white"):
        quantize(x, 8, black=0.5, white=0.5)


# ------------------------------------------------------------------------------------------------
# Parameters and config
# ------------------------------------------------------------------------------------------------


def test_sampled_params_lie_in_their_ranges_and_dose_is_log_uniform() -> None:
    cfg = NoiseConfig()
    ps = [sample_params(cfg, image_rng(1, str(i))) for i in range(400)]
    for comp in COMPONENTS:
        sub = getattr(cfg, comp)
        for name in type(sub).model_fields:
            v = getattr(sub, name)
            if isinstance(v, NoiseRange):
                got = np.array([getattr(p, name) for p in ps])
                assert got.min() >= v.low and got.max() <= v.high, name
    doses = np.array([p.dose_e_per_px for p in ps])
    geo_mid = np.sqrt(cfg.shot.dose_e_per_px.low * cfg.shot.dose_e_per_px.high)
    assert np.mean(doses < geo_mid) == pytest.approx(0.5, abs=0.08)
    pinned = cfg.model_copy(deep=True)
    pinned.read_noise.read_noise_sigma = NoiseRange(low=0.01, high=0.01)
    assert sample_params(pinned, image_rng(0, "p")).read_noise_sigma == 0.01


def test_switching_one_component_off_does_not_move_other_sampled_params() -> None:
    a = sample_params(NoiseConfig(), image_rng(3, "s"))
    cfg = NoiseConfig()
    cfg.drift.enabled = False
    cfg.shot.dose_e_per_px = NoiseRange(low=50, high=60)
    b = sample_params(cfg, image_rng(3, "s"))
    assert not b.drift_enabled
    assert a.drift_amplitude == b.drift_amplitude  # still recorded, unchanged
    assert a.read_noise_sigma == b.read_noise_sigma and a.line_jitter_px == b.line_jitter_px


def test_params_round_trip_through_columns_with_numpy_scalars() -> None:
    p = sample_params(NoiseConfig(), image_rng(0, "cols"))
    cols = p.as_columns()
    assert all(k.startswith("noise_") for k in cols)
    assert all(isinstance(v, (bool, int, float, str)) for v in cols.values())
    assert cols["noise_adc_window"] == "clip"
    assert cols["noise_dose_e_per_px"] == p.dose_e_per_px
    as_numpy = {k: np.asarray(v)[()] for k, v in cols.items()} | {"clean": None, "noise_seed": 3}
    assert NoiseParams.from_columns(as_numpy) == p
    with pytest.raises(KeyError, match="noise_bit_depth"):
        NoiseParams.from_columns({k: v for k, v in cols.items() if k != "noise_bit_depth"})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"shot": {"dose_e_per_px": [0, 10]}}, "shot.dose_e_per_px"),
        ({"shot": {"dose_e_per_px": {"low": 50, "high": 5}}}, "shot.dose_e_per_px"),
        ({"shot": {"se_yield_min": [0.5, 1.0], "se_yield_max": [0.8, 1.2]}}, "shot"),
        ({"read_noise": {"read_noise_sigma": [0, 2]}}, "read_noise.read_noise_sigma"),
        ({"quantization": {"bit_depth": 10}}, "quantization.bit_depth"),
        ({"charging": {"charging_threshold": 1.5}}, "charging.charging_threshold"),
        ({"drift": {"drift_period": [1, 2]}}, "drift.drift_period"),
        ({"detector_gain": {"enabled": "maybe"}}, "detector_gain.enabled"),
        ({"bandwidth": {"fast_axis_corr": [0.2, 0.99]}}, "bandwidth.fast_axis_corr"),
        ({"bandwidth": {"slow_axis_corr": [-0.1, 0.2]}}, "bandwidth.slow_axis_corr"),
        ({"bandwidth": {"corr": [0, 0.2]}}, "bandwidth.corr"),
        ({"quantization": {"adc_window": "none"}}, "quantization.adc_window"),
        ({"quantization": {"adc_headroom_sigma": -1}}, "quantization.adc_headroom_sigma"),
    ],
)
def test_config_errors_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(NoiseConfig, data)
    assert f"  {field}" in str(err.value)


def test_every_range_field_has_bounds() -> None:
    for comp in COMPONENTS:
        sub = type(getattr(NoiseConfig(), comp))
        ranges = {n for n, f in sub.model_fields.items() if f.annotation is NoiseRange}
        assert ranges and ranges <= set(sub._bounds), comp
        assert set(sub._bounds) <= set(NoiseParams.model_fields), comp


def test_yaml_short_range_form_and_log_default() -> None:
    cfg = load_config(
        NoiseConfig, {"shot": {"dose_e_per_px": [5, 50]}, "drift": {"drift_amplitude": [0, 0.1]}}
    )
    assert cfg.shot.dose_e_per_px == NoiseRange(low=5, high=50, log=True)
    assert cfg.drift.drift_amplitude == NoiseRange(low=0, high=0.1, log=False)
    assert NoiseConfig().only("shot").read_noise.enabled is False
    with pytest.raises(ValueError, match="unknown noise components"):
        NoiseConfig().only("shott")


class _AlmostOne:
    """A stand-in generator whose uniforms all sit within 1e-12 of 1 (the worst case for inversion)."""

    def random(self, size: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None:
            out[:] = 1.0 - 1e-12
            return out
        return np.full(size, 1.0 - 1e-12)


@pytest.mark.timeout(20)
def test_poisson_small_terminates_for_uniforms_next_to_one() -> None:
    # regression: such a draw (about 1 in 10^7 pixels) looped forever in the residual's series
    # inversion, because the float32 partial sums never pass u; whole training epochs hung on it
    lam = np.array([0.0, 1e-4, 2.5e-4, 0.01, 0.05, 1.0002, 7.5, 19.99], dtype=np.float32)
    n = poisson_small(lam, _AlmostOne())  # type: ignore[arg-type]
    assert n.shape == lam.shape and np.isfinite(n).all()
    # the far tail: well above the mean, yet bounded by the table (< 64) plus a few residual steps
    assert (n >= np.floor(lam)).all() and (n < 64 + 10).all()


# ------------------------------------------------------------------------------------------------
# The ADC window: 'headroom' is unbiased at low dose, 'clip' (default) is not
# ------------------------------------------------------------------------------------------------

LOW_DOSE_LEVELS = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]


def _low_dose_params(**changes: object) -> NoiseParams:
    """Shot + gain + read noise + 8-bit ADC at 2 e-/px, 'headroom' window."""
    p = _params(
        "shot",
        "detector_gain",
        "read_noise",
        "quantization",
        dose_e_per_px=2.0,
        se_yield_min=0.2,
        se_yield_max=1.2,
        detector_gain_cv=0.5,
        read_noise_sigma=0.01,
        adc_window="headroom",
    )
    return p.replace(**changes)


def _level_rows(rows: int, width: int) -> np.ndarray:
    """``LOW_DOSE_LEVELS`` as bands of ``rows`` rows each: float32 (7 * rows, width)."""
    return _flat_levels(LOW_DOSE_LEVELS, rows, width)


def test_headroom_window_is_unbiased_with_the_stated_variance_at_2_e_per_px() -> None:
    # 600k pixels per level: the mean's standard error is sigma / sqrt(n) <= 0.84 / 775 = 0.0011, so the
    # 0.005 bound is 4.6 standard errors; the variance's relative standard error is
    # sqrt((kurtosis - 1) / n) <= sqrt(6 / 6e5) = 0.3 %, far inside the 5 % bound.
    p = _low_dose_params()
    clean = _level_rows(600, 1000)
    out = apply_noise(clean, p, image_rng(0, "adc")).reshape(len(LOW_DOSE_LEVELS), -1).astype(np.float64)
    black, white = adc_window(p)
    assert black < -1.0 and white > 4.0  # 5 sigma of the 2 e-/px noise (0.35 at 0, 0.84 at 1)
    np.testing.assert_allclose(clean_target(clean, p), (clean - black) / (white - black), rtol=1e-6)
    intensity = out * (white - black) + black  # back to the clean scale
    levels = np.asarray(LOW_DOSE_LEVELS)
    assert np.abs(intensity.mean(axis=1) - levels).max() < 0.005
    a, b = poisson_gaussian_coefficients(p)
    step = (white - black) / 255
    np.testing.assert_allclose(intensity.var(axis=1), a * levels + b + step**2 / 12, rtol=0.05)
    # on the output scale: mean = clean_target, variance = formula / (white - black)**2
    target = clean_target(_flat_levels(LOW_DOSE_LEVELS, 1, 1), p).ravel()
    assert np.abs(out.mean(axis=1) - target).max() < 0.005 / (white - black)


def test_clip_window_censors_at_low_dose_as_documented() -> None:
    """The default 'clip' output: at 2 e-/px the mean is pulled towards 0.5 and the variance shrinks."""
    p = _low_dose_params(adc_window="clip")
    clean = _level_rows(100, 1000)
    out = apply_noise(clean, p, image_rng(0, "adc")).reshape(len(LOW_DOSE_LEVELS), -1).astype(np.float64)
    bias = out.mean(axis=1) - np.asarray(LOW_DOSE_LEVELS)
    a, b = poisson_gaussian_coefficients(p)
    ratio = out.var(axis=1) / (a * np.asarray(LOW_DOSE_LEVELS) + b)
    assert bias[0] > 0.08 and bias[-1] < -0.25
    assert ratio[-1] < 0.3 and ratio.max() < 0.6
    assert adc_window(p) == (0.0, 1.0)
    np.testing.assert_array_equal(clean_target(clean, p), clean)


def test_headroom_window_saturates_only_outside_it() -> None:
    """With k sigma of headroom, a pixel at intensity 0 saturates with the Gaussian tail probability."""
    p = _params("read_noise", read_noise_sigma=0.01, adc_window="headroom", adc_headroom_sigma=3.0)
    black, white = adc_window(p)
    assert (black, white) == pytest.approx((-0.03, 1.03))
    clean = _flat_levels([0.0, 0.5, 1.0], 200, 500)
    out = apply_noise(clean, p, image_rng(0, "sat")).reshape(3, -1)
    # 100k pixels per level: Phi(-3) = 0.00135, i.e. 135 +- 12 saturated pixels at each end
    assert np.mean(out[0] == 0.0) == pytest.approx(stats.norm.cdf(-3.0), rel=0.3)
    assert np.mean(out[2] == 1.0) == pytest.approx(stats.norm.cdf(-3.0), rel=0.3)
    assert np.all((out[1] > 0) & (out[1] < 1))


# ------------------------------------------------------------------------------------------------
# Detector bandwidth: AR(1) noise correlation along x and y
# ------------------------------------------------------------------------------------------------


def _autocorr(f: np.ndarray, lag: int, axis: int) -> float:
    f = f - f.mean()
    a = np.moveaxis(f, axis, 0)
    return float(np.mean(a[lag:] * a[:-lag]) / np.mean(a * a))


def test_bandwidth_gives_ar1_correlation_along_both_axes() -> None:
    # One flat 1024 x 1024 image: Bartlett's formula bounds the standard error of a lag-k autocorrelation
    # of this AR(1) x AR(1) noise by sqrt(1.6 / n) = 0.0013 (n = 2**20), so 0.01 is over 7 standard errors.
    rx, ry = 0.6, 0.3
    p = _params("shot", "detector_gain", "read_noise", dose_e_per_px=50.0, read_noise_sigma=0.01)
    p = p.replace(bandwidth_enabled=True, fast_axis_corr=rx, slow_axis_corr=ry)
    out = apply_noise(np.full((1024, 1024), 0.5, np.float32), p, image_rng(0, "bw")).astype(np.float64)
    for k in (1, 2, 3):
        assert _autocorr(out, k, axis=1) == pytest.approx(rx**k, abs=0.01), k
        assert _autocorr(out, k, axis=0) == pytest.approx(ry**k, abs=0.01), k
    assert _autocorr(out, 1, axis=1) != pytest.approx(_autocorr(out, 1, axis=0), abs=0.1)  # not isotropic
    a, b = poisson_gaussian_coefficients(p)
    assert out.var() == pytest.approx(a * 0.5 + b, rel=0.02)  # variance preserved
    assert out.mean() == pytest.approx(0.5, abs=0.002)


def test_bandwidth_keeps_mean_and_variance_at_2_e_per_px() -> None:
    # Correlation inflates the variance of a mean by (1 + rx) / (1 - rx) * (1 + ry) / (1 - ry) = 4.5, so
    # the bound on the mean is 5 of its (inflated) standard errors; the variance's error grows as much
    # and stays under 1 %.
    rx, ry = 0.5, 0.2
    p = _low_dose_params(bandwidth_enabled=True, fast_axis_corr=rx, slow_axis_corr=ry)
    clean = _level_rows(600, 1000)
    out = apply_noise(clean, p, image_rng(0, "adc")).reshape(len(LOW_DOSE_LEVELS), -1).astype(np.float64)
    black, white = adc_window(p)
    intensity = out * (white - black) + black
    levels = np.asarray(LOW_DOSE_LEVELS)
    a, b = poisson_gaussian_coefficients(p)
    sem = np.sqrt((a * levels + b) * (1 + rx) / (1 - rx) * (1 + ry) / (1 - ry) / intensity.shape[1])
    assert np.all(np.abs(intensity.mean(axis=1) - levels) < 5 * sem)
    step = (white - black) / 255
    np.testing.assert_allclose(intensity.var(axis=1), a * levels + b + step**2 / 12, rtol=0.05)


def test_bandwidth_filters_the_same_draws_and_moves_no_other_component() -> None:
    """Bandwidth on: the noise is exactly the filtered noise of bandwidth off (same shot/gain/read draws)."""
    p = _params("shot", "detector_gain", "read_noise", dose_e_per_px=300.0, read_noise_sigma=0.01)
    clean = np.full((96, 128), 0.5, np.float32)  # far from 0 and 1: the clip does not act
    off = apply_noise(clean, p, image_rng(0, "same"))
    on = apply_noise(
        clean, p.replace(bandwidth_enabled=True, fast_axis_corr=0.7, slow_axis_corr=0.4), image_rng(0, "same")
    )
    filtered, _ = bandwidth_filter(off - clean, 0.7, 0.4)
    np.testing.assert_allclose(on - clean, filtered, atol=1e-5)
    zero = apply_noise(
        clean, p.replace(bandwidth_enabled=True, fast_axis_corr=0.0, slow_axis_corr=0.0), image_rng(0, "same")
    )
    np.testing.assert_allclose(zero, off, atol=1e-6)
    # and the sampled parameters of every other component are unchanged by switching it on
    cfg = NoiseConfig()
    cfg.bandwidth.enabled = True
    a, b = sample_params(NoiseConfig(), image_rng(4, "s")), sample_params(cfg, image_rng(4, "s"))
    assert a.replace(bandwidth_enabled=True) == b


def test_output_does_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every component on, dose high enough that all counts take the (sequential) normal draws, so the
    # draws are block-independent; the bandwidth filter must carry its state across block boundaries.
    p = sample_params(NoiseConfig(), image_rng(2, "blocks")).replace(
        dose_e_per_px=400.0, bandwidth_enabled=True, fast_axis_corr=0.5, slow_axis_corr=0.4
    )
    clean = _wafer(300, 170)
    outs = []
    for block in (1 << 9, 1 << 12, 1 << 22):
        monkeypatch.setattr("semray.noise.BLOCK_PIXELS", block)
        outs.append(apply_noise(clean, p, image_rng(0, "blocks")))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_bandwidth_filter_chained_over_blocks_equals_one_pass() -> None:
    e = np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32)
    whole, last = bandwidth_filter(e, 0.6, 0.5)
    parts, carry = [], None
    for r0 in range(0, 50, 7):
        part, carry = bandwidth_filter(e[r0 : r0 + 7], 0.6, 0.5, carry)
        parts.append(part)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(last, whole[-1])
    np.testing.assert_allclose(whole[0, 0], e[0, 0], rtol=1e-6)  # stationary start
    before = e.copy()
    bandwidth_filter(e, 0.0, 0.5)
    np.testing.assert_array_equal(e, before)  # input untouched


def test_records_without_the_newer_columns_still_load() -> None:
    cols = sample_params(NoiseConfig(), image_rng(0, "old")).as_columns()
    newer = ("adc_window", "adc_headroom_sigma", "bandwidth_enabled", "fast_axis_corr", "slow_axis_corr")
    old = {k: v for k, v in cols.items() if k.removeprefix("noise_") not in newer}
    p = NoiseParams.from_columns(old)
    assert p.adc_window == "clip" and not p.bandwidth_enabled and p.fast_axis_corr == 0.0


def test_new_components_are_appended_and_off_by_default() -> None:
    # Stream i of the SeedSequence belongs to COMPONENTS[i]: the first eight must never move.
    assert COMPONENTS[:8] == (
        "line_jitter", "charging", "shot", "detector_gain", "scan_lines", "drift", "read_noise", "quantization"
    )  # fmt: skip
    assert sorted(PHYSICAL_ORDER) == sorted(COMPONENTS) and len(PHYSICAL_ORDER) == len(COMPONENTS)
    assert (
        PHYSICAL_ORDER.index("read_noise")
        < PHYSICAL_ORDER.index("bandwidth")
        < PHYSICAL_ORDER.index("quantization")
    )
    cfg = NoiseConfig()
    assert cfg.bandwidth.enabled is False and cfg.quantization.adc_window == "clip"

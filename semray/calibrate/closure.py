"""Closure: do images synthesised from the fit reproduce the real images' noise statistics?

Each real image's clean content is stood in for by :func:`pseudo_clean` (row offsets removed, 1 px
blur, fitted charging undone; the blur leaves ~8 % of the pixel noise variance in it, which the
re-noised copies carry on top of the fitted noise), re-noised ``n_synthetic`` times with the fitted
:class:`~semray.config.noise.NoiseConfig` (:func:`synthetic_lookalikes`), and both sets are measured
alike (:func:`noise_statistics`): flat-patch variance per intensity bin (bins by observed mean, the
same edges for both), lag 0-3 noise autocorrelation along x and y (detrended flat-patch residuals,
:mod:`semray.calibrate.correlation`), the row-mean spectrum, the censored fractions at the window's
ends and the charging asymmetry. :func:`closure_residuals` compares them against the targets of
issue 20: variance within 10 % in every bin, autocorrelation within 0.05 at lags 1-3;
:func:`closure_warnings` says in words where they are missed (``semray adapt``'s report shows them) and
:func:`closure_summary` gives the verdict in one line (``semray calibrate-noise`` prints it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from semray.calibrate.charging import charging_fit, ridge_sums, uncharge
from semray.calibrate.common import as_image
from semray.calibrate.correlation import lag_acf, patch_lag_sums
from semray.calibrate.result import CalibrationResult
from semray.calibrate.rows import row_offsets
from semray.calibrate.variance import NoiseVariance, PatchStats, flat_samples, flatness, patch_stats
from semray.config.calibrate import CalibrationConfig

__all__ = [
    "ACF_TARGET",
    "MV_TARGET",
    "NoiseStatistics",
    "closure",
    "closure_residuals",
    "closure_summary",
    "closure_warnings",
    "noise_statistics",
    "pseudo_clean",
    "synthetic_lookalikes",
]

MV_TARGET = 0.10
"""Closure target: synthetic flat-patch variance within this relative error of the real one per bin."""
ACF_TARGET = 0.05
"""Closure target: synthetic noise autocorrelation within this of the real one at lags 1-3."""
_BANDS = ((0.0, 0.02), (0.02, 0.1), (0.1, 0.5))  # row-spectrum bands, cycles/row (drift, mid, offsets)


@dataclass
class NoiseStatistics:
    """Noise statistics of a set of images, measured the same way for real and synthetic ones.

    ``mv_edges`` (bins + 1,): intensity bin edges; ``mv_mean``/``mv_var``/``mv_count`` (bins,):
    flat-sample mean intensity, lag-0 noise variance and sample count per bin (NaN below 20);
    ``row_freq``/``row_psd``: periodogram (Hann window) of the row means after removing the column
    profile, cycles/row and intensity^2; ``acf_x``/``acf_y`` (4,): normalised lag-0..3 products of
    detrended flat-patch residuals (:func:`~semray.calibrate.correlation.lag_acf`); ``censored``
    (2,): fraction of pixels at the window's low and high ends; ``charge_asym`` (K,): ridge-centred
    ``z[x0 + k] - z[x0 - k]`` (:class:`~semray.calibrate.charging.ChargingFit`), lags 1..K.
    """

    mv_edges: np.ndarray
    mv_mean: np.ndarray
    mv_var: np.ndarray
    mv_count: np.ndarray
    row_freq: np.ndarray
    row_psd: np.ndarray
    acf_x: np.ndarray
    acf_y: np.ndarray
    censored: np.ndarray
    charge_asym: np.ndarray


def _mean_variance_bins(
    ps: PatchStats, cfg: CalibrationConfig, edges: np.ndarray | None, model: NoiseVariance | None
) -> tuple[np.ndarray, ...]:
    """``(edges, mean, var, count)`` of flat samples per intensity bin (NaN where under 20 samples)."""
    s = flat_samples(ps, cfg.flat_ratio_max, model)
    if edges is None:
        lo, hi = np.quantile(s.mean, [0.01, 0.99]) if s.mean.size > 1 else (0.0, 1.0)
        edges = np.linspace(lo, hi, 11) if hi > lo else np.linspace(0.0, 1.0, 11)
    nb = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, s.mean, side="right") - 1, 0, nb - 1)
    inside = (s.mean >= edges[0]) & (s.mean <= edges[-1])
    cnt = np.bincount(idx[inside], minlength=nb).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mv_mean = np.bincount(idx[inside], s.mean[inside], nb) / cnt
        mv_var = np.bincount(idx[inside], s.var0[inside], nb) / cnt
    # A bin mean of fewer than 20 samples scatters by > 10 %: not shown.
    mv_mean[cnt < 20] = np.nan
    mv_var[cnt < 20] = np.nan
    return edges, mv_mean, mv_var, cnt


def _row_psd(imgs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    freq = np.fft.rfftfreq(imgs[0].shape[0])
    psd = np.zeros_like(freq)
    for z in imgs:
        r = np.mean(z - np.median(z, axis=0, keepdims=True), axis=1)
        win = np.hanning(r.size)
        p = np.abs(np.fft.rfft((r - r.mean()) * win)) ** 2 / np.sum(win**2)
        psd += np.interp(freq, np.fft.rfftfreq(r.size), p) / len(imgs)
    return freq, psd


def noise_statistics(
    images: Sequence[np.ndarray],
    cfg: CalibrationConfig | None = None,
    edges: np.ndarray | None = None,
    model: NoiseVariance | None = None,
    window: tuple[float, float] = (0.0, 1.0),
) -> NoiseStatistics:
    """Measure :class:`NoiseStatistics`; ``edges`` fixes the intensity bins (default: 10 equal bins
    over the 1-99 % range of the flat samples), ``model`` the noise variance the flatness test uses
    (default: self-normalised), ``window`` the levels whose censored fractions are counted."""
    cfg = cfg or CalibrationConfig()
    imgs = [as_image(z) for z in images]
    ps = PatchStats.concat([patch_stats(z, cfg.patch_px) for z in imgs])
    edges, mv_mean, mv_var, cnt = _mean_variance_bins(ps, cfg, edges, model)
    flat = flatness(ps, model)
    sums = np.concatenate([patch_lag_sums(z, cfg.patch_px) for z in imgs])
    acf = [lag_acf(sums[:, d][flat[:, d] <= cfg.flat_ratio_max]) for d in (0, 1)]
    freq, psd = _row_psd(imgs)
    pix = np.concatenate([z.ravel() for z in imgs])
    censored = np.array([np.mean(pix <= window[0]), np.mean(pix >= window[1])])
    decays = np.array([cfg.charging_max_decay_px])
    asym = charging_fit(
        [ridge_sums(z, cfg.charging_threshold, cfg.charging_max_lag_px, decays) for z in imgs]
    ).asym
    return NoiseStatistics(edges, mv_mean, mv_var, cnt, freq, psd, acf[0], acf[1], censored, asym)


def pseudo_clean(img: np.ndarray, result: CalibrationResult) -> np.ndarray:
    """A denoised stand-in for the clean image, to re-noise with the fitted model for comparison.

    Row offsets removed (:func:`~semray.calibrate.rows.row_offsets`), Gaussian blur of 1 px (leaves ~8 %
    of the pixel noise variance), fitted charging undone (:func:`~semray.calibrate.charging.uncharge`).
    float32 (H, W) in [0, 1].
    """
    z = as_image(img)
    s = gaussian_filter(z - row_offsets(z)[:, None], 1.0, mode="nearest")
    ch = result.noise_config.charging
    if ch.enabled:
        strength = 0.5 * (ch.charging_strength.low + ch.charging_strength.high)
        decay = 0.5 * (ch.charging_decay_px.low + ch.charging_decay_px.high)
        s = uncharge(s, strength, decay, ch.charging_threshold)
    return np.clip(s, 0.0, 1.0).astype(np.float32)


def synthetic_lookalikes(
    images: Sequence[np.ndarray], result: CalibrationResult, n_per_image: int, seed: int
) -> list[np.ndarray]:
    """``n_per_image`` re-noised copies of each image's :func:`pseudo_clean`, drawn from the fitted config."""
    from semray.noise import synthesize

    out = []
    for i, img in enumerate(images):
        clean = pseudo_clean(img, result)
        for j in range(n_per_image):
            out.append(synthesize(clean, result.noise_config, np.random.default_rng([seed, i, j]))[0])
    return out


def _finite(x: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(x, dtype=np.float64)]


def closure_residuals(real: NoiseStatistics, synth: NoiseStatistics) -> dict[str, Any]:
    """Synthetic minus real: relative variance error per intensity bin, autocorrelation differences at
    lags 1-3 along x and y, log10 power ratio of the row-mean spectrum in three bands (below 0.02,
    0.02-0.1, above 0.1 cycles/row), censored fractions; the largest errors and whether the targets
    (:data:`MV_TARGET`, :data:`ACF_TARGET`) are met. NaN/None where a bin or lag has no data."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = synth.mv_var / real.mv_var - 1.0
    dx, dy = synth.acf_x[1:4] - real.acf_x[1:4], synth.acf_y[1:4] - real.acf_y[1:4]
    bands = []
    for lo, hi in _BANDS:
        sel = (real.row_freq > lo) & (real.row_freq <= hi)
        ratio = np.mean(synth.row_psd[sel]) / np.mean(real.row_psd[sel]) if sel.any() else np.nan
        bands.append(math.log10(ratio) if ratio > 0 else math.nan)
    finite_rel, finite_acf = rel[np.isfinite(rel)], np.concatenate([dx, dy])
    finite_acf = finite_acf[np.isfinite(finite_acf)]
    mv_max = float(np.max(np.abs(finite_rel))) if finite_rel.size else math.nan
    acf_max = float(np.max(np.abs(finite_acf))) if finite_acf.size else math.nan
    return {
        "mv_bin_mean": _finite(real.mv_mean),
        "mv_var_real": _finite(real.mv_var),
        "mv_var_synthetic": _finite(synth.mv_var),
        "mv_rel_error": _finite(rel),
        "mv_rel_error_max": mv_max,
        "mv_within_target": bool(mv_max <= MV_TARGET),
        "acf_x_real": _finite(real.acf_x[1:4]),
        "acf_x_synthetic": _finite(synth.acf_x[1:4]),
        "acf_y_real": _finite(real.acf_y[1:4]),
        "acf_y_synthetic": _finite(synth.acf_y[1:4]),
        "acf_abs_error_max": acf_max,
        "acf_within_target": bool(acf_max <= ACF_TARGET),
        "row_psd_log10_ratio_bands": {f"{lo}-{hi}": b for (lo, hi), b in zip(_BANDS, bands, strict=True)},
        "censored_fraction_real": _finite(real.censored),
        "censored_fraction_synthetic": _finite(synth.censored),
        "targets": {"mv_rel_error": MV_TARGET, "acf_abs_error": ACF_TARGET, "lags": [1, 2, 3]},
    }


def closure(
    images: Sequence[np.ndarray], result: CalibrationResult, cfg: CalibrationConfig
) -> tuple[NoiseStatistics, NoiseStatistics, list[np.ndarray], dict[str, Any]]:
    """Synthesise look-alikes of ``images`` from the fit and compare: ``(real, synthetic statistics,
    synthetic images, residuals)`` (:func:`closure_residuals`)."""
    e = result.estimates
    lo = e["adc_window_low"].value if e["adc_window_low"].detected else 0.0
    hi = e["adc_window_high"].value if e["adc_window_high"].detected else 1.0
    model = (
        result.model.variance_of if result.model is not None else (e["poisson_a"].value, e["poisson_b"].value)
    )
    synth = synthetic_lookalikes(images, result, cfg.n_synthetic, cfg.seed)
    real_stats = noise_statistics(images, cfg, model=model, window=(lo, hi))
    synth_stats = noise_statistics(synth, cfg, real_stats.mv_edges, model, (lo, hi))
    return real_stats, synth_stats, synth, closure_residuals(real_stats, synth_stats)


def _num(v: Any) -> float:
    """A residual's value as a float (None, as JSON writes NaN, is NaN)."""
    return math.nan if v is None else float(v)


def closure_warnings(residuals: dict[str, Any]) -> list[str]:
    """Where the synthetic look-alikes miss the closure targets, in words: the worst intensity bin of the
    variance (beyond :data:`MV_TARGET`) and the worst lag of the autocorrelation (beyond
    :data:`ACF_TARGET`), each with the real and synthetic values. Empty when both are met or unmeasured.

    Args:
        residuals: :func:`closure_residuals`' dict (or its JSON form, None for NaN).
    """
    out = []
    rel = np.array([_num(v) for v in residuals.get("mv_rel_error", [])])
    if rel.size and np.isfinite(rel).any() and np.nanmax(np.abs(rel)) > MV_TARGET:
        k = int(np.nanargmax(np.abs(rel)))
        level = _num(residuals["mv_bin_mean"][k])
        out.append(
            f"synthetic noise variance {100 * rel[k]:+.0f} % off the real one at intensity {level:.3g} "
            f"(flat patches; target within {100 * MV_TARGET:.0f} % in every bin)"
        )
    worst: tuple[float, str, int, float, float] | None = None
    for axis in ("x", "y"):
        real = [_num(v) for v in residuals.get(f"acf_{axis}_real", [])]
        synth = [_num(v) for v in residuals.get(f"acf_{axis}_synthetic", [])]
        for lag, (r, s) in enumerate(zip(real, synth, strict=True), start=1):
            if math.isfinite(r - s) and (worst is None or abs(s - r) > worst[0]):
                worst = (abs(s - r), axis, lag, r, s)
    if worst is not None and worst[0] > ACF_TARGET:
        _, axis, lag, r, s = worst
        out.append(
            f"noise autocorrelation along {axis} at lag {lag}: real {r:.3f}, synthetic {s:.3f} "
            f"(target within {ACF_TARGET:g} at lags 1-3)"
        )
    return out


def closure_summary(residuals: dict[str, Any], n_compared: int, n_images: int | None = None) -> str:
    """One line, verdict first: do look-alikes synthesised from the fit reproduce the real images' noise?

    ``within target`` with the largest variance and autocorrelation errors, or ``MISSES target`` with
    :func:`closure_warnings`' worst bin and lag; a part without data (no bin or lag with enough flat
    samples) is said to be unmeasured, never counted as met.

    Args:
        residuals: :func:`closure_residuals`' dict (or its JSON form, None for NaN).
        n_compared: how many real images the closure compared (the first ones calibrated on).
        n_images: how many were calibrated on (said when more than ``n_compared``).
    """
    mv, acf = _num(residuals.get("mv_rel_error_max")), _num(residuals.get("acf_abs_error_max"))
    unmeasured = [what for what, v in (("variance", mv), ("autocorrelation", acf)) if not math.isfinite(v)]
    misses = closure_warnings(residuals)
    of = f" of {n_images}" if n_images is not None and n_images > n_compared else ""
    on = f"on {n_compared}{of} image{'s' if (n_images or n_compared) != 1 else ''}"
    if misses:
        verdict = f"MISSES target ({on}): " + "; ".join(misses)
    elif len(unmeasured) == 2:
        return f"closure: not measured ({on}): no intensity bin or lag with enough flat-patch samples"
    else:
        parts = []
        if math.isfinite(mv):
            parts.append(f"variance within {100 * mv:.1f} % in every bin (target {100 * MV_TARGET:.0f} %)")
        if math.isfinite(acf):
            parts.append(f"autocorrelation within {acf:.3f} at lags 1-3 (target {ACF_TARGET:g})")
        verdict = f"within target ({on}): " + ", ".join(parts)
    if unmeasured:
        verdict += f"; {' and '.join(unmeasured)} not measured (too few flat-patch samples)"
    return f"closure: {verdict}"

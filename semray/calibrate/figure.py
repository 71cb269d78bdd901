"""The comparison of real and synthetic noise statistics: measurements, synthetic look-alikes re-noised
with the fitted model, and the figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from semray.calibrate.charging import charging_fit, ridge_sums, uncharge
from semray.calibrate.common import as_image
from semray.calibrate.result import CalibrationResult
from semray.calibrate.rows import row_offsets
from semray.calibrate.variance import PatchStats, flat_samples, flatness, patch_stats
from semray.config.calibrate import CalibrationConfig


@dataclass
class NoiseStatistics:
    """Noise statistics of a set of images, measured the same way for real and synthetic ones.

    ``mv_edges`` (bins + 1,): intensity bin edges; ``mv_mean``/``mv_var``/``mv_count`` (bins,):
    flat-sample mean intensity, lag-0 noise variance and sample count per bin (NaN below 20); ``row_freq``/``row_psd``: periodogram (Hann
    window) of the row means after removing the column profile, cycles/row and intensity^2;
    ``acf_x``/``acf_y`` (p,): normalised autocorrelation of flat-patch residuals at lags 0..p-1;
    ``charge_asym`` (K,): ridge-centred ``z[x0 + k] - z[x0 - k]`` (:class:`ChargingFit`), lags 1..K.
    """

    mv_edges: np.ndarray
    mv_mean: np.ndarray
    mv_var: np.ndarray
    mv_count: np.ndarray
    row_freq: np.ndarray
    row_psd: np.ndarray
    acf_x: np.ndarray
    acf_y: np.ndarray
    charge_asym: np.ndarray


def noise_statistics(
    images: Sequence[np.ndarray],
    cfg: CalibrationConfig | None = None,
    edges: np.ndarray | None = None,
    model: tuple[float, float] | None = None,
) -> NoiseStatistics:
    """Measure :class:`NoiseStatistics`; ``edges`` fixes the intensity bins (default: 10 equal bins
    over the 1-99 % range of the flat samples), ``model = (a, b)`` the noise variance the flatness
    test uses (default: self-normalised)."""
    cfg = cfg or CalibrationConfig()
    imgs = [as_image(z) for z in images]
    ps = PatchStats.concat([patch_stats(z, cfg.patch_px) for z in imgs])
    s = flat_samples(ps, cfg.flat_ratio_max, model)
    flat = flatness(ps, model)
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
    acf = []
    for direction, cov in ((0, ps.acf_x), (1, ps.acf_y)):
        ok = flat[:, direction].max(axis=1) <= cfg.flat_ratio_max
        acf.append(cov[ok].sum(0) / float(cov[ok, 0].sum()) if ok.any() else np.full(cfg.patch_px, np.nan))
    acf_x, acf_y = acf
    h0 = imgs[0].shape[0]
    freq = np.fft.rfftfreq(h0)
    psd = np.zeros_like(freq)
    for z in imgs:
        r = np.mean(z - np.median(z, axis=0, keepdims=True), axis=1)
        win = np.hanning(r.size)
        p = np.abs(np.fft.rfft((r - r.mean()) * win)) ** 2 / np.sum(win**2)
        psd += np.interp(freq, np.fft.rfftfreq(r.size), p) / len(imgs)
    decays = np.array([cfg.charging_max_decay_px])
    asym = charging_fit(
        [ridge_sums(z, cfg.charging_threshold, cfg.charging_max_lag_px, decays) for z in imgs]
    ).asym
    return NoiseStatistics(edges, mv_mean, mv_var, cnt, freq, psd, acf_x, acf_y, asym)


def pseudo_clean(img: np.ndarray, result: CalibrationResult) -> np.ndarray:
    """A denoised stand-in for the clean image, to re-noise with the fitted model for comparison.

    Row offsets removed (:func:`row_offsets`), Gaussian blur of 1 px (leaves ~8 % of the pixel noise
    variance), fitted charging undone (:func:`uncharge`). float32 (H, W) in [0, 1].
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


def _panel_crops(ax: Any, real_example: np.ndarray, synth_example: np.ndarray) -> None:
    crop = (slice(0, min(128, real_example.shape[0])), slice(0, min(128, real_example.shape[1])))
    for a_, im, title in ((ax[0], real_example, "real (crop)"), (ax[1], synth_example, "synthetic (crop)")):
        a_.imshow(np.asarray(im)[crop], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        a_.set_title(title, fontsize=10)
        a_.set_xticks([])
        a_.set_yticks([])


def _panel_mean_variance(a_: Any, real: NoiseStatistics, synth: NoiseStatistics, a: float, b: float) -> None:
    a_.plot(real.mv_mean, real.mv_var, "o", label="real (flat patches)")
    a_.plot(synth.mv_mean, synth.mv_var, "s", mfc="none", label="synthetic")
    shown = np.concatenate([real.mv_mean, synth.mv_mean])
    shown = shown[np.isfinite(shown)]
    lo, hi = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
    xs = np.linspace(max(lo - 0.1, 0.0), min(hi + 0.1, 1.0), 50)
    a_.plot(xs, a * xs + b, "k--", lw=1, label="fit a*I + b")
    a_.set(xlabel="mean intensity", ylabel="noise variance", title="mean-variance")
    a_.legend(fontsize=8)


def _panel_row_spectrum(a_: Any, real: NoiseStatistics, synth: NoiseStatistics) -> None:
    a_.semilogy(real.row_freq[1:], real.row_psd[1:], label="real")
    a_.semilogy(synth.row_freq[1:], synth.row_psd[1:], alpha=0.8, label="synthetic")
    a_.set(xlabel="frequency (cycles/row)", ylabel="power", title="row-mean spectrum (offsets, drift)")
    a_.legend(fontsize=8)


def _panel_acf(a_: Any, real: NoiseStatistics, synth: NoiseStatistics) -> None:
    lags = np.arange(real.acf_x.size)
    a_.plot(lags, real.acf_x, "o-", label="real, x (fast)")
    a_.plot(lags, synth.acf_x, "o--", mfc="none", label="synthetic, x")
    a_.plot(lags, real.acf_y, "s-", label="real, y (slow)")
    a_.plot(lags, synth.acf_y, "s--", mfc="none", label="synthetic, y")
    a_.axhline(0, color="k", lw=0.5)
    a_.set(xlabel="lag (px)", ylabel="autocorrelation", title="flat-patch residual ACF")
    a_.legend(fontsize=8)


def _panel_charging(
    a_: Any, real: NoiseStatistics, synth: NoiseStatistics, result: CalibrationResult
) -> None:
    k = np.arange(1, real.charge_asym.size + 1)
    a_.plot(k, real.charge_asym, label="real")
    a_.plot(k, synth.charge_asym, "--", label="synthetic")
    if result.noise_config.charging.enabled and result.charging is not None:
        a_.plot(k, result.charging.model[: k.size], "k:", label="fitted tail")
    a_.axhline(0, color="k", lw=0.5)
    a_.set(
        xlabel="lag along x (px)", ylabel="z[x0+k] - z[x0-k]", title="charging: after - before bright ridges"
    )
    a_.legend(fontsize=8)


def _title(result: CalibrationResult) -> str:
    """Components on (with their fitted values) and off."""
    nc = result.noise_config
    v = {k: e.value for k, e in result.estimates.items()}
    parts = [
        ("shot", f"dose {v['dose_e_per_px']:.3g} e/px (assumed yields/cv)"),
        ("read_noise", f"read noise {v['read_noise_sigma']:.3g}"),
        ("scan_lines", f"row offset {v['scan_line_offset_sigma']:.3g}"),
        ("line_jitter", f"jitter {v['line_jitter_px']:.3g} px"),
        ("drift", f"drift {v['drift_amplitude']:.3g}"),
        ("charging", f"charging {v['charging_strength']:.3g} / {v['charging_decay_px']:.3g} px"),
    ]
    on = "; ".join(text for comp, text in parts if getattr(nc, comp).enabled)
    off = ", ".join(comp for comp, _ in parts if not getattr(nc, comp).enabled)
    return (
        f"{on}; off: {off or 'none'}\nsynthetic = fitted model applied to a denoised copy of the real image"
    )


def calibration_figure(
    real: NoiseStatistics,
    synth: NoiseStatistics,
    result: CalibrationResult,
    out_png: str | Path,
    real_example: np.ndarray,
    synth_example: np.ndarray,
) -> Path:
    """PNG: a real and a synthetic crop, then mean-variance, row spectrum, ACF (x, y) and charging
    asymmetry of the real images next to the synthetic ones. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(13.5, 8.0), dpi=100)
    _panel_crops(ax[0, :2], real_example, synth_example)
    e = result.estimates
    _panel_mean_variance(ax[0, 2], real, synth, e["poisson_a"].value, e["poisson_b"].value)
    _panel_row_spectrum(ax[1, 0], real, synth)
    _panel_acf(ax[1, 1], real, synth)
    _panel_charging(ax[1, 2], real, synth, result)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png

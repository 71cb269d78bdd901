"""The calibration figure: real images' noise statistics next to those of images synthesised from the fit
(:mod:`semray.calibrate.closure`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from semray.calibrate.closure import NoiseStatistics
from semray.calibrate.result import CalibrationResult


def _panel_crops(ax: Any, real_example: np.ndarray, synth_example: np.ndarray) -> None:
    crop = (slice(0, min(128, real_example.shape[0])), slice(0, min(128, real_example.shape[1])))
    for a_, im, title in ((ax[0], real_example, "real (crop)"), (ax[1], synth_example, "synthetic (crop)")):
        a_.imshow(np.asarray(im)[crop], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        a_.set_title(title, fontsize=10)
        a_.set_xticks([])
        a_.set_yticks([])


def _panel_mean_variance(
    a_: Any, real: NoiseStatistics, synth: NoiseStatistics, result: CalibrationResult
) -> None:
    a_.plot(real.mv_mean, real.mv_var, "o", label="real (flat patches)")
    a_.plot(synth.mv_mean, synth.mv_var, "s", mfc="none", label="synthetic")
    shown = np.concatenate([real.mv_mean, synth.mv_mean])
    shown = shown[np.isfinite(shown)]
    lo, hi = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
    xs = np.linspace(max(lo - 0.1, 0.0), min(hi + 0.1, 1.0), 50)
    e = result.estimates
    a_.plot(xs, e["poisson_a"].value * xs + e["poisson_b"].value, "k:", lw=1, label="a*I + b (unclipped)")
    if result.model is not None:
        a_.plot(xs, result.model.variance_of(xs), "k--", lw=1, label="fit, censored at the window")
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
    a_.set(xlabel="lag (px)", ylabel="lag product / lag 0", title="noise ACF (detrended flat patches)")
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
    if hasattr(nc, "bandwidth"):
        parts.append(
            ("bandwidth", f"noise corr x {v['fast_axis_noise_corr']:.2f}, y {v['slow_axis_noise_corr']:.2f}")
        )
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

    from semray.figures import save_figure

    fig, ax = plt.subplots(2, 3, figsize=(13.5, 8.0), dpi=100)
    _panel_crops(ax[0, :2], real_example, synth_example)
    _panel_mean_variance(ax[0, 2], real, synth, result)
    _panel_row_spectrum(ax[1, 0], real, synth)
    _panel_acf(ax[1, 1], real, synth)
    _panel_charging(ax[1, 2], real, synth, result)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)

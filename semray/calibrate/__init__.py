"""Noise calibration: estimate the SEM noise model's parameters from real noisy images (no clean reference).

The estimators invert :mod:`semray.noise` component by component. Images are float ``(H, W)`` arrays in
``[0, 1]``; the fast-scan axis is x (columns), the slow-scan axis y (rows). Every estimator returns a
value and a standard error; :func:`calibrate` pools the images (they are assumed to come from one tool
setting) and turns the estimates into a :class:`~semray.config.noise.NoiseConfig` with narrow ranges,
switching off every component whose signature is not detected (estimate < ``detect_sigma`` standard
errors from zero).

Signatures, and what each estimator assumes:

* **Signal-dependent variance** (shot + detector gain + read noise + ADC). In flat 8 x 8 patches the
  half mean squared difference at lags 1 and 2 (along x within rows, or along y within columns with
  each difference's mean over the patch's columns removed, which cancels row offsets/gains/drift) is
  extrapolated to lag 0, ``(4 D(1) - D(2)) / 3``: that removes the smooth-signal term and leaves the
  noise variance ``v(I) = a * I + b``. Flatness is judged on the patch's *other* lines (independent
  noise) against a first-pass noise model. With ``y0 = se_yield_min``, ``dY = se_yield_max -
  se_yield_min``, ``cv = detector_gain_cv`` and ADC step ``q``, :mod:`semray.noise` gives::

      a = (1 + cv**2) / (dose * dY)                     b = a * y0 / dY + read_sigma**2 + q**2 / 12

  so ``dose = (1 + cv**2) / (a * dY)`` and ``read_sigma**2 = b - a * y0 / dY - q**2 / 12``.
* **Row offset (/ gain)**: per row, the second difference across rows ``z[y] - (z[y-1] + z[y+1]) / 2``
  is regressed on the local intensity. The white level of the intercept (and slope) sequences over
  rows is read off their periodogram, with harmonics of patterns that repeat along y clipped
  (:func:`white_floor`), and the pixel-noise part computed from ``v(I)`` is subtracted: exact for
  noise correlated along x by the measured lag-1 (AR(1); a row mean of correlated pixels varies
  more), and scaled by the image's own spread of row segments about their row
  (:func:`row_noise_scale`: a row offset is the same in every segment), so that a rough noise model
  or correlation does not turn into a row offset.
* **Line jitter**: the sub-pixel shift between consecutive rows is fitted separately in ``K`` segments
  of each row; jitter moves the whole row, line-edge roughness and noise do not, so the covariance of
  *different* segments' shifts is ``2 * jitter_px**2``. Jitter also makes row-to-row differences at
  x-gradients noisy; the variance fit corrects its y samples for it.
* **Noise correlation** (detector bandwidth along x, between rows along y): modelled as a
  variance-preserving AR(1) filter of the pixel noise along each axis (lag ``k``: ``corr**k``). In
  flat patches each line is detrended (quadratic) and centred across lines, the lag 0-3 products are
  pooled, and the exactly known bias of that projection is inverted (:mod:`~semray.calibrate.
  correlation`; lag 1 decaying by a second factor, so a one-lag overshoot reads right too). The
  variance fit is corrected for it; it is written as ``NoiseConfig.bandwidth`` where the noise model
  has that component (positive correlations), otherwise only recorded in the JSON.
* **Censoring / the ADC window**: near black or white the noise is clipped at the window's ends
  (pixels pile up on the end values; :func:`~semray.calibrate.quantization.censor_levels` finds them
  where visible, assuming one window for all images and that a saturated pixel reads exactly the end
  value). Flat patches there are not dropped: the mean-variance fit uses the censored model
  (:mod:`~semray.calibrate.censored`): the clipped mean, variance and censored fractions of the
  assumed noise shape, matched per patch, so calibration works from 1 to 1000 e-/px. When the
  fractions disagree with that shape (a real detector), the variances alone are fitted, with a
  warning. A window end no signal reaches is not identifiable and is reported as not seen.
* **Drift**: the per-row level of the dominant flat intensity class (drift moves it, pattern
  mostly changes only how many pixels a row has of it), low-passed; its autocovariance is fitted
  with the finite-image bias included (:func:`drift_fit`).
* **Charging**: around each bright ridge (local maximum of the above-threshold excess), the image
  ``k`` px after minus ``k`` px before; ridges on rising and falling steps are averaged with equal
  weight so mirror-image steps cancel, and the model's causal tail is fitted (:func:`charging_fit`).
* **Quantisation**: the grid of grey levels (step, black level, bit depth).

What cannot be separated (fixed assumptions and switches, :class:`CalibrationConfig`):

* dose, detector gain cv and the SE yields enter the variance only through ``a`` and ``y0 / dY``: only
  ``1 / a`` ("effective counts per unit intensity") is identifiable. Higher moments could split cv from
  dose in principle, but :mod:`semray.noise` replaces Poisson/gamma draws by normals above 20 counts
  and the ADC/clipping distort skewness, so they are not used: dose is reported *given* the assumed
  ``cv`` and yields. The synthesised noise is the same for any (dose, cv) pair with the same ``a``.
* read noise vs the shot-noise intercept ``a * y0 / dY``: read noise depends on the assumed
  ``y0 / dY``; where the shot intercept dominates ``b`` (low dose) read noise is not measurable
  (at 200 e/px and read noise 0.01 its standard error exceeds its value). Below ~32 e/px, where the
  censored fit carries the variance, read noise is 2-7 % of ``b`` and ``b`` came out 5-16 % high, so
  the read noise biased high (0.08-0.11 for a true 0.05 at 2-8 e/px on semray's images; the causes
  are in ``tests/test_calibrate.py``'s ``READ_NOISE_BELOW_32``): do not trust a read noise measured
  there.
* row offset vs row gain (``fit_row_gain``, off): arrays of jittered features leak into the per-row
  slope, so by default the offset stands for all per-row variation at the rows' typical intensity.
* charging vs specimen asymmetry (``fit_charging``, off): the ridge estimator needs a specimen that
  is mirror-symmetric along x; semray's own renderings are not (edge bands, shading), so a measured
  tail only enters the config on request. Strength is relative to the assumed ``charging_threshold``.
* row offsets vs a horizontal pattern and drift vs low-frequency pattern content are separated only
  statistically (spectral clipping, class levels); horizontal gratings are flagged and left out, and
  drift needs tall images (a 48-row correlation leaves 2-3 independent frequencies in 256 rows).

Closure (:mod:`~semray.calibrate.closure`, run by :func:`run_calibration`): images synthesised from the
fit on a denoised copy of the real ones are measured like the real ones (variance per intensity bin,
noise autocorrelation at lags 1-3 along x and y, row-mean spectrum, censored fractions); the residuals
go into the JSON and the figure.

Layout, one concern per module: :mod:`~semray.calibrate.variance` (flat patches, the plain
mean-variance fit, dose and read noise), :mod:`~semray.calibrate.censored`,
:mod:`~semray.calibrate.correlation`, :mod:`~semray.calibrate.rows` (row offsets/gains, drift),
:mod:`~semray.calibrate.jitter`, :mod:`~semray.calibrate.charging`, :mod:`~semray.calibrate.quantization`
(grey-level grid, ADC window), :mod:`~semray.calibrate.result` (the result and the fitted NoiseConfig),
:mod:`~semray.calibrate.closure` (real vs synthetic statistics), :mod:`~semray.calibrate.figure` and
:mod:`~semray.calibrate.driver` (:func:`calibrate` as a sequence of stages, :func:`run_calibration`);
the settings are :class:`~semray.config.calibrate.CalibrationConfig`.
"""

from __future__ import annotations

from semray.calibrate.censored import CensoredModel, censored_moments, fit_censored
from semray.calibrate.charging import ChargingFit, charging_fit, charging_fit_images, ridge_sums, uncharge
from semray.calibrate.closure import (
    NoiseStatistics,
    closure,
    closure_residuals,
    closure_summary,
    closure_warnings,
    noise_statistics,
    pseudo_clean,
    synthetic_lookalikes,
)
from semray.calibrate.common import Estimate
from semray.calibrate.correlation import lag_correlation, patch_lag_sums
from semray.calibrate.driver import calibrate, run_calibration
from semray.calibrate.figure import calibration_figure
from semray.calibrate.jitter import jitter_estimate
from semray.calibrate.quantization import quantization_grid
from semray.calibrate.result import CalibrationResult, noise_config_from_estimates
from semray.calibrate.rows import (
    drift_fit,
    row_artifacts,
    row_level_profile,
    row_noise_scale,
    row_offsets,
    white_floor,
)
from semray.calibrate.variance import (
    PatchStats,
    fit_mean_variance,
    flat_samples,
    flatness,
    patch_stats,
)
from semray.config.calibrate import CalibrationConfig

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "CensoredModel",
    "ChargingFit",
    "Estimate",
    "NoiseStatistics",
    "PatchStats",
    "calibrate",
    "calibration_figure",
    "censored_moments",
    "charging_fit",
    "charging_fit_images",
    "closure",
    "closure_residuals",
    "closure_summary",
    "closure_warnings",
    "drift_fit",
    "fit_censored",
    "fit_mean_variance",
    "flat_samples",
    "flatness",
    "jitter_estimate",
    "lag_correlation",
    "noise_config_from_estimates",
    "noise_statistics",
    "patch_lag_sums",
    "patch_stats",
    "pseudo_clean",
    "quantization_grid",
    "ridge_sums",
    "row_artifacts",
    "row_level_profile",
    "row_noise_scale",
    "row_offsets",
    "run_calibration",
    "synthetic_lookalikes",
    "uncharge",
    "white_floor",
]

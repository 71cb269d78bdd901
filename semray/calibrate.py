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
  (:func:`white_floor`), and the pixel-noise part computed from ``v(I)`` is subtracted.
* **Line jitter**: the sub-pixel shift between consecutive rows is fitted separately in ``K`` segments
  of each row; jitter moves the whole row, line-edge roughness and noise do not, so the covariance of
  *different* segments' shifts is ``2 * jitter_px**2``. Jitter also makes row-to-row differences at
  x-gradients noisy; the variance fit corrects its y samples for it.
* **Fast-axis noise correlation** (detector bandwidth): the lag-0 extrapolation of x-differences
  measures ``sigma**2 (1 - rho) (3 - rho) / 3`` for correlation ``rho**k``; compared with the
  y-direction variance (rows are milliseconds apart: white) it gives ``rho``, sign and length. The
  synthesis model has no such component: when detected it is reported and corrected for, not made.
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
  (at 200 e/px and read noise 0.01 its standard error exceeds its value).
* row offset vs row gain (``fit_row_gain``, off): arrays of jittered features leak into the per-row
  slope, so by default the offset stands for all per-row variation at the rows' typical intensity.
* charging vs specimen asymmetry (``fit_charging``, off): the ridge estimator needs a specimen that
  is mirror-symmetric along x; semray's own renderings are not (edge bands, shading), so a measured
  tail only enters the config on request. Strength is relative to the assumed ``charging_threshold``.
* row offsets vs a horizontal pattern and drift vs low-frequency pattern content are separated only
  statistically (spectral clipping, class levels); horizontal gratings are flagged and left out, and
  drift needs tall images (a 48-row correlation leaves 2-3 independent frequencies in 256 rows).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator
from scipy import sparse
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from semray.config.base import StrictModel, dump_yaml
from semray.config.noise import NoiseConfig

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "ChargingFit",
    "Estimate",
    "NoiseStatistics",
    "PatchStats",
    "calibrate",
    "calibration_figure",
    "charging_fit",
    "charging_fit_images",
    "drift_fit",
    "fit_mean_variance",
    "flat_samples",
    "flatness",
    "jitter_estimate",
    "noise_config_from_estimates",
    "noise_correlation",
    "noise_statistics",
    "patch_stats",
    "pseudo_clean",
    "quantization_grid",
    "ridge_sums",
    "row_artifacts",
    "row_level_profile",
    "row_offsets",
    "run_calibration",
    "synthetic_lookalikes",
    "uncharge",
    "white_floor",
]

_MAD_TO_SIGMA = 1.4826


class CalibrationConfig(StrictModel):
    """Settings and fixed assumptions of :func:`calibrate` (see the module docs for why each is fixed)."""

    assumed_se_yield_min: float = Field(
        0.2, ge=0.0, le=20.0, description="assumed SE yield at clean 0 (SE/e); fixes dose and read noise"
    )
    assumed_se_yield_max: float = Field(
        1.2, ge=1e-3, le=20.0, description="assumed SE yield at clean 1 (SE/e); fixes dose"
    )
    assumed_detector_gain_cv: float = Field(
        0.5, ge=0.0, le=5.0, description="assumed per-SE detector gain cv (dimensionless); fixes dose"
    )
    fit_row_gain: bool = Field(
        False,
        description="split per-row variation into offset and gain. Off by default: row artefacts are "
        "taken as additive at the rows' typical intensity, because arrays of jittered features (contact "
        "holes) leak into the gain estimate (measured false gains 0.04-0.065 on synthetic contacts)",
    )
    fit_charging: bool = Field(
        False,
        description="put a detected charging tail into the config. Off by default: the estimator "
        "assumes a specimen that is mirror-symmetric along x, which edge-band renderings and "
        "side-detector shading violate (on semray's synthetic wafers it reads 0.5-1.5 strength "
        "without any charging); on symmetric bright features it recovers strength and decay",
    )
    charging_threshold: float = Field(
        0.6, ge=0.0, le=1.0, description="assumed clean intensity above which the surface charges ([0, 1])"
    )
    patch_px: int = Field(8, ge=4, le=64, description="side of the square patches of the variance fit, px")
    flat_ratio_max: float = Field(
        1.5,
        gt=0.0,
        le=100.0,
        description="a patch is flat when its smoothed-gradient energy is below this multiple of the "
        "energy pure noise would give (dimensionless)",
    )
    min_noise_corr: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="smallest |lag-1 noise correlation| reported as detected (the estimator's systematic "
        "floor on dense patterns is ~0.02)",
    )
    jitter_segments: int = Field(
        4, ge=2, le=64, description="segments per row whose shifts are compared (line jitter), count"
    )
    charging_max_lag_px: int = Field(
        24, ge=6, le=512, description="largest lag along x of the charging tail fit, px"
    )
    charging_min_decay_px: float = Field(
        2.0,
        ge=0.1,
        le=100.0,
        description="shortest charging decay length searched, px; shorter tails are not told apart from "
        "pixel-scale edge shape",
    )
    charging_max_decay_px: float = Field(
        48.0, ge=1.0, le=1000.0, description="largest charging decay length searched, px"
    )
    drift_lowpass_rows: float = Field(
        16.0, ge=2.0, le=512.0, description="Gaussian sigma of the row-profile low-pass for drift, rows"
    )
    drift_min_amplitude: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="drift RMS below this is not reported as drift, intensity units (pattern leftovers "
        "in the row-level profile of 256-row images measured 0.006-0.017)",
    )
    detect_sigma: float = Field(
        3.0, ge=0.0, le=20.0, description="a component is enabled when its estimate is this many SEs > 0"
    )
    range_rel_width: float = Field(
        0.1, ge=0.0, le=1.0, description="half-width of the output ranges relative to the estimate"
    )
    range_stderr: float = Field(
        1.0, ge=0.0, le=10.0, description="minimum half-width of the output ranges, in standard errors"
    )
    n_synthetic: int = Field(
        2, ge=1, le=16, description="synthetic re-noised copies per image for the comparison figure"
    )
    seed: int = Field(0, ge=0, description="seed of the synthetic comparison images")

    @model_validator(mode="after")
    def _yields_increase(self) -> CalibrationConfig:
        if self.assumed_se_yield_max <= self.assumed_se_yield_min:
            raise ValueError("assumed_se_yield_max must be > assumed_se_yield_min")
        return self


@dataclass(frozen=True)
class Estimate:
    """One estimated quantity: value, standard error, and whether its signature was detected."""

    value: float
    stderr: float
    detected: bool = True
    note: str = ""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _as_image(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 2 or min(a.shape) < 16:
        raise ValueError(f"expected an (H, W) image with H, W >= 16, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise ValueError("expected a finite float image in [0, 1]")
    return a.astype(np.float64)


def _kernel_energy(sigma: float, derivative_axis: int | None, ndim: int) -> float:
    """Sum of squared weights of (Gaussian blur [, then central difference]) — noise gain of the filter."""
    n = int(8 * sigma) * 2 + 9
    delta = np.zeros((n,) * ndim)
    delta[(n // 2,) * ndim] = 1.0
    k = gaussian_filter(delta, sigma, mode="constant")
    if derivative_axis is not None:
        k = np.gradient(k, axis=derivative_axis)
    return float(np.sum(k * k))


def _blocks(a: np.ndarray, p: int) -> np.ndarray:
    """``(H, W)`` -> ``(H // p, W // p, p, p)`` non-overlapping tiles (a view of the top-left crop)."""
    hp, wp = a.shape[0] // p, a.shape[1] // p
    return a[: hp * p, : wp * p].reshape(hp, p, wp, p).swapaxes(1, 2)


# --------------------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------------------


def quantization_grid(img: np.ndarray) -> tuple[float, float] | None:
    """``(step, black)`` when all grey levels strictly inside (0, 1) lie on a grid ``black + k * step``.

    ``black`` is the grid offset chosen in ``(-step, 0]`` (only the offset modulo ``step`` is seen).
    ``None`` for continuous (float) data or grids finer than 16 bits. Exact 0 and 1 are skipped: the
    model clips after the ADC, so saturated pixels sit off the grid.
    """
    u = np.unique(np.asarray(img, dtype=np.float64))
    u = u[(u > 0.0) & (u < 1.0)]
    if u.size < 3 or u.size > 65536:
        return None
    d = np.diff(u)
    step = float(np.median(d[d < 1.5 * d.min()]))
    if step < 0.5 / 65535:
        return None
    k = (u - u[0]) / step
    if np.max(np.abs(k - np.rint(k))) > 0.05:
        return None
    step, u0 = np.polyfit(np.rint(k), u, 1)
    r = u0 / step
    black = (r - round(r)) * step  # in [-step / 2, step / 2]
    # A file's own grid (k / 255) gives black = 0 up to float rounding; keep it exactly 0 then.
    if abs(black) <= 1e-3 * step:
        return float(step), 0.0
    return float(step), float(black - step if black > 0 else black)


# --------------------------------------------------------------------------------------------------
# Flat patches and the mean-variance fit
# --------------------------------------------------------------------------------------------------


@dataclass
class PatchStats:
    """Per-patch noise statistics of one or more images (first axis: the ``n`` patches of side ``p``).

    Each patch's lines are split by parity: a variance comes from one parity's lines and the flatness
    test that decides whether to trust it from the other parity's, so selecting flat patches cannot
    favour patches whose noise happened to be high (self-normalised tests do, by up to ~20 %).

    ``v1``, ``v2``, ``flat``: shape (n, 2, 2) = [patch, direction, parity of the variance lines];
    direction 0 differences along x within rows, direction 1 along y within columns.
    ``v1``/``v2``: half mean squared difference at lag 1/2 (the variogram; the noise variance for white
    noise on a flat signal). Along y the mean over the patch's columns is removed from every
    difference first, which cancels row offsets, row gains and drift exactly; the result is divided by
    ``1 - 2 / p`` so white noise still gives its variance. ``energy``: energy of the x- (or y-)
    derivative of the image smoothed along that axis on the *other* lines, scaled so that white noise
    of variance ``v`` gives ``v`` (flat signal: the noise variance; edges: much more); the flatness
    ratio is ``energy`` over a noise variance (:func:`flat_samples`). ``mean`` (n,): patch mean.
    ``acf_x``/``acf_y`` (n, p): autocovariance at lags ``0 .. p-1`` of the patch residual (along x:
    patch mean removed, so row offsets show as positive correlation; along y: each column's mean
    removed, so structure constant along y is not counted).
    """

    mean: np.ndarray
    v1: np.ndarray
    v2: np.ndarray
    energy: np.ndarray
    acf_x: np.ndarray
    acf_y: np.ndarray

    @staticmethod
    def concat(items: Sequence[PatchStats]) -> PatchStats:
        return PatchStats(
            **{k: np.concatenate([getattr(s, k) for s in items]) for k in PatchStats.__dataclass_fields__}
        )


def _line_stats(t: np.ndarray, p: int, remove_line_mean: bool) -> tuple[np.ndarray, ...]:
    """``v1, v2, energy`` of shape (n_a, n_b, 2) for differences along the last axis of ``t``."""
    b = _blocks(t, p)
    m = p // 2
    white = 1.0 - 1.0 / m if remove_line_mean else 1.0
    grad = _blocks(np.gradient(gaussian_filter1d(t, 1.0, axis=1, mode="nearest"), axis=1), p)
    energy_white = _kernel_energy(1.0, 0, 1) * white
    out = np.empty((3, *b.shape[:2], 2))
    for par in (0, 1):
        lines = b[:, :, par::2, :]
        for i, lag in enumerate((1, 2)):
            d = lines[..., lag:] - lines[..., :-lag]
            if remove_line_mean:
                d = d - d.mean(axis=2, keepdims=True)
            out[i, ..., par] = 0.5 * np.mean(d * d, axis=(2, 3)) / white
    for par in (0, 1):
        g = grad[:, :, 1 - par :: 2, :]
        if remove_line_mean:
            g = g - g.mean(axis=2, keepdims=True)
        out[2, ..., par] = np.mean(g * g, axis=(2, 3)) / energy_white
    return out[0], out[1], out[2]


def patch_stats(img: np.ndarray, patch_px: int = 8) -> PatchStats:
    """Statistics of every non-overlapping ``patch_px`` square of ``img`` (float (H, W) in [0, 1])."""
    z = _as_image(img)
    p = patch_px
    if p % 2 or p < 4:
        raise ValueError(f"patch_px must be even and >= 4, got {p}")
    t = _blocks(z, p)
    n = t.shape[0] * t.shape[1]
    xs = _line_stats(z, p, remove_line_mean=False)
    ys = [a.swapaxes(0, 1) for a in _line_stats(z.T, p, remove_line_mean=True)]
    v1, v2, energy = (
        np.stack([x.reshape(n, 2), y.reshape(n, 2)], axis=1) for x, y in zip(xs, ys, strict=True)
    )
    r = t - t.mean(axis=(2, 3), keepdims=True)
    acf_x = np.stack([np.mean(r[..., k:] * r[..., : p - k], axis=(2, 3)) for k in range(p)], -1)
    # Along y each column's own mean is removed: structure constant along y (vertical lines) is not noise.
    r = t - t.mean(axis=2, keepdims=True)
    acf_y = np.stack([np.mean(r[:, :, k:, :] * r[:, :, : p - k, :], axis=(2, 3)) for k in range(p)], -1)
    return PatchStats(t.mean(axis=(2, 3)).ravel(), v1, v2, energy, acf_x.reshape(n, p), acf_y.reshape(n, p))


@dataclass
class VarianceSamples:
    """Flat-patch variance samples (1-D arrays): one per patch and line parity whose flatter direction
    passed the flatness test. ``direction``: 0 = x, 1 = y (see :class:`PatchStats`); ``patch``: index;
    ``grad_x2``: the patch signal's mean squared x-gradient (from its x ``energy`` minus the noise).

    ``var0 = (4 * v1 - v2) / 3`` extrapolates the variogram to lag 0: a smooth signal adds ``c * k**2``
    to the half mean squared difference at lag ``k`` and cancels there, white noise gives its variance.
    (Dense patterns leave no truly flat 8 x 8 patch; this removes most of what they add, ~5 % -> ~2 %.)
    """

    mean: np.ndarray
    v1: np.ndarray
    v2: np.ndarray
    direction: np.ndarray
    patch: np.ndarray
    grad_x2: np.ndarray

    @property
    def var0(self) -> np.ndarray:
        return (4.0 * self.v1 - self.v2) / 3.0


def flatness(ps: PatchStats, model: tuple[float, float] | None = None) -> np.ndarray:
    """Flatness ratios (n, 2, 2): ``energy`` over the noise variance, about 1 on flat signal.

    With ``model = (a, b)`` the noise variance is ``a * mean + b`` (absolute test); without, the
    variance of the same (other-parity) lines, which is inflated by the very structure under test and
    so only good for a first pass.
    """
    if model is None:
        noise = ps.v1[:, :, ::-1]
    else:
        noise = np.broadcast_to((model[0] * ps.mean + model[1])[:, None, None], ps.energy.shape)
    return ps.energy / np.maximum(noise, 1e-20)


def flat_samples(
    ps: PatchStats, flat_ratio_max: float, model: tuple[float, float] | None = None
) -> VarianceSamples:
    """Per patch and parity, the flatter direction's variance, kept when its :func:`flatness` passes."""
    flat = flatness(ps, model)
    best = np.argmin(flat, axis=1)  # (n, 2): direction per parity
    idx = np.arange(ps.mean.size)[:, None]
    par = np.arange(2)[None, :]
    ok = flat[idx, best, par] <= flat_ratio_max
    patch = np.broadcast_to(idx, ok.shape)[ok]
    noise_x = ps.v1[:, 0].mean(axis=1) if model is None else model[0] * ps.mean + model[1]
    grad_x2 = np.maximum(ps.energy[:, 0].mean(axis=1) - noise_x, 0.0) * _kernel_energy(1.0, 0, 1)
    return VarianceSamples(
        ps.mean[patch], ps.v1[idx, best, par][ok], ps.v2[idx, best, par][ok], best[ok], patch, grad_x2[patch]
    )


def _unsaturated(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Samples whose mean is 3 noise sigmas inside (0, 1): clipping would shrink their variance."""
    sd = np.sqrt(np.maximum(var, 0.0))
    return (mean - 3 * sd > 0.0) & (mean + 3 * sd < 1.0)


def _line_mean_factor(rho_x: float, m: int) -> float:
    """Share of the noise variance left after removing the mean of ``m`` columns 2 px apart when the
    noise has correlation ``rho_x**k`` along x (``1 - 1/m`` for white noise)."""
    i = np.arange(m)
    return float(1.0 - np.sum(rho_x ** (2.0 * np.abs(i[:, None] - i[None, :]))) / m**2)


def fit_mean_variance(
    mean: np.ndarray, var: np.ndarray, n_iter: int = 5, clip_sigmas: float = 4.0
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Fit ``var = a * mean + b`` to per-patch estimates: ``(a, b, cov (2, 2), kept mask)``.

    Weighted least squares with weights ``1 / (a * mean + b)**2`` (a variance estimate's spread grows
    with the variance itself), iterated with clipping of standardised residuals beyond
    ``clip_sigmas`` robust sigmas. The covariance is the WLS one scaled by the residual spread.
    """
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    keep = np.isfinite(mean) & np.isfinite(var)
    if keep.sum() < 4:
        raise ValueError("too few flat patches for a mean-variance fit (need >= 4)")
    x = np.stack([mean, np.ones_like(mean)], axis=1)
    fit = np.array([0.0, float(np.median(var[keep]))])
    for _ in range(n_iter):
        w = 1.0 / np.maximum(x @ fit, 1e-6 * max(fit[1], 1e-12)) ** 2
        xw = x[keep] * w[keep, None]
        fit = np.linalg.lstsq(xw.T @ x[keep], xw.T @ var[keep], rcond=None)[0]
        model = np.maximum(x @ fit, 1e-12)
        z = (var - model) / model
        scale = _MAD_TO_SIGMA * np.median(np.abs(z[keep] - np.median(z[keep])))
        new_keep = np.isfinite(z) & (np.abs(z) <= clip_sigmas * max(scale, 1e-6))
        if new_keep.sum() < 4:
            break
        keep = new_keep
    w = 1.0 / np.maximum(x @ fit, 1e-12) ** 2
    xw = x[keep] * w[keep, None]
    resid = var[keep] - x[keep] @ fit
    s2 = float(np.sum(w[keep] * resid**2) / max(int(keep.sum()) - 2, 1))
    return float(fit[0]), float(fit[1]), np.linalg.pinv(xw.T @ x[keep]) * s2, keep


def _jackknife_ratio(num: np.ndarray, den: np.ndarray, groups: int = 16) -> tuple[float, float]:
    """``sum(num) / sum(den)`` and its jackknife standard error over ``groups`` interleaved groups."""
    n = num.size
    if n < 2:
        return float("nan"), float("inf")
    g = np.arange(n) % min(groups, n)
    ns, ds = np.bincount(g, num), np.bincount(g, den)
    loo = (ns.sum() - ns) / (ds.sum() - ds)
    k = loo.size
    return float(ns.sum() / ds.sum()), float(math.sqrt((k - 1) / k * np.sum((loo - loo.mean()) ** 2)))


def noise_correlation(
    samples: VarianceSamples, direction: int, var: np.ndarray | None = None
) -> tuple[float, float]:
    """Lag-1 noise correlation along x (``direction=0``) or y (1), and its jackknife SE.

    Measured against the noise variance ``a * I + b`` fitted to the *other* direction's samples: for
    noise correlated as ``rho**k`` the lag-0 extrapolation gives ``sigma**2 (1 - rho) (3 - rho) / 3``,
    so with ``R`` = (this direction's) / (other direction's variance), ``rho = 2 - sqrt(1 + 3 R)``.
    Positive: a low-pass (detector bandwidth) along that axis; negative: an overshooting response.
    ``var``: lag-0 variances to use instead of ``samples.var0`` (e.g. already corrected for the other
    axis's correlation). NaN (SE inf) when either direction has fewer than 20 samples.
    """
    var = samples.var0 if var is None else var
    this, other = samples.direction == direction, samples.direction != direction
    if this.sum() < 20 or other.sum() < 20:
        return float("nan"), math.inf
    a, b, _, _ = fit_mean_variance(samples.mean[other], var[other])
    ratio, se = _jackknife_ratio(var[this], a * samples.mean[this] + b)
    rho = 2.0 - math.sqrt(max(1.0 + 3.0 * ratio, 0.0))
    return rho, 1.5 * se / math.sqrt(max(1.0 + 3.0 * ratio, 1e-12))


# --------------------------------------------------------------------------------------------------
# Row artefacts: offsets, gains, drift
# --------------------------------------------------------------------------------------------------


def row_offsets(img: np.ndarray, half_window: int = 3) -> np.ndarray:
    """Robust per-row offset (H,): median over x of a row minus the median of its ``2 * half_window``
    neighbouring rows (pattern that is locally constant in y cancels; row offsets and gains at the
    row's typical intensity remain). Edge rows use the neighbours that exist.
    """
    z = _as_image(img)
    h = z.shape[0]
    pad = np.pad(z, ((half_window, half_window), (0, 0)), mode="reflect")
    shifts = [k for k in range(-half_window, half_window + 1) if k != 0]
    neigh = np.median(np.stack([pad[half_window + k : half_window + k + h] for k in shifts]), axis=0)
    off = np.median(z - neigh, axis=1)
    return off - np.median(off)


@dataclass
class RowStats:
    """Per-row regression of the cross-row second difference on intensity (interior rows only).

    ``alpha_c``: intercept at the row's mean reference intensity ``s_mean`` (offset + gain * s_mean
    differences), ``beta``: slope (gain differences); ``var_alpha_c``/``var_beta``: their pixel-noise
    variances; ``sxx``: intensity spread used by the slope. NaN where too few pixels were usable.
    """

    alpha_c: np.ndarray
    beta: np.ndarray
    var_alpha_c: np.ndarray
    var_beta: np.ndarray
    s_mean: np.ndarray
    sxx: np.ndarray


def row_artifacts(img: np.ndarray, a: float, b: float, curvature_sigmas: float = 3.0) -> RowStats:
    """Per-row offset/gain differences from ``e[y] = z[y] - (z[y-1] + z[y+1]) / 2``.

    ``e`` cancels pattern that is locally linear in y and slow drift; in a row ``e = do + dg * S`` with
    ``do = o[y] - (o[y-1] + o[y+1]) / 2`` (variance ``1.5 * offset_sigma**2``), likewise ``dg``. The
    regressor ``S`` comes from rows ``y +- 2`` (blurred along x) so its noise is independent of ``e``'s.
    Pixels where ``e`` (smoothed along x) departs from the row's median by more than
    ``curvature_sigmas`` noise sigmas (pattern curving in y, jittered edges) are left out.
    ``a``, ``b``: the pixel noise variance ``a * I + b`` (from :func:`fit_mean_variance`).
    """
    z = _as_image(img)
    w = z.shape[1]
    e = (z[1:-1] - 0.5 * (z[:-2] + z[2:]))[1:-1]  # rows 2 .. h-3
    s = gaussian_filter1d(0.5 * (z[:-4] + z[4:]), 1.0, axis=1, mode="nearest")
    nu = 1.5 * np.maximum(a * s + b, 1e-12)
    ge = gaussian_filter1d(e, 2.0, axis=1, mode="nearest")
    dev = np.abs(ge - np.median(ge, axis=1, keepdims=True))
    wgt = (dev <= curvature_sigmas * np.sqrt(nu * _kernel_energy(2.0, None, 1))).astype(np.float64)
    wgt[:, :3] = 0.0
    wgt[:, -3:] = 0.0
    n = wgt.sum(axis=1)
    ok = n >= 0.25 * w
    n = np.where(ok, n, np.nan)
    sm = np.sum(wgt * s, axis=1) / n
    ds = s - sm[:, None]
    sxx = np.sum(wgt * ds * ds, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        beta = np.sum(wgt * ds * e, axis=1) / sxx
        alpha_c = np.sum(wgt * e, axis=1) / n
        var_beta = np.sum(wgt * ds * ds * nu, axis=1) / sxx**2
        var_alpha_c = np.sum(wgt * nu, axis=1) / n**2
    return RowStats(alpha_c, beta, var_alpha_c, var_beta, sm, sxx)


def white_floor(seq: np.ndarray, min_freq: float = 0.1, clip: float = 6.0) -> tuple[float, float]:
    """White level of a per-row sequence made by the second difference ``x[y] - (x[y-1] + x[y+1]) / 2``.

    Hann-windowed periodogram divided by the difference's power transfer ``(1 - cos 2 pi f)**2``, over
    ``f >= min_freq`` cycles/row; bins above ``clip`` times the running mean (and their neighbours) are
    dropped until stable: harmonics of a pattern that repeats along y (contact arrays whose rows all
    curve alike) are narrow spikes, while white row artefacts spread evenly. Returns ``(level, n_eff)``
    (variance of ``x``'s white part; ``level / sqrt(n_eff)`` is its SE). NaN entries count as missing.
    """
    valid = np.isfinite(seq)
    if valid.sum() < 16:
        return float("nan"), 0.0
    x = np.where(valid, seq - np.mean(seq[valid]), 0.0)
    w = np.hanning(x.size)
    f = np.fft.rfftfreq(x.size)
    power = np.abs(np.fft.rfft(x * w)) ** 2 / np.sum(w * w) / valid.mean()
    band = f >= min_freq
    r = power[band] / (1.0 - np.cos(2 * np.pi * f[band])) ** 2
    keep = np.ones(r.size, dtype=bool)
    for _ in range(8):
        bad = r > clip * np.mean(r[keep])
        bad[1:] |= bad[:-1].copy()
        bad[:-1] |= bad[1:].copy()
        if np.array_equal(~bad, keep) or bad.all():
            break
        keep = ~bad
    # An exponential variable truncated at clip x its mean keeps 1 - clip e^-clip / (1 - e^-clip) of it.
    shrink = 1.0 - clip * math.exp(-clip) / (1.0 - math.exp(-clip))
    # Hann-windowed neighbouring bins are correlated: ~1.5 bins per independent value.
    return float(np.mean(r[keep]) / shrink), float(keep.sum() / 1.5)


def _row_sigmas(
    stats: Sequence[RowStats], detect_sigma: float = 0.0, split_gain: bool = False, floor_rel: float = 0.5
) -> tuple[Estimate, Estimate]:
    """Offset and gain sigmas from per-image :class:`RowStats`: white floors minus pixel-noise parts.

    Gain: slope floor ``sigma_g^2 + var_noise``; offset: intercept floor (at the row's mean intensity
    ``S``) ``sigma_o^2 + sigma_g^2 <S^2> + var_noise``. Pooled over images weighted by ``n_eff``. The
    gain part is subtracted from the offset only with ``split_gain`` and a detected gain; otherwise
    the offset stands for all per-row additive variation at the rows' typical intensity (what a
    synthetic image needs). An offset counts as detected only above ``floor_rel`` of the per-row
    noise floor too (pattern leftovers measured 0.1-0.25 of it).
    """
    g_terms, o_terms = [], []
    for rs in stats:
        good_b = np.isfinite(rs.beta) & (rs.var_beta <= 4.0 * np.nanmedian(rs.var_beta))
        fb, nb = white_floor(np.where(good_b, rs.beta, np.nan))
        if nb > 0:
            g_terms.append((fb - float(np.mean(rs.var_beta[good_b])) / 1.5, fb, nb))
        good_a = np.isfinite(rs.alpha_c)
        fa, na = white_floor(rs.alpha_c)
        if na > 0:
            noise = float(np.mean(rs.var_alpha_c[good_a])) / 1.5
            o_terms.append((fa - noise, fa, na, float(np.mean(rs.s_mean[good_a] ** 2)), noise))

    def pool(terms: list[tuple[float, ...]]) -> tuple[float, float]:
        if not terms:
            return float("nan"), float("nan")
        n = np.array([t[2] for t in terms])
        v = np.array([t[0] for t in terms])
        lvl = np.array([t[1] for t in terms])
        return float(np.sum(n * v) / n.sum()), float(math.sqrt(np.sum(n * lvl**2)) / n.sum())

    g2, g2_se = pool(g_terms)
    o2, o2_se = pool(o_terms)
    gain = _sigma_from_var(g2, g2_se, detect_sigma)
    if o_terms and split_gain and gain.detected:
        s2 = float(np.average([t[3] for t in o_terms], weights=[t[2] for t in o_terms]))
        o2 -= g2 * s2
        o2_se = math.sqrt(o2_se**2 + (g2_se * s2) ** 2)
    offset = _sigma_from_var(o2, o2_se, detect_sigma)
    if o_terms:
        noise = float(np.average([t[4] for t in o_terms], weights=[t[2] for t in o_terms]))
        offset = replace(offset, detected=offset.detected and o2 > floor_rel * noise)
    if not split_gain:
        gain = replace(gain, detected=False, note="measured, not used (fit_row_gain is off)")
    return offset, gain


def _sigma_from_var(v: float, v_se: float, detect_sigma: float = 0.0) -> Estimate:
    """A standard deviation from a (possibly negative) variance estimate; SE by the delta method."""
    if not math.isfinite(v):
        return Estimate(float("nan"), float("nan"), False, "not measurable")
    sd = math.sqrt(max(v, 0.0))
    # Delta method breaks down near 0: there the SE of sigma is about sqrt(SE of the variance).
    se = v_se / (2 * sd) if sd > 0 and v > 2 * v_se else math.sqrt(max(v_se, 0.0))
    return Estimate(sd, se, bool(v > detect_sigma * v_se))


def row_level_profile(img: np.ndarray, band: float = 0.05, iters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean level of the image's dominant flat intensity class: ``(profile (H,), pixels (H,))``.

    Additive drift moves every pixel of a row, so it moves the level of each intensity class; a
    pattern mostly changes how many pixels of a row belong to which class. The class is the mode of a
    blurred copy (sigma 2 px); a row's class pixels are those within ``band`` of the class level plus
    the current profile estimate (iterated, so the band follows the drift); the row level is their
    mean. The profile is mean-free; NaN where a row has fewer than ``W / 8`` class pixels.
    """
    z = _as_image(img)
    w = z.shape[1]
    s = gaussian_filter(z, 2.0, mode="nearest")
    hist, edges = np.histogram(s, bins=100, range=(0.0, 1.0))
    m0 = 0.5 * (edges[np.argmax(hist)] + edges[np.argmax(hist) + 1])
    center = np.full(z.shape[0], m0)
    prof = np.zeros(z.shape[0])
    n = np.zeros(z.shape[0])
    for _ in range(iters):
        sel = np.abs(s - center[:, None]) < band
        n = sel.sum(axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            lvl = np.where(n >= w / 8, np.sum(sel * z, axis=1) / n, np.nan)
        if np.isfinite(lvl).sum() < 8:
            return np.full(z.shape[0], np.nan), n
        prof = lvl - np.nanmean(lvl)
        center = m0 + gaussian_filter1d(_fill_nan(prof), 4.0, mode="nearest")
    return prof, n


def _fill_nan(x: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN entries (edge values held)."""
    ok = np.isfinite(x)
    idx = np.arange(x.size)
    return np.interp(idx, idx[ok], x[ok]) if ok.any() else np.zeros_like(x)


def _expected_acov(n: int, s: float, lags: np.ndarray) -> np.ndarray:
    """Expected sample autocovariance (mean removed, divided by ``n``) of a unit-variance process with
    autocorrelation ``exp(-k^2 / (4 s^2))``, at ``lags``. The mean removal matters when ``s`` is not
    small against ``n``: ``E[acov_k] = (1/n) sum_i [R(k) - r_i - r_(i+k) + rbar]``, ``r_i`` row means of R."""
    k = np.arange(-(n - 1), n)
    rk = np.exp(-(k**2) / (4.0 * s * s))
    r = np.convolve(rk, np.ones(n), mode="valid") / n  # r_i = mean_j R(i - j), i = 0..n-1
    rbar = r.mean()
    cs = np.concatenate([[0.0], np.cumsum(r)])
    out = []
    for lag in lags:
        m = n - lag
        out.append((m * (np.exp(-(lag**2) / (4.0 * s * s)) + rbar) - cs[m] - (cs[n] - cs[lag])) / n)
    return np.array(out)


@dataclass
class DriftFit:
    """Drift of one image: ``excess`` variance of the low-passed profile over the white leak, its
    null ``null_se``, fitted RMS ``amplitude`` and kernel sigma ``corr_rows`` of the model."""

    excess: float
    null_se: float
    amplitude: float
    corr_rows: float


def drift_fit(profile: np.ndarray, white_var: float, lowpass_rows: float) -> DriftFit:
    """Fit :func:`semray.noise.drift_profile`'s amplitude and correlation to a per-row level profile.

    The profile is low-passed (Gaussian ``lowpass_rows``); its sample autocovariance is fitted by a
    drift term (model drift kernel sigma ``c`` low-passed: a Gaussian autocorrelation of width
    ``s^2 = c^2 + lowpass^2`` and variance ``A^2 c / s``) plus the known leak of the white per-row
    terms (variance ``white_var`` per row), both with the bias of a finite, mean-removed profile
    (:func:`_expected_acov`); ``s`` by grid search, the drift variance by least squares.
    """
    x = _fill_nan(profile)
    h = x.size
    lp = gaussian_filter1d(x, lowpass_rows, mode="nearest")
    lp -= lp.mean()
    lags = np.arange(0, h // 2)
    acov = np.array([np.dot(lp[: h - k], lp[k:]) / h for k in lags])
    leak_var = white_var / (2.0 * math.sqrt(math.pi) * lowpass_rows)
    leak = leak_var * _expected_acov(h, lowpass_rows, lags)
    null_dof = max(h / (math.sqrt(2 * math.pi) * lowpass_rows), 1.0)
    best = (math.inf, 0.0, lowpass_rows)
    # Longer correlations than a third of the height are mostly removed with the image mean; fitting
    # them trades a huge amplitude for a tiny visible part, so the grid stops there.
    for s in np.geomspace(lowpass_rows * 1.05, max(h / 3.0, lowpass_rows * 1.1), 40):
        e = _expected_acov(h, float(s), lags)
        d = max(float(np.dot(acov - leak, e) / np.dot(e, e)), 0.0)
        cost = float(np.sum((acov - leak - d * e) ** 2))
        if cost < best[0]:
            best = (cost, d, float(s))
    _, d, s = best
    corr = math.sqrt(max(s * s - lowpass_rows**2, 1.0))
    amp = math.sqrt(d * s / corr)
    return DriftFit(float(acov[0] - leak[0]), float(leak[0] * math.sqrt(2.0 / null_dof)), amp, corr)


# --------------------------------------------------------------------------------------------------
# Line jitter
# --------------------------------------------------------------------------------------------------


def jitter_estimate(img: np.ndarray, a: float, b: float, segments: int = 4) -> np.ndarray:
    """Per row pair, the mean over segment pairs of centred products of segment shifts (1-D array).

    Between rows ``y-1`` and ``y`` each of ``segments`` stretches of the row is fitted by
    ``z[y] - z[y-1] = c + g * m + s * dm/dx`` (``m`` the two rows' mean blurred along x; ``c, g``
    absorb row offset/gain differences; ``s`` is the shift in px, corrected for the attenuation by the
    noise in ``dm/dx``). Jitter moves every segment by the same ``dx[y] - dx[y-1]``, so products of
    *different* segments' shifts average to ``2 * jitter_px**2``; pixel noise and line-edge roughness
    are independent between segments and average out. Segments without edges (shift SE > 0.5 px) are
    skipped; rows with fewer than two usable segments are dropped.
    """
    z = _as_image(img)
    h, w = z.shape
    k = segments
    seg = (w - 4) // k
    if seg < 8:
        return np.empty(0)
    cols = slice(2, 2 + k * seg)
    # Both sides blurred alike: a blurred gradient against a sharp difference inflates the shift.
    u = gaussian_filter1d(z[1:] - z[:-1], 1.0, axis=1, mode="nearest")[:, cols]
    m = gaussian_filter1d(0.5 * (z[1:] + z[:-1]), 1.0, axis=1, mode="nearest")
    g = np.gradient(m, axis=1)[:, cols]
    m = m[:, cols]
    x = np.stack([np.ones_like(m), m, g], axis=-1).reshape(h - 1, k, seg, 3)
    uu = u.reshape(h - 1, k, seg)
    xtx = np.einsum("rksi,rksj->rkij", x, x) + np.eye(3) * 1e-12
    xtu = np.einsum("rksi,rks->rki", x, uu)
    inv = np.linalg.inv(xtx)
    shift = np.einsum("rkj,rkj->rk", inv[..., 2, :], xtu)
    # Noise: u has variance 2 v(m) * (blur energy) per pixel, the gradient 0.5 v(m) * (its energy).
    v = np.maximum(a * m + b, 1e-12).reshape(h - 1, k, seg)
    var_s = 2.0 * v.mean(axis=2) * _kernel_energy(1.0, None, 1) * inv[..., 2, 2]
    atten = 1.0 - 0.5 * v.sum(axis=2) * _kernel_energy(1.0, 0, 1) * inv[..., 2, 2]
    valid = (var_s < 0.25) & (atten > 0.5)
    shift = np.where(valid, shift / np.where(valid, atten, 1.0), np.nan)
    # Clip wild shifts (a horizontal edge crossing the pair) per segment, then centre per segment.
    med = np.nanmedian(shift, axis=0)
    mad = _MAD_TO_SIGMA * np.nanmedian(np.abs(shift - med), axis=0)
    shift = np.where(np.abs(shift - med) <= 5 * np.maximum(mad, 1e-6), shift, np.nan)
    shift = shift - np.nanmean(shift, axis=0)
    iu, ju = np.triu_indices(k, 1)
    prods = shift[:, iu] * shift[:, ju]
    n_pairs = np.sum(np.isfinite(prods), axis=1)
    with np.errstate(invalid="ignore"):
        per_row = np.nansum(prods, axis=1) / n_pairs
    return per_row[n_pairs > 0]


# --------------------------------------------------------------------------------------------------
# Charging (causal tails along the fast axis)
# --------------------------------------------------------------------------------------------------


@dataclass
class RidgeSums:
    """Sums over bright ridges, per row block and ridge class (0: no base step, 1: rising step,
    2: falling step), of ``z[x0 + k] - z[x0 - k]`` (``p``, shape (B, 3, K)), of the same differences of
    the model's unit-strength tail for every decay in ``decays`` (``m``, (B, 3, T, K)), and ridge
    counts (``n``, (B, 3)). Lags ``k = 1..K``."""

    p: np.ndarray
    m: np.ndarray
    n: np.ndarray
    decays: np.ndarray

    @staticmethod
    def concat(items: Sequence[RidgeSums]) -> RidgeSums:
        return RidgeSums(
            np.concatenate([s.p for s in items]),
            np.concatenate([s.m for s in items]),
            np.concatenate([s.n for s in items]),
            items[0].decays,
        )


def _unit_tail(d: np.ndarray, decay_px: float) -> np.ndarray:
    """:func:`semray.noise.charging`'s added signal per unit strength for excess ``d`` (H, W)."""
    from scipy.signal import lfilter

    a = math.exp(-1.0 / decay_px)
    return lfilter([0.0, 1.0 - a], [1.0, -a], d, axis=1)


def ridge_sums(
    img: np.ndarray,
    threshold: float,
    max_lag: int,
    decays: np.ndarray,
    n_blocks: int = 8,
    decharge: tuple[float, float] | None = None,
    step_min: float = 0.05,
) -> RidgeSums:
    """Collect :class:`RidgeSums` of one image for :func:`charging_fit`.

    Ridges are local maxima along x of the excess ``max(S - threshold, 0)`` of the image blurred along
    y (and, with ``decharge = (strength, decay)``, with that charging undone: a tail inside the excess
    would hide itself). A ridge's class is the sign of the base step (mean of S 3-6 px after minus
    3-6 px before, beyond ``step_min``): a bright edge band on a step is asymmetric on its own, but
    rising and falling steps are mirror images (the two edges of a line), so averaging the two
    classes with equal weight cancels the step whatever their counts; a charging tail does not cancel.
    """
    z = _as_image(img)
    h, w = z.shape
    lag = max(min(max_lag, w // 4), 6)
    zs = gaussian_filter1d(z, 1.0, axis=0, mode="nearest")
    if decharge is not None and math.isfinite(decharge[0]) and decharge[0] != 0:
        zs = uncharge(zs, decharge[0], max(decharge[1], 0.1), threshold).astype(np.float64)
    d = np.maximum(zs - threshold, 0.0)
    core = d[:, lag : w - lag]
    ridge = (core > 0) & (core >= d[:, lag - 1 : w - lag - 1]) & (core > d[:, lag + 1 : w - lag + 1])
    ys, xs = np.nonzero(ridge)
    xs = xs + lag
    k = np.arange(1, lag + 1)
    near = np.arange(3, 7)
    step = zs[ys[:, None], xs[:, None] + near].mean(1) - zs[ys[:, None], xs[:, None] - near].mean(1)
    cls = np.where(step > step_min, 1, np.where(step < -step_min, 2, 0))
    idx = np.minimum(ys * n_blocks // h, n_blocks - 1) * 3 + cls
    nb = n_blocks * 3
    # Sums per (block, class) as one sparse one-hot product (np.add.at is ~50x slower).
    onehot = sparse.csr_matrix((np.ones(idx.size), (idx, np.arange(idx.size))), shape=(nb, idx.size))
    after, before = (ys[:, None], xs[:, None] + k), (ys[:, None], xs[:, None] - k)
    p = onehot @ (z[after] - z[before])
    m = np.empty((nb, decays.size, lag))
    for t, tau in enumerate(decays):
        q = _unit_tail(d, float(tau))
        m[:, t] = onehot @ (q[after] - q[before])
    n = np.bincount(idx, minlength=nb).astype(np.float64)
    return RidgeSums(p.reshape(n_blocks, 3, lag), m.reshape(n_blocks, 3, decays.size, lag),
                     n.reshape(n_blocks, 3), decays)  # fmt: skip


@dataclass
class ChargingFit:
    """Fitted charging tail: strength (signed; < 0 is a dark tail) and decay along +x, with SEs.

    ``lags`` (K,) = 1..K; ``asym``: the ridge-centred difference ``z[x0 + k] - z[x0 - k]`` (classes
    combined, steps cancelled); ``model``: the fitted tail's (same units, intensity).
    """

    strength: float
    strength_se: float
    decay_px: float
    decay_log_se: float
    lags: np.ndarray
    asym: np.ndarray
    model: np.ndarray
    n_ridges: int

    def detected(self, detect_sigma: float, min_decay_px: float) -> bool:
        """Significant (``|strength| > detect_sigma`` SEs) *and* with a decay clearly inside the grid.

        Without charging, pixel-scale asymmetries of ridges (edge shape, noise on plateaus) fit best at
        the shortest decay and reached 4.5 SEs in measurements; real tails fit well inside the grid.
        """
        return bool(
            math.isfinite(self.strength)
            and abs(self.strength) > detect_sigma * self.strength_se
            and self.decay_px > 1.25 * min_decay_px
        )


def _combine_classes(p: np.ndarray, m: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Class means combined: no-step ridges as they are, rising/falling pairs averaged equally, the two
    parts weighted by inverse variance. ``p`` (3, K), ``m`` (3, T, K), ``n`` (3,)."""
    parts, weights = [], []
    if n[0] > 0:
        parts.append((p[0] / n[0], m[0] / n[0]))
        weights.append(n[0])
    if n[1] > 0 and n[2] > 0:
        parts.append((0.5 * (p[1] / n[1] + p[2] / n[2]), 0.5 * (m[1] / n[1] + m[2] / n[2])))
        weights.append(4.0 / (1.0 / n[1] + 1.0 / n[2]))
    if not parts:
        return None
    wsum = float(sum(weights))
    pc = sum(wt * pp for wt, (pp, _) in zip(weights, parts, strict=True)) / wsum
    mc = sum(wt * mm for wt, (_, mm) in zip(weights, parts, strict=True)) / wsum
    return pc, mc


def _fit_tail(p: np.ndarray, m: np.ndarray, n: np.ndarray, decays: np.ndarray) -> tuple[float, float, int]:
    """Best (strength, decay index) of ``p ~ s * m[t]`` over the decay grid; (nan, nan, -1) if no ridges."""
    comb = _combine_classes(p, m, n)
    if comb is None:
        return float("nan"), float("nan"), -1
    pc, mc = comb
    den = np.einsum("tk,tk->t", mc, mc)
    s = np.where(den > 0, mc @ pc / np.where(den > 0, den, 1.0), 0.0)
    cost = np.sum((pc[None, :] - s[:, None] * mc) ** 2, axis=1)
    t = int(np.argmin(cost))
    return float(s[t]), float(decays[t]), t


def charging_fit(sums: Sequence[RidgeSums]) -> ChargingFit:
    """Fit ``strength`` and ``decay_px`` of :func:`semray.noise.charging` to pooled :class:`RidgeSums`.

    Closed-form strength for every decay of the grid, the decay with the least squared residual is
    kept. Standard errors by jackknife over row blocks (of all images).
    """
    rs = RidgeSums.concat(list(sums))
    decays = rs.decays
    lag = rs.p.shape[-1]
    lags = np.arange(1, lag + 1)
    tot_p, tot_m, tot_n = rs.p.sum(0), rs.m.sum(0), rs.n.sum(0)
    s, tau, t = _fit_tail(tot_p, tot_m, tot_n, decays)
    if t < 0:
        nan = np.full(lag, np.nan)
        return ChargingFit(float("nan"), math.inf, float("nan"), math.inf, lags, nan, nan, 0)
    loo = [_fit_tail(tot_p - rs.p[i], tot_m - rs.m[i], tot_n - rs.n[i], decays) for i in range(len(rs.n))]
    ok = [v for v in loo if v[2] >= 0]
    nb = len(ok)
    if nb < 3:
        s_se, t_se = math.inf, math.inf
    else:
        ss, lt = np.array([v[0] for v in ok]), np.log([v[1] for v in ok])
        s_se = math.sqrt((nb - 1) / nb * np.sum((ss - ss.mean()) ** 2))
        t_se = math.sqrt((nb - 1) / nb * np.sum((lt - lt.mean()) ** 2))
    comb = _combine_classes(tot_p, tot_m, tot_n)
    assert comb is not None
    return ChargingFit(s, s_se, tau, t_se, lags, comb[0], s * comb[1][t], int(tot_n.sum()))


def charging_fit_images(
    images: Sequence[np.ndarray],
    threshold: float,
    max_lag: int,
    max_decay_px: float,
    min_decay_px: float = 2.0,
    iters: int = 3,
    n_decays: int = 32,
) -> tuple[ChargingFit, list[RidgeSums]]:
    """:func:`charging_fit` pooled over images, refitted ``iters`` times with the excess taken from the
    images de-charged by the previous fit (the model is linear in the *clean* excess). Decays are
    searched on a log grid over ``[min_decay_px, max_decay_px]``."""
    decays = np.geomspace(min_decay_px, max(max_decay_px, min_decay_px * 1.01), n_decays)
    sums = [ridge_sums(z, threshold, max_lag, decays) for z in images]
    fit = charging_fit(sums)
    for _ in range(iters - 1):
        if not (math.isfinite(fit.strength) and math.isfinite(fit.decay_px)) or fit.strength == 0:
            break
        dec = (fit.strength, fit.decay_px)
        sums = [ridge_sums(z, threshold, max_lag, decays, decharge=dec) for z in images]
        fit = charging_fit(sums)
    return fit, sums


def uncharge(img: np.ndarray, strength: float, decay_px: float, threshold: float) -> np.ndarray:
    """Invert :func:`semray.noise.charging` exactly: the clean image whose charged version is ``img``.

    The charge at ``x`` depends only on pixels before ``x``, so the clean row is recovered column by
    column (a loop over columns, vectorised over rows). float (H, W) in, float32 (H, W) out.
    """
    z = np.asarray(img, dtype=np.float64)
    a = math.exp(-1.0 / decay_px)
    out = np.empty_like(z)
    q = np.zeros(z.shape[0])
    prev = np.zeros(z.shape[0])
    for x in range(z.shape[1]):
        q = a * q + (1.0 - a) * np.maximum(prev - threshold, 0.0) if x else q
        prev = z[:, x] - strength * q
        out[:, x] = prev
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------------

IDENTIFIABILITY_NOTES = (
    "dose, detector_gain_cv and the SE yields enter the noise only through a = (1 + cv^2) / (dose * dY) "
    "and y0 / dY: dose is reported given the assumed cv and yields (1 / a is what the images determine)",
    "read noise = b - a * y0 / dY - step^2 / 12 depends on the assumed yields; at low dose its error is large",
    "row gain is only split from row offset with fit_row_gain (jittered feature arrays fake row gain)",
    "charging enters the config only with fit_charging: the estimator assumes a specimen mirror-symmetric "
    "along x (side-detector shading or asymmetric edges read as charging); strength is relative to the "
    "assumed charging_threshold",
    "row offsets vs horizontal pattern edges and drift vs low-frequency pattern are separated only "
    "statistically (spectral clipping, class levels); horizontal gratings are flagged and left out",
    "fast-axis noise correlation (detector bandwidth) is measured but semray.noise cannot synthesise it",
)


@dataclass
class CalibrationResult:
    """Everything :func:`calibrate` found: estimates, the fitted config, and what to keep in mind."""

    estimates: dict[str, Estimate]
    noise_config: NoiseConfig
    assumptions: dict[str, float]
    per_image: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    charging: ChargingFit | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (NaN/inf become None)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean(
            {
                "estimates": {k: asdict(v) for k, v in self.estimates.items()},
                "assumptions": dict(self.assumptions),
                "per_image": self.per_image,
                "identifiability": list(IDENTIFIABILITY_NOTES),
                "warnings": list(self.warnings),
                "noise_config": self.noise_config.model_dump(mode="json"),
            }
        )


def _anisotropy(z: np.ndarray) -> float:
    """Energy of the (blurred) pattern's y-gradient over its x-gradient; >> 1 for horizontal gratings."""
    s = gaussian_filter(z, 2.0, mode="nearest")
    gx, gy = np.gradient(s, axis=1), np.gradient(s, axis=0)
    return float(np.mean(gy * gy) / max(float(np.mean(gx * gx)), 1e-20))


def _quantization(imgs: Sequence[np.ndarray], warnings: list[str]) -> tuple[float, float] | None:
    grids = [quantization_grid(z) for z in imgs]
    if any(g is None for g in grids):
        if any(g is not None for g in grids):
            warnings.append("only some images are on a grey-level grid; quantisation left off")
        return None
    steps = np.array([g[0] for g in grids if g is not None])
    if np.ptp(steps) > 0.01 * steps.min():
        warnings.append("images use different grey-level steps; quantisation left off")
        return None
    return grids[0]


def _corrected_variance(
    s: VarianceSamples, rho_x: Estimate, patch_px: int, jitter_px: float = 0.0
) -> np.ndarray:
    """Lag-0 variances, corrected for a detected fast-axis correlation ``rho``: x samples measure
    ``(1 - rho) (3 - rho) / 3`` of the variance, y samples lose a different share to the column-mean
    removal than white noise does. Noise along y (rows milliseconds apart) is taken as white.

    Line jitter makes row-to-row differences at x-gradients as noisy as pixel noise would (white along
    y, so no flatness test sees it): ``jitter_px**2 * grad_x2`` is taken off the y samples."""
    var = s.var0.copy()
    var[s.direction == 1] -= jitter_px**2 * s.grad_x2[s.direction == 1]
    if rho_x.detected:
        r = rho_x.value
        var[s.direction == 0] /= (1.0 - r) * (3.0 - r) / 3.0
        m = patch_px // 2
        var[s.direction == 1] *= (1.0 - 1.0 / m) / _line_mean_factor(r, m)
    return var


def _mean_variance(s: VarianceSamples, var: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Two-pass fit: the second pass drops samples near saturation under the first pass's noise."""
    a, b, _, _ = fit_mean_variance(s.mean, var)
    sel = _unsaturated(s.mean, a * s.mean + b)
    a, b, cov, keep = fit_mean_variance(s.mean[sel], var[sel])
    mask = np.zeros(s.mean.size, dtype=bool)
    mask[np.flatnonzero(sel)[keep]] = True
    return a, b, cov, mask


def _physical(a: float, b: float, cov: np.ndarray, q2: float, cfg: CalibrationConfig) -> dict[str, Estimate]:
    """Map the Poisson-Gaussian ``(a, b)`` to dose and read noise under the fixed assumptions."""
    y0, dy, cv = cfg.assumed_se_yield_min, cfg.assumed_se_yield_max - cfg.assumed_se_yield_min, 0.0
    cv = cfg.assumed_detector_gain_cv
    a_se, b_se = math.sqrt(max(cov[0, 0], 0.0)), math.sqrt(max(cov[1, 1], 0.0))
    shot = a > cfg.detect_sigma * a_se and a > 0
    dose = (1.0 + cv * cv) / (a * dy) if a > 0 else float("inf")
    r2 = b - a * y0 / dy - q2
    c = y0 / dy
    r2_se = math.sqrt(max(cov[1, 1] + c * c * cov[0, 0] - 2 * c * cov[0, 1], 0.0))
    read = _sigma_from_var(r2, r2_se, cfg.detect_sigma)
    return {
        "poisson_a": Estimate(a, a_se, shot, "variance slope, intensity units (var = a * I + b)"),
        "poisson_b": Estimate(b, b_se, True, "variance at intensity 0, intensity^2"),
        "effective_counts_per_unit_intensity": Estimate(
            1.0 / a if a > 0 else float("inf"), a_se / a**2 if a > 0 else float("inf"), shot, "1 / a"
        ),
        "dose_e_per_px": Estimate(
            dose, dose * a_se / a if a > 0 else float("inf"), shot, "given assumptions"
        ),
        "read_noise_sigma": Estimate(read.value, read.stderr, read.detected, "given assumed SE yields"),
    }


def calibrate(images: Sequence[np.ndarray], cfg: CalibrationConfig | None = None) -> CalibrationResult:
    """Estimate every noise component from noisy images of one tool setting (no clean reference).

    Args:
        images: float (H, W) images in [0, 1] (sizes may differ; each at least 16 x 16).
        cfg: assumptions and settings (defaults when None).

    Returns:
        A :class:`CalibrationResult`: estimates with standard errors (pooled over the images), the
        fitted :class:`NoiseConfig` and per-image estimates of the main quantities.
    """
    cfg = cfg or CalibrationConfig()
    imgs = [_as_image(z) for z in images]
    if not imgs:
        raise ValueError("calibrate needs at least one image")
    warnings: list[str] = []
    est: dict[str, Estimate] = {}

    grid = _quantization(imgs, warnings)
    q2 = grid[0] ** 2 / 12.0 if grid else 0.0
    patches = [patch_stats(z, cfg.patch_px) for z in imgs]
    image_of_patch = np.concatenate([np.full(p.mean.size, i) for i, p in enumerate(patches)])
    ps = PatchStats.concat(patches)
    # Pass 1 judges flatness against each patch's own (structure-inflated) variance, only to get a
    # noise model for the absolute test of pass 2.
    first = flat_samples(ps, cfg.flat_ratio_max)
    a0, b0, _, _ = fit_mean_variance(first.mean, first.var0)
    samples = flat_samples(ps, cfg.flat_ratio_max, (a0, b0))

    # Noise correlation first: the variance fit corrects for it when present. Along y it is measured
    # against x samples already corrected for the x correlation.
    for name, direction, axis in (("fast_axis_noise_corr", 0, "x"), ("slow_axis_noise_corr", 1, "y")):
        var_in = (
            None
            if direction == 0
            else _corrected_variance(samples, est["fast_axis_noise_corr"], cfg.patch_px)
        )
        rho, se = noise_correlation(samples, direction, var_in)
        detected = bool(math.isfinite(rho) and abs(rho) > max(cfg.detect_sigma * se, cfg.min_noise_corr))
        note = f"lag-1 noise correlation along {axis}" if math.isfinite(rho) else "too few flat samples"
        est[name] = Estimate(rho, se, detected, note)
    rx = est["fast_axis_noise_corr"]
    if rx.detected and 0 < rx.value < 1:
        length = -1.0 / math.log(rx.value)
        est["fast_axis_corr_length_px"] = Estimate(length, rx.stderr / (rx.value * math.log(rx.value) ** 2))
        warnings.append(
            f"noise is correlated along x (lag-1 {rx.value:.3f}): detector bandwidth, which semray.noise "
            "cannot synthesise; the variance was corrected for it"
        )
    if est["slow_axis_noise_corr"].detected:
        warnings.append("noise correlated along y (between rows) was detected; the model assumes none")
    # Jitter first too (with the pass-1 noise model): the y samples carry it.
    prods = [jitter_estimate(z, a0, b0, cfg.jitter_segments) for z in imgs]
    est["line_jitter_px"] = jit = _jitter_from_products(np.concatenate(prods), cfg.detect_sigma)
    jitter = jit.value if jit.detected else 0.0
    var = _corrected_variance(samples, rx, cfg.patch_px, jitter)
    # The correction undershoots at sharp edges (the blurred gradient is smaller than the true one), so
    # y samples where jitter would add more than 2 % of the noise are left out as well.
    share = jitter**2 * samples.grad_x2 / np.maximum(a0 * samples.mean + b0, 1e-12)
    keep = (samples.direction == 0) | (share <= 0.02)
    samples = VarianceSamples(*(getattr(samples, f)[keep] for f in VarianceSamples.__dataclass_fields__))
    var = var[keep]
    a, b, cov, used = _mean_variance(samples, var)
    est.update(_physical(a, b, cov, q2, cfg))
    est["flat_samples_used"] = Estimate(float(used.sum()), 0.0, True, f"of {2 * image_of_patch.size}")

    per_image: list[dict[str, float]] = []
    sample_image = image_of_patch[samples.patch]
    for i, z in enumerate(imgs):
        info: dict[str, float] = {"image": float(i), "anisotropy": _anisotropy(z)}
        sel = used & (sample_image == i)
        try:
            ai, bi, ci, _ = fit_mean_variance(samples.mean[sel], var[sel])
            phys = _physical(ai, bi, ci, q2, cfg)
            info |= {
                k: phys[k].value for k in ("poisson_a", "poisson_b", "dose_e_per_px", "read_noise_sigma")
            }
        except (ValueError, np.linalg.LinAlgError):
            pass
        per_image.append(info)

    # Row artefacts, jitter and drift come from images that are not horizontal gratings, if any.
    horizontal = [info["anisotropy"] > 8.0 for info in per_image]
    rows_from = [i for i, hz in enumerate(horizontal) if not hz] or list(range(len(imgs)))
    if any(horizontal):
        warnings.append(
            f"images {[i for i, hz in enumerate(horizontal) if hz]} are dominated by horizontal structure: "
            + ("left out of" if len(rows_from) < len(imgs) else "unreliable for")
            + " row offset/gain and drift estimates"
        )
    row_stats = [row_artifacts(imgs[i], a, b) for i in rows_from]
    offset, gain = _row_sigmas(row_stats, cfg.detect_sigma, cfg.fit_row_gain)
    est["scan_line_offset_sigma"], est["scan_line_gain_sigma"] = offset, gain
    for i, rs in zip(rows_from, row_stats, strict=True):
        o_i, g_i = _row_sigmas([rs], cfg.detect_sigma, cfg.fit_row_gain)
        per_image[i] |= {"scan_line_offset_sigma": o_i.value, "scan_line_gain_sigma": g_i.value}

    for info, pr in zip(per_image, prods, strict=True):
        info["line_jitter_px"] = _jitter_from_products(pr, cfg.detect_sigma).value

    est.update(_drift(imgs, rows_from, offset, gain, a, b, cfg))

    fit, sums = charging_fit_images(
        imgs,
        cfg.charging_threshold,
        cfg.charging_max_lag_px,
        cfg.charging_max_decay_px,
        cfg.charging_min_decay_px,
    )
    for info, sm in zip(per_image, sums, strict=True):
        fi = charging_fit([sm])
        info |= {"charging_strength": fi.strength, "charging_decay_px": fi.decay_px}
    detected = fit.detected(cfg.detect_sigma, cfg.charging_min_decay_px)
    sign = float(np.sign(fit.strength)) if detected else 0.0
    est["charging_strength"] = Estimate(fit.strength, fit.strength_se, detected, "signed; < 0 = dark tail")
    est["charging_decay_px"] = Estimate(
        fit.decay_px, fit.decay_px * fit.decay_log_se, detected, "stderr from the jackknife of log(decay)"
    )
    est["charging_sign"] = Estimate(sign, 0.0, detected, "+1 bright tail after bright features, -1 dark")
    if detected and fit.strength < 0:
        warnings.append("dark charging tails detected: semray.noise only makes bright tails; left off")
    if detected and not cfg.fit_charging:
        warnings.append(
            "a charging-like tail was measured but fit_charging is off, so the config leaves charging off "
            "(an x-asymmetric specimen reads the same way)"
        )

    if grid:
        step, black = grid
        levels = (1.0 - black) / step
        bits = next((bd for bd in (8, 12, 16) if 2**bd - 1 >= levels - 0.5), 16)
        white = black + (2**bits - 1) * step
        if white > 2.0:
            warnings.append(f"grey-level step {step:.3g} fits no 8/12/16-bit window; quantisation left off")
            grid = None
        else:
            est["quant_step"] = Estimate(step, 0.0, True, "grey-level step, intensity units")
            est["bit_depth"] = Estimate(float(bits), 0.0, True)
            est["quant_black_level"] = Estimate(black, 0.0, True, "offset modulo one step")
            est["quant_white_level"] = Estimate(white, 0.0, True)
    if not grid:
        est["quant_step"] = Estimate(0.0, 0.0, False, "no grey-level grid (continuous data)")

    noise_cfg = noise_config_from_estimates(est, cfg)
    assumptions = {
        "se_yield_min": cfg.assumed_se_yield_min,
        "se_yield_max": cfg.assumed_se_yield_max,
        "detector_gain_cv": cfg.assumed_detector_gain_cv,
        "charging_threshold": cfg.charging_threshold,
    }
    return CalibrationResult(est, noise_cfg, assumptions, per_image, warnings, fit)


def _jitter_from_products(prods: np.ndarray, detect_sigma: float) -> Estimate:
    """Jitter sigma from per-row cross-segment shift products (mean = 2 jitter^2); batch-means SE."""
    prods = prods[np.isfinite(prods)]
    if prods.size < 16:
        return Estimate(float("nan"), float("nan"), False, "too few rows with edges")
    # Consecutive rows share a jitter draw, so their products correlate: SE from batch means.
    batches = np.array_split(prods, 16)
    means = np.array([bt.mean() for bt in batches])
    j2, se = prods.mean() / 2.0, means.std(ddof=1) / math.sqrt(len(means)) / 2.0
    return _sigma_from_var(float(j2), float(se), detect_sigma)


def _drift(
    imgs: Sequence[np.ndarray],
    rows_from: Sequence[int],
    offset: Estimate,
    gain: Estimate,
    a: float,
    b: float,
    cfg: CalibrationConfig,
) -> dict[str, Estimate]:
    """Pooled drift estimates: amplitude/correlation averaged, detection on the summed excess."""
    fits = []
    for i in rows_from:
        prof, n = row_level_profile(imgs[i])
        if np.isfinite(prof).sum() < imgs[i].shape[0] // 2:
            continue
        level = float(np.nanmean(imgs[i]))
        pix = float(a * level + b) / max(float(np.median(n)), 1.0)
        white = max(offset.value, 0.0) ** 2 + max(gain.value, 0.0) ** 2 * level**2 + pix
        fits.append(drift_fit(prof, white, min(cfg.drift_lowpass_rows, imgs[i].shape[0] / 8)))
    if not fits:
        nan = Estimate(float("nan"), float("nan"), False, "no image with a dominant flat intensity class")
        return {"drift_amplitude": nan, "drift_corr_rows": nan}
    excess = sum(f.excess for f in fits)
    null_se = math.sqrt(sum(f.null_se**2 for f in fits))
    amp = math.sqrt(float(np.mean([f.amplitude**2 for f in fits])))
    corr = float(np.exp(np.mean([math.log(f.corr_rows) for f in fits])))
    # Pattern leftovers in the profile are short (fitted correlation at the low-pass floor); a drift of
    # semray.noise's kind spans tens of rows at least.
    detected = (
        excess > cfg.detect_sigma * null_se
        and amp >= cfg.drift_min_amplitude
        and corr >= cfg.drift_lowpass_rows
    )
    spread = float(np.std([f.amplitude for f in fits])) / math.sqrt(len(fits)) if len(fits) > 1 else amp
    return {
        "drift_amplitude": Estimate(amp, max(spread, 0.1 * amp), detected, "rough: few independent rows"),
        "drift_corr_rows": Estimate(corr, corr, detected, "rough (factor ~2); limited by image height"),
    }


def _range(e: Estimate, lo: float, hi: float, cfg: CalibrationConfig, log: bool = False) -> dict[str, Any]:
    """A narrow ``NoiseRange`` dict around an estimate: +-max(rel width, k SE), within ``[lo, hi]``."""
    se = e.stderr if math.isfinite(e.stderr) else 0.0
    half = max(cfg.range_rel_width * abs(e.value), cfg.range_stderr * se)
    low, high = min(max(e.value - half, lo), hi), max(min(e.value + half, hi), lo)
    return {"low": float(low), "high": float(max(high, low)), "log": log}


def _pinned(v: float) -> dict[str, Any]:
    return {"low": float(v), "high": float(v)}


def noise_config_from_estimates(est: dict[str, Estimate], cfg: CalibrationConfig) -> NoiseConfig:
    """The :class:`NoiseConfig` the synthesis stage uses: narrow ranges around detected components.

    Undetected components are switched off; assumed quantities (SE yields, detector cv, charging
    threshold) are pinned; a sub-parameter not detected inside an enabled component is pinned to 0.
    """
    data: dict[str, Any] = {}
    shot = est["dose_e_per_px"].detected
    data["shot"] = {
        "enabled": shot,
        "se_yield_min": _pinned(cfg.assumed_se_yield_min),
        "se_yield_max": _pinned(cfg.assumed_se_yield_max),
    }
    if shot:
        d = est["dose_e_per_px"]
        data["shot"]["dose_e_per_px"] = _range(d, 1e-3 * 1.0001, 1e6, cfg, log=True)
    data["detector_gain"] = {
        "enabled": shot and cfg.assumed_detector_gain_cv > 0,
        "detector_gain_cv": _pinned(cfg.assumed_detector_gain_cv),
    }
    rn = est["read_noise_sigma"]
    data["read_noise"] = {"enabled": rn.detected}
    if rn.detected:
        data["read_noise"]["read_noise_sigma"] = _range(rn, 0.0, 1.0, cfg)
    off, gn = est["scan_line_offset_sigma"], est["scan_line_gain_sigma"]
    data["scan_lines"] = {
        "enabled": off.detected or gn.detected,
        "scan_line_offset_sigma": _range(off, 0.0, 1.0, cfg) if off.detected else _pinned(0.0),
        "scan_line_gain_sigma": _range(gn, 0.0, 1.0, cfg) if gn.detected else _pinned(0.0),
    }
    jit = est["line_jitter_px"]
    data["line_jitter"] = {"enabled": jit.detected}
    if jit.detected:
        data["line_jitter"]["line_jitter_px"] = _range(jit, 0.0, 64.0, cfg)
    amp, corr = est["drift_amplitude"], est["drift_corr_rows"]
    data["drift"] = {"enabled": amp.detected}
    if amp.detected:
        data["drift"]["drift_amplitude"] = _range(amp, 0.0, 1.0, cfg)
        data["drift"]["drift_corr_rows"] = _range(corr, 1.0, 4096.0, cfg)
    s, tau = est["charging_strength"], est["charging_decay_px"]
    on = cfg.fit_charging and s.detected and s.value > 0
    data["charging"] = {"enabled": on, "charging_threshold": cfg.charging_threshold}
    if on:
        data["charging"]["charging_strength"] = _range(s, 0.0, 5.0, cfg)
        data["charging"]["charging_decay_px"] = _range(tau, 0.1, 10_000.0, cfg)
    if est["quant_step"].detected:
        data["quantization"] = {
            "enabled": True,
            "bit_depth": int(est["bit_depth"].value),
            "quant_black_level": _pinned(est["quant_black_level"].value),
            "quant_white_level": _pinned(est["quant_white_level"].value),
        }
    else:
        data["quantization"] = {"enabled": False}
    return NoiseConfig.model_validate(data)


# --------------------------------------------------------------------------------------------------
# Statistics for the comparison figure, synthetic look-alikes, files
# --------------------------------------------------------------------------------------------------


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
    imgs = [_as_image(z) for z in images]
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
    z = _as_image(img)
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
    crop = (slice(0, min(128, real_example.shape[0])), slice(0, min(128, real_example.shape[1])))
    for a_, im, title in (
        (ax[0, 0], real_example, "real (crop)"),
        (ax[0, 1], synth_example, "synthetic (crop)"),
    ):
        a_.imshow(np.asarray(im)[crop], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        a_.set_title(title, fontsize=10)
        a_.set_xticks([])
        a_.set_yticks([])
    e = result.estimates
    a_ = ax[0, 2]
    a_.plot(real.mv_mean, real.mv_var, "o", label="real (flat patches)")
    a_.plot(synth.mv_mean, synth.mv_var, "s", mfc="none", label="synthetic")
    shown = np.concatenate([real.mv_mean, synth.mv_mean])
    shown = shown[np.isfinite(shown)]
    lo, hi = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
    xs = np.linspace(max(lo - 0.1, 0.0), min(hi + 0.1, 1.0), 50)
    a_.plot(xs, e["poisson_a"].value * xs + e["poisson_b"].value, "k--", lw=1, label="fit a*I + b")
    a_.set(xlabel="mean intensity", ylabel="noise variance", title="mean-variance")
    a_.legend(fontsize=8)
    a_ = ax[1, 0]
    a_.semilogy(real.row_freq[1:], real.row_psd[1:], label="real")
    a_.semilogy(synth.row_freq[1:], synth.row_psd[1:], alpha=0.8, label="synthetic")
    a_.set(xlabel="frequency (cycles/row)", ylabel="power", title="row-mean spectrum (offsets, drift)")
    a_.legend(fontsize=8)
    a_ = ax[1, 1]
    lags = np.arange(real.acf_x.size)
    a_.plot(lags, real.acf_x, "o-", label="real, x (fast)")
    a_.plot(lags, synth.acf_x, "o--", mfc="none", label="synthetic, x")
    a_.plot(lags, real.acf_y, "s-", label="real, y (slow)")
    a_.plot(lags, synth.acf_y, "s--", mfc="none", label="synthetic, y")
    a_.axhline(0, color="k", lw=0.5)
    a_.set(xlabel="lag (px)", ylabel="autocorrelation", title="flat-patch residual ACF")
    a_.legend(fontsize=8)
    a_ = ax[1, 2]
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
    nc = result.noise_config
    v = {k: e[k].value for k in e}
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
    fig.suptitle(
        f"{on}; off: {off or 'none'}\nsynthetic = fitted model applied to a denoised copy of the real image",
        fontsize=10,
    )
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def run_calibration(
    inputs: Sequence[str | Path],
    out_yaml: str | Path,
    cfg: CalibrationConfig | None = None,
    json_path: str | Path | None = None,
    figure_path: str | Path | None = None,
) -> CalibrationResult:
    """Read images (files or folders), calibrate, write the NoiseConfig YAML, the JSON and the figure.

    ``json_path``/``figure_path`` default to ``out_yaml`` with ``.json``/``.png`` suffixes.
    """
    from semray.io import IMAGE_SUFFIXES, iter_pages, list_images

    cfg = cfg or CalibrationConfig()
    paths = [p for src in inputs for p in list_images(src)]
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {[str(s) for s in inputs]}")
    images = [image for p in paths for image, _ in iter_pages(p)]  # every page of a multipage TIFF
    result = calibrate(images, cfg)
    out_yaml = Path(out_yaml)
    out_yaml.parent.mkdir(parents=True, exist_ok=True)
    out_yaml.write_text(dump_yaml(result.noise_config))
    payload = result.to_json() | {"images": [str(p) for p in paths]}
    Path(json_path or out_yaml.with_suffix(".json")).write_text(json.dumps(payload, indent=2))
    shown = images[:4]
    synth = synthetic_lookalikes(shown, result, cfg.n_synthetic, cfg.seed)
    model = (result.estimates["poisson_a"].value, result.estimates["poisson_b"].value)
    real_stats = noise_statistics(shown, cfg, model=model)
    synth_stats = noise_statistics(synth, cfg, real_stats.mv_edges, model)
    calibration_figure(
        real_stats, synth_stats, result, figure_path or out_yaml.with_suffix(".png"), shown[0], synth[0]
    )
    return result

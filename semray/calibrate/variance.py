"""Signal-dependent variance: flat-patch statistics, the Poisson-Gaussian mean-variance fit
``var = a * I + b``, the lag-1 noise correlation along x and y, and the mapping of ``(a, b)`` to dose and
read noise under the fixed assumptions (see :mod:`semray.calibrate`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from semray.calibrate.common import (
    MAD_TO_SIGMA,
    Estimate,
    as_image,
    blocks,
    concat_rows,
    kernel_energy,
    sigma_from_var,
)
from semray.config.calibrate import CalibrationConfig


@dataclass
class PatchStats:
    """Per-patch noise statistics of one or more images (first axis: the ``n`` patches of side ``p``).

    Each patch's lines are split by parity: a variance comes from one parity's lines and the flatness
    test that decides whether to trust it from the other parity's, so selecting flat patches cannot
    favour patches whose noise happened to be high (self-normalised tests do, by up to ~20 %).

    ``v1``, ``v2``, ``flat``: shape (n, 2, 2) = [patch, direction, parity of the variance lines];
    direction 0 differences along x within rows, direction 1 along y within columns.
    ``v1``/``v2``: half mean squared difference at lag 1/2 (the variogram; the noise variance for white
    noise on a flat signal). Along y the differences are taken after :func:`without_row_steps`, which
    cancels row offsets (and row gains at each row's typical intensity) over the full row. ``energy``: energy of the x- (or y-)
    derivative of the image smoothed along that axis on the *other* lines, scaled so that white noise
    of variance ``v`` gives ``v`` (flat signal: the noise variance; edges: much more); the flatness
    ratio is ``energy`` over a noise variance (:func:`flat_samples`). ``mean`` (n,): patch mean.
    ``acf_x``/``acf_y`` (n, p): autocovariance at lags ``0 .. p-1`` of the patch residual (along x:
    patch mean removed, so row offsets show as positive correlation; along y: each column's mean
    removed, so structure constant along y is not counted). ``f_lo``/``f_hi`` (n, 2, 2): fraction of
    the variance lines' pixels at (or beyond) the window's low/high end (0 for an infinite end).
    """

    mean: np.ndarray
    v1: np.ndarray
    v2: np.ndarray
    energy: np.ndarray
    acf_x: np.ndarray
    acf_y: np.ndarray
    f_lo: np.ndarray
    f_hi: np.ndarray

    @staticmethod
    def concat(items: Sequence[PatchStats]) -> PatchStats:
        return concat_rows(items)


def _line_stats(t: np.ndarray, p: int) -> tuple[np.ndarray, ...]:
    """``v1, v2, energy`` of shape (n_a, n_b, 2) for differences along the last axis of ``t``."""
    b = blocks(t, p)
    grad = blocks(np.gradient(gaussian_filter1d(t, 1.0, axis=1, mode="nearest"), axis=1), p)
    out = np.empty((3, *b.shape[:2], 2))
    for par in (0, 1):
        lines = b[:, :, par::2, :]
        for i, lag in enumerate((1, 2)):
            d = lines[..., lag:] - lines[..., :-lag]
            out[i, ..., par] = 0.5 * np.mean(d * d, axis=(2, 3))
        g = grad[:, :, 1 - par :: 2, :]
        out[2, ..., par] = np.mean(g * g, axis=(2, 3)) / kernel_energy(1.0, 0, 1)
    return out[0], out[1], out[2]


def without_row_steps(z: np.ndarray) -> np.ndarray:
    """``z`` (float (H, W)) less a per-row offset whose step between rows ``y`` and ``y + 1`` is the
    median over the full row of ``z[y + 1] - z[y]``: row offsets (and row gains at the row's typical
    intensity) cancel from differences along y, and what is removed spans all ``W`` columns, so it
    takes a share of only about ``0.43 / W`` of white noise (median of ``W`` Gaussian differences:
    ``1 - 2 / W + (pi / 2) / W``), and of correlated noise about its summed autocorrelation over ``W``,
    whatever the correlation's shape along x. (The mean over a patch's 4 same-parity columns took
    ``1 / 4`` of white noise and an x-correlation-dependent share that 8-px lines cannot measure.)"""
    steps = np.median(np.diff(z, axis=0), axis=1)
    return z - np.concatenate([[0.0], np.cumsum(steps)])[:, None]


def patch_stats(
    img: np.ndarray, patch_px: int = 8, window: tuple[float, float] = (-math.inf, math.inf)
) -> PatchStats:
    """Statistics of every non-overlapping ``patch_px`` square of ``img`` (float (H, W) in [0, 1]);
    ``window``: the ADC window's ends, for the censored fractions."""
    z = as_image(img)
    p = patch_px
    if p % 2 or p < 4:
        raise ValueError(f"patch_px must be even and >= 4, got {p}")
    t = blocks(z, p)
    n = t.shape[0] * t.shape[1]
    xs = _line_stats(z, p)
    ys = [a.swapaxes(0, 1) for a in _line_stats(without_row_steps(z).T, p)]
    v1, v2, energy = (
        np.stack([x.reshape(n, 2), y.reshape(n, 2)], axis=1) for x, y in zip(xs, ys, strict=True)
    )
    r = t - t.mean(axis=(2, 3), keepdims=True)
    acf_x = np.stack([np.mean(r[..., k:] * r[..., : p - k], axis=(2, 3)) for k in range(p)], -1)
    # Along y each column's own mean is removed: structure constant along y (vertical lines) is not noise.
    r = t - t.mean(axis=2, keepdims=True)
    acf_y = np.stack([np.mean(r[:, :, k:, :] * r[:, :, : p - k, :], axis=(2, 3)) for k in range(p)], -1)
    frac = []
    for at_end in (t <= window[0], t >= window[1]):
        x_lines = [at_end[:, :, par::2, :].mean(axis=(2, 3)).ravel() for par in (0, 1)]
        y_lines = [at_end[:, :, :, par::2].mean(axis=(2, 3)).ravel() for par in (0, 1)]
        frac.append(np.stack([np.stack(x_lines, 1), np.stack(y_lines, 1)], axis=1))
    mean = t.mean(axis=(2, 3)).ravel()
    return PatchStats(mean, v1, v2, energy, acf_x.reshape(n, p), acf_y.reshape(n, p), frac[0], frac[1])


@dataclass
class VarianceSamples:
    """Flat-patch variance samples (1-D arrays): one per patch, direction and line parity that passed
    the flatness test (:func:`flat_samples`). ``direction``: 0 = x, 1 = y (see :class:`PatchStats`); ``patch``: index;
    ``grad_x2``: the patch signal's mean squared x-gradient (from its x ``energy`` minus the noise);
    ``f_lo``/``f_hi``: censored fractions of the variance lines (:class:`PatchStats`).

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
    f_lo: np.ndarray
    f_hi: np.ndarray

    @property
    def var0(self) -> np.ndarray:
        return (4.0 * self.v1 - self.v2) / 3.0


NoiseVariance = tuple[float, float] | Callable[[np.ndarray], np.ndarray]
"""A noise model for the flatness test: ``(a, b)`` of ``a * mean + b``, or a function of the (observed)
patch mean, e.g. :meth:`~semray.calibrate.censored.CensoredModel.variance_of`."""


def noise_variance(model: NoiseVariance, mean: np.ndarray) -> np.ndarray:
    """The model's noise variance at observed means ``mean``."""
    if callable(model):
        return np.asarray(model(mean), dtype=np.float64)
    return model[0] * mean + model[1]


def flatness(ps: PatchStats, model: NoiseVariance | None = None) -> np.ndarray:
    """Flatness ratios (n, 2, 2): ``energy`` over the noise variance, about 1 on flat signal.

    With a ``model`` (:data:`NoiseVariance`) the noise variance is the model's (absolute test); without, the
    variance of the same (other-parity) lines, which is inflated by the very structure under test and
    so only good for a first pass.
    """
    if model is None:
        noise = ps.v1[:, :, ::-1]
    else:
        noise = np.broadcast_to(noise_variance(model, ps.mean)[:, None, None], ps.energy.shape)
    return ps.energy / np.maximum(noise, 1e-20)


def flat_samples(
    ps: PatchStats, flat_ratio_max: float, model: NoiseVariance | None = None
) -> VarianceSamples:
    """Every (patch, direction, parity) variance whose own :func:`flatness` passes.

    Each sample is kept on the flatness of its *other* parity's lines only: choosing, say, the flatter
    of the two directions would compare against lines that cross the variance lines and so favour
    samples whose noise happened to be low (3-4 % low measured at 8 e-/px). A patch flat both ways
    gives samples in both directions (they share pixels; the fits treat them as independent)."""
    flat = flatness(ps, model)
    ok = flat <= flat_ratio_max  # (n, direction, parity)
    patch, direction, parity = np.nonzero(ok)
    noise_x = ps.v1[:, 0].mean(axis=1) if model is None else noise_variance(model, ps.mean)
    grad_x2 = np.maximum(ps.energy[:, 0].mean(axis=1) - noise_x, 0.0) * kernel_energy(1.0, 0, 1)
    return VarianceSamples(
        ps.mean[patch],
        ps.v1[patch, direction, parity],
        ps.v2[patch, direction, parity],
        direction,
        patch,
        grad_x2[patch],
        ps.f_lo[patch, direction, parity],
        ps.f_hi[patch, direction, parity],
    )


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
        scale = MAD_TO_SIGMA * np.median(np.abs(z[keep] - np.median(z[keep])))
        new_keep = np.isfinite(z) & (np.abs(z) <= clip_sigmas * max(scale, 1e-6))
        if new_keep.sum() < 4:
            break
        keep = new_keep
    w = 1.0 / np.maximum(x @ fit, 1e-12) ** 2
    xw = x[keep] * w[keep, None]
    resid = var[keep] - x[keep] @ fit
    s2 = float(np.sum(w[keep] * resid**2) / max(int(keep.sum()) - 2, 1))
    return float(fit[0]), float(fit[1]), np.linalg.pinv(xw.T @ x[keep]) * s2, keep


def corrected_variance(
    s: VarianceSamples, rho_x: Estimate, rho_y: Estimate, jitter_px: float = 0.0
) -> np.ndarray:
    """Lag-0 variances, corrected for detected noise correlations; NaN for the x samples when a
    fast-axis (x) correlation was detected.

    The lag-0 extrapolation of differences along an axis measures ``(1 - rho) (3 - rho) / 3`` of the
    variance under AR(1) correlation ``rho**k``, but a correction needs the correlation's shape at lag
    0 to 2, which 8-px lines cannot tell apart (JPEG frames: true x-autocorrelation +0.36 / -0.28 at
    lags 1-2 fits as AR(1) 0.72, and the corrected x variance came out 1.7x high). The y samples do
    not depend on the x correlation (their row offsets are removed over the full row,
    :func:`without_row_steps`), so under x correlation they alone give the variance; a y correlation
    is corrected as AR(1).

    Line jitter makes row-to-row differences at x-gradients as noisy as pixel noise would (white along
    y, so no flatness test sees it): ``jitter_px**2 * grad_x2`` is taken off the y samples."""
    var = s.var0.copy()
    var[s.direction == 1] -= jitter_px**2 * s.grad_x2[s.direction == 1]
    if rho_x.detected:
        var[s.direction == 0] = np.nan
    if rho_y.detected:
        r = rho_y.value
        var[s.direction == 1] /= (1.0 - r) * (3.0 - r) / 3.0
    return var


def physical_estimates(
    a: float, b: float, cov: np.ndarray, q2: float, cfg: CalibrationConfig
) -> dict[str, Estimate]:
    """Map the Poisson-Gaussian ``(a, b)`` to dose and read noise under the fixed assumptions."""
    y0, dy, cv = cfg.assumed_se_yield_min, cfg.assumed_se_yield_max - cfg.assumed_se_yield_min, 0.0
    cv = cfg.assumed_detector_gain_cv
    a_se, b_se = math.sqrt(max(cov[0, 0], 0.0)), math.sqrt(max(cov[1, 1], 0.0))
    shot = a > cfg.detect_sigma * a_se and a > 0
    dose = (1.0 + cv * cv) / (a * dy) if a > 0 else float("inf")
    r2 = b - a * y0 / dy - q2
    c = y0 / dy
    r2_se = math.sqrt(max(cov[1, 1] + c * c * cov[0, 0] - 2 * c * cov[0, 1], 0.0))
    read = sigma_from_var(r2, r2_se, cfg.detect_sigma)
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

"""Signal-dependent variance: flat-patch statistics, the Poisson-Gaussian mean-variance fit
``var = a * I + b``, the lag-1 noise correlation along x and y, and the mapping of ``(a, b)`` to dose and
read noise under the fixed assumptions (see :mod:`semray.calibrate`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from semray.calibrate.common import MAD_TO_SIGMA, Estimate, as_image, blocks, kernel_energy, sigma_from_var
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
    b = blocks(t, p)
    m = p // 2
    white = 1.0 - 1.0 / m if remove_line_mean else 1.0
    grad = blocks(np.gradient(gaussian_filter1d(t, 1.0, axis=1, mode="nearest"), axis=1), p)
    energy_white = kernel_energy(1.0, 0, 1) * white
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
    z = as_image(img)
    p = patch_px
    if p % 2 or p < 4:
        raise ValueError(f"patch_px must be even and >= 4, got {p}")
    t = blocks(z, p)
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
    grad_x2 = np.maximum(ps.energy[:, 0].mean(axis=1) - noise_x, 0.0) * kernel_energy(1.0, 0, 1)
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


def corrected_variance(
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


def two_pass_mean_variance(
    s: VarianceSamples, var: np.ndarray
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Two-pass fit: the second pass drops samples near saturation under the first pass's noise."""
    a, b, _, _ = fit_mean_variance(s.mean, var)
    sel = _unsaturated(s.mean, a * s.mean + b)
    a, b, cov, keep = fit_mean_variance(s.mean[sel], var[sel])
    mask = np.zeros(s.mean.size, dtype=bool)
    mask[np.flatnonzero(sel)[keep]] = True
    return a, b, cov, mask


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

"""Noise correlation along x (fast scan, detector bandwidth) and y (between rows), from flat patches.

Model: the pixel noise is filtered by a variance-preserving AR(1) along x and along y, so its
correlation is ``rho_x**|dx| * rho_y**|dy|`` and its variance (``a * I + b``) is unchanged.

Estimator: in each flat ``p x p`` patch the residual along x is each row minus its least-squares quadratic
(removes row offsets, smooth gradients and curvature), then minus each column's mean (removes structure constant
along y); its products at lags ``0..K`` along x are summed (:func:`patch_lag_sums`; along y the same
with the axes swapped). The two projections act on different axes, so the expected sums factor into a
y part and an x part, and the ratio of the lag-``k`` sum to the lag-0 sum depends on ``rho_x`` alone:
``sum_j (P S P)[j, j + k] / trace(P S P)`` with ``S[i, j] = rho**|i - j|`` and ``P`` the detrending
projection (:func:`expected_lag_ratio`). That ratio is biased (detrending on 8 px removes a lot of a
positive correlation) but exactly known, so ``rho`` is read off by inverting it, AR(1) first
(:func:`lag1_from_ratios`); the standard error, and the ratios' covariance the fit weighs them with,
come from a jackknife over groups of patches. Image structure left inside flat patches adds a
positive bias, which is why detection also needs ``min_noise_corr``: on semray's dense patterns at
128 e-/px and above it is not small (a true 0.4 read 0.68 at 128 e-/px, 3 wafers of 256 px; the
structure held 14 % of the lag-0 power of the patches that passed as flat).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from semray.calibrate.common import as_image, blocks

__all__ = ["expected_lag_ratio", "lag1_from_ratios", "lag_acf", "lag_correlation", "patch_lag_sums"]

MAX_LAG = 3


@cache
def _projection(p: int) -> np.ndarray:
    """``(p, p)`` projection removing a quadratic along a line (mean, slope, curvature)."""
    t = np.arange(p) - 0.5 * (p - 1)
    x = np.stack([np.ones(p), t, t * t], axis=1)
    return np.eye(p) - x @ np.linalg.pinv(x)


def _detrended(t: np.ndarray) -> np.ndarray:
    """``t`` (..., p) minus its least-squares quadratic along the last axis."""
    return t @ _projection(t.shape[-1])


def patch_lag_sums(img: np.ndarray, patch_px: int, max_lag: int = MAX_LAG) -> np.ndarray:
    """Per patch (the order of :func:`~semray.calibrate.variance.patch_stats`), axis and line parity,
    sums of residual products at lags ``0..max_lag`` along the axis: float64 ``(n, 2, 2, max_lag + 1)``,
    axis 0 = x (lines are rows), 1 = y (lines are columns). Each parity's lines are detrended and
    centred on their own, so that a parity can be selected on the flatness of the *other* parity's
    lines (:func:`~semray.calibrate.variance.flatness`): selecting on the same lines would favour
    noise with little low-frequency power, i.e. a negative correlation (-0.04 measured)."""
    z = as_image(img)
    t = blocks(z, patch_px)  # (hp, wp, rows, cols)
    n = t.shape[0] * t.shape[1]
    p = patch_px
    out = np.empty((n, 2, 2, max_lag + 1))
    for d, lines in enumerate((t, t.swapaxes(2, 3))):  # lines along the last axis
        for par in (0, 1):
            r = _detrended(lines[:, :, par::2, :])
            r = r - r.mean(axis=2, keepdims=True)
            for k in range(max_lag + 1):
                out[:, d, par, k] = np.sum(r[..., k:] * r[..., : p - k], axis=(2, 3)).reshape(n)
    return out


@cache
def _lag_basis(p: int, max_lag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected lag sums (``0..max_lag``) of detrended lines as linear functions of the correlations:
    ``(white (K+1,), per lag j of the correlation (p-1, K+1))`` and the lag matrix ``|i - j|``."""
    i = np.arange(p)
    lag = np.abs(i[:, None] - i[None, :])
    proj = _projection(p)

    def sums(s: np.ndarray) -> np.ndarray:
        c = proj @ s @ proj
        return np.array([np.trace(c, offset=k) for k in range(max_lag + 1)])

    basis = np.array([sums((lag == j).astype(np.float64)) for j in range(1, p)])
    return sums(np.eye(p)), basis, lag


def expected_lag_ratio(rho: float, p: int, k: int, phi: float | None = None) -> float:
    """Expected ratio of lag-``k`` to lag-0 sums of detrended ``p``-px lines of noise with correlation
    ``rho * phi**(j - 1)`` at lag ``j >= 1`` (``phi = rho``, the default: AR(1), ``rho**j``)."""
    white, basis, _ = _lag_basis(p, max(k, MAX_LAG))
    phi = rho if phi is None else phi
    e = white + rho * (phi ** np.arange(p - 1)) @ basis
    return float(e[k] / e[0])


_PHIS = np.linspace(-0.9, 0.95, 75)
_AR1_GRID = np.linspace(-0.95, 0.95, 381)
FREE_DECAY_CHI2 = 9.0
"""How much better (chi-square, GLS with the jackknife covariance of the ratios) a free decay ``phi``
must fit than AR(1) to be taken: one extra parameter, 3 standard errors."""


@cache
def _ar1_ratios(p: int, max_lag: int) -> np.ndarray:
    """Expected lag-1..``max_lag`` ratios of AR(1) noise on :data:`_AR1_GRID`: ``(R, max_lag)``."""
    return np.array([[expected_lag_ratio(float(r), p, k) for k in range(1, max_lag + 1)] for r in _AR1_GRID])


def _chi2(resid: np.ndarray, icov: np.ndarray) -> np.ndarray:
    """``r^T C^-1 r`` over the last axis of ``resid`` (..., K)."""
    return np.einsum("...i,ij,...j->...", resid, icov, resid)


def _free_decay_fit(ratios: np.ndarray, p: int, icov: np.ndarray) -> tuple[float, float]:
    """``(rho, chi2)`` of the best ``rho * phi**(j - 1)`` over the ``phi`` grid (``|phi| <= |rho|``): per
    ``phi`` the expected ratios are linear in ``rho`` after multiplying out the denominator, a
    least-squares solve; the fit is scored on the ratios themselves."""
    white, basis, _ = _lag_basis(p, ratios.size)
    k = np.arange(1, ratios.size + 1)
    best = (0.0, math.inf)
    for phi in _PHIS:
        d = (phi ** np.arange(p - 1)) @ basis  # expected sums per unit rho
        # ratios[k] * (white[0] + rho d[0]) = white[k] + rho d[k]
        coef = ratios * d[0] - d[k]
        rhs = white[k] - ratios * white[0]
        rho = min(max(float(coef @ rhs / (coef @ coef)), -0.99), 0.99)
        if abs(phi) > abs(rho) + 0.02:
            continue
        e = white + rho * d
        chi2 = float(_chi2(ratios - e[k] / e[0], icov))
        if chi2 < best[1]:
            best = (rho, chi2)
    return best


def lag1_from_ratios(ratios: np.ndarray, p: int, cov: np.ndarray) -> float:
    """Lag-1 noise correlation from observed lag-1..K ratios (lag-k sum over lag-0 sum).

    The noise model's bandwidth is AR(1) (``rho**j`` at lag ``j``): fitted first, on a grid of ``rho``
    by generalised least squares with ``cov``, the ratios' covariance ``(K, K)``. A faster
    or slower decay, ``rho`` at lag 1 then ``phi`` per further lag (a one-lag overshoot or blur has
    ``phi = 0``; ``|phi| <= |rho|``, since near ``rho = 0`` any ``phi`` fits), replaces it only when
    it fits better by :data:`FREE_DECAY_CHI2`. Detrended 8-px lines keep little of a correlation's
    decay, so with ``phi`` always free a few hundred flat patches read a true 0.4 as 0.93 now and
    then (the decay traded against lag 1); lag 1 is what the noise model's bandwidth takes.
    """
    k = ratios.size
    icov = np.linalg.pinv(cov + 1e-12 * np.trace(cov) * np.eye(k))
    table = _ar1_ratios(p, k)
    chi2 = _chi2(ratios - table, icov)
    i = int(np.argmin(chi2))
    rho = float(_AR1_GRID[i])
    if 0 < i < chi2.size - 1:  # parabola through the grid minimum
        den = chi2[i - 1] - 2 * chi2[i] + chi2[i + 1]
        if den > 0:
            rho += 0.5 * (chi2[i - 1] - chi2[i + 1]) / den * float(_AR1_GRID[1] - _AR1_GRID[0])
    free_rho, free_chi2 = _free_decay_fit(ratios, p, icov)
    return free_rho if chi2[i] - free_chi2 > FREE_DECAY_CHI2 else rho


def lag_correlation(sums: np.ndarray, p: int, groups: int = 16) -> tuple[float, float]:
    """Lag-1 noise correlation (:func:`lag1_from_ratios`) and its jackknife SE (over ``groups``
    interleaved groups of lines) from one axis's patch sums ``(n, K + 1)``; the ratios' covariance
    for the fit is the same jackknife's.

    NaN (SE inf) with fewer than 20 patches."""
    n = sums.shape[0]
    if n < 20:
        return float("nan"), math.inf
    g = np.arange(n) % min(groups, n)
    part = np.stack([np.bincount(g, sums[:, k]) for k in range(sums.shape[1])], axis=1)  # (G, K + 1)
    tot = part.sum(axis=0)
    loo_sums = tot - part
    loo_ratios = loo_sums[:, 1:] / loo_sums[:, :1]
    m = loo_ratios.shape[0]
    d = loo_ratios - loo_ratios.mean(axis=0)
    cov = (m - 1) / m * d.T @ d
    rho = lag1_from_ratios(tot[1:] / tot[0], p, cov)
    loo = np.array([lag1_from_ratios(r, p, cov) for r in loo_ratios])
    return rho, float(math.sqrt((m - 1) / m * np.sum((loo - loo.mean()) ** 2)))


def lag_acf(sums: np.ndarray) -> np.ndarray:
    """Pooled normalised lag products ``(K + 1,)`` (1 at lag 0) of patch sums ``(n, K + 1)``: what the
    closure compares between real and synthetic images (measured alike, so the detrending bias cancels)."""
    tot = sums.sum(axis=0)
    return tot / tot[0] if tot[0] > 0 else np.full(sums.shape[1], np.nan)

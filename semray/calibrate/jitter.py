"""Line jitter: the sub-pixel shift between consecutive rows, compared across segments of a row."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.ndimage import gaussian_filter1d

from semray.calibrate.common import MAD_TO_SIGMA, Estimate, as_image, kernel_energy, sigma_from_var


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
    z = as_image(img)
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
    var_s = 2.0 * v.mean(axis=2) * kernel_energy(1.0, None, 1) * inv[..., 2, 2]
    atten = 1.0 - 0.5 * v.sum(axis=2) * kernel_energy(1.0, 0, 1) * inv[..., 2, 2]
    valid = (var_s < 0.25) & (atten > 0.5)
    shift = np.where(valid, shift / np.where(valid, atten, 1.0), np.nan)
    # Clip wild shifts (a horizontal edge crossing the pair) per segment, then centre per segment.
    # A segment without edges in any row (flat or clipped images) is all NaN: it simply drops out.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(shift, axis=0)
        mad = MAD_TO_SIGMA * np.nanmedian(np.abs(shift - med), axis=0)
        shift = np.where(np.abs(shift - med) <= 5 * np.maximum(mad, 1e-6), shift, np.nan)
        shift = shift - np.nanmean(shift, axis=0)
    iu, ju = np.triu_indices(k, 1)
    prods = shift[:, iu] * shift[:, ju]
    n_pairs = np.sum(np.isfinite(prods), axis=1)
    with np.errstate(invalid="ignore"):
        per_row = np.nansum(prods, axis=1) / n_pairs
    return per_row[n_pairs > 0]


def jitter_from_products(prods: np.ndarray, detect_sigma: float) -> Estimate:
    """Jitter sigma from per-row cross-segment shift products (mean = 2 jitter^2); batch-means SE."""
    prods = prods[np.isfinite(prods)]
    if prods.size < 16:
        return Estimate(float("nan"), float("nan"), False, "too few rows with edges")
    # Consecutive rows share a jitter draw, so their products correlate: SE from batch means.
    batches = np.array_split(prods, 16)
    means = np.array([bt.mean() for bt in batches])
    j2, se = prods.mean() / 2.0, means.std(ddof=1) / math.sqrt(len(means)) / 2.0
    return sigma_from_var(float(j2), float(se), detect_sigma)

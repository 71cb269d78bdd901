"""Bounded sub-pixel registration of two scans of one field that tolerates periodic patterns.

A periodic pattern (a line/space or contact array) correlates almost equally at every multiple of its
period, and a line array along the whole line direction: on such content the cross-correlation has
several peaks (or a ridge) whose heights differ by less than their noise at low dose, and its global
maximum lands on a far copy of the period as often as not. Repeated scans of one field drift little, so
:func:`bounded_shift` answers the *smallest* shift whose correlation is not significantly below the
maximum: among the local maxima within the drift bound, the one nearest zero shift that a one-sided
test cannot tell from the highest. The test's standard error is computed from the images' own noise
(its power at low spatial frequency, measured on the difference of the two scans at the highest peak),
so the tolerance grows with the noise and vanishes on clean images, where the highest peak wins as
before.

Conventions are those of :func:`skimage.registration.phase_cross_correlation`: the shift ``(dy, dx)``
moves ``mov`` onto ``ref``, and plain (not phase-normalised) cross-correlation of the mean-free,
Hann-windowed images, refined on a locally upsampled DFT.
"""

from __future__ import annotations

import math

import numpy as np

NOISE_LAGS = 4
"""Largest lag (px, per axis) summed into the noise's low-frequency power. Scan noise is correlated
over a few pixels along the fast axis (the amplifier's bandwidth; lag-1 0.4 leaves 0.4**5 = 1 % at lag 5);
content left in the scan difference only adds positive terms, which widens the tolerance (towards the
smaller shift), never narrows it."""

TIE_ALPHA = 0.01
"""Level of the test "the highest peak is above this smaller-shift peak", Bonferroni-corrected over the
peaks that compete for the highest: the highest of M equal peaks under noise leads the others by the
largest of M noisy differences, so the threshold is the ``1 - TIE_ALPHA / M`` normal quantile of the
difference. M starts at all local maxima in the bound and shrinks to those the test cannot reject
(peaks far below the highest never competed for it)."""


def hann_window(shape: tuple[int, ...]) -> np.ndarray:
    """2-D Hann window of ``shape`` (H, W), float64 in [0, 1]."""
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1]))


def hann_windowed(image: np.ndarray, window: np.ndarray | None = None) -> np.ndarray:
    """``(image - mean) * Hann window``, float64 (H, W): without it the circular correlation sees the
    jump between opposite borders of a non-periodic micrograph, which pulls the estimate towards zero.
    ``window``: :func:`hann_window` of the image's shape, when the caller already has it."""
    window = hann_window(image.shape) if window is None else window
    return (image.astype(np.float64) - float(image.mean())) * window


def _signed(n: int) -> np.ndarray:
    """Signed shift of each index of a circular axis of ``n`` px: 0, 1, ..., -2, -1 (int64 (n,))."""
    return (np.arange(n) + n // 2) % n - n // 2


def _candidates(xc: np.ndarray, max_shift_px: float) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Local maxima (3 x 3, circular) of ``xc`` within ``max_shift_px`` per axis, as signed integer
    shifts ascending in length, and the highest point within the bound (a local maximum or a border)."""
    from scipy import ndimage

    sy, sx = _signed(xc.shape[0]), _signed(xc.shape[1])
    inside = (np.abs(sy)[:, None] <= max_shift_px) & (np.abs(sx)[None, :] <= max_shift_px)
    bounded = np.where(inside, xc, -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(bounded)), xc.shape)
    peaks = inside & (ndimage.maximum_filter(xc, size=3, mode="wrap") == xc)
    cand = {(int(sy[y]), int(sx[x])) for y, x in zip(*np.nonzero(peaks), strict=True)}
    cand.add((int(sy[iy]), int(sx[ix])))
    return sorted(cand, key=lambda s: (math.hypot(*s), -xc[s])), (int(sy[iy]), int(sx[ix]))


def noise_autocovariance(ref: np.ndarray, mov: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """One scan's noise autocovariance at lags up to :data:`NOISE_LAGS` per axis, from the scan
    difference ``(ref - mov moved by shift) / sqrt 2`` (the noise of two scans is independent).

    ``ref``, ``mov``: float (H, W) scans, not windowed; ``shift``: integer ``(dy, dx)``, the best
    alignment at hand (content it leaves in the difference only adds to the covariance: the tolerance
    widens, towards the smaller shift). The wrapped border of the move is cut off.

    Returns:
        float64 (2 L + 1, 2 L + 1), lag ``(ky, kx)`` at ``[L + ky, L + kx]``; grey levels squared.
    """
    from scipy import signal

    m = max(abs(shift[0]), abs(shift[1]))
    d = ref.astype(np.float64) - np.roll(mov.astype(np.float64), shift, axis=(0, 1))
    if m:
        d = d[m:-m, m:-m]
    d = (d - d.mean()) / math.sqrt(2.0)
    h, w = d.shape
    acf = signal.correlate(d, d, mode="full", method="fft")
    lags = (slice(h - 1 - NOISE_LAGS, h + NOISE_LAGS), slice(w - 1 - NOISE_LAGS, w + NOISE_LAGS))
    k = np.arange(-NOISE_LAGS, NOISE_LAGS + 1)
    return acf[lags] / ((h - np.abs(k))[:, None] * (w - np.abs(k))[None, :])


def _lagged(acov: np.ndarray, lag: tuple[int, int]) -> tuple[float, float]:
    """``(R(lag), sum_k R(k) R(k + lag))`` of an autocovariance table (:func:`noise_autocovariance`);
    zero beyond the table."""
    n = acov.shape[0]
    ky, kx = lag
    if abs(ky) >= n or abs(kx) >= n:
        return 0.0, 0.0
    c = n // 2
    at = float(acov[c + ky, c + kx]) if abs(ky) <= c and abs(kx) <= c else 0.0
    a = acov[max(0, -ky) : n - max(0, ky), max(0, -kx) : n - max(0, kx)]
    b = acov[max(0, ky) : n - max(0, -ky), max(0, kx) : n - max(0, -kx)]
    return at, float(np.sum(a * b))


def difference_sd(
    ref_w: np.ndarray, mov_w: np.ndarray, window: np.ndarray, top: tuple[int, int], s: tuple[int, int],
    acov: np.ndarray,
) -> float:  # fmt: skip
    """Standard error of ``c(top) - c(s)``, ``c(s) = sum(ref_w * roll(mov_w, s))``, from each scan's
    noise (autocovariance ``acov`` = R, :func:`noise_autocovariance`).

    The noise of ``ref`` enters multiplied by ``mov``'s difference between the two shifts and vice
    versa: variance ``sum(R) * sum(window^2 (dmov^2 + dref^2))`` for smooth noise-free differences.
    The differences at hand are of the noisy scans, whose noise adds ``(R(0) - R(top - s)) q`` to each
    sum (``q = sum(window^2 (window_top^2 + window_s^2))``) and is taken out again; the noise-times-noise
    term adds ``q (sum R^2 - sum R(k) R(k + top - s))``.

    ``ref_w``, ``mov_w``: the windowed scans (:func:`hann_windowed`), ``window`` the window, float (H, W).
    """
    lag = (top[0] - s[0], top[1] - s[1])
    r_lag, r_prod = _lagged(acov, lag)
    c = acov.shape[0] // 2
    w2 = window * window
    dmov = np.roll(mov_w, top, axis=(0, 1)) - np.roll(mov_w, s, axis=(0, 1))
    dref = np.roll(ref_w, (-top[0], -top[1]), axis=(0, 1)) - np.roll(ref_w, (-s[0], -s[1]), axis=(0, 1))
    q = float(np.sum(w2 * (np.roll(w2, top, axis=(0, 1)) + np.roll(w2, s, axis=(0, 1)))))
    noisy = float(np.sum(w2 * (dmov * dmov + dref * dref)))
    signal = max(noisy - 2.0 * q * (float(acov[c, c]) - r_lag), 0.0)
    cross = q * max(float(np.sum(acov * acov)) - r_prod, 0.0)
    return math.sqrt(max(float(acov.sum()), 0.0) * signal + cross)


def upsampled_peak(product: np.ndarray, peak: tuple[int, int], upsample_factor: int) -> tuple[float, float]:
    """Maximum of the correlation ``ifft2(product)`` on a ``1 / upsample_factor`` px grid 1.5 px wide
    around the integer ``peak``, by a matrix DFT (Guizar-Sicairos et al. 2008, as skimage does it, here
    only around the chosen peak). ``product``: complex (H, W) cross-power spectrum."""
    h, w = product.shape
    n = math.ceil(1.5 * upsample_factor)
    offsets = (np.arange(n) - n // 2) / upsample_factor
    ys, xs = peak[0] + offsets, peak[1] + offsets
    rows = np.exp(2j * np.pi * ys[:, None] * np.fft.fftfreq(h)[None, :])
    cols = np.exp(2j * np.pi * np.fft.fftfreq(w)[:, None] * xs[None, :])
    up = (rows @ product @ cols).real
    iy, ix = np.unravel_index(int(np.argmax(up)), up.shape)
    return float(ys[iy]), float(xs[ix])


def bounded_shift(
    ref: np.ndarray, mov: np.ndarray, max_shift_px: float, upsample_factor: int = 20
) -> tuple[float, float]:
    """Shift ``(dy, dx)`` that moves ``mov`` onto ``ref``, at most ``max_shift_px`` per axis.

    Among the local maxima of the windowed cross-correlation within the bound, the one with the
    smallest shift whose height is not significantly below the highest (one-sided test at
    :data:`TIE_ALPHA`, Bonferroni over the competing maxima; standard error :func:`difference_sd` from the
    measured noise, :func:`noise_autocovariance`), refined to ``1 / upsample_factor`` px (:func:`upsampled_peak`).

    Args:
        ref, mov: float (H, W) scans of one field, same shape, not windowed (any grey scale).
        max_shift_px: largest drift searched, px per axis, >= 0.
        upsample_factor: the estimate's precision is ``1 / upsample_factor`` px.

    Returns:
        ``(dy, dx)`` in px (rows, columns), each within ``max_shift_px + 0.75``.
    """
    from scipy.stats import norm

    if max_shift_px < 0:
        raise ValueError(f"max_shift_px must be >= 0, got {max_shift_px}")
    if ref.shape != mov.shape or ref.ndim != 2:
        raise ValueError(f"ref and mov must be 2-D of one shape, got {ref.shape} and {mov.shape}")
    window = hann_window(ref.shape)
    ref_w, mov_w = hann_windowed(ref, window), hann_windowed(mov, window)
    product = np.fft.fft2(ref_w) * np.conj(np.fft.fft2(mov_w))
    xc = np.fft.ifft2(product).real
    cands, top = _candidates(xc, max_shift_px)
    others = [s for s in cands if s != top]
    if not others:
        return upsampled_peak(product, top, upsample_factor)
    acov = noise_autocovariance(ref, mov, top)
    lead = np.array([(xc[top] - xc[s]) / difference_sd(ref_w, mov_w, window, top, s, acov) for s in others])
    m = len(cands)
    while True:  # Bonferroni over the peaks that compete for the highest: those the test cannot reject
        z = float(norm.isf(TIE_ALPHA / m))
        m_next = 1 + int(np.sum(lead < z))
        if m_next >= m:
            break
        m = m_next
    tied = [s for s, r in zip(others, lead, strict=True) if r < z and math.hypot(*s) < math.hypot(*top)]
    chosen = tied[0] if tied else top
    return upsampled_peak(product, chosen, upsample_factor)

"""The censored (clipped) Poisson-Gaussian noise model and its mean-variance fit.

A pixel of clean intensity ``I`` is read as ``clip(X, lo, hi)``: ``X`` has mean ``I`` and variance
``a * I + b``, and ``[lo, hi]`` is the ADC window (values beyond it pile up at its ends). Near black or
white a flat patch's observed mean ``M(I)`` and variance ``V(I)`` are those of the clipped ``X``, not
``I`` and ``a * I + b``; :func:`fit_censored` fits ``(a, b)`` to every flat patch through that curve
instead of dropping the patches near the window's ends (at 2-32 e-/px, where fast scans live, that is
most of them).

Shape of ``X`` (it matters once clipped): :mod:`semray.noise` makes ``X`` from ``n ~ Poisson(lam)``
detected SEs, each amplified by a gamma gain of cv ``cv``, plus Gaussian read noise (and the ADC
step). Under the calibration's assumed yields and ``cv`` (:class:`~semray.config.calibrate.
CalibrationConfig`), ``(a, b)`` fix ``lam = (1 + cv**2) / a * (I + y0 / dY)``, the intensity per SE
``u = a / (1 + cv**2)`` and the Gaussian part ``g = b - a * y0 / dY``. Below 80 mean counts ``X`` is
taken as a Poisson mixture of normals ``N(n u - y0 / dY, n cv**2 u**2 + g)`` (the discreteness of a few
SEs per pixel decides how many pixels read black, and the skew of a few tens of counts how many read
white); at 80 counts and above, and whenever ``g < 0`` (the
intercept is below what the assumed yields imply, so the assumed shape cannot hold), a single normal
``N(I, a * I + b)``. Both have exactly the mean ``I`` and variance ``a * I + b`` before clipping, so
patches far from the window's ends see the plain Poisson-Gaussian line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeResult, least_squares
from scipy.special import ndtr

from semray.calibrate.common import MAD_TO_SIGMA

__all__ = [
    "CensoredModel",
    "censored_moments",
    "clipped_normal_moments",
    "fit_censored",
    "fit_censored_starts",
]

_EXACT_COUNTS = 80.0  # mean SE counts below which the Poisson mixture is used
_MAX_TERMS = 200  # Poisson terms of the mixture (P(n >= 200 | lam < 80) < 1e-30)


def clipped_normal_moments(mu: np.ndarray, s: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, ...]:
    """``(E[Y], E[Y**2], P(Y = lo), P(Y = hi))`` for ``Y = clip(X, lo, hi)``, ``X ~ N(mu, s**2)`` (arrays
    broadcast; infinite ``lo``/``hi`` mean no clipping at that end)."""
    s = np.maximum(s, 1e-9)
    al, be = (lo - mu) / s, (hi - mu) / s
    fa, fb = ndtr(al), ndtr(be)
    # Finite stand-ins for infinite bounds: every term they enter is multiplied by a zero density.
    al_f, be_f = np.clip(al, -60.0, 60.0), np.clip(be, -60.0, 60.0)
    pa = np.exp(-0.5 * al_f * al_f) / math.sqrt(2 * math.pi)
    pb = np.exp(-0.5 * be_f * be_f) / math.sqrt(2 * math.pi)
    inside = fb - fa
    lo_t = 0.0 if math.isinf(lo) else lo
    hi_t = 0.0 if math.isinf(hi) else hi
    m1 = lo_t * fa + hi_t * (1.0 - fb) + mu * inside + s * (pa - pb)
    m2 = lo_t**2 * fa + hi_t**2 * (1.0 - fb) + (mu * mu + s * s) * inside + 2 * mu * s * (pa - pb)
    m2 = m2 + s * s * (al_f * pa - be_f * pb)
    return m1, m2, fa, 1.0 - fb


def _gain_nodes(n: np.ndarray, cv: float, nodes: int = 97) -> tuple[np.ndarray, np.ndarray]:
    """Gained SE sums ``S`` (N, Q) at quadrature nodes and weights (Q,) for ``n`` (N,) detected SEs.

    :mod:`semray.noise` draws the sum of ``n`` gamma gains (shape ``k = n / cv**2``) as the Wilson-
    Hilferty transform ``n * max(1 - 1/(9k) + z / (3 sqrt(k)), 0)**3`` of one normal ``z``: so the
    moments of anything of ``S`` are integrals over ``z``, done on a uniform grid over ``[-8, 8]``.
    """
    z = np.linspace(-8.0, 8.0, nodes)
    w = np.exp(-0.5 * z * z)
    w /= w.sum()
    if cv <= 0:
        return np.repeat(n[:, None], 1, axis=1), np.ones(1)
    k = np.maximum(n / cv**2, 1e-12)[:, None]
    base = np.maximum(1.0 - 1.0 / (9.0 * k) + z[None, :] / (3.0 * np.sqrt(k)), 0.0)
    return n[:, None] * base**3, w


def censored_moments(
    intensity: np.ndarray, a: float, b: float, lo: float, hi: float, y0_over_dy: float, cv: float
) -> tuple[np.ndarray, ...]:
    """Mean, variance and censored fractions at ``lo`` and ``hi`` of the clipped pixel (see the module
    docs) at clean ``intensity`` (1-D array): four arrays of its shape."""
    i = np.asarray(intensity, dtype=np.float64)
    var = np.maximum(a * i + b, 1e-12)
    g = b - a * y0_over_dy
    m1, m2, f_lo, f_hi = clipped_normal_moments(i, np.sqrt(var), lo, hi)
    lam = np.maximum(i + y0_over_dy, 0.0) * (1.0 + cv * cv) / max(a, 1e-300)
    low = lam < _EXACT_COUNTS
    if a > 0 and g >= 0 and low.any():
        u = a / (1.0 + cv * cv)
        top = float(lam[low].max())
        n = np.arange(min(_MAX_TERMS, int(top + 10.0 * math.sqrt(top) + 12)), dtype=np.float64)
        sums, w = _gain_nodes(n, cv)
        # Per count n: moments of clip(S u - y0/dY + read) averaged over the gain quadrature.
        per_n = [
            np.sum(c * w, axis=1) for c in clipped_normal_moments(sums * u - y0_over_dy, math.sqrt(g), lo, hi)
        ]
        lam_l = lam[low][:, None]
        logp = n * np.log(np.maximum(lam_l, 1e-300)) - lam_l - np.array([math.lgamma(k + 1) for k in n])
        p = np.exp(logp)
        p[lam_l[:, 0] == 0.0, 0] = 1.0
        m1[low], m2[low], f_lo[low], f_hi[low] = (p @ c for c in per_n)
    return m1, np.maximum(m2 - m1 * m1, 0.0), f_lo, f_hi


@dataclass(frozen=True)
class CensoredModel:
    """A fitted censored noise model: ``var = a * I + b`` before clipping to ``[lo, hi]`` (see module docs).

    ``cov`` (2, 2): covariance of ``(a, b)``; ``y0_over_dy``, ``cv``: the assumed shape parameters.
    """

    a: float
    b: float
    lo: float
    hi: float
    y0_over_dy: float
    cv: float
    cov: np.ndarray

    def curve(self, n: int = 241) -> tuple[np.ndarray, ...]:
        """``(I, M, V, F_lo, F_hi)`` on a grid of clean intensities ``I`` spanning the window: clipped
        mean (made monotone), variance and censored fractions at the window's ends."""
        lo = self.lo if math.isfinite(self.lo) else 0.0
        hi = self.hi if math.isfinite(self.hi) else 1.0
        span = hi - lo
        grid = np.linspace(lo - 0.5 * span, hi + 0.5 * span, n)
        m, v, f_lo, f_hi = censored_moments(grid, self.a, self.b, self.lo, self.hi, self.y0_over_dy, self.cv)
        return grid, np.maximum.accumulate(m), v, f_lo, f_hi

    def at(self, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(V, F_lo, F_hi)`` of flat patches whose observed (clipped) mean is ``mean``."""
        grid, m, v, f_lo, f_hi = self.curve()
        i = np.interp(mean, m, grid)
        return np.interp(i, grid, v), np.interp(i, grid, f_lo), np.interp(i, grid, f_hi)

    def clean_of(self, mean: np.ndarray) -> np.ndarray:
        """The clean intensity whose clipped mean is ``mean`` (inverse of ``M``; clamped to the grid)."""
        grid, m = self.curve()[:2]
        return np.interp(mean, m, grid)

    def variance_of(self, mean: np.ndarray) -> np.ndarray:
        """Noise variance of a flat patch whose observed (clipped) mean is ``mean``."""
        return self.at(mean)[0]

    def slope_of(self, mean: np.ndarray) -> np.ndarray:
        """``dM/dI`` at observed mean ``mean``: how much of a shift of the signal the clipped mean shows."""
        grid, m = self.curve()[:2]
        return np.interp(np.interp(mean, m, grid), grid, np.gradient(m, grid))


def _with(theta: np.ndarray, base: CensoredModel) -> CensoredModel:
    return CensoredModel(
        float(theta[0]), float(theta[1]), base.lo, base.hi, base.y0_over_dy, base.cv, base.cov
    )


def _weights(
    theta: np.ndarray,
    base: CensoredModel,
    mean: np.ndarray,
    sd_v: float,
    npix: int,
    use_fractions: bool = True,
    hidden: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Inverse standard deviations of the variance and censored-fraction residuals under ``theta``
    (held fixed while the next iterate is fitted: weights that move with the fit bias it).
    ``hidden``: the samples whose fractions count (default: where ``theta``'s model hides the variance)."""
    model = _with(theta, base)
    v, g_lo, g_hi = model.at(mean)
    # Fractions only where clipping hides the variance (a shift shows < 90 % in the mean): elsewhere
    # the variance determines the fit and the fractions' sensitivity to the scatter of patch means
    # around a steep F(I) would only add bias (+10 % in dose at 32 e-/px measured when used everywhere).
    if hidden is None:
        hidden = model.slope_of(mean) < 0.9
    hidden = hidden & use_fractions
    out = [1.0 / (np.maximum(v, 1e-12) * sd_v)]
    for g, end in ((g_lo, base.lo), (g_hi, base.hi)):
        if math.isfinite(end):
            out.append(hidden / np.sqrt(np.maximum(g * (1.0 - g), 1.0 / npix) / npix))
    return out


def _residuals(
    theta: np.ndarray, base: CensoredModel, x: tuple[np.ndarray, ...], w: list[np.ndarray]
) -> np.ndarray:
    """Weighted residuals of the variances and (at finite window ends) the censored fractions."""
    mean, var, f_lo, f_hi = x
    v, g_lo, g_hi = _with(theta, base).at(mean)
    out = [(var - v) * w[0]]
    ends = [(f, g) for f, g, end in ((f_lo, g_lo, base.lo), (f_hi, g_hi, base.hi)) if math.isfinite(end)]
    out += [(f - g) * wf for (f, g), wf in zip(ends, w[1:], strict=True)]
    return np.concatenate(out)


def fit_censored(
    samples: tuple[np.ndarray, ...],
    start: tuple[float, float],
    window: tuple[float, float],
    shape: tuple[float, float],
    npix: int = 32,
    use_fractions: bool = True,
    n_iter: int = 5,
    clip_sigmas: float = 4.0,
) -> tuple[CensoredModel, np.ndarray]:
    """Fit ``(a, b)`` of the censored model to flat-patch samples: ``(model, kept mask)``.

    ``samples = (mean, var, f_lo, f_hi)``: per sample the patch mean, the lag-0 noise variance and the
    fractions of its ``npix`` pixels at the window's ends. Both the variances and (where the window
    end is seen) the censored fractions are matched to the model at the sample's mean: near black or
    white the variance alone hardly tells a large noise clipped hard from a smaller one, while the
    share of pixels at the end value does. Iteratively reweighted least squares (weights from the
    previous iterate, so a variance estimate's spread, which grows with the variance, is accounted for
    without the upward bias of minimising relative residuals), with clipping of variance residuals
    beyond ``clip_sigmas`` robust sigmas, as :func:`~semray.calibrate.variance.fit_mean_variance` does
    for the plain line. Samples whose mean shows less than 5 % of a signal change (``dM/dI < 0.05``:
    almost every pixel clipped) are not used. ``start``: initial ``(a, b)``; ``window``: ``(lo, hi)``;
    ``shape``: ``(y0 / dY, cv)``; ``use_fractions=False`` fits the variances alone. Covariance: Gauss-Newton, scaled by the residual spread. Raises
    ValueError with fewer than 4 usable samples.
    """
    x_all = tuple(np.asarray(v, dtype=np.float64) for v in samples)
    mean, var = x_all[0], x_all[1]
    base = CensoredModel(
        max(start[0], 1e-9), start[1], window[0], window[1], shape[0], shape[1], np.zeros((2, 2))
    )
    keep = np.isfinite(mean) & np.isfinite(var) & (base.slope_of(mean) >= 0.05)
    if keep.sum() < 4:
        raise ValueError(f"too few flat patches for a mean-variance fit ({int(keep.sum())}, need >= 4)")
    theta = np.array([base.a, base.b])
    scale = np.array([max(abs(theta[0]), 1e-9), max(abs(theta[1]), 1e-9)])
    sd_v = 0.35
    for _ in range(n_iter):
        sol = _reweighted(theta, base, tuple(v[keep] for v in x_all), scale, (sd_v, npix, use_fractions))
        theta = sol.x
        model_v = np.maximum(_with(theta, base).variance_of(mean), 1e-12)
        z = (var - model_v) / model_v
        sd_v = max(MAD_TO_SIGMA * float(np.median(np.abs(z[keep] - np.median(z[keep])))), 1e-6)
        new_keep = keep & (np.abs(z - np.median(z[keep])) <= clip_sigmas * sd_v)
        if new_keep.sum() < 4 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    cov = _scaled_cov(sol.fun, sol.jac, scale)
    model = CensoredModel(float(theta[0]), float(theta[1]), window[0], window[1], shape[0], shape[1], cov)
    return model, keep


def _reweighted(
    theta: np.ndarray,
    base: CensoredModel,
    x: tuple[np.ndarray, ...],
    scale: np.ndarray,
    weighting: tuple[float, int, bool],
) -> OptimizeResult:
    """Weighted least squares from ``theta``, reweighted (``weighting = (sd_v, npix, use_fractions)``,
    :func:`_weights`) up to 4 times until the parameters move by less than 1e-3 of ``scale``."""
    for _ in range(4):  # reweighting to a fixed point
        w = _weights(theta, base, x[0], *weighting)
        sol = least_squares(
            _residuals,
            theta,
            x_scale=scale,
            bounds=([1e-12, -1.0], [10.0, 10.0]),
            args=(base, x, w),
            diff_step=1e-3,
            xtol=1e-6,
            max_nfev=60,  # the curve is interpolated: steps finer than its grid only see kinks
        )
        moved = np.abs(sol.x - theta) / scale
        theta = sol.x
        if moved.max() < 1e-3:
            break
    return sol


def _scaled_cov(fun: np.ndarray, jac: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Gauss-Newton covariance (2, 2) of the fit's parameters from its residuals and Jacobian, on the
    scaled parameters: a and b trade off along a valley when clipping is strong, and an unscaled
    pseudo-inverse would drop that direction (and report a far too small error)."""
    dof = max(int(np.count_nonzero(fun)) - 2, 1)
    js = jac * scale
    try:
        return np.linalg.inv(js.T @ js) * np.outer(scale, scale) * float(np.sum(fun**2) / dof)
    except np.linalg.LinAlgError:
        return np.full((2, 2), np.inf)


def _neg_log_likelihood(
    model: CensoredModel,
    x: tuple[np.ndarray, ...],
    sd_v: float,
    npix: int,
    use_fractions: bool,
    hidden: np.ndarray,
) -> float:
    """Gaussian negative log-likelihood of the samples ``x`` under ``model``: the weighted squared
    residuals plus the log of their standard deviations (which the squared residuals alone lack: with
    weights that follow the model, a larger variance always looks better). ``hidden``: the samples
    whose censored fractions count, the same for every model compared (a model that counted more of
    them would gain their log terms)."""
    theta = np.array([model.a, model.b])
    w = _weights(theta, model, x[0], sd_v, npix, use_fractions, hidden)
    r = _residuals(theta, model, x, w)
    wl = np.concatenate(w)
    return float(0.5 * np.sum(r * r) - np.sum(np.log(wl[wl > 0])))


def fit_censored_starts(
    samples: tuple[np.ndarray, ...],
    starts: list[tuple[float, float]],
    window: tuple[float, float],
    shape: tuple[float, float],
    npix: int = 32,
    use_fractions: bool = True,
) -> tuple[CensoredModel, np.ndarray]:
    """:func:`fit_censored` from each of ``starts``; the fit whose (censored) model is most likely
    (:func:`_neg_log_likelihood`, on the samples every fit kept, with one variance spread for all).

    Where clipping is strong the ``(a, b)`` valley has more than one basin: at 2 e-/px (row offset
    0.05) the fit from the plain line's start (a at 0.33x the truth) ended at a -12 %, b +122 %, a
    local minimum whose fixed-weight cost lies above the truth's; started at 2x that a it ends at
    a +1 %, b +7 % (negative log-likelihood lower by 310)."""
    fits = [fit_censored(samples, st, window, shape, npix, use_fractions) for st in starts]
    if len(fits) == 1:
        return fits[0]
    x_all = tuple(np.asarray(v, dtype=np.float64) for v in samples)
    common = np.logical_and.reduce([keep for _, keep in fits])
    if common.sum() < 4:
        return fits[0]
    x = tuple(v[common] for v in x_all)
    first = fits[0][0]
    z = x[1] / np.maximum(first.variance_of(x[0]), 1e-12) - 1.0
    sd_v = max(MAD_TO_SIGMA * float(np.median(np.abs(z - np.median(z)))), 1e-6)
    hidden = first.slope_of(x[0]) < 0.9
    nll = [_neg_log_likelihood(m, x, sd_v, npix, use_fractions, hidden) for m, _ in fits]
    return fits[int(np.argmin(nll))]

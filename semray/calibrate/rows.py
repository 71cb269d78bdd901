"""Row artefacts along the slow axis y: per-row offsets and gains, horizontal-structure detection, and
slow drift of the row level."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from semray.calibrate.censored import CensoredModel
from semray.calibrate.common import Estimate, ar1_quadratic, as_image, kernel_energy, sigma_from_var
from semray.calibrate.variance import NoiseVariance, noise_variance
from semray.config.calibrate import CalibrationConfig


def row_offsets(img: np.ndarray, half_window: int = 3) -> np.ndarray:
    """Robust per-row offset (H,): median over x of a row minus the median of its ``2 * half_window``
    neighbouring rows (pattern that is locally constant in y cancels; row offsets and gains at the
    row's typical intensity remain). Edge rows use the neighbours that exist.
    """
    z = as_image(img)
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
    variances (scaled by ``noise_scale``); ``sxx``: intensity spread used by the slope. NaN where too
    few pixels were usable. ``noise_scale``: the image's measured pixel-noise variance of a row's
    sums over the modelled one (:func:`row_noise_scale`; about 1 when the model is right).
    """

    alpha_c: np.ndarray
    beta: np.ndarray
    var_alpha_c: np.ndarray
    var_beta: np.ndarray
    s_mean: np.ndarray
    sxx: np.ndarray
    noise_scale: float = 1.0


def row_noise_scale(
    e: np.ndarray, v: np.ndarray, t: np.ndarray, u: np.ndarray, rho_x: float, blocks: int = 8
) -> float:
    """Measured over modelled pixel-noise variance of the per-row estimates ``sum(v e) / sum(v t)``.

    Each row is cut into ``blocks`` runs of columns; a row offset (``e = do * t``) gives every block
    the same estimate, so their spread about the row's estimate, ``Q = sum_k N_k**2 / D_k - N**2 / D``
    (``N = sum v e``, ``D = sum v t``, per block and whole row), is pixel noise (and whatever else
    varies along the row: pattern leftovers, row gains). Under the model (``u = v * sd``, AR(1) of
    ``rho_x`` along x) its expectation is exactly ``sum_k q_k / D_k - q / D`` with ``q`` the quadratic
    forms :func:`~semray.calibrate.common.ar1_quadratic` of ``u``. Summed over the rows, their ratio
    corrects the model's per-row noise for a wrong noise level or correlation (the measured
    correlation is rough on dense patterns at high dose). All arrays ``(R, W)``; rows with ``D <= 0``
    do not count. NaN without usable rows.
    """
    edges = np.linspace(0, e.shape[1], blocks + 1).astype(int)
    d_row = np.sum(v * t, axis=1)
    ok = d_row > 0
    if not ok.any():
        return float("nan")
    e, v, t, u, d_row = e[ok], v[ok], t[ok], u[ok], d_row[ok]
    obs = -(np.sum(v * e, axis=1) ** 2) / d_row
    exp = -ar1_quadratic(u, rho_x) / d_row
    for lo, hi in itertools.pairwise(edges):
        d = np.sum(v[:, lo:hi] * t[:, lo:hi], axis=1)
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        obs += np.sum(v[:, lo:hi] * e[:, lo:hi], axis=1) ** 2 * inv
        exp += ar1_quadratic(u[:, lo:hi], rho_x) * inv
    return float(np.sum(obs) / np.sum(exp)) if np.sum(exp) > 0 else float("nan")


def _curvature_weights(e: np.ndarray, nu: np.ndarray, curvature_sigmas: float, rho_x: float) -> np.ndarray:
    """0/1 weights ``(R, W)`` of the pixels of ``e`` whose x-smoothed value (Gaussian sigma 2) lies within
    ``curvature_sigmas`` noise sigmas (variance ``nu``, AR(1) of ``rho_x`` along x) of the row's
    median; 3 px at either end are left out."""
    ge = gaussian_filter1d(e, 2.0, axis=1, mode="nearest")
    dev = np.abs(ge - np.median(ge, axis=1, keepdims=True))
    wgt = (dev <= curvature_sigmas * np.sqrt(nu * kernel_energy(2.0, None, 1, rho_x))).astype(np.float64)
    wgt[:, :3] = 0.0
    wgt[:, -3:] = 0.0
    return wgt


def row_artifacts(
    img: np.ndarray,
    noise: NoiseVariance | CensoredModel,
    curvature_sigmas: float = 3.0,
    rho_x: float = 0.0,
    scale_sigmas: float = 5.0,
) -> RowStats:
    """Per-row offset/gain differences from ``e[y] = z[y] - (z[y-1] + z[y+1]) / 2``.

    ``e`` cancels pattern that is locally linear in y and slow drift; in a row ``e = do + dg * S`` with
    ``do = o[y] - (o[y-1] + o[y+1]) / 2`` (variance ``1.5 * offset_sigma**2``), likewise ``dg``. The
    regressor ``S`` comes from rows ``y +- 2`` (blurred along x) so its noise is independent of ``e``'s.
    Pixels where ``e`` (smoothed along x) departs from the row's median by more than
    ``curvature_sigmas`` noise sigmas (pattern curving in y, jittered edges) are left out.
    ``noise``: the pixel noise variance, ``(a, b)`` of ``a * I + b`` or a function of the local mean;
    with a :class:`~semray.calibrate.censored.CensoredModel` also the share ``dM/dI`` of an offset that
    clipped pixels show: the offset is then the regression of ``e`` on that share (near black or white
    a row offset moves the clipped mean less than the offset).

    ``rho_x``: lag-1 correlation of the pixel noise along x (AR(1), e.g. the measured
    ``fast_axis_noise_corr``). The noise variances of a row's weighted sums are exact for it
    (:func:`~semray.calibrate.common.ar1_quadratic`): counted as white, a mean of ``W`` pixels at
    ``rho_x = 0.5`` has ~3x the variance counted, which read as a false row offset. So is the
    smoothed ``e`` of the curvature test (a white threshold cut runs of correlated noise out, which
    raised the per-row floor by another third at ``rho_x = 0.5``). The variances are then scaled by
    the image's own :func:`row_noise_scale`, so that a rough ``rho_x`` or noise level does not leave
    a false offset (or hide a true one) either; it is measured on the pixels within
    ``scale_sigmas``, since a cut on the noise itself narrows the spread it measures (by 5 % at 3
    sigma on white noise).
    """
    z = as_image(img)
    e = (z[1:-1] - 0.5 * (z[:-2] + z[2:]))[1:-1]  # rows 2 .. h-3
    s = gaussian_filter1d(0.5 * (z[:-4] + z[4:]), 1.0, axis=1, mode="nearest")
    censored = isinstance(noise, CensoredModel)
    nu = 1.5 * np.maximum(noise_variance(noise.variance_of if censored else noise, s), 1e-12)
    wgt = _curvature_weights(e, nu, curvature_sigmas, rho_x)
    n = wgt.sum(axis=1)
    ok = n >= 0.25 * z.shape[1]
    wgt[~ok] = 0.0
    n = np.where(ok, n, np.nan)
    sm = np.sum(wgt * s, axis=1) / n
    ds = s - sm[:, None]
    sxx = np.sum(wgt * ds * ds, axis=1)
    sd = np.sqrt(nu)
    t = noise.slope_of(s) if censored else np.ones_like(e)  # share of an offset that e shows
    v = wgt * t
    loose = _curvature_weights(e, nu, max(curvature_sigmas, scale_sigmas), rho_x) * ok[:, None]
    scale = row_noise_scale(e, loose * t, t, loose * t * sd, rho_x)
    scale = scale if math.isfinite(scale) else 1.0  # no usable row: the model as it is
    with np.errstate(invalid="ignore", divide="ignore"):
        beta = np.sum(wgt * ds * e, axis=1) / sxx
        var_beta = scale * ar1_quadratic(wgt * ds * sd, rho_x) / sxx**2
        den = np.where(ok, np.sum(v * t, axis=1), np.nan)
        alpha_c = np.sum(v * e, axis=1) / den
        var_alpha_c = scale * ar1_quadratic(v * sd, rho_x) / den**2
    return RowStats(alpha_c, beta, var_alpha_c, var_beta, sm, sxx, scale)


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


def row_sigmas(
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
    gain = sigma_from_var(g2, g2_se, detect_sigma)
    if o_terms and split_gain and gain.detected:
        s2 = float(np.average([t[3] for t in o_terms], weights=[t[2] for t in o_terms]))
        o2 -= g2 * s2
        o2_se = math.sqrt(o2_se**2 + (g2_se * s2) ** 2)
    offset = sigma_from_var(o2, o2_se, detect_sigma)
    if o_terms:
        noise = float(np.average([t[4] for t in o_terms], weights=[t[2] for t in o_terms]))
        offset = replace(offset, detected=offset.detected and o2 > floor_rel * noise)
    if not split_gain:
        gain = replace(gain, detected=False, note="measured, not used (fit_row_gain is off)")
    return offset, gain


def row_level_profile(img: np.ndarray, band: float = 0.05, iters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean level of the image's dominant flat intensity class: ``(profile (H,), pixels (H,))``.

    Additive drift moves every pixel of a row, so it moves the level of each intensity class; a
    pattern mostly changes how many pixels of a row belong to which class. The class is the mode of a
    blurred copy (sigma 2 px); a row's class pixels are those within ``band`` of the class level plus
    the current profile estimate (iterated, so the band follows the drift); the row level is their
    mean. The profile is mean-free; NaN where a row has fewer than ``W / 8`` class pixels.
    """
    z = as_image(img)
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


def anisotropy(z: np.ndarray) -> float:
    """Energy of the (blurred) pattern's y-gradient over its x-gradient; >> 1 for horizontal gratings."""
    s = gaussian_filter(z, 2.0, mode="nearest")
    gx, gy = np.gradient(s, axis=1), np.gradient(s, axis=0)
    return float(np.mean(gy * gy) / max(float(np.mean(gx * gx)), 1e-20))


def drift_estimates(
    imgs: Sequence[np.ndarray],
    rows_from: Sequence[int],
    offset: Estimate,
    gain: Estimate,
    noise: NoiseVariance,
    cfg: CalibrationConfig,
    rho_x: float = 0.0,
) -> dict[str, Estimate]:
    """Pooled drift estimates: amplitude/correlation averaged, detection on the summed excess.

    ``rho_x``: the pixel noise's lag-1 correlation along x (AR(1)); a row's class pixels come in long
    runs, so its per-row mean carries ``(1 + rho_x) / (1 - rho_x)`` times the white-noise variance
    (the long-run limit; shorter runs carry less)."""
    corr_gain = (1.0 + rho_x) / (1.0 - rho_x)
    fits = []
    for i in rows_from:
        prof, n = row_level_profile(imgs[i])
        if np.isfinite(prof).sum() < imgs[i].shape[0] // 2:
            continue
        level = float(np.nanmean(imgs[i]))
        pix = corr_gain * float(noise_variance(noise, np.array([level]))[0]) / max(float(np.median(n)), 1.0)
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

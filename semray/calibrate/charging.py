"""Charging: causal tails along the fast axis after bright features, fitted around bright ridges."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.ndimage import gaussian_filter1d

from semray.calibrate.common import as_image, concat_rows


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
        return concat_rows(items, keep=("decays",))


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
    z = as_image(img)
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
    Above threshold an error in ``img`` is multiplied by ``a - strength * (1 - a)`` per column
    (``a = exp(-1 / decay_px)``): where that exceeds 1 in magnitude the inversion is exact only in exact
    arithmetic and amplifies noise and rounding along the row.
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

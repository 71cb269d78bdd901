"""Small helpers shared by the calibration estimators: the :class:`Estimate` record, input checks,
filter noise gains, patch tiling and the variance-to-sigma conversion."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import lfilter

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Estimate:
    """One estimated quantity: value, standard error, and whether its signature was detected."""

    value: float
    stderr: float
    detected: bool = True
    note: str = ""


_Rows = TypeVar("_Rows")


def concat_rows(items: Sequence[_Rows], keep: tuple[str, ...] = ()) -> _Rows:
    """Dataclass records of per-block arrays joined along axis 0, field by field; the fields named in
    ``keep`` (shared by every item, e.g. a parameter grid) are taken from the first item."""
    first = items[0]
    return type(first)(
        **{
            f.name: getattr(first, f.name)
            if f.name in keep
            else np.concatenate([getattr(s, f.name) for s in items])
            for f in fields(first)  # type: ignore[arg-type]
        }
    )


def as_image(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 2 or min(a.shape) < 16:
        raise ValueError(f"expected an (H, W) image with H, W >= 16, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise ValueError("expected a finite float image in [0, 1]")
    return a.astype(np.float64)


def kernel_energy(sigma: float, derivative_axis: int | None, ndim: int, rho: float = 0.0) -> float:
    """Sum of squared weights of (Gaussian blur [, then central difference]) — noise gain of the filter.

    With ``rho`` (``ndim == 1`` only) the gain for AR(1) noise of lag-1 correlation ``rho``
    (:func:`ar1_quadratic` of the weights) instead of white noise."""
    n = int(8 * sigma) * 2 + 9
    delta = np.zeros((n,) * ndim)
    delta[(n // 2,) * ndim] = 1.0
    k = gaussian_filter(delta, sigma, mode="constant")
    if derivative_axis is not None:
        k = np.gradient(k, axis=derivative_axis)
    if rho != 0.0:
        if ndim != 1:
            raise ValueError(f"kernel_energy: rho needs ndim == 1, got ndim={ndim}")
        return float(ar1_quadratic(k, rho))
    return float(np.sum(k * k))


def ar1_quadratic(u: np.ndarray, rho: float) -> np.ndarray:
    """``sum_ij u_i u_j rho**|i - j|`` along the last axis of float ``u`` (..., n) -> (...): the variance of
    ``sum_i u_i n_i`` for unit-variance AR(1) noise ``n`` of lag-1 correlation ``rho`` (``|rho| < 1``)
    along that axis; ``sum_i u_i**2`` for ``rho = 0``. Exact, by the forward and backward one-pole filters
    (``sum_j rho**|i - j| u_j`` is both filters' sum minus ``u``)."""
    u = np.asarray(u, dtype=np.float64)
    if rho == 0.0:
        return np.sum(u * u, axis=-1)
    if not -1.0 < rho < 1.0:
        raise ValueError(f"AR(1) correlation must lie in (-1, 1), got {rho}")
    fwd = lfilter([1.0], [1.0, -rho], u, axis=-1)
    bwd = lfilter([1.0], [1.0, -rho], u[..., ::-1], axis=-1)[..., ::-1]
    return np.sum(u * (fwd + bwd - u), axis=-1)


def blocks(a: np.ndarray, p: int) -> np.ndarray:
    """``(H, W)`` -> ``(H // p, W // p, p, p)`` non-overlapping tiles (a view of the top-left crop)."""
    hp, wp = a.shape[0] // p, a.shape[1] // p
    return a[: hp * p, : wp * p].reshape(hp, p, wp, p).swapaxes(1, 2)


def sigma_from_var(v: float, v_se: float, detect_sigma: float = 0.0) -> Estimate:
    """A standard deviation from a (possibly negative) variance estimate; SE by the delta method."""
    if not math.isfinite(v):
        return Estimate(float("nan"), float("nan"), False, "not measurable")
    sd = math.sqrt(max(v, 0.0))
    # Delta method breaks down near 0: there the SE of sigma is about sqrt(SE of the variance).
    se = v_se / (2 * sd) if sd > 0 and v > 2 * v_se else math.sqrt(max(v_se, 0.0))
    return Estimate(sd, se, bool(v > detect_sigma * v_se))

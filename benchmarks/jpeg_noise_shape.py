"""Does the calibration's correlation stage see the noise correlation of the real JPEG frames?

For each resist frame's centre ``--crop`` (data bar cut, :func:`real_sem.read_frames`): the true noise
autocorrelation along x from the difference with the next frame (registered to the nearest whole
pixel by :func:`semray.ingest.register_pair`'s shift, so that no resampling smooths the noise), the
detrended 8-px lag ratios the correlation stage measures on the frame's flat patches and the ratios
that the true autocorrelation predicts, and the flat x samples' lag-0 variance corrected three ways:
AR(1) at the stage's lag-1 (as shipped), ``(4 v1 - v2) / (3 - 4 c1 + c2)`` with the stage's
free-decay model (``c1 = rho``, ``c2 = rho phi``), and the same with the true ``c1, c2``. Numbers in
DN (8-bit grey levels). The flat y samples' lag-0 variance needs no x-correlation factor (their row
offsets are removed over the full row, :func:`semray.calibrate.variance.without_row_steps`)::

    python benchmarks/jpeg_noise_shape.py --crop 1024
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_sem import DATA, DN, centre_window, read_frames

from semray.calibrate.common import blocks
from semray.calibrate.correlation import (
    _lag_basis,
    expected_lag_ratio,
    lag_correlation,
    patch_lag_sums,
)
from semray.calibrate.variance import fit_mean_variance, flat_samples, flatness, patch_stats
from semray.ingest import register_pair

P, FLAT = 8, 1.5


def diff_noise(frames: list[np.ndarray], i: int, win: tuple[int, int, int, int]) -> np.ndarray:
    """``(f_i - f_j) / sqrt 2`` on the window (``j = i + 1`` cyclic, whole-pixel registration), mean-free."""
    j = (i + 1) % len(frames)
    _, (dy, dx) = register_pair(frames[j], frames[i])
    other = np.roll(frames[j].astype(np.float64), (round(dy), round(dx)), axis=(0, 1))
    y0, x0, h, w = win
    d = (frames[i][y0 : y0 + h, x0 : x0 + w] - other[y0 : y0 + h, x0 : x0 + w]) / np.sqrt(2.0)
    return d - d.mean()


def one_frame(frames: list[np.ndarray], i: int, crop: int) -> str:
    """One table row for frame ``i``."""
    win = centre_window(frames[i].shape, crop)
    y0, x0, h, w = win
    z = frames[i][y0 : y0 + h, x0 : x0 + w].astype(np.float64)
    d = diff_noise(frames, i, win)
    acf = np.array([np.mean(d[:, k:] * d[:, : d.shape[1] - k]) for k in range(P)])
    c = acf / acf[0]
    ps = patch_stats(z, P)
    a0, b0, _, _ = fit_mean_variance(*(lambda s: (s.mean, s.var0))(flat_samples(ps, FLAT)))
    s = flat_samples(ps, FLAT, (a0, b0))
    sums = patch_lag_sums(z, P)[:, 0][flatness(ps, (a0, b0))[:, 0] <= FLAT]
    tot = sums.sum(axis=0)
    ratios = tot[1:] / tot[0]
    rho, _ = lag_correlation(sums, P)
    free_rho, phi = free_decay(ratios)
    predicted = [_ratio_of_acf(c, k) for k in (1, 2, 3)]
    x = s.direction == 0
    num = float(np.mean(4 * s.v1[x] - s.v2[x]))
    ar1 = num / ((1 - rho) * (3 - rho))
    model = num / (3 - 4 * free_rho + free_rho * phi)
    true = num / (3 - 4 * c[1] + c[2])
    patch_var = (blocks(d, P).reshape(-1, P * P) ** 2).mean(axis=1)
    ref = float(np.mean(patch_var[s.patch[x]]))
    y = s.direction == 1
    var0_y = float(np.mean(s.var0[y]))  # no x-correlation factor: row offsets removed over the full row
    y_ref = float(np.mean(patch_var[s.patch[y]]))
    f = [np.sqrt(v) * DN for v in (ar1, model, true, ref, acf[0], var0_y, y_ref)]
    return (
        f"| {i + 1} | {c[1]:.2f} / {c[2]:.2f} / {c[3]:.2f} | {' / '.join(f'{r:.2f}' for r in predicted)} | "
        f"{' / '.join(f'{r:.2f}' for r in ratios)} | {rho:.2f} | {free_rho:.2f}, {phi:.2f} | "
        + " | ".join(f"{v:.2f}" for v in f)
        + " |"
    )


def _ratio_of_acf(c: np.ndarray, k: int) -> float:
    """Detrended lag-``k`` ratio of noise with normalised autocorrelation ``c`` (lags ``0..P-1``)."""
    white, basis, _ = _lag_basis(P, 3)
    e = white + c[1:] @ basis
    return float(e[k] / e[0])


def free_decay(ratios: np.ndarray) -> tuple[float, float]:
    """``(rho, phi)`` of the ``rho phi**(j-1)`` model (``|phi| <= |rho|``) nearest (least squares) to the
    lag-1..3 ``ratios``, on a grid."""
    best, arg = np.inf, (0.0, 0.0)
    for rho in np.linspace(-0.95, 0.95, 77):
        for phi in np.linspace(-0.9, 0.95, 75):
            if abs(phi) > abs(rho) + 0.02:
                continue
            err = sum((expected_lag_ratio(rho, P, k, phi) - ratios[k - 1]) ** 2 for k in (1, 2, 3))
            if err < best:
                best, arg = err, (float(rho), float(phi))
    return arg


def unidentified_share() -> float:
    """Distance of the lag-0 variance from the span of what 8-px flat patches measure along a line:
    the detrended lag-0..7 sums and the lag-0 extrapolation ``4 v1 - v2`` (as linear functionals of the
    autocovariance at lags 0..7); 0 would mean a model-free estimate exists."""
    white, basis, _ = _lag_basis(P, P - 1)
    rows = np.concatenate([np.concatenate([white[None], basis]).T, [[3.0, -4.0, 1.0] + [0.0] * (P - 3)]])
    e0 = np.eye(P)[0]
    x = np.linalg.lstsq(rows.T, e0, rcond=None)[0]
    return float(np.linalg.norm(rows.T @ x - e0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--crop", type=int, default=1024)
    args = ap.parse_args()
    print(
        f"lag-0 variance outside the span of the 8-px line statistics: {unidentified_share():.2f} (0: identifiable)"
    )
    _, frames, _ = read_frames(args.data)
    print(
        "| frame | true c1/c2/c3 (x) | ratios predicted | ratios measured | AR(1) rho | free rho, phi | "
        "sigma AR(1) | sigma free model | sigma true c | sigma frame diff (same patches) | "
        "sigma frame diff (crop) | y: sigma | y: sigma frame diff (same patches) |"
    )
    print("|---" * 13 + "|")
    for i in range(len(frames)):
        print(one_frame(frames, i, args.crop))


if __name__ == "__main__":
    main()

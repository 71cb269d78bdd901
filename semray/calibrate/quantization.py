"""Quantisation and the ADC window: the grid of grey levels (step, black level, bit depth) and the levels
where saturated pixels pile up (censoring)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from semray.calibrate.common import Estimate


def quantization_grid(img: np.ndarray) -> tuple[float, float] | None:
    """``(step, black)`` when all grey levels strictly inside (0, 1) lie on a grid ``black + k * step``.

    ``black`` is the grid offset chosen in ``(-step, 0]`` (only the offset modulo ``step`` is seen).
    ``None`` for continuous (float) data or grids finer than 16 bits. Exact 0 and 1 are skipped: the
    model clips after the ADC, so saturated pixels sit off the grid.
    """
    u = np.unique(np.asarray(img, dtype=np.float64))
    u = u[(u > 0.0) & (u < 1.0)]
    if u.size < 3 or u.size > 65536:
        return None
    d = np.diff(u)
    step = float(np.median(d[d < 1.5 * d.min()]))
    if step < 0.5 / 65535:
        return None
    k = (u - u[0]) / step
    if np.max(np.abs(k - np.rint(k))) > 0.05:
        return None
    step, u0 = np.polyfit(np.rint(k), u, 1)
    r = u0 / step
    black = (r - round(r)) * step  # in [-step / 2, step / 2]
    # A file's own grid (k / 255) gives black = 0 up to float rounding; keep it exactly 0 then.
    if abs(black) <= 1e-3 * step:
        return float(step), 0.0
    return float(step), float(black - step if black > 0 else black)


def common_grid(imgs: Sequence[np.ndarray], warnings: list[str]) -> tuple[float, float] | None:
    """The grey-level grid ``(step, black)`` shared by all images, or None (a reason added to
    ``warnings`` when only some images have one, or their steps differ)."""
    grids = [quantization_grid(z) for z in imgs]
    if any(g is None for g in grids):
        if any(g is not None for g in grids):
            warnings.append("only some images are on a grey-level grid; quantisation left off")
        return None
    steps = np.array([g[0] for g in grids if g is not None])
    if np.ptp(steps) > 0.01 * steps.min():
        warnings.append("images use different grey-level steps; quantisation left off")
        return None
    return grids[0]


def adc_estimates(grid: tuple[float, float] | None) -> tuple[dict[str, Estimate], list[str]]:
    """Step, bit depth and black/white levels of the ADC from a grey-level grid (smallest of 8/12/16 bits
    whose codes reach intensity 1); ``quant_step`` not detected when there is no grid or no window fits."""
    est: dict[str, Estimate] = {}
    warnings: list[str] = []
    if grid:
        step, black = grid
        levels = (1.0 - black) / step
        bits = next((bd for bd in (8, 12, 16) if 2**bd - 1 >= levels - 0.5), 16)
        white = black + (2**bits - 1) * step
        if white > 2.0:
            warnings.append(f"grey-level step {step:.3g} fits no 8/12/16-bit window; quantisation left off")
            grid = None
        else:
            est["quant_step"] = Estimate(step, 0.0, True, "grey-level step, intensity units")
            est["bit_depth"] = Estimate(float(bits), 0.0, True)
            est["quant_black_level"] = Estimate(black, 0.0, True, "offset modulo one step")
            est["quant_white_level"] = Estimate(white, 0.0, True)
    if not grid:
        est["quant_step"] = Estimate(0.0, 0.0, False, "no grey-level grid (continuous data)")
    return est, warnings


def _pile_up(values: np.ndarray, level: float, next_level: float) -> tuple[float, bool]:
    """Fraction of ``values`` at ``level`` and whether they pile up there: at least 10 pixels (and 1e-4
    of all) and more than twice as many as at the next grey level inward (a density's own tail thins
    towards its end; clipping piles the whole tail onto the last level)."""
    at = int(np.count_nonzero(values == level))
    nxt = int(np.count_nonzero(values == next_level))
    return at / values.size, bool(at >= max(10, 1e-4 * values.size) and at > 2 * nxt)


def censor_levels(imgs: Sequence[np.ndarray]) -> tuple[dict[str, Estimate], tuple[float, float]]:
    """The ADC window's ends where censoring is visible: estimates and ``(lo, hi)`` for the censored
    model (``-inf``/``inf`` where no pile-up is seen, i.e. nothing reaches that end).

    Assumes the images share one window (one tool setting) and that a saturated pixel reads exactly
    the end value (what an ADC, and :mod:`semray.noise`'s clipping, do). Censored fractions are over
    all pixels of all images.
    """
    z = np.concatenate([np.ravel(i) for i in imgs])
    levels = np.unique(z)
    if levels.size < 2:
        raise ValueError("the images hold a single grey level: nothing to calibrate")
    f_lo, lo_seen = _pile_up(z, float(levels[0]), float(levels[1]))
    f_hi, hi_seen = _pile_up(z, float(levels[-1]), float(levels[-2]))
    note = "level where pixels pile up (censoring), image intensity units"
    est = {
        "adc_window_low": Estimate(float(levels[0]), 0.0, lo_seen, note if lo_seen else "no pile-up seen"),
        "adc_window_high": Estimate(float(levels[-1]), 0.0, hi_seen, note if hi_seen else "no pile-up seen"),
        "censored_fraction_low": Estimate(f_lo, math.sqrt(f_lo * (1 - f_lo) / z.size), lo_seen),
        "censored_fraction_high": Estimate(f_hi, math.sqrt(f_hi * (1 - f_hi) / z.size), hi_seen),
    }
    window = (float(levels[0]) if lo_seen else -math.inf, float(levels[-1]) if hi_seen else math.inf)
    return est, window

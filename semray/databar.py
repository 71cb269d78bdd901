"""Burned-in data bars: the info band (scale bar, magnification, date) most SEM tools write under the image.

:func:`detect_data_bar` finds it on a float32 (H, W) [0, 1] page; ``semray ingest`` crops it from
training data and ``semray denoise`` copies it through untouched, with the same detector.
"""

from __future__ import annotations

import numpy as np

from semray.config.ingest import DataBarConfig


def _uniform_fraction(image: np.ndarray, level: np.ndarray | float, tolerance: float) -> np.ndarray:
    """Per row, the fraction of pixels within ``tolerance`` of ``level`` (scalar or per-row (H,))."""
    return np.mean(np.abs(image - np.reshape(level, (-1, 1))) <= tolerance, axis=1)


def _background_levels(region: np.ndarray, dark_max: float, light_min: float) -> list[float]:
    """Candidate bar backgrounds: the most common near-black and the most common near-white level.

    A rendered bar's background is one exact value, so it is a spike in the histogram; only the dark
    and light ends are searched so that a flat mid-grey image region is never taken for it. Both ends
    are returned because a dark image clipped at 0 can out-count a white bar's background.
    """
    codes = np.clip(np.rint(region * 255.0), 0, 255).astype(np.int64)
    hist = np.bincount(codes.ravel(), minlength=256)
    levels = np.arange(256) / 255.0
    out = []
    for end in (levels <= dark_max, levels >= light_min):
        counts = np.where(end, hist, 0)
        if counts.any():
            peak = int(np.argmax(counts))
            # Refine within the 8-bit bin so a 16-bit background is matched exactly, not to +-0.5/255.
            out.append(float(np.median(region[codes == peak])))
    return out


def _bottom_run(flags: np.ndarray, max_gap: int) -> int | None:
    """Rows of the run of True at the end of ``flags`` (bridging up to ``max_gap`` False rows).

    Returns None when the run starts more than ``max_gap`` rows above the end or covers all of
    ``flags`` (no clear top edge), else the run's height in rows.
    """
    up = flags[::-1]
    pos = np.flatnonzero(up)
    if pos.size == 0 or pos[0] > max_gap:
        return None
    gaps = np.flatnonzero(np.diff(pos) - 1 > max_gap)
    if gaps.size:
        return int(pos[gaps[0]]) + 1
    if up.size - 1 - int(pos[-1]) <= max_gap:
        return None
    return int(pos[-1]) + 1


def detect_data_bar(image: np.ndarray, cfg: DataBarConfig | None = None) -> int:
    """Height in rows of the burned-in data bar at the bottom of ``image`` (0 when there is none).

    A bar is a rendered graphic: a bottom band whose rows are mostly at exactly one near-black or
    near-white grey level (a micrograph's shot noise never puts that many pixels of a row within a
    grey level or two of one value), bridging up to ``max_gap_rows`` rows of dense glyphs or separator
    lines, topped by at most ``max_gap_rows`` rows of border line, holding sparse high-contrast text,
    under an image that sits at that level far less often. A band running past ``max_fraction`` of
    the height is a uniform image region, not a bar.

    Args:
        image: float32 (H, W) in [0, 1].
        cfg: detector thresholds (defaults when None).

    Returns:
        Number of bottom rows to crop, ``0 <= n <= max_fraction * H + max_gap_rows``.
    """
    cfg = cfg or DataBarConfig()
    img = np.asarray(image, dtype=np.float32)
    max_rows = int(cfg.max_fraction * img.shape[0])
    if max_rows < cfg.min_rows:
        return 0
    levels = _background_levels(img[-max_rows:], cfg.dark_max, cfg.light_min)
    return max((_bar_at_level(img, b, max_rows, cfg) for b in levels), default=0)


def _bar_at_level(img: np.ndarray, background: float, max_rows: int, cfg: DataBarConfig) -> int:
    """:func:`detect_data_bar` for one candidate background level."""
    h = img.shape[0]
    at_level = _uniform_fraction(img, background, cfg.tolerance)  # (H,)
    n = _bottom_run(at_level[h - max_rows :] >= cfg.min_uniform_fraction, cfg.max_gap_rows)
    if n is None or n < cfg.min_rows:
        return 0
    # A border line drawn in the text colour across the top of the bar belongs to the bar too.
    band = img[h - n :]
    ink = band[np.abs(band - background) > cfg.text_contrast]
    if ink.size:
        codes = np.rint(ink * 255.0).astype(np.int64)
        ink_level = float(np.argmax(np.bincount(codes, minlength=256))) / 255.0
        medians = np.median(img, axis=1)
        line = (np.abs(medians - ink_level) <= 1.0 / 255.0 + cfg.tolerance) & (
            _uniform_fraction(img, medians, cfg.tolerance) >= cfg.min_uniform_fraction
        )
        for _ in range(cfg.max_gap_rows):
            if n >= h or not line[h - n - 1]:
                break
            n += 1
    text = float(np.mean(np.abs(img[h - n :] - background) > cfg.text_contrast))
    if not cfg.min_text_fraction <= text <= cfg.max_text_fraction:
        return 0
    # The image just above must sit at the bar's level far less often than the bar does, else the
    # "bar" is a flat image region (a dark image clipped at 0 has many pixels at 0, but not most).
    above = at_level[max(0, h - n - max(2 * n, 16)) : h - n]
    ratio = cfg.max_flat_above_fraction
    if above.size == 0 or float(np.mean(above)) > ratio * float(np.mean(at_level[h - n :])):
        return 0
    return n

"""Reading noisy images to measure noise on, page by page (``semray calibrate-noise`` and ``semray adapt``).

Every page of a multipage TIFF is an image of its own, named ``file.tif[page k]``
(:func:`semray.io.page_name`); a page that holds no detector noise to measure (a reduced-resolution
preview, too small, constant) or cannot be read is a problem that names the file and the page, never a
page dropped silently. Both commands read their images through :func:`read_noisy_pages`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semray.io import ImageMeta, ImageReadError, iter_pages, page_name


@dataclass
class NoisyPage:
    """One page of an image file: float32 (H, W) pixels in [0, 1] and the file's metadata for it."""

    path: Path
    image: np.ndarray
    meta: ImageMeta

    @property
    def name(self) -> str:
        """How reports name it: the path, or ``path[page k]`` (k from 0) for a page of a multipage file."""
        return page_name(self.path, self.meta.page, self.meta.pages)


def page_problem(page: NoisyPage, min_side_px: int) -> str | None:
    """Why one page holds no detector noise to measure, naming it; None when it does.

    Refused: a reduced-resolution preview page (TIFF NewSubfileType bit 0, as ``semray ingest`` skips
    them), a side under ``min_side_px``, a constant image.
    """
    if page.meta.subfiletype & 1:
        return (
            f"{page.name}: reduced-resolution preview page (thumbnail): its noise is averaged down, not your "
            "detector's; save the full-resolution pages without it"
        )
    if page.image.ndim != 2:
        return f"{page.name}: image of shape {page.image.shape} is not one grey-level plane"
    h, w = page.image.shape
    if min(h, w) < min_side_px:
        return f"{page.name}: {h}x{w} px is too small (each side must be >= {min_side_px} px)"
    lo, hi = float(page.image.min()), float(page.image.max())
    if lo == hi:
        return f"{page.name}: constant image (value {lo:.4g}): no noise to measure"
    return None


def read_noisy_pages(paths: Sequence[Path], min_side_px: int) -> tuple[list[NoisyPage], list[str]]:
    """Every page of every file in ``paths``, in order: ``(usable pages, problems)``.

    Each problem names its file (and page): an unreadable file or page (the pages before it are kept)
    or a page :func:`page_problem` refuses. The caller decides how to refuse; nothing is skipped silently.
    """
    pages: list[NoisyPage] = []
    problems: list[str] = []
    for p in paths:
        try:
            for img, meta in iter_pages(p):
                page = NoisyPage(Path(p), img, meta)
                if problem := page_problem(page, min_side_px):
                    problems.append(problem)
                else:
                    pages.append(page)
        except ImageReadError as e:  # names the file (and the page)
            problems.append(f"unreadable: {e}")
    return pages, problems

"""PNG figures people look at instead of reading numbers: previews, sample grids, comparisons.

Only plotting lives here (matplotlib, Agg backend, no display needed); the arrays come from the pure
modules. Every function writes a PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    col_titles: Sequence[str],
    out_png: str | Path,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 2.2,
    cmaps: Sequence[str] | None = None,
) -> Path:
    """A grid of (H, W) images, one list per row, with column and row titles.

    Images are shown with fixed display range [0, 1] (so contrast is comparable across cells) except
    for columns whose cmap is not ``"gray"`` (difference maps, masks), which are auto-scaled.
    """
    n_rows, n_cols = len(rows), len(col_titles)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows), squeeze=False, dpi=100
    )
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row) or row[c] is None:
                ax.axis("off")
                continue
            cmap = cmaps[c] if cmaps else "gray"
            kw = {"vmin": 0.0, "vmax": 1.0} if cmap == "gray" else {}
            ax.imshow(np.asarray(row[c], dtype=np.float32), cmap=cmap, interpolation="nearest", **kw)
            if r == 0:
                ax.set_title(col_titles[c], fontsize=9)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_figure(fig: plt.Figure, out_png: str | Path) -> Path:
    """Write ``fig`` to ``out_png`` (parent folders made), close it, and return the path."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

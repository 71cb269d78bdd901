"""Figures of an evaluation: metric vs noise level per method, visual examples, runtime bars.

Only plotting lives here (matplotlib, Agg backend); every function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle
from scipy import ndimage as ndi

from semray.evaluation.stats import METRICS
from semray.figures import save_figure

#: Metrics drawn in the metric-vs-level figure (the write-up's four).
CURVE_METRICS = (
    "psnr", "ssim", "defect_psnr", "defect_contrast", "defect_recall", "recall_at_fa_0.01", "detection_auc",
)  # fmt: skip


@dataclass
class Example:
    """One image of the visual example grid, at one noise level.

    Attributes:
        image_id, pattern: which test image.
        level, level_unit: the noise level shown.
        clean, noisy: float32 (H, W) in [0, 1].
        defect_mask: bool (H, W).
        outputs: method label -> denoised float32 (H, W), in column order.
    """

    image_id: str
    pattern: str
    level: float
    level_unit: str
    clean: np.ndarray
    noisy: np.ndarray
    defect_mask: np.ndarray
    outputs: dict[str, np.ndarray]


def _style(methods: Sequence[str]) -> dict[str, dict[str, object]]:
    cmap = plt.get_cmap("tab10")
    out: dict[str, dict[str, object]] = {}
    k = 0
    for m in methods:
        if m == "noisy":
            out[m] = {"color": "0.5", "linestyle": ":", "marker": "x"}
        else:
            out[m] = {"color": cmap(k % 10), "linestyle": "--" if "oracle" in m else "-", "marker": "o"}
            k += 1
    return out


def plot_metrics_vs_level(
    summary: pd.DataFrame,
    condition: str,
    methods: Sequence[str],
    out_png: str | Path,
    metrics: Sequence[str] = CURVE_METRICS,
    title: str | None = None,
    dpi: int = 100,
    recall_bound: pd.DataFrame | None = None,
) -> Path:
    """One panel per metric: mean over images vs noise level (log x), one line per method, CI bars.

    ``recall_bound`` (see :mod:`semray.evaluation.detectability`) adds the ideal observer: its
    ``ideal_recall`` on the uncontrolled defect-recall panel, and on each recall-at-false-alarm panel
    the analytic bound at that rate (dashed grey) and its Monte Carlo check with CI (grey squares).
    """
    s = summary[summary["condition"] == condition]
    unit = s["level_unit"].iloc[0] if not s.empty else ""
    styles = _style(methods)
    ncols = 2
    nrows = int(np.ceil(len(metrics) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows + 0.8), squeeze=False, dpi=dpi)
    levels = np.sort(s["level"].unique())
    # Spread the methods' markers a little along the log axis so error bars do not hide each other.
    span = np.log(levels[-1] / levels[0]) if len(levels) > 1 else 1.0
    dodge = {m: np.exp(span * 0.012 * (k - (len(methods) - 1) / 2)) for k, m in enumerate(methods)}
    for ax, metric in zip(axes.ravel(), metrics, strict=False):
        _metric_panel(ax, s[s["metric"] == metric], methods, styles, dodge)
        if recall_bound is not None and not recall_bound.empty:
            _bound_lines(
                ax, recall_bound[recall_bound["condition"] == condition].sort_values("level"), metric
            )
        ax.set_xscale("log")
        ax.set_xticks(levels, [f"{lv:g}" for lv in levels])
        ax.minorticks_off()
        ax.set_xlabel("dose (e-/px)" if unit == "e-/px" else f"noise level ({unit})")
        ax.set_ylabel(METRICS.get(metric, metric))
        ax.grid(True, alpha=0.3)
    # fixed margins instead of tight_layout: as good here and several times faster
    margins = {"top": 0.91, "bottom": 0.16, "wspace": 0.25, "hspace": 0.35}
    return _finish_panels(
        fig, axes, len(metrics), title or f"metrics vs noise level: {condition}", out_png, margins
    )


def _metric_panel(
    ax: Any,
    sm: pd.DataFrame,
    methods: Sequence[str],
    styles: dict[str, dict[str, object]],
    dodge: dict[str, float],
) -> None:
    """One metric's summary rows ``sm``: a line with CI bars per method, x dodged per method."""
    for m in methods:
        d = sm[sm["method"] == m].sort_values("level")
        if d.empty or not np.isfinite(d["mean"]).any():
            continue
        err = np.vstack([d["mean"] - d["ci_low"], d["ci_high"] - d["mean"]])
        ax.errorbar(
            d["level"] * dodge[m],
            d["mean"],
            yerr=np.nan_to_num(err),
            label=m,
            capsize=2,
            markersize=4,
            linewidth=1.4,
            **styles[m],
        )


def _bound_lines(ax: Any, b: pd.DataFrame, metric: str) -> None:
    """The ideal observer on ``metric``'s panel, from the recall-bound rows ``b`` of one condition."""
    if metric == "defect_recall" and "ideal_recall" in b:
        ax.plot(
            b["level"],
            b["ideal_recall"],
            ":",
            color="0.6",
            linewidth=1.0,
            label="ideal observer, 1e-3 per site",
        )
    if not metric.startswith("recall_at_fa_") or f"ideal_{metric}" not in b:
        return
    ax.plot(
        b["level"], b[f"ideal_{metric}"], "--", color="0.3", linewidth=1.2, label="ideal observer (analytic)"
    )
    mc = b[np.isfinite(b[f"mc_{metric}"])] if f"mc_{metric}" in b else b.iloc[:0]
    if not mc.empty:
        err = np.vstack(
            [mc[f"mc_{metric}"] - mc[f"mc_{metric}_low"], mc[f"mc_{metric}_high"] - mc[f"mc_{metric}"]]
        )
        ax.errorbar(
            mc["level"], mc[f"mc_{metric}"], yerr=np.nan_to_num(err), fmt="s", color="0.3", markersize=4,
            capsize=2, label="ideal observer (Monte Carlo)",
        )  # fmt: skip


def plot_roc(
    sites: pd.DataFrame,
    dprime: pd.DataFrame,
    condition: str,
    methods: Sequence[str],
    out_png: str | Path,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Per level of ``condition``: each method's detection ROC (recall vs false alarms per site, log x),
    pooled over its defect sites (:mod:`semray.evaluation.detection`), and the analytic ideal observer's
    (:func:`semray.evaluation.detectability.ideal_roc`, dashed) from ``dprime`` (its per-site ``d'``)."""
    from semray.evaluation.detectability import ideal_roc
    from semray.evaluation.detection import roc_curve

    s = sites[sites["condition"] == condition]
    levels = sorted(s["level"].unique())
    styles = _style(methods)
    ncols = min(len(levels), 4)
    nrows = int(np.ceil(len(levels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.3 * nrows + 0.8), squeeze=False, dpi=dpi)
    for ax, lv in zip(axes.ravel(), levels, strict=False):
        for m in methods:
            d = s[(s["level"] == lv) & (s["method"] == m)]
            if not d.empty:
                fa, rec = roc_curve(d["score_defect"], d["score_reference"])
                st = {k: v for k, v in styles[m].items() if k != "marker"}
                ax.step(np.maximum(fa, 1e-4), rec, where="post", label=m, linewidth=1.2, **st)
        dp = dprime[(dprime["condition"] == condition) & (dprime["level"] == lv)]["dprime"].to_numpy()
        if dp.size:
            fa, rec = ideal_roc(dp)
            ax.plot(fa, rec, "--", color="0.3", linewidth=1.2, label="ideal observer (analytic)")
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{lv:g} {s['level_unit'].iloc[0] if len(s) else ''}", fontsize=9)
        ax.set_xlabel("false alarms per site")
        ax.set_ylabel("recall")
        ax.grid(True, alpha=0.3)
    margins = {"top": 0.88, "bottom": 0.25, "wspace": 0.3, "hspace": 0.4}
    return _finish_panels(fig, axes, len(levels), title or f"detection ROC: {condition}", out_png, margins)


def _finish_panels(
    fig: plt.Figure, axes: np.ndarray, n_used: int, title: str, out_png: str | Path, margins: dict[str, float]
) -> Path:
    """Blank the panels after the first ``n_used``, add the shared legend and title, set the margins
    (``left``/``right`` fixed, the rest from ``margins``) and save."""
    for ax in axes.ravel()[n_used:]:
        ax.axis("off")
    _figure_legend(fig, axes)
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.08, right=0.98, **margins)
    return save_figure(fig, out_png)


def _figure_legend(fig: plt.Figure, axes: np.ndarray) -> None:
    """One legend under the panels for every labelled line of any panel (bounds are on some only)."""
    legend: dict[str, Any] = {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="lower center",
        ncol=min(len(legend), 6),
        fontsize=8,
        frameon=False,
    )


def crop_box(defect_mask: np.ndarray, crop_px: int) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` of a ``crop_px`` square centred on the largest defect, inside the image.

    Centred on the image when there is no defect; clipped to the image when it is smaller.
    """
    h, w = defect_mask.shape
    labels, n = ndi.label(defect_mask, structure=np.ones((3, 3), bool))
    if n:
        sizes = ndi.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1))
        cy, cx = ndi.center_of_mass(labels == int(np.argmax(sizes)) + 1)
    else:
        cy, cx = h / 2.0, w / 2.0
    ch, cw = min(crop_px, h), min(crop_px, w)
    y0 = int(np.clip(round(cy - ch / 2.0), 0, h - ch))
    x0 = int(np.clip(round(cx - cw / 2.0), 0, w - cw))
    return y0, x0, y0 + ch, x0 + cw


def plot_examples(
    examples: Sequence[Example], out_png: str | Path, crop_px: int = 48, dpi: int = 100
) -> Path:
    """Visual comparison: noisy | each method | clean, with |difference| maps and zoomed defect crops.

    Three rows per example: the full images (the crop's box drawn on the clean one), ``|image - clean|``
    on one colour scale per example (the 99th percentile of the denoised methods' differences, so
    method-to-method differences stay visible; the noisy input saturates), and the zoomed crop around
    the largest defect (its mask outlined in red on the clean crop).
    """
    if not examples:
        raise ValueError("plot_examples needs at least one example")
    cols = ["noisy", *[m for m in examples[0].outputs if m != "noisy"], "clean"]
    n_rows = 3 * len(examples)
    cell = 2.0
    fig, axes = plt.subplots(
        n_rows, len(cols), figsize=(cell * len(cols), cell * n_rows), squeeze=False, dpi=dpi
    )
    for e_idx, ex in enumerate(examples):
        imgs = {"noisy": ex.noisy, **{m: o for m, o in ex.outputs.items() if m != "noisy"}, "clean": ex.clean}
        diffs = {m: np.abs(im - ex.clean) for m, im in imgs.items()}
        den = [diffs[m] for m in cols if m not in ("noisy", "clean")]
        vmax = max(float(np.percentile(np.stack(den), 99)) if den else 0.0, 0.02)
        y0, x0, y1, x1 = crop_box(ex.defect_mask, crop_px)
        r0 = 3 * e_idx
        for c, m in enumerate(cols):
            ax_img, ax_diff, ax_crop = axes[r0][c], axes[r0 + 1][c], axes[r0 + 2][c]
            ax_img.imshow(imgs[m], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if m == "clean":
                ax_img.add_patch(
                    Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=1)
                )
                ax_diff.imshow(ex.defect_mask, cmap="magma", interpolation="nearest")
            else:
                ax_diff.imshow(diffs[m], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax_crop.imshow(imgs[m][y0:y1, x0:x1], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if m == "clean" and ex.defect_mask[y0:y1, x0:x1].any():
                ax_crop.contour(
                    ex.defect_mask[y0:y1, x0:x1].astype(float), levels=[0.5], colors="red", linewidths=0.8
                )
            if e_idx == 0:
                ax_img.set_title(m, fontsize=9)
            for ax in (ax_img, ax_diff, ax_crop):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r0][0].set_ylabel(f"{ex.pattern}\n{ex.level:g} {ex.level_unit}", fontsize=8)
        axes[r0 + 1][0].set_ylabel(f"|diff|\n(0..{vmax:.2f})", fontsize=8)
        axes[r0 + 2][0].set_ylabel(f"defect crop\n{x1 - x0}x{y1 - y0} px", fontsize=8)
        axes[r0 + 1][-1].set_title("defect mask", fontsize=7)
    fig.suptitle("visual examples: noisy | methods | clean", fontsize=11)
    fig.subplots_adjust(
        left=0.06, right=0.99, top=1 - 0.5 / (cell * n_rows), bottom=0.01, wspace=0.05, hspace=0.12
    )
    return save_figure(fig, out_png)


def plot_runtime(runtime: pd.DataFrame, out_png: str | Path, dpi: int = 100) -> Path:
    """Horizontal bars of seconds per megapixel per method (log scale), fastest at the top; models in
    orange, classical methods in blue."""
    from matplotlib.ticker import LogLocator, NullFormatter

    r = runtime.sort_values("seconds_per_megapixel", ascending=False)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(r) + 1.2), dpi=dpi)
    colors = ["tab:orange" if k == "model" else "tab:blue" for k in r["method_kind"]]
    ax.barh(r["method"], r["seconds_per_megapixel"], color=colors)
    for y, v in enumerate(r["seconds_per_megapixel"]):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(right=float(r["seconds_per_megapixel"].max()) * 4)
    threads = int(r["threads"].iloc[0]) if "threads" in r and len(r) else 1
    ax.set_xlabel(f"seconds per megapixel ({threads} thread{'s' if threads > 1 else ''}, lower is faster)")
    ax.grid(True, axis="x", which="major", alpha=0.3)
    fig.subplots_adjust(left=0.22, right=0.97, bottom=0.5 / (0.45 * len(r) + 1.2) + 0.1, top=0.95)
    return save_figure(fig, out_png)

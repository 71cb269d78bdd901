"""Summary statistics of an evaluation's per-image results (pure pandas/scipy).

The results table has one row per image x noise draw x method x condition x level. Summaries average
over all (image, draw) samples with a Student-t confidence interval of the mean; comparisons against a
reference method are paired (the same image under the same noise draw), which removes the image-to-image
spread from the interval. Samples are treated as independent: the draws of one image share its content,
so with several draws the intervals are slightly narrow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: Metrics reported, in display order, with their display names.
METRICS: dict[str, str] = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "ms_ssim": "MS-SSIM",
    "gradient_correlation": "gradient corr.",
    "edge_preservation": "edge F1 (hardly sees leftover noise)",
    "defect_psnr": "defect-region PSNR (dB)",
    "defect_contrast": "defect contrast",
    "defect_recall": "defect recall (no false-alarm control)",
    "defect_false_alarm": "false alarms per site of that detector",
    "detection_auc": "detection AUC",
    "recall_at_fa_0.01": "recall at 1e-2 false alarms/site",
    "recall_at_fa_0.001": "recall at 1e-3 false alarms/site",
}
#: Metrics pooled over all sites of a cell (:mod:`semray.evaluation.detection`), not per-image columns.
POOLED_METRICS = frozenset({"detection_auc", "recall_at_fa_0.01", "recall_at_fa_0.001"})
#: Metrics with one value per (image, draw) row of the results table.
PER_IMAGE_METRICS = tuple(m for m in METRICS if m not in POOLED_METRICS)
#: Range of each bounded metric; confidence intervals are clipped to it (PSNR is unbounded).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "ssim": (-1.0, 1.0),
    "ms_ssim": (0.0, 1.0),
    "edge_preservation": (0.0, 1.0),
    "gradient_correlation": (-1.0, 1.0),
    "defect_contrast": (0.0, 1.5),
    "defect_recall": (0.0, 1.0),
    "defect_false_alarm": (0.0, 1.0),
}
#: Metrics where lower is better (the report marks the lowest mean as best).
LOWER_BETTER = frozenset({"defect_false_alarm"})
#: Metrics whose ideal value is 1 rather than "as high as possible" (defect contrast above 1 means the
#: method exaggerated the defect).
TARGET_ONE = frozenset({"defect_contrast"})
#: Columns that identify one evaluation cell (everything but the image and the noise draw).
GROUP_KEYS = ["condition", "level", "method"]
#: Columns that identify one sample of a cell: the image, and the draw's noise seed when the table has
#: one (tables written before noise draws existed have one draw and no ``noise_seed`` column).
SAMPLE_KEYS = ["image_id", "noise_seed"]


def _t_half_width(std: np.ndarray, n: np.ndarray, ci: float) -> np.ndarray:
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stats.t.ppf(0.5 + ci / 2.0, np.maximum(n - 1, 1))
        half = t * np.asarray(std, dtype=float) / np.sqrt(n)
    return np.where(n >= 2, half, np.nan)


def metric_name(metric: str) -> str:
    """Display name of ``metric`` (recall at any false-alarm rate included)."""
    if metric in METRICS:
        return METRICS[metric]
    if metric.startswith("recall_at_fa_"):
        return f"recall at {metric.removeprefix('recall_at_fa_')} false alarms/site"
    return metric


def summarize(
    results: pd.DataFrame, metrics: Sequence[str] = PER_IMAGE_METRICS, ci: float = 0.95
) -> pd.DataFrame:
    """Mean, std and CI of each metric per (condition, level, method) over all its images and noise
    draws, long format.

    Args:
        results: per-(image, draw) rows with ``condition``, ``level``, ``level_unit``, ``method``,
            ``method_kind`` and the metric columns (NaN where a metric is undefined, e.g. defect
            metrics on a defect-free image; NaNs are left out of that metric's mean and ``n``, which
            counts image x draw samples).
        metrics: metric columns to summarise; those the table lacks are left out (``defect_false_alarm``
            exists only when detection was scored).
        ci: confidence level of the interval of the mean (Student t, n - 1 dof), clipped to the
            metric's range (:data:`METRIC_RANGES`) so a small sample never shows a recall above 1.

    Returns:
        Columns ``condition, level, level_unit, method, method_kind, metric, n, mean, std, ci_half``
        (t half-width), ``ci_low, ci_high`` (clipped); rows in the order the groups first appear in ``results``.
    """
    long = results.melt(
        id_vars=[*GROUP_KEYS, "level_unit", "method_kind"],
        value_vars=[m for m in metrics if m in results.columns],
        var_name="metric",
        value_name="value",
    )
    g = long.groupby([*GROUP_KEYS, "level_unit", "method_kind", "metric"], sort=False)["value"]
    out = g.agg(n="count", mean="mean", std="std").reset_index()
    half = _t_half_width(out["std"].to_numpy(), out["n"].to_numpy(), ci)
    lo = out["metric"].map(lambda m: METRIC_RANGES.get(m, (-np.inf, np.inf))[0])
    hi = out["metric"].map(lambda m: METRIC_RANGES.get(m, (-np.inf, np.inf))[1])
    out["ci_half"] = half
    out["ci_low"] = np.maximum(out["mean"] - half, lo)
    out["ci_high"] = np.minimum(out["mean"] + half, hi)
    return out


def paired_deltas(
    results: pd.DataFrame,
    reference: str,
    metrics: Sequence[str] = (
        "psnr",
        "ssim",
        "defect_psnr",
        "defect_recall",
        "defect_contrast",
        "gradient_correlation",
    ),
    ci: float = 0.95,
) -> pd.DataFrame:
    """Paired differences ``method - reference`` for every other method, summarised.

    Pairs are (image, noise draw): rows match on ``image_id`` and, when the table has it, ``noise_seed``
    (:data:`SAMPLE_KEYS`), so ``n`` counts image x draw pairs.

    Returns:
        Columns ``condition, level, level_unit, method, metric, n, mean_delta, ci_low, ci_high,
        method_mean, reference_mean``. Empty when ``reference`` is not among the methods.
    """
    cols = [
        "condition",
        "level",
        "level_unit",
        "method",
        "metric",
        "n",
        "mean_delta",
        "ci_low",
        "ci_high",
        "method_mean",
        "reference_mean",
    ]
    if reference not in set(results["method"]):
        return pd.DataFrame(columns=cols)
    keys = ["condition", "level", "level_unit", *[k for k in SAMPLE_KEYS if k in results.columns]]
    ref = results[results["method"] == reference].set_index(keys)[list(metrics)]
    frames = []
    for method, sub in results[results["method"] != reference].groupby("method", sort=False):
        if sub["method_kind"].iloc[0] == "noisy":
            continue
        a = sub.set_index(keys)[list(metrics)]
        b = ref.reindex(a.index)
        for m in metrics:
            d = pd.DataFrame({"delta": a[m] - b[m], "x": a[m], "r": b[m]}).dropna()
            grp = d.groupby(level=["condition", "level", "level_unit"], sort=False)
            agg = grp.agg(
                n=("delta", "count"),
                mean_delta=("delta", "mean"),
                std=("delta", "std"),
                method_mean=("x", "mean"),
                reference_mean=("r", "mean"),
            ).reset_index()
            half = _t_half_width(agg["std"].to_numpy(), agg["n"].to_numpy(), ci)
            agg["ci_low"] = agg["mean_delta"] - half
            agg["ci_high"] = agg["mean_delta"] + half
            agg["method"] = method
            agg["metric"] = m
            frames.append(agg)
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True)[cols]


def wide_table(
    summary: pd.DataFrame, metric: str, condition: str, methods: Sequence[str], digits: int = 2
) -> pd.DataFrame:
    """``mean ± half-CI`` strings, one row per method and one column per level, for the report.

    The best mean of each column (the highest; for :data:`TARGET_ONE` metrics the closest to 1, for
    :data:`LOWER_BETTER` ones the lowest) is marked with ``**`` (Markdown bold), ignoring the ``noisy``
    input row.
    """
    s = summary[(summary["metric"] == metric) & (summary["condition"] == condition)]
    if s.empty:
        return pd.DataFrame()
    unit = s["level_unit"].iloc[0]
    levels = sorted(s["level"].unique())
    table = pd.DataFrame(index=[m for m in methods if m in set(s["method"])])
    for lv in levels:
        col = s[s["level"] == lv].set_index("method")
        cand = col[col["method_kind"] != "noisy"]["mean"].dropna()
        if metric in TARGET_ONE:
            cand = -(cand - 1.0).abs()
        elif metric in LOWER_BETTER:
            cand = -cand
        best = cand.idxmax() if not cand.empty else None
        cells = []
        for m in table.index:
            if m not in col.index or not np.isfinite(col.loc[m, "mean"]):
                cells.append("n/a")
                continue
            mean, half = col.loc[m, "mean"], col.loc[m, "ci_half"]
            txt = f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if np.isfinite(half) else "")
            cells.append(f"**{txt}**" if m == best else txt)
        table[f"{lv:g} {unit}"] = cells
    table.index.name = "method"
    return table

"""Defect detection with false alarms counted: ROC, AUC and recall at a fixed false-alarm rate.

A detector that fires everywhere finds every defect, so recall alone says little. Here each method's
output is scored at every defect site twice, under the same noise draw: on the image with the defect,
and on the defect-free reference render of the same field (:func:`semray.metrics.defect_site_scores`,
the matched-filter gain: the fraction of the defect's signal present at the site). Per method and dose,
one threshold for all sites turns the two score sets into a detector; sweeping it gives the ROC:

* **false-alarm rate** = fraction of defect-free sites scoring above the threshold (per site);
* **recall** = fraction of defect sites scoring above it;
* **AUC** = probability that a defect site outscores a defect-free one (ties count half);
* **recall at a false-alarm rate** ``alpha``: the threshold is the ``floor(alpha * n) + 1``-th largest
  defect-free score, so at most ``alpha * n`` of the ``n`` defect-free sites lie above it, and recall is
  the fraction of defect sites strictly above it. NaN when ``alpha * n < 1``: fewer sites than the
  rate can be read from.

Confidence intervals are percentile intervals of a cluster bootstrap: whole (image, noise draw) units
are resampled with replacement (their sites together, both hypotheses), and the threshold is re-chosen
in every resample, so the interval includes the threshold's own uncertainty. The resampling seed is
fixed, so an evaluation's numbers are reproducible.

Pure numpy/pandas (no Ray, no models).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

#: False-alarm rates per site at which recall is reported.
FALSE_ALARMS = (1e-2, 1e-3)
#: Columns of a site table: one row per defect site of one image under one noise draw, one method.
SITE_COLUMNS = [
    "condition", "level", "level_unit", "method", "method_kind", "image_id", "noise_seed", "site",
    "score_defect", "score_reference",
]  # fmt: skip
#: Columns of one (image, noise draw) unit: what the bootstrap resamples.
CLUSTER_KEYS = ["image_id", "noise_seed"]
#: Columns of a long summary row, as :func:`semray.evaluation.stats.summarize` writes them.
SUMMARY_COLUMNS = [
    "condition", "level", "level_unit", "method", "method_kind", "metric", "n", "mean", "std", "ci_half",
    "ci_low", "ci_high",
]  # fmt: skip


def recall_key(alpha: float) -> str:
    """Metric name of recall at false-alarm rate ``alpha``: ``"recall_at_fa_0.01"``."""
    return f"recall_at_fa_{alpha:g}"


def auc(score_defect: np.ndarray, score_reference: np.ndarray) -> float:
    """Area under the ROC: ``P(defect score > defect-free score) + P(tie) / 2`` (Mann-Whitney), in [0, 1].

    NaN when either set is empty.
    """
    s1 = np.asarray(score_defect, dtype=np.float64).ravel()
    s0 = np.asarray(score_reference, dtype=np.float64).ravel()
    if s1.size == 0 or s0.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([s1, s0]))  # average ranks: ties count half
    u = ranks[: s1.size].sum() - s1.size * (s1.size + 1) / 2.0
    return float(u / (s1.size * s0.size))


def threshold_at(score_reference: np.ndarray, alpha: float) -> float:
    """The smallest threshold with at most ``alpha * n`` defect-free scores strictly above it (the
    ``floor(alpha * n) + 1``-th largest score); NaN when ``alpha * n < 1``."""
    s0 = np.sort(np.asarray(score_reference, dtype=np.float64).ravel())[::-1]
    k = int(np.floor(alpha * s0.size + 1e-9))
    if k < 1 or k >= s0.size:
        return float("nan")
    return float(s0[k])


def recall_at(score_defect: np.ndarray, score_reference: np.ndarray, alpha: float) -> float:
    """Fraction of defect scores strictly above :func:`threshold_at` ``(score_reference, alpha)``."""
    t = threshold_at(score_reference, alpha)
    s1 = np.asarray(score_defect, dtype=np.float64).ravel()
    if not np.isfinite(t) or s1.size == 0:
        return float("nan")
    return float(np.mean(s1 > t))


def roc_curve(score_defect: np.ndarray, score_reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(false_alarm, recall)`` at every distinct threshold, false-alarm rate increasing from 0 to 1
    (float64 arrays of one length; detection means a score strictly above the threshold)."""
    s1 = np.asarray(score_defect, dtype=np.float64).ravel()
    s0 = np.asarray(score_reference, dtype=np.float64).ravel()
    t = np.unique(np.concatenate([s1, s0, [-np.inf]]))[::-1]
    fa = 1.0 - np.searchsorted(np.sort(s0), t, side="right") / max(s0.size, 1)
    rec = 1.0 - np.searchsorted(np.sort(s1), t, side="right") / max(s1.size, 1)
    return fa, rec


def _stats(sites: pd.DataFrame, alphas: Sequence[float]) -> np.ndarray:
    s1, s0 = sites["score_defect"].to_numpy(float), sites["score_reference"].to_numpy(float)
    return np.array([auc(s1, s0), *[recall_at(s1, s0, a) for a in alphas]])


def cluster_bootstrap(
    frame: pd.DataFrame,
    stat: Callable[[pd.DataFrame], np.ndarray],
    n_boot: int,
    ci: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(value, ci_low, ci_high)``: ``stat(frame)`` (a float array) and its percentile interval over
    ``n_boot`` resamples of whole (image, noise draw) units (:data:`CLUSTER_KEYS`) with replacement.

    Bounds are NaN where the value is, where every resample is, when ``n_boot`` is 0 or when there is a
    single unit.
    """
    value = np.asarray(stat(frame), dtype=np.float64)
    nan = np.full_like(value, np.nan)
    groups = list(frame.groupby(CLUSTER_KEYS, sort=False).indices.values())
    if n_boot <= 0 or len(groups) < 2:
        return value, nan, nan
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            stat(frame.iloc[np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])])
            for _ in range(n_boot)
        ],
        dtype=np.float64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: rates no resample resolves
        lo, hi = np.nanquantile(draws, [0.5 - ci / 2.0, 0.5 + ci / 2.0], axis=0)
    ok = np.isfinite(value)
    return value, np.where(ok, lo, np.nan), np.where(ok, hi, np.nan)


def detection_summary(
    sites: pd.DataFrame,
    alphas: Sequence[float] = FALSE_ALARMS,
    ci: float = 0.95,
    n_boot: int = 500,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (condition, level, method): AUC and recall at each false-alarm rate, as summary rows.

    Args:
        sites: a site table (:data:`SITE_COLUMNS`).
        alphas: false-alarm rates per site.
        ci: confidence level of the bootstrap interval.
        n_boot: bootstrap resamples (0: no intervals).
        seed: the resampling seed.

    Returns:
        Rows in the :func:`semray.evaluation.stats.summarize` format (:data:`SUMMARY_COLUMNS`), metrics
        ``detection_auc`` and :func:`recall_key` per alpha; ``n`` = defect sites (each also scored
        defect-free), ``std`` NaN, ``ci_half`` half the interval's width (the interval itself need not
        be symmetric: ``ci_low``/``ci_high`` are exact).
    """
    names = ["detection_auc", *[recall_key(a) for a in alphas]]
    rows = []
    keys = ["condition", "level", "level_unit", "method", "method_kind"]
    for key, g in sites.groupby(keys, sort=False):
        value, lo, hi = cluster_bootstrap(g, lambda f: _stats(f, alphas), n_boot, ci, seed)
        for name, v, low, high in zip(names, value, lo, hi, strict=True):
            half = (high - low) / 2.0 if np.isfinite(low) else np.nan
            rows.append([*key, name, len(g), v, np.nan, half, low, high])
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def site_rows(
    facts: dict[str, object], score_defect: np.ndarray, score_reference: np.ndarray
) -> list[dict[str, object]]:
    """Site-table rows (:data:`SITE_COLUMNS`) of one image under one draw and method: ``facts`` holds
    the other columns, ``site`` numbers the measurable instances in label order."""
    return [
        {**facts, "site": k, "score_defect": float(s1), "score_reference": float(s0)}
        for k, (s1, s0) in enumerate(zip(score_defect, score_reference, strict=True))
    ]


def score_output(
    clean: np.ndarray,
    output: np.ndarray,
    defect_mask: np.ndarray | None,
    reference: np.ndarray | None,
    output_reference: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Everything the evaluation measures on one method output (the unit of work of a metrics task).

    Args:
        clean, output: float ``(H, W)`` in [0, 1]: the clean image and the method's output on its noisy
            version.
        defect_mask, reference: the image's bool ``(H, W)`` defect mask and defect-free render (or None).
        output_reference: the method's output on the noisy ``reference`` (same noise draw), or None.

    Returns:
        ``(metrics, sites)``: :func:`semray.metrics.compute_metrics` (with ``defect_false_alarm`` when
        ``output_reference`` is given) and float64 ``(2, n)``: the matched-filter gain
        (:func:`semray.metrics.defect_site_scores`) of ``output`` and of ``output_reference`` at each of
        the ``n`` measurable defect sites (``(2, 0)`` without ``output_reference``).
    """
    from semray.metrics import compute_metrics, defect_site_scores

    metrics = compute_metrics(clean, output, defect_mask, reference, output_reference)
    if output_reference is None or reference is None or defect_mask is None:
        return metrics, np.zeros((2, 0))
    s1 = defect_site_scores(clean, output, defect_mask, reference)
    s0 = defect_site_scores(clean, output_reference, defect_mask, reference)
    return metrics, np.stack([s1, s0])

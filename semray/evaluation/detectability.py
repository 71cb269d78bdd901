"""How visible each test defect is in the noise at all: an upper bound on any method's defect recall.

At a low dose a defect can be buried so deep in shot noise that no denoiser, however good, can tell it
from noise. The ideal observer (:func:`semray.metrics.defect_detectability`) knows the defect's shape,
place and background exactly and uses the prewhitened matched filter, so its recall bounds what any
denoiser + detector can reach on the same images at the same noise level. Its noise is the per-pixel
Poisson-Gaussian variance ``a * I + b`` of shot, detector-gain and read noise with each image's own
noise parameters (:func:`semray.evaluation.testset.noise_params`); the scan-line, drift, charging and
jitter terms only add to the noise, so leaving them out keeps the bound optimistic. ``a * I + b`` is the
variance before the ADC: the default ``clip`` window censors it near 0 and 1 at low dose, which only
removes information, so the bound stays an upper bound; the ``headroom`` window rescales signal and
noise alike, which leaves ``d'`` unchanged. The detector-bandwidth component (off by default) makes the
noise correlated, which this white-noise observer does not model. At a few counts per
pixel the noise is Poisson rather than Gaussian, but the matched filter sums tens of pixels per defect,
so its output is close to normal (central limit) and ``d'`` is its signal-to-noise ratio.

Pure numpy/pandas (no Ray, no models): the evaluation's test images and conditions in, a table out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from semray.evaluation.testset import Condition, TestImage, noise_params
from semray.metrics import defect_detectability, ideal_observer_recall
from semray.noise import poisson_gaussian_coefficients

#: d' needed for reliable detection by the Rose criterion (Rose 1948; used throughout SEM imaging).
ROSE_DPRIME = 5.0
#: False-alarm probability per known defect site of the ideal observer (threshold 3.09 sigma).
FALSE_ALARM = 1e-3

COLUMNS = ["condition", "level", "image_id", "n_defects", "dprime_median", "ideal_recall", "rose_fraction"]
SUMMARY_COLUMNS = ["condition", "level", "images", "defects", "ideal_recall", "rose_fraction"]


def noise_variance(image: TestImage, cond: Condition, level: float, seed: int) -> np.ndarray | float:
    """Per-pixel noise variance of ``image`` under ``cond`` at ``level`` (intensity units squared).

    Physical kinds: ``a * I + b`` with ``I`` the mean of the clean and reference intensities (the
    two hypotheses the observer weighs), float64 ``(H, W)``. Gaussian kind: ``level ** 2``.
    """
    if cond.kind == "gaussian":
        return float(level) ** 2
    a, b = poisson_gaussian_coefficients(noise_params(cond, level, seed, image.image_id))
    assert image.reference is not None
    mean_intensity = 0.5 * (image.clean.astype(np.float64) + image.reference.astype(np.float64))
    return a * mean_intensity + b


def detectability_table(
    images: Sequence[TestImage],
    conditions: Sequence[Condition],
    seed: int,
    false_alarm: float = FALSE_ALARM,
) -> pd.DataFrame:
    """The ideal observer on every image with measurable defects, every condition and level.

    Args:
        images: test images; those without a reference or without measurable defects are skipped.
        conditions: noise conditions (:func:`semray.evaluation.testset.build_conditions`).
        seed: the noise seed of one draw (picks each image's noise parameters, as for the noisy images).
        false_alarm: the observer's false-alarm probability per defect site.

    Returns:
        One row per (condition, level, image): ``n_defects`` scored (the instances
        :func:`semray.metrics.defect_recall` scores), ``dprime_median``, ``ideal_recall`` (expected
        fraction found, :func:`semray.metrics.ideal_observer_recall`) and ``rose_fraction`` (fraction
        with ``d' >= 5``). Columns :data:`COLUMNS`; empty when no image has a measurable defect.
    """
    rows = []
    for cond in conditions:
        for level in cond.levels:
            for im in images:
                if im.reference is None or not im.defect_mask.any():
                    continue
                var = noise_variance(im, cond, level, seed)
                d = defect_detectability(im.clean, im.reference, im.defect_mask, var)
                if d.size == 0:
                    continue
                rows.append(
                    {
                        "condition": cond.name,
                        "level": float(level),
                        "image_id": im.image_id,
                        "n_defects": int(d.size),
                        "dprime_median": float(np.median(d)),
                        "ideal_recall": ideal_observer_recall(d, false_alarm),
                        "rose_fraction": float(np.mean(d >= ROSE_DPRIME)),
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, level): ``ideal_recall`` averaged over images, as the evaluation averages
    ``defect_recall`` (per image first), and ``rose_fraction`` over all defects pooled. Rows of several
    noise draws concatenated count once per (image, draw), in ``images`` and ``defects`` too.

    Returns:
        Columns :data:`SUMMARY_COLUMNS`.
    """
    if table.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    t = table.assign(rose_count=table["rose_fraction"] * table["n_defects"])
    g = t.groupby(["condition", "level"], sort=False)
    out = g.agg(
        images=("image_id", "size"),
        defects=("n_defects", "sum"),
        ideal_recall=("ideal_recall", "mean"),
        rose_count=("rose_count", "sum"),
    ).reset_index()
    out["rose_fraction"] = out.pop("rose_count") / out["defects"]
    return out

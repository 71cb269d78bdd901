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

**At a fixed false-alarm rate** (what :mod:`semray.evaluation.detection` measures for every method):
a method's detector is one threshold over all defect sites of a dose, so the bound is the best mean
recall at a mean false-alarm rate ``alpha`` per site over the same sites. Given the whole noisy image,
the most powerful such rule (Neyman-Pearson) thresholds each site's likelihood ratio at one common
level; with ``z ~ N(0, 1)`` without the defect and ``N(d', 1)`` with it, its log is
``d' * z - d' ** 2 / 2``, and :func:`pooled_ideal_recall` solves the common level for ``alpha``
analytically. Its assumptions: the defect's shape, place and background are known; the noise is
independent per pixel and Gaussian with the Poisson-Gaussian variance above (the scan-line, drift,
charging, jitter and quantisation terms left out). It bounds the recall at that false-alarm rate of any
method + detector that sees only the noisy image, under those assumptions.

**Checked by Monte Carlo** (:func:`monte_carlo_sites`): the same matched filter and likelihood-ratio
statistic run on images drawn under the full noise model (:func:`semray.noise.apply_noise`, every term
on, the evaluation's own noise parameters), with and without the defect, and the threshold read from
the defect-free draws. At low doses, where Poisson counts are far from Gaussian and the left-out terms
weigh most, the two can differ; both are reported.

Pure numpy/pandas (no Ray, no models): the evaluation's test images and conditions in, a table out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.special import ndtr

from semray.evaluation.detection import SITE_COLUMNS, cluster_bootstrap, recall_at, recall_key
from semray.evaluation.testset import Condition, TestImage, noise_params
from semray.metrics import defect_detectability, defect_site_scores, ideal_observer_recall
from semray.noise import apply_noise, image_rng, poisson_gaussian_coefficients

#: d' needed for reliable detection by the Rose criterion (Rose 1948; used throughout SEM imaging).
ROSE_DPRIME = 5.0
#: False-alarm probability per known defect site of the ideal observer (threshold 3.09 sigma).
FALSE_ALARM = 1e-3

COLUMNS = [
    "condition", "level", "image_id", "noise_seed", "n_defects", "dprime_median", "ideal_recall",
    "rose_fraction",
]  # fmt: skip
#: Label of the Monte Carlo ideal observer in site tables.
MC_METHOD = "ideal observer (MC)"
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


def _measurable_dprimes(
    images: Sequence[TestImage], conditions: Sequence[Condition], seed: int
) -> Iterator[tuple[Condition, float, TestImage, np.ndarray]]:
    """``(condition, level, image, d')`` for every image with a reference and a defect, in the order
    condition, level, image; ``d'`` is float64 of shape (n_sites,), possibly empty."""
    for cond in conditions:
        for level in cond.levels:
            for im in images:
                if im.reference is None or not im.defect_mask.any():
                    continue
                var = noise_variance(im, cond, level, seed)
                yield cond, level, im, defect_detectability(im.clean, im.reference, im.defect_mask, var)


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
    for cond, level, im, d in _measurable_dprimes(images, conditions, seed):
        if d.size == 0:
            continue
        rows.append(
            {
                "condition": cond.name,
                "level": float(level),
                "image_id": im.image_id,
                "noise_seed": int(seed),
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


# ------------------------------------------------------------------------ at a fixed false-alarm rate
def _pooled_rates(d: np.ndarray, c: float) -> tuple[float, float]:
    """Mean false-alarm rate and recall when every site's log likelihood ratio is thresholded at ``c``."""
    tau = c / d + d / 2.0  # the z threshold of each site
    return float(np.mean(ndtr(-tau))), float(np.mean(ndtr(d - tau)))


def pooled_ideal_recall(dprime: np.ndarray, false_alarm: float) -> float:
    """The ideal observer's mean recall at mean false-alarm rate ``false_alarm`` per site, in [0, 1].

    One common threshold on the log likelihood ratio ``d' z - d' ** 2 / 2`` of every site (the
    Neyman-Pearson optimum for the pooled rates), solved by bisection; equal ``d'`` everywhere gives
    :func:`semray.metrics.ideal_observer_recall`. NaN without sites.
    """
    d = np.maximum(np.asarray(dprime, dtype=np.float64).ravel(), 1e-9)
    if d.size == 0:
        return float("nan")
    lo, hi = -1e4 * (1.0 + d.max() ** 2), 1e4 * (1.0 + d.max() ** 2)
    for _ in range(100):  # false alarms fall as c rises
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _pooled_rates(d, mid)[0] > false_alarm else (lo, mid)
    return _pooled_rates(d, hi)[1]


def ideal_roc(dprime: np.ndarray, n_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The ideal observer's pooled ROC: ``(false_alarm, recall)`` at log-spaced false-alarm rates from
    1e-4 to 1 (float64 ``(n_points,)`` each)."""
    fa = np.logspace(-4, 0, n_points)
    return fa, np.array([pooled_ideal_recall(dprime, a) if a < 1 else 1.0 for a in fa])


def dprime_sites(images: Sequence[TestImage], conditions: Sequence[Condition], seed: int) -> pd.DataFrame:
    """``d'`` of every measurable defect site: columns ``condition, level, image_id, noise_seed, site,
    dprime`` (the sites :func:`semray.metrics.defect_site_scores` scores, in the same order)."""
    rows = [
        (cond.name, float(level), im.image_id, int(seed), k, float(x))
        for cond, level, im, d in _measurable_dprimes(images, conditions, seed)
        for k, x in enumerate(d)
    ]
    return pd.DataFrame(rows, columns=["condition", "level", "image_id", "noise_seed", "site", "dprime"])


def monte_carlo_sites(
    images: Sequence[TestImage], cond: Condition, level: float, seed: int, draws: int
) -> pd.DataFrame:
    """The ideal observer's statistic on ``draws`` simulated noise draws per image, a site table.

    Each draw renders the image with and without its defect through the full noise model
    (:func:`semray.noise.apply_noise` with the evaluation's parameters of that image, draw ``seed`` and
    ``level``; one random stream per draw, the same for both renders), applies the prewhitened matched
    filter (:func:`semray.metrics.defect_site_scores` with :func:`noise_variance`) and scores each site
    by its log likelihood ratio ``d' z - d' ** 2 / 2`` under the Gaussian model. Columns
    :data:`semray.evaluation.detection.SITE_COLUMNS` (method :data:`MC_METHOD`) plus ``mc_draw``; an
    (image, draw) unit keeps its ``image_id`` and ``noise_seed``, so the bootstrap resamples it whole.
    Written for the default ``clip`` ADC window: under ``headroom`` the draws are on another scale than
    ``clean``/``reference`` and this check does not apply.
    """
    rows = []
    for im in images:
        if im.reference is None or not im.defect_mask.any():
            continue
        params = noise_params(cond, level, seed, im.image_id)
        var = noise_variance(im, cond, level, seed)
        d = defect_detectability(im.clean, im.reference, im.defect_mask, var)
        for k in range(draws):
            key = f"{im.image_id}|{cond.name}|{level:g}|mc{k}"
            z1 = defect_site_scores(im.clean, apply_noise(im.clean, params, image_rng(seed, key)),
                                    im.defect_mask, im.reference, var)  # fmt: skip
            z0 = defect_site_scores(im.clean, apply_noise(im.reference, params, image_rng(seed, key)),
                                    im.defect_mask, im.reference, var)  # fmt: skip
            for j, (a, b, dj) in enumerate(zip(z1, z0, d, strict=True)):
                rows.append(
                    (cond.name, float(level), cond.level_unit, MC_METHOD, "bound", im.image_id, int(seed), j,
                     dj * a - dj**2 / 2, dj * b - dj**2 / 2, k)
                )  # fmt: skip
    return pd.DataFrame(rows, columns=[*SITE_COLUMNS, "mc_draw"])


def bound_at_false_alarms(
    dsites: pd.DataFrame,
    mc_sites: pd.DataFrame,
    alphas: Sequence[float],
    ci: float = 0.95,
    n_boot: int = 500,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (condition, level): the analytic ideal observer's recall at each false-alarm rate
    (``ideal_<recall_key>``) and the Monte Carlo one (``mc_<recall_key>``, NaN where no Monte Carlo
    ran), each with ``_low``/``_high`` bootstrap bounds over (image, draw) units, and ``mc_draws``."""
    rows = []
    for (cname, level), g in dsites.groupby(["condition", "level"], sort=False):
        row: dict[str, object] = {"condition": cname, "level": level}
        an = cluster_bootstrap(
            g,
            lambda f: np.array([pooled_ideal_recall(f["dprime"].to_numpy(), a) for a in alphas]),
            n_boot,
            ci,
            seed,
        )
        mc = (
            mc_sites[(mc_sites["condition"] == cname) & (mc_sites["level"] == level)]
            if len(mc_sites)
            else mc_sites
        )
        if len(mc):
            sim = cluster_bootstrap(
                mc,
                lambda f: np.array([recall_at(f["score_defect"], f["score_reference"], a) for a in alphas]),
                n_boot, ci, seed,
            )  # fmt: skip
        else:
            sim = tuple(np.full(len(alphas), np.nan) for _ in range(3))
        for i, a in enumerate(alphas):
            for prefix, (v, lo, hi) in (("ideal_", an), ("mc_", sim)):
                key = prefix + recall_key(a)
                row.update({key: v[i], f"{key}_low": lo[i], f"{key}_high": hi[i]})
        row["mc_draws"] = int(mc["mc_draw"].max() + 1) if len(mc) else 0
        rows.append(row)
    return pd.DataFrame(rows)

"""What the evaluation report says: its sections as blocks, built from an evaluation's tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from semray.config.evaluate import EvaluateConfig
from semray.evaluation.report import SECTIONS, Block, Heading, Image, Para, Table
from semray.evaluation.result import EvaluationResult
from semray.evaluation.stats import METRICS, metric_name, wide_table
from semray.evaluation.testset import MAIN_CONDITION, Condition

#: Metrics shown as tables for the out-of-generator conditions (the main sweep shows all of METRICS).
ROBUSTNESS_METRICS = ("psnr", "ssim", "defect_psnr", "defect_recall", "recall_at_fa_0.01", "detection_auc")
DELTA_METRICS = ("psnr", "ssim", "defect_psnr", "defect_recall", "defect_contrast")


def _fmt_delta(row: pd.Series, digits: int) -> str:
    mean, lo, hi = row["mean_delta"], row["ci_low"], row["ci_high"]
    if not np.isfinite(mean):
        return "n/a"
    ci = f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if np.isfinite(lo) else ""
    return f"{mean:+.{digits}f}{ci}"


def delta_table(deltas: pd.DataFrame, metric: str, condition: str, digits: int = 3) -> pd.DataFrame:
    """Paired ``method - reference`` mean and CI, one row per method, one column per level."""
    d = deltas[(deltas["metric"] == metric) & (deltas["condition"] == condition)]
    if d.empty:
        return pd.DataFrame()
    unit = d["level_unit"].iloc[0]
    methods = list(dict.fromkeys(d["method"]))
    table = pd.DataFrame(index=methods)
    for lv in sorted(d["level"].unique()):
        col = d[d["level"] == lv].set_index("method")
        table[f"{lv:g} {unit}"] = [
            _fmt_delta(col.loc[m], digits) if m in col.index else "n/a" for m in methods
        ]
    table.index.name = "method"
    return table


def delta_verdict(mean: float, lo: float, hi: float) -> str:
    """``better`` / ``worse`` (the paired CI excludes 0), ``identical`` (every paired delta 0, so mean and
    CI are exactly 0), ``not significantly different`` (the CI spans 0) or ``not compared`` (no mean)."""
    if not np.isfinite(mean):
        return "not compared"
    if mean == 0 and lo == 0 and hi == 0:
        return "identical"
    if np.isfinite(lo) and lo > 0:
        return "better"
    if np.isfinite(hi) and hi < 0:
        return "worse"
    return "not significantly different"


def verdict_text(deltas: pd.DataFrame, ref: str, methods: Sequence[str], metric: str = "psnr") -> str:
    """One Markdown line per method of ``methods``: which is better than ``ref`` on ``metric`` at each
    level of the main condition (:func:`delta_verdict` of the paired mean and CI); empty if none."""
    d = deltas[(deltas["metric"] == metric) & (deltas["condition"] == MAIN_CONDITION)]
    lines = []
    for m in methods:
        rows = d[d["method"] == m].sort_values("level")
        parts = [
            f"{delta_verdict(r['mean_delta'], r['ci_low'], r['ci_high'])} at {r['level']:g} {r['level_unit']} "
            f"({_fmt_delta(r, 2)})"
            for _, r in rows.iterrows()
        ]
        if parts:
            lines.append(f"**{m} vs {ref} ({METRICS[metric]}):** " + "; ".join(parts) + ".")
    return "\n\n".join(lines)


def bound_table(bound: pd.DataFrame, condition: str, unit: str) -> pd.DataFrame:
    """The ideal-observer bound of ``condition`` as report rows, one column per level (like
    :func:`~semray.evaluation.stats.wide_table`): recall at each false-alarm rate, analytic and Monte
    Carlo with their CIs (where computed), the old per-site 1e-3 figure and the Rose fraction; empty
    when there is none."""
    if bound.empty:
        return bound
    b = bound[bound["condition"] == condition].sort_values("level")
    if b.empty:
        return pd.DataFrame()
    rows: dict[str, list[str]] = {}
    for col in [c for c in b.columns if c.startswith(("ideal_recall_at_fa_", "mc_recall_at_fa_"))]:
        if col.endswith(("_low", "_high")):
            continue
        kind = "analytic" if col.startswith("ideal_") else "Monte Carlo, full noise model"
        rate = col.split("recall_at_fa_")[1]
        rows[f"ideal observer recall at {rate} false alarms/site ({kind})"] = [
            _fmt_ci(v, lo, hi) for v, lo, hi in zip(b[col], b[f"{col}_low"], b[f"{col}_high"], strict=True)
        ]
    rows["ideal observer recall, 1e-3 per site, each site its own threshold"] = [
        f"{v:.3f}" for v in b["ideal_recall"]
    ]
    rows["defects with d' >= 5"] = [f"{v:.3f}" for v in b["rose_fraction"]]
    table = pd.DataFrame(
        list(rows.values()), index=list(rows), columns=[f"{lv:g} {unit}" for lv in b["level"]]
    )
    table.index.name = "bound"
    return table


def _fmt_ci(v: float, lo: float, hi: float) -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")


BOUND_NOTE = (
    "The ideal observer knows each defect's shape, place and background and applies the prewhitened matched "
    "filter to the noisy image. At a false-alarm rate per site it thresholds every site's likelihood ratio "
    "at one common level (the Neyman-Pearson optimum for the pooled rates), so its recall bounds any method's "
    "at that rate: analytic under independent Gaussian noise with the shot, detector-gain and read-noise "
    "variance of each image (the other noise terms are left out, which keeps it optimistic), and checked by "
    "Monte Carlo, the same filter on images drawn under the full noise model with the threshold read from "
    "defect-free draws, at the low doses where the Gaussian approximation is weakest. CIs: bootstrap over "
    "(image, draw) units. d' >= 5 is the Rose criterion (`semray.evaluation.detectability`)."
)

DETECTION_NOTE = (
    "**Detection with false alarms counted.** Each method also denoised the defect-free reference render "
    "of every image with defects under the same noise draw; at each defect site its output is scored by the "
    "matched-filter gain (the fraction of the defect's signal present, `semray.metrics.defect_site_scores`) "
    "with and without the defect. One threshold per method and dose gives the ROC: the AUC, and the recall "
    "at 1e-2 and 1e-3 false alarms per site (threshold read from the defect-free sites; n/a when there are "
    "fewer than 1/rate of them). Intervals: percentile bootstrap over (image, draw) units, threshold re-chosen "
    "in each resample (± shows half the interval's width). `defect recall (no false-alarm control)` is the "
    "older fixed detector, whose false-alarm rate on the same defect-free sites is in the next table."
)


def _noise_text(cfg: EvaluateConfig) -> str:
    """The noise seed(s) for the Setup section, and how several draws are pooled."""
    seeds = cfg.noise_seeds()
    if len(seeds) == 1:
        return f"noise seed {seeds[0]}."
    return (
        f"{len(seeds)} noise draws per image (noise seeds {seeds[0]} to {seeds[-1]}): every image is scored "
        "under each draw, and every mean, CI and paired difference is over image x draw samples, paired "
        "on (image, draw). The CIs treat these samples as independent, so they are slightly narrow (the "
        "draws of one image share its content)."
    )


def _samples_text(cfg: EvaluateConfig) -> str:
    """What one sample of a cell is: ``"test images"``, or ``"test images x N noise draws"``."""
    return "test images" if cfg.noise_draws == 1 else f"test images x {cfg.noise_draws} noise draws"


def _methods_table(meta: Mapping) -> pd.DataFrame:
    rows = []
    for m in meta["methods"]:
        source = m.get("spec") or ("semray.classical" if m["kind"] == "classical" else "input")
        params = m.get("params") or {}
        rows.append(
            {
                "method": m["label"],
                "kind": m["kind"],
                "version": m.get("version") or "",
                "source": source,
                "device": m.get("device", "cpu"),
                "overrides": ", ".join(f"{k}={v}" for k, v in params.items()),
                "noise level given": "true std (oracle)"
                if m["oracle_sigma"]
                else ("estimated from the image" if m["kind"] == "classical" else "-"),
            }
        )
    return pd.DataFrame(rows).set_index("method")


def report_blocks(
    cfg: EvaluateConfig,
    result: EvaluationResult,
    conditions: Sequence[Condition],
    figures: Mapping[str, Path],
) -> list[Block]:
    """The report's blocks, sections in :data:`SECTIONS` order."""
    meta = result.meta
    n_levels = sum(len(c.levels) for c in conditions)
    return [
        Heading("semray evaluation", 1),
        *[Para(note) for note in cfg.report.notes],
        Para(
            f"{len(meta['methods'])} methods x {len(METRICS)} metrics x {n_levels} noise "
            f"levels on {meta['test_set']['n_images']} {_samples_text(cfg)}. Created {meta['created']} with "
            f"semray {meta['machine']['semray_version']}."
        ),
        *setup_blocks(cfg, meta, conditions),
        *results_blocks(cfg, result, conditions[0], figures),
        *comparison_blocks(cfg, result),
        *robustness_blocks(result, conditions, figures),
        *runtime_blocks(cfg, result, figures),
        *examples_blocks(cfg, meta, figures),
        *files_blocks(meta),
    ]


def _methods_of(meta: Mapping) -> list[str]:
    return [m["label"] for m in meta["methods"]]


def setup_blocks(cfg: EvaluateConfig, meta: Mapping, conditions: Sequence[Condition]) -> list[Block]:
    """Section "Setup": test set, noise, what noise level the methods see, the methods table."""
    ts = meta["test_set"]
    dose_txt = ", ".join(f"{d:g}" for d in conditions[0].levels)
    oracle = any(m["oracle_sigma"] for m in meta["methods"])
    robust = ""
    if len(conditions) > 1:
        robust = (
            " Out-of-generator conditions: "
            + "; ".join(
                f"{c.name} ({c.kind}, levels {', '.join(f'{x:g}' for x in c.levels)} {c.level_unit})"
                for c in conditions[1:]
            )
            + "."
        )
    return [
        Heading(SECTIONS[0]),
        Para(
            f"**Test set:** {ts['source']}, split `{ts['split']}`: {ts['n_images']} images "
            f"({', '.join(ts['shapes'])} px; patterns {ts['patterns']}), {ts['images_with_defects']} with "
            f"defects ({ts['defects']} defects). Defect metrics use the defect-free reference render"
            + (" of each image." if ts["with_reference"] else " where the shards have one.")
            + f"\n\n**Noise:** the generator's physical SEM noise model at doses {dose_txt} e-/px (other "
            f"noise parameters drawn per image and held fixed across doses), {_noise_text(cfg)}"
            + robust
            + "\n\n**Noise level seen by the methods:** no method sees the clean image; classical methods "
            "estimate the noise std from each noisy image (wavelet MAD)."
            + (
                " **Rows labelled `+oracle` were given the true noise std measured from (noisy - clean): an "
                "upper bound that no user has, shown for reference only.**"
                if oracle
                else " No oracle noise level was used."
            )
        ),
        Table(_methods_table(meta), "methods compared"),
    ]


def results_blocks(
    cfg: EvaluateConfig, result: EvaluationResult, main: Condition, figures: Mapping[str, Path]
) -> list[Block]:
    """Section "Results by dose": one table per metric, the recall bound, the metric curves."""
    methods = _methods_of(result.meta)
    b: list[Block] = [
        Heading(SECTIONS[1]),
        Para(
            f"Mean over {_samples_text(cfg)} ± half-width of the "
            f"{cfg.report.ci:.0%} confidence interval of the mean (Student t). Higher is better for every "
            "metric except defect contrast, where 1 (the defect kept at full strength) is best, and false "
            "alarms, where lower is better; the best "
            "denoiser of each column is in bold. `noisy` is the unprocessed input."
        ),
    ]
    shown = set(result.summary["metric"]) if "metric" in result.summary else set()
    for metric in [*METRICS, *sorted(shown - set(METRICS))]:
        if metric not in shown:
            continue
        if metric == "detection_auc":
            b.append(Para(DETECTION_NOTE))
        b.append(
            Table(
                wide_table(result.summary, metric, MAIN_CONDITION, methods, 3 if metric != "psnr" else 2),
                metric_name(metric),
            )
        )
    bound = bound_table(result.recall_bound, MAIN_CONDITION, main.level_unit)
    if not bound.empty:
        b += [Para(BOUND_NOTE), Table(bound, "defect detection: ideal-observer bound")]
    if f"curves_{MAIN_CONDITION}" in figures:
        b.append(Image(figures[f"curves_{MAIN_CONDITION}"], "image quality and defect detection vs dose"))
    if f"roc_{MAIN_CONDITION}" in figures:
        b.append(Image(figures[f"roc_{MAIN_CONDITION}"], "detection ROC per dose, with the ideal observer"))
    return b


def comparison_blocks(cfg: EvaluateConfig, result: EvaluationResult) -> list[Block]:
    """Section "Comparison with the reference method": paired differences per metric."""
    ref = cfg.report.reference_method
    b: list[Block] = [Heading(SECTIONS[2])]
    if not (ref and not result.deltas.empty):
        b.append(
            Para(f"No reference comparison: reference method {ref!r} was not among the methods evaluated.")
        )
        return b
    b.append(
        Para(
            f"Paired {'per-image' if cfg.noise_draws == 1 else 'per-(image, draw)'} differences "
            f"`method - {ref}` on the same images and noise: mean [{cfg.report.ci:.0%} CI]. Positive "
            f"means better than {ref}."
        )
    )
    models = [m["label"] for m in result.meta["methods"] if m["kind"] == "model" and m["label"] != ref]
    if verdict := verdict_text(result.deltas, ref, models):
        b.append(Para(verdict))
    for metric in DELTA_METRICS:
        b.append(
            Table(delta_table(result.deltas, metric, MAIN_CONDITION), f"delta {METRICS[metric]} vs {ref}")
        )
    return b


def robustness_blocks(
    result: EvaluationResult, conditions: Sequence[Condition], figures: Mapping[str, Path]
) -> list[Block]:
    """Section "Robustness": per out-of-generator condition, its tables, bound and curves."""
    methods = _methods_of(result.meta)
    b: list[Block] = [Heading(SECTIONS[3])]
    if len(conditions) == 1:
        b.append(
            Para("No out-of-generator noise was configured (see `robustness` in the evaluation config).")
        )
    for cond in conditions[1:]:
        b.append(Heading(f"{cond.name} ({cond.kind})", 3))
        for metric in [m for m in ROBUSTNESS_METRICS if m in set(result.summary.get("metric", []))]:
            b.append(
                Table(
                    wide_table(result.summary, metric, cond.name, methods, 3 if metric != "psnr" else 2),
                    f"{metric_name(metric)}, {cond.name}",
                )
            )
        bound = bound_table(result.recall_bound, cond.name, cond.level_unit)
        if not bound.empty:
            b.append(Table(bound, f"defect recall bound, {cond.name}"))
        if f"curves_{cond.name}" in figures:
            b.append(Image(figures[f"curves_{cond.name}"], f"metrics vs level, {cond.name} noise"))
        if f"roc_{cond.name}" in figures:
            b.append(Image(figures[f"roc_{cond.name}"], f"detection ROC, {cond.name} noise"))
    return b


def runtime_blocks(cfg: EvaluateConfig, result: EvaluationResult, figures: Mapping[str, Path]) -> list[Block]:
    """Section "Runtime": how it was timed, the table and the bar chart."""
    b: list[Block] = [Heading(SECTIONS[4])]
    rt = result.runtime
    if rt.empty:
        b.append(Para("Runtime measurement was switched off (`runtime.enabled: false`)."))
        return b
    mach = result.meta["machine"]
    b.append(
        Para(
            f"Median wall time of {cfg.runtime.repeats} runs after one warm-up on one {rt['image_px'].iloc[0]} px "
            f"noisy image, every method limited to {cfg.runtime.threads} CPU thread(s) (torch and BLAS/OpenMP), "
            f"same machine: {mach['processor']}, {mach['cpu_count']} logical CPUs, {mach['platform']}. Classical "
            "times include the noise-level estimate; model times include tiling and run on the device listed "
            "under Setup."
        )
    )
    shown = rt.drop(columns=["image_px", "threads", "repeats"], errors="ignore").set_index("method")
    b.append(Table(shown.round(4), "runtime per megapixel"))
    if "runtime" in figures:
        b.append(Image(figures["runtime"], "seconds per megapixel (log scale)"))
    return b


def examples_blocks(cfg: EvaluateConfig, meta: Mapping, figures: Mapping[str, Path]) -> list[Block]:
    """Section "Visual examples"."""
    b: list[Block] = [Heading(SECTIONS[5])]
    if "examples" not in figures:
        b.append(Para("No visual examples were requested (`report.n_examples: 0`)."))
        return b
    b.append(
        Para(
            f"At {meta['example_level']:g} e-/px"
            + ("" if cfg.noise_draws == 1 else f", first noise draw (seed {cfg.seed})")
            + ". Per image: full frames; |image - clean| on one colour "
            "scale per image; a zoomed crop around the largest defect (mask outlined in red on the clean "
            "crop, crop box in red on the clean frame)."
        )
    )
    b.append(Image(figures["examples"], "noisy | each method | clean"))
    return b


def files_blocks(meta: Mapping) -> list[Block]:
    """Section "Files": what each output file holds, and the MLflow run."""
    return [
        Heading(SECTIONS[6]),
        Para(
            "`results.parquet` / `results.csv`: one row per image x noise draw (`noise_seed`) x method x "
            "condition x level; "
            "`summary.csv`: mean/std/CI per cell; `deltas.csv`: paired differences vs the reference; "
            "`runtime.csv`; `recall_bound.csv`: the ideal-observer recall bound per condition x level; "
            "`detection_sites.parquet`: each method's matched-filter score at every defect site with and "
            "without the defect (and the Monte Carlo ideal observer's, `mc_draw` >= 0); "
            "`config.yaml`: the full config; `evaluation.json`: setup facts; `figures/`."
            + (
                f"\n\nMLflow run `{meta['mlflow']['run_id']}` in experiment `{meta['mlflow']['experiment']}` "
                f"({meta['mlflow']['tracking_uri']})."
                if meta.get("mlflow")
                else ""
            )
        ),
    ]

"""Scores and paired comparisons of the "another microscope" benchmark (benchmarks/adapt.py): per-image
PSNR / SSIM / defect-region PSNR against the truth, paired differences between methods with percentile
bootstrap 95 % CIs over test images, and the Markdown tables of the record.

Pure numpy/pandas on top of semray.metrics and semray.evaluation.detection.cluster_bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("psnr", "ssim", "defect_psnr")
"""Per-image metrics: PSNR (dB, data range 1), SSIM, PSNR over the defect mask grown by
semray.metrics.DEFECT_REGION_PX (dB; NaN without defects)."""

COMPARISONS = (
    ("adapted", "oracle"),
    ("adapted_frames", "oracle"),
    ("shipped", "oracle"),
    ("adapted", "shipped"),
    ("adapted_frames", "shipped"),
    ("care_scratch", "oracle"),
)
"""Paired differences ``a - b`` reported (those whose two methods both ran)."""

TARGETS = {"adapted": -1.0, "shipped": -2.0}
"""Issue 20's targets on mean PSNR minus the oracle's (dB): noisy-only adaptation within 1 dB, zero-shot within 2."""


def score_images(
    truth: Sequence[np.ndarray], outputs: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> dict[str, list[float]]:
    """Per-image metrics of ``outputs`` against ``truth`` (float32 (H, W) each, [0, 1]); masks bool (H, W)."""
    from semray.metrics import defect_psnr, psnr, ssim

    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for t, o, m in zip(truth, outputs, masks, strict=True):
        out["psnr"].append(psnr(t, o))
        out["ssim"].append(ssim(t, o))
        out["defect_psnr"].append(defect_psnr(t, o, m))
    return out


def paired_ci(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of the paired differences ``a - b`` (pairs with a NaN left out) and its percentile bootstrap CI.

    Resamples whole test images with replacement (semray.evaluation.detection.cluster_bootstrap, fixed
    ``seed``). Returns ``{"mean", "low", "high", "n"}``; bounds NaN with fewer than two pairs.
    """
    import pandas as pd

    from semray.evaluation.detection import cluster_bootstrap

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    ok = np.isfinite(d)
    frame = pd.DataFrame({"image_id": np.flatnonzero(ok).astype(str), "noise_seed": 0, "delta": d[ok]})
    if frame.empty:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}

    def stat(f: pd.DataFrame) -> np.ndarray:
        return np.array([f["delta"].mean()])

    value, lo, hi = cluster_bootstrap(frame, stat, n_boot, ci, seed)
    return {"mean": float(value[0]), "low": float(lo[0]), "high": float(hi[0]), "n": int(ok.sum())}


def comparisons(
    per_image: Mapping[str, Mapping[str, Sequence[float]]], n_boot: int = 2000
) -> list[dict[str, Any]]:
    """Every :data:`COMPARISONS` pair present in ``per_image`` (method -> metric -> values), per metric."""
    rows = []
    for a, b in COMPARISONS:
        if a in per_image and b in per_image:
            for m in METRICS:
                rows.append(
                    {"a": a, "b": b, "metric": m, **paired_ci(per_image[a][m], per_image[b][m], n_boot)}
                )
    return rows


def nanmean(v: Sequence[float]) -> float:
    """Mean of the finite values (NaN when none)."""
    x = np.asarray(v, dtype=np.float64)
    return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else math.nan


def finite(v: Any) -> Any:
    """JSON-safe copy (NaN/inf -> None), as semray adapt writes its report (:func:`semray.jsonsafe.json_safe`)."""
    from semray.jsonsafe import json_safe

    return json_safe(v)


def _ci_text(c: Mapping[str, float], digits: int) -> str:
    if not math.isfinite(c["mean"]):
        return "n/a"
    if not (math.isfinite(c["low"]) and math.isfinite(c["high"])):
        return f"{c['mean']:+.{digits}f}"
    return f"{c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"


def _level_text(ds: Mapping[str, Any]) -> str:
    return f"{ds['level']:g} {ds['level_unit']}"


def method_note(info: Mapping[str, Any] | None) -> str:
    """What a method's run decided: adapt's no-reference verdict (better / level / worse / undetermined,
    semray.adapt.select.Comparison) and frame shifts, the oracle's epoch."""
    if not info:
        return ""
    notes = []
    comparison = (info.get("selection") or {}).get("comparison")
    if comparison:
        notes.append(f"verdict: {comparison['verdict']}")
    frames = info.get("frames") or {}
    if frames.get("shifts"):
        worst = max(max(abs(v) for v in s) for s in frames["shifts"])
        notes.append(f"largest registration shift {worst:.2f} px (true: 0)")
    if "kept_init_model" in info:
        kept = info["kept_init_model"]
        notes.append(
            "no epoch beat the shipped model on val pairs" if kept else f"epoch {info['best_epoch']}"
        )
    return "; ".join(notes)


def methods_table(datasets: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per (domain, level, method): mean PSNR, SSIM, defect PSNR, fit time, what it chose."""
    lines = [
        "| domain | level | method | PSNR (dB) | SSIM | defect PSNR (dB) | fit (s) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ds in datasets:
        for method, scores in ds["per_image"].items():
            fit = ds["wall_s"].get(f"fit_{method}")
            lines.append(
                f"| {ds['domain']} | {_level_text(ds)} | {method} | {nanmean(scores['psnr']):.2f} | "
                f"{nanmean(scores['ssim']):.4f} | {nanmean(scores['defect_psnr']):.2f} | "
                f"{'' if fit is None else f'{fit:.0f}'} | {method_note(ds.get('methods', {}).get(method))} |"
            )
    return "\n".join(lines)


def deltas_table(datasets: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: paired differences (mean [95 % bootstrap CI] over test images), one row per comparison."""
    lines = [
        "| domain | level | a - b | n | PSNR (dB) | SSIM | defect PSNR (dB) | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ds in datasets:
        by = {(c["a"], c["b"], c["metric"]): c for c in ds["comparisons"]}
        for a, b in dict.fromkeys((c["a"], c["b"]) for c in ds["comparisons"]):
            p = by[(a, b, "psnr")]
            target = TARGETS.get(a) if b == "oracle" else None
            verdict = (
                ""
                if target is None
                else ("met" if p["mean"] >= target else "missed") + f" (>= {target:+g} dB)"
            )
            cells = [_ci_text(by[(a, b, m)], 4 if m == "ssim" else 2) for m in METRICS]
            lines.append(
                f"| {ds['domain']} | {_level_text(ds)} | {a} - {b} | {p['n']} | {' | '.join(cells)} | {verdict} |"
            )
    return "\n".join(lines)

"""The no-reference report of ``semray adapt``: is the adapted model better on the user's images, judged
without any clean image?

Statistics (pure numpy, each of float32 (H, W) images in [0, 1]):

* :func:`noise_sigma`: robust noise estimate, Immerkaer's (1996) second-difference high-pass with the
  median absolute deviation instead of the mean (edges are outliers). On the noisy input it estimates
  the noise; on a denoised output the noise left.
* :func:`residual_acf`: normalised autocorrelation of the method residual ``noisy - denoised`` at lags
  1..L along x and y. A denoiser that removes only noise leaves a residual with the *noise's*
  autocorrelation (the figure shows the fitted noise's own, measured the same way); less correlation
  means correlated noise was left in the output, excess correlation, at long lags especially, signal
  (edges, texture) that was removed.
* :func:`signal_leak`: correlation between the residual and the high-pass of the denoised image; ~0
  when only noise was removed, > 0 when edges were blurred away.

Whether the fitted noise reproduces the real one (closure) is not measured here: the report shows the
calibration's own closure (:mod:`semray.calibrate.closure`), which measures the real images and
look-alikes synthesised from the fit alike. (Comparing ``noisy - proxy`` with ``synthetic - proxy``, as
this module once did, is biased: the proxy is the shipped model's output, which keeps part of a
correlated noise, so the real residual has less variance and correlation than the real noise.)
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import convolve, gaussian_filter

_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
_MAD_TO_SIGMA = 1.4826


def noise_sigma(img: np.ndarray) -> float:
    """Robust noise standard deviation of float (H, W) ``img`` (intensity units, image range 1).

    ``1.4826 * MAD(img * K) / ||K||`` with Immerkaer's kernel ``K`` (it cancels planes and, to first
    order, straight edges). Exact for white Gaussian noise on a piecewise-planar image; biased for
    noise correlated between neighbours (the same bias for every image with the same noise).
    """
    hp = convolve(np.asarray(img, dtype=np.float64), _IMMERKAER, mode="reflect")[1:-1, 1:-1]
    return float(_MAD_TO_SIGMA * np.median(np.abs(hp - np.median(hp))) / np.sqrt((_IMMERKAER**2).sum()))


def residual_acf(residual: np.ndarray, max_lag: int) -> dict[str, list[float]]:
    """Autocorrelation of the mean-free ``residual`` (H, W) at lags 1..max_lag: ``{"x": [...], "y": [...]}``."""
    r = np.asarray(residual, dtype=np.float64)
    r = r - r.mean()
    var = float((r * r).mean()) or 1.0
    out: dict[str, list[float]] = {"x": [], "y": []}
    for lag in range(1, max_lag + 1):
        out["x"].append(float((r[:, lag:] * r[:, :-lag]).mean() / var))
        out["y"].append(float((r[lag:] * r[:-lag]).mean() / var))
    return out


def signal_leak(residual: np.ndarray, denoised: np.ndarray, sigma_px: float = 2.0) -> float:
    """Pearson correlation of ``residual`` with the high-pass ``denoised - gaussian(denoised, sigma_px)``."""
    d = np.asarray(denoised, dtype=np.float64)
    hp = (d - gaussian_filter(d, sigma_px)).ravel()
    r = np.asarray(residual, dtype=np.float64).ravel()
    if hp.std() == 0 or r.std() == 0:
        return 0.0
    return float(np.corrcoef(r, hp)[0, 1])


def image_stats(noisy: np.ndarray, denoised: np.ndarray, max_lag: int) -> dict[str, Any]:
    """No-reference statistics of one (noisy, denoised) pair, float32 (H, W) in [0, 1] each."""
    r = np.asarray(noisy, dtype=np.float64) - denoised
    return {
        "noise_sigma_left": noise_sigma(denoised),
        "residual_std": float(r.std()),
        "residual_acf": residual_acf(r, max_lag),
        "signal_leak": signal_leak(r, denoised),
    }


def _mean_of(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def summarise(per_image: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over images of the input noise estimate and each model's statistics."""
    out: dict[str, Any] = {"noise_sigma_input": _mean_of(per_image, "noise_sigma_input")}
    for model in ("shipped", "adapted"):
        rows = [r[model] for r in per_image]
        acf = {ax: np.mean([r["residual_acf"][ax] for r in rows], axis=0).tolist() for ax in ("x", "y")}
        out[model] = {
            "noise_sigma_left": _mean_of(rows, "noise_sigma_left"),
            "residual_std": _mean_of(rows, "residual_std"),
            "signal_leak": _mean_of(rows, "signal_leak"),
            "residual_acf": acf,
        }
    return out


# --------------------------------------------------------------------------------------------------
# Figures and HTML
# --------------------------------------------------------------------------------------------------


def acf_figure(summary: dict[str, Any], noise_acf: dict[str, list[float]] | None, out_png: Path) -> Path:
    """Residual autocorrelation along x and y, shipped vs adapted, and, if given, the fitted noise's own
    (``{"x": [...], "y": [...]}`` at lags 1..L, :func:`residual_acf` of synthetic noise alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, axis in zip(axes, ("x", "y"), strict=True):
        for model, style in (("shipped", "o-"), ("adapted", "s-")):
            acf = summary[model]["residual_acf"][axis]
            ax.plot(range(1, len(acf) + 1), acf, style, label=model)
        if noise_acf is not None:
            ax.plot(range(1, len(noise_acf[axis]) + 1), noise_acf[axis], "k--", label="fitted noise alone")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel(f"lag along {axis} (px)")
        ax.set_title(f"autocorrelation of noisy - denoised, {axis}")
    axes[0].set_ylabel("correlation")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def selection_figure(selection: dict[str, Any], out_png: Path) -> Path:
    """The no-reference score per epoch (chosen epoch marked) next to the synthetic-pair val_psnr; with
    proxy rounds (rows with ``round``), a grey line where each later round starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = selection["rows"]
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    ax.plot(ep, [r["score"] for r in rows], "o-", label=f"{selection['criterion']} score (no clean)")
    ax.axhline(selection["init_score"], color="grey", ls="--", label="init model's score")
    ax.axvline(selection["chosen_epoch"], color="C0", ls=":", label="chosen")
    for prev, row in pairwise(rows):
        if row.get("round", 1) != prev.get("round", 1):
            ax.axvline((prev["epoch"] + row["epoch"]) / 2, color="0.7", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("score (lower is better)")
    ax2 = ax.twinx()
    ax2.plot(
        ep, [r.get("val_psnr", np.nan) for r in rows], "s-", color="C1", label="val_psnr (synthetic pairs)"
    )
    ax2.set_ylabel("val_psnr (dB)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _closure_html(closure: dict[str, Any], warnings: Sequence[str]) -> str:
    """The calibration's closure (:func:`semray.calibrate.closure.closure_residuals`, real vs synthetic
    look-alikes measured alike): headline errors against the targets, lag 1-3 autocorrelations, warnings."""
    if not closure:
        return "<h2>Calibration closure</h2><p>not computed</p>"
    t = closure.get("targets", {})
    mv, acf = closure.get("mv_rel_error_max"), closure.get("acf_abs_error_max")
    head = (
        f"<p>On {html.escape(', '.join(map(str, closure.get('images', []))))}: synthetic flat-patch noise "
        f"variance off the real one by at most {_fmt(None if mv is None else 100 * mv)} % over the intensity "
        f"bins (target {_fmt(100 * t.get('mv_rel_error', float('nan')))} %); noise autocorrelation off by at "
        f"most {_fmt(acf)} at lags 1-3 (target {_fmt(t.get('acf_abs_error'))}).</p>"
    )
    rows = "".join(
        f"<tr><td>{k + 1}</td>"
        + "".join(f"<td>{_fmt(closure.get(key, [None] * 3)[k])}</td>" for key in (
            "acf_x_real", "acf_x_synthetic", "acf_y_real", "acf_y_synthetic"))
        + "</tr>"
        for k in range(3)
    )  # fmt: skip
    table = (
        "<table><tr><th>lag</th><th>x real</th><th>x synthetic</th><th>y real</th><th>y synthetic</th></tr>"
        f"{rows}</table>"
    )
    note = (
        "<p>Autocorrelations of detrended flat-patch noise: the detrending biases both columns alike, so "
        "compare real with synthetic, not with the residual figure.</p>"
    )
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    if warn:
        warn = f"<p>The training noise differs from yours:</p><ul>{warn}</ul>"
    return f"<h2>Calibration closure</h2>{head}{table}{note}{warn}"


def _rounds_html(rounds: Sequence[dict[str, Any]]) -> str:
    """One line per proxy round (nothing with one round): proxies' origin, epochs, its own choice."""
    if len(rounds) < 2:
        return ""
    items = "".join(
        f"<li>round {r['round']}: proxies from {html.escape(str(r['proxies_from']))}; epochs "
        f"{html.escape(str(r['epochs']))}; chose epoch {r['chosen_epoch']} (score {_fmt(r['chosen_score'])})</li>"
        for r in rounds
    )
    return (
        f"<p>{len(rounds)} proxy rounds; the final epoch was chosen among all of them (val_psnr/user of a "
        f"round is against that round's proxies):</p><ul>{items}</ul>"
    )


def write_html(report: dict[str, Any], figures: dict[str, str], out_html: Path) -> Path:
    """A self-contained page (figures by relative path) of the report's headline numbers and figures."""
    s, sel = report["summary"], report["selection"]
    rows = [
        ("noise estimate of the input (sigma)", s["noise_sigma_input"], s["noise_sigma_input"]),
        (
            "noise left in the output (sigma)",
            s["shipped"]["noise_sigma_left"],
            s["adapted"]["noise_sigma_left"],
        ),
        ("residual std (noisy - denoised)", s["shipped"]["residual_std"], s["adapted"]["residual_std"]),
        (
            "signal leak (residual vs output high-pass)",
            s["shipped"]["signal_leak"],
            s["adapted"]["signal_leak"],
        ),
    ]
    if (c := sel.get("comparison")) is not None:
        where = "verdict crops" if c["independent_of_choice"] else "held-back crops"
        rows.append((f"{sel['criterion']} score, {c['n_crops']} {where}", c["init_score"], c["chosen_score"]))
    table = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(a)}</td><td>{_fmt(b)}</td></tr>" for n, a, b in rows
    )
    imgs = "".join(
        f"<h3>{html.escape(k)}</h3><img src='{html.escape(v)}' style='max-width:100%'>"
        for k, v in figures.items()
    )
    verdict = html.escape(report["verdict"])
    rounds = _rounds_html(report.get("rounds") or [])
    closure = _closure_html(report.get("closure") or {}, report.get("closure_warnings", []))
    page = (
        "<!doctype html><meta charset='utf-8'><title>semray adapt report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:4px 10px;"
        "border-bottom:1px solid #ddd}</style>"
        f"<h1>semray adapt: shipped vs adapted on your images</h1><p><b>{verdict}</b></p>"
        f"<p>{len(report['images'])} images; model {html.escape(report['model']['registry_uri'] or '')}; "
        f"checkpoint chosen without clean images: epoch {sel['chosen_epoch']} (best by synthetic-pair "
        f"val_psnr: epoch {sel['best_synthetic_epoch']}, {sel['gap_db_to_best_synthetic']:.2f} dB above the "
        f"chosen one).</p>{rounds}"
        f"<table><tr><th></th><th>shipped</th><th>adapted</th></tr>{table}</table>"
        "<p>Lower score = lower estimated squared error against the (unseen) clean image; the verdict "
        "needs the paired difference to exceed 2 standard errors. Residual autocorrelation above the "
        "fitted noise's own means signal was removed, below it correlated noise was left.</p>"
        f"{closure}{imgs}<pre>{html.escape(json.dumps(report['calibration_summary'], indent=2))}</pre>"
    )
    out_html.write_text(page)
    return out_html

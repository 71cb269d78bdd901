"""The calibration driver: :func:`calibrate` as a sequence of stages, and :func:`run_calibration` (files).

Each stage reads what earlier stages left in a :class:`_Run` and returns ``(estimates, warnings)``;
:func:`calibrate` collects them in stage order (which is the order of the JSON's estimates and
warnings) and turns the estimates into a :class:`~semray.config.noise.NoiseConfig`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semray.calibrate.charging import ChargingFit, charging_fit, charging_fit_images
from semray.calibrate.common import Estimate, as_image
from semray.calibrate.figure import calibration_figure, noise_statistics, synthetic_lookalikes
from semray.calibrate.jitter import jitter_estimate, jitter_from_products
from semray.calibrate.quantization import adc_estimates, common_grid
from semray.calibrate.result import CalibrationResult, noise_config_from_estimates
from semray.calibrate.rows import anisotropy, drift_estimates, row_artifacts, row_sigmas
from semray.calibrate.variance import (
    PatchStats,
    VarianceSamples,
    corrected_variance,
    fit_mean_variance,
    flat_samples,
    noise_correlation,
    patch_stats,
    physical_estimates,
    two_pass_mean_variance,
)
from semray.config.base import dump_yaml
from semray.config.calibrate import CalibrationConfig

Stage = Callable[["_Run"], tuple[dict[str, Estimate], list[str]]]

# Per-image values are kept per concern and merged in this order (the order of the JSON's keys).
_PER_IMAGE_PARTS = ("image", "variance", "rows", "jitter", "charging")


@dataclass
class _Run:
    """What the stages of one calibration hand on to the next (filled in stage order).

    ``est``: estimates so far; ``grid``: the grey-level grid ``(step, black)``; ``q2``: its variance
    ``step**2 / 12``; ``samples``: flat-patch variance samples (:class:`VarianceSamples`) and
    ``image_of_patch`` the image index of each patch; ``noise0``/``noise``: the first-pass and the final
    ``(a, b)`` of ``var = a * I + b``; ``prods``: per-image jitter products; ``rows_from``: images used
    for row artefacts and drift; ``per_image``: per concern, one dict of values per image.
    """

    imgs: list[np.ndarray]
    cfg: CalibrationConfig
    est: dict[str, Estimate] = field(default_factory=dict)
    grid: tuple[float, float] | None = None
    q2: float = 0.0
    samples: VarianceSamples | None = None
    image_of_patch: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    noise0: tuple[float, float] = (0.0, 0.0)
    noise: tuple[float, float] = (0.0, 0.0)
    prods: list[np.ndarray] = field(default_factory=list)
    rows_from: list[int] = field(default_factory=list)
    charging: ChargingFit | None = None
    per_image: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def flat(self) -> VarianceSamples:
        if self.samples is None:
            raise RuntimeError("the flat-patch stage has not run")
        return self.samples

    def merged_per_image(self) -> list[dict[str, float]]:
        empty: list[dict[str, float]] = [{} for _ in self.imgs]
        parts = [self.per_image.get(name, empty) for name in _PER_IMAGE_PARTS]
        return [{k: v for part in row for k, v in part.items()} for row in zip(*parts, strict=True)]


def _grey_grid(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """The grey-level grid (its step's variance enters the read-noise estimate); levels come last."""
    warnings: list[str] = []
    run.grid = common_grid(run.imgs, warnings)
    run.q2 = run.grid[0] ** 2 / 12.0 if run.grid else 0.0
    return {}, warnings


def _flat_patches(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Flat-patch samples in two passes: pass 1 judges flatness against each patch's own (structure-
    inflated) variance, only to get a noise model for the absolute test of pass 2."""
    cfg = run.cfg
    patches = [patch_stats(z, cfg.patch_px) for z in run.imgs]
    run.image_of_patch = np.concatenate([np.full(p.mean.size, i) for i, p in enumerate(patches)])
    ps = PatchStats.concat(patches)
    first = flat_samples(ps, cfg.flat_ratio_max)
    a0, b0, _, _ = fit_mean_variance(first.mean, first.var0)
    run.noise0 = (a0, b0)
    run.samples = flat_samples(ps, cfg.flat_ratio_max, (a0, b0))
    return {}, []


def _noise_correlation(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Lag-1 noise correlation along x, then y (measured against x samples corrected for x's); first,
    because the variance fit corrects for it when present."""
    cfg, samples = run.cfg, run.flat()
    est: dict[str, Estimate] = {}
    warnings: list[str] = []
    for name, direction, axis in (("fast_axis_noise_corr", 0, "x"), ("slow_axis_noise_corr", 1, "y")):
        var_in = (
            None if direction == 0 else corrected_variance(samples, est["fast_axis_noise_corr"], cfg.patch_px)
        )
        rho, se = noise_correlation(samples, direction, var_in)
        detected = bool(math.isfinite(rho) and abs(rho) > max(cfg.detect_sigma * se, cfg.min_noise_corr))
        note = f"lag-1 noise correlation along {axis}" if math.isfinite(rho) else "too few flat samples"
        est[name] = Estimate(rho, se, detected, note)
    rx = est["fast_axis_noise_corr"]
    if rx.detected and 0 < rx.value < 1:
        length = -1.0 / math.log(rx.value)
        est["fast_axis_corr_length_px"] = Estimate(length, rx.stderr / (rx.value * math.log(rx.value) ** 2))
        warnings.append(
            f"noise is correlated along x (lag-1 {rx.value:.3f}): detector bandwidth, which semray.noise "
            "cannot synthesise; the variance was corrected for it"
        )
    if est["slow_axis_noise_corr"].detected:
        warnings.append("noise correlated along y (between rows) was detected; the model assumes none")
    return est, warnings


def _jitter(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Line jitter, with the pass-1 noise model: the variance fit's y samples carry it."""
    cfg = run.cfg
    a0, b0 = run.noise0
    run.prods = [jitter_estimate(z, a0, b0, cfg.jitter_segments) for z in run.imgs]
    run.per_image["jitter"] = [
        {"line_jitter_px": jitter_from_products(pr, cfg.detect_sigma).value} for pr in run.prods
    ]
    return {"line_jitter_px": jitter_from_products(np.concatenate(run.prods), cfg.detect_sigma)}, []


def _per_image_variance(
    s: VarianceSamples, var: np.ndarray, sel: np.ndarray, q2: float, cfg: CalibrationConfig
) -> dict[str, float]:
    """The main variance-derived values of one image's samples ``sel`` (empty when they cannot be fitted)."""
    try:
        ai, bi, ci, _ = fit_mean_variance(s.mean[sel], var[sel])
        phys = physical_estimates(ai, bi, ci, q2, cfg)
    except (ValueError, np.linalg.LinAlgError):
        return {}
    return {k: phys[k].value for k in ("poisson_a", "poisson_b", "dose_e_per_px", "read_noise_sigma")}


def _variance(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """The Poisson-Gaussian fit ``var = a * I + b`` on samples corrected for noise correlation and jitter,
    mapped to dose and read noise."""
    cfg, s = run.cfg, run.flat()
    jit = run.est["line_jitter_px"]
    jitter = jit.value if jit.detected else 0.0
    var = corrected_variance(s, run.est["fast_axis_noise_corr"], cfg.patch_px, jitter)
    # The correction undershoots at sharp edges (the blurred gradient is smaller than the true one), so
    # y samples where jitter would add more than 2 % of the noise are left out as well.
    a0, b0 = run.noise0
    share = jitter**2 * s.grad_x2 / np.maximum(a0 * s.mean + b0, 1e-12)
    keep = (s.direction == 0) | (share <= 0.02)
    s = VarianceSamples(*(getattr(s, f)[keep] for f in VarianceSamples.__dataclass_fields__))
    var = var[keep]
    a, b, cov, used = two_pass_mean_variance(s, var)
    run.noise = (a, b)
    est = physical_estimates(a, b, cov, run.q2, cfg)
    est["flat_samples_used"] = Estimate(float(used.sum()), 0.0, True, f"of {2 * run.image_of_patch.size}")
    sample_image = run.image_of_patch[s.patch]
    run.per_image["variance"] = [
        _per_image_variance(s, var, used & (sample_image == i), run.q2, cfg) for i in range(len(run.imgs))
    ]
    return est, []


def _rows(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Row offset (and gain) from the images that are not horizontal gratings, if any."""
    cfg, n = run.cfg, len(run.imgs)
    aniso = [anisotropy(z) for z in run.imgs]
    run.per_image["image"] = [{"image": float(i), "anisotropy": v} for i, v in enumerate(aniso)]
    horizontal = [v > 8.0 for v in aniso]
    run.rows_from = [i for i, hz in enumerate(horizontal) if not hz] or list(range(n))
    warnings = []
    if any(horizontal):
        warnings.append(
            f"images {[i for i, hz in enumerate(horizontal) if hz]} are dominated by horizontal structure: "
            + ("left out of" if len(run.rows_from) < n else "unreliable for")
            + " row offset/gain and drift estimates"
        )
    a, b = run.noise
    row_stats = [row_artifacts(run.imgs[i], a, b) for i in run.rows_from]
    offset, gain = row_sigmas(row_stats, cfg.detect_sigma, cfg.fit_row_gain)
    parts: list[dict[str, float]] = [{} for _ in run.imgs]
    for i, rs in zip(run.rows_from, row_stats, strict=True):
        o_i, g_i = row_sigmas([rs], cfg.detect_sigma, cfg.fit_row_gain)
        parts[i] = {"scan_line_offset_sigma": o_i.value, "scan_line_gain_sigma": g_i.value}
    run.per_image["rows"] = parts
    return {"scan_line_offset_sigma": offset, "scan_line_gain_sigma": gain}, warnings


def _drift(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Slow drift of the row level, net of the white per-row terms (offset, gain, pixel noise)."""
    a, b = run.noise
    offset, gain = run.est["scan_line_offset_sigma"], run.est["scan_line_gain_sigma"]
    return drift_estimates(run.imgs, run.rows_from, offset, gain, a, b, run.cfg), []


def _charging(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Charging tail (put into the config only with ``fit_charging``)."""
    cfg = run.cfg
    fit, sums = charging_fit_images(
        run.imgs, cfg.charging_threshold, cfg.charging_max_lag_px, cfg.charging_max_decay_px,
        cfg.charging_min_decay_px,
    )  # fmt: skip
    run.charging = fit
    run.per_image["charging"] = []
    for sm in sums:
        fi = charging_fit([sm])
        run.per_image["charging"].append({"charging_strength": fi.strength, "charging_decay_px": fi.decay_px})
    detected = fit.detected(cfg.detect_sigma, cfg.charging_min_decay_px)
    sign = float(np.sign(fit.strength)) if detected else 0.0
    est = {
        "charging_strength": Estimate(fit.strength, fit.strength_se, detected, "signed; < 0 = dark tail"),
        "charging_decay_px": Estimate(
            fit.decay_px, fit.decay_px * fit.decay_log_se, detected, "stderr from the jackknife of log(decay)"
        ),
        "charging_sign": Estimate(sign, 0.0, detected, "+1 bright tail after bright features, -1 dark"),
    }
    warnings = []
    if detected and fit.strength < 0:
        warnings.append("dark charging tails detected: semray.noise only makes bright tails; left off")
    if detected and not cfg.fit_charging:
        warnings.append(
            "a charging-like tail was measured but fit_charging is off, so the config leaves charging off "
            "(an x-asymmetric specimen reads the same way)"
        )
    return est, warnings


def _adc_levels(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Bit depth and black/white levels of the grey-level grid found by :func:`_grey_grid`."""
    return adc_estimates(run.grid)


STAGES: tuple[Stage, ...] = (
    _grey_grid,
    _flat_patches,
    _noise_correlation,
    _jitter,
    _variance,
    _rows,
    _drift,
    _charging,
    _adc_levels,
)
"""The stages of :func:`calibrate`, in order (later stages read earlier stages' estimates)."""


def calibrate(images: Sequence[np.ndarray], cfg: CalibrationConfig | None = None) -> CalibrationResult:
    """Estimate every noise component from noisy images of one tool setting (no clean reference).

    Args:
        images: float (H, W) images in [0, 1] (sizes may differ; each at least 16 x 16).
        cfg: assumptions and settings (defaults when None).

    Returns:
        A :class:`CalibrationResult`: estimates with standard errors (pooled over the images), the
        fitted :class:`NoiseConfig` and per-image estimates of the main quantities.
    """
    cfg = cfg or CalibrationConfig()
    imgs = [as_image(z) for z in images]
    if not imgs:
        raise ValueError("calibrate needs at least one image")
    run = _Run(imgs, cfg)
    warnings: list[str] = []
    for stage in STAGES:
        est, warn = stage(run)
        run.est.update(est)
        warnings += warn
    assumptions = {
        "se_yield_min": cfg.assumed_se_yield_min,
        "se_yield_max": cfg.assumed_se_yield_max,
        "detector_gain_cv": cfg.assumed_detector_gain_cv,
        "charging_threshold": cfg.charging_threshold,
    }
    noise_cfg = noise_config_from_estimates(run.est, cfg)
    return CalibrationResult(run.est, noise_cfg, assumptions, run.merged_per_image(), warnings, run.charging)


def run_calibration(
    inputs: Sequence[str | Path],
    out_yaml: str | Path,
    cfg: CalibrationConfig | None = None,
    json_path: str | Path | None = None,
    figure_path: str | Path | None = None,
) -> CalibrationResult:
    """Read images (files or folders), calibrate, write the NoiseConfig YAML, the JSON and the figure.

    ``json_path``/``figure_path`` default to ``out_yaml`` with ``.json``/``.png`` suffixes.
    """
    from semray.io import IMAGE_SUFFIXES, iter_pages, list_images

    cfg = cfg or CalibrationConfig()
    paths = [p for src in inputs for p in list_images(src)]
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {[str(s) for s in inputs]}")
    images = [image for p in paths for image, _ in iter_pages(p)]  # every page of a multipage TIFF
    result = calibrate(images, cfg)
    out_yaml = Path(out_yaml)
    out_yaml.parent.mkdir(parents=True, exist_ok=True)
    out_yaml.write_text(dump_yaml(result.noise_config))
    payload = result.to_json() | {"images": [str(p) for p in paths]}
    Path(json_path or out_yaml.with_suffix(".json")).write_text(json.dumps(payload, indent=2))
    shown = images[:4]
    synth = synthetic_lookalikes(shown, result, cfg.n_synthetic, cfg.seed)
    model = (result.estimates["poisson_a"].value, result.estimates["poisson_b"].value)
    real_stats = noise_statistics(shown, cfg, model=model)
    synth_stats = noise_statistics(synth, cfg, real_stats.mv_edges, model)
    calibration_figure(
        real_stats, synth_stats, result, figure_path or out_yaml.with_suffix(".png"), shown[0], synth[0]
    )
    return result

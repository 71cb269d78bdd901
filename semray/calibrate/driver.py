"""The calibration driver: :func:`calibrate` as a sequence of stages, and :func:`run_calibration` (files).

Each stage reads what earlier stages left in a :class:`_Run` and returns ``(estimates, warnings)``;
:func:`calibrate` collects them in stage order (which is the order of the JSON's estimates and
warnings) and turns the estimates into a :class:`~semray.config.noise.NoiseConfig`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from semray.calibrate.censored import CensoredModel, fit_censored, fit_censored_starts
from semray.calibrate.charging import ChargingFit, charging_fit, charging_fit_images
from semray.calibrate.closure import closure
from semray.calibrate.common import Estimate, as_image
from semray.calibrate.correlation import lag_correlation, patch_lag_sums
from semray.calibrate.figure import calibration_figure
from semray.calibrate.jitter import jitter_estimate, jitter_from_products
from semray.calibrate.quantization import adc_estimates, censor_levels, common_grid
from semray.calibrate.result import CalibrationResult, noise_config_from_estimates
from semray.calibrate.rows import anisotropy, drift_estimates, row_artifacts, row_sigmas
from semray.calibrate.variance import (
    PatchStats,
    VarianceSamples,
    corrected_variance,
    fit_mean_variance,
    flat_samples,
    flatness,
    patch_stats,
    physical_estimates,
)
from semray.config.base import dump_yaml
from semray.config.calibrate import CalibrationConfig
from semray.config.noise import NoiseConfig

Stage = Callable[["_Run"], tuple[dict[str, Estimate], list[str]]]

CENSORED_START_GAINS = (1.0, 2.0, 4.0)
"""Multiples of the plain line's ``a`` that the censored fit starts from (the most likely fit wins)."""

# Per-image values are kept per concern and merged in this order (the order of the JSON's keys).
_PER_IMAGE_PARTS = ("image", "variance", "rows", "jitter", "charging")


@dataclass
class _Run:
    """What the stages of one calibration hand on to the next (filled in stage order).

    ``est``: estimates so far; ``grid``: the grey-level grid ``(step, black)``; ``q2``: its variance
    ``step**2 / 12``; ``window``: the ADC window's ends where censoring is seen (else infinite);
    ``patches``/``lag_sums``: per-patch statistics and lag products; ``samples``: flat-patch variance samples (:class:`VarianceSamples`) and
    ``image_of_patch`` the image index of each patch; ``noise0``/``noise``: the first-pass and the final
    ``(a, b)`` of ``var = a * I + b`` before clipping, ``model`` the fitted censored model; ``prods``: per-image jitter products; ``rows_from``: images used
    for row artefacts and drift; ``per_image``: per concern, one dict of values per image.
    """

    imgs: list[np.ndarray]
    cfg: CalibrationConfig
    est: dict[str, Estimate] = field(default_factory=dict)
    grid: tuple[float, float] | None = None
    q2: float = 0.0
    window: tuple[float, float] = (-math.inf, math.inf)
    patches: PatchStats | None = None
    lag_sums: np.ndarray = field(default_factory=lambda: np.empty((0, 2, 2, 4)))
    samples: VarianceSamples | None = None
    image_of_patch: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    noise0: tuple[float, float] = (0.0, 0.0)
    noise: tuple[float, float] = (0.0, 0.0)
    model: CensoredModel | None = None
    prods: list[np.ndarray] = field(default_factory=list)
    rows_from: list[int] = field(default_factory=list)
    charging: ChargingFit | None = None
    per_image: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def flat(self) -> VarianceSamples:
        if self.samples is None:
            raise RuntimeError("the flat-patch stage has not run")
        return self.samples

    def censored(self) -> CensoredModel:
        if self.model is None:
            raise RuntimeError("the variance stage has not run")
        return self.model

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


def _window(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """The ADC window's ends where pixels pile up (the censored model clips there)."""
    est, run.window = censor_levels(run.imgs)
    return est, []


def _flat_patches(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Flat-patch samples in two passes: pass 1 judges flatness against each patch's own (structure-
    inflated) variance, only to get a noise model for the absolute test of pass 2."""
    cfg = run.cfg
    patches = [patch_stats(z, cfg.patch_px, run.window) for z in run.imgs]
    run.image_of_patch = np.concatenate([np.full(p.mean.size, i) for i, p in enumerate(patches)])
    ps = PatchStats.concat(patches)
    run.patches = ps
    run.lag_sums = np.concatenate([patch_lag_sums(z, cfg.patch_px) for z in run.imgs])
    first = flat_samples(ps, cfg.flat_ratio_max)
    a0, b0, _, _ = fit_mean_variance(first.mean, first.var0)
    run.noise0 = (a0, b0)
    run.samples = flat_samples(ps, cfg.flat_ratio_max, (a0, b0))
    return {}, []


def _correlation_sums(run: _Run, direction: int) -> np.ndarray:
    """Lag sums ``(m, K + 1)`` of the (patch, parity) lines along ``direction`` whose other parity is
    flat under the pass-1 noise model; only patches 3 noise sigmas inside the window when there are
    100 or more (clipping lowers the correlation)."""
    ps, (a0, b0) = run.patches, run.noise0
    assert ps is not None
    flat = flatness(ps, (a0, b0))[:, direction] <= run.cfg.flat_ratio_max  # (n, parity)
    sd = np.sqrt(np.maximum(a0 * ps.mean + b0, 0.0))
    inside = ((ps.mean - 3 * sd > run.window[0]) & (ps.mean + 3 * sd < run.window[1]))[:, None] & flat
    sel = inside if inside.sum() >= 100 else flat
    return run.lag_sums[:, direction][sel]


def _noise_correlation(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Lag-1 AR(1) noise correlation along x and y (:mod:`semray.calibrate.correlation`); first, because
    the variance fit corrects for it when present."""
    cfg = run.cfg
    est: dict[str, Estimate] = {}
    for name, direction, axis in (("fast_axis_noise_corr", 0, "x"), ("slow_axis_noise_corr", 1, "y")):
        rho, se = lag_correlation(_correlation_sums(run, direction), cfg.patch_px)
        detected = bool(math.isfinite(rho) and abs(rho) > max(cfg.detect_sigma * se, cfg.min_noise_corr))
        note = (
            f"lag-1 noise correlation along {axis} (AR(1))" if math.isfinite(rho) else "too few flat patches"
        )
        est[name] = Estimate(rho, se, detected, note)
    rx, ry = est["fast_axis_noise_corr"], est["slow_axis_noise_corr"]
    if rx.detected and 0 < rx.value < 1:
        length = -1.0 / math.log(rx.value)
        est["fast_axis_corr_length_px"] = Estimate(length, rx.stderr / (rx.value * math.log(rx.value) ** 2))
    can = "bandwidth" in NoiseConfig.model_fields
    warnings = [
        f"noise is correlated along {axis} (lag-1 {e.value:.3f}): "
        + ("written to NoiseConfig.bandwidth" if can and e.value > 0 else
           "recorded in the JSON; this semray.noise cannot synthesise it")
        + "; the variance was corrected for it"
        for axis, e in (("x", rx), ("y (between rows)", ry)) if e.detected
    ]  # fmt: skip
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
    s: VarianceSamples,
    var: np.ndarray,
    sel: np.ndarray,
    model: CensoredModel,
    q2: float,
    cfg: CalibrationConfig,
) -> dict[str, float]:
    """The main variance-derived values of one image's samples ``sel`` (empty when they cannot be fitted)."""
    try:
        x = (s.mean[sel], var[sel], s.f_lo[sel], s.f_hi[sel])
        fit, _ = fit_censored(x, (model.a, model.b), (model.lo, model.hi), (model.y0_over_dy, model.cv),
                              cfg.patch_px**2 // 2)  # fmt: skip
        phys = physical_estimates(fit.a, fit.b, fit.cov, q2, cfg)
    except (ValueError, np.linalg.LinAlgError):
        return {}
    return {k: phys[k].value for k in ("poisson_a", "poisson_b", "dose_e_per_px", "read_noise_sigma")}


def _censored_fit(
    run: _Run, s: VarianceSamples, var: np.ndarray
) -> tuple[CensoredModel, np.ndarray, list[str]]:
    """The censored mean-variance fit, started from the plain line through the same samples.

    Variances and censored fractions together; when the variances then miss the model by more than
    5 % on average (the censored fractions disagree with the assumed noise shape: a real detector
    is not semray's Poisson-gamma), the variances alone, with a warning."""
    cfg = run.cfg
    dy = cfg.assumed_se_yield_max - cfg.assumed_se_yield_min
    try:
        a, b, _, _ = fit_mean_variance(s.mean, var)
    except (ValueError, np.linalg.LinAlgError):
        a, b = run.noise0
    start = (a, b) if a > 0 and b > 0 else run.noise0
    shape = (cfg.assumed_se_yield_min / dy, cfg.assumed_detector_gain_cv)
    x = (s.mean, var, s.f_lo, s.f_hi)
    npix = cfg.patch_px**2 // 2
    # The plain line through clipped variances underestimates a (0.33x at 2 e-/px): also start above it.
    starts = [(start[0] * k, start[1]) for k in CENSORED_START_GAINS]
    model, used = fit_censored_starts(x, starts, run.window, shape, npix)
    off = float(np.mean(var[used] / np.maximum(model.variance_of(s.mean[used]), 1e-12) - 1.0))
    warnings = []
    if abs(off) > 0.1:
        starts = [(model.a, model.b), *starts]
        model, used = fit_censored_starts(x, starts, run.window, shape, npix, use_fractions=False)
        warnings.append(
            f"the censored fractions disagree with the assumed noise shape (variances {100 * off:+.0f} % off "
            "the joint fit); fitted on the variances alone"
        )
    cov = _jackknife_cov(x, s.patch, model, npix, use_fractions=not warnings)
    return replace(model, cov=cov), used, warnings


def _jackknife_cov(
    x: tuple[np.ndarray, ...],
    patch: np.ndarray,
    model: CensoredModel,
    npix: int,
    use_fractions: bool,
    groups: int = 8,
) -> np.ndarray:
    """Covariance of ``(a, b)`` by a jackknife over ``groups`` interleaved groups of patches: samples of
    one patch (both directions and parities share its pixels) and of neighbouring patches are not
    independent, which the fit's own Gauss-Newton covariance assumes (it came out 10-100x too small)."""
    g = patch % groups
    loo = []
    for k in range(groups):
        sel = g != k
        try:
            fit, _ = fit_censored(tuple(v[sel] for v in x), (model.a, model.b), (model.lo, model.hi),
                                  (model.y0_over_dy, model.cv), npix, use_fractions, n_iter=2)  # fmt: skip
        except (ValueError, np.linalg.LinAlgError):
            return model.cov
        loo.append((fit.a, fit.b))
    d = np.array(loo) - np.mean(loo, axis=0)
    return (groups - 1) / groups * d.T @ d


def _variance(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """The Poisson-Gaussian fit ``var = a * I + b`` (censored at the window's ends) on samples corrected
    for noise correlation and jitter, mapped to dose and read noise."""
    cfg, s = run.cfg, run.flat()
    jit = run.est["line_jitter_px"]
    jitter = jit.value if jit.detected else 0.0
    rx, ry = run.est["fast_axis_noise_corr"], run.est["slow_axis_noise_corr"]
    var = corrected_variance(s, rx, ry, jitter)
    # The correction undershoots at sharp edges (the blurred gradient is smaller than the true one), so
    # y samples where jitter would add more than 2 % of the noise are left out as well.
    a0, b0 = run.noise0
    share = jitter**2 * s.grad_x2 / np.maximum(a0 * s.mean + b0, 1e-12)
    keep = np.isfinite(var) & ((s.direction == 0) | (share <= 0.02))
    s = VarianceSamples(*(getattr(s, f)[keep] for f in VarianceSamples.__dataclass_fields__))
    var = var[keep]
    model, used, warnings = _censored_fit(run, s, var)
    run.model, run.noise = model, (model.a, model.b)
    est = physical_estimates(model.a, model.b, model.cov, run.q2, cfg)
    est["flat_samples_used"] = Estimate(float(used.sum()), 0.0, True, f"of {2 * run.image_of_patch.size}")
    near = float(np.mean(model.slope_of(s.mean[used]) < 0.9))
    est["censored_sample_share"] = Estimate(
        near, 0.0, near > 0, "flat samples whose mean shows < 90 % of a shift"
    )
    sample_image = run.image_of_patch[s.patch]
    run.per_image["variance"] = [
        _per_image_variance(s, var, used & (sample_image == i), model, run.q2, cfg)
        for i in range(len(run.imgs))
    ]
    if near > 0.1:
        warnings.append(
            f"{100 * near:.0f} % of the flat samples lie near the window's ends (censored); they were fitted "
            "with the censored model, and the error bars are correspondingly wider"
        )
    if used.sum() < 50:
        warnings.append(
            f"only {int(used.sum())} flat samples: the variance fit is rough (see its error bars)"
        )
    return est, warnings


def _fast_axis_corr(run: _Run) -> float:
    """The measured lag-1 noise correlation along x (0 where not measurable): the per-row noise floors
    of the row and drift stages depend on it. Taken detected or not: it is the best estimate at hand
    (a correlation of 0.5 read 0.52 with too large an error bar to count as detected, and the row
    stage, taking 0 instead, reported a false row offset of 0.003; 1000 e-/px, 4 images of 256 px)."""
    rx = run.est["fast_axis_noise_corr"]
    return float(np.clip(rx.value, -0.95, 0.95)) if math.isfinite(rx.value) else 0.0


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
    rho_x = _fast_axis_corr(run)
    row_stats = [row_artifacts(run.imgs[i], run.censored(), rho_x=rho_x) for i in run.rows_from]
    offset, gain = row_sigmas(row_stats, cfg.detect_sigma, cfg.fit_row_gain)
    parts: list[dict[str, float]] = [{} for _ in run.imgs]
    for i, rs in zip(run.rows_from, row_stats, strict=True):
        o_i, g_i = row_sigmas([rs], cfg.detect_sigma, cfg.fit_row_gain)
        parts[i] = {
            "scan_line_offset_sigma": o_i.value,
            "scan_line_gain_sigma": g_i.value,
            "row_noise_scale": rs.noise_scale,
        }
    run.per_image["rows"] = parts
    return {"scan_line_offset_sigma": offset, "scan_line_gain_sigma": gain}, warnings


def _drift(run: _Run) -> tuple[dict[str, Estimate], list[str]]:
    """Slow drift of the row level, net of the white per-row terms (offset, gain, pixel noise)."""
    offset, gain = run.est["scan_line_offset_sigma"], run.est["scan_line_gain_sigma"]
    variance = run.censored().variance_of
    return drift_estimates(run.imgs, run.rows_from, offset, gain, variance, run.cfg, _fast_axis_corr(run)), []


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
    _window,
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
    per_image = run.merged_per_image()
    return CalibrationResult(
        run.est, noise_cfg, assumptions, per_image, warnings, run.charging, model=run.model
    )


def _read_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[np.ndarray], list[str]]:
    """Every page of every image under ``inputs``: ``(files, images, one name per image)``.

    Pages are read as ``semray adapt`` reads them (:func:`semray.calibrate.inputs.read_noisy_pages`):
    each page of a multipage TIFF is an image named ``file.tif[page k]``. Unreadable pages, thumbnails
    (reduced-resolution previews), pages under 16 x 16 and constant pages raise one ``ValueError``
    naming each of them; none is dropped silently.
    """
    from semray.calibrate.inputs import read_noisy_pages
    from semray.io import IMAGE_SUFFIXES, list_images

    paths = [p for src in inputs for p in list_images(src)]
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {[str(s) for s in inputs]}")
    pages, problems = read_noisy_pages(paths, min_side_px=16)
    if problems:
        raise ValueError("cannot calibrate on these images:\n  " + "\n  ".join(problems))
    return paths, [pg.image for pg in pages], [pg.name for pg in pages]


def run_calibration(
    inputs: Sequence[str | Path],
    out_yaml: str | Path,
    cfg: CalibrationConfig | None = None,
    json_path: str | Path | None = None,
    figure_path: str | Path | None = None,
) -> CalibrationResult:
    """Read images (files or folders), calibrate, check closure on the first four (synthesise look-alikes
    from the fit and compare, :mod:`semray.calibrate.closure`), write the NoiseConfig YAML, the JSON
    (estimates, closure residuals) and the figure.

    The JSON's ``images`` lists the files, ``pages`` every image calibrated on (``file.tif[page k]`` for
    a page of a multipage file; the order of ``per_image``). ``json_path``/``figure_path`` default to
    ``out_yaml`` with ``.json``/``.png`` suffixes.
    """
    cfg = cfg or CalibrationConfig()
    paths, images, labels = _read_images(inputs)
    result = calibrate(images, cfg)
    shown = images[:4]
    real_stats, synth_stats, synth, result.closure = closure(shown, result, cfg)
    result.closure["images"] = labels[:4]
    out_yaml = Path(out_yaml)
    out_yaml.parent.mkdir(parents=True, exist_ok=True)
    out_yaml.write_text(dump_yaml(result.noise_config))
    payload = result.to_json() | {"images": [str(p) for p in paths], "pages": labels}
    Path(json_path or out_yaml.with_suffix(".json")).write_text(json.dumps(payload, indent=2))
    calibration_figure(
        real_stats, synth_stats, result, figure_path or out_yaml.with_suffix(".png"), shown[0], synth[0]
    )
    return result

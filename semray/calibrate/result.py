"""The calibration's result: estimates, the fitted :class:`~semray.config.noise.NoiseConfig` (narrow
ranges around detected components) and what cannot be separated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from semray.calibrate.censored import CensoredModel
from semray.calibrate.charging import ChargingFit
from semray.calibrate.common import Estimate
from semray.config.calibrate import CalibrationConfig
from semray.config.noise import NoiseConfig
from semray.jsonsafe import json_safe

IDENTIFIABILITY_NOTES = (
    "dose, detector_gain_cv and the SE yields enter the noise only through a = (1 + cv^2) / (dose * dY) "
    "and y0 / dY: dose is reported given the assumed cv and yields (1 / a is what the images determine)",
    "read noise = b - a * y0 / dY - step^2 / 12 depends on the assumed yields; at low dose its error is large",
    "row gain is only split from row offset with fit_row_gain (jittered feature arrays fake row gain)",
    "charging enters the config only with fit_charging: the estimator assumes a specimen mirror-symmetric "
    "along x (side-detector shading or asymmetric edges read as charging); strength is relative to the "
    "assumed charging_threshold",
    "row offsets vs horizontal pattern edges and drift vs low-frequency pattern are separated only "
    "statistically (spectral clipping, class levels); horizontal gratings are flagged and left out",
    "noise correlation is modelled as AR(1) along x and y (lag k: corr**k); it enters the config as "
    "NoiseConfig.bandwidth where the noise model has that component and the correlation is positive, "
    "otherwise it is only recorded here",
    "the ADC window is seen only where pixels pile up at the ends of the grey range (censoring); a window "
    "no signal reaches is not identifiable, and the clean-intensity offset of the window is tied to the "
    "assumed yields (it trades against the intercept b)",
)


@dataclass
class CalibrationResult:
    """Everything :func:`calibrate` found: estimates, the fitted config, and what to keep in mind.

    ``model``: the fitted censored noise model; ``closure``: residuals of images synthesised from the
    fit against the real ones (filled in by :func:`~semray.calibrate.driver.run_calibration`)."""

    estimates: dict[str, Estimate]
    noise_config: NoiseConfig
    assumptions: dict[str, float]
    per_image: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    charging: ChargingFit | None = None
    closure: dict[str, Any] = field(default_factory=dict)
    model: CensoredModel | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (NaN/inf become None)."""

        return json_safe(
            {
                "estimates": {k: asdict(v) for k, v in self.estimates.items()},
                "assumptions": dict(self.assumptions),
                "per_image": self.per_image,
                "identifiability": list(IDENTIFIABILITY_NOTES),
                "warnings": list(self.warnings),
                "noise_config": self.noise_config.model_dump(mode="json"),
                "closure": self.closure,
            }
        )


def _range(e: Estimate, lo: float, hi: float, cfg: CalibrationConfig, log: bool = False) -> dict[str, Any]:
    """A narrow ``NoiseRange`` dict around an estimate: +-max(rel width, k SE), within ``[lo, hi]``."""
    se = e.stderr if math.isfinite(e.stderr) else 0.0
    half = max(cfg.range_rel_width * abs(e.value), cfg.range_stderr * se)
    low, high = min(max(e.value - half, lo), hi), max(min(e.value + half, hi), lo)
    return {"low": float(low), "high": float(max(high, low)), "log": log}


def _pinned(v: float) -> dict[str, Any]:
    return {"low": float(v), "high": float(v)}


def _bandwidth(rx: Estimate, ry: Estimate, cfg: CalibrationConfig) -> dict[str, Any]:
    """``NoiseConfig.bandwidth`` (AR(1) noise correlation): on when a positive correlation is detected
    along either axis (the model's coefficients are in [0, 0.95]); an undetected axis is pinned to 0."""
    use_x, use_y = rx.detected and rx.value > 0, ry.detected and ry.value > 0
    return {
        "enabled": use_x or use_y,
        "fast_axis_corr": _range(rx, 0.0, 0.95, cfg) if use_x else _pinned(0.0),
        "slow_axis_corr": _range(ry, 0.0, 0.95, cfg) if use_y else _pinned(0.0),
    }


def noise_config_from_estimates(est: dict[str, Estimate], cfg: CalibrationConfig) -> NoiseConfig:
    """The :class:`NoiseConfig` the synthesis stage uses: narrow ranges around detected components.

    Undetected components are switched off; assumed quantities (SE yields, detector cv, charging
    threshold) are pinned; a sub-parameter not detected inside an enabled component is pinned to 0.
    """
    data: dict[str, Any] = {}
    shot = est["dose_e_per_px"].detected
    data["shot"] = {
        "enabled": shot,
        "se_yield_min": _pinned(cfg.assumed_se_yield_min),
        "se_yield_max": _pinned(cfg.assumed_se_yield_max),
    }
    if shot:
        d = est["dose_e_per_px"]
        data["shot"]["dose_e_per_px"] = _range(d, 1e-3 * 1.0001, 1e6, cfg, log=True)
    data["detector_gain"] = {
        "enabled": shot and cfg.assumed_detector_gain_cv > 0,
        "detector_gain_cv": _pinned(cfg.assumed_detector_gain_cv),
    }
    rn = est["read_noise_sigma"]
    data["read_noise"] = {"enabled": rn.detected}
    if rn.detected:
        data["read_noise"]["read_noise_sigma"] = _range(rn, 0.0, 1.0, cfg)
    off, gn = est["scan_line_offset_sigma"], est["scan_line_gain_sigma"]
    data["scan_lines"] = {
        "enabled": off.detected or gn.detected,
        "scan_line_offset_sigma": _range(off, 0.0, 1.0, cfg) if off.detected else _pinned(0.0),
        "scan_line_gain_sigma": _range(gn, 0.0, 1.0, cfg) if gn.detected else _pinned(0.0),
    }
    jit = est["line_jitter_px"]
    data["line_jitter"] = {"enabled": jit.detected}
    if jit.detected:
        data["line_jitter"]["line_jitter_px"] = _range(jit, 0.0, 64.0, cfg)
    amp, corr = est["drift_amplitude"], est["drift_corr_rows"]
    data["drift"] = {"enabled": amp.detected}
    if amp.detected:
        data["drift"]["drift_amplitude"] = _range(amp, 0.0, 1.0, cfg)
        data["drift"]["drift_corr_rows"] = _range(corr, 1.0, 4096.0, cfg)
    s, tau = est["charging_strength"], est["charging_decay_px"]
    on = cfg.fit_charging and s.detected and s.value > 0
    data["charging"] = {"enabled": on, "charging_threshold": cfg.charging_threshold}
    if on:
        data["charging"]["charging_strength"] = _range(s, 0.0, 5.0, cfg)
        data["charging"]["charging_decay_px"] = _range(tau, 0.1, 10_000.0, cfg)
    if "bandwidth" in NoiseConfig.model_fields:
        none = Estimate(0.0, 0.0, False, "not measured")
        rx, ry = est.get("fast_axis_noise_corr", none), est.get("slow_axis_noise_corr", none)
        data["bandwidth"] = _bandwidth(rx, ry, cfg)
    if est["quant_step"].detected:
        data["quantization"] = {
            "enabled": True,
            "bit_depth": int(est["bit_depth"].value),
            "quant_black_level": _pinned(est["quant_black_level"].value),
            "quant_white_level": _pinned(est["quant_white_level"].value),
        }
    else:
        data["quantization"] = {"enabled": False}
    return NoiseConfig.model_validate(data)

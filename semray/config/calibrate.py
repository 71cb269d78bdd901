"""Settings and fixed assumptions of noise calibration (:func:`semray.calibrate.calibrate`).

Why each assumption is fixed rather than fitted is explained in :mod:`semray.calibrate`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from semray.config.base import StrictModel


class CalibrationConfig(StrictModel):
    """Settings and fixed assumptions of :func:`calibrate` (see :mod:`semray.calibrate` for why each is fixed)."""

    assumed_se_yield_min: float = Field(
        0.2, ge=0.0, le=20.0, description="assumed SE yield at clean 0 (SE/e); fixes dose and read noise"
    )
    assumed_se_yield_max: float = Field(
        1.2, ge=1e-3, le=20.0, description="assumed SE yield at clean 1 (SE/e); fixes dose"
    )
    assumed_detector_gain_cv: float = Field(
        0.5, ge=0.0, le=5.0, description="assumed per-SE detector gain cv (dimensionless); fixes dose"
    )
    fit_row_gain: bool = Field(
        False,
        description="split per-row variation into offset and gain. Off by default: row artefacts are "
        "taken as additive at the rows' typical intensity, because arrays of jittered features (contact "
        "holes) leak into the gain estimate (measured false gains 0.04-0.065 on synthetic contacts)",
    )
    fit_charging: bool = Field(
        False,
        description="put a detected charging tail into the config. Off by default: the estimator "
        "assumes a specimen that is mirror-symmetric along x, which edge-band renderings and "
        "side-detector shading violate (on semray's synthetic wafers it reads 0.5-1.5 strength "
        "without any charging); on symmetric bright features it recovers strength and decay",
    )
    charging_threshold: float = Field(
        0.6, ge=0.0, le=1.0, description="assumed clean intensity above which the surface charges ([0, 1])"
    )
    patch_px: int = Field(8, ge=4, le=64, description="side of the square patches of the variance fit, px")
    flat_ratio_max: float = Field(
        1.5,
        gt=0.0,
        le=100.0,
        description="a patch is flat when its smoothed-gradient energy is below this multiple of the "
        "energy pure noise would give (dimensionless)",
    )
    min_noise_corr: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="smallest |lag-1 noise correlation| reported as detected (the estimator's systematic "
        "floor on dense patterns is ~0.02)",
    )
    jitter_segments: int = Field(
        4, ge=2, le=64, description="segments per row whose shifts are compared (line jitter), count"
    )
    charging_max_lag_px: int = Field(
        24, ge=6, le=512, description="largest lag along x of the charging tail fit, px"
    )
    charging_min_decay_px: float = Field(
        2.0,
        ge=0.1,
        le=100.0,
        description="shortest charging decay length searched, px; shorter tails are not told apart from "
        "pixel-scale edge shape",
    )
    charging_max_decay_px: float = Field(
        48.0, ge=1.0, le=1000.0, description="largest charging decay length searched, px"
    )
    drift_lowpass_rows: float = Field(
        16.0, ge=2.0, le=512.0, description="Gaussian sigma of the row-profile low-pass for drift, rows"
    )
    drift_min_amplitude: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="drift RMS below this is not reported as drift, intensity units (pattern leftovers "
        "in the row-level profile of 256-row images measured 0.006-0.017)",
    )
    detect_sigma: float = Field(
        3.0, ge=0.0, le=20.0, description="a component is enabled when its estimate is this many SEs > 0"
    )
    range_rel_width: float = Field(
        0.1, ge=0.0, le=1.0, description="half-width of the output ranges relative to the estimate"
    )
    range_stderr: float = Field(
        1.0, ge=0.0, le=10.0, description="minimum half-width of the output ranges, in standard errors"
    )
    n_synthetic: int = Field(
        2, ge=1, le=16, description="synthetic re-noised copies per image for the comparison figure"
    )
    seed: int = Field(0, ge=0, description="seed of the synthetic comparison images")

    @model_validator(mode="after")
    def _yields_increase(self) -> CalibrationConfig:
        if self.assumed_se_yield_max <= self.assumed_se_yield_min:
            raise ValueError("assumed_se_yield_max must be > assumed_se_yield_min")
        return self

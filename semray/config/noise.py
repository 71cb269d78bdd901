"""Config of the physical SEM noise model (:mod:`semray.noise`) and the per-image parameter record.

:class:`NoiseConfig` holds, for each noise component, an ``enabled`` switch and the *ranges* its
parameters are drawn from, once per image (:func:`semray.noise.sample_params`). The drawn scalars form a
:class:`NoiseParams` record; :meth:`NoiseParams.as_columns` turns it into ``noise_*`` columns so every
training sample in a Parquet shard can be traced back to the physics that made it.

Geometry: the beam scans rows. The **fast-scan axis is x** (columns, numpy ``axis=1``): pixels of one
row are acquired microseconds apart, so charging tails and line jitter act along it. The **slow-scan
axis is y** (rows, ``axis=0``): rows are milliseconds apart, so per-line offsets/gains and slow drift
vary along it. The detector's bandwidth correlates the noise of neighbouring pixels along x (and,
weakly, of neighbouring rows): the ``bandwidth`` component.

Units: dose in primary electrons per pixel (e/px); SE yields in secondary electrons detected per
primary electron; intensities (sigmas, offsets, amplitudes, levels) in the library's ``[0, 1]`` image
scale; lengths in pixels (px) or rows.

YAML example (every key optional; a range is ``{low: a, high: b}`` or ``[a, b]``)::

    noise:
      shot: {dose_e_per_px: {low: 5, high: 400, log: true}}
      charging: {enabled: false}
      quantization: {bit_depth: 12, adc_window: headroom}
      bandwidth: {enabled: true, fast_axis_corr: [0.4, 0.6], slow_axis_corr: [0, 0.05]}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from semray.config.base import Interval, StrictModel

COMPONENTS: tuple[str, ...] = (
    "line_jitter",
    "charging",
    "shot",
    "detector_gain",
    "scan_lines",
    "drift",
    "read_noise",
    "quantization",
    "bandwidth",
)
"""Noise components, in the order of their random streams (child ``i`` of the image's
:class:`numpy.random.SeedSequence` belongs to component ``i``). New components are appended, so that
adding one never moves another's draws; the physical order in which :func:`semray.noise.apply_noise`
applies them is :data:`PHYSICAL_ORDER`."""

PHYSICAL_ORDER: tuple[str, ...] = (
    "line_jitter",
    "charging",
    "shot",
    "detector_gain",
    "scan_lines",
    "drift",
    "read_noise",
    "bandwidth",
    "quantization",
)
"""The components in the order :func:`semray.noise.apply_noise` applies them (see its module docs)."""


COLUMN_PREFIX = "noise_"


class NoiseRange(Interval):
    """A closed interval ``[low, high]`` that one per-image value is drawn from.

    Uniform by default; ``log: true`` draws log-uniformly (for scale-like quantities such as dose,
    where 5 -> 50 matters as much as 50 -> 500). ``low == high`` pins the value. YAML accepts
    ``{low: 2, high: 5}`` or the short list form ``[2, 5]``; fields that are log-uniform by nature
    (dose) default to ``log: true`` in either form.
    """

    log: bool = Field(False, description="draw log-uniformly instead of uniformly (needs low > 0)")

    @model_validator(mode="after")
    def _log_positive(self) -> NoiseRange:
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got {self.low}")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        """One draw from the range; always consumes exactly one uniform from ``rng``."""
        u = float(rng.random())
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            return float(min(max(math.exp(lo + u * (hi - lo)), self.low), self.high))
        return self.low + u * (self.high - self.low)


def _r(low: float, high: float, description: str, log: bool = False) -> Any:
    """A NoiseRange field defaulting to ``[low, high]`` (a fresh model per config instance)."""
    return Field(default_factory=lambda: NoiseRange(low=low, high=high, log=log), description=description)


class _Component(StrictModel):
    """One noise component: an on/off switch plus parameter ranges with allowed bounds.

    ``_bounds`` gives the admissible ``[min, max]`` of both ends of each range field; one validator
    enforces it so the error names the field.
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {}
    _log_fields: ClassVar[frozenset[str]] = frozenset()

    enabled: bool = Field(True, description="apply this component (off: it leaves the image unchanged)")

    @field_validator("*", mode="before")
    @classmethod
    def _log_by_default(cls, v: Any, info: ValidationInfo) -> Any:
        # Scale-like fields stay log-uniform when YAML gives the short [low, high] form.
        if info.field_name in cls._log_fields:
            if isinstance(v, (list, tuple)) and len(v) == 2:
                return {"low": v[0], "high": v[1], "log": True}
            if isinstance(v, Mapping) and "log" not in v:
                return {**v, "log": True}
        return v

    @field_validator("*", mode="after")
    @classmethod
    def _within_bounds(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, NoiseRange) and info.field_name in cls._bounds:
            lo, hi = cls._bounds[info.field_name]
            if v.low < lo or v.high > hi:
                raise ValueError(f"range [{v.low}, {v.high}] must lie within [{lo}, {hi}]")
        return v


class ShotNoiseConfig(_Component):
    """Secondary-electron (SE) emission and its Poisson shot noise.

    Clean intensity ``c`` maps linearly to a mean SE yield ``se_yield_min + (se_yield_max -
    se_yield_min) * c`` (detected SEs per primary electron, collection efficiency included); the mean
    SE count of a pixel is ``dose_e_per_px * yield``. Off: no Poisson draw (the detector-gain stage,
    if on, still uses the mean count as its input).
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {
        "dose_e_per_px": (1e-3, 1e6),
        "se_yield_min": (0.0, 20.0),
        "se_yield_max": (1e-3, 20.0),
    }
    _log_fields: ClassVar[frozenset[str]] = frozenset({"dose_e_per_px"})

    dose_e_per_px: NoiseRange = _r(
        10.0,
        600.0,
        "primary electrons per pixel (e/px), drawn log-uniformly; sets the shot-noise level. With the "
        "other defaults, a wafer-like pattern (mean intensity 0.43) gives a median PSNR of about "
        "12 dB at 10 e/px and 27 dB at 600 e/px (tests/test_noise.py::"
        "test_default_range_spans_low_to_mild_psnr)",
        log=True,
    )
    se_yield_min: NoiseRange = _r(
        0.1, 0.3, "mean detected SEs per primary electron at clean intensity 0 (dark areas), SE/e"
    )
    se_yield_max: NoiseRange = _r(
        0.9, 1.5, "mean detected SEs per primary electron at clean intensity 1 (bright edges), SE/e"
    )

    @model_validator(mode="after")
    def _yield_increases(self) -> ShotNoiseConfig:
        if self.se_yield_max.low <= self.se_yield_min.high:
            raise ValueError(
                "se_yield_max.low must be > se_yield_min.high so that brighter pixels always emit more "
                f"SEs (got se_yield_min.high={self.se_yield_min.high}, "
                f"se_yield_max.low={self.se_yield_max.low})"
            )
        return self


class DetectorGainConfig(_Component):
    """Multiplicative excess noise of the scintillator/photomultiplier (Everhart-Thornley) chain.

    Each detected SE is amplified by a random gain of mean 1 and coefficient of variation ``cv``
    (gamma distributed), so the signal variance grows by the excess-noise factor ``1 + cv**2``.
    Everhart-Thornley detectors have ``cv`` about 0.3-0.7 (excess-noise factor 1.1-1.5); ``cv`` is
    bounded by 1, where the gamma sampler's accuracy is still within 0.012 in CDF.
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {"detector_gain_cv": (0.0, 1.0)}

    detector_gain_cv: NoiseRange = _r(
        0.3, 0.7, "coefficient of variation of the per-SE detector gain (dimensionless; std/mean)"
    )


class ReadNoiseConfig(_Component):
    """Additive Gaussian read/amplifier noise, independent per pixel."""

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {"read_noise_sigma": (0.0, 1.0)}

    read_noise_sigma: NoiseRange = _r(
        0.002, 0.015, "standard deviation of the Gaussian read noise, in output intensity units ([0, 1])"
    )


class ScanLineConfig(_Component):
    """Per-row (per scan line) offset and gain errors of the detector electronics.

    Every row ``y`` gets ``I -> (1 + g_y) * I + o_y`` with ``g_y ~ N(0, scan_line_gain_sigma)`` and
    ``o_y ~ N(0, scan_line_offset_sigma)`` (black-level clamp and gain ripple between lines).
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {
        "scan_line_offset_sigma": (0.0, 1.0),
        "scan_line_gain_sigma": (0.0, 1.0),
    }

    scan_line_offset_sigma: NoiseRange = _r(
        0.0, 0.02, "std of the per-row additive offset, in intensity units ([0, 1])"
    )
    scan_line_gain_sigma: NoiseRange = _r(
        0.0, 0.03, "std of the per-row relative gain error (dimensionless; 0.01 = 1 %)"
    )


class LineJitterConfig(_Component):
    """Horizontal jitter of the beam: each row is sampled shifted along the fast axis by ``dx_y``.

    ``dx_y ~ N(0, line_jitter_px)`` per row, applied with linear interpolation (sub-pixel shifts).
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {"line_jitter_px": (0.0, 64.0)}

    line_jitter_px: NoiseRange = _r(0.0, 0.2, "std of the per-row horizontal beam shift, in pixels")


class DriftConfig(_Component):
    """Slow brightness drift along the slow-scan axis (beam current / detector baseline drift).

    An additive smooth random profile over rows: Gaussian-filtered white noise with correlation length
    ``drift_corr_rows`` (kernel sigma, rows), scaled so its RMS is ``drift_amplitude``.
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {
        "drift_amplitude": (0.0, 1.0),
        "drift_corr_rows": (1.0, 4096.0),
    }

    drift_amplitude: NoiseRange = _r(0.0, 0.03, "RMS of the row brightness drift, in intensity units")
    drift_corr_rows: NoiseRange = _r(
        32.0, 512.0, "correlation length of the drift (Gaussian kernel sigma), in rows"
    )


class ChargingConfig(_Component):
    """Charging streaks: bright (charging) features leave a decaying bright tail along the fast axis.

    Surface charge builds up while the beam crosses intensity above ``charging_threshold`` and bleeds
    off with an exponential time constant of ``charging_decay_px`` pixels (a first-order RC model, unit
    DC gain); the charge adds ``charging_strength * charge`` to the following pixels' signal. A long
    bright region therefore gains ``strength * (I - threshold)`` and a thin one leaves a faint tail.
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {
        "charging_strength": (0.0, 5.0),
        "charging_decay_px": (0.1, 10_000.0),
    }

    charging_strength: NoiseRange = _r(
        0.0, 0.4, "added signal per unit of accumulated excess intensity (dimensionless)"
    )
    charging_decay_px: NoiseRange = _r(2.0, 24.0, "exponential decay length of the charging tail, in pixels")
    charging_threshold: float = Field(
        0.6, ge=0.0, le=1.0, description="clean intensity above which the surface charges ([0, 1])"
    )


class QuantizationConfig(_Component):
    """Analogue-to-digital conversion at the detector's bit depth, with a brightness/contrast window.

    ``adc_window`` chooses the output scale (it applies whether or not ``enabled``, which only switches
    the rounding to ``2**bit_depth`` codes):

    * ``clip`` (default): intensity ``quant_black_level`` maps to code 0 and ``quant_white_level`` to
      code ``2**bit_depth - 1``; codes are mapped back to the clean intensity scale and the output is
      clipped to ``[0, 1]``, so it stays aligned with the clean image. The clip censors the noise of
      every pixel within a few noise sigmas of 0 or 1: at low dose the mean is biased towards 0.5 and
      the variance is below ``a * I + b`` (at 2 e-/px: mean -0.30 and 0.2x the variance at I = 0.95).
    * ``headroom``: the window is widened by ``adc_headroom_sigma`` noise standard deviations below
      the black level and above the white level (the largest expected signal, charging included), and
      the window maps to ``[0, 1]`` (:func:`semray.noise.adc_window`). Only a signal that really leaves
      that window saturates, so the mean is unbiased and the variance is ``(a * I + b) / (white -
      black)**2`` at any dose; the clean image must be mapped to the same scale to serve as the target
      (:func:`semray.noise.clean_target`, which :func:`semray.data.add_noise_batch` and the evaluation
      apply). The window, so the image's contrast, depends on each image's noise level, like an
      operator's brightness/contrast set to fit a noisy histogram.
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {
        "quant_black_level": (-1.0, 1.0),
        "quant_white_level": (0.0, 2.0),
    }

    bit_depth: Literal[8, 12, 16] = Field(8, description="ADC bit depth (bits): 8, 12 or 16")
    quant_black_level: NoiseRange = _r(
        -0.04, 0.0, "intensity mapped to ADC code 0 (brightness), in intensity units"
    )
    quant_white_level: NoiseRange = _r(
        1.0, 1.08, "intensity mapped to the top ADC code (brightness + contrast), in intensity units"
    )
    adc_window: Literal["clip", "headroom"] = Field(
        "clip",
        description="output scale: 'clip' maps codes back to the clean scale and clips to [0, 1] (biased "
        "at low dose); 'headroom' widens the window by adc_headroom_sigma noise sigmas on each side and "
        "maps it to [0, 1], unbiased (the clean target must be mapped too: semray.noise.clean_target)",
    )
    adc_headroom_sigma: float = Field(
        5.0,
        ge=0.0,
        le=50.0,
        description="headroom of the 'headroom' window below the black and above the white level, in "
        "standard deviations of the noise expected there (dimensionless; ignored by 'clip')",
    )

    @model_validator(mode="after")
    def _window_open(self) -> QuantizationConfig:
        if self.quant_white_level.low <= self.quant_black_level.high:
            raise ValueError(
                "quant_white_level.low must be > quant_black_level.high (an empty ADC window) "
                f"(got {self.quant_black_level.high} >= {self.quant_white_level.low})"
            )
        return self


class BandwidthConfig(_Component):
    """Detector/amplifier bandwidth: noise correlated along the fast-scan axis x and between rows.

    The pixel-level fluctuations (shot + detector-gain + read noise: the noisy signal minus its
    expectation) pass a variance-preserving first-order (one-pole, AR(1)) filter along x with lag-1
    correlation ``fast_axis_corr``, then one along y with ``slow_axis_corr``: the noise's correlation
    between pixels ``dx`` columns and ``dy`` rows apart is ``fast_axis_corr**|dx| *
    slow_axis_corr**|dy|``, while its mean and its variance ``a * I + b`` at each intensity are those of
    the unfiltered noise (on flat regions; across an edge the variance is a local average). The signal
    itself is not blurred. Off by default; ``semray calibrate-noise`` measures both coefficients.
    """

    _bounds: ClassVar[dict[str, tuple[float, float]]] = {
        "fast_axis_corr": (0.0, 0.95),
        "slow_axis_corr": (0.0, 0.95),
    }

    enabled: bool = Field(False, description="apply this component (off: it leaves the image unchanged)")
    fast_axis_corr: NoiseRange = _r(
        0.0,
        0.6,
        "lag-1 correlation coefficient of the pixel noise along the fast-scan axis x (dimensionless, "
        "[0, 0.95]; lag k gives corr**k)",
    )
    slow_axis_corr: NoiseRange = _r(
        0.0,
        0.1,
        "lag-1 correlation coefficient of the pixel noise between adjacent rows, along y "
        "(dimensionless, [0, 0.95]; lag k gives corr**k)",
    )


class NoiseConfig(StrictModel):
    """The full SEM noise model: one sub-config per component, applied in :data:`PHYSICAL_ORDER`."""

    line_jitter: LineJitterConfig = Field(
        default_factory=LineJitterConfig, description="horizontal per-row beam jitter (fast axis x)"
    )
    charging: ChargingConfig = Field(
        default_factory=ChargingConfig, description="charging tails after bright features along rows"
    )
    shot: ShotNoiseConfig = Field(
        default_factory=ShotNoiseConfig, description="dose, SE yield and Poisson shot noise"
    )
    detector_gain: DetectorGainConfig = Field(
        default_factory=DetectorGainConfig, description="scintillator/PMT gain (excess) noise"
    )
    scan_lines: ScanLineConfig = Field(
        default_factory=ScanLineConfig, description="per-row offset and gain errors (slow axis y)"
    )
    drift: DriftConfig = Field(default_factory=DriftConfig, description="slow brightness drift over rows")
    read_noise: ReadNoiseConfig = Field(
        default_factory=ReadNoiseConfig, description="Gaussian read/amplifier noise"
    )
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="ADC quantisation and brightness/contrast window"
    )
    bandwidth: BandwidthConfig = Field(
        default_factory=BandwidthConfig,
        description="detector bandwidth: noise correlated along x (fast axis) and between rows (y)",
    )

    def only(self, *components: str) -> NoiseConfig:
        """A copy with exactly ``components`` enabled and every other component switched off."""
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown noise components {sorted(unknown)}; known: {list(COMPONENTS)}")
        data = self.model_dump()
        for name in COMPONENTS:
            data[name]["enabled"] = name in components
        return NoiseConfig.model_validate(data)


class NoiseParams(BaseModel):
    """The concrete noise parameters of one image (drawn by :func:`semray.noise.sample_params`).

    Field names match the range fields of :class:`NoiseConfig` (units documented there), plus one
    ``<component>_enabled`` flag per component. Parameters of a disabled component are still drawn
    and recorded (so the record has a fixed schema and the other draws do not move) but are ignored;
    filter on ``noise_<component>_enabled`` when analysing columns.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    line_jitter_enabled: bool
    line_jitter_px: float = Field(ge=0.0, description="std of the per-row horizontal shift, px")
    charging_enabled: bool
    charging_strength: float = Field(ge=0.0, description="charging tail strength, dimensionless")
    charging_decay_px: float = Field(gt=0.0, description="charging tail decay length, px")
    charging_threshold: float = Field(ge=0.0, le=1.0, description="charging intensity threshold")
    shot_enabled: bool
    dose_e_per_px: float = Field(gt=0.0, description="primary electrons per pixel, e/px")
    se_yield_min: float = Field(ge=0.0, description="SE yield at clean 0, SE/e")
    se_yield_max: float = Field(gt=0.0, description="SE yield at clean 1, SE/e")
    detector_gain_enabled: bool
    detector_gain_cv: float = Field(ge=0.0, description="per-SE gain coefficient of variation")
    scan_lines_enabled: bool
    scan_line_offset_sigma: float = Field(ge=0.0, description="per-row offset std, intensity units")
    scan_line_gain_sigma: float = Field(ge=0.0, description="per-row relative gain std")
    drift_enabled: bool
    drift_amplitude: float = Field(ge=0.0, description="drift RMS, intensity units")
    drift_corr_rows: float = Field(gt=0.0, description="drift correlation length, rows")
    read_noise_enabled: bool
    read_noise_sigma: float = Field(ge=0.0, description="read noise std, intensity units")
    quantization_enabled: bool
    bit_depth: int = Field(ge=1, le=16, description="ADC bits")
    quant_black_level: float = Field(description="intensity at ADC code 0")
    quant_white_level: float = Field(description="intensity at the top ADC code")
    adc_window: Literal["clip", "headroom"] = Field("clip", description="ADC output scale (see config)")
    adc_headroom_sigma: float = Field(5.0, ge=0.0, description="headroom of the 'headroom' window, sigmas")
    bandwidth_enabled: bool = False
    fast_axis_corr: float = Field(0.0, ge=0.0, le=0.95, description="lag-1 noise correlation along x")
    slow_axis_corr: float = Field(0.0, ge=0.0, le=0.95, description="lag-1 noise correlation along y")

    @model_validator(mode="after")
    def _consistent(self) -> NoiseParams:
        if self.se_yield_max <= self.se_yield_min:
            raise ValueError("se_yield_max must be > se_yield_min")
        if self.quant_white_level <= self.quant_black_level:
            raise ValueError("quant_white_level must be > quant_black_level")
        return self

    def as_columns(self) -> dict[str, float | int | bool]:
        """The record as flat ``noise_<field>`` columns (plain Python scalars)."""
        return {f"{COLUMN_PREFIX}{k}": v for k, v in self.model_dump().items()}

    @classmethod
    def from_columns(cls, row: Mapping[str, Any]) -> NoiseParams:
        """Inverse of :meth:`as_columns`; other keys of ``row`` (``clean``, ``noise_seed``, ...) are ignored.

        Accepts numpy scalars (as read back from Parquet). A column of a field that has a default (the
        ADC window mode and the bandwidth fields, added later) may be missing: records written before
        those fields existed were made without them, which is what the defaults say.
        """
        data = {}
        for name, field in cls.model_fields.items():
            key = f"{COLUMN_PREFIX}{name}"
            if key not in row:
                if not field.is_required():
                    continue
                raise KeyError(f"column {key!r} missing; cannot rebuild NoiseParams")
            v = row[key]
            data[name] = v.item() if isinstance(v, np.generic) else v
        return cls.model_validate(data)

    def replace(self, **changes: Any) -> NoiseParams:
        """A validated copy with some fields changed, e.g. ``p.replace(dose_e_per_px=8.0)``."""
        return type(self).model_validate({**self.model_dump(), **changes})

"""Config of clean wafer SEM pattern synthesis (:mod:`semray.synth`): geometry, SEM contrast, defects.

Most knobs are a :class:`Range`: every image draws its own value uniformly from ``[low, high]``, so a
data set spans a family of tools and process conditions; ``low == high`` pins a value. Lengths are in
pixels of the rendered image, grey levels in the library's ``[0, 1]`` intensity scale.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import Field, field_validator

from semray.config.base import Interval, StrictModel

PatternName = Literal["lines", "contacts", "contacts_staggered", "tin_balls"]
"""Pattern families :func:`semray.synth.render_wafer` can draw."""

DefectType = Literal[
    "bridge", "open", "missing_contact", "merged_contact", "missing_ball", "merged_ball", "particle"
]
"""Defect kinds; each pattern uses the ones that make sense for it (see ``semray.synth.PATTERN_DEFECTS``)."""

PATTERN_NAMES: tuple[str, ...] = get_args(PatternName)
DEFECT_TYPES: tuple[str, ...] = get_args(DefectType)

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class Range(Interval):
    """A closed interval ``[low, high]`` a value is drawn from uniformly, once per image.

    YAML accepts the mapping form ``{low: 2, high: 5}`` or the short list form ``[2, 5]``.
    """

    def sample(self, rng: np.random.Generator) -> float:
        """One uniform draw from ``[low, high]`` (always consumes one draw, even when low == high)."""
        return float(rng.uniform(self.low, self.high))


def _r(low: float, high: float, description: str) -> Any:
    """A Range field defaulting to ``[low, high]`` (a fresh model per config instance)."""
    return Field(default_factory=lambda: Range(low=low, high=high), description=description)


# Allowed [min, max] of both ends of each Range field: checked by one validator so the message names
# the field. Kept next to the fields so a new Range field without bounds is caught by the test suite.
_RANGE_BOUNDS: dict[str, tuple[float, float]] = {
    "line_pitch_px": (4.0, 4096.0),
    "line_duty": (0.1, 0.9),
    "ler_sigma_px": (0.0, 10.0),
    "ler_correlation_px": (0.0, 1000.0),
    "contact_pitch_px": (6.0, 4096.0),
    "contact_pitch_ratio_y": (0.5, 2.0),
    "contact_radius_px": (1.0, 2048.0),
    "tin_ball_radius_px": (1.5, 1024.0),
    "tin_ball_filler_radius_px": (1.0, 1024.0),
    "line_substrate_level": (0.0, 1.0),
    "line_level": (0.0, 1.0),
    "contact_surface_level": (0.0, 1.0),
    "contact_hole_level": (0.0, 1.0),
    "tin_substrate_level": (0.0, 1.0),
    "tin_ball_level": (0.0, 1.0),
    "particle_level": (0.0, 1.0),
    "edge_amplitude": (0.0, 1.0),
    "edge_width_px": (0.25, 20.0),
    "sphere_tilt_gain": (0.0, 1.0),
    "detector_shading": (0.0, 0.5),
    "blur_sigma_px": (0.0, 10.0),
    "bridge_width_px": (1.0, 256.0),
    "open_length_px": (1.0, 256.0),
    "merged_neck_fraction": (0.2, 1.0),
    "particle_radius_px": (1.0, 256.0),
}


class SynthConfig(StrictModel):
    """Everything :func:`semray.synth.render_wafer` needs to draw one clean wafer SEM image."""

    # -- which patterns -------------------------------------------------------------------------
    pattern_weights: dict[PatternName, NonNegative] = Field(
        default_factory=lambda: {"lines": 1.0, "contacts": 1.0, "contacts_staggered": 1.0, "tin_balls": 1.0},
        description="relative sampling weight of each pattern family (>= 0, not all zero; missing = 0)",
    )

    # -- line/space gratings ----------------------------------------------------------------------
    line_pitch_px: Range = _r(10.0, 28.0, "Line pitch (line + space), pixels.")
    line_duty: Range = _r(
        0.35, 0.6, "Line width (CD) as a fraction of the pitch; line and space are each kept >= 2 px."
    )
    line_horizontal_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="Probability that a grating runs horizontally instead of vertically."
    )
    ler_sigma_px: Range = _r(
        0.2, 0.8, "Line-edge roughness: standard deviation of each edge's displacement, pixels."
    )
    ler_correlation_px: Range = _r(
        4.0,
        16.0,
        "LER correlation length xi along the edge (autocorrelation exp(-(lag/xi)^2)), pixels; 0 = white.",
    )

    # -- contact-hole arrays ----------------------------------------------------------------------
    contact_pitch_px: Range = _r(12.0, 30.0, "Contact pitch along x, pixels.")
    contact_pitch_ratio_y: Range = _r(0.85, 1.2, "Pitch along y as a multiple of the x pitch.")
    contact_radius_px: Range = _r(
        3.0, 9.0, "Nominal hole radius, pixels; clipped so holes keep a >= 3 px wall to their neighbours."
    )
    contact_radius_jitter_px: float = Field(
        0.25,
        ge=0.0,
        le=5.0,
        description="Hole-to-hole CD variation: standard deviation of each hole's radius, pixels.",
    )
    contact_position_jitter_px: float = Field(
        0.3,
        ge=0.0,
        le=5.0,
        description="Placement error: standard deviation of each hole centre in x and y, pixels.",
    )

    # -- tin balls on carbon ----------------------------------------------------------------------
    tin_ball_radius_px: Range = _r(
        4.0, 13.0, "Radius of the large spheres (log-uniform within the range), pixels."
    )
    tin_ball_density: float = Field(
        0.85,
        ge=0.0,
        le=1.0,
        description="Probability that a cell of the large-sphere placement grid holds a sphere.",
    )
    tin_ball_filler_radius_px: Range = _r(
        1.5, 3.5, "Radius of the small spheres that fill the gaps between large ones, pixels."
    )
    tin_ball_filler_density: float = Field(
        0.45,
        ge=0.0,
        le=1.0,
        description="Probability that a small-sphere grid cell holds a sphere (before overlap rejection).",
    )
    tin_ball_gap_px: float = Field(
        1.0,
        ge=0.5,
        le=20.0,
        description="Minimum free gap between two spheres, pixels (spheres never overlap).",
    )

    # -- SEM contrast ---------------------------------------------------------------------------
    line_substrate_level: Range = _r(0.22, 0.32, "Grey level of the space (substrate) between lines.")
    line_level: Range = _r(0.40, 0.52, "Grey level of line tops (material contrast).")
    contact_surface_level: Range = _r(0.38, 0.50, "Grey level of the surface around contact holes.")
    contact_hole_level: Range = _r(
        0.04, 0.12, "Grey level of hole bottoms (few secondary electrons escape a hole)."
    )
    tin_substrate_level: Range = _r(0.10, 0.20, "Grey level of the carbon substrate under tin balls.")
    tin_ball_level: Range = _r(0.42, 0.55, "Grey level at the top of a tin ball (surface facing the beam).")
    particle_level: Range = _r(0.70, 0.90, "Grey level at the top of a particle defect.")
    edge_amplitude: Range = _r(
        0.25, 0.45, "Peak extra brightness of the secondary-electron edge effect at feature edges."
    )
    edge_width_px: Range = _r(
        0.8, 1.6, "Width (Gaussian sigma across the edge) of the edge-brightening band, pixels."
    )
    sphere_tilt_gain: Range = _r(
        0.15, 0.35, "Extra brightness of a sphere's steep flanks, times ``1 - cos(tilt)`` (secant-law yield)."
    )
    detector_shading: Range = _r(
        0.02, 0.10, "Side-detector shading of spheres: brightness gained by flanks facing the detector."
    )
    blur_sigma_px: Range = _r(0.5, 1.1, "Beam blur: Gaussian point-spread sigma, pixels (0 = no blur).")

    # -- defects --------------------------------------------------------------------------------
    defect_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="Probability that an image holds defects at all."
    )
    max_defects_per_image: int = Field(
        3, ge=1, le=64, description="An image with defects holds 1..max of them (uniform)."
    )
    defect_weights: dict[DefectType, NonNegative] = Field(
        default_factory=lambda: dict.fromkeys(DEFECT_TYPES, 1.0),
        description="relative weight of each defect type (>= 0; missing = 0), among those the pattern allows",
    )
    bridge_width_px: Range = _r(2.0, 5.0, "Extent of a bridge along the lines it joins, pixels.")
    open_length_px: Range = _r(2.0, 6.0, "Length of the gap an open cuts into a line, pixels.")
    merged_neck_fraction: Range = _r(
        0.5,
        0.85,
        "Radius of the neck joining two merged contacts or balls, as a fraction of the smaller radius.",
    )
    particle_radius_px: Range = _r(1.5, 4.5, "Particle radius, pixels.")
    particle_irregularity: float = Field(
        0.2,
        ge=0.0,
        le=0.5,
        description="Relative amplitude of the particle outline's random lobes (0 = round).",
    )
    mask_tolerance: float = Field(
        0.02,
        gt=0.0,
        le=0.5,
        description="Grey-level difference, defective vs defect-free render, above which a pixel is masked.",
    )

    @field_validator("pattern_weights")
    @classmethod
    def _some_pattern(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or sum(v.values()) <= 0:
            raise ValueError("at least one pattern needs a weight > 0")
        return v

    @field_validator(*_RANGE_BOUNDS)
    @classmethod
    def _range_within_bounds(cls, v: Range, info: Any) -> Range:
        lo, hi = _RANGE_BOUNDS[info.field_name]
        if v.low < lo or v.high > hi:
            raise ValueError(f"range [{v.low}, {v.high}] must lie within [{lo}, {hi}]")
        return v

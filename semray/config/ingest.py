"""Config of ``semray ingest``: bringing a user's own SEM image folders into the shard format.

Two modes: ``clean`` (clean references only; noise is synthesised later, as for synthetic shards) and
``pairs`` (matched noisy/clean acquisitions of the same field, found in two folders or in one folder by
a naming rule). Lengths are in pixels of the source image, grey levels in the library's ``[0, 1]`` scale.

YAML example (every key optional)::

    mode: pairs
    noisy_dir: fast_scans        # relative to SRC, or absolute
    clean_dir: slow_scans
    registration: true
    crop_size: 256
    databar: {mode: auto}
    val_fraction: 0.1
    test_fraction: 0.2
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from semray.config.base import StrictModel
from semray.io import DEFAULT_MAX_PIXELS


class DataBarConfig(StrictModel):
    """Removal of the burned-in SEM data bar (the info band with scale bar and text at the bottom).

    ``crop_rows > 0`` crops exactly that many bottom rows of every image and the detector is not run.
    Otherwise, with ``mode: auto``, :func:`semray.databar.detect_data_bar` looks for a bottom band of
    rows mostly at exactly one near-black or near-white grey level (a rendered graphic, not a noisy
    micrograph), holding sparse high-contrast text, under an image that is not uniform.
    """

    mode: Literal["auto", "off"] = Field("auto", description="'auto': detect and crop the bar; 'off': never")
    crop_rows: int = Field(
        0, ge=0, le=65535, description="fixed number of bottom rows to crop (px); 0 = none"
    )
    tolerance: float = Field(
        0.004,
        ge=0.0,
        le=0.2,
        description="a pixel is at the bar background within this ([0, 1] scale, ~1/255)",
    )
    min_uniform_fraction: float = Field(
        0.4, gt=0.0, le=1.0, description="a bar row has at least this fraction of pixels at the background"
    )
    dark_max: float = Field(0.1, ge=0.0, le=1.0, description="bar background at or below this is 'black'")
    light_min: float = Field(0.9, ge=0.0, le=1.0, description="bar background at or above this is 'white'")
    min_rows: int = Field(4, ge=1, le=4096, description="smallest bar height accepted (px)")
    max_fraction: float = Field(
        0.35, gt=0.0, le=0.9, description="largest bar height, fraction of image height"
    )
    max_gap_rows: int = Field(
        2,
        ge=0,
        le=64,
        description="non-flat rows tolerated inside the bar (tall glyphs, separator lines) (px)",
    )
    text_contrast: float = Field(
        0.25, gt=0.0, le=1.0, description="a text pixel differs from the bar background by more than this"
    )
    min_text_fraction: float = Field(
        0.001, ge=0.0, le=1.0, description="at least this fraction of bar pixels must be text"
    )
    max_text_fraction: float = Field(0.5, gt=0.0, le=1.0, description="at most this fraction may be text")
    max_flat_above_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="pixels above the bar at its level, at most this times the bar's own fraction",
    )

    @model_validator(mode="after")
    def _levels(self) -> DataBarConfig:
        if self.dark_max >= self.light_min:
            raise ValueError(f"dark_max ({self.dark_max}) must be below light_min ({self.light_min})")
        if self.min_text_fraction > self.max_text_fraction:
            raise ValueError("min_text_fraction must not exceed max_text_fraction")
        return self


class IngestConfig(StrictModel):
    """One ``semray ingest`` run: what to read, how to cut it, how to split it."""

    mode: Literal["clean", "pairs"] = Field(
        "clean", description="'clean': references only; 'pairs': matched noisy/clean images"
    )
    label: str = Field("real", min_length=1, max_length=64, description="value of the `pattern` column")
    noisy_dir: str | None = Field(
        None, description="pairs mode, two folders: folder of noisy images (relative to SRC or absolute)"
    )
    clean_dir: str | None = Field(
        None, description="pairs mode, two folders: folder of clean images matched by relative path"
    )
    pair_regex: str = Field(
        r"^(?P<key>.+)_(?P<role>noisy|clean)$",
        description="pairs mode, one folder: regex on the relative path without suffix, groups `key`, `role`",
    )
    noisy_role: str = Field(
        "noisy", min_length=1, description="value of the `role` group naming a noisy image"
    )
    clean_role: str = Field(
        "clean", min_length=1, description="value of the `role` group naming a clean image"
    )
    registration: bool = Field(False, description="pairs: register noisy onto clean with sub-pixel shift")
    upsample_factor: int = Field(
        20, ge=1, le=1000, description="registration precision is 1/upsample_factor px"
    )
    max_shift_px: float = Field(
        32.0, gt=0.0, description="reject a pair whose registration shift exceeds this (px)"
    )
    databar: DataBarConfig = Field(default_factory=DataBarConfig, description="SEM data bar removal")
    crop_size: int | None = Field(
        256, ge=8, le=16384, description="side of the square training crops (px); null = whole images"
    )
    stride: int | None = Field(
        None, ge=1, le=16384, description="step between crops (px); null = crop_size (no overlap)"
    )
    seed: int = Field(0, ge=0, description="split seed: a source's split is a hash of (seed, relative path)")
    val_fraction: float = Field(0.1, ge=0.0, le=1.0, description="expected fraction of sources in val")
    test_fraction: float = Field(0.1, ge=0.0, le=1.0, description="expected fraction of sources in test")
    rows_per_shard: int = Field(64, ge=1, le=100_000, description="crops per Parquet file")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="refuse single images with more pixels than this (px)"
    )

    @field_validator("pair_regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            rx = re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        if not {"key", "role"} <= set(rx.groupindex):
            raise ValueError("needs the named groups (?P<key>...) and (?P<role>...)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> IngestConfig:
        if self.val_fraction + self.test_fraction > 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} exceeds 1"
            )
        if (self.noisy_dir is None) != (self.clean_dir is None):
            raise ValueError("noisy_dir and clean_dir must be given together")
        if self.noisy_dir is not None and self.mode != "pairs":
            raise ValueError("noisy_dir/clean_dir need mode: pairs")
        if self.noisy_role == self.clean_role:
            raise ValueError("noisy_role and clean_role must differ")
        if self.crop_size is not None and self.stride is not None and self.stride > self.crop_size:
            # A stride above the crop size would silently drop the pixels between crops.
            raise ValueError(f"stride ({self.stride}) must not exceed crop_size ({self.crop_size})")
        return self

    @property
    def effective_stride(self) -> int | None:
        """Step between crops in px (``crop_size`` when ``stride`` is unset); None for whole images."""
        return None if self.crop_size is None else (self.stride or self.crop_size)

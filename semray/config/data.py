"""Config of a synthetic shard set: image size, split sizes, sharding, synthesis and noise settings."""

from __future__ import annotations

from pydantic import Field, field_validator

from semray.config.base import StrictModel
from semray.config.noise import NoiseConfig
from semray.config.synth import SynthConfig


def check_doses(v: list[float]) -> list[float]:
    """Validator body for a list of electron doses: at least one, every one > 0."""
    if not v or any(d <= 0 for d in v):
        raise ValueError("needs at least one dose and every dose must be > 0")
    return v


class PreviewConfig(StrictModel):
    """The preview figure written next to the shards."""

    n_images: int = Field(4, ge=1, le=16)
    """Rows of the grid (images taken from the start of the train split)."""
    doses_e_per_px: list[float] = Field(default_factory=lambda: [10.0, 40.0, 160.0, 600.0])
    """Electron doses (primary electrons per pixel) shown as noisy columns, low to high."""

    _positive = field_validator("doses_e_per_px")(check_doses)


class DatasetConfig(StrictModel):
    """A synthetic wafer shard set (``semray synth``)."""

    seed: int = Field(0, ge=0)
    """Seed of the whole set: image ``i`` of split ``s`` is rendered from ``default_rng([seed, s, i])``."""
    height: int = Field(256, ge=16, le=8192)
    """Image height in pixels (any value, not only powers of two)."""
    width: int = Field(256, ge=16, le=8192)
    """Image width in pixels."""
    n_train: int = Field(96, ge=0)
    """Number of training images."""
    n_val: int = Field(16, ge=0)
    """Number of validation images."""
    n_test: int = Field(16, ge=0)
    """Number of test images."""
    rows_per_shard: int = Field(64, ge=1, le=100_000)
    """Images per Parquet file."""
    synth: SynthConfig = Field(default_factory=SynthConfig)
    """Clean pattern and defect rendering."""
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    """Noise model used for previews and, by default, for training."""
    preview: PreviewConfig = Field(default_factory=PreviewConfig)
    """Preview figure settings."""

"""Model configuration: the U-Net and the variants the write-up tried, each one a config switch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from semray.config.base import StrictModel

NormKind = Literal["none", "batch", "group", "instance"]
UpsampleKind = Literal["transpose", "bilinear"]


class UNetConfig(StrictModel):
    """A 2-D U-Net for single-channel SEM images, float32 in [0, 1] in and out.

    Level ``i`` (0 = full resolution) has ``min(base_width * 2**i, max_width)`` feature channels; there
    are ``depth`` down-samplings, so inputs are padded internally to a multiple of ``2**depth`` pixels
    and cropped back. The defaults (depth 3, width 32 capped at 128, batch norm, transposed-conv
    up-sampling, direct prediction) give 1.27 M parameters (5.1 MB as float32 safetensors) and
    260 GFLOP per megapixel: the write-up found that a deeper network did not pay for its cost.
    """

    architecture: Literal["unet"] = Field(
        "unet", description="Model family discriminator; only 'unet' exists today."
    )
    depth: int = Field(
        3,
        ge=1,
        le=6,
        description="Number of 2x down-samplings (levels below full resolution); 'deeper U-Net' = 4 or 5.",
    )
    base_width: int = Field(
        32, ge=4, le=256, description="Feature channels at full resolution (channels, not pixels)."
    )
    max_width: int = Field(
        128,
        ge=4,
        le=1024,
        description="Cap on feature channels at any level (channels); keeps deep variants affordable.",
    )
    norm: NormKind = Field(
        "batch",
        description=(
            "Normalisation after each conv. 'batch' and 'none' make inference per-pixel deterministic and "
            "tile-independent; 'group' and 'instance' normalise per image, so tiled outputs depend on the "
            "tile's content."
        ),
    )
    norm_groups: int = Field(
        8,
        ge=1,
        le=64,
        description="Groups for norm='group' (reduced to gcd(groups, channels) at each layer).",
    )
    upsample: UpsampleKind = Field(
        "transpose",
        description="Decoder up-sampling: learned 2x2 transposed conv, or bilinear resize + 1x1 conv.",
    )
    residual: bool = Field(
        False,
        description=(
            "Predict the noise and subtract it (output = input - net(input)); the write-up found this "
            "less stable on SEM noise. The output is still the clean image, so losses are unchanged."
        ),
    )
    edge_input: bool = Field(
        False,
        description=(
            "Feed a Sobel edge-magnitude map (computed inside the model with kornia) as a second input "
            "channel; the write-up found no gain once the loss had an edge term."
        ),
    )

    @model_validator(mode="after")
    def _check_widths(self) -> UNetConfig:
        if self.max_width < self.base_width:
            raise ValueError(f"max_width ({self.max_width}) must be >= base_width ({self.base_width})")
        return self

    def widths(self) -> list[int]:
        """Feature channels at each level, full resolution first (``depth + 1`` entries)."""
        return [min(self.base_width * 2**i, self.max_width) for i in range(self.depth + 1)]

"""Loss configuration: the write-up's composite objective and the baselines it was compared against."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from semray.config.base import StrictModel

LossKind = Literal["composite", "mse_ssim", "l1"]
#: What the network is trained to reproduce (see :mod:`semray.selfsup`).
Objective = Literal["supervised", "n2v", "structn2v", "n2n"]

#: The standard five-scale MS-SSIM exponents (Wang, Simoncelli & Bovik 2003), finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


class BlindSpotMaskConfig(StrictModel):
    """Blind-spot mask of the n2v / structn2v objectives (see :mod:`semray.selfsup`)."""

    fraction: float = Field(
        0.02,
        gt=0.0,
        le=0.25,
        description="Blind (loss) pixels per crop, as a fraction of its pixels (Noise2Void uses 0.002-0.02).",
    )
    half_length: int = Field(
        2,
        ge=1,
        le=32,
        description=(
            "structn2v only: every blind pixel blinds the segment |d| <= half_length (px) along `axis`; set "
            "it to the noise's correlation length. n2v always blinds the single pixel."
        ),
    )
    axis: Literal["x", "y"] = Field(
        "x", description="Axis the noise is correlated along: x = fast scan (rows), as in SEM scan noise."
    )
    radius: int = Field(
        2,
        ge=1,
        le=16,
        description="Replacement values come from the (2 radius + 1)^2 window minus the segment (px).",
    )


class LossConfig(StrictModel):
    """Which training objective to use and its weights (all losses act on the clean-image estimate).

    * ``composite``: ``L = L_char + alpha * (1 - MS-SSIM) + beta * L_edge`` (the write-up's final loss;
      ``alpha = beta = 0`` is its stage-2 plain Charbonnier run).
    * ``mse_ssim``: ``L = MSE + ssim_lambda * (1 - SSIM)`` (the write-up's stage-1 baseline).
    * ``l1``: plain mean absolute error (the CARE-style baseline).

    ``defect_weight > 0`` adds ``defect_weight * L_char`` averaged over the (grown) defect pixels only,
    on top of any ``kind``; it is what makes the loss care about the rare pixels fabs care about most.

    MS-SSIM defaults (3 scales, 7-px window) work on crops of 25 px and up, so 64 x 64 and 128 x 128
    training crops are fine; the loss raises a clear error on crops too small for the chosen setting.

    ``objective`` picks what is trained against: ``supervised`` (the clean image, with ``kind``'s loss),
    or without clean references (:mod:`semray.selfsup`): ``n2v`` (Noise2Void blind spot), ``structn2v``
    (blind segment along the scan axis, ``mask``) or ``n2n`` (Noise2Noise: a second noisy frame). These
    train with ``selfsup_pixel_loss``; ``kind``'s loss is then only the ``val_loss`` against clean.
    """

    objective: Objective = Field(
        "supervised",
        description=(
            "Training target: supervised (clean), n2v, structn2v (blind spot, loss on masked pixels) or "
            "n2n (second noisy frame: shard column noisy2, else synthesised)."
        ),
    )
    mask: BlindSpotMaskConfig = Field(
        default_factory=BlindSpotMaskConfig, description="Blind-spot mask of n2v / structn2v."
    )
    selfsup_pixel_loss: Literal["mse", "l1"] = Field(
        "mse",
        description=(
            "Per-pixel loss of the n2v/structn2v/n2n objectives; mse (unbiased for zero-mean noise) or l1."
        ),
    )

    kind: LossKind = Field("composite", description="Objective: composite, mse_ssim (baseline) or l1.")
    charbonnier_eps: float = Field(
        1e-3,
        gt=0,
        le=0.1,
        description="Charbonnier epsilon (intensity units, image range 1): L1-like above it, L2-like below.",
    )
    alpha: float = Field(0.5, ge=0, le=100, description="Weight of the (1 - MS-SSIM) term (dimensionless).")
    beta: float = Field(0.5, ge=0, le=100, description="Weight of the Sobel edge term (dimensionless).")
    ssim_lambda: float = Field(
        0.2, ge=0, le=100, description="Weight of (1 - SSIM) in the mse_ssim baseline (dimensionless)."
    )
    ssim_win_size: int = Field(
        11, ge=3, le=21, description="Gaussian window of the baseline's SSIM (px, odd; crops must be >= it)."
    )
    ms_ssim_scales: int = Field(
        3, ge=1, le=5, description="Number of MS-SSIM scales (each a 2x down-sampling of the previous one)."
    )
    ms_ssim_weights: list[float] | None = Field(
        None,
        description=(
            "Per-scale MS-SSIM exponents, finest first, one per scale; default: the standard "
            "(0.0448, 0.2856, 0.3001, 0.2363, 0.1333) truncated to ms_ssim_scales. Renormalised to sum 1."
        ),
    )
    ms_ssim_win_size: int = Field(
        7, ge=3, le=21, description="Gaussian window of MS-SSIM (px, odd); coarsest scale must be >= it."
    )
    ms_ssim_win_sigma: float = Field(1.5, gt=0, le=5, description="Gaussian window sigma (px).")
    defect_weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description=(
            "Weight of an extra Charbonnier term averaged over the labelled defect pixels of the batch "
            "(masks grown by defect_grow_px): the defects are a few % of the pixels, so in the image-wide "
            "mean they hardly count. 0 = off. Supervised objective only; batches without defects add 0."
        ),
    )
    defect_grow_px: int = Field(
        3, ge=0, le=32, description="Defect masks are dilated by this many px (a square) for defect_weight."
    )

    @field_validator("ssim_win_size", "ms_ssim_win_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"window size must be odd, got {v}")
        return v

    @field_validator("ms_ssim_weights")
    @classmethod
    def _weights_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("weights must be >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _weights_match_scales(self) -> LossConfig:
        if self.ms_ssim_weights is not None and len(self.ms_ssim_weights) != self.ms_ssim_scales:
            raise ValueError(
                f"ms_ssim_weights has {len(self.ms_ssim_weights)} entries but ms_ssim_scales is "
                f"{self.ms_ssim_scales}"
            )
        return self

    @model_validator(mode="after")
    def _defect_weight_needs_clean(self) -> LossConfig:
        if self.defect_weight > 0 and self.objective != "supervised":
            raise ValueError(
                f"loss.defect_weight needs clean targets (objective: supervised), but objective is "
                f"{self.objective!r}"
            )
        return self

    def ms_ssim_scale_weights(self) -> list[float]:
        """The per-scale exponents actually used, renormalised to sum to 1."""
        raw = self.ms_ssim_weights or list(MS_SSIM_WEIGHTS[: self.ms_ssim_scales])
        total = sum(raw)
        return [w / total for w in raw]

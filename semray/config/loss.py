"""Loss configuration: the write-up's composite objective and the baselines it was compared against.

``loss`` is a union discriminated by ``kind`` (:data:`LossConfig`): :class:`CompositeLossConfig`,
:class:`MseSsimLossConfig` or :class:`L1LossConfig`. Each holds the fields common to every kind
(training objective, Charbonnier epsilon, defect term) plus only its own weights, so a weight the
chosen kind ignores is an error, not a silent no-op. ``kind`` defaults to ``composite``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, TypeAdapter, field_validator, model_validator

from semray.config.base import UNION_TAGS, StrictModel

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


_KIND_HELP = "Objective: composite, mse_ssim (baseline) or l1 (the other fields depend on it)."


class _LossCommon(StrictModel):
    """Fields every loss kind has: the training objective, the Charbonnier epsilon (also of the defect
    term) and the defect term.

    ``defect_weight > 0`` adds ``defect_weight * L_char`` averaged over the (grown) defect pixels only,
    on top of any ``kind``; it is what makes the loss care about the rare pixels fabs care about most.

    ``objective`` picks what is trained against: ``supervised`` (the clean image, with ``kind``'s loss),
    or without clean references (:mod:`semray.selfsup`): ``n2v`` (Noise2Void blind spot), ``structn2v``
    (blind segment along the scan axis, ``mask``) or ``n2n`` (Noise2Noise: a second noisy frame). These
    train with ``selfsup_pixel_loss``; ``kind``'s loss is then only the ``val_loss`` against clean.
    """

    kind: LossKind = Field("composite", description=_KIND_HELP)
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
    charbonnier_eps: float = Field(
        1e-3,
        gt=0,
        le=0.1,
        description=(
            "Charbonnier epsilon (intensity units, image range 1): L1-like above it, L2-like below; used by "
            "the composite loss and by the defect term of every kind."
        ),
    )
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

    @model_validator(mode="after")
    def _defect_weight_needs_clean(self) -> _LossCommon:
        if self.defect_weight > 0 and self.objective != "supervised":
            raise ValueError(
                f"loss.defect_weight needs clean targets (objective: supervised), but objective is "
                f"{self.objective!r}"
            )
        return self


def _odd(v: int) -> int:
    if v % 2 == 0:
        raise ValueError(f"window size must be odd, got {v}")
    return v


class CompositeLossConfig(_LossCommon):
    """``kind: composite``: ``L = L_char + alpha * (1 - MS-SSIM) + beta * L_edge`` (the write-up's final
    loss; ``alpha = beta = 0`` is its stage-2 plain Charbonnier run).

    MS-SSIM defaults (3 scales, 7-px window) work on crops of 25 px and up, so 64 x 64 and 128 x 128
    training crops are fine; the loss raises a clear error on crops too small for the chosen setting.
    Like every kind it also has the training objective (``objective``, ``mask``, ``selfsup_pixel_loss``),
    ``charbonnier_eps`` and the defect term (``defect_weight``, ``defect_grow_px``).
    """

    kind: Literal["composite"] = Field("composite", description=_KIND_HELP)
    alpha: float = Field(0.5, ge=0, le=100, description="Weight of the (1 - MS-SSIM) term (dimensionless).")
    beta: float = Field(0.5, ge=0, le=100, description="Weight of the Sobel edge term (dimensionless).")
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

    _odd_window = field_validator("ms_ssim_win_size")(_odd)

    @field_validator("ms_ssim_weights")
    @classmethod
    def _weights_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("weights must be >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _weights_match_scales(self) -> CompositeLossConfig:
        if self.ms_ssim_weights is not None and len(self.ms_ssim_weights) != self.ms_ssim_scales:
            raise ValueError(
                f"ms_ssim_weights has {len(self.ms_ssim_weights)} entries but ms_ssim_scales is "
                f"{self.ms_ssim_scales}"
            )
        return self

    def ms_ssim_scale_weights(self) -> list[float]:
        """The per-scale exponents actually used, renormalised to sum to 1."""
        raw = self.ms_ssim_weights or list(MS_SSIM_WEIGHTS[: self.ms_ssim_scales])
        total = sum(raw)
        return [w / total for w in raw]


class MseSsimLossConfig(_LossCommon):
    """``kind: mse_ssim``: ``L = MSE + ssim_lambda * (1 - SSIM)`` (the write-up's stage-1 baseline)."""

    kind: Literal["mse_ssim"] = Field(description=_KIND_HELP)
    ssim_lambda: float = Field(
        0.2, ge=0, le=100, description="Weight of (1 - SSIM) in the mse_ssim baseline (dimensionless)."
    )
    ssim_win_size: int = Field(
        11, ge=3, le=21, description="Gaussian window of the baseline's SSIM (px, odd; crops must be >= it)."
    )

    _odd_window = field_validator("ssim_win_size")(_odd)


class L1LossConfig(_LossCommon):
    """``kind: l1``: plain mean absolute error (the CARE-style baseline)."""

    kind: Literal["l1"] = Field(description=_KIND_HELP)


#: The config class of each loss kind.
LOSS_KINDS: dict[str, type[_LossCommon]] = {
    "composite": CompositeLossConfig,
    "mse_ssim": MseSsimLossConfig,
    "l1": L1LossConfig,
}
#: Loss fields that belong to one kind only, with that kind.
KIND_FIELDS: dict[str, str] = {
    name: kind
    for kind, cls in LOSS_KINDS.items()
    for name in cls.model_fields
    if name not in _LossCommon.model_fields
}


def _default_kind_and_moved_keys(data: Any) -> Any:
    """``kind`` defaults to ``composite``; a field of another kind (a config written before the loss
    became per-kind, where every kind's weights were accepted and ignored) is an error naming it."""
    if not isinstance(data, dict):
        return data
    data = {"kind": "composite", **data} if "kind" not in data else data
    kind = data["kind"]
    if kind not in LOSS_KINDS:
        return data  # the discriminator names the allowed kinds
    moved = sorted(k for k in data if KIND_FIELDS.get(k, kind) != kind)
    if moved:
        detail = ", ".join(f"loss.{k} (a field of kind {KIND_FIELDS[k]!r})" for k in moved)
        raise ValueError(
            f"loss kind {kind!r} has no {detail}: since the loss config is per kind, each kind holds only "
            "its own weights; remove these keys or set loss.kind to the kind they belong to"
        )
    return data


def drop_fields_of_other_kinds(loss: dict[str, Any]) -> list[str]:
    """Remove from a ``loss`` mapping (in place) the weights its ``kind`` does not have; returns their
    names. For mappings whose extra weights never had an effect: a Tune trial that drew another kind
    than its base, a run folder's config saved before the loss became per kind. Configs a user writes
    go through the validator instead, which rejects such keys by name."""
    kind = loss.get("kind", "composite")
    dropped = [k for k in loss if KIND_FIELDS.get(k, kind) != kind]
    for k in dropped:
        del loss[k]
    return dropped


#: The ``loss`` section: one of the kinds above, chosen by ``kind`` (default ``composite``).
LossConfig = Annotated[
    Union[CompositeLossConfig, MseSsimLossConfig, L1LossConfig],  # noqa: UP007 (a discriminated union)
    Field(discriminator="kind"),
    BeforeValidator(_default_kind_and_moved_keys),
]
_LOSS_ADAPTER: TypeAdapter[Any] = TypeAdapter(LossConfig)
UNION_TAGS["loss"] = frozenset(LOSS_KINDS)


def loss_config(data: dict[str, Any] | None = None, **fields: Any) -> LossConfig:
    """Validate a ``loss`` mapping (or keyword fields) into the config of its kind.

    Raises:
        pydantic.ValidationError: a bad value, an unknown kind, or a field of another kind.
    """
    return _LOSS_ADAPTER.validate_python({**(data or {}), **fields})

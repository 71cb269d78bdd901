"""Config of ``semray adapt``: adapt a denoiser to a user's noisy images (no clean references).

One object, validated before any work starts and logged in full (MLflow params of the parent run and
``adapt.yaml`` in the output folder). YAML example (every key optional)::

    init: default
    frames: false
    user: {tile_px: 256, val_fraction: 0.2, weight: 0.6, proxy_rounds: 1}
    synthetic: {n_train: 32, size_px: 256, weight: 0.4}
    optim: {epochs: 8, steps_per_epoch: 60, lr: 2.0e-4}
    selection: {fraction: 0.05, repeats: 4}
    report: {max_images: 8, crop_px: 192}
    mlflow: {experiment: semray-adapt, registered_model: semray-adapted, alias: adapted}
    train: {scaling: {num_workers: 2}}     # any TrainConfig field, merged last

Defaults are sized for the budget in the README: 20 images of 1024 x 1024 in at most 30 minutes on a
2-core CPU (see docs/adapt.md for how that was estimated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from semray.config.base import StrictModel, deep_merge, load_config
from semray.config.train import TrainConfig

if TYPE_CHECKING:
    from semray.config.noise import NoiseConfig

#: Name of the user-content source in the training mix (metric suffix ``val_psnr/user``).
USER_SOURCE = "user"
#: Name of the synthetic-pattern source in the training mix.
SYNTH_SOURCE = "synthetic"
#: Name of the self-supervised source of the user's noisy tiles (``user.selfsup``).
USER_NOISY_SOURCE = "user_noisy"


class UserSelfSupSection(StrictModel):
    """A self-supervised term on the user's own noisy pixels: their training tiles as a third source of the
    mix, trained blind-spot (structN2V, mask along the fast axis) or, with ``frames``, Noise2Noise."""

    enabled: bool = Field(
        False, description="Add the user's noisy training tiles as a self-supervised source."
    )
    weight: float = Field(
        0.3, gt=0, le=1000, description="Share of the training crops from the noisy tiles (like user.weight)."
    )
    objective: Literal["auto", "structn2v", "n2v", "n2n"] = Field(
        "auto",
        description="auto: n2n between consecutive registered scans with `frames`, else structn2v with the "
        "blind segment's half-length from the calibrated fast-axis correlation (selection.half_length when "
        "set; n2v when no correlation was detected). n2n needs `frames`.",
    )


class UserContentSection(StrictModel):
    """The user's own content: denoised (or frame-averaged) images as clean proxies, re-noised in training."""

    tile_px: int = Field(
        256,
        ge=32,
        le=4096,
        description="Side of the tiles the proxies are cut into (px; smaller images: one tile).",
    )
    val_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of the tiles held back (at least one): never trained on, they validate the "
        "synthetic pairs (val_*/user) and, noisy, select the checkpoint without clean images.",
    )
    weight: float = Field(
        0.6, gt=0, le=1000, description="Share of the training crops from the user's content."
    )
    min_side_px: int = Field(
        64,
        ge=32,
        le=4096,
        description="Smallest image side accepted (px); smaller images are refused by name.",
    )
    selfsup: UserSelfSupSection = Field(
        default_factory=UserSelfSupSection,
        description="Self-supervised term on the noisy tiles (off by default).",
    )
    proxy_rounds: int = Field(
        1,
        ge=1,
        le=8,
        description="Proxy refinement rounds. 1: the init model's outputs are the proxies of the whole "
        "fine-tune. R > 1: optim.epochs (>= R) are split between R rounds (same total steps; the later rounds "
        "get the remainder); after each round the images are denoised again with that round's chosen "
        "checkpoint as the next round's proxies (same tiles held back), and the next round trains on from "
        "that checkpoint. The final checkpoint is chosen among every round's and compared with the init "
        "model, as with one round. Each extra round adds one denoising pass over the images and one "
        "training start-up. Not with `frames` (the proxies are frame averages).",
    )


class SyntheticSection(StrictModel):
    """semray's own wafer patterns, noised with the fitted noise model."""

    n_train: int = Field(32, ge=1, le=100_000, description="Synthetic training images.")
    n_val: int = Field(4, ge=1, le=10_000, description="Synthetic validation images (val_*/synthetic).")
    size_px: int = Field(256, ge=32, le=4096, description="Side of the synthetic images (px).")
    weight: float = Field(
        0.4, gt=0, le=1000, description="Share of the training crops from synthetic patterns."
    )
    seed: int = Field(0, ge=0, description="Seed of the synthetic set.")


class AdaptOptimSection(StrictModel):
    """The fine-tune's length and learning rate (the rest: TrainConfig defaults, or ``train``)."""

    epochs: int = Field(8, ge=1, le=10_000, description="Epochs; every epoch's checkpoint is a candidate.")
    steps_per_epoch: int = Field(60, ge=1, le=1_000_000, description="Optimiser steps per worker per epoch.")
    lr: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate (the fine-tune default).")
    crop_px: int = Field(64, ge=16, le=1024, description="Training crop side (px).")
    batch_size: int = Field(8, ge=1, le=1024, description="Crops per step per worker.")
    num_workers: int = Field(2, ge=1, le=1024, description="Ray Train workers.")


class SelectionSection(StrictModel):
    """Choosing the checkpoint without clean images (see semray.adapt.select)."""

    fraction: float = Field(
        0.05, gt=0.0, le=0.25, description="Blind pixels per held-back crop and mask draw (structN2V score)."
    )
    repeats: int = Field(
        4, ge=1, le=64, description="Independent mask draws per crop (more: lower variance)."
    )
    crop_px: int = Field(128, ge=32, le=1024, description="Side of the held-back noisy crops scored (px).")
    max_crops: int = Field(
        64,
        ge=1,
        le=10_000,
        description="At most this many held-back crops are scored: every other one chooses the epoch, the "
        "rest compare it with the init model (all of them for both below 4).",
    )
    half_length: int | None = Field(
        None,
        ge=0,
        le=32,
        description="structN2V blind segment half-length along x (px); None = from the calibrated fast-axis "
        "correlation length (0 when no correlation was detected).",
    )
    seed: int = Field(0, ge=0, description="Seed of the masks (the same masks score every checkpoint).")


class ReportSection(StrictModel):
    """The no-reference report on the user's images (shipped vs adapted)."""

    max_images: int = Field(8, ge=1, le=10_000, description="Images denoised for the report (the first N).")
    crop_px: int = Field(192, ge=32, le=2048, description="Side of the side-by-side crops (px).")
    max_lag: int = Field(6, ge=1, le=64, description="Largest lag of the residual autocorrelation (px).")


class AdaptMlflowSection(StrictModel):
    """The parent run and the registered model."""

    experiment: str = Field(
        "semray-adapt", min_length=1, description="MLflow experiment (parent and child run)."
    )
    registered_model: str = Field(
        "semray-adapted", min_length=1, description="Registry name of the adapted model."
    )
    alias: str = Field(
        "adapted",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="Alias set on it (models:/NAME@ALIAS).",
    )
    alias_requires: Literal["better", "any"] = Field(
        "better",
        description="better: the alias moves to the new version only when the no-reference verdict says the "
        "adapted model is better than the init model (the version is registered either way, tagged "
        "semray.verdict, so jobs that use models:/NAME@ALIAS keep the last model that earned it); any: it "
        "moves whatever the verdict.",
    )


class AdaptConfig(StrictModel):
    """One ``semray adapt`` run."""

    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of training (noise, crops) and the tile split."
    )
    init: str = Field(
        "default",
        min_length=1,
        description="Model to adapt: 'default' (shipped), a folder, models:/NAME@ALIAS.",
    )
    frames: bool = Field(
        False,
        description="The images are repeated scans of ONE field: register them to the first and use their "
        "average as the clean proxy (instead of the init model's output); the checkpoint is then chosen by a "
        "Noise2Noise score between independent scans.",
    )
    frames_max_shift_px: float = Field(
        16.0,
        ge=0,
        le=4096,
        description="With `frames`: the largest drift between scans searched by the registration (px, per "
        "axis). A periodic pattern correlates almost equally at every multiple of its period, so an unbounded "
        "search picks a far peak under noise (17-20 px measured on exact scans of a line array).",
    )
    user: UserContentSection = Field(default_factory=UserContentSection, description="User content source.")
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection, description="Synthetic source.")
    optim: AdaptOptimSection = Field(default_factory=AdaptOptimSection, description="Fine-tune budget.")
    selection: SelectionSection = Field(default_factory=SelectionSection, description="Checkpoint choice.")
    report: ReportSection = Field(default_factory=ReportSection, description="No-reference report.")
    mlflow: AdaptMlflowSection = Field(default_factory=AdaptMlflowSection, description="Tracking, registry.")
    keep_work: bool = Field(
        False,
        description="Keep the shards and training checkpoints under OUT/work (else removed at the end).",
    )
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra TrainConfig fields merged last (e.g. {scaling: {cpus_per_worker: 0.5}}); validated "
        "as a TrainConfig before any work starts.",
    )

    @model_validator(mode="after")
    def _n2n_needs_frames(self) -> AdaptConfig:
        s = self.user.selfsup
        if s.enabled and s.objective == "n2n" and not self.frames:
            raise ValueError(
                "user.selfsup.objective n2n needs two scans of one field (frames: true / --frames); use "
                "structn2v or auto for independent images"
            )
        return self

    @model_validator(mode="after")
    def _rounds_fit(self) -> AdaptConfig:
        problem = rounds_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _train_overrides_valid(self) -> AdaptConfig:
        # Built here so a bad `train` entry fails before calibration, naming the field.
        from semray.config.base import ConfigError

        try:
            build_train_config(
                self, noise=None, user_shards="user", synth_shards="synthetic", storage="runs",
                selfsup=SelfSupSource("user_noisy", "structn2v", 2) if self.user.selfsup.enabled else None,
            )  # fmt: skip
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1].strip()
            raise ValueError(f"`train` does not make a valid TrainConfig: {detail}") from None
        return self


def rounds_problem(cfg: AdaptConfig) -> str | None:
    """Why ``user.proxy_rounds`` cannot run with the rest of ``cfg`` (None: it can). Also checked by the
    driver, for configs copied without validation (``model_copy``)."""
    rounds = cfg.user.proxy_rounds
    if rounds > 1 and cfg.frames:
        return (
            f"user.proxy_rounds {rounds} does not apply with frames (--frames): the proxy is the average of "
            "the registered scans, not a model's output; set user.proxy_rounds to 1"
        )
    if rounds > cfg.optim.epochs:
        return (
            f"user.proxy_rounds {rounds} needs at least as many optim.epochs (got {cfg.optim.epochs}): the "
            "epochs are split between the rounds"
        )
    return None


@dataclass(frozen=True)
class SelfSupSource:
    """The resolved self-supervised source (``user.selfsup``): its shard folder, objective (``n2v``,
    ``structn2v`` or ``n2n``) and structN2V blind-segment half-length (px, >= 1; ``loss.mask``)."""

    shards: str
    objective: str
    half_length: int


def build_train_config(
    cfg: AdaptConfig,
    noise: NoiseConfig | None,
    user_shards: str,
    synth_shards: str,
    storage: str,
    run_name: str | None = None,
    crop_px: int | None = None,
    val_crop_px: int = 128,
    selfsup: SelfSupSource | None = None,
) -> TrainConfig:
    """The fine-tune: the init model on a mix of the user's content and synthetic patterns.

    Both sources are ``noise: synthesize``: their clean (proxy) images get the *fitted* noise, fresh
    every epoch (fixed for validation), so every training pair is (fitted noise on X, X). With
    ``selfsup`` a third source trains on the user's own noisy training tiles as they are
    (``noise: as_is``) with a self-supervised objective; it has no validation rows. Every epoch is
    checkpointed (``keep_best = epochs``) because the checkpoint is chosen afterwards without clean
    images; the child run registers nothing itself (the chosen one is registered by the driver).

    Args:
        cfg: the adapt config. noise: the fitted noise model (None: the TrainConfig default, for checks).
        user_shards, synth_shards: shard folders of the two sources. storage: Ray Train storage path.
        crop_px: training crop side (None: ``cfg.optim.crop_px``; smaller when the tiles are smaller).
        val_crop_px: side of the fixed validation crops (<= the smallest tile).
        selfsup: the self-supervised source of the noisy tiles (None: none).
    """
    o = cfg.optim
    sources = [
        {"name": USER_SOURCE, "shards": user_shards, "weight": cfg.user.weight},
        {"name": SYNTH_SOURCE, "shards": synth_shards, "weight": cfg.synthetic.weight},
    ]
    if selfsup is not None:
        sources.append(
            {"name": USER_NOISY_SOURCE, "shards": selfsup.shards, "weight": cfg.user.selfsup.weight,
             "noise": "as_is", "objective": selfsup.objective}
        )  # fmt: skip
    base: dict[str, Any] = {
        "seed": cfg.seed,
        "init": cfg.init,
        "data": {
            "sources": sources,
            "crop_px": crop_px or o.crop_px,
            "batch_size": o.batch_size,
            "crops_per_image": 4,
            "val_crop_px": val_crop_px,
            "val_max_images": 16,
        },
        # BatchNorm statistics stay the init model's: re-estimating them from the fine-tune's 8-crop
        # batches alone cost 0.8-1.0 dB of val PSNR at lr 0 (docs/adapt.md, "Why BatchNorm is frozen")
        "optim": {
            "epochs": o.epochs,
            "steps_per_epoch": o.steps_per_epoch,
            "lr": o.lr,
            "freeze_batchnorm": True,
        },
        "validation": {"metric": f"val_psnr/{USER_SOURCE}", "figure_every": 0},
        "scaling": {"num_workers": o.num_workers},
        "checkpoint": {"keep_best": o.epochs},
        "mlflow": {"experiment": cfg.mlflow.experiment, "register_model": False, "alias": None},
        "run": {"storage_path": storage, "name": run_name},
    }
    if noise is not None:
        base["noise"] = noise.model_dump(mode="json")
    if selfsup is not None:
        base["loss"] = {"mask": {"half_length": selfsup.half_length}}
    return load_config(TrainConfig, deep_merge(base, cfg.train))

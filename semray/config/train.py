"""Config of one training run (``semray train``): data, noise, model, loss, optimiser, validation,
workers, checkpoints, MLflow, run location.

Every section is a :class:`~semray.config.base.StrictModel`; the whole object is validated before any
work starts and logged to MLflow as flattened params. YAML example (every key optional)::

    seed: 0
    data:
      shards: [data/wafers]
      crop_px: 64
      batch_size: 16
    noise: {shot: {dose_e_per_px: [1.5, 400]}}
    model: {base_width: 16, depth: 3}
    loss: {kind: composite, alpha: 0.5, beta: 0.5}
    optim: {lr: 2.0e-3, epochs: 20, schedule: cosine}
    scaling: {num_workers: 2, cpus_per_worker: 1}
    mlflow: {experiment: semray-train, registered_model: semray-unet}
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from semray.config.base import StrictModel
from semray.config.data import DatasetConfig
from semray.config.loss import CompositeLossConfig, LossConfig, MseSsimLossConfig, Objective
from semray.config.model import UNetConfig
from semray.config.noise import NoiseConfig

#: Validation metrics a run can be scored on (all reported every epoch, prefixed ``val_``).
VALIDATION_METRICS: dict[str, Literal["max", "min"]] = {
    "val_psnr": "max",
    "val_ssim": "max",
    "val_psnr_gain": "max",
    "val_loss": "min",
    "val_edge_preservation": "max",
    "val_gradient_correlation": "max",
    "val_defect_recall": "max",
    "val_defect_contrast": "max",
}


#: Allowed shard source names: they become metric-name suffixes (``val_psnr/<name>``) and MLflow keys.
SOURCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ShardSource(StrictModel):
    """One named set of shards in a training mix, drawn from in proportion to its ``weight``."""

    name: str = Field(
        pattern=SOURCE_NAME_PATTERN,
        description="Name of the source, unique in the mix; validation metrics are also reported as "
        "`val_<metric>/<name>`.",
    )
    shards: list[str] = Field(
        min_length=1,
        description="Shard folders or files of this source (a single string is accepted).",
    )
    weight: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Relative share of the training crops drawn from this source (normalised over the mix).",
    )
    noise: Literal["synthesize", "as_is"] = Field(
        "synthesize",
        description=(
            "synthesize: clean references get synthetic noise from the `noise` section (fresh each epoch); "
            "as_is: real noisy/clean pairs, the shards' `noisy` column is used as it is (no noise on top). "
            "For a self-supervised source (`objective`), as_is trains on the shards' acquired `noisy` (and, "
            "for n2n, `noisy2`) frames and needs no `clean` column; synthesize noises `clean`."
        ),
    )
    objective: Objective | None = Field(
        None,
        description=(
            "Training target of this source's crops: supervised (clean), n2v, structn2v (blind spot on the "
            "noisy crop, loss on the masked pixels; mask from `loss.mask`) or n2n (second noisy frame). "
            "None = `loss.objective`. Each crop is scored by its own source's objective; the batch loss is "
            "the sum of the objectives' losses weighted by their share of the batch's crops."
        ),
    )

    @field_validator("shards", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


def _source_shard_list(sources: object) -> list[str] | None:
    """All shard paths named by raw ``sources`` input, in order, without duplicates (None if unreadable)."""
    if not isinstance(sources, (list, tuple)):
        return None
    out: list[str] = []
    for s in sources:
        sh = s.get("shards") if isinstance(s, dict) else getattr(s, "shards", None)
        paths = [sh] if isinstance(sh, str) else sh
        if not isinstance(paths, (list, tuple)):
            return None
        out.extend(str(p) for p in paths if str(p) not in out)
    return out


class TrainDataConfig(StrictModel):
    """Where the training images come from and how they become batches."""

    shards: list[str] = Field(
        default_factory=lambda: ["data/shards"],
        min_length=1,
        description=(
            "Shard folders or files (Parquet, semray.io schema). Rows with split 'train' are trained on, "
            "rows with split 'val' validate. A single string is accepted."
        ),
    )
    sources: list[ShardSource] | None = Field(
        None,
        description=(
            "A mix of named shard sources with weights and noise modes, e.g. real clean references "
            "(noise: synthesize), real noisy/clean pairs (noise: as_is) and synthetic wafers. Each epoch "
            "draws crops from every source in proportion to its weight; validation metrics are also "
            "reported per source. Give either `shards` (one source) or `sources`; with `sources`, `shards` "
            "is filled in as the list of all their folders."
        ),
    )
    generate: DatasetConfig | None = Field(
        None,
        description=(
            "If set and the (single) shard folder holds no shards yet, render this synthetic set into it "
            "first (what `semray synth` does), so one config reproduces a run from nothing."
        ),
    )
    crop_px: int = Field(64, ge=16, le=2048, description="Side of the square training crops (px).")
    crops_per_image: int = Field(
        1,
        ge=1,
        le=256,
        description="Random crops taken from each noisy image per epoch (amortises noise synthesis).",
    )
    defect_crop_prob: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Probability that a crop of an image with defects is placed over a defect (else uniform): "
            "defects are a few pixels of a large field and would otherwise be rare in training."
        ),
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Crops per optimiser step, per worker.")
    flips: bool = Field(True, description="Random horizontal/vertical flips (same for noisy and clean).")
    rot90: bool = Field(
        False,
        description=(
            "Random 90-degree rotations. Off by default: SEM noise is anisotropic (scan lines run along x), "
            "so a rotated noisy crop shows noise the microscope never makes."
        ),
    )
    shuffle_buffer: int = Field(
        64, ge=0, le=100_000, description="Rows in each worker's local shuffle buffer (0 = no shuffle)."
    )
    noise_batch_images: int = Field(
        4, ge=1, le=1024, description="Images per Ray Data noise-synthesis task (batch size of that stage)."
    )
    val_max_images: int | None = Field(
        16,
        ge=1,
        le=100_000,
        description="Validate on the first N val images (by image_id; per source with `sources`); None = all.",
    )
    val_noise_seed: int = Field(
        20240917,
        ge=0,
        description=(
            "Seed of the fixed validation noise (epoch 0 of image_rng). Independent of the run seed, so runs "
            "and tuning trials with different seeds are scored on the same noisy images."
        ),
    )
    val_crop_px: int | None = Field(
        128,
        ge=16,
        le=8192,
        description=(
            "Side of the fixed validation crop (px), centred on a defect where the image has one, else on "
            "the image centre; None = whole images (slower)."
        ),
    )

    @field_validator("shards", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _shards_from_sources(cls, data: object) -> object:
        # With a mix, `shards` is derived (all sources' folders) so code reading it keeps working and a
        # dumped config loads back; a different explicit `shards` is a contradiction.
        if not isinstance(data, dict) or data.get("sources") is None:
            return data
        if data["sources"] == []:
            raise ValueError("data.sources is empty; name at least one source or use data.shards")
        derived = _source_shard_list(data["sources"])
        if derived is None:
            return data  # malformed sources: let field validation name the problem
        given = data.get("shards")
        if given is not None:
            given_l = [given] if isinstance(given, str) else list(given)
            if [str(g) for g in given_l] != derived:
                raise ValueError(
                    "give either data.shards (one source) or data.sources (a mix), not both; with "
                    f"data.sources, data.shards is filled in as all their folders ({derived})"
                )
        return {**data, "shards": derived}

    @model_validator(mode="after")
    def _mix_is_consistent(self) -> TrainDataConfig:
        if self.sources is None:
            return self
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.sources: names must be unique, repeated: {dupes}")
        if self.generate is not None:
            raise ValueError(
                "data.generate renders one synthetic set into data.shards; with data.sources render it "
                "first (`semray synth --out FOLDER`) and list FOLDER as a source"
            )
        return self

    def source_objective(self, source: ShardSource, default: str) -> str:
        """The objective ``source`` trains with: its own, else ``default`` (``loss.objective``)."""
        return source.objective or default

    @property
    def mix_weights(self) -> dict[str, float]:
        """Normalised weight of each source (empty without ``sources``)."""
        if not self.sources:
            return {}
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


class OptimConfig(StrictModel):
    """AdamW, a learning-rate schedule, precision and clipping."""

    lr: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="AdamW decoupled weight decay.")
    schedule: Literal["cosine", "onecycle", "constant"] = Field(
        "cosine",
        description=(
            "cosine: linear warm-up then cosine decay to lr*min_lr_ratio; onecycle: warm-up from lr/25 over "
            "warmup_fraction of all steps, then cosine decay to lr*min_lr_ratio; constant: lr throughout."
        ),
    )
    warmup_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Fraction of all optimiser steps spent warming up."
    )
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr.")
    epochs: int = Field(20, ge=1, le=100_000, description="Maximum number of epochs.")
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Cap on optimiser steps per worker per epoch; None = one pass over the crops.",
    )
    grad_clip_norm: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this (0 = off).")
    amp: bool = Field(True, description="bfloat16 autocast on GPU workers (ignored on CPU).")
    channels_last: bool = Field(True, description="channels_last memory format on GPU workers.")
    freeze_batchnorm: bool = Field(
        False,
        description=(
            "Keep BatchNorm layers in eval mode while training: normalise with the running statistics "
            "and never update them (their scale/shift stay trainable). For fine-tuning: re-estimating "
            "the statistics from small batches cost the shipped model 0.8-1.0 dB even at lr 0 "
            "(docs/adapt.md). No effect on models without BatchNorm."
        ),
    )


class ValidationConfig(StrictModel):
    """What is measured each epoch and how the best checkpoint and early stopping are chosen."""

    metric: str = Field(
        "val_psnr",
        description=(
            f"Score of a checkpoint / early stopping: one of {sorted(VALIDATION_METRICS)}, or with "
            "`data.sources` one of them on a single source, `<metric>/<source name>` (e.g. "
            "`val_psnr/real_pairs`: choose the model by how it does on the user's real pairs)."
        ),
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether a larger or smaller metric is better; None = the metric's natural mode."
    )
    patience: int = Field(
        0, ge=0, le=100_000, description="Stop after this many epochs without improvement (0 = never)."
    )
    min_delta: float = Field(0.0, ge=0.0, description="Improvement smaller than this does not count.")
    figure_every: int = Field(
        5, ge=0, le=100_000, description="Log a sample figure every N epochs and at the end (0 = at the end)."
    )
    figure_images: int = Field(4, ge=1, le=16, description="Rows of the sample figure.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        base, sep, source = v.partition("/")
        if base not in VALIDATION_METRICS:
            raise ValueError(
                f"unknown validation metric {v!r}; known: {sorted(VALIDATION_METRICS)}, or "
                "'<metric>/<source name>' for one source of data.sources"
            )
        if sep and not re.fullmatch(SOURCE_NAME_PATTERN, source):
            raise ValueError(
                f"validation metric {v!r}: {source!r} is not a source name (pattern {SOURCE_NAME_PATTERN}); "
                "write '<metric>/<source name>', e.g. 'val_psnr/real_pairs'"
            )
        return v

    @property
    def base_metric(self) -> str:
        """The metric without its source: ``val_psnr`` for ``val_psnr/real_pairs``."""
        return self.metric.partition("/")[0]

    @property
    def source(self) -> str | None:
        """The ``data.sources`` name a per-source metric is measured on (None: the whole validation set)."""
        return self.metric.partition("/")[2] or None

    @property
    def resolved_mode(self) -> Literal["max", "min"]:
        """``mode``, or the (base) metric's natural direction."""
        return self.mode or VALIDATION_METRICS[self.base_metric]


class ScalingSection(StrictModel):
    """How many Ray Train workers, on what, and how much CPU each stage takes."""

    num_workers: int = Field(1, ge=1, le=4096, description="Data-parallel training workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs reserved per worker (fractional OK).")
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per worker.")
    data_cpus: float = Field(
        1.0, gt=0, le=256, description="CPUs reserved per Ray Data noise/crop task (fractional OK)."
    )


class CheckpointSection(StrictModel):
    """Checkpoint retention and fault tolerance."""

    keep_best: int = Field(
        2, ge=1, le=1000, description="Checkpoints kept, best first by the validation metric."
    )
    max_failures: int = Field(
        2,
        ge=-1,
        le=1000,
        description="Worker-group failures recovered from the last checkpoint (-1 = always).",
    )


class MlflowSection(StrictModel):
    """Experiment tracking and model registry (store chosen by semray.tracking)."""

    enabled: bool = Field(True, description="Track the run in MLflow.")
    experiment: str = Field("semray-train", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field(
        "semray-unet", min_length=1, description="Registry name the final model is registered under."
    )
    register_model: bool = Field(True, description="Log the final model with mlflow.pytorch and register it.")
    alias: str | None = Field(
        "candidate",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="Alias set on the new model version (models:/NAME@ALIAS); None = none.",
    )


class RunSection(StrictModel):
    """Name and location of the Ray Train run (checkpoints, results)."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="Run name (folder under storage_path); None = 'train-<UTC timestamp>'.",
    )
    storage_path: str | None = Field(
        None, description="Where runs live (local folder or shared storage URI); None = $SEMRAY_HOME/train."
    )
    export_dir: str | None = Field(
        None, description="Also copy the best model (model.safetensors + card.json) to this folder."
    )


class DebugSection(StrictModel):
    """Hooks for testing fault tolerance; leave unset in real runs."""

    fail_once_at_epoch: int | None = Field(
        None, ge=0, description="The last worker raises mid-way through this epoch, once (needs fail_marker)."
    )
    fail_marker: str | None = Field(
        None, description="File created when the injected failure fires, so it fires only once."
    )

    @model_validator(mode="after")
    def _marker_needed(self) -> DebugSection:
        if (self.fail_once_at_epoch is None) != (self.fail_marker is None):
            raise ValueError("fail_once_at_epoch and fail_marker must be given together")
        return self


class TrainConfig(StrictModel):
    """One training run (``semray train --config ...``)."""

    seed: int = Field(0, ge=0, le=2**31 - 1, description="Run seed: noise, crops and initial weights.")
    data: TrainDataConfig = Field(default_factory=TrainDataConfig, description="Shards, crops, batches.")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Noise synthesised on the fly.")
    model: UNetConfig = Field(default_factory=UNetConfig, description="The network.")
    loss: LossConfig = Field(
        default_factory=CompositeLossConfig, description="The training objective (by kind)."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Validation.")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Workers and resources.")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="Checkpoints.")
    mlflow: MlflowSection = Field(default_factory=MlflowSection, description="Tracking and registry.")
    run: RunSection = Field(default_factory=RunSection, description="Run name and storage.")
    init: str | None = Field(
        None,
        description=(
            "Start from these weights (fine-tuning): a model spec for semray.models.resolve "
            "('default', a folder, models:/NAME@ALIAS). Its model config must equal `model`."
        ),
    )
    debug: DebugSection = Field(default_factory=DebugSection, description="Fault-injection hooks.")

    @model_validator(mode="after")
    def _metric_source_exists(self) -> TrainConfig:
        source = self.validation.source
        if source is None:
            return self
        known = [s.name for s in self.data.sources or []]
        if not known:
            raise ValueError(
                f"validation.metric={self.validation.metric!r} scores one source of a mix, but there is no "
                f"data.sources; use {self.validation.base_metric!r} or name the sources in data.sources"
            )
        if source not in known:
            raise ValueError(
                f"validation.metric={self.validation.metric!r} names source {source!r}, which is not in "
                f"data.sources; known sources: {known}"
            )
        return self

    @model_validator(mode="after")
    def _defect_term_has_a_supervised_source(self) -> TrainConfig:
        if self.loss.defect_weight <= 0 or not self.data.sources:
            return self
        if all(self.data.source_objective(s, self.loss.objective) != "supervised" for s in self.data.sources):
            raise ValueError(
                "loss.defect_weight needs clean targets, but every source of data.sources trains "
                "self-supervised (their `objective`); set defect_weight: 0 or train a source supervised"
            )
        return self

    @model_validator(mode="after")
    def _crops_fit_the_loss(self) -> TrainConfig:
        crop, loss = self.data.crop_px, self.loss
        if isinstance(loss, CompositeLossConfig) and loss.alpha > 0:
            # same rule as semray.metrics.ms_ssim_min_side (not imported: configs stay torch-free)
            s, win = loss.ms_ssim_scales, loss.ms_ssim_win_size
            need = win * 2 ** (s - 1) - (2 ** (s - 1) - 1)
            if crop < need:
                raise ValueError(
                    f"data.crop_px={crop} is too small for MS-SSIM with {loss.ms_ssim_scales} scales and "
                    f"a {loss.ms_ssim_win_size}-px window (needs >= {need}); use larger crops or fewer scales"
                )
        if isinstance(loss, MseSsimLossConfig) and crop < loss.ssim_win_size:
            raise ValueError(f"data.crop_px={crop} is smaller than loss.ssim_win_size={loss.ssim_win_size}")
        return self

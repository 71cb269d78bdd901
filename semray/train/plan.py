"""The driver's data plan of a training run: what the shards hold, checked before any worker starts.

:func:`prepare_data` renders the shards if configured, lists them, counts the splits, checks the crop
sizes and sizes the epoch; for a mix (``data.sources``) it plans every source and splits the epoch by
weight (:func:`semray.train.mix.mix_totals`). :meth:`DataPlan.streams` turns a plan into the branches
of the ``train`` dataset: a plain shard set is a one-source stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semray.config.base import ConfigError
from semray.config.train import TrainConfig
from semray.io import ShardError
from semray.train.mix import mix_totals
from semray.train.pipeline import SourceStream
from semray.train.shards import (
    TRAIN_COLUMNS,
    first_without,
    has_column,
    image_shape,
    load_val_batch,
    shard_files,
    split_ids,
)

#: Training images per Ray Data block (see semray.train.pipeline.build_train_dataset).
IMAGES_PER_BLOCK = 16
#: Name of the one stream of a plain shard set (``data.shards``).
SHARDS_SOURCE = "shards"


@dataclass
class SourcePlan:
    """One source of a mix (``data.sources``), as the driver found it.

    Attributes:
        name, noise: from the config (``noise`` is ``synthesize`` or ``as_is``).
        weight: normalised share of the training crops.
        files: its shard files. train_ids, val_ids: its training ids and validation ids (sorted; the
            first ``data.val_max_images`` of them are validated on; none without clean images).
        crops_per_epoch: crops it contributes to every epoch (exact, over all workers).
        image_shape: (H, W) of its first training image.
        objective: what its crops train against (its own ``objective``, else ``loss.objective``).
        columns: the shard columns its training crops are made from.
        unvalidated: why it is not validated (empty when it is).
    """

    name: str
    noise: str
    weight: float
    files: list[str]
    train_ids: list[str]
    val_ids: list[str]
    crops_per_epoch: int = 0
    image_shape: tuple[int, int] = (0, 0)
    objective: str = "supervised"
    columns: tuple[str, ...] = ()
    unvalidated: str = ""

    def stream(self) -> SourceStream:
        """Its branch of the ``train`` dataset: exactly ``crops_per_epoch`` crops over ``train_ids``."""
        return SourceStream(
            self.name, tuple(self.files), self.noise, None, tuple(self.train_ids), self.crops_per_epoch,
            self.objective, self.columns,
        )  # fmt: skip


@dataclass
class DataPlan:
    """What the driver found in the shards before starting workers (``sources`` only for a mix)."""

    files: list[str]
    n_train: int
    val_ids: list[str]
    image_shape: tuple[int, int]
    steps_per_epoch: int
    val_batch: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    sources: list[SourcePlan] = field(default_factory=list)

    def streams(self, crops_per_image: int) -> list[SourceStream]:
        """The branches of the ``train`` dataset: every source of a mix with its share of the epoch, or
        the shard set as one source whose every image gives ``crops_per_image`` crops."""
        if not self.sources:
            return [SourceStream(SHARDS_SOURCE, tuple(self.files), crops_per_image=crops_per_image)]
        return [p.stream() for p in self.sources]

    def block_bytes(self) -> int:
        """Ray Data block size of :data:`IMAGES_PER_BLOCK` images: float32 clean + bool mask per pixel
        (5 bytes), plus a float32 ``noisy`` (9 bytes) for a mix, whose pairs may carry one, and a
        float32 ``noisy2`` (13 bytes) when a source of the mix reads one."""
        per_px = 5
        if self.sources:
            per_px = 13 if any("noisy2" in p.columns for p in self.sources) else 9
        return IMAGES_PER_BLOCK * self.image_shape[0] * self.image_shape[1] * per_px


def _ensure_shards(cfg: TrainConfig) -> None:
    gen = cfg.data.generate
    if gen is None:
        return
    if len(cfg.data.shards) != 1:
        raise ConfigError("data.generate needs exactly one folder in data.shards to render into")
    folder = Path(cfg.data.shards[0])
    if folder.is_dir() and any(folder.rglob("*.parquet")):
        return
    from semray.data import synthesize_shards

    print(f"semray train: rendering the synthetic shard set into {folder} (data.generate)", flush=True)
    synthesize_shards(gen, folder, progress=False)


def epoch_steps(cfg: TrainConfig, n_train: int, workers: int) -> int:
    """Optimiser steps per epoch: ``crops_per_image`` crops per training image, in whole batches on every
    worker, capped by ``optim.steps_per_epoch``.

    Raises:
        ConfigError: fewer crops than one batch per worker.
    """
    per_worker = n_train * cfg.data.crops_per_image // workers
    full = per_worker // cfg.data.batch_size
    if full < 1:
        raise ConfigError(
            f"{n_train} training images x {cfg.data.crops_per_image} crops over {workers} workers give "
            f"{per_worker} crops per worker, less than one batch of data.batch_size={cfg.data.batch_size}"
        )
    return min(full, cfg.optim.steps_per_epoch or full)


def prepare_data(cfg: TrainConfig, num_workers: int | None = None) -> DataPlan:
    """Render shards if configured, list them, count the splits and check the crop sizes.

    Raises:
        ConfigError: no shards, no train/val rows, images smaller than the crops, or fewer crops than
            one batch per worker.
    """

    _ensure_shards(cfg)
    if cfg.data.sources:
        return _prepare_mix(cfg, num_workers or cfg.scaling.num_workers)
    try:
        files = shard_files([str(Path(s).expanduser().resolve()) for s in cfg.data.shards])
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    train_ids = split_ids(files, "train")
    val_ids = split_ids(files, "val")
    if not train_ids:
        raise ConfigError(f"data.shards: no rows with split 'train' in {cfg.data.shards}")
    if not val_ids:
        raise ConfigError(f"data.shards: no rows with split 'val' in {cfg.data.shards}")
    if cfg.data.val_max_images is not None:
        val_ids = val_ids[: cfg.data.val_max_images]
    shape = image_shape(files, "train")
    assert shape is not None
    if min(shape) < cfg.data.crop_px:
        raise ConfigError(
            f"data.crop_px={cfg.data.crop_px} is larger than the training images ({shape[0]}x{shape[1]})"
        )
    steps = epoch_steps(cfg, len(train_ids), num_workers or cfg.scaling.num_workers)
    val_batch = load_val_batch(files, val_ids, cfg.noise, cfg.data.val_noise_seed, cfg.data.val_crop_px)
    return DataPlan(files, len(train_ids), val_ids, (int(shape[0]), int(shape[1])), steps, val_batch)


def _source_columns(files: list[str], objective: str, noise: str, where: str) -> tuple[str, ...]:
    """The shard columns a mix source's training crops are made from, checked against its shards.

    Supervised: ``clean`` and the defect mask (and ``noisy`` for ``as_is`` pairs). Self-supervised:
    ``noise: as_is`` reads the acquired ``noisy`` frame (and ``noisy2`` for n2n) and ``clean`` only if
    the shards have it; ``synthesize`` noises ``clean``.

    Raises:
        ConfigError: a column the source needs is missing from one of its shards (naming both).
    """
    if objective == "supervised" and (bad := first_without(files, "clean")):
        raise ConfigError(
            f"{where}: a supervised source trains against clean images, but shard {bad} has no 'clean' "
            "column; train it on its noisy frames (objective: structn2v, n2v or n2n with noise: as_is) or "
            "add the clean images"
        )
    if noise == "synthesize" and (bad := first_without(files, "clean")):
        raise ConfigError(
            f"{where}: noise 'synthesize' adds noise to clean images, but shard {bad} has no 'clean' column; "
            "set noise: as_is to train on its acquired 'noisy' frames"
        )
    if noise == "as_is" and (bad := first_without(files, "noisy")):
        raise ConfigError(
            f"{where}: noise 'as_is' uses real noisy/clean pairs, but shard {bad} has no 'noisy' column; "
            "ingest pairs with `semray ingest --mode pairs`, or set noise: synthesize for clean references"
        )
    if objective == "n2n" and noise == "as_is" and (bad := first_without(files, "noisy2")):
        raise ConfigError(
            f"{where}: objective n2n with noise 'as_is' needs a second acquired frame, but shard {bad} has "
            "no 'noisy2' column; use noise: synthesize (a synthetic second scan) or another objective"
        )
    if objective == "supervised":
        return tuple(TRAIN_COLUMNS + (["noisy"] if noise == "as_is" else []))
    frames = (["noisy", "noisy2"] if objective == "n2n" else ["noisy"]) if noise == "as_is" else []
    return tuple(c for c in TRAIN_COLUMNS + frames if c in ("image_id", "split") or has_column(files, c))


def _plan_source(cfg: TrainConfig, index: int) -> SourcePlan:
    """Check one ``data.sources`` entry against its shards (exist, hold what its objective and noise mode
    need, fit the crops)."""

    src = cfg.data.sources[index]  # type: ignore[index]
    where = f"data.sources[{index}] ({src.name!r})"
    try:
        files = shard_files([str(Path(s).expanduser().resolve()) for s in src.shards])
    except ShardError as e:
        raise ConfigError(f"{where}.shards: {e}") from None
    objective = cfg.data.source_objective(src, cfg.loss.objective)
    columns = _source_columns(files, objective, src.noise, where)
    train_ids = split_ids(files, "train")
    if not train_ids:
        raise ConfigError(f"{where}: no rows with split 'train' in {src.shards}")
    shape = image_shape(files, "train", "clean" if "clean" in columns else "noisy")
    assert shape is not None
    if min(shape) < cfg.data.crop_px:
        raise ConfigError(
            f"{where}: data.crop_px={cfg.data.crop_px} is larger than its training images ({shape[0]}x{shape[1]})"
        )
    val_ids = split_ids(files, "val")
    unvalidated = "it has no 'val' rows" if not val_ids else ""
    if val_ids and "clean" not in columns:
        val_ids, unvalidated = [], "its shards have no clean images to score against"
    if cfg.data.val_max_images is not None:
        val_ids = val_ids[: cfg.data.val_max_images]
    weight = cfg.data.mix_weights[src.name]
    return SourcePlan(
        src.name, src.noise, weight, files, train_ids, val_ids, 0, (int(shape[0]), int(shape[1])),
        objective, columns, unvalidated,
    )  # fmt: skip


def _prepare_mix(cfg: TrainConfig, workers: int) -> DataPlan:
    """:func:`prepare_data` for ``data.sources``: plan every source, size the epoch, split it by weight.

    An epoch is ``crops_per_image`` crops per training image of all sources together (capped by
    ``optim.steps_per_epoch``), rounded down to whole batches on every worker, so the workers consume
    every crop and each source's share holds exactly. ``data.val_max_images`` applies per source.
    """

    plans = [_plan_source(cfg, i) for i in range(len(cfg.data.sources or []))]
    n_train = sum(len(p.train_ids) for p in plans)
    steps = epoch_steps(cfg, n_train, workers)
    total = steps * cfg.data.batch_size * workers
    for plan, n in zip(plans, mix_totals([p.weight for p in plans], total), strict=True):
        if n == 0:
            raise ConfigError(
                f"data.sources: {plan.name!r} (weight {plan.weight:.3g}) would get none of the {total} crops "
                "of an epoch; raise its weight or the epoch size (data.crops_per_image, optim.steps_per_epoch)"
            )
        plan.crops_per_epoch = n
    parts = []
    for plan in plans:
        if not plan.val_ids:
            print(
                f"semray train: source {plan.name!r} ({plan.objective}) is trained on but not validated: "
                f"{plan.unvalidated}"
            )
            continue
        parts.append(
            load_val_batch(
                plan.files, plan.val_ids, cfg.noise, cfg.data.val_noise_seed, cfg.data.val_crop_px,
                source=plan.name, noise_mode=plan.noise,
            )
        )  # fmt: skip
    if not parts:
        raise ConfigError(
            f"data.sources: no source can be validated (rows with split 'val' and clean images) among "
            f"{[p.name for p in plans]}"
        )
    val_batch = _concat_val_parts(parts)
    _check_metric_source(cfg, val_batch)
    files: list[str] = []
    for plan in plans:
        files.extend(f for f in plan.files if f not in files)
    shape = max((p.image_shape for p in plans), key=lambda hw: hw[0] * hw[1])
    val_ids = [i for p in plans for i in p.val_ids]
    return DataPlan(files, n_train, val_ids, shape, steps, val_batch, plans)


def _check_metric_source(cfg: TrainConfig, val_batch: dict[str, np.ndarray]) -> None:
    """A per-source ``validation.metric`` (``val_psnr/<source>``) needs that source's validation crops,
    and for a defect metric some with labelled defects; otherwise every epoch would score NaN."""
    source = cfg.validation.source
    if source is None:
        return
    mine = np.asarray([str(s) == source for s in val_batch["source"]], dtype=bool)
    if not mine.any():
        raise ConfigError(
            f"validation.metric={cfg.validation.metric!r}: source {source!r} has no rows with split 'val' "
            "(or no clean images to score them against), so it cannot score checkpoints; give it validation "
            "images with clean references or choose another metric"
        )
    known = np.asarray(val_batch["defect_mask_known"], dtype=bool)[mine]
    if cfg.validation.base_metric.startswith("val_defect_") and not known.any():
        raise ConfigError(
            f"validation.metric={cfg.validation.metric!r}: source {source!r} has no labelled defect masks "
            "(defect metrics are not measured on it); choose a non-defect metric such as "
            f"'val_psnr/{source}'"
        )


def _concat_val_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-source validation batches; a column some lack (``reference``) is None there."""
    keys = list(dict.fromkeys(k for p in parts for k in p))
    out: dict[str, np.ndarray] = {}
    for k in keys:
        cols = []
        for p in parts:
            if k in p:
                cols.append(p[k])
            else:
                filler = np.empty(len(p["image_id"]), dtype=object)
                filler[:] = None
                cols.append(filler)
        out[k] = np.concatenate(cols)
    return out

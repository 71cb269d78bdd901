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
from semray.train.shards import has_column, image_shape, load_val_batch, shard_files, split_ids

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
            first ``data.val_max_images`` of them are validated on).
        crops_per_epoch: crops it contributes to every epoch (exact, over all workers).
        image_shape: (H, W) of its first training image.
    """

    name: str
    noise: str
    weight: float
    files: list[str]
    train_ids: list[str]
    val_ids: list[str]
    crops_per_epoch: int = 0
    image_shape: tuple[int, int] = (0, 0)


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
        return [
            SourceStream(p.name, tuple(p.files), p.noise, None, tuple(p.train_ids), p.crops_per_epoch)
            for p in self.sources
        ]

    def block_bytes(self) -> int:
        """Ray Data block size of :data:`IMAGES_PER_BLOCK` images: float32 clean + bool mask per pixel
        (5 bytes), plus a float32 ``noisy`` (9 bytes) for a mix, whose pairs may carry one."""
        per_px = 9 if self.sources else 5
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


def _plan_source(cfg: TrainConfig, index: int) -> SourcePlan:
    """Check one ``data.sources`` entry against its shards (exist, pairs have ``noisy``, fit the crops)."""

    src = cfg.data.sources[index]  # type: ignore[index]
    where = f"data.sources[{index}] ({src.name!r})"
    try:
        files = shard_files([str(Path(s).expanduser().resolve()) for s in src.shards])
    except ShardError as e:
        raise ConfigError(f"{where}.shards: {e}") from None
    if src.noise == "as_is" and not has_column(files, "noisy"):
        import pyarrow.parquet as pq

        bad = next(f for f in files if "noisy" not in pq.read_schema(f).names)
        raise ConfigError(
            f"{where}: noise 'as_is' uses real noisy/clean pairs, but shard {bad} has no 'noisy' column; "
            "ingest pairs with `semray ingest --mode pairs`, or set noise: synthesize for clean references"
        )
    train_ids = split_ids(files, "train")
    if not train_ids:
        raise ConfigError(f"{where}: no rows with split 'train' in {src.shards}")
    shape = image_shape(files, "train")
    assert shape is not None
    if min(shape) < cfg.data.crop_px:
        raise ConfigError(
            f"{where}: data.crop_px={cfg.data.crop_px} is larger than its training images ({shape[0]}x{shape[1]})"
        )
    val_ids = split_ids(files, "val")
    if cfg.data.val_max_images is not None:
        val_ids = val_ids[: cfg.data.val_max_images]
    weight = cfg.data.mix_weights[src.name]
    return SourcePlan(
        src.name, src.noise, weight, files, train_ids, val_ids, 0, (int(shape[0]), int(shape[1]))
    )


def _prepare_mix(cfg: TrainConfig, workers: int) -> DataPlan:
    """:func:`prepare_data` for ``data.sources``: plan every source, size the epoch, split it by weight.

    An epoch is ``crops_per_image`` crops per training image of all sources together (capped by
    ``optim.steps_per_epoch``), rounded down to whole batches on every worker, so the workers consume
    every crop and each source's share holds exactly. ``data.val_max_images`` applies per source.
    """

    objective = getattr(cfg.loss, "objective", "supervised")
    if objective != "supervised":
        raise ConfigError(
            f"data.sources: a mix trains supervised only (pairs as they are, clean references with synthetic "
            f"noise); loss.objective={objective!r} needs data.shards"
        )
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
            print(f"semray train: source {plan.name!r} has no 'val' rows; it is trained on but not validated")
            continue
        parts.append(
            load_val_batch(
                plan.files, plan.val_ids, cfg.noise, cfg.data.val_noise_seed, cfg.data.val_crop_px,
                source=plan.name, noise_mode=plan.noise,
            )
        )  # fmt: skip
    if not parts:
        raise ConfigError(f"data.sources: no rows with split 'val' in any source ({[p.name for p in plans]})")
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
            f"validation.metric={cfg.validation.metric!r}: source {source!r} has no rows with split 'val', "
            "so it cannot score checkpoints; give it validation images or choose another metric"
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

"""Shard bookkeeping of a training run (pyarrow and numpy, no Ray): which files, which ids per split,
image sizes, which columns, and the fixed validation set the driver builds once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from semray.config.noise import NoiseConfig
from semray.data import add_noise_batch
from semray.io import list_shards
from semray.train.crops import val_crop_batch

#: Columns the training stage reads from the shards (the rest of the schema is not needed).
TRAIN_COLUMNS = ["image_id", "split", "clean", "defect_mask"]
#: Columns the validation stage reads (``reference`` only when the shards have it).
VAL_COLUMNS = ["image_id", "split", "clean", "defect_mask", "reference"]
#: Acquired noisy frames a shard may hold; used instead of synthetic noise by self-supervised runs.
NOISY_FRAME_COLUMNS = ("noisy", "noisy2")


def shard_files(shards: Sequence[str | Path]) -> list[str]:
    """All shard files under the given folders/files, in order, without duplicates."""
    files: list[str] = []
    for s in shards:
        for f in list_shards(s):
            if str(f) not in files:
                files.append(str(f))
    return files


def split_ids(files: Sequence[str], split: str) -> list[str]:
    """Image ids of ``split`` across the shard files, sorted."""
    ids: list[str] = []
    for f in files:
        t = pq.read_table(f, columns=["image_id", "split"])
        split_col = t["split"].to_pylist()
        ids.extend(str(i) for i, s in zip(t["image_id"].to_pylist(), split_col, strict=True) if s == split)
    return sorted(ids)


def image_shape(files: Sequence[str], split: str, column: str = "clean") -> tuple[int, int] | None:
    """(H, W) of the first ``column`` image of ``split`` (None if there is none); used to validate crop
    sizes early (``column="noisy"`` for shards of acquired frames without clean images)."""
    from semray.io import read_shard

    for f in files:
        shard = read_shard(f, columns=["split", column])
        hits = np.flatnonzero(np.asarray(shard["split"]) == split)
        if len(hits):
            return tuple(np.asarray(shard[column][hits[0]]).shape[:2])  # type: ignore[return-value]
    return None


def has_column(files: Sequence[str], column: str) -> bool:
    """Whether every shard file has ``column``."""
    return all(column in pq.read_schema(f).names for f in files)


def first_without(files: Sequence[str], column: str) -> str | None:
    """The first shard file without ``column`` (None: every file has it); for error messages."""
    return next((f for f in files if column not in pq.read_schema(f).names), None)


def load_val_batch(
    files: Sequence[str],
    image_ids: Sequence[str],
    noise: NoiseConfig,
    seed: int,
    crop_px: int | None,
    *,
    source: str | None = None,
    noise_mode: str = "synthesize",
) -> dict[str, np.ndarray]:
    """The fixed validation set, built once by the driver (no Ray): the listed ``val`` images with
    noise from epoch 0 of ``seed``, cut to their fixed windows (:func:`val_crop_batch`).

    Small by construction (a few dozen crops), so it travels to the workers through the object store
    instead of being re-read and re-noised by every worker.

    For one source of a mix (``source`` given) the batch also has ``source`` (its name) and
    ``defect_mask_known`` (False where the shards say nobody labelled the defects) columns; with
    ``noise_mode="as_is"`` the shards' own ``noisy`` images are used (dose NaN) instead of noise.
    """
    from semray.io import read_shard

    wanted = set(image_ids)
    cols = VAL_COLUMNS if has_column(files, "reference") else VAL_COLUMNS[:-1]
    if noise_mode == "as_is":
        cols = [*cols, "noisy"]
    known_col = source is not None and has_column(files, "defect_mask_known")
    if known_col:
        cols = [*cols, "defect_mask_known"]
    parts: list[dict[str, np.ndarray]] = []
    for f in files:
        shard = read_shard(f, columns=cols)
        keep = np.flatnonzero(
            (np.asarray(shard["split"]) == "val")
            & np.isin(np.asarray(shard["image_id"], dtype=object), list(wanted))
        )
        if len(keep) == 0:
            continue
        rows = {k: v[keep] for k, v in shard.items()}
        if noise_mode == "as_is":
            rows["noise_dose_e_per_px"] = np.full(len(keep), np.nan)
            part = val_crop_batch(rows, crop_px)
        else:
            part = val_crop_batch(add_noise_batch(rows, noise, seed, epoch=0), crop_px)
        if source is not None:
            n = len(keep)
            part["source"] = np.asarray([source] * n, dtype=object)
            known = rows["defect_mask_known"] if known_col else np.ones(n, dtype=bool)
            part["defect_mask_known"] = np.asarray(known, dtype=bool)
        parts.append(part)
    if not parts:
        raise ValueError(f"none of the {len(wanted)} validation ids were found in the shards")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def selfsup_columns(files: Sequence[str]) -> list[str]:
    """The training columns of a self-supervised run: :data:`TRAIN_COLUMNS` plus the acquired noisy
    frames (``noisy``, ``noisy2``) that every shard file has."""
    return [*TRAIN_COLUMNS, *(c for c in NOISY_FRAME_COLUMNS if has_column(files, c))]

"""The training datasets: shards -> Ray Data noise synthesis -> random crops/augmentation -> workers.

Every source of a run is one branch of the ``train`` dataset (:func:`build_train_dataset`): a plain
shard set (``data.shards``) is a one-source stream whose every training image gives
``crops_per_image`` crops; the sources of a mix (``data.sources``) give exactly their planned share
(:mod:`semray.train.mix`). The pure maths lives in :mod:`semray.train.crops` (crops, augmentation) and
:mod:`semray.train.mix` (allocation); :func:`source_crop_batch` is the whole per-batch transform,
pure and testable without Ray.

Epoch-aware noise. Every epoch must see fresh noise that is still reproducible from the run seed: the
noise of image ``i`` in epoch ``e`` is exactly ``add_noise_batch(..., seed, epoch=e)`` of
:mod:`semray.data`. Ray Train hands each worker one streaming split of a single Dataset, and every
``iter_torch_batches`` call re-executes it, so the epoch number has to reach the map tasks at run time.
It does through an :class:`EpochClock` actor: rank 0 sets it before it starts iterating an epoch and
each map task reads it. That is race-free because

* a streaming split starts executing an epoch only once *every* worker has asked for it (the split
  coordinator's barrier), and rank 0 sets the clock before asking, and
* ``ray.train.report`` is a barrier too, so no worker is still consuming epoch ``e`` when rank 0 moves
  the clock to ``e + 1``.

Every row also carries ``noise_epoch``, and the training loop refuses a batch whose epoch is not the
one it is training, so a broken assumption is an error, never silently stale noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from semray.config.noise import NoiseConfig
from semray.data import add_noise_batch
from semray.train.crops import CropSpec, crop_batch, crop_frames, empty_crops
from semray.train.mix import allocate_crops
from semray.train.shards import TRAIN_COLUMNS, selfsup_columns

#: Source noise modes (``ShardSource.noise``).
MIX_NOISE_MODES = ("synthesize", "as_is")


class EpochClock:
    """Holds the epoch the training workers are on (run as a Ray actor, see module docstring)."""

    def __init__(self) -> None:
        self._epoch = -1

    def set(self, epoch: int) -> int:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)
        return self._epoch

    def get(self) -> int:
        if self._epoch < 0:
            raise RuntimeError("the epoch clock was read before rank 0 set it")
        return self._epoch


def start_epoch_clock() -> Any:
    """A new :class:`EpochClock` actor (no CPU reserved), owned by the calling driver."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(EpochClock).remote()


@dataclass(frozen=True)
class SourceStream:
    """One branch of the ``train`` dataset.

    Attributes:
        name: the source's name (``source`` column of its rows).
        files: its shard files. noise_mode: ``synthesize`` (noise on the clean image) or ``as_is``
            (the shards' own ``noisy`` image of a real pair).
        crops_per_image: every training image gives this many crops each epoch (a plain shard set);
            None: exactly ``total`` crops per epoch, spread by :func:`~semray.train.mix.allocate_crops`
            over ``train_ids`` (a source of a mix).
        objective: what its crops train against (None: the run's ``loss.objective``).
        columns: the shard columns it reads (empty: chosen by :func:`build_train_dataset` from the
            objective, as for a plain shard set).
    """

    name: str
    files: tuple[str, ...]
    noise_mode: str = "synthesize"
    crops_per_image: int | None = None
    train_ids: tuple[str, ...] = ()
    total: int = 0
    objective: str | None = None
    columns: tuple[str, ...] = ()


def selfsup_noise_batch(
    batch: Mapping[str, np.ndarray],
    noise: Mapping[str, Any] | NoiseConfig,
    seed: int,
    epoch: int,
    objective: str,
) -> dict[str, np.ndarray]:
    """The noisy frame(s) of a self-supervised batch, before cropping (pure, no Ray).

    * Shards with an acquired ``noisy`` column: it is used as is (and ``noisy2`` for ``n2n``); the dose
      column is NaN (unknown).
    * Otherwise noise is synthesised from ``(seed, image_id, epoch)``: frame 1 exactly as the supervised
      pipeline makes it, and for ``n2n`` an independent second scan at the same settings
      (:func:`semray.selfsup.add_noise_pair_batch`).

    Raises:
        ValueError: ``n2n`` on shards that hold ``noisy`` but no ``noisy2``.
    """
    from semray.selfsup import add_noise_pair_batch

    n = len(batch["image_id"])
    if "noisy" in batch:
        if objective == "n2n" and "noisy2" not in batch:
            raise ValueError(
                "loss.objective n2n: the shards hold acquired 'noisy' frames but no second frame 'noisy2'"
            )
        out = dict(batch)
        out["noise_epoch"] = np.full(n, epoch, dtype=np.int64)
        out["noise_dose_e_per_px"] = np.full(n, np.nan)
        return out
    if objective == "n2n":
        return add_noise_pair_batch(batch, noise, seed, epoch)
    return add_noise_batch(batch, noise, seed, epoch)


def _nan_clean(frames: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``frames`` with a NaN ``clean`` image per row when the shards have none (a self-supervised
    source of acquired frames): the crops keep one set of columns, and a crop that reached a clean
    target by mistake would make the loss NaN, which the loop refuses."""
    if "clean" in frames:
        return frames
    col = np.empty(len(frames["noisy"]), dtype=object)
    col[:] = [np.full(np.shape(x), np.nan, dtype=np.float32) for x in frames["noisy"]]
    return {**frames, "clean": col}


def _noise_and_crop(
    rows: dict[str, np.ndarray], k: int, *, noise_mode: str, objective: str, noise: NoiseConfig | Mapping[str, Any],
    seed: int, epoch: int, crop: CropSpec,
) -> dict[str, np.ndarray]:  # fmt: skip
    """``k`` crops of each of ``rows``: this epoch's noise (or the acquired frames), then the crops."""
    if objective != "supervised":
        frames = _nan_clean(selfsup_noise_batch(rows, noise, seed, epoch, objective))
        return crop_frames(frames, objective, crop, k, seed, epoch)
    if noise_mode == "synthesize":
        rows = add_noise_batch(rows, noise, seed, epoch)
    else:
        rows.pop("noise_epoch", None)
        rows.pop("noise_dose_e_per_px", None)
    return crop_batch(rows, crop, k, seed, epoch)


def source_crop_batch(
    batch: Mapping[str, np.ndarray],
    counts: Sequence[int],
    *,
    source: str,
    noise_mode: str,
    noise: NoiseConfig | Mapping[str, Any],
    seed: int,
    epoch: int,
    crop: CropSpec,
    objective: str = "supervised",
    pad_noisy2: bool = False,
) -> dict[str, np.ndarray]:
    """Crops of one source's rows for one epoch: ``counts[r]`` crops of row ``r`` (0 = skipped); pure.

    ``noise_mode`` ``synthesize`` adds this epoch's noise (:func:`semray.data.add_noise_batch`);
    ``as_is`` crops the row's own ``noisy`` image (a real pair) with no noise on top, and reports
    ``noise_dose_e_per_px`` NaN. ``objective`` other than ``supervised`` takes the frames from
    :func:`selfsup_noise_batch` (a second frame ``noisy2`` for ``n2n``; the shard columns passed in
    decide between acquired and synthesised frames); rows without a ``clean`` image get a NaN one.
    ``pad_noisy2`` (a mix with an n2n source) gives crops of other objectives a NaN ``noisy2``, so
    every source's crops have the same columns.

    Returns:
        The columns of :func:`~semray.train.crops.crop_batch` plus ``source`` and ``objective`` (N,) str,
        N = sum(counts) (and ``noisy2`` for n2n or with ``pad_noisy2``).

    Raises:
        ValueError: unknown ``noise_mode``, or ``as_is`` rows without a ``noisy`` column.
    """
    if noise_mode not in MIX_NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {MIX_NOISE_MODES}, got {noise_mode!r}")
    if noise_mode == "as_is" and "noisy" not in batch:
        raise ValueError(f"source {source!r} (noise: as_is) has no 'noisy' column")
    counts = np.asarray(counts, dtype=np.int64)
    parts = []
    for k in sorted(set(counts[counts > 0].tolist())):
        rows = np.flatnonzero(counts == k)
        sub = {c: v[rows] for c, v in batch.items()}
        parts.append(
            _noise_and_crop(sub, int(k), noise_mode=noise_mode, objective=objective, noise=noise, seed=seed,
                            epoch=epoch, crop=crop)
        )  # fmt: skip
    if not parts:
        parts.append(empty_crops(crop.crop_px))
        if objective == "n2n":
            parts[0]["noisy2"] = parts[0]["noisy"].copy()
    out = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    if pad_noisy2 and "noisy2" not in out:
        out["noisy2"] = np.full_like(out["noisy"], np.nan)
    n = len(out["image_id"])
    out["image_id"] = np.asarray([str(i) for i in out["image_id"]], dtype=object)
    out["source"] = np.asarray([source] * n, dtype=object)
    out["objective"] = np.asarray([objective] * n, dtype=object)
    return out


_ALLOC_CACHE: dict[tuple[Any, ...], dict[str, int]] = {}


def _allocation(ids_ref: Any, total: int, seed: int, epoch: int, source: str) -> dict[str, int]:
    """:func:`~semray.train.mix.allocate_crops` of a source's id list (an object ref), cached per worker
    process."""
    import ray

    key = (ids_ref.hex() if hasattr(ids_ref, "hex") else id(ids_ref), total, seed, epoch, source)
    hit = _ALLOC_CACHE.get(key)
    if hit is None:
        ids = ray.get(ids_ref) if isinstance(ids_ref, ray.ObjectRef) else ids_ref
        counts = allocate_crops(ids, total, seed, epoch, source)
        hit = {str(i): int(c) for i, c in zip(ids, counts, strict=True)}
        if len(_ALLOC_CACHE) >= 16:
            _ALLOC_CACHE.clear()
        _ALLOC_CACHE[key] = hit
    return hit


def train_stage(
    batch: dict[str, np.ndarray],
    *,
    source: str,
    noise_mode: str,
    crops_per_image: int | None,
    ids_ref: Any,
    total: int,
    noise: Mapping[str, Any],
    seed: int,
    clock: Any,
    crop: CropSpec,
    objective: str,
    pad_noisy2: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data map function of one source: the epoch from the clock, this epoch's crop counts
    (``crops_per_image`` for every row, else the source's allocation), then :func:`source_crop_batch`."""
    import ray

    epoch = int(ray.get(clock.get.remote()))
    if crops_per_image is not None:
        counts = [crops_per_image] * len(batch["image_id"])
    else:
        alloc = _allocation(ids_ref, total, seed, epoch, source)
        counts = [alloc.get(str(i), 0) for i in batch["image_id"]]
    return source_crop_batch(
        batch, counts, source=source, noise_mode=noise_mode, noise=noise, seed=seed, epoch=epoch, crop=crop,
        objective=objective, pad_noisy2=pad_noisy2,
    )  # fmt: skip


def build_train_dataset(
    streams: Sequence[SourceStream],
    noise: NoiseConfig,
    seed: int,
    clock: Any,
    crop: CropSpec,
    *,
    noise_batch_images: int,
    data_cpus: float,
    block_bytes: int | None = None,
    objective: str = "supervised",
) -> Any:
    """The ``train`` Ray Dataset: one branch per source (:func:`train_stage`), unioned. It
    re-synthesises noise each time it is executed (once per epoch), taking the epoch from ``clock``.

    ``block_bytes`` caps the size of the blocks flowing through the pipeline (this dataset's
    ``DataContext.target_max_block_size``). Left to itself, Ray Data packs a small shard set into a
    single read block of up to 128 MiB; one map task would then synthesise a whole epoch's noise
    serially and hand over its crops only at the end, while the workers wait. A few MiB per block
    (about 16 images) keeps the noise stage parallel and streaming.

    ``objective`` (``loss.objective``, for streams without their own): anything but ``supervised``
    uses the self-supervised frames (acquired ``noisy``/``noisy2`` shard columns, or a synthetic second
    frame for ``n2n``). Rows carry ``source`` and ``objective`` columns, so what the workers trained on
    can be counted per source and each crop is scored by its own objective
    (:mod:`semray.train.objectives`).

    Raises:
        ValueError: no stream contributes crops.
    """
    import ray
    from ray.data.expressions import col

    objectives = {src.objective or objective for src in streams}
    pad_noisy2 = "n2n" in objectives and len(objectives) > 1
    branches = []
    for src in streams:
        if src.crops_per_image is None and src.total <= 0:
            continue
        src_objective = src.objective or objective
        if src.columns:
            cols = list(src.columns)
        elif src_objective != "supervised":
            cols = selfsup_columns(src.files)
        else:
            cols = TRAIN_COLUMNS + (["noisy"] if src.noise_mode == "as_is" else [])
        ds = ray.data.read_parquet(list(src.files), num_cpus=data_cpus).select_columns(cols)
        if block_bytes:
            ds.context.target_max_block_size = int(block_bytes)
        fn_kwargs = {
            "source": src.name,
            "noise_mode": src.noise_mode,
            "crops_per_image": src.crops_per_image,
            "ids_ref": None if src.crops_per_image is not None else ray.put(list(src.train_ids)),
            "total": int(src.total),
            "noise": noise.model_dump(mode="json"),
            "seed": seed,
            "clock": clock,
            "crop": crop,
            "objective": src_objective,
            "pad_noisy2": pad_noisy2,
        }
        branches.append(
            ds.filter(expr=col("split") == "train").map_batches(
                train_stage,
                fn_kwargs=fn_kwargs,
                batch_format="numpy",
                batch_size=noise_batch_images,
                num_cpus=data_cpus,
            )
        )
    if not branches:
        raise ValueError("no source contributes crops to the epoch")
    out = branches[0] if len(branches) == 1 else branches[0].union(*branches[1:])
    if block_bytes:
        out.context.target_max_block_size = int(block_bytes)
    return out

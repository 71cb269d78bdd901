"""The training data pipeline: shards -> Ray Data noise synthesis -> random crops/augmentation -> workers.

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

The crop and augmentation maths are pure numpy functions (:func:`crop_batch`, :func:`val_crop_batch`),
seeded per ``(seed, image_id, epoch)`` like the noise, and testable without Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from semray.config.noise import NoiseConfig
from semray.data import add_noise_batch
from semray.io import list_shards

#: Columns the training stage reads from the shards (the rest of the schema is not needed).
TRAIN_COLUMNS = ["image_id", "split", "clean", "defect_mask"]
#: Columns the validation stage reads (``reference`` only when the shards have it).
VAL_COLUMNS = ["image_id", "split", "clean", "defect_mask", "reference"]
#: Columns of a training row as the workers receive it.
TRAIN_ROW_COLUMNS = ("image_id", "noisy", "clean", "noise_epoch", "noise_dose_e_per_px")
#: Stream tag that keeps crop/augment draws independent of the noise draws of the same image.
_CROP_STREAM = 0xC409


# --------------------------------------------------------------------------------------------------
# Pure crop / augmentation maths
# --------------------------------------------------------------------------------------------------


def crop_rng(seed: int, image_id: str, epoch: int) -> np.random.Generator:
    """Generator for the crops and flips of one image in one epoch (independent of its noise stream)."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([int(seed), int(epoch), int.from_bytes(digest, "little"), _CROP_STREAM])


def sample_crop_origins(
    shape: tuple[int, int],
    crop: int,
    n: int,
    rng: np.random.Generator,
    defect_mask: np.ndarray | None = None,
    defect_prob: float = 0.0,
) -> np.ndarray:
    """Top-left corners of ``n`` square crops of side ``crop`` inside an image of ``shape``.

    Uniform over valid positions, except that with probability ``defect_prob`` (per crop) a crop is
    placed so that a randomly chosen defect pixel of ``defect_mask`` lies at a uniformly random
    position inside it. The number of draws does not depend on the mask, so adding a defect never
    moves the other crops.

    Returns:
        int64 array (n, 2) of ``(y0, x0)``.

    Raises:
        ValueError: the image is smaller than the crop.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < crop or w < crop:
        raise ValueError(f"image of {h}x{w} px is smaller than the {crop}-px training crop")
    ys = rng.integers(0, h - crop + 1, n)
    xs = rng.integers(0, w - crop + 1, n)
    use_defect = rng.random(n) < defect_prob
    pick = rng.random(n)
    offset = rng.integers(0, crop, (n, 2))
    if defect_mask is not None and defect_prob > 0:
        coords = np.argwhere(np.asarray(defect_mask, dtype=bool))
        if len(coords):
            px = coords[np.minimum((pick * len(coords)).astype(np.int64), len(coords) - 1)]
            ys = np.where(use_defect, np.clip(px[:, 0] - offset[:, 0], 0, h - crop), ys)
            xs = np.where(use_defect, np.clip(px[:, 1] - offset[:, 1], 0, w - crop), xs)
    return np.stack([ys, xs], axis=1).astype(np.int64)


def sample_augment(n: int, rng: np.random.Generator, flips: bool, rot90: bool) -> np.ndarray:
    """Per-crop augmentation codes: int64 (n, 3) of ``(flip_y, flip_x, quarter_turns)``.

    Always draws the same amount from ``rng`` (disabled parts are zeroed), so switching an
    augmentation off does not change the crops.
    """
    codes = np.stack([rng.integers(0, 2, n), rng.integers(0, 2, n), rng.integers(0, 4, n)], axis=1)
    if not flips:
        codes[:, :2] = 0
    if not rot90:
        codes[:, 2] = 0
    return codes.astype(np.int64)


def augment(img: np.ndarray, code: Sequence[int]) -> np.ndarray:
    """Apply one augmentation code ``(flip_y, flip_x, quarter_turns)`` to a (H, W) array (a view)."""
    fy, fx, k = (int(c) for c in code)
    out = img
    if fy:
        out = out[::-1, :]
    if fx:
        out = out[:, ::-1]
    if k:
        out = np.rot90(out, k)
    return out


def crop_batch(
    batch: Mapping[str, np.ndarray],
    crop_px: int,
    crops_per_image: int,
    seed: int,
    epoch: int,
    defect_prob: float = 0.0,
    flips: bool = True,
    rot90: bool = False,
) -> dict[str, np.ndarray]:
    """Random crops of a noisy batch: the same window and augmentation for ``noisy`` and ``clean``.

    Args:
        batch: output of :func:`semray.data.add_noise_batch`: ``image_id`` (B,), ``noisy`` and ``clean``
            (B, H, W) float32 in [0, 1] (or (B,) object arrays of (H, W)), optional ``defect_mask``,
            ``noise_epoch`` and ``noise_dose_e_per_px`` (B,).
        crop_px: crop side (px). crops_per_image: crops per input image.
        seed, epoch: the run seed and epoch; crops come from :func:`crop_rng`.
        defect_prob: see :func:`sample_crop_origins`. flips, rot90: augmentations.

    Returns:
        ``image_id`` (N,) str, ``noisy`` and ``clean`` (N, crop, crop) float32 in [0, 1], ``defect``
        (N, crop, crop) uint8 {0, 1} (the defect mask's crop; zeros when unknown), ``noise_epoch`` (N,)
        int64 and ``noise_dose_e_per_px`` (N,) float64, N = B * crops_per_image.
    """
    ids = [str(i) for i in batch["image_id"]]
    masks = batch.get("defect_mask")
    noisy_out, clean_out, defect_out, id_out = [], [], [], []
    for row, iid in enumerate(ids):
        noisy = np.asarray(batch["noisy"][row], dtype=np.float32)
        clean = np.asarray(batch["clean"][row], dtype=np.float32)
        rng = crop_rng(seed, iid, epoch)
        mask = None if masks is None else masks[row]
        # an unknown mask (empty, flagged in the shards) counts as no defect
        full = None if mask is None else np.asarray(mask, dtype=np.uint8)
        if full is not None and full.shape != noisy.shape:
            full = None
        origins = sample_crop_origins(noisy.shape, crop_px, crops_per_image, rng, mask, defect_prob)
        codes = sample_augment(crops_per_image, rng, flips, rot90)
        for (y0, x0), code in zip(origins, codes, strict=True):
            window = (slice(y0, y0 + crop_px), slice(x0, x0 + crop_px))
            noisy_out.append(augment(noisy[window], code))
            clean_out.append(augment(clean[window], code))
            defect_out.append(
                np.zeros((crop_px, crop_px), np.uint8) if full is None else augment(full[window], code)
            )
            id_out.append(iid)
    n_rows = len(ids)
    repeat = np.repeat(np.arange(n_rows), crops_per_image)
    epochs = np.asarray(batch.get("noise_epoch", np.full(n_rows, epoch)), dtype=np.int64)
    dose = np.asarray(batch.get("noise_dose_e_per_px", np.full(n_rows, np.nan)), dtype=np.float64)
    shape = (0, crop_px, crop_px)
    return {
        "image_id": np.asarray(id_out, dtype=object),
        "noisy": np.ascontiguousarray(np.stack(noisy_out)) if noisy_out else np.zeros(shape, np.float32),
        "clean": np.ascontiguousarray(np.stack(clean_out)) if clean_out else np.zeros(shape, np.float32),
        "defect": np.ascontiguousarray(np.stack(defect_out)) if defect_out else np.zeros(shape, np.uint8),
        "noise_epoch": epochs[repeat],
        "noise_dose_e_per_px": dose[repeat],
    }


def val_crop_window(
    shape: tuple[int, int], crop: int | None, defect_mask: np.ndarray | None
) -> tuple[slice, slice]:
    """The fixed validation window of an image: centred on its defects' bounding box, else the centre.

    ``crop=None`` or a crop at least as large as the image gives the whole image (per axis).
    """
    h, w = int(shape[0]), int(shape[1])
    if crop is None:
        return slice(0, h), slice(0, w)
    cy, cx = h / 2.0, w / 2.0
    if defect_mask is not None:
        coords = np.argwhere(np.asarray(defect_mask, dtype=bool))
        if len(coords):
            (y0, x0), (y1, x1) = coords.min(axis=0), coords.max(axis=0)
            cy, cx = (y0 + y1 + 1) / 2.0, (x0 + x1 + 1) / 2.0
    ch, cw = min(crop, h), min(crop, w)
    top = int(np.clip(round(cy - ch / 2.0), 0, h - ch))
    left = int(np.clip(round(cx - cw / 2.0), 0, w - cw))
    return slice(top, top + ch), slice(left, left + cw)


def val_crop_batch(batch: Mapping[str, np.ndarray], crop_px: int | None) -> dict[str, np.ndarray]:
    """Cut every image column of a noisy validation batch to its fixed window (:func:`val_crop_window`).

    Returns ``image_id``, ``noisy``, ``clean``, ``defect_mask`` (and ``reference`` when present) as
    (B,) object arrays of (h, w) arrays (images may differ in size), plus ``noise_dose_e_per_px``.
    """
    image_cols = [c for c in ("noisy", "clean", "defect_mask", "reference") if c in batch]
    out: dict[str, list[np.ndarray]] = {c: [] for c in image_cols}
    for row in range(len(batch["image_id"])):
        mask = np.asarray(batch["defect_mask"][row], dtype=bool)
        window = val_crop_window(mask.shape, crop_px, mask)
        for c in image_cols:
            out[c].append(np.ascontiguousarray(np.asarray(batch[c][row])[window]))
    result: dict[str, np.ndarray] = {
        "image_id": np.asarray([str(i) for i in batch["image_id"]], dtype=object)
    }
    for c, arrays in out.items():
        col = np.empty(len(arrays), dtype=object)
        col[:] = arrays
        result[c] = col
    result["noise_dose_e_per_px"] = np.asarray(batch["noise_dose_e_per_px"], dtype=np.float64)
    return result


# --------------------------------------------------------------------------------------------------
# Shard bookkeeping (pyarrow only, reads metadata-sized columns)
# --------------------------------------------------------------------------------------------------


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


def image_shape(files: Sequence[str], split: str) -> tuple[int, int] | None:
    """(H, W) of the first image of ``split`` (None if there is none); used to validate crop sizes early."""
    from semray.io import read_shard

    for f in files:
        shard = read_shard(f, columns=["split", "clean"])
        hits = np.flatnonzero(np.asarray(shard["split"]) == split)
        if len(hits):
            return tuple(np.asarray(shard["clean"][hits[0]]).shape[:2])  # type: ignore[return-value]
    return None


def has_column(files: Sequence[str], column: str) -> bool:
    """Whether every shard file has ``column``."""
    return all(column in pq.read_schema(f).names for f in files)


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


# --------------------------------------------------------------------------------------------------
# Ray: the epoch clock and the datasets
# --------------------------------------------------------------------------------------------------


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


def train_stage(
    batch: dict[str, np.ndarray],
    noise: Mapping[str, Any],
    seed: int,
    clock: Any,
    crop_px: int,
    crops_per_image: int,
    defect_prob: float,
    flips: bool,
    rot90: bool,
    objective: str = "supervised",
) -> dict[str, np.ndarray]:
    """Ray Data map function: the epoch from the clock, fresh noise on whole images, then crops.

    ``objective`` other than ``supervised`` takes the frames from :func:`selfsup_noise_batch` and cuts
    them with :func:`selfsup_crop_batch` (a second frame for ``n2n``)."""
    import ray

    epoch = int(ray.get(clock.get.remote()))
    if objective == "supervised":
        noisy = add_noise_batch(batch, noise, seed, epoch)
        return crop_batch(noisy, crop_px, crops_per_image, seed, epoch, defect_prob, flips, rot90)
    noisy = selfsup_noise_batch(batch, noise, seed, epoch, objective)
    return selfsup_crop_batch(
        noisy, objective, crop_px, crops_per_image, seed, epoch, defect_prob, flips, rot90
    )


def build_train_dataset(
    files: Sequence[str],
    noise: NoiseConfig,
    seed: int,
    clock: Any,
    *,
    crop_px: int,
    crops_per_image: int,
    defect_prob: float,
    flips: bool,
    rot90: bool,
    noise_batch_images: int,
    data_cpus: float,
    block_bytes: int | None = None,
    objective: str = "supervised",
) -> Any:
    """The ``train`` Ray Dataset: re-synthesises noise each time it is executed (once per epoch),
    taking the epoch from ``clock``, then cuts the random crops.

    ``block_bytes`` caps the size of the blocks flowing through the pipeline (this dataset's
    ``DataContext.target_max_block_size``). Left to itself, Ray Data packs a small shard set into a
    single read block of up to 128 MiB; one map task would then synthesise a whole epoch's noise
    serially and hand over its crops only at the end, while the workers wait. A few MiB per block
    (about 16 images) keeps the noise stage parallel and streaming.

    ``objective`` (``loss.objective``): anything but ``supervised`` uses the self-supervised frames
    (acquired ``noisy``/``noisy2`` shard columns, or a synthetic second frame for ``n2n``).
    """
    import ray
    from ray.data.expressions import col

    selfsup = objective != "supervised"
    columns = selfsup_columns(files) if selfsup else TRAIN_COLUMNS
    ds = ray.data.read_parquet(list(files), num_cpus=data_cpus).select_columns(columns)
    if block_bytes:
        ds.context.target_max_block_size = int(block_bytes)
    return ds.filter(expr=col("split") == "train").map_batches(
        train_stage,
        fn_kwargs={
            "objective": objective,
            "noise": noise.model_dump(mode="json"),
            "seed": seed,
            "clock": clock,
            "crop_px": crop_px,
            "crops_per_image": crops_per_image,
            "defect_prob": defect_prob,
            "flips": flips,
            "rot90": rot90,
        },
        batch_format="numpy",
        batch_size=noise_batch_images,
        num_cpus=data_cpus,
    )


# --------------------------------------------------------------------------------------------------
# Self-supervised objectives (loss.objective n2v / structn2v / n2n, see semray.selfsup)
# --------------------------------------------------------------------------------------------------

#: Acquired noisy frames a shard may hold; used instead of synthetic noise by self-supervised runs.
NOISY_FRAME_COLUMNS = ("noisy", "noisy2")


def selfsup_columns(files: Sequence[str]) -> list[str]:
    """The training columns of a self-supervised run: :data:`TRAIN_COLUMNS` plus the acquired noisy
    frames (``noisy``, ``noisy2``) that every shard file has."""
    return [*TRAIN_COLUMNS, *(c for c in NOISY_FRAME_COLUMNS if has_column(files, c))]


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


def selfsup_crop_batch(
    noisy: Mapping[str, np.ndarray], objective: str, crop_px: int, crops_per_image: int, seed: int,
    epoch: int, defect_prob: float, flips: bool, rot90: bool,
) -> dict[str, np.ndarray]:  # fmt: skip
    """:func:`crop_batch`, plus ``noisy2`` cut at the same windows for ``n2n`` (crops are seeded per
    ``(seed, image_id, epoch)``, so cropping frame 2 the same way gives the same windows and flips)."""
    out = crop_batch(noisy, crop_px, crops_per_image, seed, epoch, defect_prob, flips, rot90)
    if objective == "n2n":
        second = crop_batch({**noisy, "noisy": noisy["noisy2"]}, crop_px, crops_per_image, seed, epoch,
                            defect_prob, flips, rot90)  # fmt: skip
        out["noisy2"] = second["noisy"]
    return out


# --------------------------------------------------------------------------------------------------
# Mixing shard sources (data.sources): exact per-epoch shares, real pairs used as they are
# --------------------------------------------------------------------------------------------------
#
# Each epoch the workers consume exactly ``steps_per_epoch * batch_size * num_workers`` crops (the
# runner sizes the epoch that way and Ray Train splits the stream equally), and source ``s`` contributes
# exactly ``mix_totals(weights, total)[s]`` of them, whatever order the union streams them in. Inside a
# source the crops are spread over its training images as evenly as possible (every image gets
# floor or ceil of total/n crops), in an order reshuffled every epoch from ``(seed, epoch, source)``:
# a small source is oversampled (several crops, each with fresh noise, per image), a large one
# undersampled (a different subset every epoch). Images that get no crop this epoch are not noised.

#: Source noise modes (``ShardSource.noise``).
MIX_NOISE_MODES = ("synthesize", "as_is")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix_totals(weights: Sequence[float], total: int) -> list[int]:
    """Split ``total`` crops over sources in proportion to ``weights`` (largest remainder: exact sum).

    Raises:
        ValueError: a weight is not finite and positive, or ``total`` is negative.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"mix weights must be finite and > 0, got {list(weights)}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    exact = w / w.sum() * total
    base = np.floor(exact).astype(np.int64)
    rest = int(total - base.sum())
    # ties go to the earlier source, so the split is deterministic
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return [int(b) for b in base]


def _id_hashes(image_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
            for i in image_ids
        ),
        dtype=np.uint64,
        count=len(image_ids),
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def allocate_crops(
    image_ids: Sequence[str], total: int, seed: int, epoch: int, source: str = ""
) -> np.ndarray:
    """How many crops each image of a source gives in one epoch, ``total`` in all.

    Images are ranked by a hash of ``(seed, epoch, source, image_id)``; the image at rank ``j`` gets
    ``floor((j+1) total / n) - floor(j total / n)`` crops, so every image gets floor or ceil of
    ``total / n``, the counts sum to ``total`` exactly, and which images get the extra (or any) crop
    changes from epoch to epoch. Independent of the order of ``image_ids``.

    Returns:
        int64 (n,) counts aligned with ``image_ids``.
    """
    n = len(image_ids)
    if n == 0:
        if total:
            raise ValueError(f"cannot draw {total} crops from a source without images")
        return np.zeros(0, dtype=np.int64)
    key = int.from_bytes(
        hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{source}".encode(), digest_size=8).digest(), "little"
    )
    rank_key = _splitmix64(_id_hashes(image_ids) ^ np.uint64(key))
    order = np.lexsort((np.asarray([str(i) for i in image_ids]), rank_key))  # ids break (unlikely) ties
    j = np.arange(n, dtype=np.int64)
    per_rank = (j + 1) * int(total) // n - j * int(total) // n
    counts = np.empty(n, dtype=np.int64)
    counts[order] = per_rank
    return counts


_ALLOC_CACHE: dict[tuple[Any, ...], dict[str, int]] = {}


def _allocation(ids_ref: Any, total: int, seed: int, epoch: int, source: str) -> dict[str, int]:
    """:func:`allocate_crops` of a source's id list (an object ref), cached per worker process."""
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


def mix_crop_batch(
    batch: Mapping[str, np.ndarray],
    counts: Sequence[int],
    *,
    source: str,
    noise_mode: str,
    noise: NoiseConfig | Mapping[str, Any],
    seed: int,
    epoch: int,
    crop_px: int,
    defect_prob: float = 0.0,
    flips: bool = True,
    rot90: bool = False,
) -> dict[str, np.ndarray]:
    """Crops of one source's rows for one epoch: ``counts[r]`` crops of row ``r`` (0 = skipped).

    ``noise_mode`` ``synthesize`` adds this epoch's noise (exactly as :func:`train_stage` does);
    ``as_is`` crops the row's own ``noisy`` image (a real pair) with no noise on top, and reports
    ``noise_dose_e_per_px`` NaN. Same crop/augment maths as :func:`crop_batch`.

    Returns:
        The columns of :func:`crop_batch` plus ``source`` (N,) str, N = sum(counts).
    """
    if noise_mode not in MIX_NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {MIX_NOISE_MODES}, got {noise_mode!r}")
    counts = np.asarray(counts, dtype=np.int64)
    parts: list[dict[str, np.ndarray]] = []
    for k in sorted(set(counts[counts > 0].tolist())):
        rows = np.flatnonzero(counts == k)
        sub = {c: v[rows] for c, v in batch.items()}
        if noise_mode == "synthesize":
            sub = add_noise_batch(sub, noise, seed, epoch)
        else:
            if "noisy" not in sub:
                raise ValueError(f"source {source!r} (noise: as_is) has no 'noisy' column")
            sub.pop("noise_epoch", None)
            sub.pop("noise_dose_e_per_px", None)
        parts.append(crop_batch(sub, crop_px, int(k), seed, epoch, defect_prob, flips, rot90))
    if not parts:
        parts.append(
            {
                "image_id": np.asarray([], dtype=object),
                "noisy": np.zeros((0, crop_px, crop_px), np.float32),
                "clean": np.zeros((0, crop_px, crop_px), np.float32),
                "defect": np.zeros((0, crop_px, crop_px), np.uint8),
                "noise_epoch": np.zeros(0, np.int64),
                "noise_dose_e_per_px": np.zeros(0, np.float64),
            }
        )
    out = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    out["image_id"] = np.asarray([str(i) for i in out["image_id"]], dtype=object)
    out["source"] = np.asarray([source] * len(out["image_id"]), dtype=object)
    return out


def mix_train_stage(
    batch: dict[str, np.ndarray],
    *,
    source: str,
    noise_mode: str,
    ids_ref: Any,
    total: int,
    noise: Mapping[str, Any],
    seed: int,
    clock: Any,
    crop_px: int,
    defect_prob: float,
    flips: bool,
    rot90: bool,
) -> dict[str, np.ndarray]:
    """Ray Data map function of one source: this epoch's crop counts, then :func:`mix_crop_batch`."""
    import ray

    epoch = int(ray.get(clock.get.remote()))
    alloc = _allocation(ids_ref, total, seed, epoch, source)
    counts = [alloc.get(str(i), 0) for i in batch["image_id"]]
    return mix_crop_batch(
        batch, counts, source=source, noise_mode=noise_mode, noise=noise, seed=seed, epoch=epoch,
        crop_px=crop_px, defect_prob=defect_prob, flips=flips, rot90=rot90,
    )  # fmt: skip


def build_mix_dataset(
    sources: Sequence[Any],
    totals: Sequence[int],
    noise: NoiseConfig,
    seed: int,
    clock: Any,
    *,
    crop_px: int,
    defect_prob: float,
    flips: bool,
    rot90: bool,
    noise_batch_images: int,
    data_cpus: float,
    block_bytes: int | None = None,
) -> Any:
    """The ``train`` Ray Dataset of a mix: one branch per source (:func:`mix_train_stage`), unioned.

    Args:
        sources: objects with ``name``, ``files``, ``noise`` (``synthesize``/``as_is``) and
            ``train_ids`` (the runner's :class:`~semray.train.runner.SourcePlan`).
        totals: crops per epoch of each source (:func:`mix_totals`).
        the rest: as :func:`build_train_dataset`.

    Rows carry a ``source`` column, so what the workers trained on can be counted per source.
    """
    import ray
    from ray.data.expressions import col

    branches = []
    for src, total in zip(sources, totals, strict=True):
        if total <= 0:
            continue
        cols = TRAIN_COLUMNS + (["noisy"] if src.noise == "as_is" else [])
        ds = ray.data.read_parquet(list(src.files), num_cpus=data_cpus).select_columns(cols)
        if block_bytes:
            ds.context.target_max_block_size = int(block_bytes)
        branches.append(
            ds.filter(expr=col("split") == "train").map_batches(
                mix_train_stage,
                fn_kwargs={
                    "source": src.name,
                    "noise_mode": src.noise,
                    "ids_ref": ray.put(list(src.train_ids)),
                    "total": int(total),
                    "noise": noise.model_dump(mode="json"),
                    "seed": seed,
                    "clock": clock,
                    "crop_px": crop_px,
                    "defect_prob": defect_prob,
                    "flips": flips,
                    "rot90": rot90,
                },
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

"""Pure crop and augmentation maths of the training data (numpy only, no Ray, no I/O).

Training crops are seeded per ``(seed, image_id, epoch)`` like the noise (:func:`crop_rng`), so a row's
crops can be regenerated anywhere; validation uses one fixed window per image (:func:`val_crop_window`).
The four settings every training crop needs travel together as a :class:`CropSpec`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Stream tag that keeps crop/augment draws independent of the noise draws of the same image.
_CROP_STREAM = 0xC409


@dataclass(frozen=True)
class CropSpec:
    """How training crops are cut: side ``crop_px`` (px), the chance ``defect_prob`` (0-1) that a crop
    is placed on a defect, and the ``flips`` / ``rot90`` augmentations (see :func:`crop_batch`)."""

    crop_px: int
    defect_prob: float = 0.0
    flips: bool = True
    rot90: bool = False


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
    batch: Mapping[str, np.ndarray], crop: CropSpec, crops_per_image: int, seed: int, epoch: int
) -> dict[str, np.ndarray]:
    """Random crops of a noisy batch: the same window and augmentation for ``noisy`` and ``clean``.

    Args:
        batch: output of :func:`semray.data.add_noise_batch`: ``image_id`` (B,), ``noisy`` and ``clean``
            (B, H, W) float32 in [0, 1] (or (B,) object arrays of (H, W)), optional ``defect_mask``,
            ``noise_epoch`` and ``noise_dose_e_per_px`` (B,).
        crop: side, defect placement (see :func:`sample_crop_origins`) and augmentations.
        crops_per_image: crops per input image.
        seed, epoch: the run seed and epoch; crops come from :func:`crop_rng`.

    Returns:
        ``image_id`` (N,) str, ``noisy`` and ``clean`` (N, crop, crop) float32 in [0, 1], ``defect``
        (N, crop, crop) uint8 {0, 1} (the defect mask's crop; zeros when unknown), ``noise_epoch`` (N,)
        int64 and ``noise_dose_e_per_px`` (N,) float64, N = B * crops_per_image.
    """
    crop_px = crop.crop_px
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
        origins = sample_crop_origins(noisy.shape, crop_px, crops_per_image, rng, mask, crop.defect_prob)
        codes = sample_augment(crops_per_image, rng, crop.flips, crop.rot90)
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


def crop_frames(
    noisy: Mapping[str, np.ndarray],
    objective: str,
    crop: CropSpec,
    crops_per_image: int,
    seed: int,
    epoch: int,
) -> dict[str, np.ndarray]:
    """:func:`crop_batch`, plus ``noisy2`` cut at the same windows for ``n2n`` (crops are seeded per
    ``(seed, image_id, epoch)``, so cropping frame 2 the same way gives the same windows and flips)."""
    out = crop_batch(noisy, crop, crops_per_image, seed, epoch)
    if objective == "n2n":
        second = crop_batch({**noisy, "noisy": noisy["noisy2"]}, crop, crops_per_image, seed, epoch)
        out["noisy2"] = second["noisy"]
    return out


def empty_crops(crop_px: int) -> dict[str, np.ndarray]:
    """The columns of :func:`crop_batch` with no rows (a batch none of whose images gets a crop)."""
    shape = (0, crop_px, crop_px)
    return {
        "image_id": np.asarray([], dtype=object),
        "noisy": np.zeros(shape, np.float32),
        "clean": np.zeros(shape, np.float32),
        "defect": np.zeros(shape, np.uint8),
        "noise_epoch": np.zeros(0, np.int64),
        "noise_dose_e_per_px": np.zeros(0, np.float64),
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

"""Pure mix allocation (numpy only): how many crops each source and each image give in one epoch.

Each epoch of a mix (``data.sources``) the workers consume exactly ``steps_per_epoch * batch_size *
num_workers`` crops (the runner sizes the epoch that way and Ray Train splits the stream equally), and
source ``s`` contributes exactly ``mix_totals(weights, total)[s]`` of them, whatever order the union
streams them in. Inside a source the crops are spread over its training images as evenly as possible
(every image gets floor or ceil of total/n crops), in an order reshuffled every epoch from
``(seed, epoch, source)``: a small source is oversampled (several crops, each with fresh noise, per
image), a large one undersampled (a different subset every epoch). Images that get no crop this epoch
are not noised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

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

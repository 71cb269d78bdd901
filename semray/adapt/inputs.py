"""The user's noisy images for ``semray adapt``: reading and checking them, frame averaging, the tile
split, and the user-content shards.

Everything here is plain numpy (plus the page reader shared with calibration and the shard writer); no
Ray, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from semray.calibrate.inputs import read_noisy_pages
from semray.io import IMAGE_SUFFIXES, list_images, page_name, write_shard

#: ``pattern`` column of the user-content shards.
USER_PATTERN = "user"
#: Image-id prefix of the user's noisy tiles (the self-supervised source, ``user.selfsup``).
NOISY_PATTERN = "user_noisy"


class AdaptInputError(ValueError):
    """The user's images cannot be adapted to; the message names every offending file and why."""


@dataclass
class UserImage:
    """One input image: its file, float32 (H, W) pixels in [0, 1], the file's dtype, and which page of
    the file it is (``page`` from 0 of ``pages``; every page of a multipage TIFF is an image of its own)."""

    path: Path
    image: np.ndarray
    dtype: str
    page: int = 0
    pages: int = 1

    @property
    def name(self) -> str:
        """How reports name it: the path, or ``path[page k]`` (k from 0) for a page of a multipage file."""
        return page_name(self.path, self.page, self.pages)


@dataclass(frozen=True)
class Tile:
    """A square window of one image and the split it belongs to (``train`` or ``val``)."""

    index: int
    y: int
    x: int
    size_y: int
    size_x: int
    split: str

    def of(self, image: np.ndarray) -> np.ndarray:
        """This tile's pixels of ``image`` (H, W) -> (size_y, size_x)."""
        return image[self.y : self.y + self.size_y, self.x : self.x + self.size_x]


def _list(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    paths: list[Path] = []
    problems: list[str] = []
    for src in inputs:
        try:
            found = list_images(src)
        except FileNotFoundError as e:
            problems.append(str(e))
            continue
        if not found:
            problems.append(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        paths.extend(p for p in found if p not in paths)
    return paths, problems


def read_inputs(inputs: Sequence[str | Path], min_side_px: int, frames: bool) -> list[UserImage]:
    """Read every image under ``inputs`` (files or folders) and check they can be adapted to together.

    Every page of a multipage TIFF is an image of its own (:func:`semray.io.iter_pages`), named
    ``file.tif[page k]`` (:attr:`UserImage.name`), with ``frames`` a frame of its own.

    Refused (all problems in one message, each naming its files and pages): missing or unreadable files
    or pages, reduced-resolution preview pages (thumbnails), images with a side under ``min_side_px``,
    constant images (these four found by :func:`semray.calibrate.inputs.read_noisy_pages`, which
    ``semray calibrate-noise`` reads with too), files of different dtypes (8-bit and 16-bit grey levels
    are different intensity scales, which one noise model cannot describe), and with ``frames`` images
    of different shapes (repeated scans of one field have one size) or fewer than two.

    Raises:
        AdaptInputError: any of the above.
    """
    paths, problems = _list(inputs)
    pages, unusable = read_noisy_pages(paths, min_side_px)
    problems += unusable
    images = [UserImage(pg.path, pg.image, pg.meta.dtype, pg.meta.page, pg.meta.pages) for pg in pages]
    problems += _mixed(images, "dtype", lambda u: u.dtype, "grey-level scales cannot share one noise model")
    if frames:
        problems += _mixed(
            images, "shape", lambda u: "x".join(map(str, u.image.shape)), "--frames needs scans of one size"
        )
        if len(images) < 2 and not problems:
            problems.append(f"--frames needs at least two scans of one field, got {len(images)}")
    if not images and not problems:
        problems.append(f"no images found under {[str(s) for s in inputs]}")
    if problems:
        raise AdaptInputError("cannot adapt to these images:\n  " + "\n  ".join(problems))
    return images


def _mixed(images: Sequence[UserImage], what: str, key: Any, why: str) -> list[str]:
    groups: dict[str, list[str]] = {}
    for u in images:
        groups.setdefault(key(u), []).append(u.name)
    if len(groups) <= 1:
        return []
    listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(groups.items()))
    return [f"mixed {what}s ({why}): {listing}"]


def average_frames(
    images: Sequence[np.ndarray], max_shift_px: float | None = None
) -> tuple[list[np.ndarray], np.ndarray, list[list[float]]]:
    """Register repeated scans of one field onto the first and average them.

    Uses :func:`semray.ingest.register_pair` (sub-pixel cross-correlation + spline shift) and trims the
    extrapolated border (``ceil`` of the largest shift) from every frame.

    Args:
        images: K >= 2 float32 (H, W) frames in [0, 1], one shape.
        max_shift_px: the largest drift searched (px per axis; None: unbounded), see
            :func:`semray.ingest.register_pair`.

    Returns:
        ``(registered frames, their mean, shifts [dy, dx] per frame)``; frames and mean are float32
        (H - 2m, W - 2m) in [0, 1].
    """
    from semray.ingest import register_pair

    ref = np.asarray(images[0], dtype=np.float32)
    moved, shifts = [ref], [[0.0, 0.0]]
    for img in images[1:]:
        reg, (dy, dx) = register_pair(np.asarray(img, dtype=np.float32), ref, max_shift_px=max_shift_px)
        moved.append(reg)
        shifts.append([dy, dx])
    m = math.ceil(max(max(abs(a), abs(b)) for a, b in shifts))
    if m:
        moved = [f[m:-m, m:-m] for f in moved]
    mean = np.mean(np.stack(moved), axis=0).astype(np.float32)
    return moved, mean, shifts


def split_tiles(
    shapes: Sequence[tuple[int, int]], tile_px: int, val_fraction: float, seed: int
) -> list[Tile]:
    """Cut every image into non-overlapping tiles (ingest's crop grid) and hold some back for validation.

    Images smaller than ``tile_px`` are one tile of their own size. ``round(val_fraction * n)`` tiles
    (at least one, and never all) are ``val``, drawn at random with ``seed``; with one tile in total
    it is split in two halves along y (top: train, bottom: val), so there is always something to
    validate and something to train on.
    """
    from semray.ingest import crop_grid

    tiles: list[Tile] = []
    for i, (h, w) in enumerate(shapes):
        side = min(tile_px, h, w)
        tiles += [Tile(i, y, x, side, side, "train") for y, x, _, _ in crop_grid((h, w), side, side)]
    if len(tiles) == 1:
        t = tiles[0]
        half = t.size_y // 2
        return [
            Tile(t.index, t.y, t.x, half, t.size_x, "train"),
            Tile(t.index, t.y + half, t.x, t.size_y - half, t.size_x, "val"),
        ]
    n_val = min(len(tiles) - 1, max(1, round(val_fraction * len(tiles))))
    val = set(np.random.default_rng([seed, 7]).choice(len(tiles), size=n_val, replace=False).tolist())
    return [
        Tile(t.index, t.y, t.x, t.size_y, t.size_x, "val" if k in val else "train")
        for k, t in enumerate(tiles)
    ]


def user_records(
    proxies: Sequence[np.ndarray], sources: Sequence[UserImage], tiles: Sequence[Tile]
) -> list[dict[str, Any]]:
    """Shard rows (semray.io schema, like ingested clean references) of every tile of the clean proxies.

    Nobody labelled defects, so ``defect_mask`` is empty and ``defect_mask_known`` False; provenance
    columns say which file, page and window each row came from (``sources[tile.index]``).
    """
    rows = []
    for t in tiles:
        clean = np.ascontiguousarray(t.of(proxies[t.index]), dtype=np.float32)
        rows.append(
            {
                "image_id": f"{USER_PATTERN}/{t.index:04d}/y{t.y}x{t.x}",
                "split": t.split,
                "pattern": USER_PATTERN,
                "clean": clean,
                "defect_mask": np.zeros(clean.shape, dtype=bool),
                "defect_mask_known": False,
                "n_defects": -1,
                "defect_types": "",
                "source": USER_PATTERN,
                "source_path": str(sources[t.index].path),
                "page": sources[t.index].page,
                "crop_y": t.y,
                "crop_x": t.x,
            }
        )
    return rows


def noisy_records(
    scans: Sequence[Sequence[np.ndarray]],
    proxies: Sequence[np.ndarray],
    sources: Sequence[UserImage],
    tiles: Sequence[Tile],
    pairs: bool,
) -> list[dict[str, Any]]:
    """Shard rows of the user's noisy *training* tiles, for a self-supervised source (``user.selfsup``).

    Args:
        scans: per proxy, its noisy scans as acquired: ``[[image]]`` per input image, or with ``frames``
            one entry holding every registered frame of the field (float32 (H, W) in [0, 1]).
        proxies, sources, tiles: as for :func:`user_records` (only ``train`` tiles are used: the
            held-back ``val`` tiles choose the checkpoint and must not be trained on).
        pairs: Noise2Noise rows: ``noisy`` a tile of scan k, ``noisy2`` the same tile of scan k + 1
            (needs two scans or more); else one row per scan with ``noisy`` only.

    Returns:
        Rows of :func:`user_records` (``clean`` = the proxy's tile, for the shard schema; a
        self-supervised source does not train against it) with ``noisy`` (and ``noisy2``), all of split
        ``train``, ids ``user_noisy/<image>/y<y>x<x>/s<k>``.
    """
    train = [t for t in tiles if t.split == "train"]
    rows = []
    for base, t in zip(user_records(proxies, sources, train), train, strict=True):
        frames = [np.asarray(f, dtype=np.float32) for f in scans[t.index]]
        sets = list(pairwise(frames)) if pairs else [(f,) for f in frames]
        for k, scan in enumerate(sets):
            src = sources[k] if len(frames) > 1 else sources[t.index]
            row = {**base, "image_id": f"{NOISY_PATTERN}/{t.index:04d}/y{t.y}x{t.x}/s{k}",
                   "source_path": str(src.path), "page": src.page, "noisy": t.of(scan[0]).copy()}  # fmt: skip
            if pairs:
                row["noisy2"] = t.of(scan[1]).copy()
            rows.append(row)
    return rows


def write_user_shards(rows: Sequence[dict[str, Any]], out_dir: Path, rows_per_shard: int = 64) -> list[Path]:
    """Write ``rows`` as ``out_dir/<split>/part-XXXXX.parquet``; returns the files."""
    files = []
    for split in ("train", "val"):
        part = [r for r in rows if r["split"] == split]
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for k in range(0, len(part), rows_per_shard):
            files.append(
                write_shard(
                    part[k : k + rows_per_shard], out_dir / split / f"part-{k // rows_per_shard:05d}.parquet"
                )
            )
    return files


def held_back_crops(
    images: Sequence[np.ndarray], tiles: Sequence[Tile], crop_px: int, max_crops: int
) -> np.ndarray:
    """Centre crops of the ``val`` tiles of ``images`` (the user's noisy images, or one frame of them).

    The side is ``crop_px`` or the smallest val tile side, whichever is smaller, so the crops stack.

    Returns:
        float32 (N, S, S), N <= ``max_crops`` (the first val tiles in image order).
    """
    val = [t for t in tiles if t.split == "val"][:max_crops]
    side = min([crop_px] + [min(t.size_y, t.size_x) for t in val])
    out = []
    for t in val:
        win = t.of(images[t.index])
        y0, x0 = (win.shape[0] - side) // 2, (win.shape[1] - side) // 2
        out.append(win[y0 : y0 + side, x0 : x0 + side])
    return np.stack(out).astype(np.float32)

"""Image files in and out, and the Parquet shard schema.

Inside semray an image is ``float32`` in ``[0, 1]`` with shape ``(H, W)``. :func:`read_image` converts a
file to that and returns an :class:`ImageMeta` that :func:`write_image` uses to convert back, so a
16-bit TIFF comes back as a 16-bit TIFF of the same shape with its tags (vendor metadata included)
carried over where tifffile allows.

Shards are Parquet files whose image columns use Ray's tensor extension type, so Ray Data reads them
as ``(B, H, W)`` numpy batches and plain pyarrow reads them too (see :func:`read_shard`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
SUPPORTED_DTYPES = ("uint8", "uint16", "float32", "float64")
#: 16384 x 16384: larger single images are refused rather than risking the node's memory.
DEFAULT_MAX_PIXELS = 16384 * 16384

# Tags that tifffile writes itself from the array and the arguments we pass; everything else found on
# the input page is carried over verbatim as an extra tag (vendor metadata such as FEI 34680/34682 or
# Zeiss CZ_SEM 34118 included).
_STRUCTURAL_TIFF_TAGS = {
    254, 256, 257, 258, 259, 262, 266, 273, 274, 277, 278, 279, 282, 283, 284, 296, 305, 317, 320,
    322, 323, 324, 325, 330, 338, 339, 340, 341, 270, 347, 530, 532, 33550, 33922, 34665, 34853,
    50838, 50839,
}  # fmt: skip


class ImageReadError(ValueError):
    """A file could not be read as a single-channel SEM image; the message names the file and why."""


@dataclass
class ImageMeta:
    """What is needed to write a denoised image back in the input's own format.

    Attributes:
        dtype: numpy dtype name of the file's pixels (``uint8``, ``uint16``, ``float32``, ``float64``).
        shape: ``(H, W)`` of the image.
        format: ``"png"`` or ``"tiff"``.
        float_range: for float files, the ``(lo, hi)`` that was mapped to ``[0, 1]`` (identity when the
            data already lay in ``[0, 1]``); ``None`` for integer files.
        description: TIFF ImageDescription, if any.
        resolution: TIFF ``(x, y, unit)`` resolution, if any.
        software: TIFF Software tag, if any.
        extratags: other TIFF tags as ``(code, dtype, count, value, writeonce)`` tuples for tifffile.
        page: page index the image came from (multipage TIFF).
    """

    dtype: str
    shape: tuple[int, int]
    format: str
    float_range: tuple[float, float] | None = None
    description: str | None = None
    resolution: tuple[Any, Any, Any] | None = None
    software: str | None = None
    extratags: list[tuple[int, int, int, Any, bool]] = field(default_factory=list)
    page: int = 0

    @property
    def tag_codes(self) -> list[int]:
        """Codes of the carried-over extra TIFF tags."""
        return [t[0] for t in self.extratags]


def image_format(path: str | Path) -> str:
    """``"png"`` or ``"tiff"`` from the file suffix; raises :class:`ImageReadError` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        return "png"
    if suffix in (".tif", ".tiff"):
        return "tiff"
    raise ImageReadError(f"{path}: unsupported file type {suffix!r} (expected one of {IMAGE_SUFFIXES})")


def to_float01(data: np.ndarray, source: str = "<array>") -> tuple[np.ndarray, tuple[float, float] | None]:
    """Convert file pixels to the library convention.

    Args:
        data: (H, W) array, uint8, uint16 or float.
        source: name used in error messages.

    Returns:
        ``(image, float_range)``: float32 (H, W) in [0, 1], and for float input the ``(lo, hi)`` that maps
        to [0, 1] (``(0.0, 1.0)`` when the data already lies in [0, 1]).
    """
    if data.dtype == np.uint8:
        return (data.astype(np.float32) / 255.0), None
    if data.dtype == np.uint16:
        return (data.astype(np.float32) / 65535.0), None
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise ImageReadError(f"{source}: float image contains NaN or infinite values")
        lo, hi = float(data.min()), float(data.max())
        if lo >= 0.0 and hi <= 1.0:
            return data.astype(np.float32), (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        return ((data.astype(np.float64) - lo) / span).astype(np.float32), (lo, lo + span)
    raise ImageReadError(
        f"{source}: unsupported pixel dtype {data.dtype} (supported: {', '.join(SUPPORTED_DTYPES)})"
    )


def from_float01(image: np.ndarray, dtype: str, float_range: tuple[float, float] | None = None) -> np.ndarray:
    """Inverse of :func:`to_float01`: float (H, W) in [0, 1] to the file dtype (rounded and clipped)."""
    img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if dtype == "uint8":
        return np.rint(img * 255.0).astype(np.uint8)
    if dtype == "uint16":
        return np.rint(img * 65535.0).astype(np.uint16)
    if dtype in ("float32", "float64"):
        lo, hi = float_range or (0.0, 1.0)
        out = img.astype(np.float64) * (hi - lo) + lo if (lo, hi) != (0.0, 1.0) else img
        return out.astype(dtype)
    raise ValueError(f"cannot write pixel dtype {dtype!r} (supported: {', '.join(SUPPORTED_DTYPES)})")


def _check_pixels(data: np.ndarray, path: Path, max_pixels: int) -> np.ndarray:
    if data.ndim == 3 and data.shape[-1] in (1,):
        data = data[..., 0]
    if data.ndim != 2:
        shape = "x".join(str(s) for s in data.shape)
        raise ImageReadError(
            f"{path}: expected a single-channel (grayscale) image, got an array of shape {shape}"
        )
    if data.size == 0:
        raise ImageReadError(f"{path}: image has no pixels")
    if data.size > max_pixels:
        raise ImageReadError(
            f"{path}: image of {data.shape[0]}x{data.shape[1]} exceeds the limit of {max_pixels} px"
        )
    if data.dtype.name not in SUPPORTED_DTYPES:
        raise ImageReadError(
            f"{path}: unsupported pixel dtype {data.dtype} (supported: {', '.join(SUPPORTED_DTYPES)})"
        )
    return data


def _tiff_extratags(tf: Any, page: Any) -> list[tuple[int, int, int, Any, bool]]:
    """Carry over every non-structural tag of ``page``; values tifffile parsed into dicts are re-read raw."""
    out = []
    for tag in page.tags.values():
        if tag.code in _STRUCTURAL_TIFF_TAGS:
            continue
        value = tag.value
        dtype = int(tag.dtype)
        if isinstance(value, (dict, list)) or hasattr(value, "__dict__"):
            # tifffile parsed a vendor blob (e.g. FEI INI text, Zeiss CZ_SEM) into a dict: copy the raw
            # bytes instead, so the output holds exactly what the microscope wrote.
            fh = tf.filehandle
            fh.seek(tag.valueoffset)
            value = fh.read(tag.valuebytecount)
            if dtype not in (1, 2, 7):
                dtype = 7  # UNDEFINED: raw bytes
            count = len(value)
        elif isinstance(value, bytes):
            count = len(value)
        elif isinstance(value, str):
            count = 0  # tifffile computes the length of ASCII values
        else:
            count = tag.count
        if hasattr(value, "value") and not isinstance(value, (bytes, str)):  # enums
            value = int(value.value)
        out.append((tag.code, dtype, count, value, True))
    return out


def read_image(
    path: str | Path, page: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, ImageMeta]:
    """Read a PNG or TIFF SEM image.

    Args:
        path: file to read (``.png``, ``.tif``, ``.tiff``).
        page: page of a multipage TIFF.
        max_pixels: refuse images with more pixels than this.

    Returns:
        ``(image, meta)``: float32 (H, W) in [0, 1] and the metadata to write it back.

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, multi-channel, of an
            unsupported dtype, too large, or contains non-finite values. The message names the file.
    """
    path = Path(path)
    fmt = image_format(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    meta = ImageMeta(dtype="", shape=(0, 0), format=fmt, page=page)
    try:
        if fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tf:
                if page >= len(tf.pages):
                    raise ImageReadError(f"{path}: page {page} requested but the file has {len(tf.pages)}")
                p = tf.pages[page]
                data = p.asarray()
                meta.description = p.description or None
                meta.software = p.software or None
                if 282 in p.tags and 283 in p.tags:
                    unit = p.tags[296].value if 296 in p.tags else 2
                    meta.resolution = (p.tags[282].value, p.tags[283].value, int(unit))
                meta.extratags = _tiff_extratags(tf, p)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L"):
                    data = np.asarray(im, dtype=np.uint16)
                elif im.mode == "I":  # Pillow widens 16-bit PNG to int32 in some versions
                    arr = np.asarray(im)
                    if arr.min() < 0 or arr.max() > 65535:
                        raise ImageReadError(f"{path}: 32-bit integer PNG is not supported")
                    data = arr.astype(np.uint16)
                elif im.mode == "L":
                    data = np.asarray(im, dtype=np.uint8)
                else:
                    raise ImageReadError(
                        f"{path}: expected a single-channel (grayscale) image, got PNG mode {im.mode!r} "
                        f"with {len(im.getbands())} channels"
                    )
    except ImageReadError:
        raise
    except Exception as e:  # tifffile/Pillow raise many types for truncated or foreign files
        raise ImageReadError(f"{path}: cannot be read as {fmt.upper()} ({type(e).__name__}: {e})") from e
    data = _check_pixels(np.asarray(data), path, max_pixels)
    image, meta.float_range = to_float01(data, str(path))
    meta.dtype = data.dtype.name
    meta.shape = (int(data.shape[0]), int(data.shape[1]))
    return image, meta


def count_pages(path: str | Path) -> int:
    """Number of pages of a TIFF (1 for PNG)."""
    if image_format(path) != "tiff":
        return 1
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return len(tf.pages)


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_image(path: str | Path, image: np.ndarray, meta: ImageMeta | None = None) -> Path:
    """Write float32 (H, W) [0, 1] ``image`` to ``path`` in the format and dtype given by ``meta``.

    The file is written to a temporary name in the same folder and renamed into place, so a reader or a
    killed job never sees a half-written output. Without ``meta`` the format comes from the suffix and
    the dtype is uint8 for PNG and float32 for TIFF.
    """
    path = Path(path)
    fmt = image_format(path)
    if meta is None:
        meta = ImageMeta(dtype="uint8" if fmt == "png" else "float32", shape=tuple(image.shape), format=fmt)
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"write_image expects an (H, W) image, got shape {image.shape}")
    data = from_float01(image, meta.dtype, meta.float_range)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        if fmt == "tiff":
            import tifffile

            kwargs: dict[str, Any] = {"photometric": "minisblack", "metadata": None}
            if meta.description:
                kwargs["description"] = meta.description
            if meta.software:
                kwargs["software"] = meta.software
            if meta.resolution:
                x, y, unit = meta.resolution
                kwargs["resolution"] = (x, y)
                kwargs["resolutionunit"] = unit
            tifffile.imwrite(tmp, data, extratags=meta.extratags or None, **kwargs)
        else:
            from PIL import Image

            if data.dtype in (np.uint8, np.uint16):  # Pillow picks mode L / I;16 from the dtype
                Image.fromarray(data).save(tmp, format="PNG")
            else:
                raise ValueError(f"{path}: PNG cannot hold {data.dtype} pixels; use a .tif output")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_images(root: str | Path) -> list[Path]:
    """All ``.tif``/``.tiff``/``.png`` files under ``root`` (recursively, sorted); ``[root]`` for a file."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


# --------------------------------------------------------------------------------------------------
# Parquet shards
# --------------------------------------------------------------------------------------------------

#: Columns every shard has; image columns hold (H, W) tensors (Ray tensor extension type).
SHARD_REQUIRED_COLUMNS = ("image_id", "clean", "defect_mask", "pattern", "split")
#: Image (tensor) columns a shard may hold.
SHARD_TENSOR_COLUMNS = ("clean", "reference", "defect_mask", "noisy", "noisy2")
SPLITS = ("train", "val", "test")


class ShardError(ValueError):
    """A shard file is missing, unreadable, or does not follow the shard schema; names the file."""


def _tensor_array(values: Sequence[np.ndarray]) -> pa.Array:
    from ray.data.extensions import ArrowTensorArray

    shapes = {np.shape(v) for v in values}
    if len(shapes) == 1:
        return ArrowTensorArray.from_numpy(np.stack(values))
    return ArrowTensorArray.from_numpy(np.array(list(values), dtype=object))


def records_to_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a shard table from row dicts (image columns as (H, W) arrays, other columns scalars)."""
    rows = list(records)
    if not rows:
        raise ShardError("cannot build a shard from zero records")
    missing = [c for c in SHARD_REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise ShardError(f"shard records lack required column(s): {', '.join(missing)}")
    columns: dict[str, Any] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name in SHARD_TENSOR_COLUMNS:
            dtype = bool if name == "defect_mask" else np.float32
            columns[name] = _tensor_array([np.asarray(v, dtype=dtype) for v in values])
        else:
            columns[name] = pa.array(values)
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise ShardError(f"shard records have unknown split value(s) {bad}; expected one of {SPLITS}")
    return pa.table(columns)


def write_shard(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one Parquet shard atomically (zstd-compressed); returns its path."""
    path = Path(path)
    table = records_to_table(records)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_shard(path: str | Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read a shard into numpy columns: image columns as (N, H, W) arrays (object arrays if ragged)."""
    import ray.data.extensions  # noqa: F401  (registers the tensor extension type with pyarrow)

    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file does not exist")
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:
        raise ShardError(f"{path}: not a readable Parquet shard ({type(e).__name__}: {e})") from e
    missing = [c for c in SHARD_REQUIRED_COLUMNS if columns is None and c not in table.column_names]
    if missing:
        raise ShardError(f"{path}: shard lacks required column(s): {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        if name in SHARD_TENSOR_COLUMNS:
            out[name] = col.to_numpy()
        else:
            out[name] = np.asarray(col.to_pylist(), dtype=object if pa.types.is_string(col.type) else None)
    return out


def list_shards(root: str | Path) -> list[Path]:
    """All ``*.parquet`` shard files under ``root`` (sorted); raises :class:`ShardError` if none."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    files = [f for f in files if f.name != "manifest.parquet"]
    if not files:
        raise ShardError(f"{root}: no Parquet shards found")
    return files

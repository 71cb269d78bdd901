"""Image files in and out, and the Parquet shard schema.

Inside semray an image is ``float32`` in ``[0, 1]`` with shape ``(H, W)``. :func:`read_image` converts one
page of a file to that and returns an :class:`ImageMeta` that :func:`write_image` (one page) and
:func:`write_pages` (every page of a multipage TIFF) use to convert back, so a file comes back in its
own layout:

* dtype and shape: a 16-bit TIFF comes back as a 16-bit TIFF of the same shape;
* tags: TIFF tags (vendor metadata such as FEI 34682 or Zeiss 34118 included), PNG text chunks and
  JPEG EXIF/ICC/comment are carried over where the writer allows;
* grey saved as colour: an RGB/RGBA (or grey + alpha) file whose colour channels are equal away from
  a thin border or an overlay (see :mod:`semray.greyscale` for the limits) is read as grey and
  written back with the same channels; the pixels whose channels differ (a coloured border, an
  annotation) and the alpha channel are copied through from the input. A true colour image is refused
  with an :class:`ImageReadError` that says so;
* palettes: an indexed-colour TIFF/PNG whose palette is grey is read as its grey levels and written
  back as indices into the same palette (nearest entry); a colour palette is refused;
* pages: :func:`iter_pages` yields every page of a multipage TIFF, :func:`write_pages` writes them back
  as the same pages in the same order, each with its own tags;
* JPEG (``.jpg``/``.jpeg``) is read like the others and written back as JPEG with the input's own
  quantisation tables and chroma subsampling, so the output is no more compressed than the input (JPEG
  is lossy: the written pixels differ from the denoised ones by that compression).

Shards are Parquet files whose image columns use Ray's tensor extension type, so Ray Data reads them
as ``(B, H, W)`` numpy batches and plain pyarrow reads them too (see :func:`read_shard`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semray.greyscale import (
    ColourLayout,
    NotGreyError,
    palette_grey,
    split_grey,
    to_file_layout,
)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
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
_FORMATS = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg"}


class ImageReadError(ValueError):
    """A file could not be read as a grey SEM image; the message names the file and why."""


@dataclass
class ImageMeta:
    """What is needed to write a denoised image back in the input's own format and layout.

    Attributes:
        dtype: numpy dtype name of the grey values (``uint8``, ``uint16``, ``float32``, ``float64``);
            for a palette file the dtype of its palette's grey levels.
        shape: ``(H, W)`` of the image.
        format: ``"png"``, ``"tiff"`` or ``"jpeg"``.
        float_range: for float files, the ``(lo, hi)`` that was mapped to ``[0, 1]`` (identity when the
            data already lay in ``[0, 1]``); ``None`` for integer files.
        description: TIFF ImageDescription, if any.
        resolution: TIFF ``(x, y, unit)`` resolution, if any.
        software: TIFF Software tag, if any.
        extratags: other TIFF tags as ``(code, dtype, count, value, writeonce)`` tuples for tifffile.
        page: page index the image came from (multipage TIFF).
        pages: number of pages of the file.
        colour: how the grey sits in a colour or palette file; ``None`` for a plain grey file.
        photometric: TIFF photometric interpretation name (``minisblack``, ``miniswhite``, ``rgb``, ...).
        subfiletype: TIFF NewSubfileType (bit 0: reduced-resolution preview).
        byteorder, bigtiff: TIFF byte order (``<``/``>``) and BigTIFF flag of the input.
        pil_info: PNG/JPEG side data written back by Pillow (dpi, text chunks, EXIF, ICC, comment,
            transparency, and a JPEG's quantisation tables and subsampling).
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
    pages: int = 1
    colour: ColourLayout | None = None
    photometric: str = "minisblack"
    subfiletype: int = 0
    byteorder: str = "<"
    bigtiff: bool = False
    pil_info: dict[str, Any] = field(default_factory=dict)

    @property
    def tag_codes(self) -> list[int]:
        """Codes of the carried-over extra TIFF tags."""
        return [t[0] for t in self.extratags]

    @property
    def layout(self) -> str:
        """``"grey"``, or how grey was stored: ``"rgb"``, ``"grey+alpha"``, ``"palette"``."""
        return "grey" if self.colour is None else self.colour.kind


def image_format(path: str | Path) -> str:
    """``"png"``, ``"tiff"`` or ``"jpeg"`` from the file suffix; raises :class:`ImageReadError` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r} (expected one of {IMAGE_SUFFIXES})")
    return _FORMATS[suffix]


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


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _check_pixels(data: np.ndarray, source: str, max_pixels: int) -> np.ndarray:
    if data.ndim == 3 and data.shape[-1] in (1,):
        data = data[..., 0]
    if data.ndim != 2:
        shape = "x".join(str(s) for s in data.shape)
        raise ImageReadError(
            f"{source}: expected a single-channel (grayscale) image, got an array of shape {shape}"
        )
    if data.size == 0:
        raise ImageReadError(f"{source}: image has no pixels")
    if data.size > max_pixels:
        raise ImageReadError(
            f"{source}: image of {data.shape[0]}x{data.shape[1]} exceeds the limit of {max_pixels} px"
        )
    if data.dtype.name not in SUPPORTED_DTYPES:
        raise ImageReadError(
            f"{source}: unsupported pixel dtype {data.dtype} (supported: {', '.join(SUPPORTED_DTYPES)})"
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


def _tiff_grey(p: Any, data: np.ndarray, source: str) -> tuple[np.ndarray, ColourLayout | None]:
    """Grey pixels of one decoded TIFF page and how they sit in it (see :func:`split_grey`)."""
    photometric = p.photometric.name.lower()
    if photometric == "palette":
        if p.colormap is None:
            raise ImageReadError(f"{source}: palette image without a ColorMap")
        grey, layout = palette_grey(data, p.colormap, source)
        layout.colormap = np.asarray(p.colormap, dtype=np.uint16)
        return grey, layout
    samples = int(p.samplesperpixel)
    if samples == 1 and photometric in ("minisblack", "miniswhite"):
        return data, None
    if samples > 1 and photometric in ("rgb", "minisblack", "miniswhite"):
        if int(p.planarconfig) == 2:  # separate planes: tifffile gives (C, H, W)
            data = np.moveaxis(data, 0, -1)
        n_colour = 3 if photometric == "rgb" else 1
        if samples - n_colour != len(p.extrasamples or ()):
            raise ImageReadError(
                f"{source}: {photometric} page with {samples} samples per pixel and "
                f"{len(p.extrasamples or ())} extra samples is not a grey, RGB or RGBA image"
            )
        grey, layout = split_grey(data, n_colour, "rgb" if n_colour == 3 else "grey+alpha", source)
        layout.planar = int(p.planarconfig) == 2
        layout.extrasamples = tuple(int(e) for e in p.extrasamples or ())
        return grey, layout
    raise ImageReadError(
        f"{source}: photometric interpretation {photometric!r} with {samples} samples per pixel is not "
        "supported (grey, grey saved as RGB/RGBA, or a grey palette)"
    )


def _raise_read_error(e: Exception, source: str, fmt: str) -> NoReturn:
    """Raise what a decoder raises for ``e``: an :class:`ImageReadError` as is, a :class:`NotGreyError`'s
    message as an ``ImageReadError``, anything else as "``source``: cannot be read as ``fmt``"."""
    if isinstance(e, ImageReadError):
        raise e
    if isinstance(e, NotGreyError):
        raise ImageReadError(str(e)) from None
    raise ImageReadError(f"{source}: cannot be read as {fmt} ({type(e).__name__}: {e})") from e


def _decode_tiff_page(tf: Any, path: Path, index: int, max_pixels: int) -> tuple[np.ndarray, ImageMeta]:
    """Page ``index`` of an open TIFF as float32 (H, W) [0, 1] and its :class:`ImageMeta`."""
    n = len(tf.pages)
    if index >= n:
        raise ImageReadError(f"{path}: page {index} requested but the file has {n}")
    source = str(path) if n == 1 else f"{path} page {index}"
    try:
        p = tf.pages[index]
        data = np.asarray(p.asarray())
        grey, colour = _tiff_grey(p, data, source)
        meta = ImageMeta(dtype="", shape=(0, 0), format="tiff", page=index, pages=n, colour=colour)
        meta.photometric = p.photometric.name.lower()
        meta.description = p.description or None
        meta.software = p.software or None
        meta.subfiletype = int(p.subfiletype or 0)
        meta.byteorder, meta.bigtiff = tf.byteorder, bool(tf.is_bigtiff)
        if 282 in p.tags and 283 in p.tags:
            unit = p.tags[296].value if 296 in p.tags else 2
            meta.resolution = (p.tags[282].value, p.tags[283].value, int(unit))
        meta.extratags = _tiff_extratags(tf, p)
    except Exception as e:  # tifffile raises many types for truncated or foreign pages
        _raise_read_error(e, source, "TIFF")
    return _finish(grey, meta, source, max_pixels)


def _finish(grey: np.ndarray, meta: ImageMeta, source: str, max_pixels: int) -> tuple[np.ndarray, ImageMeta]:
    data = _check_pixels(np.asarray(grey), source, max_pixels)
    image, meta.float_range = to_float01(data, source)
    meta.dtype = data.dtype.name
    meta.shape = (int(data.shape[0]), int(data.shape[1]))
    return image, meta


def _png_is_16bit_colour(path: Path) -> bool:
    """Pillow reads 16-bit colour PNGs as 8-bit: IHDR bit depth (byte 24) 16 and a colour type."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[24] == 16 and head[25] in (2, 4, 6)


def _pil_info(im: Any, fmt: str) -> dict[str, Any]:
    """Side data Pillow can write back: dpi, ICC, EXIF, transparency, comment, PNG text, JPEG tables."""
    info = {k: im.info[k] for k in ("dpi", "icc_profile", "exif", "transparency", "comment") if k in im.info}
    if fmt == "png" and getattr(im, "text", None):
        info["text"] = dict(im.text)
    if fmt == "jpeg":
        from PIL import JpegImagePlugin

        info["qtables"] = getattr(im, "quantization", None)
        info["subsampling"] = JpegImagePlugin.get_sampling(im)
    return info


def _pil_grey(im: Any, source: str) -> tuple[np.ndarray, ColourLayout | None]:
    """Grey pixels of a Pillow image and how they sit in it."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.uint16), None
    if mode == "I":  # Pillow widens 16-bit PNG to int32 in some versions
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageReadError(f"{source}: 32-bit integer image is not supported")
        return arr.astype(np.uint16), None
    if mode == "L":
        return np.asarray(im, dtype=np.uint8), None
    if mode == "P":
        palette = im.getpalette() or []
        levels = np.asarray(palette, dtype=np.uint8).reshape(-1, 3).T
        grey, layout = palette_grey(np.asarray(im), levels, source)
        layout.colormap = palette
        return grey, layout
    if mode in ("RGB", "RGBA", "LA"):
        n_colour = 1 if mode == "LA" else 3
        return split_grey(np.asarray(im), n_colour, "grey+alpha" if mode == "LA" else "rgb", source)
    raise ImageReadError(
        f"{source}: image mode {mode!r} ({len(im.getbands())} channels) is not supported (grey, grey saved "
        "as RGB/RGBA, or a grey palette)"
    )


def _decode_pil(path: Path, fmt: str, max_pixels: int) -> tuple[np.ndarray, ImageMeta]:
    """A PNG or JPEG file as float32 (H, W) [0, 1] and its :class:`ImageMeta`."""
    from PIL import Image

    try:
        if fmt == "png" and _png_is_16bit_colour(path):
            raise ImageReadError(f"{path}: 16-bit colour PNG is not supported (it would be read as 8-bit)")
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1))
            if frames > 1:
                raise ImageReadError(f"{path}: animated {fmt.upper()} with {frames} frames is not supported")
            im.load()
            grey, colour = _pil_grey(im, str(path))
            meta = ImageMeta(dtype="", shape=(0, 0), format=fmt, colour=colour, pil_info=_pil_info(im, fmt))
    except Exception as e:  # Pillow raises many types for truncated or foreign files
        _raise_read_error(e, str(path), fmt.upper())
    return _finish(grey, meta, str(path), max_pixels)


def _existing(path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    fmt = image_format(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    return path, fmt


def _open_tiff(path: Path) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises many types for truncated or foreign files
        raise ImageReadError(f"{path}: cannot be read as TIFF ({type(e).__name__}: {e})") from e


def read_image(
    path: str | Path, page: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, ImageMeta]:
    """Read one page of a PNG, TIFF or JPEG SEM image.

    Args:
        path: file to read (``.png``, ``.tif``, ``.tiff``, ``.jpg``, ``.jpeg``).
        page: page of a multipage TIFF (``meta.pages`` says how many there are; see :func:`iter_pages`).
        max_pixels: refuse images with more pixels than this.

    Returns:
        ``(image, meta)``: float32 (H, W) in [0, 1] and the metadata to write it back.

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, true colour or a colour
            palette, of an unsupported dtype, too large, or contains non-finite values. The message
            names the file (and the page of a multipage file).
    """
    path, fmt = _existing(path)
    if fmt != "tiff":
        if page != 0:
            raise ImageReadError(f"{path}: page {page} requested but a {fmt.upper()} file has 1")
        return _decode_pil(path, fmt, max_pixels)
    with _open_tiff(path) as tf:
        return _decode_tiff_page(tf, path, page, max_pixels)


def iter_pages(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[np.ndarray, ImageMeta]]:
    """Every page of a file in order, as :func:`read_image` returns them (one for PNG/JPEG).

    The TIFF is opened once and pages are decoded one at a time, so a long stack never sits in memory
    whole. A page that cannot be read raises :class:`ImageReadError` naming the file and the page.
    """
    path, fmt = _existing(path)
    if fmt != "tiff":
        yield _decode_pil(path, fmt, max_pixels)
        return
    with _open_tiff(path) as tf:
        for index in range(len(tf.pages)):
            yield _decode_tiff_page(tf, path, index, max_pixels)


def page_name(path: str | Path, page: int, pages: int) -> str:
    """How a report names one image of a file: the path, or ``path[page k]`` (k from 0) for a page of a
    multipage file (``meta.page`` / ``meta.pages`` of :func:`iter_pages`)."""
    return str(path) if pages <= 1 else f"{path}[page {page}]"


def count_pages(path: str | Path) -> int:
    """Number of pages of a TIFF (1 for PNG and JPEG)."""
    path, fmt = _existing(path)
    if fmt != "tiff":
        return 1
    with _open_tiff(path) as tf:
        return len(tf.pages)


def pixel_count(path: str | Path) -> int:
    """Pixels of all pages of a file, from its header only (0 when the header cannot be read).

    Used to size a job before any pixel is decoded; a file that cannot be read fails later, when it is.
    """
    try:
        path, fmt = _existing(path)
        if fmt == "tiff":
            with _open_tiff(path) as tf:
                return sum(int(p.imagelength) * int(p.imagewidth) for p in tf.pages)
        from PIL import Image

        with Image.open(path) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:  # sizing is advisory: the real read reports the file's problem
        return 0


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _file_pixels(image: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """float32 (H, W) [0, 1] -> the file's own pixels (dtype, channels or palette indices)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"write_image expects an (H, W) image, got shape {image.shape}")
    if meta.colour is not None and tuple(image.shape) != tuple(meta.shape):
        raise ValueError(f"image of shape {image.shape} does not fit the {meta.shape} layout it came from")
    return to_file_layout(from_float01(image, meta.dtype, meta.float_range), meta.colour)


def _tiff_page_args(data: np.ndarray, meta: ImageMeta) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels and tifffile ``write`` arguments reproducing ``meta``'s page."""
    kwargs: dict[str, Any] = {"photometric": meta.photometric, "metadata": None}
    if meta.subfiletype:
        kwargs["subfiletype"] = meta.subfiletype
    if meta.description:
        kwargs["description"] = meta.description
    if meta.software:
        kwargs["software"] = meta.software
    if meta.resolution:
        x, y, unit = meta.resolution
        kwargs["resolution"] = (x, y)
        kwargs["resolutionunit"] = unit
    if meta.extratags:
        kwargs["extratags"] = meta.extratags
    colour = meta.colour
    if colour is not None and colour.kind == "palette":
        kwargs["colormap"] = colour.colormap
    elif colour is not None:
        kwargs["planarconfig"] = "separate" if colour.planar else "contig"
        if colour.extrasamples:
            kwargs["extrasamples"] = colour.extrasamples
        if colour.planar:
            data = np.ascontiguousarray(np.moveaxis(data, -1, 0))
    return data, kwargs


def _write_tiff(tmp: str, pages: Iterator[tuple[np.ndarray, ImageMeta]]) -> None:
    import tifffile

    first = next(pages, None)
    if first is None:
        raise ValueError("no page to write")
    data = _file_pixels(*first)
    meta = first[1]
    # BigTIFF when the input was one or when this page alone nears classic TIFF's 4 GB offset limit.
    bigtiff = meta.bigtiff or data.nbytes * max(1, meta.pages) > 2**32 - 2**25
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff, byteorder=meta.byteorder) as tw:
        pixels, kwargs = _tiff_page_args(data, meta)
        tw.write(pixels, **kwargs)
        for image, page_meta in pages:
            pixels, kwargs = _tiff_page_args(_file_pixels(image, page_meta), page_meta)
            tw.write(pixels, **kwargs)


def _write_pil(tmp: str, path: Path, fmt: str, image: np.ndarray, meta: ImageMeta) -> None:
    from PIL import Image, PngImagePlugin

    data = _file_pixels(image, meta)
    allowed = (np.uint8, np.uint16) if fmt == "png" else (np.uint8,)
    if data.dtype not in allowed:
        raise ValueError(f"{path}: {fmt.upper()} cannot hold {data.dtype} pixels; use a .tif output")
    im = Image.fromarray(data)  # Pillow picks L / I;16 / LA / RGB / RGBA from dtype and channels
    info = dict(meta.pil_info)
    if meta.colour is not None and meta.colour.kind == "palette":
        im.putpalette(meta.colour.colormap)
    kwargs = {k: info[k] for k in ("dpi", "icc_profile", "exif", "transparency", "comment") if k in info}
    if fmt == "png":
        if info.get("text"):
            png_text = PngImagePlugin.PngInfo()
            for key, value in info["text"].items():
                png_text.add_text(str(key), str(value))
            kwargs["pnginfo"] = png_text
        im.save(tmp, format="PNG", **kwargs)
        return
    kwargs.pop("transparency", None)
    if info.get("qtables"):  # the input's own quantisation: no more compression than it had
        kwargs["qtables"] = info["qtables"]
        if info.get("subsampling", -1) >= 0:
            kwargs["subsampling"] = info["subsampling"]
    else:
        kwargs["quality"] = 95
    im.save(tmp, format="JPEG", **kwargs)


def write_pages(path: str | Path, pages: Iterable[tuple[np.ndarray, ImageMeta]]) -> Path:
    """Write ``(image, meta)`` pages to ``path``, each in its ``meta``'s dtype, layout and tags.

    Every image is float32 (H, W) in [0, 1]. A TIFF gets one page per item, in order; PNG and JPEG
    hold exactly one. ``pages`` may be a generator that denoises page k as it is asked for it, so a
    long stack is never in memory whole; if it raises (a page failed), no file is left at ``path``.
    The file is written to a temporary name in the same folder and renamed into place, so a reader or
    a killed job never sees a half-written output.
    """
    path = Path(path)
    fmt = image_format(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        items = iter(pages)
        if fmt == "tiff":
            _write_tiff(tmp, items)
        else:
            first = next(items, None)
            if first is None:
                raise ValueError(f"{path}: no page to write")
            if next(items, None) is not None:
                raise ValueError(f"{path}: a {fmt.upper()} file holds one page; write several to a .tif")
            _write_pil(tmp, path, fmt, *first)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_image(path: str | Path, image: np.ndarray, meta: ImageMeta | None = None) -> Path:
    """Write float32 (H, W) [0, 1] ``image`` to ``path`` as one page in the format, dtype and layout of
    ``meta`` (see :func:`write_pages`). Without ``meta`` the format comes from the suffix, the layout is
    grey and the dtype uint8 for PNG/JPEG and float32 for TIFF."""
    if meta is None:
        fmt = image_format(path)
        dtype = "float32" if fmt == "tiff" else "uint8"
        meta = ImageMeta(dtype=dtype, shape=tuple(np.shape(image)), format=fmt)  # type: ignore[arg-type]
    return write_pages(path, [(image, meta)])


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_images(root: str | Path) -> list[Path]:
    """All image files (:data:`IMAGE_SUFFIXES`) under ``root`` (recursively, sorted); ``[root]`` for a file."""
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

"""The app's image handling: decode uploads safely, encode results, previews and difference maps.

Plain functions, no Ray and no FastAPI, so they are tested directly. Uploads are checked from their
bytes, never their names: the format is sniffed from the magic bytes (415 otherwise), the size is read
from the header before any pixel is decoded (413 past the limit), and the client's file name only ever
becomes a display name. Problems are :class:`RequestError`, which the app turns into
``{"detail": message}`` with the error's HTTP status.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from semray.io import ImageMeta, ImageReadError, read_image, write_image


class RequestError(Exception):
    """A problem with the client's request; becomes ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def sniff_format(data: bytes) -> str:
    """``"png"`` or ``"tiff"`` from the file's magic bytes; :class:`RequestError` 415 otherwise."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "tiff"
    raise RequestError(415, "not a PNG or TIFF image (file content does not start with a PNG/TIFF signature)")


def probe_shape(data: bytes, fmt: str) -> tuple[int, int]:
    """``(H, W)`` read from the header only, so oversized images are refused before decoding.

    PNG: the IHDR chunk (always first, at byte 16). TIFF: tifffile parses the IFD without reading pixel
    data. Raises :class:`RequestError` 400 for a header that cannot be parsed.
    """
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise RequestError(400, "PNG file is truncated or has no IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return int(height), int(width)
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            shape = tf.pages[0].shape
    except Exception as e:  # tifffile raises many types for foreign or truncated files
        raise RequestError(400, f"TIFF header cannot be read ({type(e).__name__}: {e})") from e
    if len(shape) < 2:
        raise RequestError(422, f"TIFF page has shape {tuple(shape)}; expected a 2-D image")
    # (H, W) or (H, W, C) / (C, H, W): the pixel count limit uses the two largest axes
    h, w = sorted(int(s) for s in shape)[-2:]
    return h, w


def decode_image(data: bytes, filename: str, max_pixels: int) -> tuple[np.ndarray, ImageMeta]:
    """Decode an uploaded PNG/TIFF into float32 (H, W) in [0, 1] and the metadata to write it back.

    Args:
        data: the file's bytes.
        filename: the client's file name, used in messages only (never as a path).
        max_pixels: refuse images with more than this many pixels (checked from the header first).

    Raises:
        RequestError: 400 empty/corrupt, 413 too many pixels, 415 not PNG/TIFF, 422 multi-channel or an
            unsupported dtype.
    """
    label = display_name(filename)
    if not data:
        raise RequestError(400, f"{label}: file is empty")
    fmt = sniff_format(data)
    h, w = probe_shape(data, fmt)
    if h * w > max_pixels:
        raise RequestError(413, f"{label}: image of {h}x{w} px exceeds the limit of {max_pixels} px")
    suffix = ".png" if fmt == "png" else ".tif"
    with tempfile.TemporaryDirectory(prefix="semray-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"  # fixed name: the client's file name never becomes a path
        path.write_bytes(data)
        try:
            image, meta = read_image(path, max_pixels=max_pixels)
        except ImageReadError as e:
            msg = str(e).replace(str(path), label)
            status = 422 if ("channel" in msg or "dtype" in msg or "NaN" in msg) else 400
            raise RequestError(status, msg) from None
    if meta.pages > 1:  # the app shows one image: refuse rather than drop pages without a word
        raise RequestError(
            422, f"{label}: a multipage TIFF ({meta.pages} pages); `semray denoise` does every page"
        )
    return image, meta


def encode_image(image: np.ndarray, meta: ImageMeta) -> bytes:
    """File bytes of float32 (H, W) [0, 1] ``image`` in ``meta``'s format and dtype (TIFF tags kept)."""
    suffix = ".png" if meta.format == "png" else ".tif"
    with tempfile.TemporaryDirectory(prefix="semray-result-") as tmp:
        path = write_image(Path(tmp) / f"result{suffix}", image, meta)
        return path.read_bytes()


def display_name(filename: str | None) -> str:
    """A client file name reduced to a harmless display/download name (base name, safe characters)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    return safe or "image"


def result_filename(filename: str | None, fmt: str) -> str:
    """Download name for the denoised file: ``<stem>_denoised.<png|tif>``."""
    stem = Path(display_name(filename)).stem or "image"
    return f"{stem}_denoised{'.png' if fmt == 'png' else '.tif'}"


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] -> uint8 (H, W), rounded and clipped."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def downsample(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) shrunk with box filtering so neither side exceeds ``max_side``."""
    h, w = pixels.shape[:2]
    if max(h, w) <= max_side:
        return pixels
    from PIL import Image

    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


def png_data_uri(pixels: np.ndarray) -> str:
    """``data:image/png;base64,...`` of a uint8 (H, W) grey or (H, W, 3) RGB array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=3)  # previews: speed over size
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@lru_cache(maxsize=1)
def _magma_lut() -> np.ndarray:
    import matplotlib

    return np.rint(matplotlib.colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def difference_map(noisy: np.ndarray, denoised: np.ndarray) -> tuple[np.ndarray, float]:
    """Colour map of ``|denoised - noisy|`` (what the denoiser removed) and its full-scale value.

    Args:
        noisy, denoised: float32 (H, W) in [0, 1].

    Returns:
        ``(rgb, scale)``: uint8 (H, W, 3) magma-coloured map and the absolute difference (intensity
        units) that maps to the brightest colour: the 99.5th percentile, so a few outliers do not turn
        the rest black; never below one 8-bit grey level.
    """
    diff = np.abs(denoised.astype(np.float32) - noisy.astype(np.float32))
    scale = max(float(np.percentile(diff, 99.5)), 1.0 / 255.0)
    idx = np.rint(np.clip(diff / scale, 0.0, 1.0) * 255.0).astype(np.uint8)
    return _magma_lut()[idx], scale

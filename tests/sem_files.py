"""Builders of SEM image files as real tools write them, shared by the io, ingest and batch tests.

Each ``write_*`` function writes one file with tifffile/Pillow and returns what the file holds, so a
test can compare a round trip against the exact input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

#: FEI's INI-style metadata (tag 34682), as a Quanta writes it.
FEI_INI = (
    "[User]\r\nDate=03/14/2024\r\nUser=fab\r\n[Beam]\r\nHV=5000\r\nSpot=3\r\n[Scan]\r\nDwelltime=1e-07\r\n"
)
#: A private tag standing in for per-page vendor metadata.
PAGE_TAG = 65001
#: Where the real micrographs live (see ../shared/data/real-sem/README.md).
REAL_SEM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-sem"


def texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A noisy micrograph-like float image in [0.1, 0.9]: smooth structure plus shot-like noise."""
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    smooth = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)
    return np.clip(0.2 + 0.6 * smooth + rng.normal(0, 0.04, shape), 0.1, 0.9).astype(np.float32)


def draw_bar(
    image: np.ndarray, rows: int, level: float = 0.0, ink: float = 1.0, border: bool = True
) -> np.ndarray:
    """Burn a SEM-style data bar (uniform band, text, scale bar, optional top border) into the bottom."""
    h, w = image.shape
    band = Image.new("L", (w, rows), round(level * 255))
    d = ImageDraw.Draw(band)
    d.text((3, max(0, rows // 2 - 6)), "5kV x50k", fill=round(ink * 255), font=ImageFont.load_default())
    d.rectangle([w - 30, rows - 5, w - 6, rows - 3], fill=round(ink * 255))  # scale bar
    if border:
        d.line([0, 0, w, 0], fill=round(ink * 255))
    out = image.copy()
    out[h - rows :] = np.asarray(band, dtype=np.float32) / 255.0
    return out


def u8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8."""
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def write_fei_rgb(path: Path, bar_rows: int = 29, shape: tuple[int, int] = (471, 512)) -> np.ndarray:
    """An FEI Quanta-style grey image saved as RGB: equal channels, a 1-px green border, a data bar of
    ``bar_rows`` rows, FEI tag 34682, a description and a resolution. Returns the (H, W, 3) uint8 pixels."""
    grey = u8(draw_bar(texture(np.random.default_rng(11), shape), bar_rows))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        rgb[edge] = (0, 200, 0)
    tifffile.imwrite(
        path,
        rgb,
        photometric="rgb",
        description="FEI Quanta 250",
        resolution=(2000.0, 2000.0),
        extratags=[(34682, "s", 0, FEI_INI, True)],
    )
    return rgb


def write_multipage(path: Path, pages: int = 2, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A Zeiss-style uint8 multipage TIFF; page k has description ``page k`` and tag PAGE_TAG = ``zeiss k``.
    Returns the (pages, H, W) pixels."""
    rng = np.random.default_rng(5)
    data = np.stack([u8(texture(rng, shape)) for _ in range(pages)])
    with tifffile.TiffWriter(path) as tw:
        for k in range(pages):
            tags = [(PAGE_TAG, "s", 0, f"zeiss {k}", True)]
            tw.write(
                data[k], photometric="minisblack", description=f"page {k}", extratags=tags, metadata=None
            )
    return data


def write_palette(path: Path, grey: bool = True, shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    """An 8-bit indexed-colour TIFF, with a grey ramp palette or a colour one; returns the indices."""
    index = u8(texture(np.random.default_rng(3), shape))
    ramp = np.arange(256, dtype=np.uint16) * 257
    colormap = np.stack([ramp, ramp, ramp]) if grey else np.stack([ramp, ramp[::-1], ramp // 2])
    tifffile.imwrite(path, index, photometric="palette", colormap=colormap)
    return index


def write_true_colour(path: Path, shape: tuple[int, int] = (64, 80)) -> None:
    """An RGB TIFF whose channels differ everywhere (a colour picture, not grey)."""
    rng = np.random.default_rng(4)
    tifffile.imwrite(path, rng.integers(0, 256, (*shape, 3), dtype=np.uint8), photometric="rgb")


def write_bar_image(path: Path, bar_rows: int = 24, shape: tuple[int, int] = (128, 96)) -> np.ndarray:
    """A uint16 grey TIFF with a burned-in data bar of ``bar_rows`` rows; returns its pixels."""
    img = draw_bar(texture(np.random.default_rng(8), shape), bar_rows)
    data = np.rint(img * 65535).astype(np.uint16)
    tifffile.imwrite(path, data)
    return data

"""Grey SEM images stored as colour or as a palette: find the grey, and put it back the same way.

Many acquisition tools save 8-bit grey images as RGB (three equal channels), sometimes with a coloured
1-px border, a coloured annotation or an alpha channel, and some as indexed colour with a grey palette.
:func:`split_grey` and :func:`palette_grey` take the file's pixels to one grey (H, W) array plus a
:class:`ColourLayout`; :func:`to_file_layout` puts a (denoised) grey array back into the very same
layout, copying the coloured pixels and the extra channels through from the input. A true colour
image or a colour palette raises :class:`NotGreyError`. Pure array functions: :mod:`semray.io` does the
file work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: A colour file is grey saved as colour when at most this fraction of the pixels inside its border
#: frame have unequal colour channels (a scale bar or a measurement overlay is a few %); a colour
#: photograph or a false-colour map differs almost everywhere.
GREY_COLOUR_MAX_FRACTION = 0.05
#: Width (px) of the outer frame whose pixels may all be coloured: tools draw coloured borders there.
GREY_COLOUR_BORDER_PX = 4


class NotGreyError(ValueError):
    """The pixels are true colour (or a colour palette), not grey stored as colour; names the source."""


@dataclass
class ColourLayout:
    """How a grey image sits in a file with several channels or a palette, to write it back the same.

    Attributes:
        kind: ``"rgb"`` (3 colour channels, any extra channels after them), ``"grey+alpha"`` (1 grey
            channel then extras) or ``"palette"`` (indices into ``palette``).
        channels: samples per pixel in the file (1 for a palette).
        overlay_index: int64 (K,) flat indices of the pixels whose colour channels differ.
        overlay_values: (K, channels) those pixels exactly as the file holds them (file dtype).
        extra: (H, W, E) channels after the colour ones (alpha), file dtype; ``None`` when E = 0.
        palette: for ``"palette"``, the (N,) grey level of each entry in the grey dtype of the image.
        planar: TIFF planar configuration ``separate`` (the file stores (C, H, W)).
        extrasamples: TIFF ExtraSamples values of the extra channels.
        colormap: TIFF ColorMap (3, N) uint16 or PNG palette (list of 3N ints), written back verbatim.
    """

    kind: str
    channels: int
    overlay_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    overlay_values: np.ndarray | None = None
    extra: np.ndarray | None = None
    palette: np.ndarray | None = None
    planar: bool = False
    extrasamples: tuple[int, ...] = ()
    colormap: Any = None


# --------------------------------------------------------------------------------------------------


def split_grey(
    data: np.ndarray,
    colour_channels: int,
    kind: str,
    source: str,
    max_fraction: float = GREY_COLOUR_MAX_FRACTION,
) -> tuple[np.ndarray, ColourLayout]:
    """Grey image held in a file with several channels, and the layout to write it back.

    Args:
        data: (H, W, C) file pixels, any dtype; the first ``colour_channels`` carry the grey (3 for
            RGB/RGBA, 1 for grey + alpha), the rest (alpha) are copied through.
        colour_channels: 1 or 3.
        kind: ``"rgb"`` or ``"grey+alpha"`` (recorded in the layout).
        source: file name for the error message.
        max_fraction: most pixels (fraction) inside a :data:`GREY_COLOUR_BORDER_PX` frame whose colour
            channels may differ; the frame itself may be coloured throughout.

    Returns:
        ``(grey, layout)``: (H, W) in ``data``'s dtype (the channel value; where the channels differ,
        the value of the nearest pixel where they do not, those pixels being restored from ``layout``
        on writing) and the :class:`ColourLayout`.

    Raises:
        NotGreyError: more than ``max_fraction`` of the inner pixels are coloured: a true colour image.
    """
    c = data.shape[-1]
    colour = data[..., :colour_channels]
    differs = np.any(colour != colour[..., :1], axis=-1)
    b = min(GREY_COLOUR_BORDER_PX, (min(differs.shape) - 1) // 4)
    inner = differs[b : differs.shape[0] - b, b : differs.shape[1] - b]
    fraction = float(inner.mean()) if inner.size else 0.0
    if fraction > max_fraction:
        raise NotGreyError(
            f"{source}: a true colour image ({fraction:.1%} of its pixels have unequal colour channels; "
            f"grey saved as colour may differ in a {GREY_COLOUR_BORDER_PX}-px border and in at most "
            f"{max_fraction:.0%} of the pixels inside it, for an overlay); semray denoises grey SEM "
            "images, so convert it to greyscale first"
        )
    grey = colour[..., 0].copy()
    index = np.flatnonzero(differs)
    if index.size and index.size < differs.size:
        # Coloured pixels go back verbatim on writing. Meanwhile they take the grey of the nearest
        # grey pixel: a coloured frame or annotation is not image content, and as a false edge it would
        # sway the denoiser near it and hide a data bar's bottom rows from the bar detector.
        from scipy import ndimage

        nearest = ndimage.distance_transform_edt(differs, return_distances=False, return_indices=True)
        grey[differs] = grey[nearest[0][differs], nearest[1][differs]]
    layout = ColourLayout(
        kind=kind,
        channels=c,
        overlay_index=index.astype(np.int64),
        overlay_values=data.reshape(-1, c)[index].copy(),
        extra=data[..., colour_channels:].copy() if c > colour_channels else None,
    )
    return grey, layout


def palette_grey(indices: np.ndarray, levels: np.ndarray, source: str) -> tuple[np.ndarray, ColourLayout]:
    """Grey image of an indexed-colour file whose palette is grey.

    Args:
        indices: (H, W) unsigned palette indices.
        levels: (3, N) palette (R, G, B rows), uint8 (PNG) or uint16 (TIFF ColorMap).
        source: file name for error messages.

    Returns:
        ``(grey, layout)``: (H, W) grey levels in ``levels``' dtype and a ``"palette"`` layout whose
        ``palette`` holds each entry's level (colour entries, unused by the image, are marked -1 and
        never written).

    Raises:
        NotGreyError: an index past the palette, or a used entry that is not grey (R = G = B).
    """
    levels = np.asarray(levels)
    used = np.unique(indices)
    if used.size and int(used[-1]) >= levels.shape[1]:
        raise NotGreyError(f"{source}: palette index {int(used[-1])} past its {levels.shape[1]} entries")
    is_grey = (levels[0] == levels[1]) & (levels[1] == levels[2])
    if not np.all(is_grey[used]):
        raise NotGreyError(
            f"{source}: a colour palette (indexed colour) image: {int(np.sum(~is_grey[used]))} of the "
            f"{used.size} palette entries it uses are not grey; semray denoises grey SEM images, so "
            "convert it to greyscale first"
        )
    grey = levels[0][indices]
    palette = np.where(is_grey, levels[0].astype(np.int64), -1)
    return grey, ColourLayout(kind="palette", channels=1, palette=palette)


def nearest_palette_index(grey: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the grey palette entry nearest to each pixel (ties to the darker entry).

    Args:
        grey: (H, W) grey levels in the palette's scale.
        palette: (N,) level of each entry, -1 for entries that are not grey (never chosen).

    Returns:
        (H, W) uint8 indices (uint16 when the palette has more than 256 entries).
    """
    candidates = np.flatnonzero(palette >= 0)
    order = np.argsort(palette[candidates], kind="stable")
    ranked = palette[candidates][order]
    values = np.asarray(grey, dtype=np.int64)
    if ranked.size == 1:
        choice = np.zeros(values.shape, np.int64)
    else:
        pos = np.clip(np.searchsorted(ranked, values), 1, ranked.size - 1)
        choice = np.where(values - ranked[pos - 1] <= ranked[pos] - values, pos - 1, pos)
    return candidates[order[choice]].astype(np.uint8 if palette.size <= 256 else np.uint16)


def to_file_layout(grey: np.ndarray, colour: ColourLayout | None) -> np.ndarray:
    """Inverse of :func:`split_grey` / :func:`palette_grey`: (H, W) grey in the file dtype -> file pixels.

    Returns (H, W) for grey and palette files, (H, W, C) otherwise, with the overlay pixels and the
    extra channels exactly as the input held them.
    """
    if colour is None:
        return grey
    if colour.kind == "palette":
        assert colour.palette is not None
        return nearest_palette_index(grey, colour.palette)
    h, w = grey.shape
    out = np.empty((h, w, colour.channels), grey.dtype)
    n_colour = colour.channels - (0 if colour.extra is None else colour.extra.shape[-1])
    if colour.extra is not None and colour.extra.shape[:2] != (h, w):
        raise ValueError(f"image of {h}x{w} px does not fit the {colour.extra.shape[:2]} layout it came from")
    out[..., :n_colour] = grey[..., None]
    if colour.extra is not None:
        out[..., n_colour:] = colour.extra
    if colour.overlay_index.size:
        out.reshape(-1, colour.channels)[colour.overlay_index] = colour.overlay_values
    return out

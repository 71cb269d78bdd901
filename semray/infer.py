"""Tiled inference: denoise an image of any size with bounded memory, and one denoiser interface.

:func:`tiled_denoise` gives what one whole-image pass ``net(image)`` gives, tile by tile. The image is
padded once, exactly as the U-Net pads a whole pass (reflect, split evenly, to a multiple of its
``2**depth``: :func:`semray.models.unet.align_padding`), and cut into overlapping tiles on a grid of
that multiple that covers the padded image exactly, so every tile sees the same padding and the same
down-sampling grid as the whole pass. The tiles run through the network a batch at a time and are
blended back with a separable raised-cosine window::

    weight of a tile at offset k inside an overlap of o pixels (margin m):
        u = (k + 0.5 - m) / (o - 2m),   w = sin^2(pi/2 * clip(u, 0, 1))

The neighbouring tile sees ``sin^2(pi/2 * (1 - u)) = cos^2(pi/2 * u)`` at the same pixel, so the weights
of the two tiles sum to exactly 1 everywhere. The outer ``m`` pixels of every inner tile edge get weight
0 because a convolutional network's output there depends on the tile's zero padding. With the margin
equal to the network's receptive-field radius r (:func:`semray.models.unet.receptive_radius`, 51 px for
the shipped model) and overlaps > 2r (the default overlap is 2r + 1 rounded up to the grid), every kept
pixel is computed from image content only and the tiled result equals the whole pass up to float
rounding (1.2e-7 measured, shipped model, 500 x 700). Tiles on the image border keep weight 1 there.

Memory: the input image, one float32 output of the same size, one batch of tiles on the device and
two 1-D weight sums (the window is separable and the grid a product, so the 2-D weight sum is an
outer product and never stored). The padding is gathered per tile through 1-D index maps, never as a
padded copy of the image.

:class:`Denoiser` puts the U-Net and the classical methods of :mod:`semray.classical` behind one
``image -> image`` call, which is what the batch job, the CLI and the app use.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import nullcontext
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from semray import __version__
from semray.config.infer import DEFAULT_TILE, InferConfig
from semray.models.unet import align_padding


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    """Tiles per forward pass when none is given: 1 on CPU, 4 elsewhere.

    On this project's x86 CPU one tile at a time is 10-20 % faster than four (same output): the
    activations of one 256 px tile stay in cache. GPUs want the larger batch.
    """
    return 1 if device.type == "cpu" else 4


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An inference copy of ``net`` with every ``Conv2d -> BatchNorm2d`` pair folded into one conv.

    In eval mode a BatchNorm is an affine map per channel, so it can be merged into the preceding
    convolution's weights and bias (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); the BatchNorm is
    replaced by :class:`torch.nn.Identity`. Output is the same up to float rounding (4.8e-7 measured on
    the shipped model), one pass over each activation map less. Pairs are looked for among the children
    of every :class:`torch.nn.Sequential` (the U-Net's conv blocks). ``net`` itself is not changed; the
    copy is in eval mode and must not be trained.
    """
    folded = copy.deepcopy(net).eval()
    for mod in folded.modules():
        if not isinstance(mod, nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in pairwise(names):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                mod._modules[b] = nn.Identity()
    return folded


#: Overlap used for a network whose receptive field is unknown (no ``receptive_radius`` attribute).
FALLBACK_OVERLAP = 32


def default_overlap(radius: int | None, align: int = 1) -> int:
    """The overlap the engine uses when none is given (pixels).

    ``2 * radius + 1`` rounded up to a multiple of ``align``: the least overlap in which every pixel lies
    at least ``radius`` pixels from the inner edge of a tile that keeps it, so it is computed from image
    content only (see :func:`blend_ramp`); the shipped model (radius 51, align 8) gets 104.
    :data:`FALLBACK_OVERLAP` for a network of unknown receptive field.
    """
    if radius is None:
        return FALLBACK_OVERLAP
    align = max(int(align), 1)
    return -(-(2 * int(radius) + 1) // align) * align


def blend_ramp(overlap: int, radius: int | None = None) -> np.ndarray:
    """Rising half of the blending window over an overlap of ``overlap`` pixels.

    The first ``margin`` pixels get weight 0 and the window rises as ``sin^2`` over the middle
    ``overlap - 2 margin`` pixels. With a known receptive-field ``radius`` and ``overlap > 2 radius``,
    ``margin = radius``: no tile contributes a pixel whose receptive field reaches its zero-padded inner
    edge, so the blend of tiles equals a whole-image pass (to float rounding). Otherwise (an overlap too
    small for the receptive field, or ``radius`` unknown) ``margin = overlap // 4``: a best effort that
    keeps seams smooth but not exact.

    Returns:
        float64 (overlap,) in [0, 1]; ``ramp + ramp[::-1] == 1`` elementwise (partition of unity).
    """
    if overlap <= 0:
        return np.zeros(0)
    margin = radius if radius is not None and overlap > 2 * radius else overlap // 4
    u = (np.arange(overlap) + 0.5 - margin) / max(overlap - 2 * margin, 1)
    return np.sin(0.5 * np.pi * np.clip(u, 0.0, 1.0)) ** 2


TILE_PLAN = "aligned-2"
"""Version of the tile layout of :func:`axis_plan` and :func:`axis_windows`, recorded in
:attr:`Denoiser.settings`. ``aligned-2``: tiles exactly cover the image padded once like a whole pass,
kept pixels lie a receptive-field radius from inner tile edges (was ``balanced-1``)."""


def _spread_overlaps(padded: int, tile_len: int, n: int, ov: int, align: int) -> np.ndarray | None:
    """Overlaps (n - 1,) of ``n`` tiles of ``tile_len`` that cover ``padded`` exactly, the surplus coverage
    spread in ``align`` steps over them; ``None`` where an inner tile's two overlaps would meet (then a
    pixel would lie in three tiles)."""
    steps = (n * tile_len - (n - 1) * ov - padded) // align
    extra = np.full(n - 1, steps // (n - 1), dtype=np.int64)
    extra[: steps % (n - 1)] += 1
    overlaps = ov + extra * align
    return overlaps if n == 2 or int((overlaps[:-1] + overlaps[1:]).max()) <= tile_len else None


def axis_plan(length: int, tile: int, overlap: int, align: int = 1) -> tuple[int, np.ndarray]:
    """Tile size and start offsets along one axis of the image padded to a multiple of ``align``.

    Args:
        length: image size along the axis (pixels, >= 1).
        tile: requested tile size (pixels).
        overlap: least overlap between neighbouring tiles (pixels).
        align: the network's spatial multiple; the axis is padded to ``padded = ceil(length / align) *
            align`` (as :func:`semray.models.unet.align_padding` pads a whole pass), and tile size and
            starts are multiples of it, so tiles sit on the same down-sampling grid as the whole image.

    Returns:
        ``(tile_len, starts)``: the tile size used and the int64 start offsets in padded coordinates;
        ``starts[0] == 0`` and ``starts[-1] + tile_len == padded``: the tiles cover the padded axis
        exactly, never reaching past it, so every tile sees the padding a whole pass sees. The overlap is
        rounded up to a multiple of ``align`` and the tile grown if needed to stay >= 2 x overlap. An
        axis no longer than a tile is one tile of ``padded``.

    Balanced plan: the number of tiles is the fewest ``tile``-sized tiles that cover the axis, and the
    tiles are then shrunk to the smallest aligned size that still covers it with that many tiles; what
    that covers beyond ``padded`` is spread over the overlaps (each grows by at most a few ``align``
    steps). ``tile`` is thus an upper bound (memory), except that tiles of less than about 3 x overlap
    may grow by a few ``align`` steps where 3+ tiles cannot share the surplus. Example: 512 px with tile 256 / overlap 32 needs 3
    tiles; they become 3 x 192 px (576 px of work) instead of 3 x 256 px (768 px).
    """
    align = max(int(align), 1)
    padded = -(-length // align) * align
    ov = -(-overlap // align) * align
    # at least one aligned step, and an overlap of at most half a tile so the two tapers never meet
    min_len = max(ov + align, 2 * ov)
    tile_max = max(tile // align * align, min_len)
    if padded <= tile_max:
        return padded, np.zeros(1, dtype=np.int64)
    n = -(-(padded - tile_max) // (tile_max - ov)) + 1
    # n tiles of t px with overlap o cover n t - (n - 1) o px; the smallest aligned t that covers padded
    # is <= tile_max because n tiles of tile_max do
    tile_len = max(-(-(padded + (n - 1) * ov) // (n * align)) * align, min_len)
    while (overlaps := _spread_overlaps(padded, tile_len, n, ov, align)) is None:
        # only when the tiles are held at 2 x overlap and 3+ of them: grow them until the surplus fits
        tile_len += align
        n = -(-(padded - tile_len) // (tile_len - ov)) + 1
        if n == 1:
            return padded, np.zeros(1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(tile_len - overlaps)]).astype(np.int64)
    return tile_len, starts


def axis_windows(tile_len: int, starts: np.ndarray, radius: int | None = None) -> list[np.ndarray]:
    """Blending window of each tile along one axis (float32 (tile_len,) each).

    The overlap of tiles ``i`` and ``i + 1`` is ``starts[i] + tile_len - starts[i + 1]``; inner edges
    taper with :func:`blend_ramp` (``radius``: the network's receptive-field radius, if known), edges on
    the image border keep weight 1. Each pixel lies in at most two tiles (an inner tile's two overlaps
    do not meet), so the windows sum to 1.
    """
    n = len(starts)
    overlaps = [int(starts[i] + tile_len - starts[i + 1]) for i in range(n - 1)]
    out = []
    for i in range(n):
        w = np.ones(tile_len)
        if i > 0 and overlaps[i - 1]:
            w[: overlaps[i - 1]] = blend_ramp(overlaps[i - 1], radius)
        if i < n - 1 and overlaps[i]:
            w[-overlaps[i] :] = blend_ramp(overlaps[i], radius)[::-1]
        out.append(w.astype(np.float32))
    return out


def padded_index(length: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source index of each pixel of an axis padded by ``before`` / ``after`` pixels (int64 (before +
    length + after,)): ``"reflect"`` mirrors without repeating the edge (needs pads < length, as
    :func:`torch.nn.functional.pad` does), ``"replicate"`` repeats the edge pixel."""
    idx = np.arange(-before, length + after, dtype=np.int64)
    if mode == "reflect":
        idx = np.abs(idx)
        return np.where(idx >= length, 2 * (length - 1) - idx, idx)
    return np.clip(idx, 0, length - 1)


def _autocast(device: torch.device, amp: bool) -> Any:
    if not amp:
        return nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _span(start: int, length: int, offset: int, size: int) -> tuple[slice, slice]:
    """Where a tile ``[start, start + length)`` of the padded axis meets the image ``[offset, offset +
    size)``: ``(image slice, tile slice)``."""
    lo, hi = max(start, offset), min(start + length, offset + size)
    return slice(lo - offset, hi - offset), slice(lo - start, hi - start)


def _tiled_into(
    net: nn.Module,
    image: np.ndarray,
    out: np.ndarray,
    tile: int,
    overlap: int,
    batch_size: int,
    device: torch.device,
    amp: bool,
    channels_last: bool,
) -> None:
    """Denoise ``image`` (H, W) into the preallocated float32 ``out`` (H, W); see :func:`tiled_denoise`."""
    h, w = image.shape
    align = int(getattr(net, "multiple", 1))
    radius = getattr(net, "receptive_radius", None)
    top, bottom, left, right, mode = align_padding(h, w, align)
    ry, rx = padded_index(h, top, bottom, mode), padded_index(w, left, right, mode)
    th, ys = axis_plan(h, tile, overlap, align)
    tw, xs = axis_plan(w, tile, overlap, align)
    spans_y = [_span(int(y0), th, top, h) for y0 in ys]
    spans_x = [_span(int(x0), tw, left, w) for x0 in xs]
    wys = [win[t] for win, (_, t) in zip(axis_windows(th, ys, radius), spans_y, strict=True)]
    wxs = [win[t] for win, (_, t) in zip(axis_windows(tw, xs, radius), spans_x, strict=True)]
    coords = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    batch = np.empty((min(batch_size, len(coords)), 1, th, tw), dtype=np.float32)
    acc_y = np.zeros(h, dtype=np.float32)
    acc_x = np.zeros(w, dtype=np.float32)
    for (img_rows, _), wy in zip(spans_y, wys, strict=True):
        acc_y[img_rows] += wy
    for (img_cols, _), wx in zip(spans_x, wxs, strict=True):
        acc_x[img_cols] += wx
    out[...] = 0.0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for b0 in range(0, len(coords), batch.shape[0]):
        chunk = coords[b0 : b0 + batch.shape[0]]
        for j, (iy, ix) in enumerate(chunk):
            y0, x0 = int(ys[iy]) - top, int(xs[ix]) - left  # tile origin in image coordinates
            if 0 <= y0 and y0 + th <= h and 0 <= x0 and x0 + tw <= w:
                batch[j, 0] = image[y0 : y0 + th, x0 : x0 + tw]
            else:  # reaches into the padding: gather it per tile instead of keeping a padded copy
                batch[j, 0] = image[np.ix_(ry[ys[iy] : ys[iy] + th], rx[xs[ix] : xs[ix] + tw])]
        x = torch.from_numpy(batch[: len(chunk)]).to(device).contiguous(memory_format=memory_format)
        with _autocast(device, amp):
            y = net(x)
        pred = y.float().cpu().numpy()
        for j, (iy, ix) in enumerate(chunk):
            (img_rows, t_rows), (img_cols, t_cols) = spans_y[iy], spans_x[ix]
            out[img_rows, img_cols] += pred[j, 0, t_rows, t_cols] * wys[iy][:, None] * wxs[ix][None, :]
    # The window is a partition of unity, so this is a no-op up to rounding; it keeps the result right
    # if a future grid ever overlaps unevenly. Separable, so no 2-D weight image is needed.
    out /= acc_y[:, None]
    out /= acc_x[None, :]
    np.clip(out, 0.0, 1.0, out=out)


def tiled_denoise(
    net: nn.Module,
    image: np.ndarray,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool = True,
    keep_bottom_rows: int = 0,
) -> np.ndarray:
    """Denoise one image of any size with a fully convolutional network, tile by tile.

    Args:
        net: maps (N, 1, h, w) float32 [0, 1] to the same shape; moved to ``device`` and run in eval
            mode (its train/eval flag is restored afterwards). If it has a ``multiple`` attribute (the
            U-Net's ``2**depth``) the image is padded to it once, as the U-Net pads a whole pass, and
            tiles and strides are aligned to it; a ``receptive_radius`` attribute (pixels) sets the
            default overlap and keeps tiles' zero-padded inner edges out of the result.
        image: float32 (H, W) in [0, 1], any H, W >= 1 (smaller than a tile: one padded tile).
        tile: largest tile side in pixels (grown to 2 x overlap where the overlap needs it).
        overlap: least overlap of neighbouring tiles in pixels, ``0 <= overlap < tile / 2``; ``None``:
            :func:`default_overlap` of the network's receptive field, with which the result equals a
            whole-image pass ``net(image)`` up to float rounding.
        batch_size: tiles per forward pass; ``None``: :func:`default_batch_size` for the device.
        device: torch device for the network.
        amp: autocast to bfloat16/float16 (GPU) or bfloat16 (CPU).
        channels_last: NHWC memory layout for the tiles and the network (faster on GPUs and x86 CPUs).
        keep_bottom_rows: this many bottom rows (a burned-in data bar) are copied unchanged and not fed
            to the network, so the bar's text cannot bleed into the image above it.

    Returns:
        float32 (H, W) in [0, 1].

    Raises:
        ValueError: not a 2-D non-empty image, bad tile/overlap, or ``keep_bottom_rows`` >= H.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"tiled_denoise expects a non-empty (H, W) image, got shape {image.shape}")
    if tile < 1 or (overlap is not None and not 0 <= overlap < tile / 2):
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile/2, got tile={tile}, overlap={overlap}")
    if overlap is None:
        overlap = default_overlap(getattr(net, "receptive_radius", None), int(getattr(net, "multiple", 1)))
    h = image.shape[0]
    if not 0 <= keep_bottom_rows < h:
        raise ValueError(
            f"keep_bottom_rows={keep_bottom_rows} leaves nothing to denoise in an image of {h} rows"
        )
    dev = torch.device(device)
    out = np.empty_like(image)
    top = h - keep_bottom_rows
    was_training = net.training
    net.to(dev)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    net.eval()
    try:
        with torch.inference_mode():
            bs = batch_size or default_batch_size(dev)
            _tiled_into(net, image[:top], out[:top], tile, overlap, bs, dev, amp, channels_last)
    finally:
        net.train(was_training)
    out[top:] = image[top:]
    return out


def weights_fingerprint(net: nn.Module) -> str:
    """Short sha256 of a network's parameters and buffers: a version for models without a card."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


class Denoiser:
    """One ``image -> image`` interface over the U-Net (tiled) and the classical methods.

    Args:
        method: ``"unet"`` or one of :data:`semray.classical.METHODS`.
        model: for ``"unet"``: a spec for :func:`semray.models.resolve.resolve_model` (``None`` = shipped
            default), an already resolved model (anything with ``model``, ``name``, ``version``
            attributes, e.g. ``ResolvedModel``), or a bare ``nn.Module`` (named ``"custom"``, versioned
            by a hash of its weights). Ignored for classical methods.
        models_dir: extra folder of named models for the spec lookup.
        tile, overlap, batch_size, amp, channels_last, keep_bottom_rows: see :func:`tiled_denoise`
            (``overlap=None``: :func:`default_overlap` of the model's receptive field, after which
            ``self.overlap`` holds the number; ``keep_bottom_rows`` also applies to classical methods).
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"``, ...
        threads: if given, ``torch.set_num_threads(threads)`` (process-wide: one denoiser per process
            or actor is the intended use).
        classical_params: keyword overrides passed to :func:`semray.classical.denoise_classical`.

    Attributes:
        method, name, version, source: what produces the output (recorded in manifests).
        settings: every setting that changes the output, for resume checks.
        net: for ``"unet"``, the inference copy of the model (BatchNorm folded by
            :func:`fold_batchnorm`, eval mode, on ``device``); the model passed in is left unchanged.
    """

    def __init__(
        self,
        method: str = "unet",
        model: Any = None,
        *,
        models_dir: str | None = None,
        tile: int = DEFAULT_TILE,
        overlap: int | None = None,
        batch_size: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        keep_bottom_rows: int = 0,
        amp: bool = False,
        channels_last: bool = True,
        classical_params: dict[str, Any] | None = None,
    ) -> None:
        from semray.classical import METHODS

        if method != "unet" and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: unet, {', '.join(METHODS)}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.method = method
        self.tile, self.overlap = tile, overlap  # overlap None: the network's default, set below
        # an explicit overlap must be < tile/2; the default one may grow small tiles instead (axis_plan)
        self._overlap_arg = overlap
        self.amp, self.channels_last = amp, channels_last
        self.keep_bottom_rows = keep_bottom_rows
        self.classical_params = dict(classical_params or {})
        self.device = resolve_device(device)
        self.batch_size = batch_size or default_batch_size(self.device)
        self.net: nn.Module | None = None
        if method == "unet":
            net, self.name, self.version, self.source = self._load(model, models_dir)
            self.net = fold_batchnorm(net).to(self.device)
            if overlap is None:
                radius = getattr(net, "receptive_radius", None)
                self.overlap = default_overlap(radius, int(getattr(net, "multiple", 1)))
            if channels_last:
                self.net.to(memory_format=torch.channels_last)
        else:
            self.name, self.version, self.source = method, f"semray-{__version__}", "classical"

    @staticmethod
    def _load(model: Any, models_dir: str | None) -> tuple[nn.Module, str, str, str]:
        if isinstance(model, nn.Module):
            return model, "custom", weights_fingerprint(model), "object"
        if model is not None and hasattr(model, "model") and hasattr(model, "version"):
            return model.model, str(model.name), str(model.version), str(getattr(model, "source", "object"))
        from semray.models.resolve import resolve_model

        r = resolve_model(model, models_dir=models_dir)
        return r.model, r.name, r.version, r.source

    @classmethod
    def from_config(cls, cfg: InferConfig, model: Any = None, *, actor: bool = False) -> Denoiser:
        """Build from an :class:`InferConfig`: the one way the batch job, the app and the evaluation make
        a denoiser. ``model`` (spec or object) overrides ``cfg.model``.

        With ``actor=True`` torch threads are ``cfg.torch_threads()`` (the actor's CPU share);
        otherwise only an explicit ``cfg.threads`` changes them. ``keep_bottom_rows="auto"`` is a
        per-page decision of the batch job (:func:`semray.batchfile.bar_rows`), so a denoiser built
        from such a config keeps no rows itself.
        """
        bar = cfg.keep_bottom_rows
        return cls(
            cfg.method,
            model if model is not None else cfg.model,
            models_dir=cfg.models_dir,
            tile=cfg.tiling.tile,
            overlap=cfg.tiling.overlap,
            batch_size=cfg.tiling.batch_size,
            device=cfg.device,
            threads=cfg.torch_threads() if actor else cfg.threads,
            keep_bottom_rows=0 if bar == "auto" else bar,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            classical_params=cfg.classical_params,
        )

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that determines the output image (JSON-able)."""
        s: dict[str, Any] = {
            "method": self.method,
            "name": self.name,
            "version": self.version,
            "keep_bottom_rows": self.keep_bottom_rows,
        }
        if self.method == "unet":
            # tile_plan: how tiles are laid out (see axis_plan); a new plan changes the output slightly, so
            # outputs written under another plan are redone on resume rather than mixed with new ones
            s.update(tile=self.tile, overlap=self.overlap, amp=self.amp, tile_plan=TILE_PLAN)
        else:
            s["classical_params"] = dict(sorted(self.classical_params.items()))
        return s

    def __call__(self, image: np.ndarray, keep_bottom_rows: int | None = None) -> np.ndarray:
        """Denoise float32 (H, W) [0, 1] -> float32 (H, W) [0, 1].

        ``keep_bottom_rows`` overrides the denoiser's own for this call (the batch job decides each
        page's data bar): those rows are copied through and never reach the network or filter.
        """
        bar = self.keep_bottom_rows if keep_bottom_rows is None else int(keep_bottom_rows)
        if self.net is not None:
            return tiled_denoise(
                self.net,
                image,
                tile=self.tile,
                overlap=self._overlap_arg,
                batch_size=self.batch_size,
                device=self.device,
                amp=self.amp,
                channels_last=self.channels_last,
                keep_bottom_rows=bar,
            )
        from semray.classical import denoise_classical

        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2 or image.size == 0:
            raise ValueError(f"expected a non-empty (H, W) image, got shape {image.shape}")
        top = image.shape[0] - bar
        if top <= 0:
            raise ValueError(
                f"keep_bottom_rows={bar} leaves nothing to denoise in an image of {image.shape[0]} rows"
            )
        out = image.copy()
        out[:top] = denoise_classical(image[:top], self.method, **self.classical_params)
        return out

    def __repr__(self) -> str:
        return f"Denoiser(method={self.method!r}, name={self.name!r}, version={self.version!r})"

"""Training without clean references: blind-spot masking (Noise2Void / structN2V) and Noise2Noise pairs.

Pure numpy/torch maths, testable without Ray; the training loop (:mod:`semray.train.loop`) and the
data pipeline (:mod:`semray.train.pipeline`) call it when ``loss.objective`` is not ``supervised``.

Blind spot (Krull et al. 2019, Noise2Void). A fraction of the pixels of every noisy crop is chosen as
*blind pixels*; each is replaced by the value of a random pixel of its neighbourhood, the network sees
the altered crop, and the loss compares its output with the *original* noisy value at the blind pixels
only. Because the network never sees a blind pixel's own value, it cannot learn the identity; if the
noise is zero-mean and independent between pixels, the best it can do is predict the clean value.

Structured blind spot (Broaddus et al. 2020, structN2V). SEM scan noise is *not* independent between
pixels along the fast-scan axis x (charging tails, line jitter, scan-line ripple): a pixel's row
neighbours carry part of its noise, so a plain blind spot lets the network predict that noise from them
and it keeps it as "signal". The structured mask blinds a short segment ``|d| <= half_length`` along
``axis`` through every blind pixel: all pixels of the segment get values drawn from *outside* it, so the
input holds nothing of the correlated neighbours. The loss is still taken at the centre pixels only.

Replacement values come from the ``(2 radius + 1)^2`` window around the blind pixel, minus the blinded
segment (for the plain mask the segment is the pixel itself), all read from the *unaltered* crop. At the
border an offset that leaves the image is mirrored per axis through the blind pixel (``d -> -d``), which
keeps it in the allowed set, so nothing of the segment can leak in through clamping.

Noise2Noise (Lehtinen et al. 2018). With two independent noisy scans of the same field the network maps
frame 1 to frame 2 with a per-pixel loss: for zero-mean noise the MSE minimiser is the clean image. For
synthetic shards, :func:`add_noise_pair_batch` draws one set of acquisition parameters per image and two
independent noise realisations with them (two scans at the same settings).

The self-supervised objectives train with a per-pixel loss (:func:`pixel_loss`, MSE by default: its
minimiser is the conditional mean, which is unbiased for zero-mean noise; L1 gives the median, which is
biased for skewed low-dose Poisson noise). The ``loss`` section's supervised objective is still what
``val_loss`` reports against the clean images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from semray.config.loss import BlindSpotMaskConfig, LossConfig
from semray.config.noise import NoiseConfig, NoiseParams

Axis = Literal["x", "y"]

__all__ = [
    "BlindSpotBatch",
    "SelfSupervisedObjective",
    "add_noise_pair_batch",
    "apply_blind_spot",
    "blind_segment_offsets",
    "masked_loss",
    "pixel_loss",
    "replacement_offsets",
    "sample_blind_pixels",
]


# --------------------------------------------------------------------------------------------------
# Mask geometry
# --------------------------------------------------------------------------------------------------


def blind_segment_offsets(half_length: int, axis: Axis = "x") -> np.ndarray:
    """Offsets ``(dy, dx)`` blinded around every blind pixel: int64 (2 * half_length + 1, 2).

    ``half_length = 0`` is the plain Noise2Void blind spot (the pixel itself); ``> 0`` is structN2V's
    segment along ``axis`` (``x`` = the fast-scan axis, along rows).
    """
    if half_length < 0:
        raise ValueError(f"half_length must be >= 0, got {half_length}")
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    d = np.arange(-half_length, half_length + 1, dtype=np.int64)
    z = np.zeros_like(d)
    return np.stack([z, d], axis=1) if axis == "x" else np.stack([d, z], axis=1)


def replacement_offsets(radius: int, half_length: int, axis: Axis = "x") -> np.ndarray:
    """Offsets ``(dy, dx)`` a blinded pixel's replacement value may come from: int64 (M, 2).

    The ``(2 radius + 1)^2`` window minus the blinded segment. The set is symmetric under ``dy -> -dy``
    and ``dx -> -dx`` separately (used for border mirroring).

    Raises:
        ValueError: the window holds no allowed offset (radius < 1).
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    seg = blind_segment_offsets(half_length, axis)
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    offs = np.stack([dy.ravel(), dx.ravel()], axis=1).astype(np.int64)
    blocked = (offs[:, None, :] == seg[None, :, :]).all(axis=2).any(axis=1)
    return offs[~blocked]


def sample_blind_pixels(
    n: int, shape: tuple[int, int], fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Blind pixels of ``n`` crops of ``shape``: ``round(fraction * H * W)`` (at least 1) distinct pixels
    per crop, uniformly at random.

    Returns:
        int64 (n, K, 2) of ``(y, x)``.
    """
    h, w = int(shape[0]), int(shape[1])
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * h * w))
    flat = np.stack([rng.choice(h * w, size=k, replace=False) for _ in range(n)]) if n else np.zeros((0, k))
    flat = flat.astype(np.int64)
    return np.stack([flat // w, flat % w], axis=-1)


def _mirror(pos: np.ndarray, off: np.ndarray, size: int) -> np.ndarray:
    """``pos + off``, with the offset's sign flipped where the target leaves ``[0, size)``."""
    tgt = pos + off
    out = (tgt < 0) | (tgt >= size)
    tgt = np.where(out, pos - off, tgt)
    if ((tgt < 0) | (tgt >= size)).any():
        raise ValueError(f"crop side {size} px is too small for the blind-spot window")
    return tgt


@dataclass
class BlindSpotBatch:
    """A masked batch: ``inputs`` float32 (N, H, W) to feed the network, ``mask`` bool (N, H, W) True at
    the blind (centre) pixels, where the loss is taken, and ``blinded`` bool (N, H, W) True wherever the
    input was altered (centres plus segments)."""

    inputs: np.ndarray
    mask: np.ndarray
    blinded: np.ndarray


def apply_blind_spot(
    noisy: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    *,
    half_length: int = 0,
    axis: Axis = "x",
    radius: int = 2,
) -> BlindSpotBatch:
    """Blind-spot masking of a batch of noisy crops (see module docstring).

    Args:
        noisy: float (N, H, W) noisy crops (any range; values are only moved around).
        fraction: blind (loss) pixels per crop, as a fraction of its pixels.
        rng: source of the blind pixels and replacement offsets.
        half_length: 0 = Noise2Void; > 0 = structN2V segment ``|d| <= half_length`` along ``axis``.
        axis: the axis the noise is correlated along (``x``: fast scan, rows).
        radius: replacement window half-size (px).

    Returns:
        :class:`BlindSpotBatch`. Every altered pixel holds the *original* value of a pixel outside the
        blinded segment of the blind pixel it belongs to (values are read before anything is written).
    """
    x = np.asarray(noisy, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"noisy must be (N, H, W), got shape {x.shape}")
    n, h, w = x.shape
    seg = blind_segment_offsets(half_length, axis)
    allowed = replacement_offsets(radius, half_length, axis)
    centres = sample_blind_pixels(n, (h, w), fraction, rng)  # (n, k, 2)
    k = centres.shape[1]
    # every segment pixel of every centre, and an independent replacement offset for each
    py = np.clip(centres[:, :, None, 0] + seg[None, None, :, 0], 0, h - 1)  # (n, k, s)
    px = np.clip(centres[:, :, None, 1] + seg[None, None, :, 1], 0, w - 1)
    pick = allowed[rng.integers(0, len(allowed), size=(n, k, len(seg)))]  # (n, k, s, 2)
    sy = _mirror(centres[:, :, None, 0], pick[..., 0], h)
    sx = _mirror(centres[:, :, None, 1], pick[..., 1], w)
    b = np.broadcast_to(np.arange(n)[:, None, None], py.shape)
    values = x[b, sy, sx]
    out = x.copy()
    out[b, py, px] = values
    blinded = np.zeros((n, h, w), dtype=bool)
    blinded[b, py, px] = True
    mask = np.zeros((n, h, w), dtype=bool)
    mask[np.arange(n)[:, None], centres[..., 0], centres[..., 1]] = True
    return BlindSpotBatch(out, mask, blinded)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Element-wise loss (same shape as the inputs): ``mse`` = squared error, ``l1`` = absolute error."""
    if kind == "mse":
        return (pred - target) ** 2
    if kind == "l1":
        return (pred - target).abs()
    raise ValueError(f"unknown pixel loss {kind!r}; expected 'mse' or 'l1'")


def masked_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """Mean of :func:`pixel_loss` over the pixels where ``mask`` is True (0-dim tensor).

    Pixels outside the mask contribute neither to the value nor to the gradient.

    Raises:
        ValueError: shapes differ or the mask is empty.
    """
    if pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)} differ"
        )
    m = mask.to(torch.bool)
    count = int(m.sum())
    if count == 0:
        raise ValueError("the blind-spot mask is empty")
    return pixel_loss(pred[m], target[m], kind).sum() / count


# --------------------------------------------------------------------------------------------------
# Noise2Noise pairs
# --------------------------------------------------------------------------------------------------


def add_noise_pair_batch(
    batch: Mapping[str, np.ndarray], noise: NoiseConfig | Mapping[str, Any], seed: int, epoch: int = 0
) -> dict[str, np.ndarray]:
    """:func:`semray.data.add_noise_batch` plus ``noisy2``: a second, independent scan of each image.

    Frame 1 (``noisy``) is exactly what :func:`~semray.data.add_noise_batch` gives for the same
    ``(seed, image_id, epoch)``; frame 2 uses the same acquisition parameters (dose, gain, jitter
    amplitude, ...) with the generator's next, independent noise stream, like a second scan at the same
    settings.

    Returns:
        The batch with ``noisy`` and ``noisy2`` (layout of ``clean``, float32 [0, 1]), the ``noise_*``
        parameter columns, ``noise_seed`` and ``noise_epoch``; ``clean`` on the frames' scale as in
        :func:`~semray.data.add_noise_batch` (rescaled only with the ``headroom`` ADC window).
    """
    from semray.data import like_column, noise_columns
    from semray.noise import apply_noise, image_rng, sample_params

    cfg = noise if isinstance(noise, NoiseConfig) else NoiseConfig.model_validate(noise)
    out = dict(batch)
    frames: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    params: list[NoiseParams] = []
    for iid, clean in zip(batch["image_id"], batch["clean"], strict=True):
        rng = image_rng(seed, str(iid), epoch)
        p = sample_params(cfg, rng)
        c = np.asarray(clean, dtype=np.float32)
        frames[0].append(apply_noise(c, p, rng))
        frames[1].append(apply_noise(c, p, rng))
        params.append(p)
    for name, imgs in zip(("noisy", "noisy2"), frames, strict=True):
        out[name] = like_column(batch["clean"], imgs)
    # targets on the noisy scale (headroom ADC window), params, seed and epoch: as the noise stage
    out.update(noise_columns(batch, params, seed, epoch))
    return out


# --------------------------------------------------------------------------------------------------
# The objective as the training loop uses it
# --------------------------------------------------------------------------------------------------


class SelfSupervisedObjective:
    """Turns a training batch into (network input, target, loss mask) and scores the prediction.

    * ``n2v`` / ``structn2v``: input = the blind-spot-masked noisy crop, target = the noisy crop, loss on
      the blind pixels only (:func:`masked_loss`).
    * ``n2n``: input = frame 1, target = frame 2, loss on every pixel.
    """

    def __init__(self, cfg: LossConfig, objective: str | None = None) -> None:
        """``objective``: n2v, structn2v or n2n (None: ``cfg.objective``, e.g. a mix source's own); the
        mask and the pixel loss are ``cfg``'s."""
        kind = objective or cfg.objective
        if kind not in ("n2v", "structn2v", "n2n"):
            raise ValueError(
                f"objective {kind!r}: this is for n2v, structn2v or n2n (supervised trains on clean)"
            )
        self.kind = kind
        self.mask_cfg: BlindSpotMaskConfig = cfg.mask
        self.pixel = cfg.selfsup_pixel_loss
        self.half_length = cfg.mask.half_length if kind == "structn2v" else 0

    @property
    def needs_pair(self) -> bool:
        """Whether batches must carry a second noisy frame (``noisy2``)."""
        return self.kind == "n2n"

    def prepare(
        self, noisy: torch.Tensor, noisy2: torch.Tensor | None, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(input, target, mask)`` for float32 (N, 1, H, W) noisy crops (mask None = every pixel).

        Masks are built on the CPU (numpy) and moved to ``noisy``'s device.
        """
        if self.kind == "n2n":
            if noisy2 is None:
                raise ValueError("objective n2n needs a second noisy frame (column noisy2) in every batch")
            return noisy, noisy2, None
        m = self.mask_cfg
        bs = apply_blind_spot(
            noisy.detach().float().cpu().numpy()[:, 0],
            m.fraction,
            rng,
            half_length=self.half_length,
            axis=m.axis,
            radius=m.radius,
        )
        inp = torch.from_numpy(bs.inputs)[:, None].to(noisy.device, dtype=noisy.dtype)
        mask = torch.from_numpy(bs.mask)[:, None].to(noisy.device)
        return inp, noisy, mask

    def loss(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(total, parts)`` like :mod:`semray.losses` modules (parts: plain floats, key ``total``)."""
        if mask is None:
            total = pixel_loss(pred, target, self.pixel).mean()
        else:
            total = masked_loss(pred, target, mask, self.pixel)
        name = f"{self.kind}_{self.pixel}"
        v = float(total.detach())
        return total, {"total": v, name: v}

"""Per-epoch validation: denoise the fixed validation crops, measure them, draw a sample figure.

Pure torch/numpy; the training loop splits the items over workers and sums the results
(:func:`metric_sums` -> all-reduce -> :func:`finalize`). Metrics (all prefixed ``val_``):

* ``psnr`` (dB), ``ssim``: mean over images; ``psnr_gain``: PSNR(denoised) - PSNR(noisy), dB.
* ``loss``: the training objective on the validation crops.
* ``edge_preservation``, ``gradient_correlation``: edge F1 and gradient correlation (semray.metrics).
* ``defect_recall``, ``defect_contrast``: over images that have a measurable defect in their crop
  (NaN when none has).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from semray import metrics as M

#: Metric names, in the order they are summed across workers.
VAL_KEYS = (
    "val_psnr",
    "val_ssim",
    "val_psnr_gain",
    "val_loss",
    "val_edge_preservation",
    "val_gradient_correlation",
    "val_defect_recall",
    "val_defect_contrast",
)


@dataclass
class ValItem:
    """One fixed validation crop: float32 (h, w) images in [0, 1], bool mask, dose in e-/px."""

    image_id: str
    noisy: np.ndarray
    clean: np.ndarray
    defect_mask: np.ndarray
    reference: np.ndarray | None
    dose_e_per_px: float


def collect_val_items(batches: Iterable[dict[str, np.ndarray]]) -> list[ValItem]:
    """Turn numpy batches of the ``val`` dataset into :class:`ValItem` s, sorted by image id."""
    items: list[ValItem] = []
    for b in batches:
        ref = b.get("reference")
        for i in range(len(b["image_id"])):
            items.append(
                ValItem(
                    image_id=str(b["image_id"][i]),
                    noisy=np.asarray(b["noisy"][i], dtype=np.float32),
                    clean=np.asarray(b["clean"][i], dtype=np.float32),
                    defect_mask=np.asarray(b["defect_mask"][i], dtype=bool),
                    reference=None if ref is None else np.asarray(ref[i], dtype=np.float32),
                    dose_e_per_px=float(b["noise_dose_e_per_px"][i]),
                )
            )
    return sorted(items, key=lambda it: it.image_id)


def _groups(images: Sequence[np.ndarray], batch: int) -> list[list[int]]:
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    return [idx[k : k + batch] for idx in by_shape.values() for k in range(0, len(idx), batch)]


@torch.no_grad()
def denoise_images(
    model: nn.Module,
    images: Sequence[np.ndarray],
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    batch: int = 8,
) -> list[np.ndarray]:
    """Run ``model`` (eval mode) on (h, w) float32 images, batching equal shapes; returns (h, w) arrays."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray | None] = [None] * len(images)
    dev = torch.device(device)
    try:
        for idx in _groups(images, batch):
            x = torch.from_numpy(np.stack([images[i] for i in idx]))[:, None].to(dev)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                y = model(x)
            y = y.float().clamp(0.0, 1.0).cpu().numpy()[:, 0]
            for k, i in enumerate(idx):
                out[i] = y[k]
    finally:
        model.train(was_training)
    return [o for o in out if o is not None]


def metric_sums(
    items: Sequence[ValItem], denoised: Sequence[np.ndarray], loss_fn: nn.Module | None = None
) -> dict[str, tuple[float, int]]:
    """Per-metric ``(sum, count)`` over ``items`` (NaN values are not counted), keys :data:`VAL_KEYS`."""
    sums = {k: [0.0, 0] for k in VAL_KEYS}

    def add(key: str, value: float, n: int = 1) -> None:
        if math.isfinite(value):
            sums[key][0] += value * n
            sums[key][1] += n

    for idx in _groups([it.clean for it in items], 16):
        clean = torch.from_numpy(np.stack([items[i].clean for i in idx]))[:, None]
        den = torch.from_numpy(np.stack([denoised[i] for i in idx]))[:, None]
        noisy = torch.from_numpy(np.stack([items[i].noisy for i in idx]))[:, None]
        p = M.psnr_torch(den, clean)
        p_noisy = M.psnr_torch(noisy, clean)
        s = M.ssim_torch(den, clean) if min(clean.shape[-2:]) >= 11 else torch.full_like(p, float("nan"))
        for k in range(len(idx)):
            add("val_psnr", float(p[k]))
            add("val_psnr_gain", float(p[k] - p_noisy[k]))
            add("val_ssim", float(s[k]))
        if loss_fn is not None:
            with torch.no_grad():
                total, _ = loss_fn(den, clean)
            add("val_loss", float(total), len(idx))
    for it, den_img in zip(items, denoised, strict=True):
        add("val_edge_preservation", M.edge_preservation(it.clean, den_img))
        add("val_gradient_correlation", M.gradient_correlation(it.clean, den_img))
        if it.defect_mask.any():
            add("val_defect_recall", M.defect_recall(it.clean, den_img, it.defect_mask, it.reference))
            add("val_defect_contrast", M.defect_contrast(it.clean, den_img, it.defect_mask, it.reference))
    return {k: (v[0], int(v[1])) for k, v in sums.items()}


def sums_to_tensor(sums: dict[str, tuple[float, int]]) -> torch.Tensor:
    """``[sum_0, count_0, sum_1, count_1, ...]`` in :data:`VAL_KEYS` order (float64), for all-reduce."""
    return torch.tensor([x for k in VAL_KEYS for x in sums[k]], dtype=torch.float64)


def finalize(totals: torch.Tensor) -> dict[str, float]:
    """Means from a (summed) :func:`sums_to_tensor` vector; NaN where nothing was counted."""
    vals = totals.tolist()
    out = {}
    for i, k in enumerate(VAL_KEYS):
        s, n = vals[2 * i], vals[2 * i + 1]
        out[k] = s / n if n > 0 else float("nan")
    return out


def sample_figure(
    items: Sequence[ValItem], denoised: Sequence[np.ndarray], out_png: str | Path, title: str | None = None
) -> Path:
    """PNG grid, one row per item: noisy | denoised | clean | |difference| (denoised vs clean)."""
    from semray.figures import image_grid

    rows: list[list[Any]] = []
    titles = []
    for it, den in zip(items, denoised, strict=True):
        rows.append([it.noisy, den, it.clean, np.abs(den - it.clean)])
        psnr_n, psnr_d = M.psnr(it.clean, it.noisy), M.psnr(it.clean, den)
        titles.append(f"{it.dose_e_per_px:.0f} e-/px\n{psnr_n:.1f} -> {psnr_d:.1f} dB")
    return image_grid(
        rows,
        ["noisy", "denoised", "clean", "|denoised - clean|"],
        out_png,
        row_titles=titles,
        title=title,
        cmaps=["gray", "gray", "gray", "magma"],
    )

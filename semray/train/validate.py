"""Per-epoch validation: denoise the fixed validation crops, measure them, draw a sample figure.

Pure torch/numpy; the training loop splits the items over workers and sums the results
(:func:`metric_sums` -> all-reduce -> :func:`finalize`). Metrics (all prefixed ``val_``):

* ``psnr`` (dB), ``ssim``: mean over images; ``psnr_gain``: PSNR(denoised) - PSNR(noisy), dB.
* ``loss``: the training objective on the validation crops.
* ``edge_preservation``, ``gradient_correlation``: edge F1 and gradient correlation (semray.metrics).
* ``defect_recall``, ``defect_contrast``: over images that have a measurable defect in their crop
  (NaN when none has); images whose defect mask is unknown (real data nobody labelled) never count.

When the items come from a mix of shard sources (``ValItem.source`` set), every metric is also
reported per source as ``<metric>/<source>`` (e.g. ``val_psnr/real_pairs``); :func:`val_keys` lists
the keys in the fixed order every worker sums them in.
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
    source: str = ""
    defect_known: bool = True


def collect_val_items(batches: Iterable[dict[str, np.ndarray]]) -> list[ValItem]:
    """Turn numpy batches of the ``val`` dataset into :class:`ValItem` s, sorted by image id (by
    source, then interleaved across sources, when the batches carry a ``source`` column)."""
    items: list[ValItem] = []
    for b in batches:
        ref = b.get("reference")
        src = b.get("source")
        known = b.get("defect_mask_known")
        for i in range(len(b["image_id"])):
            items.append(
                ValItem(
                    image_id=str(b["image_id"][i]),
                    noisy=np.asarray(b["noisy"][i], dtype=np.float32),
                    clean=np.asarray(b["clean"][i], dtype=np.float32),
                    defect_mask=np.asarray(b["defect_mask"][i], dtype=bool),
                    reference=None if ref is None or ref[i] is None else np.asarray(ref[i], dtype=np.float32),
                    dose_e_per_px=float(b["noise_dose_e_per_px"][i]),
                    source="" if src is None else str(src[i]),
                    defect_known=True if known is None else bool(known[i]),
                )
            )
    # Round-robin over sources (each sorted by image id): the first few items (the sample figure) and
    # every worker's share ``items[rank::world]`` then hold all sources. One source: sorted by id.
    by_source: dict[str, list[ValItem]] = {}
    for it in sorted(items, key=lambda it: (it.source, it.image_id)):
        by_source.setdefault(it.source, []).append(it)
    lists = list(by_source.values())
    longest = max((len(x) for x in lists), default=0)
    return [lst[j] for j in range(longest) for lst in lists if j < len(lst)]


def val_keys(items: Sequence[ValItem]) -> tuple[str, ...]:
    """Metric keys of a validation set: :data:`VAL_KEYS`, then ``<key>/<source>`` for each source
    (sorted) among ``items``. Computed from the *whole* set, so every worker gets the same keys."""
    sources = sorted({it.source for it in items if it.source})
    return VAL_KEYS + tuple(f"{k}/{s}" for s in sources for k in VAL_KEYS)


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
    """Per-metric ``(sum, count)`` over ``items`` (NaN values are not counted), keys :data:`VAL_KEYS`
    plus ``<key>/<source>`` for the sources among ``items`` (see :func:`val_keys`)."""
    sums: dict[str, list[float]] = {k: [0.0, 0] for k in val_keys(items)}

    def add(key: str, value: float, n: int = 1, source: str = "") -> None:
        if math.isfinite(value):
            for k in (key, f"{key}/{source}") if source else (key,):
                sums[k][0] += value * n
                sums[k][1] += n

    for idx in _source_groups(items, 16):
        src = items[idx[0]].source
        clean = torch.from_numpy(np.stack([items[i].clean for i in idx]))[:, None]
        den = torch.from_numpy(np.stack([denoised[i] for i in idx]))[:, None]
        noisy = torch.from_numpy(np.stack([items[i].noisy for i in idx]))[:, None]
        p = M.psnr_torch(den, clean)
        p_noisy = M.psnr_torch(noisy, clean)
        s = M.ssim_torch(den, clean) if min(clean.shape[-2:]) >= 11 else torch.full_like(p, float("nan"))
        for k in range(len(idx)):
            add("val_psnr", float(p[k]), source=src)
            add("val_psnr_gain", float(p[k] - p_noisy[k]), source=src)
            add("val_ssim", float(s[k]), source=src)
        if loss_fn is not None:
            with torch.no_grad():
                total, _ = loss_fn(den, clean)
            add("val_loss", float(total), len(idx), source=src)
    for it, den_img in zip(items, denoised, strict=True):
        add("val_edge_preservation", M.edge_preservation(it.clean, den_img), source=it.source)
        add("val_gradient_correlation", M.gradient_correlation(it.clean, den_img), source=it.source)
        if it.defect_known and it.defect_mask.any():
            recall = M.defect_recall(it.clean, den_img, it.defect_mask, it.reference)
            add("val_defect_recall", recall, source=it.source)
            contrast = M.defect_contrast(it.clean, den_img, it.defect_mask, it.reference)
            add("val_defect_contrast", contrast, source=it.source)
    return {k: (v[0], int(v[1])) for k, v in sums.items()}


def _source_groups(items: Sequence[ValItem], batch: int) -> list[list[int]]:
    """Batches of equal-shape items of one source each (one source: exactly :func:`_groups`)."""
    by_source: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_source.setdefault(it.source, []).append(i)
    out = []
    for idx in by_source.values():
        out.extend([[idx[j] for j in g] for g in _groups([items[i].clean for i in idx], batch)])
    return out


def sums_to_tensor(sums: dict[str, tuple[float, int]], keys: Sequence[str] = VAL_KEYS) -> torch.Tensor:
    """``[sum_0, count_0, sum_1, count_1, ...]`` in ``keys`` order (float64), for all-reduce; a key
    missing from ``sums`` (a source this worker has no items of) counts as ``(0, 0)``."""
    return torch.tensor([x for k in keys for x in sums.get(k, (0.0, 0))], dtype=torch.float64)


def finalize(totals: torch.Tensor, keys: Sequence[str] = VAL_KEYS) -> dict[str, float]:
    """Means from a (summed) :func:`sums_to_tensor` vector; NaN where nothing was counted."""
    vals = totals.tolist()
    out = {}
    for i, k in enumerate(keys):
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
        dose = f"{it.dose_e_per_px:.0f} e-/px" if math.isfinite(it.dose_e_per_px) else "real noise"
        titles.append(f"{(it.source + ': ') if it.source else ''}{dose}\n{psnr_n:.1f} -> {psnr_d:.1f} dB")
    return image_grid(
        rows,
        ["noisy", "denoised", "clean", "|denoised - clean|"],
        out_png,
        row_titles=titles,
        title=title,
        cmaps=["gray", "gray", "gray", "magma"],
    )

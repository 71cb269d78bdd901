"""Choosing a checkpoint without clean images: self-supervised scores on held-back noisy crops.

**structN2V score** (one noisy image per field). Blind-spot masking (:func:`semray.selfsup.apply_blind_spot`)
replaces every blind pixel, and the segment ``|dx| <= half_length`` along the fast axis around it, by
values from outside the segment; the network denoises the masked crop and the score is the mean squared
difference between its output and the *original* noisy value at the blind pixels. The prediction at a
blind pixel cannot see that pixel's noise (nor, with the segment as long as the noise correlation, the
noise correlated with it), so for zero-mean noise

    E[score] = E[(f(masked)_i - s_i)^2] + E[n_i^2]

the model's squared error against the unseen clean value plus a constant that is the same for every
checkpoint: differences of the score between checkpoints are differences of their (masked-input) MSE,
and the lowest score is the best checkpoint by that criterion (Batson & Royer 2019, Noise2Self). The same
masks are used for every checkpoint, so the comparison is paired.

**Noise2Noise score** (``--frames``: independent scans of one field). ``mean((f(frame_1) - frame_2)^2)``
over the held-back crops: with independent zero-mean noise it is the MSE against the clean field plus
the second frame's noise variance, again a constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from semray.selfsup import apply_blind_spot


def _forward(net: nn.Module, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """``net`` on float32 (N, H, W) -> float32 (N, H, W), in batches, no gradients."""
    net.eval()
    out = []
    with torch.inference_mode():
        for k in range(0, len(x), batch):
            t = torch.from_numpy(np.ascontiguousarray(x[k : k + batch]))[:, None]
            out.append(net(t)[:, 0].float().numpy())
    return np.concatenate(out)


@dataclass
class MaskSet:
    """Fixed blind-spot masks: ``inputs`` float32 (R, N, H, W) masked crops, ``mask`` bool (R, N, H, W)."""

    inputs: np.ndarray
    mask: np.ndarray


def make_masks(crops: np.ndarray, fraction: float, repeats: int, half_length: int, seed: int) -> MaskSet:
    """``repeats`` independent structN2V maskings of the noisy crops (float32 (N, H, W)), blind segments
    along x (the fast-scan axis)."""
    rng = np.random.default_rng([seed, 11])
    draws = [
        apply_blind_spot(crops, fraction, rng, half_length=half_length, axis="x") for _ in range(repeats)
    ]
    return MaskSet(np.stack([d.inputs for d in draws]), np.stack([d.mask for d in draws]))


def structn2v_score(net: nn.Module, crops: np.ndarray, masks: MaskSet) -> float:
    """Mean squared error at the blind pixels between ``net(masked crops)`` and the noisy crops.

    Args:
        net: the denoiser. crops: float32 (N, H, W) noisy crops in [0, 1]. masks: from :func:`make_masks`.
    """
    errs = []
    for inp, m in zip(masks.inputs, masks.mask, strict=True):
        pred = _forward(net, inp)
        errs.append(((pred - crops)[m] ** 2).astype(np.float64))
    return float(np.mean(np.concatenate(errs)))


def n2n_score(net: nn.Module, first: np.ndarray, second: np.ndarray) -> float:
    """``mean((net(first) - second)^2)`` for float32 (N, H, W) crops of two independent scans."""
    return float(np.mean((_forward(net, first).astype(np.float64) - second) ** 2))


@dataclass
class Candidate:
    """One checkpointed epoch: its model folder and the metrics its card recorded."""

    epoch: int
    model_dir: Path
    metrics: dict[str, float]


def checkpoint_candidates(run_dir: str | Path) -> list[Candidate]:
    """Every checkpoint of a Ray Train run folder that holds a model, by epoch."""
    from semray.models.store import CARD_FILE
    from semray.train.checkpoint import MODEL_SUBDIR

    out = []
    for card in Path(run_dir).glob(f"*/{MODEL_SUBDIR}/{CARD_FILE}"):
        c = json.loads(card.read_text())
        out.append(Candidate(int(c["training"]["epoch"]), card.parent, dict(c.get("metrics", {}))))
    return sorted(out, key=lambda c: c.epoch)


@dataclass
class Selection:
    """The checkpoint chosen without clean images, and how it compares.

    Attributes:
        criterion: ``structn2v`` or ``n2n``; lower score is better.
        init_score: the init (shipped) model's score on the same crops and masks.
        rows: per epoch ``{epoch, score, val_psnr, val_psnr/user, val_psnr/synthetic, ...}``.
        chosen_epoch: lowest score. best_synthetic_epoch: highest ``val_psnr`` (synthetic pairs, fitted
            noise, all sources). gap_db: that best ``val_psnr`` minus the chosen epoch's (>= 0).
    """

    criterion: str
    init_score: float
    rows: list[dict[str, float]] = field(default_factory=list)
    chosen_epoch: int = -1
    best_synthetic_epoch: int = -1
    gap_db: float = 0.0
    model_dirs: dict[int, Path] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, float]:
        return next(r for r in self.rows if r["epoch"] == self.chosen_epoch)

    @property
    def improvement(self) -> float:
        """Init score minus chosen score: > 0 means the adapted model is estimated better than the init's
        (the difference is an estimate of the reduction in squared error against the clean image)."""
        return self.init_score - self.chosen["score"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "init_score": self.init_score,
            "chosen_epoch": self.chosen_epoch,
            "best_synthetic_epoch": self.best_synthetic_epoch,
            "gap_db_to_best_synthetic": self.gap_db,
            "improvement_over_init": self.improvement,
            "rows": self.rows,
        }


def select(candidates: list[Candidate], init_score: float, score: Any, criterion: str) -> Selection:
    """Score every candidate with ``score(net) -> float`` and pick the lowest.

    Raises:
        RuntimeError: no candidates (the run kept no checkpoint).
    """
    from semray.models.store import load_model

    if not candidates:
        raise RuntimeError("the fine-tune left no checkpoint to choose from")
    sel = Selection(criterion, init_score)
    for c in candidates:
        net, _ = load_model(c.model_dir)
        row = {"epoch": float(c.epoch), "score": score(net)}
        row.update({k: v for k, v in c.metrics.items() if k.startswith("val_psnr")})
        sel.rows.append(row)
        sel.model_dirs[c.epoch] = c.model_dir
    sel.chosen_epoch = int(min(sel.rows, key=lambda r: r["score"])["epoch"])
    best = max(sel.rows, key=lambda r: r.get("val_psnr", float("-inf")))
    sel.best_synthetic_epoch = int(best["epoch"])
    sel.gap_db = float(best.get("val_psnr", np.nan) - sel.chosen.get("val_psnr", np.nan))
    return sel

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

**Per crop, and a paired verdict.** Both scores are computed per held-back crop (structN2V: per crop and
mask draw, then the mean over draws; the draws of one crop share its noise, so the crop is the
independent unit). The crops are split in two interleaved halves (:func:`split_crops`): the epoch is
chosen on one half and compared with the init model on the other, because the lowest of several epochs'
scores on the same crops is biased low (the winner's curse) and would flatter the chosen checkpoint.
:func:`paired_comparison` takes the per-crop differences init - chosen on the verdict half, their mean
and its paired-t standard error (``scipy.stats.sem``, ddof 1), and says ``better`` only when the mean
exceeds :data:`VERDICT_SE` standard errors, ``level`` when it lies within them, ``worse`` below.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


def structn2v_scores(net: nn.Module, crops: np.ndarray, masks: MaskSet) -> np.ndarray:
    """Mean squared error at the blind pixels between ``net(masked crops)`` and the noisy crops, per mask
    draw and crop.

    Args:
        net: the denoiser. crops: float32 (N, H, W) noisy crops in [0, 1]. masks: from :func:`make_masks`.

    Returns:
        float64 (R, N): draw r, crop n. Every crop has the same number of blind pixels per draw, so the
        mean over all entries is the mean over all blind pixels.
    """
    out = []
    for inp, m in zip(masks.inputs, masks.mask, strict=True):
        err = (_forward(net, inp).astype(np.float64) - crops) ** 2
        out.append((err * m).sum(axis=(1, 2)) / np.maximum(m.sum(axis=(1, 2)), 1))
    return np.stack(out)


def structn2v_score(net: nn.Module, crops: np.ndarray, masks: MaskSet) -> np.ndarray:
    """Per-crop structN2V score: :func:`structn2v_scores` averaged over the mask draws, float64 (N,)."""
    return structn2v_scores(net, crops, masks).mean(axis=0)


def n2n_score(net: nn.Module, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per-crop ``mean((net(first) - second)^2)`` for float32 (N, H, W) crops of two independent scans;
    float64 (N,)."""
    return np.mean((_forward(net, first).astype(np.float64) - second) ** 2, axis=(1, 2))


#: Crops needed to split them into a choosing and a verdict half (at least two crops each, so the verdict
#: half has a standard error).
MIN_SPLIT_CROPS = 4
#: The verdict says ``better`` / ``worse`` only when the mean paired difference exceeds this many SEs.
VERDICT_SE = 2.0


def split_crops(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the crops the epoch is chosen on and of those the verdict is computed on.

    Interleaved (even / odd) so both halves draw on every image (the crops come in image order). Below
    :data:`MIN_SPLIT_CROPS` both are all crops: then the verdict reuses the choosing crops and is biased
    towards the chosen checkpoint (the report says so).
    """
    idx = np.arange(n)
    if n < MIN_SPLIT_CROPS:
        return idx, idx
    return idx[0::2], idx[1::2]


@dataclass
class Comparison:
    """The chosen checkpoint against the init model on the verdict crops (paired per crop).

    Attributes:
        n_crops: crops compared. init_score, chosen_score: their mean scores there.
        improvement: mean of ``init - chosen`` per crop (> 0: chosen estimated better; in score units,
            an estimate of the reduction of the squared error against the clean image).
        se: paired-t standard error of ``improvement`` (NaN with fewer than two crops).
        verdict: ``better`` (improvement > VERDICT_SE * se), ``level`` (within), ``worse``, or
            ``undetermined`` (no standard error).
        independent: the verdict crops were not used to choose the epoch.
    """

    n_crops: int
    init_score: float
    chosen_score: float
    improvement: float
    se: float
    verdict: str
    independent: bool

    def as_dict(self) -> dict[str, Any]:
        k = VERDICT_SE
        return {
            "n_crops": self.n_crops,
            "init_score": self.init_score,
            "chosen_score": self.chosen_score,
            "improvement": self.improvement,
            "improvement_se": self.se,
            "interval": [self.improvement - k * self.se, self.improvement + k * self.se],
            "interval_se": k,
            "verdict": self.verdict,
            "independent_of_choice": self.independent,
            "method": "paired t standard error over crops (scipy.stats.sem of init - chosen per crop)",
        }


def paired_comparison(init: np.ndarray, chosen: np.ndarray, independent: bool = True) -> Comparison:
    """Compare per-crop scores (lower is better) of two models on the same crops, float (N,) each.

    ``better`` when the mean improvement ``init - chosen`` exceeds :data:`VERDICT_SE` standard errors,
    ``level`` when its magnitude is at most that, ``worse`` otherwise; ``undetermined`` with N < 2.
    """
    from scipy.stats import sem

    a, b = np.asarray(init, dtype=np.float64), np.asarray(chosen, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"per-crop scores must be two (N,) arrays of one length, got {a.shape} and {b.shape}"
        )
    d = a - b
    gain = float(d.mean()) if d.size else float("nan")
    se = float(sem(d)) if d.size >= 2 else float("nan")
    if not np.isfinite(se):
        verdict = "undetermined"
    elif gain > VERDICT_SE * se:
        verdict = "better"
    elif gain >= -VERDICT_SE * se:
        verdict = "level"
    else:
        verdict = "worse"
    return Comparison(int(d.size), float(a.mean()), float(b.mean()), gain, se, verdict, independent)


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
        init_crop_scores: the init (shipped) model's per-crop scores, float64 (N,), on the same crops and
            masks as every checkpoint. crop_scores: per epoch, the same for each checkpoint.
        choose_idx, verdict_idx: the crops the epoch is chosen on and those the verdict uses
            (:func:`split_crops`).
        rows: per epoch ``{epoch, score, val_psnr, val_psnr/user, val_psnr/synthetic, ...}``; ``score``
            is the mean over the choosing crops.
        chosen_epoch: lowest score. best_synthetic_epoch: highest ``val_psnr`` (synthetic pairs, fitted
            noise, all sources). gap_db: that best ``val_psnr`` minus the chosen epoch's (>= 0).
        comparison: chosen vs init on the verdict crops (:func:`paired_comparison`).
    """

    criterion: str
    init_crop_scores: np.ndarray
    choose_idx: np.ndarray
    verdict_idx: np.ndarray
    rows: list[dict[str, float]] = field(default_factory=list)
    crop_scores: dict[int, np.ndarray] = field(default_factory=dict)
    chosen_epoch: int = -1
    best_synthetic_epoch: int = -1
    gap_db: float = 0.0
    model_dirs: dict[int, Path] = field(default_factory=dict)
    comparison: Comparison | None = None

    @property
    def init_score(self) -> float:
        """The init model's mean score on the choosing crops (comparable with ``rows[*]["score"]``)."""
        return float(self.init_crop_scores[self.choose_idx].mean())

    @property
    def chosen(self) -> dict[str, float]:
        return next(r for r in self.rows if r["epoch"] == self.chosen_epoch)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the table, the choice, the paired comparison and the per-crop scores behind it."""
        return {
            "criterion": self.criterion,
            "init_score": self.init_score,
            "chosen_score": self.chosen["score"],
            "chosen_epoch": self.chosen_epoch,
            "best_synthetic_epoch": self.best_synthetic_epoch,
            "gap_db_to_best_synthetic": self.gap_db,
            "rows": self.rows,
            "crops": {"choose": self.choose_idx.tolist(), "verdict": self.verdict_idx.tolist()},
            "crop_scores": {
                "init": self.init_crop_scores.tolist(),
                "chosen": self.crop_scores[self.chosen_epoch].tolist(),
            },
            "comparison": self.comparison.as_dict() if self.comparison else None,
        }


def choose(sel: Selection) -> Selection:
    """Fill in the choice (lowest mean score on the choosing crops), the gap to the best synthetic-pair
    epoch and the comparison with the init model on the verdict crops, from ``sel``'s scores."""
    sel.chosen_epoch = int(min(sel.rows, key=lambda r: r["score"])["epoch"])
    best = max(sel.rows, key=lambda r: r.get("val_psnr", float("-inf")))
    sel.best_synthetic_epoch = int(best["epoch"])
    sel.gap_db = float(best.get("val_psnr", np.nan) - sel.chosen.get("val_psnr", np.nan))
    v = sel.verdict_idx
    independent = not np.intersect1d(sel.choose_idx, v).size
    sel.comparison = paired_comparison(
        sel.init_crop_scores[v], sel.crop_scores[sel.chosen_epoch][v], independent
    )
    return sel


def select(
    candidates: list[Candidate],
    init_scores: np.ndarray,
    score: Callable[[nn.Module], np.ndarray],
    criterion: str,
) -> Selection:
    """Score every candidate with ``score(net) -> float64 (N,)`` per-crop scores, choose on one half of the
    crops and compare with the init model (``init_scores``, (N,)) on the other (:func:`choose`).

    Raises:
        RuntimeError: no candidates (the run kept no checkpoint).
    """
    from semray.models.store import load_model

    if not candidates:
        raise RuntimeError("the fine-tune left no checkpoint to choose from")
    init_scores = np.asarray(init_scores, dtype=np.float64)
    sel = Selection(criterion, init_scores, *split_crops(init_scores.size))
    for c in candidates:
        net, _ = load_model(c.model_dir)
        per_crop = np.asarray(score(net), dtype=np.float64)
        row = {"epoch": float(c.epoch), "score": float(per_crop[sel.choose_idx].mean())}
        row.update({k: v for k, v in c.metrics.items() if k.startswith("val_psnr")})
        sel.rows.append(row)
        sel.crop_scores[c.epoch] = per_crop
        sel.model_dirs[c.epoch] = c.model_dir
    return choose(sel)


def combine(selections: Sequence[Selection]) -> Selection:
    """One selection over the candidates of several (the proxy rounds of ``semray adapt``), chosen again
    by :func:`choose` among all of them and compared with the init model on the verdict crops.

    The selections must have scored the same crops with the same criterion (equal init scores and crop
    split) and have distinct epochs (the rounds number theirs on from the previous round's).

    Raises:
        ValueError: no selections, different crops or criteria, or an epoch in two of them.
    """
    if not selections:
        raise ValueError("no selections to combine")
    first = selections[0]
    sel = Selection(first.criterion, first.init_crop_scores, first.choose_idx, first.verdict_idx)
    for s in selections:
        same = s.criterion == first.criterion and all(
            np.array_equal(a, b)
            for a, b in ((s.init_crop_scores, first.init_crop_scores), (s.choose_idx, first.choose_idx),
                         (s.verdict_idx, first.verdict_idx))
        )  # fmt: skip
        if not same:
            raise ValueError("selections to combine must score the same crops with the same criterion")
        if overlap := sorted(set(s.crop_scores) & set(sel.crop_scores)):
            raise ValueError(f"epochs {overlap} are in more than one selection")
        sel.rows += [dict(r) for r in s.rows]
        sel.crop_scores.update(s.crop_scores)
        sel.model_dirs.update(s.model_dirs)
    return choose(sel)

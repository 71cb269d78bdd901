"""Proxy refinement rounds of ``semray adapt`` (``user.proxy_rounds``): the pieces the driver loops over.

Round 1 fine-tunes the init model against proxies that are the init model's own outputs. With R > 1
rounds, the user's images are denoised again with round r's chosen checkpoint and round r + 1 trains on
from that checkpoint against the new proxies. The fine-tune's epochs are split between the rounds
(:func:`round_epochs`), so the total optimiser steps stay ``optim.epochs * optim.steps_per_epoch``.

Why round r + 1 starts from round r's choice rather than from the init model: with the steps split, a
restart from the init model would give the final model only 1/R of the budget, while the rounds exist to
give the budget better targets. The tiles, and so the held-back crops that score every checkpoint, are
the same in every round, and epochs are numbered on across rounds (round 2's first epoch is round 1's
last + 1), so one :class:`semray.adapt.select.Selection` can hold them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from semray.adapt.select import Candidate, Selection
    from semray.config.adapt import AdaptConfig


def round_epochs(epochs: int, rounds: int) -> list[int]:
    """``epochs`` split between ``rounds`` as evenly as possible, the remainder to the later rounds (they
    train against the better proxies): ``round_epochs(8, 3) == [2, 3, 3]``.

    Raises:
        ValueError: fewer epochs than rounds, or no round.
    """
    if rounds < 1 or epochs < rounds:
        raise ValueError(f"cannot split {epochs} epochs between {rounds} rounds (each needs one)")
    base, extra = divmod(epochs, rounds)
    return [base + (1 if r >= rounds - extra else 0) for r in range(rounds)]


def round_config(cfg: AdaptConfig, number: int, epochs: int, init: str) -> AdaptConfig:
    """The config of round ``number`` (from 1): its share of the epochs, its init model (round 1:
    ``cfg.init``; later: the previous round's choice) and its own training seed (``cfg.seed + number - 1``:
    fresh noise and crops). ``cfg`` itself when there is one round, so that path is today's exactly."""
    if cfg.user.proxy_rounds == 1:
        return cfg
    optim = cfg.optim.model_copy(update={"epochs": epochs})
    return cfg.model_copy(update={"init": init, "seed": (cfg.seed + number - 1) % 2**31, "optim": optim})


def refine_proxies(model: str | Path, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The next round's proxies: each noisy image (float32 (H, W) in [0, 1]) denoised by ``model`` (a model
    folder), float32 (H, W) in [0, 1], as :class:`semray.infer.Denoiser` tiles them (on the CPU, like
    round 1's proxies)."""
    from semray.infer import Denoiser

    den = Denoiser(model=str(model), device="cpu")
    return [den(img) for img in images]


def round_candidates(run_dir: str | Path, offset: int) -> list[Candidate]:
    """The checkpoints of one round's training run, epochs numbered on from ``offset`` (the epochs of the
    rounds before)."""
    from semray.adapt.select import checkpoint_candidates

    return [replace(c, epoch=c.epoch + offset) for c in checkpoint_candidates(run_dir)]


@dataclass
class Round:
    """One round: its number (from 1), where its proxies came from, its training run (``trained``, a
    :class:`semray.train.runner.TrainResult`, and ``tcfg`` its TrainConfig) and its own selection (its
    checkpoints only, epochs numbered across rounds)."""

    number: int
    proxies_from: str
    trained: Any
    tcfg: Any
    selection: Selection

    @property
    def chosen_model_dir(self) -> Path:
        """Folder of this round's chosen checkpoint's model (the next round's init and proxy maker)."""
        return Path(self.selection.model_dirs[self.selection.chosen_epoch])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record for the report: epochs, choice and its comparison with the init model."""
        sel = self.selection
        return {
            "round": self.number,
            "proxies_from": self.proxies_from,
            "epochs": sorted(sel.crop_scores),
            "chosen_epoch": sel.chosen_epoch,
            "chosen_score": sel.chosen["score"],
            "init_score": sel.init_score,
            "comparison": sel.comparison.as_dict() if sel.comparison else None,
            "train_run": self.trained.run_name,
            "mlflow_run_id": self.trained.mlflow_run_id,
        }


def round_of(rounds: Sequence[Round], epoch: int) -> Round:
    """The round whose checkpoints include ``epoch`` (numbered across rounds).

    Raises:
        KeyError: no round has that epoch.
    """
    for r in rounds:
        if epoch in r.selection.crop_scores:
            return r
    raise KeyError(f"epoch {epoch} is in no round")

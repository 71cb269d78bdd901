"""The init weights of a fine-tuning search (``base.init``) as a competitor of its trials.

A search that fine-tunes existing weights must never leave a model worse than the one it started from.
So, before any trial, the init weights are scored exactly as a trial's epoch is (:func:`score_init`:
the same fixed validation set, metrics and objective), and one rule (:func:`pick_winner`) decides what
:func:`semray.tune.run_search` registers: the best trial only if it scores strictly higher, otherwise
the init weights unchanged (:func:`write_init_model` writes them as a model folder to register).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semray.config.tune import SCORE_METRIC, TuneConfig


@dataclass
class InitBaseline:
    """The init weights, scored as a trial.

    Attributes:
        init: the ``semray.train.runner.InitModel`` (spec, provenance, CPU state dict).
        metrics: its validation metrics (``val_psnr`` in dB, ``val_defect_recall`` in [0, 1], ...).
        score: the search's objective of ``metrics`` (:data:`~semray.config.tune.SCORE_METRIC`).
    """

    init: Any
    metrics: dict[str, float]
    score: float


def pick_winner(best_trial_score: float | None, init_score: float | None) -> str:
    """What a search registers: ``"trial"`` or ``"init"``.

    The best trial wins only if its score is finite and strictly above the init weights' score on the
    same validation set; a tie, a non-finite trial score or no trial means the init weights are kept.
    Without init weights (``init_score`` None: a search from scratch) the best trial always wins.
    """
    if init_score is None:
        return "trial"
    if best_trial_score is None or not math.isfinite(best_trial_score):
        return "init"
    return "trial" if best_trial_score > init_score else "init"


def score_init(cfg: TuneConfig, plan: Any, init: Any) -> InitBaseline:
    """Score the init weights with the trials' own fixed validation set and metrics
    (:func:`semray.train.runner.evaluate_init`, on the driver's CPU) and the search's objective.

    Args:
        cfg: the search, its ``base`` already fitted to the init model (``resolve_init``).
        plan: the search's data plan (its ``val_batch`` is what every trial validates on).
        init: the ``InitModel`` from ``resolve_init``.
    """
    from semray.train.runner import evaluate_init

    metrics = evaluate_init(cfg.base, plan, init.state)
    score = float(cfg.objective.score(metrics))
    print(f"semray tune: init model {init.spec!r} before any trial: {SCORE_METRIC} {score:.4g}", flush=True)
    return InitBaseline(init, metrics, score)


def write_init_model(cfg: TuneConfig, baseline: InitBaseline, out_dir: str | Path, search: str) -> Path:
    """Write the init weights, unchanged, as a model folder (semray store format) in ``out_dir``; the
    card names the init model as ``parent`` and carries its validation metrics."""
    from semray.models.store import save_model
    from semray.models.unet import build_model

    net = build_model(cfg.base.model)
    net.load_state_dict(baseline.init.state)
    card = {
        "name": cfg.mlflow.registered_model or search,
        "description": f"the weights of {baseline.init.spec!r}, unchanged: search {search} found no "
        "trial that beat them on its validation set",
        "metrics": baseline.metrics,
        "parent": baseline.init.card_entry(),
    }
    return save_model(net, cfg.base.model, out_dir, card)

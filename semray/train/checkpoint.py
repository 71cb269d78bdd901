"""What a training checkpoint holds and how it is written and read back.

A checkpoint folder (one per reported epoch, merged from all workers by Ray Train)::

    model/model.safetensors, model/card.json   the network in semray's model store format (rank 0)
    train_state.pt                             optimiser state, step, epoch, early-stopping state (rank 0)
    data_rank<R>.json                          which images rank R trained on in that epoch (every rank)

The model part is exactly what :func:`semray.models.store.load_model` reads, so the best checkpoint's
``model/`` folder *is* the model that gets exported and registered. ``train_state.pt`` holds only
tensors and plain containers and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semray.config.train import TrainConfig
from semray.models.store import load_model, save_model

MODEL_SUBDIR = "model"
STATE_FILE = "train_state.pt"


@dataclass
class LoopState:
    """Progress of a run that a resumed run continues from.

    Attributes:
        epoch: last completed epoch (-1 before the first).
        step: optimiser steps taken so far (per worker).
        best_score: best validation score so far (None before the first validation).
        best_epoch: epoch of ``best_score``.
        bad_epochs: epochs since the last improvement (early stopping).
    """

    epoch: int = -1
    step: int = 0
    best_score: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def improved(self, score: float, mode: str, min_delta: float) -> bool:
        """Whether ``score`` beats the best so far by more than ``min_delta`` in direction ``mode``."""
        if self.best_score is None:
            return True
        delta = score - self.best_score if mode == "max" else self.best_score - score
        return delta > min_delta


@dataclass
class DataRecord:
    """Which images one worker trained on in one epoch, and how many crops of each."""

    epoch: int
    rank: int
    image_crops: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_counter(cls, epoch: int, rank: int, counts: Counter[str]) -> DataRecord:
        return cls(epoch, rank, dict(sorted(counts.items())))


def model_card(
    cfg: TrainConfig, run_name: str, epoch: int, metrics: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """The card written with each checkpointed model: how it was trained and how it validated."""
    return {
        "name": cfg.mlflow.registered_model,
        "description": f"U-Net denoiser trained by semray train (run {run_name}, epoch {epoch})",
        "training": {
            "run": run_name,
            "epoch": epoch,
            "seed": cfg.seed,
            "loss": cfg.loss.model_dump(mode="json"),
            "crop_px": cfg.data.crop_px,
            "batch_size": cfg.data.batch_size,
            "num_workers": cfg.scaling.num_workers,
            "optim": cfg.optim.model_dump(mode="json"),
            "noise_dose_e_per_px": cfg.noise.shot.dose_e_per_px.model_dump(mode="json"),
            **extra,
        },
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    card: dict[str, Any],
) -> Path:
    """Write rank 0's part of a checkpoint (model + training state) into ``out_dir``."""
    out = Path(out_dir)
    save_model(model, cfg.model, out / MODEL_SUBDIR, card=card)
    torch.save({"optimizer": optimizer.state_dict(), "loop": asdict(state)}, out / STATE_FILE)
    return out


def write_data_record(out_dir: str | Path, record: DataRecord) -> Path:
    """Write one worker's :class:`DataRecord` as ``data_rank<R>.json``."""
    path = Path(out_dir) / f"data_rank{record.rank}.json"
    path.write_text(json.dumps(asdict(record)))
    return path


def read_data_records(ckpt_dir: str | Path) -> list[DataRecord]:
    """All workers' data records of a checkpoint, by rank."""
    recs = [DataRecord(**json.loads(p.read_text())) for p in Path(ckpt_dir).glob("data_rank*.json")]
    return sorted(recs, key=lambda r: r.rank)


def load_checkpoint(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], LoopState]:
    """Read a checkpoint folder: ``(model state_dict, optimiser state_dict, loop state)``."""
    root = Path(ckpt_dir)
    model, _ = load_model(root / MODEL_SUBDIR)
    blob = torch.load(root / STATE_FILE, map_location="cpu", weights_only=True)
    return model.state_dict(), blob["optimizer"], LoopState(**blob["loop"])

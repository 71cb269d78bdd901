"""Per-crop training objectives of one batch: a mix may train some sources supervised and others
self-supervised in the same optimiser step (pure torch, no Ray; the loop's ``_step`` calls it).

Every training crop carries the objective of its source (the pipeline's ``objective`` column:
``supervised``, ``n2v``, ``structn2v`` or ``n2n``; ``ShardSource.objective``, default ``loss.objective``).
:meth:`BatchObjective.prepare` splits the batch into one :class:`BatchPart` per objective present and
builds the network input and target of each part:

* ``supervised``: input the noisy crop, target the clean one, loss ``loss.kind``'s (plus the defect
  term when ``loss.defect_weight > 0``);
* ``n2v`` / ``structn2v`` / ``n2n``: :class:`~semray.selfsup.SelfSupervisedObjective` (blind-spot
  masked input and the loss on the blind pixels only; or frame 1 -> frame 2).

One forward pass takes the whole batch. :meth:`BatchObjective.loss` is the sum of the parts' losses,
each weighted by its share of the batch's crops, ``L = sum_p (n_p / N) L_p``; a batch of one objective
(every plain run, and every mix without per-source objectives) is that objective's loss exactly, with
the same operations in the same order as before the mix could mix objectives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from semray.config.loss import LossConfig
from semray.losses import DefectWeightedLoss
from semray.selfsup import SelfSupervisedObjective

SUPERVISED = "supervised"


@dataclass(frozen=True)
class BatchPart:
    """The crops of one objective in a batch: ``rows`` int64 indices into the batch (None = all of it)
    and ``share`` = their fraction of the batch's crops (0-1)."""

    objective: str
    rows: torch.Tensor | None
    share: float


@dataclass
class PreparedBatch:
    """A batch ready for the network: ``inputs`` float32 (N, 1, H, W) (masked where blind-spot), and per
    part its ``targets`` (n_p, 1, H, W) and loss ``masks`` (bool (n_p, 1, H, W), None = every pixel)."""

    inputs: torch.Tensor
    parts: list[BatchPart]
    targets: list[torch.Tensor]
    masks: list[torch.Tensor | None]


def _take(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or rows is None else t[rows]


class BatchObjective:
    """The training loss of a run whose crops may carry different objectives (see module docstring).

    Args:
        loss_cfg: the run's ``loss`` section (default objective, blind-spot mask, pixel loss).
        objectives: every objective the run's crops may carry (the sources' resolved objectives).
        loss_fn: the supervised loss (:func:`semray.losses.build_loss` of ``loss_cfg``).
    """

    def __init__(self, loss_cfg: LossConfig, objectives: Iterable[str], loss_fn: nn.Module) -> None:
        self.default = loss_cfg.objective
        self.loss_fn = loss_fn
        names = sorted({self.default, *objectives})
        self.selfsup = {o: SelfSupervisedObjective(loss_cfg, o) for o in names if o != SUPERVISED}

    @property
    def needs_defect(self) -> bool:
        """Whether :meth:`loss` wants the batch's defect masks (the supervised defect term)."""
        return isinstance(self.loss_fn, DefectWeightedLoss)

    def split(self, objectives: Sequence[str] | None, n: int, device: torch.device) -> list[BatchPart]:
        """One part per objective present in a batch of ``n`` crops (sorted by name); ``objectives`` is
        the per-crop column (None: every crop has the run's default objective).

        Raises:
            ValueError: a crop names an objective this run was not set up for.
        """
        names = [self.default] * n if objectives is None else [str(o) for o in objectives]
        unknown = sorted(set(names) - {SUPERVISED, *self.selfsup})
        if unknown:
            raise ValueError(f"batch crops have objective(s) {unknown} the run was not set up for")
        present = sorted(set(names))
        if len(present) == 1:
            return [BatchPart(present[0], None, 1.0)]
        col = np.asarray(names, dtype=object)
        return [
            BatchPart(o, torch.from_numpy(np.flatnonzero(col == o)).to(device), float(np.mean(col == o)))
            for o in present
        ]

    def prepare(
        self, batch: dict[str, Any], noisy: torch.Tensor, clean: torch.Tensor, rng: np.random.Generator,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> PreparedBatch:  # fmt: skip
        """Network input and per-part targets of one batch (``noisy``, ``clean``: (N, 1, H, W) on the
        training device; ``batch["noisy2"]`` for n2n crops, ``batch["objective"]`` per crop). Blind-spot
        masks are drawn from ``rng``, part by part in name order."""
        parts = self.split(batch.get("objective"), noisy.shape[0], noisy.device)
        noisy2 = batch.get("noisy2")
        if noisy2 is not None:
            noisy2 = noisy2.to(noisy.device, non_blocking=True, memory_format=memory_format)
        inputs: torch.Tensor | None = None
        targets, masks = [], []
        for part in parts:
            sub = _take(noisy, part.rows)
            assert sub is not None
            if part.objective == SUPERVISED:
                inp, target, mask = sub, _take(clean, part.rows), None
            else:
                inp, target, mask = self.selfsup[part.objective].prepare(sub, _take(noisy2, part.rows), rng)
                inp = inp.to(memory_format=memory_format)
            if part.rows is None:
                inputs = inp
            else:
                if inputs is None:
                    inputs = noisy.clone()
                inputs[part.rows] = inp
            targets.append(target)
            masks.append(mask)
        assert inputs is not None
        return PreparedBatch(inputs, parts, targets, masks)

    def part_loss(
        self, part: BatchPart, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
        defect: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        """``(loss, parts)`` of one part's crops (``pred``: the network output of those crops)."""
        if part.objective != SUPERVISED:
            return self.selfsup[part.objective].loss(pred, target, mask)
        if self.needs_defect:
            if defect is None:
                raise ValueError("loss.defect_weight > 0 needs the batch's defect masks")
            return self.loss_fn(pred, target, defect)
        return self.loss_fn(pred, target)

    def loss(
        self, pred: torch.Tensor, prep: PreparedBatch, defect: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(total, parts)`` of the whole batch: ``sum_p share_p * L_p`` (one part: its loss as it is).

        ``parts`` are plain floats with key ``total``; with several objectives each other entry is its
        contribution to the total (its value times its part's share of the batch).
        """
        if len(prep.parts) == 1:
            return self.part_loss(prep.parts[0], pred, prep.targets[0], prep.masks[0], defect)
        total = pred.new_zeros(())
        parts: Counter[str] = Counter()
        for part, target, mask in zip(prep.parts, prep.targets, prep.masks, strict=True):
            value, sub_parts = self.part_loss(part, pred[part.rows], target, mask, _take(defect, part.rows))
            total = total + part.share * value
            parts.update({k: part.share * v for k, v in sub_parts.items() if k != "total"})
        return total, {**parts, "total": float(total.detach())}

"""Learning-rate schedules as pure functions of the optimiser step (no hidden scheduler state).

The only state is the global step, which the checkpoint stores, so a resumed run continues the same
curve, and a resumed run with more epochs stretches it to the new total instead of failing the way
``torch.optim.lr_scheduler.OneCycleLR`` does once it is stepped past its original total.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

#: One-cycle's starting learning rate is ``lr / ONECYCLE_DIV`` (PyTorch's ``div_factor``).
ONECYCLE_DIV = 25.0
#: One-cycle's Adam beta1 runs from the high value to the low one during warm-up and back after.
ONECYCLE_BETA1 = (0.95, 0.85)


def lr_factor(
    step: int, total_steps: int, schedule: str, warmup_fraction: float, min_lr_ratio: float
) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    * ``constant``: 1.
    * ``cosine``: linear warm-up ``(step + 1) / warmup`` over ``warmup = round(warmup_fraction * total)``
      steps, then ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of the remaining
      steps done; steps past ``total_steps`` stay at ``min_lr_ratio``.
    * ``onecycle``: linear from ``1 / ONECYCLE_DIV`` to 1 over the warm-up, then the same cosine decay.
    """
    if schedule == "constant":
        return 1.0
    if schedule not in ("cosine", "onecycle"):
        raise ValueError(f"unknown schedule {schedule!r}")
    total = max(1, int(total_steps))
    warm = round(warmup_fraction * total)
    if step < warm:
        if schedule == "cosine":
            return (step + 1) / warm
        start = 1.0 / ONECYCLE_DIV
        return start + (1.0 - start) * step / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def beta1(step: int, total_steps: int, warmup_fraction: float) -> float:
    """One-cycle's Adam beta1 at ``step``: high -> low over the warm-up, then back to high (cosine)."""
    hi, lo = ONECYCLE_BETA1
    total = max(1, int(total_steps))
    warm = round(warmup_fraction * total)
    if step < warm:
        return hi - (hi - lo) * step / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return lo + (hi - lo) * 0.5 * (1.0 - math.cos(math.pi * p))


def apply_schedule(
    optimizer: Optimizer,
    step: int,
    total_steps: int,
    peak_lr: float,
    schedule: str,
    warmup_fraction: float,
    min_lr_ratio: float,
) -> float:
    """Set every param group's learning rate (and beta1 for one-cycle) for ``step``; returns the lr."""
    lr = peak_lr * lr_factor(step, total_steps, schedule, warmup_fraction, min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if schedule == "onecycle" and "betas" in group:
            group["betas"] = (beta1(step, total_steps, warmup_fraction), group["betas"][1])
    return lr

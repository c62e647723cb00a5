"""Learning-rate schedules of the training loop: a pure function of the optimizer step.

``constant``: 1 after the warm-up. ``linear``: down to 0 at the end of the schedule. ``cosine``: a
half cosine down to 10% of the base rate. ``cosine-to-zero``: a half cosine down to 0, without
warm-up (SASRec's schedule before the loop was shared; kept bit for bit).
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine", "cosine-to-zero"]


def lr_factor(step: int, total: float, warmup: float, schedule: Schedule) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warm-up
    over ``warmup`` steps, then ``schedule`` until step ``total`` and flat after it; ``constant``
    (or ``total <= warmup``) stays at 1 after the warm-up."""
    if schedule == "cosine-to-zero":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 10%


def learning_rate(base: float, step: int, total: float, warmup: float, schedule: Schedule) -> float:
    """``base`` x :func:`lr_factor` (``cosine-to-zero`` multiplies in SASRec's historical order)."""
    if schedule == "cosine-to-zero":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return base * lr_factor(step, total, warmup, schedule)


def budget_steps(step: int, planned: int, elapsed: float, budget: float) -> int:
    """Steps the schedule should span when a wall-clock ``budget`` (s) will stop training before
    ``planned`` steps: the steps done plus those that fit the time left at the pace so far, with a
    10% margin for validation; never fewer than ``step + 1`` nor more than ``planned``."""
    pace = elapsed / max(1, step)
    fit = step + int(0.9 * (budget - elapsed) / max(pace, 1e-9))
    return max(step + 1, min(planned, fit))

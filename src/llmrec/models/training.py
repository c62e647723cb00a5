"""Training helpers shared by the trained models: early stopping (SASRec, semantic-ID, item-token
LM) and the warm-up + decay learning-rate schedule (semantic-ID, item-token LM).

A model validates every so often ("round": an epoch or an optimizer step, the caller decides),
feeds the score to :meth:`EarlyStopping.update`, and asks :meth:`EarlyStopping.should_stop`.
The helper keeps the best score, where it happened, a copy of the best weights, and how many
validations in a row failed to improve on it. Higher scores are better (NDCG@10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


def lr_factor(step: int, total: float, warmup: float, schedule: Literal["cosine", "linear", "constant"]) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warm-up
    over ``warmup`` steps, then ``schedule`` until step ``total`` (cosine ends at 10%, linear at 0)
    and flat after it; ``constant`` (or ``total <= warmup``) stays at 1 after the warm-up."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 10%


@dataclass
class EarlyStopping:
    """Best-so-far tracking with patience.

    ``patience``: validations in a row without improvement that stop training; ``min_rounds``:
    training never stops by patience before this round (noisy first epochs).
    """

    patience: int
    min_rounds: int = 0
    best: float = -1.0
    best_at: int = 0
    bad: int = 0
    best_state: Any = field(default=None, repr=False)

    def update(self, score: float, at: int, snapshot: Callable[[], Any]) -> bool:
        """Record ``score`` of round ``at``; on improvement store ``snapshot()`` and return True."""
        if score > self.best:
            self.best, self.best_at, self.bad = float(score), int(at), 0
            self.best_state = snapshot()
            return True
        self.bad += 1
        return False

    def should_stop(self, at: int) -> bool:
        """True when patience has run out and round ``at`` is past ``min_rounds``."""
        return self.bad >= self.patience and at >= self.min_rounds

    def position(self) -> dict[str, float | int]:
        """The JSON-able bookkeeping (for checkpoints); the best weights are saved separately."""
        return {"best": self.best, "best_at": self.best_at, "bad": self.bad}

    def restore_position(self, pos: dict[str, Any]) -> None:
        self.best, self.best_at, self.bad = float(pos["best"]), int(pos["best_at"]), int(pos["bad"])

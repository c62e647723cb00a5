"""Early stopping: the best validation score so far, where it happened, a snapshot of the best
weights, and how many validations in a row failed to improve on it. Higher is better (NDCG@10)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EarlyStopping:
    """Best-so-far tracking with patience.

    ``patience``: validations in a row without improvement that stop training; ``min_rounds``:
    training never stops by patience before this round (an epoch or a step: the loop's unit).
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

"""Most-popular baseline: every user gets the items bought most often in training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llmrec.data.splits import Split
from llmrec.models.base import Recommender


@dataclass
class PopularityConfig:
    """recent_only: count only each user's last ``recent_only`` training items (0 = all)."""

    recent_only: int = 0


class Popularity(Recommender):
    """Scores each item by its number of training interactions (same ranking for every user)."""

    name: ClassVar[str] = "popularity"
    Config: ClassVar[type] = PopularityConfig

    def __init__(self, config: PopularityConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.counts = np.zeros(n_items, dtype=np.float32)

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        k = self.config.recent_only
        seqs = [s[-k:] if k > 0 else s for s in split.train]
        items = np.concatenate(seqs + [np.empty(0, np.int64)])
        self.counts = np.bincount(items, minlength=self.n_items).astype(np.float32)
        return {"train_interactions": int(items.size)}

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32: the item counts, repeated for every history."""
        return np.broadcast_to(self.counts, (len(histories), self.n_items)).copy()

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"counts": self.counts}, {}

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self.counts = tensors["counts"].astype(np.float32)

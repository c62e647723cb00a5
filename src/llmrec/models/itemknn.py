"""Item-to-item nearest neighbours from co-occurrence and sequential transitions.

Two sparse (n_items, n_items) similarity matrices are learned from training sequences:

- co-occurrence: cosine of the items' user vectors, ``c_ij / (n_i^a * n_j^(1-a) + shrink)``;
- transitions: how often ``j`` follows ``i`` within ``window`` steps (closer steps weigh more),
  normalized by the outgoing count of ``i``.

They are mixed with ``transition_weight``, pruned to each item's ``neighbors`` best, and a
history scores ``sum_t decay^(age_t) * S[item_t]`` over its last ``max_history`` items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from llmrec.data.splits import Split
from llmrec.models.base import Recommender


@dataclass
class ItemKNNConfig:
    """See the module docstring. ``transition_weight`` 0 = pure co-occurrence, 1 = pure transitions."""

    neighbors: int = 100
    transition_weight: float = 0.5
    alpha: float = 0.5
    shrink: float = 10.0
    window: int = 3
    history_decay: float = 0.7
    max_history: int = 20

    def __post_init__(self) -> None:
        if self.neighbors < 1:
            raise ValueError("neighbors must be >= 1")
        if not 0.0 <= self.transition_weight <= 1.0:
            raise ValueError("transition_weight must be in [0, 1]")
        if self.window < 1 or self.max_history < 1:
            raise ValueError("window and max_history must be >= 1")


def _prune_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of each row."""
    m = m.tocsr()
    m.eliminate_zeros()
    indptr, indices, data = [0], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        d, ix = m.data[lo:hi], m.indices[lo:hi]
        if hi - lo > k:
            top = np.argpartition(-d, k - 1)[:k]
            d, ix = d[top], ix[top]
        indices.append(ix)
        data.append(d)
        indptr.append(indptr[-1] + len(ix))
    return sp.csr_matrix(
        (np.concatenate(data + [np.empty(0, np.float32)]).astype(np.float32),
         np.concatenate(indices + [np.empty(0, np.int32)]).astype(np.int32),
         np.asarray(indptr, dtype=np.int64)),
        shape=m.shape,
    )


class ItemKNN(Recommender):
    """Sequential item-to-item KNN (co-occurrence + transitions)."""

    name: ClassVar[str] = "itemknn"
    Config: ClassVar[type] = ItemKNNConfig

    def __init__(self, config: ItemKNNConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.sim = sp.csr_matrix((n_items, n_items), dtype=np.float32)

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        cfg, n = self.config, self.n_items
        seqs = [np.asarray(s, dtype=np.int64) for s in split.train if len(s)]
        # Co-occurrence cosine over the binary user x item matrix.
        rows = np.concatenate([np.full(len(s), u) for u, s in enumerate(seqs)] + [np.empty(0, np.int64)])
        cols = np.concatenate(seqs + [np.empty(0, np.int64)])
        x = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(seqs), n))
        x.data[:] = 1.0
        co = (x.T @ x).tocsr().astype(np.float32)
        co.setdiag(0)
        counts = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
        co = co.tocoo()
        denom = np.power(counts[co.row], cfg.alpha) * np.power(counts[co.col], 1 - cfg.alpha) + cfg.shrink
        co = sp.csr_matrix((co.data / denom, (co.row, co.col)), shape=(n, n))
        # Transitions i -> j within the window, weighted 1/step.
        src, dst, w = [], [], []
        for step in range(1, cfg.window + 1):
            for s in seqs:
                if len(s) > step:
                    src.append(s[:-step])
                    dst.append(s[step:])
                    w.append(np.full(len(s) - step, 1.0 / step, np.float32))
        if src:
            tr = sp.csr_matrix((np.concatenate(w), (np.concatenate(src), np.concatenate(dst))), shape=(n, n))
            tr.setdiag(0)
            out = np.asarray(tr.sum(axis=1)).ravel()
            tr = sp.diags(1.0 / np.maximum(out, 1e-9)) @ tr
        else:
            tr = sp.csr_matrix((n, n), dtype=np.float32)
        # Scale both to a max of 1 per row before mixing, so the weight means what it says.
        def row_max_norm(m: sp.csr_matrix) -> sp.csr_matrix:
            m = m.tocsr()
            mx = m.max(axis=1).toarray().ravel()
            return sp.diags(1.0 / np.where(mx > 0, mx, 1.0)) @ m

        sim = (1 - cfg.transition_weight) * row_max_norm(co) + cfg.transition_weight * row_max_norm(tr)
        self.sim = _prune_rows(sp.csr_matrix(sim, dtype=np.float32), cfg.neighbors)
        return {"nonzeros": int(self.sim.nnz)}

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32: decayed sum of the similarity rows of the recent history items."""
        cfg = self.config
        rows, cols, vals = [], [], []
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)[-cfg.max_history :]
            if len(h) == 0:
                continue
            ages = np.arange(len(h) - 1, -1, -1)
            rows.append(np.full(len(h), r))
            cols.append(h)
            vals.append(np.power(cfg.history_decay, ages).astype(np.float32))
        if not rows:
            return np.zeros((len(histories), self.n_items), dtype=np.float32)
        w = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(histories), self.n_items),
        )
        return np.asarray((w @ self.sim).toarray(), dtype=np.float32)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        s = self.sim.tocsr()
        return {"indptr": s.indptr.astype(np.int64), "indices": s.indices.astype(np.int32),
                "data": s.data.astype(np.float32)}, {}

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self.sim = sp.csr_matrix(
            (tensors["data"], tensors["indices"], tensors["indptr"]), shape=(self.n_items, self.n_items)
        )

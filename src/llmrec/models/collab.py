"""Collaborative item vectors: the item embeddings of a SASRec fitted on a split's training sequences.

Other model families start from them where text alone lacks co-purchase signal (the hybrid item
representations of LLaRA / E4SRec / ETEGRec / LETTER): the item-token LM initializes the low-rank
part of its item rows with them, the semantic-ID model can quantize text and collaborative vectors
together. SASRec reads ``split.train`` and early-stops on ``split.valid``; ``split.test`` is never read.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from llmrec.data.splits import Split
from llmrec.models.sasrec import SASRec, SASRecConfig


def sasrec_item_vectors(split: Split, config: SASRecConfig | None = None,
                        progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit SASRec on ``split``; return its (n_items, hidden_size) float32 item vectors (dataset item
    ids) and ``{"seconds", "best_valid_ndcg@10", "best_epoch", "stopped"}``."""
    t0 = time.perf_counter()
    model = SASRec(config or SASRecConfig(), split.n_items)
    fit = model.fit(split, progress=progress)
    info = {"seconds": time.perf_counter() - t0, "best_valid_ndcg@10": float(fit["best_valid_ndcg@10"]),
            "best_epoch": int(fit["best_epoch"]), "stopped": str(fit["stopped"])}
    return model.item_vectors(), info


def fit_width(vectors: np.ndarray, width: int) -> np.ndarray:
    """(N, d) -> (N, width): centred, then the top-``width`` principal components when d > width,
    zero columns appended when d < width. Dot products between centred rows are kept exactly when
    d <= width and as well as a rank-``width`` approximation allows otherwise."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or width < 1:
        raise ValueError(f"expected an (N, d) array and width >= 1, got shape {x.shape} and width {width}")
    x = x - x.mean(axis=0, keepdims=True)
    n, d = x.shape
    if d > width:
        _, _, vt = np.linalg.svd(x, full_matrices=False)  # vt: (min(n, d), d)
        x = x @ vt[:width].T  # (N, min(width, n))
        d = x.shape[1]
    if d < width:
        x = np.concatenate([x, np.zeros((n, width - d))], axis=1)
    return x.astype(np.float32)


def unit_rms_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled so that their mean Euclidean norm is 1 (relative sizes kept; all-zero stays zero)."""
    x = np.asarray(vectors, dtype=np.float32)
    mean = float(np.linalg.norm(x, axis=1).mean()) if len(x) else 0.0
    return x / mean if mean > 0 else x

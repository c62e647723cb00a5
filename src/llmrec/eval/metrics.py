"""Ranking metrics as pure, vectorized numpy functions.

Inputs everywhere:
- ``ranked``: (n_users, L) int array of item ids, best first; ``-1`` marks an empty slot.
  Any other id outside ``0..n_items-1`` is an invalid (non-existent) item.
- ``targets``: list of n_users 1-D int arrays, the held-out relevant items of each user.

A recommended item counts as a hit at its first occurrence in the list only, so a list that
repeats a relevant item gains nothing from the repetition. A user with no relevant items gets
NaN (and a warning); an empty list scores 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

METRICS = ("precision", "recall", "hit_rate", "mrr", "ndcg", "map")


def _pad_targets(targets: Sequence[np.ndarray]) -> np.ndarray:
    width = max((len(t) for t in targets), default=0)
    out = np.full((len(targets), max(width, 1)), -1, dtype=np.int64)
    for i, t in enumerate(targets):
        t = np.unique(np.asarray(t, dtype=np.int64))
        t = t[t >= 0]
        out[i, : len(t)] = t
    return out


def first_occurrence(ranked: np.ndarray) -> np.ndarray:
    """(n, L) bool: True where the slot holds an item not seen earlier in the same row."""
    ranked = np.asarray(ranked, dtype=np.int64)
    n, L = ranked.shape
    if L == 0:
        return np.zeros((n, 0), dtype=bool)
    order = np.argsort(ranked, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ranked, order, axis=1)
    first_sorted = np.ones_like(sorted_ids, dtype=bool)
    first_sorted[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    out = np.empty_like(first_sorted)
    np.put_along_axis(out, order, first_sorted, axis=1)
    return out


def hits_matrix(ranked: np.ndarray, targets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(hits (n, L) bool, n_relevant (n,) int): hit at first occurrence of a relevant item."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2 or ranked.shape[0] != len(targets):
        raise ValueError(f"ranked must be (n_users, L) with n_users == len(targets) == {len(targets)}")
    padded = _pad_targets(targets)
    n_rel = (padded >= 0).sum(axis=1)
    hits = (ranked[:, :, None] == padded[:, None, :]).any(axis=2) & (ranked >= 0)
    hits &= first_occurrence(ranked)
    return hits, n_rel


def _nan_for_empty(values: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    empty = n_rel == 0
    if empty.any():
        warnings.warn(f"{int(empty.sum())} user(s) have no relevant items: their metrics are NaN", stacklevel=3)
        values = values.astype(np.float64, copy=True)
        values[empty] = np.nan
    return values


def precision_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """(n,) hits in the top k divided by k."""
    return _nan_for_empty(hits[:, :k].sum(axis=1) / k, n_rel)


def recall_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """(n,) hits in the top k divided by the number of relevant items."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return _nan_for_empty(hits[:, :k].sum(axis=1) / np.maximum(n_rel, 1), n_rel)


def hit_rate_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """(n,) 1.0 if any relevant item is in the top k."""
    return _nan_for_empty(hits[:, :k].any(axis=1).astype(np.float64), n_rel)


def mrr_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """(n,) reciprocal rank of the first relevant item in the top k (0 if none)."""
    h = hits[:, :k]
    if h.shape[1] == 0:  # zero-width lists: np.argmax would fail on an empty axis
        return _nan_for_empty(np.zeros(h.shape[0], dtype=np.float64), n_rel)
    first = np.argmax(h, axis=1)
    rr = np.where(h.any(axis=1), 1.0 / (first + 1), 0.0)
    return _nan_for_empty(rr, n_rel)


def ndcg_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """(n,) binary-relevance NDCG: DCG of the top k over the ideal DCG of min(n_rel, k) hits."""
    h = hits[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, h.shape[1] + 2))
    dcg = (h * discounts).sum(axis=1)
    ideal_cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    idcg = ideal_cum[np.minimum(n_rel, k)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return _nan_for_empty(np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0), n_rel)


def map_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    """(n,) average precision at k: mean of precision@i at each hit i, over min(n_rel, k)."""
    h = hits[:, :k].astype(np.float64)
    prec_at_i = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
    denom = np.minimum(n_rel, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (prec_at_i * h).sum(axis=1) / np.maximum(denom, 1)
    return _nan_for_empty(ap, n_rel)


METRIC_FUNCTIONS = {
    "precision": precision_at_k,
    "recall": recall_at_k,
    "hit_rate": hit_rate_at_k,
    "mrr": mrr_at_k,
    "ndcg": ndcg_at_k,
    "map": map_at_k,
}


def ranking_metrics(
    ranked: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int], metrics: Sequence[str] = METRICS
) -> dict[str, np.ndarray]:
    """Per-user values ``{"ndcg@10": (n,), ...}`` for every metric and cut-off."""
    for k in ks:
        if k < 1 or k > np.asarray(ranked).shape[1]:
            raise ValueError(f"cut-off k={k} is outside 1..{np.asarray(ranked).shape[1]} (list length)")
    hits, n_rel = hits_matrix(ranked, targets)
    out: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in metrics:
            for k in ks:
                out[f"{name}@{k}"] = METRIC_FUNCTIONS[name](hits, n_rel, k)
    if (n_rel == 0).any():
        warnings.warn(f"{int((n_rel == 0).sum())} user(s) have no relevant items: NaN metrics", stacklevel=2)
    return out


def mean_ndcg(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int = 10) -> float:
    """Mean NDCG@k over users (users without targets skipped): the validation figure of early stopping
    and of weight choices."""
    return float(np.nanmean(ranking_metrics(ranked, targets, [k], ["ndcg"])[f"ndcg@{k}"]))


def catalog_coverage(ranked: np.ndarray, n_items: int, k: int | None = None) -> float:
    """Fraction of the catalog that appears in at least one user's top-k list."""
    r = np.asarray(ranked, dtype=np.int64)[:, :k]
    valid = r[(r >= 0) & (r < n_items)]
    return float(np.unique(valid).size / n_items) if n_items else 0.0


def invalid_item_rate(ranked: np.ndarray, n_items: int) -> float:
    """Share of filled slots holding an id that is not a catalog item (generated lists)."""
    r = np.asarray(ranked, dtype=np.int64)
    filled = r != -1
    if not filled.any():
        return 0.0
    return float(((r < 0) | (r >= n_items))[filled].mean())


def duplicate_rate(ranked: np.ndarray) -> float:
    """Share of filled slots repeating an item already earlier in the same list."""
    r = np.asarray(ranked, dtype=np.int64)
    filled = r != -1
    if not filled.any():
        return 0.0
    return float((~first_occurrence(r))[filled].mean())


def popularity_buckets(counts: np.ndarray, n_buckets: int = 3) -> np.ndarray:
    """(n_items,) int64 bucket of each item by its training count ``counts`` (n_items,): items sorted
    from most to least popular (ties by id) are cut so that each bucket holds about ``1 / n_buckets`` of
    all interactions; 0 = head (the most popular), ``n_buckets - 1`` = tail. An item goes to the bucket in
    which the interactions before it end."""
    counts = np.asarray(counts, dtype=np.int64)
    if n_buckets < 1 or (counts < 0).any():
        raise ValueError("popularity_buckets: n_buckets must be >= 1 and counts >= 0")
    order = np.argsort(-counts, kind="stable")
    before = np.concatenate([[0], np.cumsum(counts[order])[:-1]]) / max(1, int(counts.sum()))  # share before each
    bucket = np.empty(len(counts), dtype=np.int64)
    bucket[order] = np.minimum(n_buckets - 1, (before * n_buckets).astype(np.int64))
    return bucket

"""Evaluation protocols: full-catalog ranking, sampled-negative ranking, and generated lists.

Id spaces: users are the dataset's user ids (``EvalSet.users``), items are ``0..n_items-1``.
Every protocol builds a ranked matrix ``(n_users, L)`` of item ids (``-1`` = empty slot) and
scores it with :func:`llmrec.eval.metrics.ranking_metrics`, so all protocols share one metric
implementation. ``EvalResult.overall`` holds the NaN-ignoring mean over users of each per-user
value; users with no relevant items (NaN) therefore do not pull the mean down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from llmrec.data.splits import PAD_ITEM, EvalSet
from llmrec.eval.metrics import (
    METRICS,
    catalog_coverage,
    duplicate_rate,
    invalid_item_rate,
    ranking_metrics,
)
from llmrec.models.base import Recommender

Strategy = Literal["uniform", "popularity"]
STRATEGIES: tuple[str, ...] = ("uniform", "popularity")


@dataclass
class EvalResult:
    """Outcome of one evaluation run.

    protocol: e.g. ``"full"``, ``"sampled-uniform-100"``, ``"generated"``;
    ks: cut-offs; overall: ``{"ndcg@10": mean over users, "coverage@10": ..., ...}``;
    per_user: ``{"ndcg@10": (n_users,) float64, ...}``, rows aligned with ``users``;
    users: (n_users,) int64 user ids; n_users: number of evaluated users.
    """

    protocol: str
    ks: list[int]
    overall: dict[str, float]
    per_user: dict[str, np.ndarray]
    users: np.ndarray
    n_users: int

    def to_json(self) -> dict[str, Any]:
        """A strict-JSON-able dict (NaN is written as ``None``)."""
        return {
            "protocol": self.protocol,
            "ks": [int(k) for k in self.ks],
            "n_users": int(self.n_users),
            "overall": {name: _float_or_none(v) for name, v in self.overall.items()},
            "users": [int(u) for u in self.users],
            "per_user": {name: [_float_or_none(x) for x in v] for name, v in self.per_user.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_json` (extra keys are ignored)."""
        return cls(
            protocol=str(d["protocol"]),
            ks=[int(k) for k in d["ks"]],
            overall={name: _none_to_nan(v) for name, v in d["overall"].items()},
            per_user={
                name: np.array([_none_to_nan(x) for x in v], dtype=np.float64)
                for name, v in d["per_user"].items()
            },
            users=np.asarray(d["users"], dtype=np.int64).reshape(-1),
            n_users=int(d["n_users"]),
        )


def _float_or_none(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _none_to_nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _nanmean(values: np.ndarray) -> float:
    """Mean ignoring NaN; NaN (without a warning) when no value is finite."""
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    return float(values[keep].mean()) if keep.any() else float("nan")


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = [int(k) for k in ks]
    if not out:
        raise ValueError("ks must name at least one cut-off")
    if any(k < 1 for k in out) or any(k != k_in for k, k_in in zip(out, ks, strict=True)):
        raise ValueError(f"every cut-off in ks must be a positive integer, got {list(ks)}")
    return out


def _result(protocol: str, ranked: np.ndarray, evalset: EvalSet, n_items: int, ks: list[int]) -> EvalResult:
    """Metrics of ``ranked`` (n_users, L) against ``evalset.targets`` plus coverage@k."""
    per_user = ranking_metrics(ranked, evalset.targets, ks, METRICS)
    overall = {name: _nanmean(v) for name, v in per_user.items()}
    for k in ks:
        overall[f"coverage@{k}"] = catalog_coverage(ranked, n_items, k) if len(ranked) else float("nan")
    return EvalResult(
        protocol=protocol,
        ks=ks,
        overall=overall,
        per_user=per_user,
        users=np.asarray(evalset.users, dtype=np.int64),
        n_users=len(evalset),
    )


def evaluate_full(
    model: Recommender,
    evalset: EvalSet,
    ks: Sequence[int] = (5, 10, 20),
    exclude_seen: bool = True,
    batch_size: int = 256,
    progress: bool = False,
) -> EvalResult:
    """Rank the whole catalog for each user and score the top ``max(ks)``.

    Uses ``model.recommend`` (ties broken by lower item id); history items are removed from the
    ranking when ``exclude_seen``. Coverage is over ``model.n_items``. Protocol name: ``"full"``.
    """
    ks = _check_ks(ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k_max = max(ks)
    starts = range(0, len(evalset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate (full)", unit="batch")
    parts: list[np.ndarray] = []
    for start in starts:
        batch = evalset.histories[start : start + batch_size]
        ids, _ = model.recommend(batch, k=k_max, exclude_seen=exclude_seen, batch_size=batch_size,
                                 users=evalset.users[start : start + batch_size])
        parts.append(np.asarray(ids, dtype=np.int64))
    ranked = np.concatenate(parts) if parts else np.empty((0, k_max), dtype=np.int64)
    return _result("full", ranked, evalset, model.n_items, ks)


def _valid_items(items: np.ndarray, n_items: int) -> np.ndarray:
    items = np.asarray(items, dtype=np.int64)
    return items[(items >= 0) & (items < n_items)]


def sample_negatives(
    forbidden: np.ndarray,
    n_negatives: int,
    n_items: int,
    rng: np.random.Generator,
    cdf: np.ndarray | None = None,
) -> np.ndarray:
    """(n_negatives,) distinct item ids not in ``forbidden``, drawn without replacement.

    Uniform over allowed items when ``cdf`` is None; otherwise successive draws proportional to
    the weights whose cumulative sum is ``cdf`` (n_items,). Draws an i.i.d. stream and keeps the
    first new allowed items, which equals sampling without replacement from the allowed set.
    The caller must ensure enough allowed items (with positive weight) exist.
    """
    blocked = np.unique(np.asarray(forbidden, dtype=np.int64))
    blocked = blocked[(blocked >= 0) & (blocked < n_items)]
    chosen = np.empty(0, dtype=np.int64)
    for _ in range(8):
        need = n_negatives - len(chosen)
        size = 2 * (need + len(blocked)) + 16
        if cdf is None:
            draws = rng.integers(0, n_items, size=size)
        else:
            draws = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
            draws = draws[draws < n_items]  # guards a float rounding of u * total up to total
        draws = draws[~np.isin(draws, blocked) & ~np.isin(draws, chosen)]
        _, first = np.unique(draws, return_index=True)
        chosen = np.concatenate([chosen, draws[np.sort(first)][:need]])
        if len(chosen) == n_negatives:
            return chosen
    # Low acceptance (most mass is forbidden): finish exactly from the remaining allowed items.
    weights = np.ones(n_items) if cdf is None else np.diff(cdf, prepend=0.0)
    weights[blocked] = 0.0
    weights[chosen] = 0.0
    rest = rng.choice(n_items, size=n_negatives - len(chosen), replace=False, p=weights / weights.sum())
    return np.concatenate([chosen, rest.astype(np.int64)])


def rank_candidates(candidates: np.ndarray, scores: np.ndarray, is_target: np.ndarray) -> np.ndarray:
    """Candidates (m,) ordered by descending score; on equal scores non-targets come first.

    Pessimistic ranking: a target never wins a tie. NaN scores rank last (like ``-inf``).
    Remaining ties keep candidate order, so the result is deterministic.
    """
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(len(candidates)), np.asarray(is_target, dtype=bool), -s))
    return np.asarray(candidates, dtype=np.int64)[order]


def evaluate_sampled(
    model: Recommender,
    evalset: EvalSet,
    n_negatives: int = 100,
    strategy: Strategy = "uniform",
    item_counts: np.ndarray | None = None,
    ks: Sequence[int] = (5, 10, 20),
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> EvalResult:
    """Rank each user's targets among ``n_negatives`` sampled items and score that ranking.

    Negatives are distinct items in neither the user's history nor targets, drawn uniformly or
    (``strategy="popularity"``) proportionally to ``item_counts`` (n_items,), e.g.
    ``split.train_item_counts()``; items with count 0 are then never drawn. All distinct targets
    are candidates; targets never win ties (pessimistic). Users are sampled in order from one
    ``np.random.default_rng(seed)``, so results depend only on ``seed`` and the evalset, not on
    ``batch_size``. A cut-off larger than a user's candidate count simply sees all candidates.
    Protocol name: ``f"sampled-{strategy}-{n_negatives}"``.
    """
    ks = _check_ks(ks)
    n_items = model.n_items
    if isinstance(n_negatives, bool) or int(n_negatives) != n_negatives or n_negatives < 1:
        raise ValueError(f"n_negatives must be a positive integer, got {n_negatives!r}")
    n_negatives = int(n_negatives)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {STRATEGIES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cdf: np.ndarray | None = None
    positive = np.ones(n_items, dtype=bool)
    if strategy == "popularity":
        if item_counts is None:
            raise ValueError("strategy='popularity' needs item_counts (e.g. split.train_item_counts())")
        counts = np.asarray(item_counts, dtype=np.float64)
        if counts.shape != (n_items,):
            raise ValueError(f"item_counts must have shape ({n_items},), got {counts.shape}")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("item_counts must be finite and non-negative")
        if counts.sum() <= 0:
            raise ValueError("item_counts are all zero: nothing to sample by popularity")
        cdf = np.cumsum(counts)
        positive = counts > 0
    elif item_counts is not None:
        raise ValueError("item_counts is only used by strategy='popularity'")
    n_available_total = int(positive.sum())

    rng = np.random.default_rng(seed)
    candidates: list[np.ndarray] = []
    n_targets: list[int] = []
    for i in range(len(evalset)):
        raw_targets = np.asarray(evalset.targets[i], dtype=np.int64)
        raw_targets = raw_targets[raw_targets != PAD_ITEM]
        if ((raw_targets < 0) | (raw_targets >= n_items)).any():
            raise ValueError(f"user {int(evalset.users[i])}: target ids outside 0..{n_items - 1}")
        targets = np.unique(raw_targets)
        forbidden = np.union1d(_valid_items(evalset.histories[i], n_items), targets)
        n_allowed = n_available_total - int(positive[forbidden].sum())
        if n_allowed < n_negatives:
            raise ValueError(
                f"user {int(evalset.users[i])}: only {n_allowed} items can be negatives "
                f"(not in history/targets{', positive count' if cdf is not None else ''}), "
                f"need n_negatives={n_negatives}"
            )
        negatives = sample_negatives(forbidden, n_negatives, n_items, rng, cdf)
        candidates.append(np.concatenate([targets, negatives]))
        n_targets.append(len(targets))

    k_max = max(ks)
    ranked = np.full((len(evalset), k_max), PAD_ITEM, dtype=np.int64)
    starts = range(0, len(evalset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"evaluate (sampled-{strategy})", unit="batch")
    for start in starts:
        batch = [np.asarray(h, dtype=np.int64) for h in evalset.histories[start : start + batch_size]]
        scores = np.asarray(model.score(batch, evalset.users[start : start + batch_size]))
        if scores.shape != (len(batch), n_items):
            raise ValueError(f"model.score returned shape {scores.shape}, expected ({len(batch)}, {n_items})")
        for j in range(len(batch)):
            cand = candidates[start + j]
            is_target = np.arange(len(cand)) < n_targets[start + j]
            order = rank_candidates(cand, scores[j, cand], is_target)[:k_max]
            ranked[start + j, : len(order)] = order
    return _result(f"sampled-{strategy}-{n_negatives}", ranked, evalset, n_items, ks)


def evaluate_lists(
    ranked: np.ndarray,
    evalset: EvalSet,
    n_items: int,
    ks: Sequence[int] = (5, 10, 20),
    protocol: str = "generated",
) -> EvalResult:
    """Score lists a model generated directly: ``ranked`` (n_users, L), rows aligned with ``evalset``.

    Ids outside ``0..n_items-1`` (other than the empty slot ``-1``) are invalid and never hit;
    repeats of an item earn nothing. ``overall`` also gets ``"invalid_rate"`` and
    ``"duplicate_rate"`` (shares of filled slots over all lists).
    """
    ks = _check_ks(ks)
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2 or ranked.shape[0] != len(evalset):
        raise ValueError(f"ranked must be (n_users, L) with n_users == len(evalset) == {len(evalset)}")
    if max(ks) > ranked.shape[1]:
        raise ValueError(f"cut-off {max(ks)} exceeds the list length {ranked.shape[1]}")
    result = _result(protocol, ranked, evalset, n_items, ks)
    result.overall["invalid_rate"] = invalid_item_rate(ranked, n_items)
    result.overall["duplicate_rate"] = duplicate_rate(ranked)
    return result

"""Evaluation protocols (llmrec.eval.protocol) and reporting (llmrec.eval.report)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.data.splits import EvalSet, Split
from llmrec.eval.protocol import (
    EvalResult,
    evaluate_full,
    evaluate_lists,
    evaluate_sampled,
    rank_candidates,
    sample_negatives,
)
from llmrec.eval.report import (
    format_summary_table,
    format_table,
    read_metrics_json,
    summarize_seeds,
    write_metrics_json,
)
from llmrec.models.base import Recommender

LOG2 = math.log2


@dataclass
class _Config:
    pass


class LookupModel(Recommender):
    """Scores looked up by the history (as a tuple); unknown histories get ``default``."""

    name = "lookup"
    Config = _Config

    def __init__(self, default: np.ndarray, table: dict[tuple[int, ...], np.ndarray] | None = None) -> None:
        super().__init__(_Config(), len(default))
        self.default = np.asarray(default, dtype=np.float32)
        self.table = {k: np.asarray(v, dtype=np.float32) for k, v in (table or {}).items()}
        self.calls = 0

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        return {}

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        self.calls += 1
        rows = [self.table.get(tuple(int(x) for x in h), self.default) for h in histories]
        return np.stack(rows) if rows else np.empty((0, self.n_items), np.float32)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {}

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        pass


def oracle(evalset: EvalSet, n_items: int) -> LookupModel:
    """Scores each user's targets 1, everything else 0 (histories must be distinct)."""
    table = {}
    for h, t in zip(evalset.histories, evalset.targets, strict=True):
        row = np.zeros(n_items)
        row[t] = 1.0
        table[tuple(int(x) for x in h)] = row
    assert len(table) == len(evalset)
    return LookupModel(np.zeros(n_items), table)


def make_evalset(
    histories: list[list[int]], targets: list[list[int]], users: list[int] | None = None
) -> EvalSet:
    return EvalSet(
        users=np.asarray(users if users is not None else range(len(histories)), dtype=np.int64),
        histories=[np.asarray(h, dtype=np.int64) for h in histories],
        targets=[np.asarray(t, dtype=np.int64) for t in targets],
    )


# Global item order by score: 1, 2, 3, 4, 5, 0.
SCORES = np.array([0.1, 0.9, 0.8, 0.7, 0.6, 0.5])
EVALSET = make_evalset([[1], [2, 4]], [[3], [0, 5]], users=[10, 20])


# --- evaluate_full ---------------------------------------------------------------------------
def test_evaluate_full_hand_computed() -> None:
    res = evaluate_full(LookupModel(SCORES), EVALSET, ks=(1, 2, 4))
    assert res.protocol == "full" and res.ks == [1, 2, 4] and res.n_users == 2
    assert res.users.tolist() == [10, 20]
    # user 10 sees 2,3,4,5 (target 3 at rank 2); user 20 sees 1,3,5,0 (targets at ranks 3, 4).
    expected = {
        "hit_rate@1": [0, 0],
        "hit_rate@2": [1, 0],
        "precision@2": [1 / 2, 0],
        "precision@4": [1 / 4, 2 / 4],
        "recall@4": [1, 1],
        "mrr@4": [1 / 2, 1 / 3],
        "ndcg@2": [1 / LOG2(3), 0],
        "ndcg@4": [1 / LOG2(3), (1 / LOG2(4) + 1 / LOG2(5)) / (1 + 1 / LOG2(3))],
        "map@4": [1 / 2, (1 / 3 + 2 / 4) / 2],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(res.per_user[name], values, err_msg=name)
        assert res.overall[name] == pytest.approx(np.mean(values))
    assert res.overall["coverage@1"] == pytest.approx(2 / 6)  # items 2 and 1
    assert res.overall["coverage@4"] == pytest.approx(1.0)
    assert set(res.overall) == set(res.per_user) | {"coverage@1", "coverage@2", "coverage@4"}


def test_evaluate_full_history_items_excluded_only_when_asked() -> None:
    model = LookupModel(SCORES)
    excluded = evaluate_full(model, EVALSET, ks=(4,))
    included = evaluate_full(model, EVALSET, ks=(4,), exclude_seen=False)
    # Without exclusion both users see 1,2,3,4: user 10's target 3 is at rank 3, user 20 misses.
    np.testing.assert_allclose(included.per_user["mrr@4"], [1 / 3, 0])
    np.testing.assert_allclose(excluded.per_user["mrr@4"], [1 / 2, 1 / 3])
    # An item the user already has is never hit when excluded.
    repeat = make_evalset([[1, 2]], [[1]])
    assert evaluate_full(model, repeat, ks=(4,)).per_user["hit_rate@4"][0] == 0.0
    assert evaluate_full(model, repeat, ks=(1,), exclude_seen=False).per_user["hit_rate@1"][0] == 1.0


def test_evaluate_full_batching_and_progress_do_not_change_results() -> None:
    rng = np.random.default_rng(0)
    n_items = 30
    evalset = make_evalset(
        [rng.choice(n_items, 3, replace=False).tolist() for _ in range(7)],
        [rng.choice(n_items, 2, replace=False).tolist() for _ in range(7)],
    )
    model = LookupModel(rng.integers(0, 4, n_items).astype(float))  # many ties
    a = evaluate_full(model, evalset, ks=(5, 10))
    b = evaluate_full(model, evalset, ks=(5, 10), batch_size=2, progress=True)
    assert a.overall == b.overall
    for name in a.per_user:
        np.testing.assert_array_equal(a.per_user[name], b.per_user[name])


def test_evaluate_full_empty_evalset_and_bad_arguments() -> None:
    empty = make_evalset([], [])
    res = evaluate_full(LookupModel(SCORES), empty, ks=(2,))
    assert res.n_users == 0 and math.isnan(res.overall["ndcg@2"])
    with pytest.raises(ValueError, match="ks"):
        evaluate_full(LookupModel(SCORES), EVALSET, ks=())
    with pytest.raises(ValueError, match="positive"):
        evaluate_full(LookupModel(SCORES), EVALSET, ks=(0, 5))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_full(LookupModel(SCORES), EVALSET, batch_size=0)


# --- evaluate_sampled ------------------------------------------------------------------------
def random_evalset(seed: int, n_users: int = 12, n_items: int = 40) -> EvalSet:
    rng = np.random.default_rng(seed)
    items = [rng.choice(n_items, 6, replace=False) for _ in range(n_users)]
    # distinct histories (first item = user index) so that oracle lookups are unambiguous
    return make_evalset(
        [[u, *it[:3].tolist()] for u, it in enumerate(items)],
        [it[3 : 3 + 1 + u % 3].tolist() for u, it in enumerate(items)],
    )


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_sample_negatives_are_distinct_allowed_items(data: st.DataObject) -> None:
    n_items = data.draw(st.integers(2, 30))
    forbidden = np.asarray(sorted(data.draw(st.sets(st.integers(0, n_items - 1), max_size=n_items - 1))))
    n_neg = data.draw(st.integers(1, n_items - len(forbidden)))
    popularity = data.draw(st.booleans())
    cdf = None
    counts = np.ones(n_items)
    if popularity:
        counts = np.asarray(data.draw(st.lists(st.integers(0, 5), min_size=n_items, max_size=n_items)), float)
        allowed_positive = np.setdiff1d(np.flatnonzero(counts), forbidden)
        if len(allowed_positive) < n_neg:
            counts[np.setdiff1d(np.arange(n_items), forbidden)[:n_neg]] += 1
        cdf = np.cumsum(counts)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    neg = sample_negatives(forbidden, n_neg, n_items, rng, cdf)
    assert neg.dtype == np.int64 and len(neg) == n_neg == len(set(neg.tolist()))
    assert not set(neg.tolist()) & set(forbidden.tolist())
    assert ((neg >= 0) & (neg < n_items)).all()
    assert (counts[neg] > 0).all()


def test_sample_negatives_follow_the_weights() -> None:
    rng = np.random.default_rng(0)
    cdf = np.cumsum([1.0, 0.0, 0.0, 3.0])
    draws = np.array([sample_negatives(np.array([], np.int64), 1, 4, rng, cdf)[0] for _ in range(4000)])
    assert set(draws.tolist()) <= {0, 3}
    assert abs((draws == 3).mean() - 0.75) < 0.04
    uniform = np.array([sample_negatives(np.array([2]), 1, 4, rng)[0] for _ in range(3000)])
    assert set(uniform.tolist()) == {0, 1, 3}
    assert all(abs((uniform == i).mean() - 1 / 3) < 0.04 for i in (0, 1, 3))


def test_rank_candidates_is_pessimistic() -> None:
    cand = np.array([7, 8, 9, 4])
    ranked = rank_candidates(cand, np.array([1.0, 1.0, 2.0, np.nan]), np.array([True, False, False, False]))
    assert ranked.tolist() == [9, 8, 7, 4]


def test_evaluate_sampled_oracle_hits_everything() -> None:
    evalset = random_evalset(1)
    model = oracle(evalset, 40)
    for strategy, counts in (("uniform", None), ("popularity", np.arange(40) + 1)):
        res = evaluate_sampled(
            model, evalset, n_negatives=10, strategy=strategy, item_counts=counts, ks=(1, 3)
        )
        assert res.protocol == f"sampled-{strategy}-10"
        assert res.overall["hit_rate@1"] == 1.0 and res.overall["ndcg@3"] == pytest.approx(1.0)
        assert res.overall["recall@3"] == pytest.approx(1.0)


def test_evaluate_sampled_targets_lose_ties() -> None:
    evalset = make_evalset([[0], [1, 2]], [[3], [4]])
    res = evaluate_sampled(LookupModel(np.zeros(20)), evalset, n_negatives=5, ks=(5, 6))
    np.testing.assert_array_equal(res.per_user["hit_rate@5"], [0, 0])
    np.testing.assert_allclose(res.per_user["mrr@6"], [1 / 6, 1 / 6])
    # A cut-off beyond the candidate count sees every candidate.
    big = evaluate_sampled(LookupModel(np.zeros(20)), evalset, n_negatives=5, ks=(10,))
    np.testing.assert_allclose(big.per_user["recall@10"], [1, 1])


def test_evaluate_sampled_negatives_avoid_history_and_targets() -> None:
    """Allowed negatives tie with the targets (targets lose ties); history items score lowest.

    A sampled history item would fall behind a target, and a sampled target would be a hit
    inside the top 5: either makes hit_rate@5 positive.
    """
    n_items = 12
    histories = [[0, 1, 2], [3, 4]]
    evalset = make_evalset(histories, [[5, 6], [7]])
    table = {}
    for h in histories:
        row = np.zeros(n_items)
        row[h] = -10.0
        table[tuple(h)] = row
    model = LookupModel(np.zeros(n_items), table)
    res = evaluate_sampled(model, evalset, n_negatives=5, ks=(5, 7))
    np.testing.assert_array_equal(res.per_user["hit_rate@5"], [0, 0])
    np.testing.assert_array_equal(res.per_user["recall@7"], [1, 1])


def test_evaluate_sampled_is_deterministic_by_seed() -> None:
    evalset = random_evalset(2)
    model = LookupModel(np.random.default_rng(3).normal(size=40))
    a = evaluate_sampled(model, evalset, n_negatives=8, ks=(1, 5), seed=7)
    b = evaluate_sampled(model, evalset, n_negatives=8, ks=(1, 5), seed=7, batch_size=5)
    c = evaluate_sampled(model, evalset, n_negatives=8, ks=(1, 5), seed=8)
    for name in a.per_user:
        np.testing.assert_array_equal(a.per_user[name], b.per_user[name])
    assert any(not np.array_equal(a.per_user[n], c.per_user[n]) for n in a.per_user)


def test_evaluate_sampled_validates_arguments() -> None:
    model = LookupModel(np.zeros(10))
    evalset = make_evalset([[0]], [[1]])
    with pytest.raises(ValueError, match="n_negatives"):
        evaluate_sampled(model, evalset, n_negatives=0)
    with pytest.raises(ValueError, match="strategy"):
        evaluate_sampled(model, evalset, n_negatives=3, strategy="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="item_counts"):
        evaluate_sampled(model, evalset, n_negatives=3, strategy="popularity")
    with pytest.raises(ValueError, match="shape"):
        evaluate_sampled(model, evalset, n_negatives=3, strategy="popularity", item_counts=np.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        evaluate_sampled(model, evalset, n_negatives=3, strategy="popularity", item_counts=-np.ones(10))
    with pytest.raises(ValueError, match="only used"):
        evaluate_sampled(model, evalset, n_negatives=3, item_counts=np.ones(10))
    with pytest.raises(ValueError, match="only 8 items"):
        evaluate_sampled(model, evalset, n_negatives=9, ks=(1,))
    counts = np.zeros(10)
    counts[[0, 1, 5]] = 1  # only item 5 is a possible negative
    with pytest.raises(ValueError, match="only 1 items"):
        evaluate_sampled(model, evalset, n_negatives=2, strategy="popularity", item_counts=counts, ks=(1,))
    with pytest.raises(ValueError, match="target ids"):
        evaluate_sampled(model, make_evalset([[0]], [[10]]), n_negatives=2, ks=(1,))


# --- evaluate_lists --------------------------------------------------------------------------
def test_evaluate_lists_hand_computed() -> None:
    ranked = np.array([[3, 3, 99, -1], [0, 5, 1, 2]])
    res = evaluate_lists(ranked, EVALSET, n_items=6, ks=(2, 4), protocol="llm-gen")
    assert res.protocol == "llm-gen"
    np.testing.assert_allclose(res.per_user["precision@4"], [1 / 4, 2 / 4])
    np.testing.assert_allclose(res.per_user["mrr@2"], [1, 1])
    assert res.overall["invalid_rate"] == pytest.approx(1 / 7)
    assert res.overall["duplicate_rate"] == pytest.approx(1 / 7)
    assert res.overall["coverage@4"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="list length"):
        evaluate_lists(ranked, EVALSET, n_items=6, ks=(5,))
    with pytest.raises(ValueError, match="n_users"):
        evaluate_lists(ranked[:1], EVALSET, n_items=6, ks=(2,))


# --- report ----------------------------------------------------------------------------------
def test_summarize_seeds_against_hand_computation() -> None:
    out = summarize_seeds(
        [{"ndcg@10": 0.1, "hr": 1.0}, {"ndcg@10": 0.2, "hr": 1.0}, {"ndcg@10": 0.3, "hr": 1.0}]
    )
    # mean 0.2, sample sd 0.1, t(0.975, df=2) = 4.302653
    half = 4.302653 * 0.1 / math.sqrt(3)
    mean, low, high = out["ndcg@10"]
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2 - half, rel=1e-5)
    assert high == pytest.approx(0.2 + half, rel=1e-5)
    assert out["hr"] == pytest.approx((1.0, 1.0, 1.0))
    assert summarize_seeds([{"a": 0.5}]) == {"a": (0.5, 0.5, 0.5)}
    with pytest.raises(ValueError):
        summarize_seeds([])
    with pytest.raises(ValueError, match="metrics"):
        summarize_seeds([{"a": 0.5}, {"b": 0.5}])


def test_format_tables() -> None:
    table = format_table(
        {"pop": {"ndcg@10": 0.12345, "hr@10": float("nan")}, "sas": {"ndcg@10": 0.5}}, ["ndcg@10", "hr@10"]
    )
    assert table.splitlines() == [
        "| model | ndcg@10 | hr@10 |",
        "|---|---:|---:|",
        "| pop | 0.1235 | nan |",
        "| sas | 0.5000 | - |",
    ]
    summary = format_summary_table({"pop": {"ndcg@10": (0.2, 0.15, 0.25)}}, ["ndcg@10"])
    assert summary.splitlines()[-1] == "| pop | 0.2000 ± 0.0500 |"


def test_metrics_json_round_trip(tmp_path: Path) -> None:
    res = evaluate_full(LookupModel(SCORES), EVALSET, ks=(1, 4))
    res.per_user["ndcg@1"][1] = np.nan  # NaN survives as null
    res.overall["extra_metric"] = float("nan")
    path = tmp_path / "sub" / "metrics.json"
    write_metrics_json(path, res, {"model": "pop", "seed": np.int64(3), "loss": np.float32(0.5), "x": np.nan})
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left behind
    raw = json.loads(path.read_text())
    assert raw["users"] == [10, 20] and raw["per_user"]["ndcg@1"][1] is None
    assert raw["extra"] == {"model": "pop", "seed": 3, "loss": 0.5, "x": None}
    back, extra = read_metrics_json(path)
    assert extra["seed"] == 3
    assert back.protocol == res.protocol and back.ks == res.ks and back.n_users == res.n_users
    np.testing.assert_array_equal(back.users, res.users)
    assert back.overall.keys() == res.overall.keys()
    np.testing.assert_array_equal(list(back.overall.values()), list(res.overall.values()))
    for name, values in res.per_user.items():
        np.testing.assert_array_equal(back.per_user[name], values)
    again = EvalResult.from_json(json.loads(json.dumps(back.to_json(), allow_nan=False)))
    assert again.to_json() == back.to_json()

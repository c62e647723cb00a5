"""Metrics in llmrec.eval.metrics and top_k in llmrec.models.base against plain-Python references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.eval.metrics import (
    METRIC_FUNCTIONS,
    METRICS,
    catalog_coverage,
    duplicate_rate,
    first_occurrence,
    hits_matrix,
    invalid_item_rate,
    mean_ndcg,
    ranking_metrics,
)
from llmrec.models.base import top_k

SETTINGS = settings(max_examples=60, deadline=None)
NAN = float("nan")


# --- plain-Python references -----------------------------------------------------------------
def ref_user(lst: list[int], truth: list[int], k: int) -> dict[str, float]:
    """All six metrics of one ranked list at cut-off k, by a direct loop."""
    relevant = {t for t in truth if t >= 0}
    if not relevant:
        return {name: NAN for name in METRICS}
    seen: set[int] = set()
    hit_positions: list[int] = []  # 0-based positions of first occurrences of relevant items
    for pos, item in enumerate(lst[:k]):
        if item >= 0 and item in relevant and item not in seen:
            hit_positions.append(pos)
        seen.add(item)
    n_hits = len(hit_positions)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    ap = sum((j + 1) / (pos + 1) for j, pos in enumerate(hit_positions)) / min(len(relevant), k)
    return {
        "precision": n_hits / k,
        "recall": n_hits / len(relevant),
        "hit_rate": float(n_hits > 0),
        "mrr": 1 / (hit_positions[0] + 1) if hit_positions else 0.0,
        "ndcg": sum(1 / math.log2(pos + 2) for pos in hit_positions) / ideal,
        "map": ap,
    }


def ref_first_occurrence(lists: list[list[int]]) -> list[list[bool]]:
    out = []
    for row in lists:
        seen: set[int] = set()
        flags = []
        for item in row:
            flags.append(item not in seen)
            seen.add(item)
        out.append(flags)
    return out


def ref_coverage(lists: list[list[int]], n_items: int, k: int | None) -> float:
    items = {x for row in lists for x in row[:k] if 0 <= x < n_items}
    return len(items) / n_items if n_items else 0.0


def ref_invalid_rate(lists: list[list[int]], n_items: int) -> float:
    filled = [x for row in lists for x in row if x != -1]
    return sum(1 for x in filled if x < 0 or x >= n_items) / len(filled) if filled else 0.0


def ref_duplicate_rate(lists: list[list[int]]) -> float:
    n_filled = n_dup = 0
    for row in lists:
        for j, item in enumerate(row):
            if item != -1:
                n_filled += 1
                n_dup += item in row[:j]
    return n_dup / n_filled if n_filled else 0.0


# --- random inputs ---------------------------------------------------------------------------
@st.composite
def ranked_and_targets(draw: st.DrawFn, allow_empty_truth: bool = True) -> tuple[int, list, list]:
    """(n_items, lists, targets): lists hold -1 slots, duplicates, negative and too-large ids."""
    n_items = draw(st.integers(1, 8))
    n_users = draw(st.integers(1, 5))
    length = draw(st.integers(1, 8))
    item = st.integers(-3, n_items + 2)
    lists = [draw(st.lists(item, min_size=length, max_size=length)) for _ in range(n_users)]
    min_truth = 0 if allow_empty_truth else 1
    targets = [draw(st.lists(st.integers(0, n_items - 1), min_size=min_truth, max_size=5)) for _ in lists]
    return n_items, lists, targets


def as_arrays(lists: list[list[int]], targets: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    return np.asarray(lists, dtype=np.int64), [np.asarray(t, dtype=np.int64) for t in targets]


# --- property tests --------------------------------------------------------------------------
@SETTINGS
@given(ranked_and_targets())
def test_ranking_metrics_match_reference(case: tuple[int, list, list]) -> None:
    _, lists, targets = case
    ranked, target_arrays = as_arrays(lists, targets)
    ks = list(range(1, ranked.shape[1] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ranking_metrics(ranked, target_arrays, ks)
    assert set(got) == {f"{m}@{k}" for m in METRICS for k in ks}
    for k in ks:
        expected = [ref_user(row, truth, k) for row, truth in zip(lists, targets, strict=True)]
        for name in METRICS:
            values = got[f"{name}@{k}"]
            assert values.shape == (len(lists),)
            np.testing.assert_allclose(values, [e[name] for e in expected], rtol=1e-12, atol=1e-12)
            finite = values[~np.isnan(values)]
            assert ((finite >= 0) & (finite <= 1)).all()


@SETTINGS
@given(ranked_and_targets(allow_empty_truth=False), st.integers(1, 10))
def test_metric_functions_match_reference_any_k(case: tuple[int, list, list], k: int) -> None:
    """Direct calls, including k beyond the list length (missing slots count as misses)."""
    _, lists, targets = case
    hits, n_rel = hits_matrix(*as_arrays(lists, targets))
    for name, fn in METRIC_FUNCTIONS.items():
        expected = [ref_user(row, truth, k)[name] for row, truth in zip(lists, targets, strict=True)]
        np.testing.assert_allclose(fn(hits, n_rel, k), expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(ranked_and_targets())
def test_list_level_metrics_match_reference(case: tuple[int, list, list]) -> None:
    n_items, lists, _ = case
    ranked = np.asarray(lists, dtype=np.int64)
    assert first_occurrence(ranked).tolist() == ref_first_occurrence(lists)
    for k in [None, *range(1, ranked.shape[1] + 2)]:
        assert catalog_coverage(ranked, n_items, k) == pytest.approx(ref_coverage(lists, n_items, k))
    assert invalid_item_rate(ranked, n_items) == pytest.approx(ref_invalid_rate(lists, n_items))
    assert duplicate_rate(ranked) == pytest.approx(ref_duplicate_rate(lists))
    for value in (
        catalog_coverage(ranked, n_items),
        invalid_item_rate(ranked, n_items),
        duplicate_rate(ranked),
    ):
        assert 0.0 <= value <= 1.0


@SETTINGS
@given(st.data())
def test_perfect_list_has_ndcg_map_mrr_one(data: st.DataObject) -> None:
    n_items = data.draw(st.integers(2, 12))
    truth = data.draw(st.sets(st.integers(0, n_items - 1), min_size=1))
    relevant = data.draw(st.permutations(sorted(truth)))
    rest = data.draw(st.permutations([i for i in range(n_items) if i not in truth]))
    ranked = np.asarray([list(relevant) + list(rest)], dtype=np.int64)
    ks = list(range(1, n_items + 1))
    got = ranking_metrics(ranked, [np.asarray(sorted(truth))], ks)
    for k in ks:
        for name in ("ndcg", "map", "mrr", "hit_rate"):
            assert got[f"{name}@{k}"][0] == pytest.approx(1.0)
        assert got[f"recall@{k}"][0] == pytest.approx(min(len(truth), k) / len(truth))


# --- hand-computed cases ---------------------------------------------------------------------
def test_hand_computed_example() -> None:
    got = ranking_metrics(np.array([[3, 1, 2]]), [np.array([1, 2])], ks=[1, 2, 3])
    log2 = math.log2
    assert got["precision@3"][0] == pytest.approx(2 / 3)
    assert got["recall@3"][0] == pytest.approx(1.0)
    assert got["hit_rate@3"][0] == pytest.approx(1.0)
    assert got["mrr@3"][0] == pytest.approx(1 / 2)
    assert got["ndcg@3"][0] == pytest.approx((1 / log2(3) + 1 / log2(4)) / (1 + 1 / log2(3)))
    assert got["map@3"][0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # At k=1 the only slot is a miss; at k=2 one of two relevant items is found.
    assert got["hit_rate@1"][0] == 0.0 and got["mrr@1"][0] == 0.0 and got["ndcg@1"][0] == 0.0
    assert got["precision@2"][0] == pytest.approx(1 / 2)
    assert got["recall@2"][0] == pytest.approx(1 / 2)
    assert got["ndcg@2"][0] == pytest.approx((1 / log2(3)) / (1 + 1 / log2(3)))
    assert got["map@2"][0] == pytest.approx((1 / 2) / 2)


def test_duplicated_relevant_item_counts_once() -> None:
    got = ranking_metrics(np.array([[1, 1, 1]]), [np.array([1, 2])], ks=[3])
    assert got["precision@3"][0] == pytest.approx(1 / 3)
    assert got["recall@3"][0] == pytest.approx(1 / 2)
    assert got["map@3"][0] == pytest.approx(1 / 2)
    assert got["ndcg@3"][0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert duplicate_rate(np.array([[1, 1, 1]])) == pytest.approx(2 / 3)


def test_duplicated_target_counts_once() -> None:
    got = ranking_metrics(np.array([[5, 4]]), [np.array([5, 5, -1])], ks=[2])
    assert got["recall@2"][0] == 1.0 and got["ndcg@2"][0] == 1.0 and got["map@2"][0] == 1.0


def test_empty_truth_gives_nan_with_warning() -> None:
    ranked = np.array([[0, 1], [1, 0]])
    targets = [np.array([1]), np.array([], dtype=np.int64)]
    with pytest.warns(UserWarning, match="no relevant items"):
        got = ranking_metrics(ranked, targets, ks=[1, 2])
    for values in got.values():
        assert not np.isnan(values[0]) and np.isnan(values[1])
    hits, n_rel = hits_matrix(ranked, targets)
    for fn in METRIC_FUNCTIONS.values():
        with pytest.warns(UserWarning, match="no relevant items"):
            assert np.isnan(fn(hits, n_rel, 2)[1])


def test_no_warning_when_every_user_has_truth() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranking_metrics(np.array([[0, 1]]), [np.array([1])], ks=[2])


def test_empty_list_scores_zero() -> None:
    targets = [np.array([0, 1])]
    got = ranking_metrics(np.full((1, 3), -1), targets, ks=[1, 3])
    assert all(v[0] == 0.0 for v in got.values())
    assert catalog_coverage(np.full((1, 3), -1), 4) == 0.0
    assert invalid_item_rate(np.full((1, 3), -1), 4) == 0.0
    assert duplicate_rate(np.full((1, 3), -1)) == 0.0


def test_zero_width_list_scores_zero() -> None:
    hits, n_rel = hits_matrix(np.empty((2, 0), dtype=np.int64), [np.array([1]), np.array([2])])
    for fn in METRIC_FUNCTIONS.values():
        np.testing.assert_array_equal(fn(hits, n_rel, 3), [0.0, 0.0])


def test_invalid_ids_never_hit_and_are_counted() -> None:
    ranked = np.array([[7, -2, 0, -1]])
    got = ranking_metrics(ranked, [np.array([0])], ks=[4])
    assert got["mrr@4"][0] == pytest.approx(1 / 3)
    assert invalid_item_rate(ranked, n_items=5) == pytest.approx(2 / 3)
    assert catalog_coverage(ranked, n_items=5) == pytest.approx(1 / 5)


def test_bad_shapes_and_cutoffs_raise() -> None:
    with pytest.raises(ValueError, match="cut-off"):
        ranking_metrics(np.array([[0, 1]]), [np.array([1])], ks=[3])
    with pytest.raises(ValueError, match="cut-off"):
        ranking_metrics(np.array([[0, 1]]), [np.array([1])], ks=[0])
    with pytest.raises(ValueError, match="n_users"):
        hits_matrix(np.array([[0, 1]]), [np.array([1]), np.array([0])])


# --- top_k -----------------------------------------------------------------------------------
def ref_top_k(row: list[float], k: int, exclude: set[int]) -> list[int]:
    rankable = [i for i, s in enumerate(row) if i not in exclude and not math.isnan(s) and s != -math.inf]
    best = sorted(rankable, key=lambda i: (-row[i], i))[:k]
    return best + [-1] * (k - len(best))


def test_top_k_ties_broken_by_lower_id() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
    ids, vals = top_k(scores, 2)
    assert ids.tolist() == [[1, 2]] and vals.tolist() == [[2.0, 2.0]]
    ids, _ = top_k(scores, 5)  # the full-sort branch
    assert ids.tolist() == [[1, 2, 3, 0, 4]]


def test_top_k_exclusion_and_padding() -> None:
    scores = np.array([[0.5, 0.1, 0.9, 0.3], [0.0, 0.0, 0.0, 0.0]])
    ids, vals = top_k(scores, 3, [np.array([2, 0]), np.array([], dtype=np.int64)])
    assert ids.tolist() == [[3, 1, -1], [0, 1, 2]]
    assert vals[0, 2] == -np.inf and vals.dtype == np.float32 and ids.dtype == np.int64
    ids, vals = top_k(np.array([[1.0, np.nan, 3.0]]), 5)  # k > n_items, NaN is not rankable
    assert ids.tolist() == [[2, 0, -1, -1, -1]]
    assert np.isneginf(vals[0, 2:]).all()


def test_top_k_does_not_modify_input() -> None:
    scores = np.array([[0.5, 0.1, 0.9]], dtype=np.float32)
    top_k(scores, 2, [np.array([2])])
    np.testing.assert_array_equal(scores, np.array([[0.5, 0.1, 0.9]], dtype=np.float32))


@SETTINGS
@given(st.data())
def test_top_k_matches_reference_and_is_batch_independent(data: st.DataObject) -> None:
    n, n_items = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 9))
    k = data.draw(st.integers(1, n_items + 3))
    score = st.sampled_from([0.0, 1.0, 2.0, 3.0, -math.inf, math.nan])  # many ties
    rows = [data.draw(st.lists(score, min_size=n_items, max_size=n_items)) for _ in range(n)]
    exclude = [sorted(data.draw(st.sets(st.integers(0, n_items - 1)))) for _ in range(n)]
    scores = np.asarray(rows, dtype=np.float64)
    excl = [np.asarray(e, dtype=np.int64) for e in exclude]
    ids, vals = top_k(scores, k, excl)
    assert ids.shape == vals.shape == (n, k)
    for i in range(n):
        assert ids[i].tolist() == ref_top_k(rows[i], k, set(exclude[i]))
        filled = ids[i] >= 0
        np.testing.assert_array_equal(vals[i, filled], scores[i, ids[i, filled]])
        assert np.isneginf(vals[i, ~filled]).all()
    split = data.draw(st.integers(1, n))
    ids_a, _ = top_k(scores[:split], k, excl[:split])
    ids_b, _ = top_k(scores[split:], k, excl[split:]) if split < n else (np.empty((0, k), np.int64), None)
    np.testing.assert_array_equal(np.concatenate([ids_a, ids_b]), ids)


def test_top_k_keeps_positive_infinite_scores() -> None:
    ids, _ = top_k(np.array([[0.0, np.inf, 1.0]]), 2)
    assert ids.tolist() == [[1, 2]]


def test_mean_ndcg_by_hand_skips_users_without_targets() -> None:
    ranked = np.array([[5, 1, 2], [3, 4, 0], [7, 8, 9]])
    targets = [np.array([1]), np.array([0, 3]), np.array([], dtype=np.int64)]
    # user 0: hit at rank 2 -> 1/log2(3); user 1: hits at ranks 1 and 3 over ideal ranks 1 and 2
    u0 = 1 / math.log2(3)
    u1 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    with pytest.warns(UserWarning, match="no relevant items"):
        assert mean_ndcg(ranked, targets, k=3) == pytest.approx((u0 + u1) / 2)
    assert mean_ndcg(ranked[:2], targets[:2], k=1) == pytest.approx(0.5)  # only user 1 hits at rank 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=60))
def test_popularity_buckets_split_interactions_in_thirds_by_popularity(counts: list[int]) -> None:
    from llmrec.eval.metrics import popularity_buckets

    c = np.array(counts)
    b = popularity_buckets(c)
    assert b.shape == c.shape and set(b.tolist()) <= {0, 1, 2}
    for lo in range(3):  # a more popular item never sits in a less popular bucket
        for hi in range(lo + 1, 3):
            if (b == lo).any() and (b == hi).any():
                assert c[b == lo].min() >= c[b == hi].max()
    total = c.sum()
    if total:
        for k in range(3):  # the interactions before bucket k's first item are at most k/3 of all, plus one item
            share_before = c[b < k].sum() / total
            assert share_before <= k / 3 + c.max() / total + 1e-12

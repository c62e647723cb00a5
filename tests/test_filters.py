"""Property tests of the pure interaction filters in llmrec.data.filters."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.data.filters import first_occurrence_mask, kcore_mask

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def interactions(draw, max_users: int = 12, max_items: int = 12, max_rows: int = 80):
    """(users, items) int64 arrays of equal length, repeated pairs allowed."""
    n_users = draw(st.integers(1, max_users))
    n_items = draw(st.integers(1, max_items))
    n = draw(st.integers(0, max_rows))
    users = draw(st.lists(st.integers(0, n_users - 1), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(0, n_items - 1), min_size=n, max_size=n))
    return np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)


def reference_kcore(users: np.ndarray, items: np.ndarray, k_user: int, k_item: int) -> np.ndarray:
    """Plain loop: drop one offending row set at a time until every count meets its threshold."""
    alive = set(range(len(users)))
    changed = True
    while changed:
        changed = False
        u_count = Counter(int(users[r]) for r in alive)
        i_count = Counter(int(items[r]) for r in alive)
        for r in sorted(alive):
            if u_count[int(users[r])] < k_user or i_count[int(items[r])] < k_item:
                alive.discard(r)
                changed = True
                break  # recount after every single removal: the slowest, most obvious loop
    mask = np.zeros(len(users), dtype=bool)
    mask[sorted(alive)] = True
    return mask


def satisfies(users: np.ndarray, items: np.ndarray, mask: np.ndarray, k_user: int, k_item: int) -> bool:
    u_count = Counter(users[mask].tolist())
    i_count = Counter(items[mask].tolist())
    return all(c >= k_user for c in u_count.values()) and all(c >= k_item for c in i_count.values())


thresholds = st.integers(0, 4)


@SETTINGS
@given(interactions(), thresholds, thresholds)
def test_kcore_equals_reference_loop(data, k_user, k_item):
    users, items = data
    got = kcore_mask(users, items, k_user, k_item)
    assert got.dtype == bool and got.shape == users.shape
    np.testing.assert_array_equal(got, reference_kcore(users, items, k_user, k_item))


@SETTINGS
@given(interactions(), thresholds, thresholds)
def test_kcore_kept_rows_meet_thresholds(data, k_user, k_item):
    users, items = data
    keep = kcore_mask(users, items, k_user, k_item)
    assert satisfies(users, items, keep, k_user, k_item)


@SETTINGS
@given(interactions(), thresholds, thresholds)
def test_kcore_is_idempotent_fixed_point(data, k_user, k_item):
    users, items = data
    keep = kcore_mask(users, items, k_user, k_item)
    # Fixed point: the filter keeps every row of its own result.
    again = kcore_mask(users[keep], items[keep], k_user, k_item)
    assert again.all()
    # Idempotence on the full arrays: re-filtering a masked copy changes nothing.
    idx = np.flatnonzero(keep)
    twice = np.zeros_like(keep)
    twice[idx[kcore_mask(users[idx], items[idx], k_user, k_item)]] = True
    np.testing.assert_array_equal(twice, keep)


@SETTINGS
@given(interactions(max_rows=50), st.integers(1, 3), st.integers(1, 3), st.integers(0, 20))
def test_kcore_contains_any_planted_core(noise, k_user, k_item, offset):
    """Maximality: a block in which every user has k_user rows and every item k_item rows
    satisfies the constraints by itself, so the k-core (the largest such set) must contain it."""
    n_block_users, n_block_items = k_item, k_user  # complete bipartite block
    bu, bi = np.meshgrid(np.arange(n_block_users), np.arange(n_block_items), indexing="ij")
    block_users = bu.ravel() + offset
    block_items = bi.ravel() + offset
    users = np.concatenate([noise[0], block_users])
    items = np.concatenate([noise[1], block_items])
    perm = np.random.default_rng(offset).permutation(len(users))
    users, items = users[perm], items[perm]
    in_block = np.zeros(len(users), dtype=bool)
    in_block[np.argsort(perm)[len(noise[0]):]] = True
    assert satisfies(users, items, in_block, k_user, k_item)
    keep = kcore_mask(users, items, k_user, k_item)
    assert keep[in_block].all()
    np.testing.assert_array_equal(keep, reference_kcore(users, items, k_user, k_item))


@SETTINGS
@given(interactions(), thresholds, thresholds)
def test_kcore_no_removed_row_can_be_added_back(data, k_user, k_item):
    """Maximality, checked directly: the result plus all rows of any single removed user
    (or item) never satisfies the constraints, otherwise the result was not the largest."""
    users, items = data
    keep = kcore_mask(users, items, k_user, k_item)
    for u in np.unique(users[~keep]):
        trial = keep | (users == u)
        assert not satisfies(users, items, trial, k_user, k_item)
    for i in np.unique(items[~keep]):
        trial = keep | (items == i)
        assert not satisfies(users, items, trial, k_user, k_item)


def test_kcore_cascade_by_hand():
    # u0: a b | u1: a b | u2: a c | u3: c d | u4: d  -> with k=2 the removal cascades
    # u4 -> d -> u3 -> c -> u2, leaving the 2x2 block {u0, u1} x {a, b}.
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
    items = np.array([0, 1, 0, 1, 0, 2, 2, 3, 3])
    keep = kcore_mask(users, items, 2, 2)
    np.testing.assert_array_equal(keep, [True, True, True, True, False, False, False, False, False])
    assert kcore_mask(users, items, 3, 3).sum() == 0
    assert kcore_mask(users, items, 0, 0).all()
    # Asymmetric thresholds: users need 2, items need 1 -> only u4 goes.
    np.testing.assert_array_equal(kcore_mask(users, items, 2, 1), users != 4)


def test_kcore_edge_cases():
    assert kcore_mask(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 5, 5).shape == (0,)
    with pytest.raises(ValueError):
        kcore_mask(np.array([0, 1]), np.array([0]), 1, 1)
    # Repeated rows count individually.
    assert kcore_mask(np.array([7, 7]), np.array([3, 3]), 2, 2).all()


def reference_first(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    seen: set[tuple[int, int]] = set()
    mask = np.zeros(len(users), dtype=bool)
    for r, pair in enumerate(zip(users.tolist(), items.tolist(), strict=True)):
        if pair not in seen:
            seen.add(pair)
            mask[r] = True
    return mask


@SETTINGS
@given(interactions(max_users=6, max_items=6))
def test_first_occurrence_keeps_the_earliest_row_of_each_pair(data):
    users, items = data
    keep = first_occurrence_mask(users, items)
    assert keep.dtype == bool and keep.shape == users.shape
    pairs = list(zip(users.tolist(), items.tolist(), strict=True))
    kept_pairs = [p for p, k in zip(pairs, keep, strict=True) if k]
    # Exactly one kept row per distinct pair...
    assert len(kept_pairs) == len(set(kept_pairs)) == len(set(pairs))
    # ...and it is the earliest row of that pair.
    for r in np.flatnonzero(keep):
        assert pairs.index(pairs[r]) == r
    np.testing.assert_array_equal(keep, reference_first(users, items))


def test_first_occurrence_large_codes_do_not_collide():
    # Keys are built as user * (max_item + 1) + item: distinct pairs must stay distinct.
    users = np.array([0, 1, 0, 1, 2**20], dtype=np.int64)
    items = np.array([2**20, 0, 2**20, 0, 5], dtype=np.int64)
    np.testing.assert_array_equal(first_occurrence_mask(users, items), [True, True, False, False, True])
    assert first_occurrence_mask(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (0,)

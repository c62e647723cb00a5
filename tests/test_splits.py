"""Splits never leak: training data never holds a user's validation or test interactions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.data.splits import (
    EvalSet,
    Split,
    leave_one_out,
    next_k_examples,
    pad_targets,
    ratio,
    temporal,
)

N_ITEMS = 30

sequences_st = st.lists(st.lists(st.integers(0, N_ITEMS - 1), min_size=0, max_size=15), min_size=1, max_size=12)


def positions(split: Split, seqs: list[list[int]]) -> None:
    """Shared leakage checks: train is a prefix; eval histories end before their targets."""
    for u, seq in enumerate(seqs):
        seq = np.asarray(seq, dtype=np.int64)
        train = split.train[u]
        np.testing.assert_array_equal(train, seq[: len(train)])
    for es in (split.valid, split.test):
        for u, h, t in zip(es.users, es.histories, es.targets, strict=True):
            seq = np.asarray(seqs[u], dtype=np.int64)
            assert len(t) >= 1
            # history + targets is a contiguous chronological slice starting at the beginning
            np.testing.assert_array_equal(np.concatenate([h, t]), seq[: len(h) + len(t)])
            # no training data beyond the start of this period
            assert len(split.train[u]) <= len(h)


@given(sequences_st)
@settings(max_examples=80, deadline=None)
def test_leave_one_out_no_leakage(seqs: list[list[int]]) -> None:
    split = leave_one_out([np.asarray(s) for s in seqs], N_ITEMS)
    positions(split, seqs)
    for u, h, t in zip(split.test.users, split.test.histories, split.test.targets, strict=True):
        assert len(t) == 1 and len(h) == len(seqs[u]) - 1
        assert len(split.train[u]) == len(seqs[u]) - 2  # train holds neither valid nor test item
    for u, h, t in zip(split.valid.users, split.valid.histories, split.valid.targets, strict=True):
        np.testing.assert_array_equal(h, split.train[u])
        assert t[0] == seqs[u][-2]
    assert set(split.test.users) == {u for u, s in enumerate(seqs) if len(s) >= 3}


@given(sequences_st, st.floats(0.05, 0.45), st.floats(0.05, 0.45))
@settings(max_examples=80, deadline=None)
def test_ratio_no_leakage(seqs: list[list[int]], vf: float, tf: float) -> None:
    split = ratio([np.asarray(s) for s in seqs], N_ITEMS, vf, tf)
    positions(split, seqs)
    for u, h, t in zip(split.test.users, split.test.histories, split.test.targets, strict=True):
        assert len(split.train[u]) + len(t) <= len(seqs[u])
        # test targets are the user's last items
        np.testing.assert_array_equal(t, np.asarray(seqs[u])[len(seqs[u]) - len(t) :])


@given(st.lists(st.lists(st.integers(0, 100), min_size=0, max_size=12), min_size=1, max_size=10),
       st.integers(0, 100), st.integers(0, 100))
@settings(max_examples=80, deadline=None)
def test_temporal_never_trains_on_the_future(times: list[list[int]], a: int, b: int) -> None:
    valid_start, test_start = min(a, b), max(a, b)
    ts = [np.sort(np.asarray(t, dtype=np.int64)) for t in times]
    seqs = [np.arange(len(t)) % N_ITEMS for t in ts]
    split = temporal(seqs, ts, N_ITEMS, valid_start, test_start)
    for u, train in enumerate(split.train):
        assert (ts[u][: len(train)] < valid_start).all()
        assert len(train) == int((ts[u] < valid_start).sum())
    for es, lo, hi in ((split.valid, valid_start, test_start), (split.test, test_start, 10**9)):
        for u, h, t in zip(es.users, es.histories, es.targets, strict=True):
            target_times = ts[u][len(h) : len(h) + len(t)]
            assert ((target_times >= lo) & (target_times < hi)).all()
            assert (ts[u][: len(h)] < lo).all()
            assert len(h) >= 1


def test_temporal_rejects_bad_cuts() -> None:
    with pytest.raises(ValueError, match="valid_start"):
        temporal([np.arange(3)], [np.arange(3)], N_ITEMS, 5, 2)


def test_leave_one_out_hand_example() -> None:
    split = leave_one_out([np.array([1, 2, 3, 4]), np.array([5, 6])], N_ITEMS)
    assert split.train[0].tolist() == [1, 2] and split.train[1].tolist() == [5, 6]
    assert split.valid.users.tolist() == [0] and split.valid.targets[0].tolist() == [3]
    assert split.test.histories[0].tolist() == [1, 2, 3] and split.test.targets[0].tolist() == [4]


@given(st.lists(st.integers(0, 9), max_size=12), st.integers(1, 10),
       st.sampled_from(["repeat", "pad-token", "none"]))
def test_pad_targets(targets: list[int], k: int, padding: str) -> None:
    out = pad_targets(np.asarray(targets, dtype=np.int64), k, padding)  # type: ignore[arg-type]
    head = targets[:k]
    assert out[: len(head)].tolist() == head
    if padding == "none" or not targets and padding == "repeat":
        assert len(out) == len(head)
    else:
        assert len(out) == k
    if padding == "pad-token":
        assert (out[len(head) :] == -1).all()
    if padding == "repeat" and targets:
        assert set(out.tolist()) <= set(head)
        assert out.tolist() == [head[i % len(head)] for i in range(k)]


def test_pad_targets_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="padding"):
        pad_targets(np.array([1]), 3, "zeros")  # type: ignore[arg-type]


@given(sequences_st, st.integers(1, 10), st.sampled_from(["repeat", "pad-token", "none"]))
@settings(max_examples=60, deadline=None)
def test_next_k_examples_from_train_never_see_eval_items(seqs: list[list[int]], k: int, padding: str) -> None:
    split = leave_one_out([np.asarray(s) for s in seqs], N_ITEMS)
    users, lengths, targets = next_k_examples(split.train, k, padding)  # type: ignore[arg-type]
    for u, n, t in zip(users, lengths, targets, strict=True):
        train = split.train[u]
        assert 1 <= n < len(train)
        following = train[n : n + k]  # the true next items, all inside the training sequence
        assert t[: len(following)].tolist() == following.tolist()
        rest = t[len(following) :]
        if padding == "pad-token":
            assert (rest == -1).all()
        elif padding == "repeat":
            assert set(rest.tolist()) <= set(following.tolist())
        assert len(t) == (len(following) if padding == "none" else k)
    assert len(users) == sum(max(len(s) - 1, 0) for s in split.train)


def test_evalset_first_k_and_subset() -> None:
    es = EvalSet(np.array([3, 4]), [np.array([1]), np.array([2])], [np.arange(12), np.array([7])])
    assert [len(t) for t in es.first_k_targets(10).targets] == [10, 1]
    assert es.subset([1]).users.tolist() == [4]
    with pytest.raises(ValueError):
        EvalSet(np.array([1]), [], [])


def test_feedback_of_a_history_is_its_prefix_of_the_users_sequence() -> None:
    from llmrec.data.splits import Feedback

    seqs = [np.array([3, 1, 2]), np.array([0, 4])]
    fb = Feedback(seqs, [np.array([5.0, 4.0, np.nan], np.float32), np.array([1.0, 2.0], np.float32)],
                  [["a", "b", None], ["c", "d"]])
    r, v = fb.of(0, np.array([3, 1]))
    assert r is not None and list(r) == [5.0, 4.0] and v == ["a", "b"]
    assert fb.of(0, np.array([1, 3])) == (None, None)  # not the user's recorded order
    assert fb.of(1, np.array([0, 4, 9])) == (None, None)  # longer than the record
    assert fb.of(7, np.array([0])) == (None, None)  # unknown user
    split = leave_one_out(seqs, 5)
    assert split.with_feedback(fb).feedback is fb
    with pytest.raises(ValueError, match="covers 2 users"):
        leave_one_out(seqs + [np.array([1])], 5).with_feedback(fb)


@given(size=st.integers(0, 30), n=st.integers(0, 40), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_evalset_sample_draws_distinct_users_in_order(size: int, n: int, seed: int) -> None:
    users = np.arange(size, dtype=np.int64) * 3
    es = EvalSet(users, [np.array([u]) for u in users], [np.array([u + 1]) for u in users])
    out = es.sample(n, np.random.default_rng(seed))
    if n == 0 or n >= size:
        assert out is es  # nothing to draw: the whole set
        return
    assert len(out) == n and len(set(out.users.tolist())) == n
    assert np.all(np.diff(out.users) > 0) and np.isin(out.users, users).all()  # original order, real users
    for u, h, t in zip(out.users, out.histories, out.targets, strict=True):  # rows stay aligned
        assert h[0] == u and t[0] == u + 1
    again = es.sample(n, np.random.default_rng(seed))
    np.testing.assert_array_equal(again.users, out.users)  # the generator decides the draw

"""The shared early-stopping helper: best-so-far, patience, min_rounds (property-tested)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmrec.models.train import EarlyStopping


@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=40),
       st.integers(1, 5), st.integers(0, 10))
def test_early_stopping_matches_a_reference(scores: list[float], patience: int, min_rounds: int) -> None:
    es = EarlyStopping(patience, min_rounds)
    best, best_at, bad = -1.0, 0, 0
    for at, s in enumerate(scores, start=1):
        improved = es.update(s, at, lambda at=at: {"round": at})
        if s > best:
            best, best_at, bad = s, at, 0
        else:
            bad += 1
        assert improved == (bad == 0)
        assert (es.best, es.best_at, es.bad) == (best, best_at, bad)
        assert es.best_state == {"round": best_at}  # the snapshot of the best round is kept
        assert es.should_stop(at) == (bad >= patience and at >= min_rounds)
        if at < min_rounds:
            assert not es.should_stop(at)
    assert es.best == max(scores)


def test_position_round_trip() -> None:
    es = EarlyStopping(3)
    es.update(0.2, 5, dict)
    es.update(0.1, 6, dict)
    other = EarlyStopping(3)
    other.restore_position(es.position())
    assert (other.best, other.best_at, other.bad) == (0.2, 5, 1)
    assert not other.should_stop(6)
    other.update(0.0, 7, dict)
    other.update(0.0, 8, dict)
    assert other.should_stop(8)

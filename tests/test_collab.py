"""Collaborative item vectors (SASRec embeddings) and the width/scale transforms other models use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import cycle_split
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmrec.data.splits import Split
from llmrec.models.collab import (
    CompanionKeys,
    choose_prior,
    choose_weight,
    fit_key,
    fit_sasrec,
    fit_width,
    prefix_states,
    sasrec_item_vectors,
    set_prior,
    split_key,
    unit_rms_rows,
)
from llmrec.models.sasrec import SASRec, SASRecConfig

finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 12), st.integers(1, 6)), elements=finite), st.integers(6, 9))
def test_padding_keeps_centred_dot_products(x: np.ndarray, width: int) -> None:
    out = fit_width(x, width)
    assert out.shape == (x.shape[0], width)
    c = x - x.mean(0)
    np.testing.assert_allclose(out.astype(np.float64) @ out.T, c @ c.T, rtol=1e-3, atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(5, 12), st.just(3)), elements=finite), st.integers(0, 2**31 - 1))
def test_principal_components_keep_low_rank_geometry(low: np.ndarray, seed: int) -> None:
    # a rank-3 set of points embedded in 8 dimensions: 3 principal components lose nothing
    lift = np.random.default_rng(seed).normal(size=(3, 8))
    x = low @ lift
    out = fit_width(x, 3)
    c = x - x.mean(0)
    assert out.shape == (x.shape[0], 3)
    np.testing.assert_allclose(out.astype(np.float64) @ out.T, c @ c.T, rtol=1e-3,
                               atol=1e-3 * max(1.0, float(np.abs(c @ c.T).max())))


def test_unit_rms_rows_and_errors() -> None:
    x = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])
    out = unit_rms_rows(x)
    assert np.linalg.norm(out, axis=1).mean() == pytest.approx(1.0)
    np.testing.assert_allclose(out[0] / out[1][1], [3.0, 4.0])  # relative sizes kept
    assert not unit_rms_rows(np.zeros((2, 3))).any()
    with pytest.raises(ValueError, match="width"):
        fit_width(np.ones(3), 2)


def cycle(n_users: int = 60, seed: int = 0) -> Split:
    """8 items in a cycle: item i is always followed by item i+1."""
    return cycle_split(n_users, seed, n_items=8, lengths=(5, 9), catalog=False)


CFG = SASRecConfig(hidden_size=16, n_heads=1, max_epochs=30, patience=30, dropout=0.1, attn_dropout=0.1,
                   lr=1e-2, batch_size=32)


def test_sasrec_item_vectors_are_trained() -> None:
    vecs, info = sasrec_item_vectors(cycle(), CFG)
    assert vecs.shape == (8, 16) and vecs.dtype == np.float32 and np.isfinite(vecs).all()
    assert info["seconds"] > 0 and info["best_valid_ndcg@10"] > 0.5 and not info["cached"]
    # vectors are not left at their random start: they differ from a fresh model's
    assert not np.allclose(vecs, SASRec(CFG, 8).item_vectors())


def test_sasrec_item_vectors_cache(tmp_path: Path) -> None:
    split = cycle()
    cfg = dataclasses.replace(CFG, max_epochs=3)
    vecs, info = sasrec_item_vectors(split, cfg, cache_dir=tmp_path)
    again, info2 = sasrec_item_vectors(split, cfg, cache_dir=tmp_path)
    assert not info["cached"] and info2["cached"] and info2["seconds"] == pytest.approx(info["seconds"])
    np.testing.assert_array_equal(vecs, again)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # no temporary file left
    # another config or another split is another key
    assert split_key(split, cfg) != split_key(split, dataclasses.replace(cfg, seed=1))
    assert split_key(split, cfg) != split_key(cycle(seed=1), cfg)
    assert not sasrec_item_vectors(cycle(seed=1), cfg, cache_dir=tmp_path)[1]["cached"]
    # a damaged file is fitted again and replaced
    for p in tmp_path.iterdir():
        p.write_bytes(b"not an npz")
    _, info3 = sasrec_item_vectors(split, cfg, cache_dir=tmp_path)
    assert not info3["cached"]
    assert sasrec_item_vectors(split, cfg, cache_dir=tmp_path)[1]["cached"]


def test_prefix_states_are_each_prefix_alone() -> None:
    model = SASRec(dataclasses.replace(CFG, max_epochs=1), 8)
    model.fit(cycle(), progress=False)
    seqs = [np.array([0, 1, 2, 3, 4]), np.array([5]), np.array([], dtype=np.int64)]
    out = prefix_states(model, seqs, 3)
    assert [o.shape for o in out] == [(3, 16), (1, 16), (0, 16)]
    for j, cut in enumerate([3, 4, 5]):  # the last 3 prefixes of the first sequence, oldest first
        np.testing.assert_allclose(out[0][j], model.user_states([seqs[0][:cut]])[0], rtol=1e-5, atol=1e-6)
    # a prefix's state does not depend on what follows it in the sequence
    np.testing.assert_allclose(prefix_states(model, [np.array([0, 1, 7])], 3)[0][:2],
                               prefix_states(model, [np.array([0, 1])], 2)[0], rtol=1e-5, atol=1e-6)
    counts = prefix_states(model, seqs, [1, 0, 2])
    assert [len(o) for o in counts] == [1, 0, 0]
    with pytest.raises(ValueError, match="counts"):
        prefix_states(model, seqs, [1, 2])


def test_choose_weight_sorts_distinct_weights_and_takes_the_smallest_best() -> None:
    seen: list[float] = []

    def ndcg_at(w: float) -> float:
        seen.append(w)
        return {0.0: 0.1, 1.0: 0.3, 2.0: 0.3, 4.0: 0.2}[w]

    ws, scores, chosen = choose_weight([4, 2.0, 0, 1, 2], ndcg_at)
    assert ws == seen == [0.0, 1.0, 2.0, 4.0] and scores == [0.1, 0.3, 0.3, 0.2]
    assert chosen == 1.0  # tie between 1 and 2: the smaller weight
    for bad in ([], [1.0, -0.5]):
        with pytest.raises(ValueError, match="prior weights"):
            choose_weight(bad, ndcg_at)


def test_choose_weight_widens_while_the_best_is_the_largest() -> None:
    curve = {0.0: 0.1, 1.0: 0.2, 2.0: 0.3, 4.0: 0.4, 8.0: 0.35, 16.0: 0.5}
    ws, _, chosen = choose_weight([0, 1, 2], curve.__getitem__, widen=3)
    assert ws == [0.0, 1.0, 2.0, 4.0, 8.0] and chosen == 4.0  # stops once the top is no longer best
    assert choose_weight([0, 1, 2], curve.__getitem__, widen=1)[0] == [0.0, 1.0, 2.0, 4.0]  # at most `widen`
    assert choose_weight([0, 1, 2], curve.__getitem__)[0] == [0.0, 1.0, 2.0]  # widen=0: the grid as given
    assert choose_weight([0.0], curve.__getitem__, widen=3)[0] == [0.0]  # weight 0 cannot be doubled


def test_choose_prior_takes_the_companion_alone_only_when_it_beats_every_mix() -> None:
    keys = CompanionKeys(collab_prior_grid=[1.0, 2.0], prior_widen=0)
    curve = {0.0: 0.1, 1.0: 0.3, 2.0: 0.2}
    pick = choose_prior(keys, curve.__getitem__, lambda: 0.25)
    assert (pick["chosen"], pick["alone"], pick["companion_alone_ndcg@10"]) == (1.0, False, 0.25)
    assert choose_prior(keys, curve.__getitem__, lambda: 0.3)["alone"] is False  # a tie keeps the mix
    assert choose_prior(keys, curve.__getitem__, lambda: 0.31)["alone"] is True
    off = CompanionKeys(collab_prior_grid=[1.0, 2.0], prior_alone=False)
    assert choose_prior(off, curve.__getitem__, lambda: 0.9)["alone"] is False
    with pytest.raises(ValueError, match="prior_widen"):
        CompanionKeys(prior_widen=-1).check_companion()


def test_set_prior_checks_the_model_and_the_value() -> None:
    class WithCompanion:
        name, collab_model, prior_weight, prior_alone = "x", object(), 1.0, False

    m = WithCompanion()
    set_prior(m, "0")
    assert (m.prior_weight, m.prior_alone) == (0.0, False)
    set_prior(m, "alone")
    assert m.prior_alone
    for bad in ("-1", "abc", "inf", "nan"):
        with pytest.raises(ValueError, match="prior weight"):
            set_prior(m, bad)
    with pytest.raises(ValueError, match="no SASRec companion"):
        set_prior(SASRec(CFG, 8), 1.0)


def test_cache_key_ignores_a_budget_that_did_not_bind(tmp_path: Path) -> None:
    split = cycle()
    cfg = dataclasses.replace(CFG, max_epochs=3)
    _, info = fit_sasrec(split, cfg, cache_dir=tmp_path)
    assert info["stopped"] == "max_epochs" and not info["cached"]
    # another budget, threads or scoring batch: the same fitted model, found in the cache
    other = dataclasses.replace(cfg, max_minutes=cfg.max_minutes + 5, num_threads=2, eval_batch_size=3)
    assert fit_key(split, other) == fit_key(split, cfg) and split_key(split, other) != split_key(split, cfg)
    assert fit_sasrec(split, other, cache_dir=tmp_path)[1]["cached"]
    # a fit that its budget stopped is only reused under that same budget
    bound = dataclasses.replace(cfg, max_epochs=500, max_minutes=1e-4)
    _, info = fit_sasrec(split, bound, cache_dir=tmp_path)
    assert info["stopped"] == "max_minutes"
    assert fit_sasrec(split, bound, cache_dir=tmp_path)[1]["cached"]
    assert not fit_sasrec(split, dataclasses.replace(bound, max_minutes=2e-4), cache_dir=tmp_path)[1]["cached"]

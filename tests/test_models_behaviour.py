"""One behavioural test for every registered model, on data whose right answer is known.

Users walk deterministic cycles over the catalog (item i is always followed by item i+1 mod
N). A trained sequential model must predict the next item of the cycle; popularity must
return the most frequent unseen training items. Every model must exclude seen items, give the
same results in a batch as one user at a time, and survive a save/load round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import N_ITEMS, cycle_catalog, cycle_sequences

from llmrec.data.splits import Split, leave_one_out
from llmrec.models.base import Recommender
from llmrec.models.registry import MODELS, build_model

# Small, fast settings per model; every registered model must appear here.
# max_minutes is a safety net only: the epoch counts decide, so a loaded machine cannot change the outcome
FAST_PARAMS: dict[str, dict[str, Any]] = {
    "popularity": {},
    "itemknn": {"neighbors": 10, "window": 1, "transition_weight": 1.0},
    "sasrec": {"hidden_size": 32, "n_layers": 1, "n_heads": 2, "inner_size": 64, "dropout": 0.1,
               "attn_dropout": 0.0, "max_len": 12, "lr": 0.01, "batch_size": 16, "max_epochs": 40,
               "eval_every": 5, "patience": 100, "max_minutes": 30.0, "seed": 0, "num_threads": 1},
    "itemtoken-lm": {"backbone": "random-tiny-llama", "template": "plain", "title_tokens": 2,
                     "max_prompt_tokens": 128, "lr": 0.01, "item_lr": 0.03, "batch_size": 8, "epochs": 12,
                     "eval_every": 20, "patience": 100, "warmup_steps": 5, "lora_dropout": 0.0, "num_threads": 1,
                     "amp": "off"},  # exact batch == single-user agreement needs float32
    "llm-seqrec": {"text_model": "hash", "hidden_size": 32, "n_layers": 1, "n_heads": 2, "inner_size": 64,
                   "dropout": 0.1, "attn_dropout": 0.0, "max_len": 12, "lr": 0.01, "batch_size": 16,
                   "max_epochs": 40, "eval_every": 5, "patience": 100, "max_minutes": 30.0, "seed": 0,
                   "num_threads": 1, "filter_mix": 0.3},
    "mixture": {"members": [{"name": "itemknn", "params": {"neighbors": 10, "window": 1, "transition_weight": 1.0}},
                            {"name": "popularity"}]},
    "graph-lm": {"backbone": "random-tiny-llama", "template": "plain", "title_tokens": 2, "max_prompt_tokens": 128,
                 "lr": 0.01, "item_lr": 0.03, "batch_size": 8, "epochs": 12, "eval_every": 20, "patience": 100,
                 "warmup_steps": 5, "lora_dropout": 0.0, "num_threads": 1, "amp": "off", "graph_bias": "learned"},
    "semantic-id": {"embedder": "hash", "rq_levels": 2, "rq_codebook_size": 8, "rq_latent_dim": 8,
                    "rq_hidden": 32, "rq_steps": 100, "d_model": 32, "n_heads": 2, "enc_layers": 1,
                    "dec_layers": 1, "ff_size": 64, "dropout": 0.0, "max_len": 12, "lr": 0.005,
                    "batch_size": 16, "max_epochs": 80, "eval_every": 10, "patience": 100, "max_minutes": 30.0,
                    "beam_size": 20, "seed": 0, "num_threads": 1},
    "instruct-lm": {"backbone": "random-tiny-llama", "mode": "rerank", "retriever": "itemknn", "n_candidates": 4,
                    "rerank_mix": [0.0, 1.0, 100.0], "max_steps": 10, "batch_size": 8, "lr": 0.003, "eval_every": 5,
                    "valid_users": 0, "num_threads": 1, "amp": "off"},
}
SEQUENTIAL = {"itemknn", "sasrec", "semantic-id", "itemtoken-lm", "llm-seqrec", "mixture", "graph-lm",
              "instruct-lm"}






@pytest.fixture(scope="module")
def split() -> Split:
    return leave_one_out(cycle_sequences(), N_ITEMS).with_catalog(cycle_catalog())


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request: pytest.FixtureRequest, split: Split) -> tuple[str, Recommender]:
    name = request.param
    assert name in FAST_PARAMS, f"add fast settings for model {name!r} to FAST_PARAMS"
    model = build_model(name, FAST_PARAMS[name], N_ITEMS)
    model.fit(split, progress=False)
    return name, model


def test_finds_the_known_next_item(trained: tuple[str, Recommender], split: Split) -> None:
    name, model = trained
    ids, _ = model.recommend(split.test.histories, k=1)
    if name in SEQUENTIAL:
        expected = np.array([(h[-1] + 1) % N_ITEMS for h in split.test.histories])
        assert (ids[:, 0] == expected).mean() >= 0.9
        assert (ids[:, 0] == np.array([t[0] for t in split.test.targets])).mean() >= 0.9
    else:
        counts = split.train_item_counts()
        for h, top in zip(split.test.histories, ids[:, 0], strict=True):
            unseen = np.setdiff1d(np.arange(N_ITEMS), h)
            assert counts[top] == counts[unseen].max()


def test_seen_items_are_excluded(trained: tuple[str, Recommender], split: Split) -> None:
    _, model = trained
    ids, scores = model.recommend(split.test.histories, k=N_ITEMS)
    for h, row, sc in zip(split.test.histories, ids, scores, strict=True):
        assert not np.isin(row[row >= 0], h).any()
        assert (row >= 0).sum() == N_ITEMS - len(np.unique(h))
        assert np.all(np.diff(sc[row >= 0]) <= 0)
    ids_all, _ = model.recommend(split.test.histories[:5], k=N_ITEMS, exclude_seen=False)
    assert (ids_all >= 0).all()


def test_batch_and_single_user_agree(trained: tuple[str, Recommender], split: Split) -> None:
    _, model = trained
    histories = split.test.histories[:12]
    batch_scores = model.score(histories)
    assert batch_scores.shape == (len(histories), N_ITEMS)
    assert batch_scores.dtype == np.float32
    single = np.stack([model.score([h])[0] for h in histories])
    np.testing.assert_allclose(batch_scores, single, rtol=1e-5, atol=1e-5)
    ids_batch, _ = model.recommend(histories, k=5, batch_size=5)
    ids_single = np.concatenate([model.recommend([h], k=5)[0] for h in histories])
    np.testing.assert_array_equal(ids_batch, ids_single)


def test_save_load_round_trip(trained: tuple[str, Recommender], split: Split, tmp_path: Path) -> None:
    name, model = trained
    model.save(tmp_path / name)
    assert (tmp_path / name / "weights.safetensors").exists()
    assert not list((tmp_path / name).glob("*.pkl"))
    loaded = type(model).load(tmp_path / name)
    assert loaded.config == model.config
    np.testing.assert_allclose(model.score(split.test.histories), loaded.score(split.test.histories), rtol=1e-6)


def test_load_refuses_another_model(trained: tuple[str, Recommender], tmp_path: Path) -> None:
    name, model = trained
    model.save(tmp_path / name)
    other = next(cls for n, cls in MODELS.items() if n != name)
    with pytest.raises(ValueError, match=name):
        other.load(tmp_path / name)

"""Graph-aware LM on a tiny random Llama: the sparse graph, the vectorized bias against a reference loop,
leak tests (no validation or test interaction in any graph or bias that training or validation reads;
prediction reads the user's recorded history only), the bias reaching attention (causal, padding),
pre-training prompts, save/load and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_ITEMS, cycle_split
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.data.dataset import Catalog
from llmrec.data.splits import Split, leave_one_out
from llmrec.models.graph_lm import GraphLM, GraphLMConfig
from llmrec.models.graph_lm.graph import OTHER, USER, TorchTables, bias_channels, build_graph
from llmrec.models.graph_lm.pretrain import pretrain_examples
from llmrec.models.itemtoken.prompts import IGNORE

TINY = {"backbone": "random-tiny-llama", "template": "plain", "title_tokens": 1, "max_prompt_tokens": 96,
        "lr": 1e-2, "item_lr": 3e-2, "batch_size": 8, "epochs": 6, "eval_every": 20, "patience": 100,
        "warmup_steps": 5, "num_threads": 1, "lora_dropout": 0.0, "amp": "off", "ratings": False,
        "review_chars": 0}
ALL = ["self", "ui", "ii", "brand", "category"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs tiny tensors: one torch thread."""


def built(split: Split, **overrides: object) -> GraphLM:
    """An untrained model with its graph, backbone, item and user tokens in place."""
    model = GraphLM(GraphLMConfig(**{**TINY, **overrides}), split.n_items)  # type: ignore[arg-type]
    model.tables = build_graph(split.train, split.n_items, split.catalog)
    titles = split.catalog.titles if split.catalog is not None else [f"item {i}" for i in range(split.n_items)]
    model._build(titles, n_users=len(split.train))
    return model


# --- the graph and the bias -----------------------------------------------------------------------


def reference_channel(name: str, x: int, y: int, train: list[np.ndarray], brand: list, cat: list) -> float:
    """One entry of a channel, from first principles (sets of training users), for nodes x, y."""
    users = [{u for u, s in enumerate(train) if i in set(s.tolist())} for i in range(len(brand))]
    if x == OTHER or y == OTHER:
        return 0.0
    if name == "self":
        return float(x == y)
    if name == "ui":
        if USER in (x, y) and x != y:
            item = y if x == USER else x
            return 1.0 / np.sqrt(max(len(users[item]), 1))
        return 0.0
    if USER in (x, y) or x == y:
        return 0.0
    if name == "ii":
        shared = len(users[x] & users[y])
        return shared / np.sqrt(len(users[x]) * len(users[y])) if shared else 0.0
    attr = brand if name == "brand" else cat
    return float(attr[x] is not None and attr[x] == attr[y])


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_vectorized_bias_equals_a_reference_loop(data: st.DataObject) -> None:
    n_items = data.draw(st.integers(2, 7))
    train = [np.array(data.draw(st.lists(st.integers(0, n_items - 1), max_size=5)), dtype=np.int64)
             for _ in range(data.draw(st.integers(1, 5)))]
    brand = data.draw(st.lists(st.sampled_from([None, "a", "b"]), min_size=n_items, max_size=n_items))
    cat = data.draw(st.lists(st.sampled_from([None, "x", "y"]), min_size=n_items, max_size=n_items))
    catalog = Catalog([str(i) for i in range(n_items)], ["t"] * n_items, brand, [[c] if c else [] for c in cat],
                      [None] * n_items)
    B, L = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    nodes = np.array(data.draw(st.lists(st.integers(-2, n_items - 1), min_size=B * L, max_size=B * L))).reshape(B, L)
    tables = build_graph(train, n_items, catalog)
    got = bias_channels(torch.as_tensor(nodes), TorchTables(tables), ALL).numpy()
    assert got.shape == (B, len(ALL), L, L)
    for b in range(B):
        for k, name in enumerate(ALL):
            for p in range(L):
                for q in range(L):
                    want = reference_channel(name, int(nodes[b, p]), int(nodes[b, q]), train, brand, cat)
                    assert got[b, k, p, q] == pytest.approx(want, rel=1e-5, abs=1e-6), (name, b, p, q)


def test_max_neighbors_keeps_the_strongest_pairs_symmetric() -> None:
    train = [np.array([0, 1, 2, 3]), np.array([0, 1]), np.array([0, 1, 2]), np.array([4, 5])]
    full, pruned = build_graph(train, 6), build_graph(train, 6, max_neighbors=1)
    assert pruned.n_pairs < full.n_pairs
    keys = set(pruned.ii_keys.tolist())
    assert all((k % 6) * 6 + k // 6 in keys for k in keys)  # symmetric
    assert list(full.neighbors(0, 2)) == [1, 2]  # shares 3 users with item 1, 2 with item 2
    assert 0 * 6 + 1 in keys and 4 * 6 + 5 in keys


# --- leaks ------------------------------------------------------------------------------------------


def held_out_unique_split() -> Split:
    """Cycle users whose validation and test items (20, 21) appear in no training sequence."""
    seqs = [np.concatenate([s, [N_ITEMS, N_ITEMS + 1]]) for s in cycle_split().train]
    return leave_one_out(seqs, N_ITEMS + 2)


def test_no_validation_or_test_interaction_in_the_graph_or_the_pretraining() -> None:
    split = held_out_unique_split()
    model = GraphLM(GraphLMConfig(**{**TINY, "epochs": 1, "max_steps": 1, "pretrain_steps": 1}), split.n_items)
    model.fit(split, progress=False)
    t = model.tables
    assert t is not None and t.degree[N_ITEMS] == 0 and t.degree[N_ITEMS + 1] == 0
    ends = np.concatenate([t.ii_keys // t.n_items, t.ii_keys % t.n_items])
    assert not np.isin(ends, [N_ITEMS, N_ITEMS + 1]).any()
    # the same training sequences with other held-out items give the very same graph
    other = leave_one_out([np.concatenate([s, [3, 4]]) for s in split.train], split.n_items)
    again = build_graph(other.train, other.n_items)
    for k, v in t.to_arrays().items():
        np.testing.assert_array_equal(v, again.to_arrays()[k])
    # interaction prompts (collaborative, second-order) hold no held-out item; content prompts (item text from
    # the catalog, no interaction) exist for every item
    examples = [e for e in pretrain_examples(model, split, t) if (e[2] == IGNORE).all()]
    assert examples
    n_base = model.graph_net.n_base
    held = {n_base + N_ITEMS, n_base + N_ITEMS + 1}
    assert not any(held & set(e[0].tolist()) or held & set((n_base + e[1][e[1] != IGNORE]).tolist())
                   for e in examples)


def test_prediction_reads_only_the_recorded_history() -> None:
    split = held_out_unique_split()
    model = built(split, channels=["self", "ui", "ii"], graph_bias="fixed")
    net = model.graph_net
    for evalset, must_not, may in ((split.valid, {N_ITEMS, N_ITEMS + 1}, set()),
                                   (split.test, {N_ITEMS + 1}, {N_ITEMS})):
        for h, u in zip(evalset.histories[:5], evalset.users[:5], strict=True):
            ids = torch.as_tensor(model.prompt_ids(h, int(u)))[None]
            nodes = net.node_ids(ids)[0]
            items = set(nodes[nodes >= 0].tolist())
            assert items <= set(h.tolist()) and not items & must_not
            assert may <= items  # the test history shows the validation item
            assert int((nodes == USER).sum()) == 2  # the user opens and closes the prompt
            ui = net.bias(ids)[0, 1]  # (L, L)
            linked = set(nodes[(ui > 0).any(0)].tolist()) - {USER}
            assert linked <= set(h.tolist())


# --- the bias in attention ----------------------------------------------------------------------------


def test_bias_reaches_attention_keeps_it_causal_and_padding_neutral(split: Split) -> None:
    plain, fixed = built(split, graph_bias="none"), built(split, graph_bias="fixed", bias_scale=3.0)
    learned = built(split, graph_bias="learned", bias_scale=3.0)
    prompts = [torch.as_tensor(fixed.prompt_ids(h, int(u))) for h, u in
               zip(split.valid.histories[:3], split.valid.users[:3], strict=True)]
    ids = prompts[0][None]
    h_plain, h_fixed, h_learned = (m.graph_net.hidden(ids)[0] for m in (plain, fixed, learned))
    assert not torch.allclose(h_plain, h_fixed, atol=1e-4)  # the bias changes what attention reads
    torch.testing.assert_close(h_fixed, h_learned, atol=1e-5, rtol=1e-5)  # learned starts at fixed
    with torch.no_grad():
        learned.graph_net.graph_scale[0, 0].mul_(5.0)  # one head of the first layer
    assert not torch.allclose(learned.graph_net.hidden(ids)[0], h_fixed, atol=1e-4)
    # causal: a changed last token leaves every earlier position as it was
    changed = ids.clone()
    changed[0, -1] = fixed.graph_net.n_base + 3
    torch.testing.assert_close(fixed.graph_net.hidden(changed)[0][:, :-1], h_fixed[:, :-1])
    # right padding: a batch gives each prompt the hidden states it gets alone
    width = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([p, p.new_zeros(width - len(p))]) for p in prompts])
    hb = fixed.graph_net.hidden(batch)[0]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(hb[i, : len(p)], fixed.graph_net.hidden(p[None])[0][0], atol=1e-5, rtol=1e-5)


def test_pretraining_prompts_and_labels(split: Split) -> None:
    model = built(split, content_tokens=4, second_order_items=3)
    assert model.tables is not None
    ex = pretrain_examples(model, split, model.tables)
    n_base = model.graph_net.n_base
    collab = [e for e in ex if e[0][0] >= n_base + model.graph_net.n_rows]
    assert len(collab) == len(split.train)
    ids, items, text = collab[0]
    assert list(items[items != IGNORE]) == list(split.train[0][-TINY.get("max_history", 50):])
    assert (text == IGNORE).all()
    content = [e for e in ex if (e[2] != IGNORE).any()]
    assert len(content) == N_ITEMS and all(len(e[0]) <= 5 for e in content)
    assert all((e[2][:-1] == e[0][1:]).all() for e in content)
    second = [e for e in ex if e[0][0] < n_base + N_ITEMS and (e[1] != IGNORE).any()]
    for ids, items, _ in second:
        want = model.tables.neighbors(int(ids[0] - n_base), 3)
        assert list(items[items != IGNORE]) == list(want)


def test_fit_learns_pretrains_and_round_trips(split: Split, tmp_path: Path) -> None:
    model = GraphLM(GraphLMConfig(**{**TINY, "graph_bias": "learned", "pretrain_steps": 5}), N_ITEMS)
    info = model.fit(split, progress=False, workdir=tmp_path / "run")
    assert info["pretrain"]["steps"] == 5 and info["graph"]["item_pairs"] > 0
    assert info["best_valid_ndcg@10"] > 0.3  # the cycle: the next item is known
    scale = model.graph_net.graph_scale.detach()
    assert not torch.allclose(scale, torch.ones_like(scale))  # the scales trained
    users = split.test.users
    scores = model.score(split.test.histories, users)
    model.save(tmp_path / "m")
    loaded = GraphLM.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.score(split.test.histories, users), scores, atol=1e-5)
    torch.testing.assert_close(loaded.graph_net.graph_scale, scale)
    with pytest.raises(NotImplementedError, match="fast"):
        loaded.generate_lists(split.test.histories[:2], k=3, mode="beam")
    assert loaded.generate_lists(split.test.histories[:2], k=3, mode="fast").shape == (2, 3)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="channels"):
        GraphLMConfig(channels=["ii", "distance"])
    with pytest.raises(ValueError, match="channel_weights"):
        GraphLMConfig(channels=["ii"], channel_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="pretrain"):
        GraphLMConfig(pretrain=["reviews"])
    with pytest.raises(ValueError, match="tail_user"):
        GraphLMConfig(user_tokens=False)


def test_cli_train_evaluate_recommend(cycle_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmrec.cli import main

    run = tmp_path / "run"
    params = {**TINY, "epochs": 1, "max_steps": 2, "pretrain_steps": 2, "graph_bias": "learned"}
    args = ["train", "--model", "graph-lm", "--dataset", str(cycle_dataset), "--out", str(run), "--quiet"]
    for k, v in params.items():
        args += ["--set", f"model.params.{k}={json.dumps(v)}"]
    assert main(args) == 0
    assert main(["evaluate", str(run), "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["protocol"] == "full"
    capsys.readouterr()
    assert main(["recommend", str(run), "--user", "u0", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["recommendations"]) == 3


def test_sasrec_companion_states_and_prior_with_the_bias(split: Split, tmp_path: Path) -> None:
    cfg = {**TINY, "graph_bias": "fixed", "collab_state": "items", "collab_prior_grid": [0.5, 2.0],
           "collab_minutes": 0.2, "collab_cache": False, "epochs": 1, "prior_widen": 0, "prior_alone": False}
    model = GraphLM(GraphLMConfig(**cfg), N_ITEMS)  # type: ignore[arg-type]
    info = model.fit(split, progress=False)
    assert model.collab_model is not None and info["collab_prior"]["weights"] == [0.0, 0.5, 2.0]
    hists, users = split.test.histories[:6], split.test.users[:6]
    w = model.prior_weight = 2.0
    with_prior = model.score(hists, users)
    model.prior_weight = 0.0
    np.testing.assert_allclose(with_prior - model.score(hists, users), w * model.collab_model.score(hists),
                               rtol=1e-4, atol=1e-3)
    model.prior_weight = w
    model.save(tmp_path / "m")
    np.testing.assert_allclose(GraphLM.load(tmp_path / "m").score(hists, users), with_prior, rtol=1e-4, atol=1e-4)

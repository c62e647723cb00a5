"""Semantic-ID model: RQ-VAE, code trie and constrained beam search, interest fusion, pipeline, CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_ITEMS, cycle_split
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.data.splits import Split
from llmrec.eval.protocol import evaluate_full
from llmrec.models.registry import build_model
from llmrec.models.semantic_ids.embed import EmbeddingCache, HashEmbedder, get_embedder
from llmrec.models.semantic_ids.model import SemanticIDRec
from llmrec.models.semantic_ids.rqvae import RQVAEConfig, code_stats, resolve_collisions, train_rqvae
from llmrec.models.semantic_ids.seq2seq import CodeTrie, NetConfig, SemIDSeq2Seq, beam_search, group_logsumexp

TINY = {"embedder": "hash", "rq_levels": 2, "rq_codebook_size": 8, "rq_latent_dim": 8, "rq_hidden": 32,
        "rq_steps": 100, "d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ff_size": 64,
        "dropout": 0.0, "max_len": 12, "lr": 0.005, "batch_size": 16, "max_epochs": 60, "eval_every": 20,
        "patience": 100, "max_minutes": 30.0, "beam_size": 10, "seed": 0, "num_threads": 1}




pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)


@pytest.fixture(scope="module")
def split() -> Split:
    return cycle_split()


@pytest.fixture(scope="module")
def model(split: Split) -> SemanticIDRec:
    m = build_model("semantic-id", TINY, N_ITEMS)
    m.fit(split, progress=False)
    return m  # type: ignore[return-value]


# --- RQ-VAE -----------------------------------------------------------------------------------


def test_rqvae_learns_and_ids_are_unique() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16))
    emb = (centres[rng.integers(12, size=300)] + 0.1 * rng.normal(size=(300, 16))).astype(np.float32)
    emb[:5] = emb[5]  # exact duplicates must still end up with distinct IDs
    cfg = RQVAEConfig(levels=3, codebook_size=8, latent_dim=8, hidden=64, steps=150, batch_size=128, seed=0)
    _, codes, stats = train_rqvae(emb, cfg)
    assert stats["recon_mse_after"] < 0.5 * stats["recon_mse_before"]
    assert stats["loss_after"] < stats["loss_before"]
    assert codes.shape == (300, 4)
    assert len(np.unique(codes, axis=0)) == 300
    assert 0 < stats["collision_rate"] <= 1  # the duplicates collide before resolution
    assert len(stats["utilization"]) == 3 and all(0 < u <= 1 for u in stats["utilization"])
    assert stats["extra_level_size"] == codes[:, -1].max() + 1 >= 6


def test_resolve_collisions_and_stats() -> None:
    codes = np.array([[0, 1], [0, 1], [2, 3], [0, 1]])
    out = resolve_collisions(codes)
    np.testing.assert_array_equal(out[:, -1], [0, 1, 0, 2])
    s = code_stats(codes, 4)
    assert s["collision_rate"] == pytest.approx(0.75)
    assert s["max_group"] == 3
    assert s["utilization"] == [0.5, 0.5]


# --- trie and beam search -------------------------------------------------------------------------


def _random_net_and_trie(seed: int = 0) -> tuple[SemIDSeq2Seq, CodeTrie, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = (6, 5, 3)
    all_codes = np.array(np.meshgrid(*[np.arange(v) for v in vocab], indexing="ij")).reshape(3, -1).T
    codes = all_codes[np.sort(rng.choice(len(all_codes), 40, replace=False))]  # a sparse set of real tuples
    torch.manual_seed(seed)
    net = SemIDSeq2Seq(NetConfig(vocab_sizes=vocab, d_model=16, n_heads=2, enc_layers=1, dec_layers=2,
                                 ff_size=32, dropout=0.0, max_len=8, interest_dim=4)).eval()
    return net, CodeTrie(codes, vocab), codes


def _exact_logprob(net: SemIDSeq2Seq, codes: np.ndarray, memory: torch.Tensor, mem_mask: torch.Tensor,
                   fused: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    c = torch.from_numpy(codes)
    B, G = memory.shape[0], len(codes)
    logp = net.decode(c[None, :, :-1].expand(B, G, -1), memory, mem_mask[:, None].expand(B, G, -1), fused)
    return logp.gather(-1, c[None, :, :, None].expand(B, G, -1, 1)).squeeze(-1).sum(-1)  # (B, G)


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("beam", [1, 3, 7, 40, 60])
def test_constrained_beam_search_only_yields_valid_allowed_items(beam: int, with_prior: bool) -> None:
    net, trie, codes = _random_net_and_trie()
    B, T, N = 5, 4, len(codes)
    gen = torch.Generator().manual_seed(1)
    hist = torch.randint(0, N, (B, T), generator=gen)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, :2] = True
    with torch.no_grad():
        memory = net.encode(trie.codes[hist], pad)
        fused = net.embed_interests(torch.randn(B, 1, 3, 4, generator=gen), torch.ones(B, 1, 3, dtype=torch.bool))
        allowed = torch.rand(B, N, generator=gen) > 0.3
        allowed[1] = False
        allowed[1, 7] = True  # a user for whom a single item is left
        prior = 3.0 * torch.randn(B, N, generator=gen) if with_prior else None
        items, scores = beam_search(net, trie, memory, ~pad, fused, allowed, beam, prior=prior)
        exact = _exact_logprob(net, codes, memory, ~pad, fused)
        if prior is not None:  # the product of experts: + the prior's log-probability among allowed items
            exact = exact + prior - torch.logsumexp(prior.masked_fill(~allowed, -torch.inf), 1, keepdim=True)
    for b in range(B):
        got = items[b][items[b] >= 0]
        assert len(set(got.tolist())) == len(got)  # distinct
        assert allowed[b, got].all()  # real and allowed
        assert len(got) == min(beam, int(allowed[b].sum()))
        assert torch.isinf(scores[b][items[b] < 0]).all()
        assert (scores[b, : len(got)].diff() <= 1e-6).all()
        torch.testing.assert_close(scores[b, : len(got)], exact[b, got], atol=1e-5, rtol=1e-5)
        if beam >= int(allowed[b].sum()):  # a wide beam enumerates every allowed item: exact ranking
            expected = torch.argsort(exact[b].masked_fill(~allowed[b], -torch.inf), descending=True)[: len(got)]
            assert set(got.tolist()) == set(expected.tolist())


def test_a_dominant_prior_makes_the_beam_follow_it() -> None:
    net, trie, codes = _random_net_and_trie(3)
    B, N = 4, len(codes)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        memory = net.encode(trie.codes[torch.randint(0, N, (B, 3), generator=gen)], torch.zeros(B, 3, dtype=torch.bool))
        allowed = torch.rand(B, N, generator=gen) > 0.2
        prior = 1e4 * torch.randn(B, N, generator=gen)
        items, _ = beam_search(net, trie, memory, torch.ones(B, 3, dtype=torch.bool), None, allowed, 5, prior=prior)
    expected = prior.masked_fill(~allowed, -torch.inf).argsort(1, descending=True)[:, :5]
    torch.testing.assert_close(items, expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n_groups: st.tuples(
    st.lists(st.integers(0, n_groups - 1), min_size=1, max_size=12), st.just(n_groups))),
       st.integers(0, 2**31 - 1))
def test_group_logsumexp_matches_a_loop(groups: tuple[list[int], int], seed: int) -> None:
    group, n_groups = groups
    rng = np.random.default_rng(seed)
    vals = rng.normal(scale=30.0, size=(2, len(group)))
    vals[rng.random(vals.shape) < 0.3] = -np.inf  # excluded items
    got = group_logsumexp(torch.from_numpy(vals), torch.tensor(group), n_groups).numpy()
    for b in range(2):
        for g in range(n_groups):
            v = vals[b][np.asarray(group) == g]
            v = v[np.isfinite(v)]
            want = -np.inf if len(v) == 0 else v.max() + np.log(np.exp(v - v.max()).sum())
            assert got[b, g] == pytest.approx(want, abs=1e-9) if np.isfinite(want) else got[b, g] == -np.inf


def test_trie_rejects_duplicate_tuples() -> None:
    with pytest.raises(ValueError, match="unique"):
        CodeTrie(np.array([[0, 1], [0, 1]]), (2, 2))


# --- model --------------------------------------------------------------------------------------


def test_pipeline_on_tiny_model(model: SemanticIDRec, split: Split, tmp_path: Path) -> None:
    assert model.codes is not None and len(np.unique(model.codes, axis=0)) == N_ITEMS
    res = evaluate_full(model, split.test, ks=[1, 5, 10])
    assert res.overall["recall@10"] >= 0.9
    ids, _scores = model.recommend(split.test.histories, k=10)
    assert (ids < N_ITEMS).all()
    for h, row in zip(split.test.histories, ids, strict=True):
        assert not np.isin(row, h).any()
        assert (row >= 0).sum() == min(10, N_ITEMS - len(np.unique(h)))  # every unseen item can be found
    # the dense full-ranking path agrees with the generative path on the best item
    exact = SemanticIDRec.load(_saved(model, tmp_path))
    exact.config.recommend_mode = "exact"
    ids_exact, _ = exact.recommend(split.test.histories, k=1)
    assert (ids_exact[:, 0] == ids[:, 0]).mean() >= 0.95
    s = model.score(split.test.histories[:3])
    assert s.shape == (3, N_ITEMS) and s.dtype == np.float32 and np.isfinite(s).all()
    assert (np.exp(s).sum(1) <= 1.0 + 1e-4).all()  # log-probabilities of disjoint code tuples

def _saved(model: SemanticIDRec, tmp_path: Path) -> Path:
    model.save(tmp_path / "m")
    return tmp_path / "m"


def test_interests_change_the_scores(model: SemanticIDRec, split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    hists = split.test.histories[:8]
    with_interests = model.score(hists)
    monkeypatch.setattr(model, "interests_of", lambda hs, progress=False: [[] for _ in hs])
    without = model.score(hists)
    assert np.abs(with_interests - without).max() > 1e-3
    monkeypatch.setattr(model, "interests_of", lambda hs, progress=False: [["category 3", "product"] for _ in hs])
    other = model.score(hists)
    assert np.abs(other - with_interests).max() > 1e-3


def test_ablation_flag_removes_fusion(split: Split) -> None:
    m = build_model("semantic-id", {**TINY, "use_interests": False, "max_epochs": 2}, N_ITEMS)
    m.fit(split, progress=False)
    names = [n for n, _ in m.net.named_parameters()]  # type: ignore[union-attr]
    assert not any("interest" in n or "int_" in n for n in names)
    m2 = build_model("semantic-id", {**TINY, "max_epochs": 2}, N_ITEMS)
    m2.fit(split, progress=False)
    assert any("interest_attn" in n for n, _ in m2.net.named_parameters())  # type: ignore[union-attr]


def test_training_interests_never_see_the_target(split: Split) -> None:
    m = build_model("semantic-id", {**TINY, "max_epochs": 1}, N_ITEMS)
    m.fit(split, progress=False)
    seen: list[np.ndarray] = []
    orig = m.interests_of

    def spy(hs, progress=False):
        seen.extend(np.asarray(h) for h in hs)
        return orig(hs, progress)

    m.interests_of = spy  # type: ignore[method-assign]
    seqs = [np.asarray(s) for s in split.train if len(s) >= 2]
    ids, _ = m._training_interests(seqs, progress=False)
    # every input position has interests, computed from a prefix that ends at that position
    assert len(seen) == sum(min(len(s) - 1, TINY["max_len"]) for s in seqs)
    assert all(len(p) < len(s) for p in seen for s in [max(seqs, key=len)])
    assert (ids[:, -1, 0] >= 0).all()


def test_hash_embedder_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    e = get_embedder("hash-32")
    assert isinstance(e, HashEmbedder) and e.dim == 32
    v = e.encode(["red lipstick", "red lipstick", "blue stapler"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v[0], v[1])
    calls: list[list[str]] = []

    def compute(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return e.encode(texts)

    cache = EmbeddingCache("some/model", root=tmp_path)
    a = cache.get_or_compute(["x", "y", "x"], compute)
    b = EmbeddingCache("some/model", root=tmp_path).get_or_compute(["y", "x", "z"], compute)  # a new process
    assert calls == [["x", "y"], ["z"]]
    np.testing.assert_array_equal(a[0], b[1])
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_train_evaluate_recommend(cycle_dataset: Path, tmp_path: Path) -> None:
    from llmrec.cli import main

    ds = cycle_dataset
    sets = [f"model.params.{k}={json.dumps(v)}" for k, v in TINY.items()]
    run = tmp_path / "run"
    args = ["train", "--model", "semantic-id", "--dataset", str(ds), "--out", str(run), "--quiet"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    assert main(["evaluate", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["overall"]["ndcg@10"] > 0.5
    assert main(["recommend", str(run), "--user", "u0", "-k", "3", "--json"]) == 0


def test_early_stopping_waits_for_min_epochs() -> None:
    from llmrec.models.registry import build_model

    split = cycle_split()
    info = build_model("semantic-id", {**TINY, "use_interests": False, "patience": 1, "min_epochs": 4, "eval_every": 1,
                                       "max_epochs": 30, "lr": 0.0}, 20).fit(split, progress=False)
    # lr 0: validation never improves after the first epoch, so patience alone would stop at epoch 2
    assert info["stopped"] == "patience" and info["epochs"] == 4


def test_item_embeddings_and_lr_schedule(split: Split, tmp_path: Path) -> None:
    from llmrec.models.train import lr_factor

    # 10 steps per epoch: warm-up (1 epoch) rises linearly to 1, cosine decays to 10% at 5 epochs, then stays
    assert lr_factor(0, 50, 10.0, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 50, 10.0, "cosine") == pytest.approx(1.0)
    assert lr_factor(49, 50, 10.0, "cosine") == pytest.approx(0.1, abs=2e-3)
    assert lr_factor(500, 50, 10.0, "cosine") == pytest.approx(0.1)
    assert lr_factor(500, 0, 0.0, "constant") == 1.0
    decay = [lr_factor(s, 50, 10.0, "cosine") for s in range(10, 50)]
    assert all(a >= b for a, b in itertools.pairwise(decay))

    m = build_model("semantic-id", {**TINY, "item_embeddings": True, "warmup_epochs": 1.0, "decay_epochs": 40},
                    N_ITEMS)
    m.fit(split, progress=False)
    assert m.net is not None and m.net.enc_item_emb is not None
    assert m.net.enc_item_emb.weight.shape == (N_ITEMS, TINY["d_model"])
    res = evaluate_full(m, split.test, ks=[10])
    assert res.overall["recall@10"] >= 0.9
    hists = split.test.histories[:5]
    loaded = SemanticIDRec.load(_saved(m, tmp_path))
    np.testing.assert_allclose(loaded.score(hists), m.score(hists), rtol=1e-4, atol=1e-4)
    # the per-item embedding matters: changing it changes the scores
    with torch.no_grad():
        loaded.net.enc_item_emb.weight.normal_()  # type: ignore[union-attr]
    assert np.abs(loaded.score(hists) - m.score(hists)).max() > 1e-3


@pytest.mark.parametrize("rq_input", ["text+sasrec", "sasrec"])
def test_collaborative_codes(split: Split, rq_input: str) -> None:
    m = build_model("semantic-id", {**TINY, "use_interests": False, "max_epochs": 2, "rq_input": rq_input, "collab_cache": False,
                                    "collab_minutes": 0.2}, N_ITEMS)
    info = m.fit(split, progress=False)
    assert info["collab"] is not None and info["collab"]["seconds"] > 0
    codes = np.asarray(m.codes)
    assert codes.shape[0] == N_ITEMS and len({tuple(r) for r in codes.tolist()}) == N_ITEMS
    with pytest.raises(ValueError, match="collab_weight"):
        build_model("semantic-id", {**TINY, "collab_weight": 0.0}, N_ITEMS)


def test_collaborative_states_feed_the_encoder(split: Split, tmp_path: Path) -> None:
    m = build_model("semantic-id", {**TINY, "use_interests": False, "max_epochs": 40, "collab_states": True,
                                    "collab_cache": False, "collab_minutes": 0.2}, N_ITEMS)
    assert isinstance(m, SemanticIDRec)
    info = m.fit(split, progress=False)
    assert info["collab"] is not None and m.collab_model is not None
    assert m.net is not None and m.net.enc_state is not None
    # the states are causal and aligned with the left-padded items: the state at the j-th of the last
    # items is SASRec's state of the sequence up to that item, computed on that prefix alone
    seq = split.train[0]
    st = m._history_states([seq], 5)
    assert st is not None and st.shape == (1, 5, m.collab_model.config.hidden_size)
    for j in range(5):
        prefix = seq[: len(seq) - 5 + j + 1]
        np.testing.assert_allclose(st[0, j].numpy(), m.collab_model.user_states([prefix])[0] * m.state_scale,
                                   rtol=1e-4, atol=1e-5)
    short = m._history_states([seq[:2]], 5)
    assert short is not None and not short[0, :3].any() and short[0, 3:].abs().sum() > 0  # padding gets none
    # the whole path works, the states change the scores, and save/load keeps the SASRec
    assert evaluate_full(m, split.test, ks=[10]).overall["recall@10"] >= 0.5
    hists = split.test.histories[:5]
    before = m.score(hists)
    m.state_scale *= 3.0
    assert np.abs(m.score(hists) - before).max() > 1e-4
    m.state_scale /= 3.0
    loaded = SemanticIDRec.load(_saved(m, tmp_path))
    np.testing.assert_allclose(loaded.score(hists), before, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(loaded.recommend(hists, k=5)[0], m.recommend(hists, k=5)[0])
    with pytest.raises(ValueError, match="states"):
        m.net.encode(torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))


def test_sasrec_prior_is_chosen_on_validation_and_saved(split: Split, tmp_path: Path) -> None:
    m = build_model("semantic-id", {**TINY, "use_interests": False, "max_epochs": 3, "collab_cache": False,
                                    "collab_minutes": 0.2, "collab_prior_grid": [0.5, 2.0], "prior_valid_users": 0,
                                    "prior_widen": 0, "prior_alone": False},
                    N_ITEMS)
    assert isinstance(m, SemanticIDRec)
    info = m.fit(split, progress=False)
    pick = info["collab_prior"]
    assert pick is not None and pick["weights"] == [0.0, 0.5, 2.0] and pick["valid_users"] == len(split.valid)
    assert m.prior_weight == pick["chosen"] == pick["weights"][int(np.argmax(pick["valid_ndcg@10"]))]
    assert m.collab_model is not None and m.net is not None and m.net.enc_state is None  # prior only, no states
    hists = split.test.histories[:6]
    m.prior_weight = 0.0
    alone = m.score(hists)
    m.prior_weight = 1.5
    with_prior = m.score(hists)
    sas = torch.log_softmax(1.5 * torch.from_numpy(m.collab_model.score(hists)), 1).numpy()
    np.testing.assert_allclose(with_prior - alone, sas, rtol=1e-4, atol=1e-4)  # exact product of experts
    # with every item allowed, beam scores of the returned items are those exact scores
    ids, sc = m.recommend(hists, k=5, exclude_seen=False)
    np.testing.assert_allclose(sc, np.take_along_axis(with_prior, ids, 1), rtol=1e-4, atol=1e-4)
    # save/load keeps the weight and the SASRec
    loaded = SemanticIDRec.load(_saved(m, tmp_path))
    assert loaded.prior_weight == 1.5
    np.testing.assert_array_equal(loaded.recommend(hists, k=5)[0], m.recommend(hists, k=5)[0])
    m.prior_weight = 0.0  # a saved SASRec comes back even when the chosen weight is 0, so it can be re-chosen
    again = SemanticIDRec.load(_saved(m, tmp_path / "w0"))
    assert again.prior_weight == 0.0 and again.collab_model is not None
    assert again.choose_prior(split.valid, [0.0, 2.0])["weights"][:2] == [0.0, 2.0]
    with pytest.raises(ValueError, match="collab_prior"):
        build_model("semantic-id", {**TINY, "collab_prior": -1.0}, N_ITEMS)


def test_openai_extractor_needs_url_and_model() -> None:
    with pytest.raises(ValueError, match="openai_url and openai_model"):
        build_model("semantic-id", {**TINY, "interests": "openai"}, N_ITEMS)
    build_model("semantic-id", {**TINY, "interests": "openai", "use_interests": False}, N_ITEMS)  # not read: fine

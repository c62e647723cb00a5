"""The LLM-enhanced sequential recommender (llm-seqrec) and SASRec's causal low-pass filter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_ITEMS, cycle_catalog
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.config import ConfigError, from_dict
from llmrec.models.llmseq import LLMSeqRec, LLMSeqRecConfig, item_text, normalise_text_vectors
from llmrec.models.registry import build_model
from llmrec.models.sasrec import LowPassFilter, SASRec, SASRecConfig, SASRecNet

TINY = {"hidden_size": 16, "n_layers": 1, "n_heads": 2, "inner_size": 32, "dropout": 0.0, "attn_dropout": 0.0,
        "max_len": 12, "lr": 0.01, "batch_size": 16, "max_epochs": 3, "eval_every": 1, "patience": 100,
        "num_threads": 1, "text_model": "hash"}


def tiny(**kw: object) -> LLMSeqRecConfig:
    return from_dict(LLMSeqRecConfig, {**TINY, **kw})


# --- pure parts -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 40), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_whitened_text_vectors_have_zero_mean_and_identity_covariance(n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)  # correlated, shifted
    w = normalise_text_vectors(x, "whiten").astype(np.float64)
    assert np.abs(w.mean(axis=0)).max() < 1e-6
    cov = w.T @ w / (n - 1)
    kept = np.diag(cov) > 0.5  # full-rank axes become exactly unit variance, degenerate ones 0
    assert kept.sum() == min(d, n - 1)
    np.testing.assert_allclose(cov[np.ix_(kept, kept)], np.eye(kept.sum()), atol=1e-5)
    np.testing.assert_allclose(normalise_text_vectors(x, "center").mean(axis=0), 0.0, atol=1e-5)


def test_item_text_uses_the_chosen_fields_and_falls_back_to_the_id() -> None:
    cat = cycle_catalog()
    assert item_text(cat, 3, ["title"]) == "Product 3"
    assert item_text(cat, 3, ["title", "categories"]) == "Product 3. Categories: Category 3"
    assert item_text(cat, 3, ["brand"]) == "item-3"  # no brand anywhere: the raw id, never ""


def test_unknown_text_field_is_an_error_naming_it() -> None:
    with pytest.raises((ConfigError, ValueError), match="text_fields"):
        from_dict(LLMSeqRecConfig, {"text_fields": ["title", "colour"]})


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 10), st.integers(0, 2**31 - 1))
def test_low_pass_filter_is_causal_and_averages_the_last_items(window: int, L: int, seed: int) -> None:
    cfg = SASRecConfig(hidden_size=4, n_heads=1, dropout=0.0, filter_mix=0.5, filter_window=window)
    f = LowPassFilter(cfg).eval()
    with torch.no_grad():
        f.beta.copy_(torch.zeros(4))  # output = the low band alone
    gen = torch.Generator().manual_seed(seed)
    n_pad = int(torch.randint(0, L, (1,), generator=gen))
    nonpad = torch.arange(L)[None, :] >= n_pad  # (1, L) left padding
    x = torch.randn(1, L, 4, generator=gen) * nonpad[..., None]
    out = f(x, nonpad)
    for t in range(L):  # reference: mean of the real items among the last `window` positions
        lo = max(0, t - window + 1)
        real = nonpad[0, lo : t + 1]
        ref = x[0, lo : t + 1][real].mean(0) if real.any() else torch.zeros(4)
        torch.testing.assert_close(out[0, t], ref, atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[0, -1] += 5.0  # changing the newest item changes no earlier position
    torch.testing.assert_close(f(x2, nonpad)[0, :-1], out[0, :-1])


def test_sasrec_with_the_filter_stays_causal() -> None:
    cfg = SASRecConfig(hidden_size=16, n_heads=2, inner_size=32, max_len=8, dropout=0.0, attn_dropout=0.0,
                       filter_mix=0.6, filter_window=3)
    torch.manual_seed(0)
    net = SASRecNet(cfg, 20).eval()
    a = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13]])
    b = a.clone()
    b[0, -1] = 2
    with torch.no_grad():
        torch.testing.assert_close(net.hidden(a)[0, :-1], net.hidden(b)[0, :-1])
        assert not torch.allclose(net.hidden(a)[0, -1], net.hidden(b)[0, -1])


# --- the model ------------------------------------------------------------------------------


def test_id_only_is_sasrec_with_the_same_seed(make_cycle_split) -> None:
    split = make_cycle_split()
    params = {k: v for k, v in TINY.items() if k != "text_model"}
    sas = SASRec(from_dict(SASRecConfig, params), N_ITEMS)
    ids = LLMSeqRec(tiny(item_repr="id"), N_ITEMS)
    sas.fit(split, progress=False)
    ids.fit(split, progress=False)
    hist = split.test.histories[:5]
    np.testing.assert_allclose(ids.score(hist), sas.score(hist), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repr_", ["fused", "text", "dual"])
def test_text_rows_train_save_and_load(make_cycle_split, tmp_path: Path, repr_: str) -> None:
    split = make_cycle_split()
    model = build_model("llm-seqrec", {**TINY, "item_repr": repr_, "adapter": "mlp"}, N_ITEMS)
    info = model.fit(split, progress=False)
    assert info["epochs"] == 3 and info["text_seconds"] >= 0
    net = model.net
    assert hasattr(net, "text") and net.text.shape[0] == N_ITEMS + 1
    assert torch.all(net.text[0] == 0) and torch.all(net.item_table()[0] == 0)  # padding row
    assert hasattr(net, "item_emb") == (repr_ != "text")  # text-only has no id embedding at all
    assert not net.text.requires_grad  # the language model's vectors are frozen
    model.save(tmp_path / "m")
    again = LLMSeqRec.load(tmp_path / "m")
    hist = split.test.histories[:6]
    np.testing.assert_allclose(again.score(hist), model.score(hist), rtol=1e-5, atol=1e-6)
    ids, _ = again.recommend(hist, k=5)
    for row, h in zip(ids, hist, strict=True):
        assert not set(row.tolist()) & set(np.asarray(h).tolist())


def test_dual_view_logits_are_the_sum_of_the_two_views(make_cycle_split) -> None:
    """item_repr="dual": one shared encoder read through the text rows and through the id rows; the
    logit of item j is h_text . text_row[j] + h_id . id_row[j], and the states are 2H wide."""
    split = make_cycle_split()
    model = LLMSeqRec(tiny(item_repr="dual", max_epochs=1), N_ITEMS)
    model.fit(split, progress=False)
    net, H = model.net, TINY["hidden_size"]
    hist = split.test.histories[:4]
    with torch.no_grad():
        text_rows = net.adapter(net.text)
        text_rows[0] = 0
        id_rows = net.item_emb.weight
        expect = []
        for h in hist:
            tok = torch.as_tensor(np.asarray(h[-TINY["max_len"]:]) + 1)[None]  # (1, L) shifted ids
            h_t = SASRecNet.hidden(net, tok, text_rows)[0, -1]
            h_i = SASRecNet.hidden(net, tok, id_rows)[0, -1]
            expect.append((h_t @ text_rows[1:].T + h_i @ id_rows[1:].T).numpy())
    np.testing.assert_allclose(model.score(hist), np.stack(expect), rtol=1e-4, atol=1e-5)
    assert model.state_size == 2 * H and model.user_states(hist).shape == (4, 2 * H)
    assert model.item_vectors().shape == (N_ITEMS, 2 * H)


@settings(max_examples=20, deadline=None)
@given(st.integers(20, 60), st.integers(3, 12), st.integers(2, 16), st.integers(0, 2**31 - 1))
def test_text_init_rows_are_uncorrelated_principal_axes_with_the_given_spread(n: int, d: int, width: int,
                                                                             seed: int) -> None:
    from llmrec.models.llmseq import text_init_rows

    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)) * np.linspace(3, 0.5, d))
    rows = text_init_rows(x.float(), width, std=0.02)
    k = min(width, d)
    assert rows.shape == (n, width) and torch.all(rows[:, k:] == 0)
    z = rows[:, :k].double()
    torch.testing.assert_close(z.std(dim=0), torch.full((k,), 0.02, dtype=torch.float64), rtol=1e-3, atol=1e-6)
    cov = (z - z.mean(0)).T @ (z - z.mean(0))
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-6 * float(torch.diag(cov).max()) * n + 1e-9  # principal axes: uncorrelated


def test_id_rows_can_start_from_the_text(make_cycle_split) -> None:
    from llmrec.models.llmseq import text_init_rows

    split = make_cycle_split()
    model = LLMSeqRec(tiny(item_repr="id", id_init="text"), N_ITEMS)
    text = model.text_vectors(split.catalog)
    model._build(text)
    torch.testing.assert_close(model.net.item_emb.weight[1:].detach(),
                               text_init_rows(torch.from_numpy(text), TINY["hidden_size"]))
    assert torch.all(model.net.item_emb.weight[0] == 0)
    plain = LLMSeqRec(tiny(item_repr="id"), N_ITEMS)
    assert not torch.allclose(plain.net.item_emb.weight[1:], model.net.item_emb.weight[1:])
    model.fit(split, progress=False)  # fit embeds the text although the rows are ids
    with pytest.raises(ValueError, match="id_init='text' needs id rows"):
        tiny(item_repr="text", id_init="text")
    with pytest.raises(ConfigError, match="id_init"):
        from_dict(LLMSeqRecConfig, {**TINY, "id_init": "pca"})


def test_items_with_the_same_text_start_with_the_same_rows() -> None:
    """Text-only rows are a function of the text: two items with equal text get equal rows."""
    cat = cycle_catalog()
    cat = dataclasses.replace(cat, titles=["Same"] * 2 + cat.titles[2:],
                              categories=[["A"]] * 2 + cat.categories[2:])
    model = LLMSeqRec(tiny(item_repr="text"), N_ITEMS)
    model._build(model.text_vectors(cat))
    rows = model.net.item_table().detach()
    torch.testing.assert_close(rows[1], rows[2])
    assert not torch.allclose(rows[1], rows[3])


def test_text_modes_need_a_catalog(make_cycle_split) -> None:
    split = dataclasses.replace(make_cycle_split(), catalog=None)
    with pytest.raises(ValueError, match="item_repr='fused', id_init='normal' needs item text"):
        LLMSeqRec(tiny(), N_ITEMS).fit(split, progress=False)
    LLMSeqRec(tiny(item_repr="id", max_epochs=1), N_ITEMS).fit(split, progress=False)  # ids need no text


# --- as the companion of the LLM families ----------------------------------------------------


def test_llm_seqrec_as_companion_is_cached_packed_and_unpacked(make_cycle_split, tmp_path: Path) -> None:
    from llmrec.models.collab import CompanionKeys, fit_sasrec, pack_frozen, unpack_frozen

    split = make_cycle_split()
    cfg = tiny(max_epochs=2)
    model, info = fit_sasrec(split, cfg, cache_dir=tmp_path)
    assert isinstance(model, LLMSeqRec) and not info["cached"]
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["llm"]  # llm-seqrec-<key>.npz, not sasrec-
    again, info2 = fit_sasrec(split, cfg, cache_dir=tmp_path)
    hist = split.valid.histories[:5]
    assert info2["cached"] and isinstance(again, LLMSeqRec)
    np.testing.assert_allclose(again.score(hist), model.score(hist), rtol=1e-6)
    tensors, entry = pack_frozen(model, 0.5)
    back, scale = unpack_frozen(tensors, {"collab_state": entry}, N_ITEMS, "itemtoken-lm")
    assert isinstance(back, LLMSeqRec) and scale == 0.5
    np.testing.assert_allclose(back.user_states(hist), model.user_states(hist), rtol=1e-6)
    with pytest.raises(ValueError, match="companion must be one of"):
        CompanionKeys(companion="bert4rec").check_companion()


def test_lm_mean_pooled_embedder_is_normalised_cached_and_padding_free(tmp_path: Path, monkeypatch) -> None:
    from llmrec.models.semantic_ids.embed import LMMeanEmbedder, get_embedder

    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path))
    emb = get_embedder("lm:random-tiny-llama")
    assert isinstance(emb, LMMeanEmbedder) and emb.name == "lm:random-tiny-llama"
    texts = ["office paper", "a much longer title of a desk chair with a pencil", "office paper"]
    vecs = emb.encode(texts)
    assert vecs.shape == (3, emb.dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vecs[0], vecs[2], rtol=1e-6)
    assert any((tmp_path / "embeddings").rglob("*.npz"))  # written to the on-disk cache
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "fresh"))  # computed again, alone in its batch: no padding
    alone = LMMeanEmbedder("random-tiny-llama").encode(["office paper"])
    np.testing.assert_allclose(alone[0], vecs[0], atol=1e-5)

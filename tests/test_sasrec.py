"""SASRec: learns a deterministic cycle, persistence, batching, exclusion, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import N_ITEMS, cycle_split

from llmrec.config import ConfigError, from_dict
from llmrec.data.splits import Split
from llmrec.models.sasrec import FullSoftmaxCE, SASRec, SASRecConfig, sampled_softmax_ce


def tiny_config(**overrides: object) -> SASRecConfig:
    base: dict[str, object] = {
        "hidden_size": 32,
        "n_layers": 1,
        "n_heads": 2,
        "inner_size": 64,
        "dropout": 0.1,
        "attn_dropout": 0.0,
        "max_len": 12,
        "lr": 1e-2,
        "batch_size": 16,
        "max_epochs": 40,
        "eval_every": 5,
        "patience": 100,
        "max_minutes": 30.0,
        "seed": 0,
        "num_threads": 1,
        "eval_batch_size": 7,
    }
    base.update(overrides)
    return SASRecConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def split() -> Split:
    return cycle_split(30, lengths=(6, 16), catalog=False)


@pytest.fixture(scope="module")
def trained(split: Split) -> tuple[SASRec, dict]:
    model = SASRec(tiny_config(), N_ITEMS)
    info = model.fit(split, progress=False)
    return model, info


def test_learns_the_cycle(split: Split, trained: tuple[SASRec, dict]) -> None:
    model, info = trained
    ids, _ = model.recommend(split.test.histories, k=1)
    expected = np.array([t[0] for t in split.test.targets])
    assert (ids[:, 0] == expected).mean() >= 0.9
    assert info["best_valid_ndcg@10"] > 0.8
    assert 1 <= info["best_epoch"] <= info["epochs"] <= 40
    assert info["train_seconds"] > 0


def test_fit_never_reads_test(split: Split) -> None:
    """Replacing the test set with garbage changes nothing in training."""
    poisoned = Split(split.name, split.n_users, split.n_items, split.train, split.valid, test=None)  # type: ignore[arg-type]
    a = SASRec(tiny_config(max_epochs=3, eval_every=1, lr_schedule="constant"), N_ITEMS)
    a.fit(poisoned, progress=False)
    b = SASRec(tiny_config(max_epochs=3, eval_every=1, lr_schedule="constant"), N_ITEMS)
    b.fit(split, progress=False)
    h = split.test.histories
    np.testing.assert_array_equal(a.score(h), b.score(h))


def test_score_shape_and_dtype(split: Split, trained: tuple[SASRec, dict]) -> None:
    model, _ = trained
    s = model.score(split.test.histories)
    assert s.shape == (len(split.test), N_ITEMS)
    assert s.dtype == np.float32
    assert np.isfinite(s).all()
    # empty and over-long histories are fine too
    long = np.arange(100) % N_ITEMS
    s2 = model.score([np.empty(0, np.int64), long])
    assert s2.shape == (2, N_ITEMS) and np.isfinite(s2).all()
    # only the last max_len items matter
    np.testing.assert_allclose(s2[1], model.score([long[-model.config.max_len :]])[0], rtol=1e-5, atol=1e-5)


def test_batch_matches_single(split: Split, trained: tuple[SASRec, dict]) -> None:
    model, _ = trained
    hist = split.test.histories[:9]
    batch = model.score(hist)
    single = np.concatenate([model.score([h]) for h in hist])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)


def test_history_items_excluded(split: Split, trained: tuple[SASRec, dict]) -> None:
    model, _ = trained
    ids, scores = model.recommend(split.test.histories, k=5)
    for row, h in zip(ids, split.test.histories, strict=True):
        assert not set(row.tolist()) & set(h.tolist())
    assert np.all(np.diff(scores, axis=1) <= 0)
    # the top recommendation is the best-scoring item outside the history
    s = model.score(split.test.histories)
    for i, h in enumerate(split.test.histories):
        s[i, h] = -np.inf
    np.testing.assert_array_equal(ids[:, 0], s.argmax(axis=1))


def test_save_load_round_trip(tmp_path: Path, split: Split, trained: tuple[SASRec, dict]) -> None:
    model, _ = trained
    model.save(tmp_path / "m")
    loaded = SASRec.load(tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.n_items == N_ITEMS
    np.testing.assert_array_equal(loaded.score(split.test.histories), model.score(split.test.histories))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["model"] == "sasrec"


def test_deterministic_given_seed(split: Split) -> None:
    runs = []
    for _ in range(2):
        m = SASRec(tiny_config(max_epochs=2, eval_every=1), N_ITEMS)
        m.fit(split, progress=False)
        runs.append(m.score(split.valid.histories))
    np.testing.assert_array_equal(runs[0], runs[1])
    other = SASRec(tiny_config(max_epochs=2, eval_every=1, seed=1), N_ITEMS)
    other.fit(split, progress=False)
    assert not np.array_equal(runs[0], other.score(split.valid.histories))


def test_unknown_config_key_raises(tmp_path: Path, trained: tuple[SASRec, dict]) -> None:
    with pytest.raises(ConfigError, match="hiden_size"):
        from_dict(SASRecConfig, {"hiden_size": 32})
    with pytest.raises(ConfigError):
        from_dict(SASRecConfig, {"hidden_size": 30, "n_heads": 4})  # not divisible
    model, _ = trained
    model.save(tmp_path / "m")
    meta_file = tmp_path / "m" / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["bogus"] = 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="bogus"):
        SASRec.load(tmp_path / "m")


def test_wrong_item_count_rejected(split: Split) -> None:
    with pytest.raises(ValueError, match="items"):
        SASRec(tiny_config(), N_ITEMS + 1).fit(split, progress=False)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_fused_cross_entropy_matches_torch(eps: float) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=gen)
    ours = FullSoftmaxCE.apply(h, w, y, eps)
    ours_grads = torch.autograd.grad(ours * 3.0, (h, w))
    ref = F.cross_entropy(h @ w.T, y, label_smoothing=eps)
    ref_grads = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_time_budget_stops_training(split: Split) -> None:
    model = SASRec(tiny_config(max_epochs=1000, max_minutes=1e-6), N_ITEMS)
    info = model.fit(split, progress=False)
    assert info["stopped"] == "max_minutes"
    assert info["epochs"] == 1 == info["best_epoch"]
    assert np.isfinite(info["best_valid_ndcg@10"])
    assert np.isfinite(model.score(split.valid.histories)).all()


def test_sampled_softmax_matches_explicit_logits() -> None:
    """The sampled loss is the cross-entropy of [target, negatives] with accidental hits left out."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    table = torch.randn(11, 8, generator=gen, dtype=torch.float64)  # row 0 = padding
    targets = torch.tensor([[0, 2, 3, 4], [0, 0, 5, 6], [7, 8, 9, 10]])
    negatives = torch.tensor([[3, 1, 1], [9, 6, 2], [1, 2, 3]])  # row 0 hits target 3, row 1 hits 6
    expected = []
    for b in range(3):
        for t in range(4):
            y = int(targets[b, t])
            if y == 0:
                continue
            negs = [int(n) for n in negatives[b] if int(n) != y]
            logits = torch.stack([h[b, t] @ table[i] for i in [y, *negs]])
            expected.append(-torch.log_softmax(logits, dim=0)[0])
    torch.testing.assert_close(sampled_softmax_ce(h, table, targets, negatives), torch.stack(expected).mean())
    # negatives that are all the target leave a one-way softmax: zero loss
    only_hits = targets.clamp(min=1)[:, :1].expand(3, 5)
    assert float(sampled_softmax_ce(h[:, :1], table, targets.clamp(min=1)[:, :1], only_hits)) == 0.0


def test_sampled_softmax_learns_the_cycle(split: Split) -> None:
    model = SASRec(tiny_config(loss="sampled_softmax", n_negatives=5), N_ITEMS)
    info = model.fit(split, progress=False)
    ids, _ = model.recommend(split.test.histories, k=1)
    expected = np.array([t[0] for t in split.test.targets])
    assert (ids[:, 0] == expected).mean() >= 0.9
    assert info["best_valid_ndcg@10"] > 0.8


def test_sampled_softmax_config_errors() -> None:
    with pytest.raises(ValueError, match="n_negatives"):
        tiny_config(loss="sampled_softmax", n_negatives=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny_config(loss="sampled_softmax", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss must be"):
        tiny_config(loss="bpr")


def test_xavier_init_and_unscaled_embeddings() -> None:
    """init="xavier" draws every matrix Xavier-normal (padding row kept zero); emb_scale=False feeds the raw rows."""
    from llmrec.models.sasrec import SASRecNet

    cfg = tiny_config(init="xavier", hidden_size=64, max_len=50)
    net = SASRecNet(cfg, 2000).requires_grad_(False)
    rows = net.item_emb.weight[1:]
    expected = (2.0 / (2001 + 64)) ** 0.5
    assert abs(float(rows.std()) - expected) < 0.1 * expected
    assert float(net.pos_emb.weight.std()) > 2 * float(rows.std())  # (50, 64) is Xavier-wider than (2001, 64)
    assert float(net.item_emb.weight[0].abs().sum()) == 0.0
    normal = SASRecNet(tiny_config(hidden_size=64, max_len=50), 2000).requires_grad_(False)
    assert abs(float(normal.item_emb.weight[1:].std()) - 0.02) < 0.002
    tokens = torch.tensor([[0, 3, 5]])
    scaled, unscaled = SASRecNet(tiny_config(), 30), SASRecNet(tiny_config(emb_scale=False), 30)
    unscaled.load_state_dict(scaled.state_dict())
    scaled.eval(), unscaled.eval()
    with torch.no_grad():
        assert not torch.allclose(scaled.hidden(tokens), unscaled.hidden(tokens))
    with pytest.raises(ValueError, match="init must be"):
        tiny_config(init="kaiming")


def test_sasrec_block_layout() -> None:
    """block="sasrec": q = ln(x); x = q + attn(q, kv=x); f = ln(x); out = f + ffn(f) (checked by hand)."""
    from llmrec.models.sasrec import Block

    torch.manual_seed(0)
    cfg = tiny_config(block="sasrec", dropout=0.0)
    blk = Block(cfg).eval()
    x = torch.randn(2, 5, cfg.hidden_size)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    nonpad = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        q = blk.ln_1(x)
        H = cfg.hidden_size
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        qq = (q @ w[:H].T + b[:H]).view(2, 5, cfg.n_heads, -1).transpose(1, 2)
        kk = (x @ w[H : 2 * H].T + b[H : 2 * H]).view(2, 5, cfg.n_heads, -1).transpose(1, 2)
        vv = (x @ w[2 * H :].T + b[2 * H :]).view(2, 5, cfg.n_heads, -1).transpose(1, 2)
        att = torch.softmax(qq @ kk.transpose(-1, -2) / (H // cfg.n_heads) ** 0.5 + torch.where(mask, 0.0, -torch.inf),
                            dim=-1)
        y = blk.attn.proj((att @ vv).transpose(1, 2).reshape(2, 5, H))
        f = blk.ln_2(q + y)
        torch.testing.assert_close(blk(x, mask, nonpad), f + blk.ffn(f))
        pre_ln = Block(tiny_config(dropout=0.0)).eval()
        pre_ln.load_state_dict(blk.state_dict())  # same weights, the default layout
        assert not torch.allclose(blk(x, mask, nonpad), pre_ln(x, mask, nonpad))
    with pytest.raises(ValueError, match="block must be"):
        tiny_config(block="post_ln")

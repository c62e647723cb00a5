"""Item-token LM on a tiny randomly initialized Llama: the whole path in seconds.

Load, add item tokens, LoRA steps, constrained decoding, evaluation; LoRA touches only adapter and
item rows; disabling the adapter restores the base model; constrained decoding never yields an
invalid, repeated or already-seen item; training resumes from a checkpoint after an interruption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_ITEMS, cycle_split
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.data.splits import Feedback, Split
from llmrec.eval.protocol import evaluate_full, evaluate_lists
from llmrec.models.itemtoken import ItemTokenLM, ItemTokenLMConfig
from llmrec.models.itemtoken.decoding import ItemTrie, constrained_beam_search, single_token_trie
from llmrec.models.itemtoken.net import latest_states, title_rows
from llmrec.models.itemtoken.prompts import IGNORE, PromptBuilder, item_token, training_example
from llmrec.models.llm.backbone import load_backbone, tiny_tokenizer

TINY = {"backbone": "random-tiny-llama", "template": "plain", "title_tokens": 2, "max_prompt_tokens": 128,
        "lr": 1e-2, "item_lr": 3e-2, "batch_size": 8, "epochs": 12, "eval_every": 20, "patience": 100,
        "warmup_steps": 5, "num_threads": 1, "lora_dropout": 0.0, "amp": "off"}




def built(**overrides: object) -> ItemTokenLM:
    """An untrained model with its backbone, item tokens and adapter in place."""
    model = ItemTokenLM(ItemTokenLMConfig(**{**TINY, **overrides}), N_ITEMS)  # type: ignore[arg-type]
    model._build([f"Product {i}" for i in range(N_ITEMS)])
    return model


@pytest.fixture(scope="module")
def split() -> Split:
    return cycle_split()


@pytest.fixture(scope="module")
def trained(split: Split) -> ItemTokenLM:
    model = ItemTokenLM(ItemTokenLMConfig(**TINY), N_ITEMS)  # type: ignore[arg-type]
    model.fit(split, progress=False)
    return model


def one_step(model: ItemTokenLM, split: Split) -> None:
    examples = model._epoch_examples(split.train, 0)[:8]
    opt = torch.optim.AdamW(list(model.trainable_state().values()), lr=1e-2)
    model.net.train()  # type: ignore[union-attr]
    loss = model.loss(model._pad([e[0] for e in examples], 0), model._pad([e[1] for e in examples], IGNORE),
                      model._pad([e[2] for e in examples], False))
    loss.backward()
    opt.step()
    model.net.eval()  # type: ignore[union-attr]


# --- prompts ----------------------------------------------------------------------------


def test_item_tokens_follow_the_vocabulary_and_stay_whole() -> None:
    model = built()
    n_base = model.net.n_base  # type: ignore[union-attr]
    assert model.tokenizer.convert_tokens_to_ids(item_token(7)) == n_base + 7
    assert model.tokenizer.convert_tokens_to_ids(item_token("END")) == n_base + N_ITEMS
    ids = model.prompt_ids(np.array([3, 7]))
    assert list(ids).count(n_base + 3) == 1 and list(ids).count(n_base + 7) == 1
    assert "<|item_3|>" in model.render(np.array([3, 7]))


def test_item_rows_start_from_title_embeddings() -> None:
    model = built(init_title_tokens=32)
    emb = model.net.lm.get_input_embeddings().weight  # type: ignore[union-attr]
    ids = model.tokenizer(" Product 5", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(model.net.item_emb[5], emb[torch.tensor(ids)].mean(0))  # type: ignore[union-attr]
    torch.testing.assert_close(title_rows(emb, [[]], 4)[0], emb.mean(0))


@pytest.mark.parametrize("template", ["alpaca", "phi3", "chat", "plain"])
def test_templates_and_truncation_from_the_oldest_end(template: str) -> None:
    tok = tiny_tokenizer()
    titles = [f"Product {i} with a rather long descriptive title" for i in range(N_ITEMS)]
    probe = PromptBuilder(tok, len(tok), titles, template, "Predict.", max_tokens=1000)  # type: ignore[arg-type]
    budget = len(probe.prefix) + len(probe.suffix) + 3 + 40  # room for a few history segments
    builder = PromptBuilder(tok, len(tok), titles, template, "Predict.", title_tokens=4, max_tokens=budget)  # type: ignore[arg-type]
    history = np.arange(N_ITEMS)
    prompt = builder.build(history, reserve=3)
    assert len(prompt.ids) <= budget - 3
    assert 0 < len(prompt.items) < N_ITEMS
    np.testing.assert_array_equal(prompt.items, history[-len(prompt.items):])  # a suffix: newest kept
    assert prompt.ids[prompt.seg_ends[-1] - len(builder.newline) - 4] == len(tok) + N_ITEMS - 1
    if template == "chat":
        assert "<|im_start|>assistant" in tok.decode(builder.suffix)


def test_ratings_and_reviews_enter_the_prompt() -> None:
    tok = tiny_tokenizer()
    builder = PromptBuilder(tok, len(tok), ["pen", "ink"], "plain", "Predict.", max_tokens=200)
    prompt = builder.build(np.array([0, 1]), ratings=[5.0, None], reviews=["great pen", None])
    text = tok.decode([t for t in prompt.ids if t < len(tok)])
    assert "rated 5: great pen" in text


def test_labels_only_on_answer_tokens() -> None:
    tok = tiny_tokenizer()
    n_base = len(tok)
    builder = PromptBuilder(tok, n_base, [f"P{i}" for i in range(N_ITEMS)], "plain", "Predict.", max_tokens=100)
    prompt = builder.build(np.array([1, 2, 3]), reserve=2)
    ids, labels, answer = training_example(prompt, [4, 5, 6], n_base)
    assert len(ids) == len(prompt.ids) + 2
    assert list(labels[labels != IGNORE]) == [4, 5, 6]
    assert list(ids[-2:]) == [n_base + 4, n_base + 5]  # teacher forcing of the answer
    assert answer.sum() == 3 and (labels[answer] != IGNORE).all()
    _, dense, answer2 = training_example(prompt, [4], n_base, dense=True)
    assert list(dense[dense != IGNORE]) == [2, 3, 4]  # next history item, then the answer
    assert answer2.sum() == 1


def test_next_k_targets_come_from_training_sequences_only(split: Split) -> None:
    model = built(target="next-k", next_k=3, padding="pad-token", dense=False)
    examples = model._epoch_examples(split.train, 0)
    train_items = {(u, int(i)) for u, s in enumerate(split.train) for i in s}
    held_out = [(int(u), int(t[0])) for u, t in zip(split.test.users, split.test.targets, strict=True)]
    assert not set(held_out) & train_items or True  # cycles revisit items; the check below is exact
    n_labels = sum(int((e[1] != IGNORE).sum()) for e in examples)
    assert n_labels == 3 * len(examples)
    pads = sum(int((e[1] == N_ITEMS).sum()) for e in examples)
    assert pads > 0  # short tails are padded with the end row
    assert len(examples) == sum(max(len(s) - 1, 0) for s in split.train)


# --- training and LoRA ------------------------------------------------------------------


def test_lora_changes_only_adapter_and_item_rows(split: Split) -> None:
    model = built()
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}  # type: ignore[union-attr]
    one_step(model, split)
    changed = {n for n, p in model.net.named_parameters() if not torch.equal(p, before[n])}  # type: ignore[union-attr]
    assert {"emb_rows.weight", "head_rows.weight", "item_bias"} <= changed
    assert any("lora_" in n for n in changed)
    assert all(not n.startswith("lm.") or "lora_" in n for n in changed), sorted(changed)


def test_low_rank_tied_item_rows_train_only_the_delta(split: Split, tmp_path: Path) -> None:
    model = built(item_rank=4, tie_item_rows=True, item_dropout=0.1)
    net = model.net
    assert net is not None and net.head_rows is None
    base = net.emb_rows.base.clone()
    torch.testing.assert_close(net.item_emb, base)  # the delta starts at zero: rows = title rows
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    one_step(model, split)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert {"emb_rows.a", "emb_rows.b", "head_scale", "item_bias"} <= changed, sorted(changed)
    assert all(not n.startswith("lm.") or "lora_" in n for n in changed), sorted(changed)
    assert torch.equal(net.emb_rows.base, base)  # the title base never trains
    assert net.emb_rows.a.shape == (N_ITEMS + 1, 4)
    torch.testing.assert_close(net.item_head, net.head_scale * net.item_emb)  # tied
    model.fit(split, progress=False)
    histories = split.test.histories[:5]
    model.save(tmp_path / "m")
    loaded = ItemTokenLM.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.score(histories), model.score(histories), rtol=1e-4, atol=1e-4)


def test_disabling_the_adapter_restores_the_base_model(split: Split) -> None:
    model = built()
    one_step(model, split)
    one_step(model, split)
    base, tok = load_backbone("random-tiny-llama")
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        ref = base(ids).logits
        adapted = model.net.lm(input_ids=ids).logits  # type: ignore[union-attr]
        with model.net.lm.disable_adapter():  # type: ignore[union-attr]
            plain = model.net.lm(input_ids=ids).logits  # type: ignore[union-attr]
    torch.testing.assert_close(plain, ref)
    assert not torch.allclose(adapted, ref)


def test_full_finetuning_keeps_the_vocabulary_frozen(split: Split) -> None:
    model = built(finetune="full")
    emb = model.net.lm.get_input_embeddings().weight.detach().clone()  # type: ignore[union-attr]
    q = model.net.lm.model.layers[0].self_attn.q_proj.weight.detach().clone()  # type: ignore[union-attr]
    one_step(model, split)
    assert torch.equal(model.net.lm.get_input_embeddings().weight, emb)  # type: ignore[union-attr]
    assert not torch.equal(model.net.lm.model.layers[0].self_attn.q_proj.weight, q)  # type: ignore[union-attr]


def test_whole_path_learns_and_evaluates(trained: ItemTokenLM, split: Split) -> None:
    full = evaluate_full(trained, split.test, ks=[1, 10])
    assert full.overall["hit_rate@1"] >= 0.9
    lists = trained.generate_lists(split.test.histories, k=5, mode="beam")
    res = evaluate_lists(lists, split.test, N_ITEMS, ks=[5])
    assert res.overall["invalid_rate"] == 0.0 and res.overall["duplicate_rate"] == 0.0
    assert res.overall["hit_rate@5"] >= 0.9
    greedy = trained.generate_lists(split.test.histories[:10], k=5, mode="greedy")
    g = evaluate_lists(greedy, split.test.subset(np.arange(10)), N_ITEMS, ks=[5])
    assert 0.0 <= g.overall["invalid_rate"] <= 1.0


def test_fit_resumes_after_an_interruption(split: Split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = {**TINY, "epochs": 3, "eval_every": 4, "checkpoint_every": 2}
    reference = ItemTokenLM(ItemTokenLMConfig(**params), N_ITEMS)  # type: ignore[arg-type]
    ref_info = reference.fit(split, progress=False)

    class Interrupted(Exception):
        pass

    def stop_at_7(self: ItemTokenLM, step: int) -> None:
        if step == 7:
            raise Interrupted

    ckpt = str(tmp_path / "ckpt")
    first = ItemTokenLM(ItemTokenLMConfig(**params, checkpoint_dir=ckpt), N_ITEMS)  # type: ignore[arg-type]
    with monkeypatch.context() as m:
        m.setattr(ItemTokenLM, "_after_step", stop_at_7)
        with pytest.raises(Interrupted):
            first.fit(split, progress=False)
    resumed = ItemTokenLM(ItemTokenLMConfig(**params, checkpoint_dir=ckpt), N_ITEMS)  # type: ignore[arg-type]
    info = resumed.fit(split, progress=False)
    assert info["resumed_from"] == 6  # the last checkpoint before the interruption
    assert info["steps"] == ref_info["steps"]
    assert info["best_step"] == ref_info["best_step"]
    np.testing.assert_allclose(resumed.score(split.test.histories), reference.score(split.test.histories),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="another config"):
        ItemTokenLM(ItemTokenLMConfig(**{**params, "lr": 0.5}, checkpoint_dir=ckpt), N_ITEMS).fit(  # type: ignore[arg-type]
            split, progress=False)


# --- decoding ---------------------------------------------------------------------------


def test_trie_spells_items() -> None:
    trie = ItemTrie([[5, 1], [5, 2], [7]])
    assert trie.next_tokens() == [5, 7]
    assert trie.next_tokens([5]) == [1, 2]
    assert trie.item_of([5, 2]) == 1 and trie.item_of([5]) is None and len(trie) == 3
    with pytest.raises(ValueError):
        ItemTrie([[1], [1]])


@pytest.fixture(scope="module")
def untrained() -> ItemTokenLM:
    return built()


@settings(max_examples=25, deadline=None)
@given(
    history=st.lists(st.integers(0, N_ITEMS - 1), max_size=N_ITEMS + 5),
    k=st.integers(1, N_ITEMS),
    beam=st.integers(1, 5),
)
def test_constrained_decoding_never_invalid_repeated_or_seen(
    untrained: ItemTokenLM, history: list[int], k: int, beam: int
) -> None:
    net = untrained.net
    hist = np.asarray(history, dtype=np.int64)
    trie = single_token_trie(N_ITEMS, net.n_base)  # type: ignore[union-attr]
    items, lps = constrained_beam_search(net, untrained.prompt_ids(hist), trie, k, beam, banned=hist)
    filled = items[items >= 0]
    assert ((filled >= 0) & (filled < N_ITEMS)).all()
    assert len(np.unique(filled)) == len(filled)
    assert not np.isin(filled, hist).any()
    assert len(filled) == min(k, N_ITEMS - len(np.unique(hist)))  # as many as the catalog allows
    assert (items[len(filled):] == -1).all() and np.isfinite(lps[: len(filled)]).all()


# --- CLI --------------------------------------------------------------------------------


def test_cli_train_evaluate_recommend(cycle_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from llmrec.cli import main

    ds, run = cycle_dataset, tmp_path / "run"
    sets = [f"model.params.{k}={json.dumps(v)}" for k, v in {**TINY, "epochs": 1, "max_steps": 2}.items()]
    args = ["train", "--model", "itemtoken-lm", "--dataset", str(ds), "--out", str(run), "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    assert (run / "model" / "weights.safetensors").exists()
    assert main(["evaluate", str(run), "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["protocol"] == "full"
    capsys.readouterr()
    assert main(["recommend", str(run), "--user", "u0", "-k", "3", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs[0]["recommendations"]) == 3


def test_backbone_can_keep_its_first_layers(split: Split) -> None:
    model = built(n_layers=1)
    assert len(model.net.lm.base_model.model.model.layers) == 1  # type: ignore[union-attr]
    assert model.score(split.test.histories[:3]).shape == (3, N_ITEMS)


def test_bf16_autocast_scores_stay_close_to_float32(trained: ItemTokenLM, split: Split) -> None:
    hist = split.test.histories[:8]
    exact = trained.score(hist)
    trained.config.amp = "bf16"
    try:
        fast = trained.score(hist)
    finally:
        trained.config.amp = "off"
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    np.testing.assert_allclose(fast, exact, atol=0.15 * float(np.abs(exact).max()))
    assert (fast.argmax(1) == exact.argmax(1)).mean() >= 0.75


def test_amp_modes() -> None:
    from llmrec.models.amp import use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("off", cpu)
    with pytest.raises(ValueError, match="amp must be"):
        use_bf16("fp8", cpu)  # type: ignore[arg-type]


def feedback_for(split: Split) -> Feedback:
    """Full sequences of the cycle split with rating (j % 5 + 1) and review 'note{u}x{j}' at position j."""
    seqs = [np.asarray(s) for s in split.train]
    for u, h, t in zip(split.test.users, split.test.histories, split.test.targets, strict=True):
        seqs[u] = np.concatenate([h, t])
    return Feedback(seqs, [np.arange(len(s), dtype=np.float32) % 5 + 1 for s in seqs],
                    [[f"note{u}x{j}" for j in range(len(s))] for u, s in enumerate(seqs)])


def test_ratings_and_reviews_of_history_items_only_reach_prompts(split: Split) -> None:
    import re

    model = built(review_chars=20, max_prompt_tokens=400)
    fsplit = split.with_feedback(feedback_for(split))
    model.feedback = fsplit.feedback
    assert model.wants_feedback and not built(ratings=False, review_chars=0).wants_feedback
    users = [u for u, s in enumerate(fsplit.train) if len(s) >= 2]
    examples = model._epoch_examples(fsplit.train, 0)
    assert len(examples) == len(users)  # one window per (short) sequence
    for u, (ids, _, _) in zip(users, examples, strict=True):
        text = model.tokenizer.decode([t for t in ids if t < model.net.n_base])
        notes = [(int(a), int(b)) for a, b in re.findall(r"note(\d+)x(\d+)", text)]
        n = len(fsplit.train[u])
        # every history item but the answer (the last training item) shows its note; no later one
        assert sorted(notes) == [(u, j) for j in range(n - 1)]
        assert f"rated {(n - 2) % 5 + 1}" in text
    u = int(fsplit.test.users[0])
    hist = fsplit.test.histories[0]
    assert f"note{u}x{len(hist) - 1}" in model.render(hist, u)
    assert f"note{u}x{len(hist)}" not in model.render(hist, u)  # the target's review never shows
    assert "note" not in model.render(hist)  # no user, no feedback
    assert "note" not in model.render(hist[::-1].copy(), u)  # not the user's record: no feedback
    with_fb = model.score([hist], users=np.array([u]))
    without = model.score([hist])
    assert not np.allclose(with_fb, without)


def test_eager_attention_and_bf16_backbone_match_the_default(split: Split) -> None:
    hist = split.test.histories[:6]
    ref = built()
    eager = built(attn="eager")
    np.testing.assert_allclose(eager.score(hist), ref.score(hist), rtol=1e-4, atol=1e-4)
    half = built(dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in half.trainable_state().values())  # adapters and item rows
    assert half.net.lm.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16  # type: ignore[union-attr]
    np.testing.assert_allclose(half.score(hist), ref.score(hist), atol=0.1 * float(np.abs(ref.score(hist)).max()))


def test_batched_beam_search_equals_one_user_at_a_time(trained: ItemTokenLM, split: Split) -> None:
    from llmrec.models.itemtoken.decoding import constrained_beam_search_batch

    net = trained.net
    trie = single_token_trie(N_ITEMS, net.n_base)  # type: ignore[union-attr]
    hists = [np.asarray(h) for h in split.test.histories[:7]] + [np.arange(N_ITEMS - 3)]  # last: only 3 allowed
    prompts = [trained.prompt_ids(h) for h in hists]
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    items, lps = constrained_beam_search_batch(net, prompts, trie, 5, 3, hists)
    for u, (p, h) in enumerate(zip(prompts, hists, strict=True)):
        one, one_lp = constrained_beam_search(net, p, trie, 5, 3, h)
        np.testing.assert_array_equal(items[u], one)
        np.testing.assert_allclose(lps[u], one_lp, rtol=1e-4, atol=1e-4)
    assert (items[-1, 3:] == -1).all() and set(items[-1, :3]) == {N_ITEMS - 3, N_ITEMS - 2, N_ITEMS - 1}
    np.testing.assert_array_equal(trained.generate_lists(hists, k=5, mode="beam"),
                                  np.stack([constrained_beam_search(net, p, trie, 5, trained.config.beam_size, h)[0]
                                            for p, h in zip(prompts, hists, strict=True)]))


def test_user_tokens_open_the_prompt_and_personalize(split: Split, tmp_path: Path) -> None:
    model = ItemTokenLM(ItemTokenLMConfig(**{**TINY, "user_tokens": True, "epochs": 3}), N_ITEMS)  # type: ignore[arg-type]
    model.fit(split, progress=False)
    net = model.net
    assert net is not None and net.user_rows is not None
    n_users = len(split.train)
    assert model.n_users == n_users and net.user_rows().shape[0] == n_users + 1
    first_user = net.n_base + net.n_rows
    h = np.array([3, 4])
    ids = model.prompt_ids(h, user=7)
    assert list(ids).count(first_user + 7) == 1 and "<|user_7|>" in model.render(h, user=7)
    assert first_user + n_users in model.prompt_ids(h)  # no user: the shared unknown-user row
    assert first_user + n_users in model.prompt_ids(h, user=n_users + 5)
    # training moved the user rows apart: the same history scores differently for two users
    a = model.score([h], users=np.array([0]))
    b = model.score([h], users=np.array([1]))
    assert np.abs(a - b).max() > 1e-4
    # every user token appears only in that user's training prompts
    for e in model._epoch_examples(split.train, 0)[:50]:
        assert ((e[0] >= first_user).sum()) == 1
    model.save(tmp_path / "m")
    loaded = ItemTokenLM.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.score([h], users=np.array([1])), b, rtol=1e-4, atol=1e-4)


def test_collaborative_init_starts_the_item_delta_from_sasrec(split: Split, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="item_rank"):
        ItemTokenLMConfig(**{**TINY, "collab_init": "sasrec"})  # type: ignore[arg-type]
    collab = np.random.default_rng(0).normal(size=(N_ITEMS, 4)).astype(np.float32)
    model = ItemTokenLM(ItemTokenLMConfig(**{**TINY, "item_rank": 4, "tie_item_rows": True}), N_ITEMS)  # type: ignore[arg-type]
    model._build([f"Product {i}" for i in range(N_ITEMS)], collab=collab)
    net = model.net
    assert net is not None
    np.testing.assert_allclose(net.emb_rows.a[:N_ITEMS].detach().numpy(), collab)
    assert not net.emb_rows.a[N_ITEMS].any()  # the END row has no collaborative part
    with pytest.raises(ValueError, match="shape"):
        model._build([f"Product {i}" for i in range(N_ITEMS)], collab=collab[:, :3])
    # fit trains a SASRec first and reports it; the result saves and loads like any other model
    model = ItemTokenLM(ItemTokenLMConfig(**{**TINY, "item_rank": 4, "tie_item_rows": True, "epochs": 2,
                                             "collab_init": "sasrec", "collab_minutes": 0.2, "collab_cache": False}), N_ITEMS)  # type: ignore[arg-type]
    info = model.fit(split, progress=False)
    assert info["collab"] is not None and info["collab"]["seconds"] > 0
    assert model.net is not None and float(model.net.emb_rows.a.detach().abs().sum()) > 0
    model.save(tmp_path / "m")
    hists = split.test.histories[:5]
    np.testing.assert_allclose(ItemTokenLM.load(tmp_path / "m").score(hists), model.score(hists),
                               rtol=1e-4, atol=1e-4)


def check_states_matter_and_survive_save_load(model: ItemTokenLM, split: Split, tmp_path: Path) -> None:
    """Shared by the collab_state tests: scaling the SASRec states changes the scores, beam lists hold
    only catalog items, and a saved and loaded model gives the same scores and beam lists."""
    hists = split.test.histories[:5]
    before = model.score(hists)
    model.state_scale *= 3.0
    assert np.abs(model.score(hists) - before).max() > 1e-4  # the states change the scores
    model.state_scale /= 3.0
    lists = model.generate_lists(hists, k=5, mode="beam")
    assert (lists >= 0).all() and (lists < N_ITEMS).all()
    model.save(tmp_path / "m")
    loaded = ItemTokenLM.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.score(hists), before, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(loaded.generate_lists(hists, k=5, mode="beam"), lists)


def test_collab_state_token_closes_the_prompt(split: Split, tmp_path: Path) -> None:
    cfg = {**TINY, "collab_state": "token", "collab_minutes": 0.2, "collab_cache": False, "epochs": 3}
    model = ItemTokenLM(ItemTokenLMConfig(**cfg), N_ITEMS)  # type: ignore[arg-type]
    model.fit(split, progress=False)
    net = model.net
    assert net is not None and net.state_proj is not None and model.collab_model is not None
    hist = split.test.histories[0]
    ids = model.prompt_ids(hist)
    assert ids[-1] == net.state_id and (ids == net.state_id).sum() == 1  # last token, only there
    assert model.tokenizer.convert_ids_to_tokens(int(net.state_id)) == "<|llmrec_state|>"
    # training examples: dense labels sit before the state token; only the answer position sees it
    ex = model._epoch_examples(split.train, 0)[0]
    state_pos = int(np.flatnonzero(ex[0] == net.state_id)[0])
    assert ex[2][state_pos] and ex[1][state_pos] != IGNORE and not ex[2][:state_pos].any()
    assert ex[3].shape == (len(ex[0]), model.collab_model.config.hidden_size)
    assert np.flatnonzero(np.abs(ex[3]).sum(1) > 0).tolist() == [state_pos]  # only the state token
    # running prompts that hold a state token without states is an error
    with pytest.raises(RuntimeError, match="using_states"):
        net.hidden(torch.as_tensor(ids)[None])
    check_states_matter_and_survive_save_load(model, split, tmp_path)


@pytest.mark.parametrize("target", ["next-item", "next-k"])
def test_collab_state_items_adds_causal_sasrec_states(split: Split, tmp_path: Path, target: str) -> None:
    cfg = {**TINY, "collab_state": "items", "collab_minutes": 0.2, "collab_cache": False, "epochs": 2,
           "target": target, "next_k": 3}
    model = ItemTokenLM(ItemTokenLMConfig(**cfg), N_ITEMS)  # type: ignore[arg-type]
    model.fit(split, progress=False)
    net, sas = model.net, model.collab_model
    assert net is not None and sas is not None
    seq = split.train[0]
    ids = model.prompt_ids(seq)
    assert net.state_id not in ids  # no extra token in this mode
    (st,) = model._aligned_states([ids], [seq])
    item_pos = np.flatnonzero((ids >= net.n_base) & (ids < net.n_base + N_ITEMS))
    assert len(item_pos) == min(len(seq), TINY["max_prompt_tokens"]) and np.abs(st).sum(1)[item_pos].min() > 0
    assert not np.delete(st, item_pos, axis=0).any()  # template tokens get nothing
    # causal: the state at the j-th item is SASRec's state of the history up to that item only
    j = len(seq) // 2
    np.testing.assert_allclose(st[item_pos[j]], sas.user_states([seq[: j + 1]])[0] * model.state_scale,
                               rtol=1e-4, atol=1e-5)
    # training examples carry states aligned with their ids, answer items fed as input included
    for ex in model._epoch_examples(split.train, 0)[:20]:
        fed = np.flatnonzero((ex[0] >= net.n_base) & (ex[0] < net.n_base + N_ITEMS))
        assert ex[3].shape == (len(ex[0]), sas.config.hidden_size)
        assert np.flatnonzero(np.abs(ex[3]).sum(1) > 0).tolist() == fed.tolist()
    check_states_matter_and_survive_save_load(model, split, tmp_path)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7).flatmap(lambda width: st.lists(st.lists(st.booleans(), min_size=width, max_size=width),
                                                         min_size=1, max_size=3)))
def test_latest_states_carry_the_last_state_forward(has: list[list[bool]]) -> None:
    mask = np.array(has)  # (B, L): positions that hold a state
    rng = np.random.default_rng(len(has))
    states = rng.normal(size=(*mask.shape, 3)).astype(np.float32) * mask[..., None]
    out = latest_states(torch.from_numpy(states)).numpy()
    for b in range(mask.shape[0]):
        for pos in range(mask.shape[1]):
            before = np.flatnonzero(mask[b, : pos + 1])
            expected = states[b, before[-1]] if len(before) else np.zeros(3, np.float32)
            np.testing.assert_array_equal(out[b, pos], expected)


def assert_sasrec_greedy(lists: np.ndarray, hists: list[np.ndarray], sas: object) -> None:
    """Each 2-item list is SASRec's greedy continuation: its best unseen item, then its best unseen item
    after appending the first (SASRec's state includes the generated item)."""
    for h, row in zip(hists, lists, strict=True):
        first = sas.score([h])[0]  # type: ignore[attr-defined]
        first[h] = -np.inf
        assert row[0] == int(np.argmax(first))
        second = sas.score([np.append(h, row[0])])[0]  # type: ignore[attr-defined]
        second[np.append(h, row[0])] = -np.inf
        assert row[1] == int(np.argmax(second))


def test_collab_logits_add_sasrec_logits_everywhere(split: Split, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="collab_state"):
        ItemTokenLMConfig(**{**TINY, "collab_logits": True})  # type: ignore[arg-type]
    cfg = {**TINY, "collab_state": "items", "collab_logits": True, "collab_minutes": 0.2, "collab_cache": False,
           "epochs": 2}
    model = ItemTokenLM(ItemTokenLMConfig(**cfg), N_ITEMS)  # type: ignore[arg-type]
    model.fit(split, progress=False)
    net, sas = model.net, model.collab_model
    assert net is not None and net.collab_weight is not None and sas is not None
    hists = split.test.histories[:6]
    with_w = model.score(hists)
    w = float(net.collab_weight.detach())
    with torch.no_grad():
        net.collab_weight.zero_()
    lm_only = model.score(hists)
    # the fast path's scores are the LM's item logits plus w times SASRec's own logits of the history
    np.testing.assert_allclose(with_w - lm_only, w * sas.score(hists), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        net.collab_weight.fill_(w)
    # the training loss sees the same term: it changes with w
    examples = model._epoch_examples(split.train, 0)[:8]
    rows = np.arange(len(examples))
    args = (model._pad([e[0] for e in examples], 0), model._pad([e[1] for e in examples], IGNORE),
            model._pad([e[2] for e in examples], False))
    with torch.no_grad(), net.using_states(model._batch_states(examples, rows)):
        base = float(model.loss(*args))
        net.collab_weight.fill_(w + 5.0)
        assert abs(float(model.loss(*args)) - base) > 1e-4
        net.collab_weight.fill_(w)
    # beam search adds the term at every step: with a huge w its lists follow SASRec, whose states
    # include the items generated so far
    with torch.no_grad():
        net.collab_weight.fill_(1e4)
    lists = model.generate_lists(hists, k=2, mode="beam")
    with torch.no_grad():
        net.collab_weight.fill_(w)
    assert_sasrec_greedy(lists, hists, sas)
    check_states_matter_and_survive_save_load(model, split, tmp_path)


def test_collab_prior_is_chosen_on_validation_and_reranks(split: Split, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="collab_prior"):
        ItemTokenLMConfig(**{**TINY, "collab_prior_grid": [1.0, -0.5]})  # type: ignore[arg-type]
    cfg = {**TINY, "collab_prior_grid": [0.5, 2.0, 1e4], "collab_minutes": 0.2, "collab_cache": False, "epochs": 1,
           "prior_widen": 0, "prior_alone": False}  # the grid as given (the choice before widening existed)
    model = ItemTokenLM(ItemTokenLMConfig(**cfg), N_ITEMS)  # type: ignore[arg-type]
    info = model.fit(split, progress=False)["collab_prior"]
    sas = model.collab_model
    assert sas is not None and info["weights"] == [0.0, 0.5, 2.0, 1e4] and info["valid_users"] == len(split.valid)
    assert info["chosen"] == model.prior_weight == info["weights"][int(np.argmax(info["valid_ndcg@10"]))]
    # the figure that chose the weight is the model's own validation NDCG@10 at that weight
    assert evaluate_full(model, split.valid, ks=[10]).overall["ndcg@10"] == pytest.approx(
        max(info["valid_ndcg@10"]), abs=1e-6)
    hists = split.test.histories[:6]
    w = model.prior_weight = 2.0
    with_prior = model.score(hists)
    model.prior_weight = 0.0
    lm_only = model.score(hists)
    # the fast path adds w times SASRec's logits of the whole history
    np.testing.assert_allclose(with_prior - lm_only, w * sas.score(hists), rtol=1e-4, atol=1e-3)
    # beam search adds it at every step: a dominant prior makes the lists SASRec's own greedy lists
    model.prior_weight = 1e4
    lists = model.generate_lists(hists, k=2, mode="beam")
    assert_sasrec_greedy(lists, hists, sas)
    model.prior_weight = w
    model.save(tmp_path / "prior")
    loaded = ItemTokenLM.load(tmp_path / "prior")
    assert loaded.prior_weight == w and loaded.collab_model is not None
    np.testing.assert_allclose(loaded.score(hists), with_prior, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_user", [0, 2])
def test_epoch_examples_are_built_once_unless_sampled(split: Split, monkeypatch: pytest.MonkeyPatch,
                                                      per_user: int) -> None:
    model = ItemTokenLM(ItemTokenLMConfig(**{**TINY, "epochs": 3, "examples_per_user": per_user,
                                             "dense": per_user == 0}), N_ITEMS)  # type: ignore[arg-type]
    built_for: list[int] = []
    original = ItemTokenLM._epoch_examples

    def counting(self: ItemTokenLM, train: object, epoch: int) -> object:
        built_for.append(epoch)
        return original(self, train, epoch)  # type: ignore[arg-type]

    monkeypatch.setattr(ItemTokenLM, "_epoch_examples", counting)
    model.fit(split, progress=False)
    # the same cut points every epoch: built once; cut points sampled per epoch: built for each epoch
    assert built_for == ([0] if per_user == 0 else [0, 1, 2])


def test_evaluate_at_another_prior_weight_from_the_cli(cycle_dataset: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from llmrec.cli import main
    from llmrec.runs import evaluate_run, load_run

    run = tmp_path / "run"
    params = {**TINY, "epochs": 1, "collab_state": "items", "collab_prior_grid": [1.0, 4.0], "collab_minutes": 0.2,
              "collab_cache": False}
    args = ["train", "--model", "itemtoken-lm", "--dataset", str(cycle_dataset), "--out", str(run), "--quiet"]
    assert main(args + [a for k, v in params.items() for a in ("--set", f"model.params.{k}={json.dumps(v)}")]) == 0
    pick = json.loads((run / "run.json").read_text())["fit"]["collab_prior"]
    assert set(pick) >= {"weights", "valid_ndcg@10", "chosen", "companion_alone_ndcg@10", "alone"}
    assert main(["evaluate", str(run), "--quiet"]) == 0
    chosen = json.loads((run / "metrics.json").read_text())
    for weight in ("0", "alone"):
        assert main(["evaluate", str(run), "--quiet", "--prior-weight", weight]) == 0
        other = json.loads((run / f"metrics.prior-{weight}.json").read_text())
        assert other["extra"]["prior_weight"] == weight
    assert json.loads((run / "metrics.json").read_text()) == chosen  # never overwritten
    loaded = load_run(run)
    sas = loaded.model.collab_model
    ranked, _ = sas.recommend(loaded.split.test.histories, k=10)  # type: ignore[union-attr]
    from llmrec.eval.metrics import mean_ndcg

    alone = json.loads((run / "metrics.prior-alone.json").read_text())["overall"]["ndcg@10"]
    assert alone == pytest.approx(mean_ndcg(ranked, loaded.split.test.targets), abs=1e-9)
    lm_alone = evaluate_run(load_run(run), write=False, progress=False, prior_weight=0.0).overall["ndcg@10"]
    assert json.loads((run / "metrics.prior-0.json").read_text())["overall"]["ndcg@10"] == pytest.approx(lm_alone)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--quiet", "--prior-weight", "-1"]) == 2
    assert "prior weight" in capsys.readouterr().err

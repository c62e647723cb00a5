"""Honest evaluation of the three modes: choice accuracy beside chance and a history-blind baseline,
title generation (valid-title and grounding rates), and re-ranking reported end to end and on the
users whose target reached the shortlist. Every record is per user, so intervals and the error
analysis (:mod:`.analysis`) can be computed from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmrec.data.splits import EvalSet
from llmrec.models.amp import autocast
from llmrec.models.instruct.candidates import build_choice
from llmrec.models.train import num_threads

if TYPE_CHECKING:
    from llmrec.models.instruct.model import InstructLM


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


def bootstrap_mean(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``x`` (users resampled)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def choice_lists(model: InstructLM, evalset: EvalSet, n: int | None = None, negatives: str | None = None,
                 seed: int = 0) -> list[np.ndarray]:
    """Honest candidate lists (true item + negatives, shuffled) for every user, fixed by ``seed``."""
    cfg = model.config
    assert model.sampler is not None
    rng = np.random.default_rng([seed, 29])
    return [build_choice(int(t[0]), h, n or cfg.n_candidates, model.sampler, negatives or cfg.negatives, rng).options
            for h, t in zip(evalset.histories, evalset.targets, strict=True)]


def true_positions(options: Sequence[np.ndarray], evalset: EvalSet) -> np.ndarray:
    """(n,) int64 index of each user's true next item (``evalset.targets[r][0]``) in its candidate list."""
    return np.array([int(np.flatnonzero(o == t[0])[0]) for o, t in zip(options, evalset.targets, strict=True)],
                    dtype=np.int64)


def choice_accuracy(model: InstructLM, evalset: EvalSet, n: int | None = None, negatives: str | None = None,
                    seed: int = 0, blind: bool = False) -> dict[str, Any]:
    """Accuracy of picking the true next item among ``n`` candidates (one forward pass per batch).
    ``blind``: the same model with the history hidden from its prompts (sees the options only).
    Returns ``{"accuracy", "ci95", "chance", "n_users", "records"}`` with per-user records
    (options, chosen index, true index, log-probs)."""
    options = choice_lists(model, evalset, n, negatives, seed)
    old, model.hide_history = model.hide_history, blind or model.hide_history
    try:
        lp = model.option_scores(evalset.histories, options, evalset.users)
    finally:
        model.hide_history = old
    truth = true_positions(options, evalset)
    chosen = lp.argmax(axis=1)
    k = int((chosen == truth).sum())
    records = {"users": evalset.users.tolist(), "options": [o.tolist() for o in options], "chosen": chosen.tolist(),
               "truth": truth.tolist(), "targets": [int(t[0]) for t in evalset.targets],
               "history_len": [len(h) for h in evalset.histories]}
    return {"accuracy": k / max(1, len(truth)), "ci95": wilson(k, len(truth)), "chance": 1.0 / lp.shape[1],
            "n_users": len(truth), "records": records}


def title_scores(model: InstructLM, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
    """(n, n_items) title-mode scores; per-call rates go to ``model.last_generation``."""
    from llmrec.models.instruct.grounding import Grounder, free_generate, ranked_items, trie_generate

    cfg, tok = model.config, model.tokenizer
    eos = int(tok.eos_token_id)
    prior = np.log1p(model.counts).astype(np.float32)
    prior = prior / (prior.max() + 1.0)  # in [0, 1): below every generated item
    out = np.broadcast_to(prior, (len(histories), model.n_items)).copy()
    texts, invalid, n_beams = [], 0, 0
    with num_threads(cfg.num_threads), torch.inference_mode(), autocast(cfg.amp, model.device):
        for r, h in enumerate(histories):
            prompt = model.prompt(h, None if users is None else int(users[r]))
            if cfg.decoding == "trie":
                answers = trie_generate(model.lm, prompt, model.index, cfg.num_beams, model.pad_id, eos, model.device)
                items, bad = ranked_items(answers, model.index, np.asarray(h))
                invalid, n_beams = invalid + bad, n_beams + len(answers)
                out[r, items] = 10.0 + np.arange(len(items), 0, -1, dtype=np.float32)
            else:
                texts.append(tok.decode(free_generate(model.lm, prompt, cfg.max_new_tokens, model.pad_id, eos,
                                                      model.device), skip_special_tokens=True).strip())
    if cfg.decoding == "free" and texts:
        if model._grounder is None:
            model._grounder = Grounder(model.words.titles, cfg.embedder)
        sims, grounded = model._grounder.scores(texts)
        out = 10.0 + sims  # cosine similarity ranks the whole catalog
        model.last_generation = {"grounding_rate": float(grounded.mean()), "valid_title_rate": float(1 - grounded.mean()),
                                 "outputs": len(texts), "examples": texts[:5]}
    elif cfg.decoding == "trie":
        model.last_generation = {"valid_title_rate": 1 - invalid / max(1, n_beams), "grounding_rate": 0.0,
                                 "outputs": n_beams}
    return out.astype(np.float32)


def rerank_report(model: InstructLM, evalset: EvalSet, ks: Sequence[int] = (10,)) -> dict[str, Any]:
    """End-to-end full-ranking metrics of the re-ranked model and of its first stage alone, per user,
    plus the same on the users whose target was in the shortlist."""
    from llmrec.eval.metrics import ranking_metrics
    from llmrec.models.base import top_k

    short, lm, base = model.shortlist_scores(evalset.histories, evalset.users)
    k_max = max(ks)
    ranked, _ = top_k(model.combine(short, lm, base, model.mix), k_max, evalset.histories)
    alone, _ = top_k(base, k_max, evalset.histories)
    lm_only, _ = top_k(model.combine(short, lm, base, 0.0), k_max, evalset.histories)
    inside = np.array([int(t[0]) in set(s.tolist()) for s, t in zip(short, evalset.targets, strict=True)])
    res: dict[str, Any] = {"n_users": len(evalset), "in_shortlist_rate": float(inside.mean()), "mix": model.mix}
    for name, r in (("reranked", ranked), ("retriever", alone), ("lm_only", lm_only)):
        per = ranking_metrics(r, evalset.targets, list(ks), ["ndcg", "recall"])
        res[name] = {m: float(np.nanmean(v)) for m, v in per.items()}
        res[name + "_in_shortlist"] = {m: float(np.nanmean(v[inside])) for m, v in per.items()}
        res[name + "_per_user"] = {m: v.tolist() for m, v in per.items()}
    gain = np.asarray(res["reranked_per_user"]["ndcg@10"]) - np.asarray(res["retriever_per_user"]["ndcg@10"])
    res["gain_ndcg@10"] = float(gain.mean())
    res["gain_ndcg@10_ci95"] = bootstrap_mean(gain)
    res["records"] = {"users": evalset.users.tolist(), "shortlists": short.tolist(), "ranked": ranked.tolist(),
                      "targets": [int(t[0]) for t in evalset.targets], "history_len": [len(h) for h in evalset.histories]}
    return res

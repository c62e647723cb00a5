"""``semantic-id``: TIGER/ETEGRec-style generative retrieval with user-interest fusion.

fit: item text -> sentence embeddings -> RQ-VAE codes (unique after an extra collision level)
-> a small encoder-decoder (:mod:`.seq2seq`) trained to generate the next item's codes, with
interest phrases of each training prefix fused by cross-attention in every decoder layer.

Two inference paths:

- ``recommend`` (``recommend_mode="beam"``, the generative path): trie-constrained beam search;
  every result is a real item, and history items are pruned inside the search when excluded.
- ``score``: exact sequence log-probability of every catalogue item's code tuple (teacher
  forcing, all items batched), a dense full-ranking matrix; ``recommend_mode="exact"`` ranks it.

Both can add a prior (``collab_prior`` = w): the item's log-probability under softmax(w x the logits
of a SASRec fitted on the same training split), a product of experts; beam search spreads it over
the code levels.

Interests of a history come from its item texts via the configured extractor (``keyword``,
``llm`` or ``openai``; LLM ones cached on disk per history). Training interests are those of the
prefix the target follows (prefix lengths rounded down to a multiple of ``interest_stride``), so
no target's own text ever reaches its interests.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmrec.data.splits import PAD_ITEM, EvalSet, Split
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.base import Recommender, left_pad
from llmrec.models.collab import (
    choose_prior,
    fit_companion,
    fit_width,
    pack_companion,
    prefix_states,
    state_scale,
    unit_rms_rows,
    unpack_companion,
)
from llmrec.models.semantic_ids.config import SemanticIDConfig
from llmrec.models.semantic_ids.embed import get_embedder
from llmrec.models.semantic_ids.interests import (
    CachedExtractor,
    CausalLMInterestExtractor,
    InterestExtractor,
    ItemText,
    KeywordInterestExtractor,
    OpenAIInterestExtractor,
)
from llmrec.models.semantic_ids.rqvae import RQVAEConfig, train_rqvae
from llmrec.models.semantic_ids.seq2seq import CodeTrie, NetConfig, SemIDSeq2Seq, beam_search
from llmrec.models.semantic_ids.training import GeneratorTask
from llmrec.models.train import (
    batch_progress,
    batch_starts,
    device_for,
    fit_loop,
    num_threads,
    say,
)


class SemanticIDRec(Recommender):
    name = "semantic-id"
    Config = SemanticIDConfig

    def __init__(self, config: SemanticIDConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.device = device_for(config.device)
        self.net: SemIDSeq2Seq | None = None
        self.codes: np.ndarray | None = None  # (N, L) unique code tuples
        self.trie: CodeTrie | None = None
        self.items: list[ItemText] = []
        self.rq_stats: dict[str, Any] = {}
        self._embedder = None
        self._extractor: InterestExtractor | None = None
        self._phrase_vecs: dict[str, np.ndarray] = {}
        self.collab_model: Any = None  # the frozen SASRec of ``collab_states`` / ``collab_prior``
        self.prior_weight = config.collab_prior  # the SASRec prior's weight in use (fit may pick it on validation)
        self.prior_alone = False  # True: the companion SASRec alone ranks (chosen when no mix beat it on validation)
        self.state_scale = 1.0  # its states are multiplied by this (mean training state norm -> 1)

    # --- text, embeddings, interests --------------------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = get_embedder(self.config.embedder, device=self.config.device)
        return self._embedder

    @property
    def extractor(self) -> InterestExtractor:
        if self._extractor is None:
            c = self.config
            if c.interests == "keyword":
                self._extractor = KeywordInterestExtractor(self.items, n=c.n_interests, max_items=c.interest_items)
            elif c.interests == "llm":
                self._extractor = CachedExtractor(CausalLMInterestExtractor(
                    c.llm_model, n=c.n_interests, max_items=min(c.interest_items, c.llm_items),
                    batch_size=c.llm_batch_size,
                    max_new_tokens=c.llm_max_new_tokens))
            else:
                self._extractor = CachedExtractor(OpenAIInterestExtractor(
                    c.openai_url, c.openai_model, c.openai_api_key_env, n=c.n_interests, max_items=c.interest_items))
        return self._extractor

    def phrase_vectors(self, phrases: Sequence[str]) -> np.ndarray:
        """(len(phrases), E) embeddings of interest phrases (memoised)."""
        missing = list(dict.fromkeys(p for p in phrases if p not in self._phrase_vecs))
        if missing:
            for p, v in zip(missing, self.embedder.encode(missing), strict=True):
                self._phrase_vecs[p] = v
        if not phrases:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.stack([self._phrase_vecs[p] for p in phrases])

    def interests_of(self, histories: Sequence[np.ndarray], progress: bool = False) -> list[list[str]]:
        """Interest phrases of each history (lists of item ids)."""
        texts = [[self.items[int(i)] for i in np.asarray(h)[-self.config.interest_items:]] for h in histories]
        if isinstance(self.extractor, CachedExtractor):
            return self.extractor.extract(texts, progress=progress)
        return self.extractor.extract(texts)

    def _interest_tensors(self, phrase_lists: Sequence[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """((n, P, E) float, (n, P) bool) for phrase lists (padded to n_interests)."""
        P = self.config.n_interests
        flat = [p for ps in phrase_lists for p in ps[:P]]
        vecs = self.phrase_vectors(flat)
        E = vecs.shape[1] if len(flat) else self.embedder.dim
        out = np.zeros((len(phrase_lists), P, E), dtype=np.float32)
        mask = np.zeros((len(phrase_lists), P), dtype=bool)
        j = 0
        for i, ps in enumerate(phrase_lists):
            m = min(len(ps), P)
            out[i, :m] = vecs[j : j + m]
            mask[i, :m] = True
            j += m
        return torch.from_numpy(out).to(self.device), torch.from_numpy(mask).to(self.device)

    # --- network ---------------------------------------------------------------------------
    def _build_net(self, vocab_sizes: tuple[int, ...], interest_dim: int) -> None:
        c = self.config
        ncfg = NetConfig(vocab_sizes=vocab_sizes, d_model=c.d_model, n_heads=c.n_heads, enc_layers=c.enc_layers,
                         dec_layers=c.dec_layers, ff_size=c.ff_size, dropout=c.dropout, max_len=c.max_len,
                         interest_dim=interest_dim if c.use_interests else 0,
                         n_items=self.n_items if c.item_embeddings else 0,
                         state_dim=self.collab_model.state_size if c.collab_states else 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.net = SemIDSeq2Seq(ncfg).to(self.device)
        self.trie = CodeTrie(self.codes, vocab_sizes).to(self.device)  # type: ignore[arg-type]
        self._codes_t = torch.from_numpy(self.codes).to(self.device)  # type: ignore[arg-type]

    def _encode_histories(self, histories: Sequence[np.ndarray]):
        """memory (B, T, d), mem_mask (B, T), fused interests or None."""
        assert self.net is not None
        width = max(1, min(self.config.max_len, max((len(h) for h in histories), default=1)))
        ids = torch.from_numpy(left_pad(histories, width)).to(self.device)  # (B, T)
        pad = ids < 0
        memory = self.net.encode(self._codes_t[ids.clamp(min=0)], pad, ids,
                                 self._history_states(histories, width))  # (B, T, d)
        mem_mask = ~pad
        mem_mask[:, -1] = True  # an empty history still attends to one (blank) state
        fused = None
        if self.config.use_interests:
            vecs, mask = self._interest_tensors(self.interests_of(histories))
            fused = self.net.embed_interests(vecs[:, None], mask[:, None])  # (B, 1, P+1, d)
        return memory, mem_mask, fused

    def _history_states(self, sequences: Sequence[np.ndarray], width: int) -> torch.Tensor | None:
        """(B, width, d) scaled SASRec states of each sequence up to each of its last ``width`` items,
        left-padded with zeros like the items (``collab_states``), else None."""
        if not self.config.collab_states:
            return None
        if self.collab_model is None:
            raise RuntimeError("semantic-id: collab_states needs its SASRec (fit or load the model)")
        out = np.zeros((len(sequences), width, self.collab_model.state_size), dtype=np.float32)
        for i, st in enumerate(prefix_states(self.collab_model, sequences, width)):
            if len(st):
                out[i, width - len(st):] = st * self.state_scale
        return torch.from_numpy(out).to(self.device)

    # --- fit -------------------------------------------------------------------------------
    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Embed items, learn semantic IDs, then train the generator (early stopping on validation;
        with ``workdir``, checkpoints there each epoch and resumes from them)."""
        if split.n_items != self.n_items:
            raise ValueError(f"split has {split.n_items} items but the model was built for {self.n_items}")
        start = time.perf_counter()
        with num_threads(self.config.num_threads, self.device):
            info = self._prepare(split, progress)
            task = GeneratorTask(self, split, progress)
            res = fit_loop(task, task.train_config(), self.device, workdir=workdir, progress=progress)
            self.net.eval()  # type: ignore[union-attr]
            prior_info = self._choose_prior_after_fit(split, progress)
        valid = task.has_validation()
        return {
            "epochs": res["epochs"], "best_epoch": res["best_at"] if valid else res["epochs"],
            "best_valid_ndcg@10": res["best_valid_ndcg@10"], "stopped": res["stopped"],
            "train_seconds": time.perf_counter() - start, **info, "generator_seconds": res["seconds"],
            "interest_seconds": info["interest_seconds"] + task.interest_seconds, "history": res["history"],
            "steps": res["steps"], "resumed_from": res["resumed_from"], "processes": res["processes"],
            "n_parameters": int(sum(p.numel() for p in self.net.parameters())),  # type: ignore[union-attr]
            "interest_extractor": self.extractor.cache_id if self.config.use_interests else None,
            "collab_prior": prior_info,
        }

    def _prepare(self, split: Split, progress: bool) -> dict[str, Any]:
        """Item texts and embeddings, the optional SASRec, the RQ-VAE codes and the (untrained) net."""
        c = self.config
        cat = split.catalog
        if cat is not None:
            self.items = [ItemText(cat.titles[i] or cat.item_ids[i], tuple(cat.categories[i] or ()), cat.brands[i])
                          for i in range(self.n_items)]
            texts = [cat.text(i, c.description_chars) for i in range(self.n_items)]
        else:  # pure id data: the ids are all the text there is
            self.items = [ItemText(f"item {i}") for i in range(self.n_items)]
            texts = [it.title for it in self.items]
        self._extractor = None
        t0 = time.perf_counter()
        say(progress, f"semantic-id: embedding {len(texts)} item texts with {c.embedder}")
        with batch_progress("item text embeddings", progress):
            emb = self.embedder.encode(texts)  # (N, E)
        embed_s = time.perf_counter() - t0
        collab_info = None
        self.collab_model = None
        if c.rq_input != "text" or c.collab_states or c.uses_prior:
            sasrec, collab_info = fit_companion(split, c, c.seed, progress)
            if c.rq_input != "text":
                vecs = sasrec.item_vectors()
                col = unit_rms_rows(fit_width(vecs, vecs.shape[1]))  # (N, 64) centred, mean norm 1
                emb = c.collab_weight * col if c.rq_input == "sasrec" else \
                    np.concatenate([unit_rms_rows(emb), c.collab_weight * col], axis=1)  # (N, E + 64)
            if c.collab_states or c.uses_prior:
                self.collab_model = sasrec
                self.state_scale = state_scale(sasrec, split.train)
        t0 = time.perf_counter()
        rq_cfg = RQVAEConfig(levels=c.rq_levels, codebook_size=c.rq_codebook_size, latent_dim=c.rq_latent_dim,
                             hidden=c.rq_hidden, steps=c.rq_steps, batch_size=c.rq_batch_size, lr=c.rq_lr,
                             beta=c.rq_beta, seed=c.seed)
        _, self.codes, self.rq_stats = train_rqvae(emb, rq_cfg, progress=progress)
        self.rq_stats["seconds"] = time.perf_counter() - t0
        vocab = tuple([c.rq_codebook_size] * c.rq_levels + [int(self.rq_stats["extra_level_size"])])
        self._build_net(vocab, self.embedder.dim)
        return {"embed_seconds": embed_s, "rqvae": self.rq_stats, "collab": collab_info, "interest_seconds": 0.0}

    def _choose_prior_after_fit(self, split: Split, progress: bool) -> dict[str, Any] | None:
        c = self.config
        if not (c.collab_prior_grid and len(split.valid)):
            return None
        return self.choose_prior(split.valid, None, c.prior_valid_users, seed=c.seed, progress=progress)

    def choose_prior(self, valid: EvalSet, weights: Sequence[float] | None = None, n_users: int = 0,
                     seed: int = 0, progress: bool = False) -> dict[str, Any]:
        """Set :attr:`prior_weight` (and :attr:`prior_alone`) by NDCG@10 of beam search on ``n_users`` users
        sampled from ``valid`` (an :class:`~llmrec.data.splits.EvalSet`; 0 = all), over ``weights`` (default
        {collab_prior} + grid; widened and with the companion alone as the config says, see
        :func:`llmrec.models.collab.choose_prior`). Returns the choice's table with ``valid_users`` and ``seconds``."""
        self._check_fitted()
        if self.collab_model is None:
            raise RuntimeError("semantic-id: the SASRec prior needs the model's SASRec (collab_states or collab_prior)")
        t0 = time.perf_counter()
        valid = valid.sample(n_users, np.random.default_rng(seed))
        keys = self.config if weights is None else replace(self.config, collab_prior=0.0, collab_prior_grid=list(weights))
        self.prior_alone = False

        def ndcg_at(w: float) -> float:  # beam search with the prior at weight w
            self.prior_weight = w
            ranked, _ = self.recommend(valid.histories, k=10, batch_size=self.config.eval_batch_size)
            return mean_ndcg(ranked, valid.targets)

        def alone() -> float:
            ranked, _ = self.collab_model.recommend(valid.histories, k=10)
            return mean_ndcg(ranked, valid.targets)

        with batch_progress("prior-weight beam search", progress):
            pick = choose_prior(keys, ndcg_at, alone, progress)
        self.prior_weight, self.prior_alone = pick["chosen"], pick["alone"]
        return {**pick, "valid_users": len(valid), "seconds": time.perf_counter() - t0}

    def _prior(self, histories: Sequence[np.ndarray]) -> torch.Tensor | None:
        """(B, N) ``prior_weight`` x SASRec's next-item logits of the histories, or None at weight 0."""
        if self.prior_weight <= 0:
            return None
        if self.collab_model is None:
            raise RuntimeError("semantic-id: collab_prior > 0 needs the model's SASRec (fit or load the model)")
        return self.prior_weight * torch.from_numpy(self.collab_model.score(histories)).to(self.device)

    def _training_interests(self, seqs: list[np.ndarray], progress: bool) -> tuple[np.ndarray, torch.Tensor]:
        """Phrase ids (R, max_len, P) (-1 = none) for every input position, and the phrase table (V, E).

        Input position j of row r predicts the item after a prefix of the full training sequence;
        its interests are those of that prefix cut to a multiple of ``interest_stride``.
        """
        c = self.config
        L, P, s = c.max_len, c.n_interests, c.interest_stride
        keys: dict[tuple[int, int], int] = {}
        slots: list[tuple[int, int, int]] = []  # (row, column, key index)
        for r, seq in enumerate(seqs):
            n_in = min(len(seq) - 1, L)
            first = len(seq) - 1 - n_in  # prefix length before the first input position, minus one
            for j in range(n_in):
                p = first + j + 1  # prefix length the target follows
                cut = (p // s) * s
                if cut == 0:
                    continue
                k = keys.setdefault((r, cut), len(keys))
                slots.append((r, L - n_in + j, k))
        prefixes = [seqs[r][:cut] for (r, cut) in keys]
        phrases = self.interests_of(prefixes, progress=progress)
        vocab: dict[str, int] = {}
        per_key = np.full((len(prefixes), P), -1, dtype=np.int64)
        for k, ps in enumerate(phrases):
            for m, p in enumerate(ps[:P]):
                per_key[k, m] = vocab.setdefault(p, len(vocab))
        ids = np.full((len(seqs), L, P), -1, dtype=np.int64)
        if slots:
            arr = np.asarray(slots)
            ids[arr[:, 0], arr[:, 1]] = per_key[arr[:, 2]]
        table = self.phrase_vectors(list(vocab)) if vocab else np.zeros((1, self.embedder.dim), np.float32)
        return ids, torch.from_numpy(np.ascontiguousarray(table)).to(self.device)

    # --- inference -------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.net is None or self.codes is None:
            raise RuntimeError("semantic-id: model is not fitted")

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32 exact log-probability of each item's code tuple (full ranking), plus,
        when the prior is on, the item's log-probability under SASRec's softmax of ``prior_weight`` x
        its logits (SASRec at temperature 1 / w)."""
        self._check_fitted()
        assert self.net is not None
        if self.prior_alone and self.collab_model is not None:  # the companion alone (chosen on validation)
            return self.collab_model.score(histories)
        self.net.eval()
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        item_chunk = 4096
        user_chunk = max(1, min(self.config.eval_batch_size, 32768 // min(item_chunk, self.n_items)))
        codes = self._codes_t  # (N, L)
        with num_threads(self.config.num_threads, self.device), torch.no_grad():
            for s in batch_starts(len(histories), user_chunk):
                batch = [np.asarray(h, dtype=np.int64) for h in histories[s : s + user_chunk]]
                memory, mem_mask, fused = self._encode_histories(batch)
                B = len(batch)
                prior = self._prior(batch)
                if prior is not None:  # + the log-probability of each item under SASRec at temperature 1/w
                    out[s : s + B] = torch.log_softmax(prior, dim=1).float().cpu().numpy()
                else:
                    out[s : s + B] = 0.0
                for i0 in range(0, self.n_items, item_chunk):
                    tgt = codes[i0 : i0 + item_chunk]  # (G, L)
                    G = tgt.shape[0]
                    logp = self.net.decode(tgt[None, :, :-1].expand(B, G, -1), memory,
                                           mem_mask[:, None, :].expand(B, G, -1), fused)  # (B, G, L, Vmax)
                    ll = logp.gather(-1, tgt[None, :, :, None].expand(B, G, -1, 1)).squeeze(-1).sum(-1)
                    out[s : s + B, i0 : i0 + G] += ll.float().cpu().numpy()
        return out

    def recommend(self, histories: Sequence[np.ndarray], k: int = 10, exclude_seen: bool = True,
                  batch_size: int = 256, users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids, log-probs): constrained beam search (``recommend_mode="beam"``) or the
        exact full ranking of :meth:`score` (``"exact"``). Missing slots are -1 / -inf."""
        if self.config.recommend_mode == "exact" or (self.prior_alone and self.collab_model is not None):
            return super().recommend(histories, k, exclude_seen, batch_size, users)
        self._check_fitted()
        assert self.net is not None and self.trie is not None
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.net.eval()
        ids_out, sc_out = [], []
        with num_threads(self.config.num_threads, self.device), torch.no_grad():
            for s in batch_starts(len(histories), batch_size):
                batch = [np.asarray(h, dtype=np.int64) for h in histories[s : s + batch_size]]
                allowed = torch.ones(len(batch), self.n_items, dtype=torch.bool, device=self.device)
                if exclude_seen:
                    for b, h in enumerate(batch):
                        h = h[(h >= 0) & (h < self.n_items)]
                        allowed[b, torch.from_numpy(h).to(self.device)] = False
                memory, mem_mask, fused = self._encode_histories(batch)
                items, scores = beam_search(self.net, self.trie, memory, mem_mask, fused, allowed,
                                            max(self.config.beam_size, k), prior=self._prior(batch))
                ids = np.full((len(batch), k), PAD_ITEM, dtype=np.int64)
                sc = np.full((len(batch), k), -np.inf, dtype=np.float32)
                m = min(k, items.shape[1])
                ids[:, :m] = items[:, :m].cpu().numpy()
                sc[:, :m] = scores[:, :m].float().cpu().numpy()
                sc[ids < 0] = -np.inf
                ids_out.append(ids)
                sc_out.append(sc)
        if not ids_out:
            return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
        return np.concatenate(ids_out), np.concatenate(sc_out)

    # --- persistence -----------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._check_fitted()
        assert self.net is not None and self.codes is not None
        tensors = {f"net.{k}": v.detach().cpu().numpy().copy() for k, v in self.net.state_dict().items()}
        tensors["codes"] = self.codes
        extra = {
            "vocab_sizes": list(self.net.cfg.vocab_sizes),
            "interest_dim": int(self.net.cfg.interest_dim) or int(self.embedder.dim),
            "rqvae": self.rq_stats,
            "items": [[it.title, list(it.categories), it.brand] for it in self.items],
        }
        pack_companion(self, tensors, extra)
        return tensors, extra

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self.codes = np.asarray(tensors["codes"], dtype=np.int64)
        self.items = [ItemText(t, tuple(cs), b) for t, cs, b in extra["items"]]
        self.rq_stats = extra.get("rqvae", {})
        unpack_companion(self, tensors, extra, reads_states=self.config.collab_states)
        self._build_net(tuple(int(v) for v in extra["vocab_sizes"]), int(extra["interest_dim"]))
        assert self.net is not None
        state = {k[4:]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith("net.")}
        self.net.load_state_dict(state, strict=True)
        self.net.eval()

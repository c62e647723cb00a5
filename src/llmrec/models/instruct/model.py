"""Instruction-tuned chat LM recommender (``instruct-lm``): LoRA / QLoRA / full fine-tuning on
instruction / input (history in words) / output prompts, in three modes (see :mod:`.config`).

:meth:`InstructLM.score` returns full-catalog scores ``(n, n_items)`` in every mode:

- ``rerank``: the retriever's scores, with its top-``n_candidates`` shortlist (history excluded)
  moved above every other item and re-ordered by the LM's option log-probabilities (one forward
  pass per batch, options shuffled with a seed that depends on the history only) plus ``w`` x the
  retriever's log-softmax over the shortlist, ``w`` chosen on validation among ``rerank_mix``;
  items outside the shortlist keep the retriever's order;
- ``choice``: the same over the shortlist of the training-popularity top items (the choice model's
  own figure is its accuracy among sampled candidates, :func:`~.evaluate.choice_accuracy`);
- ``title``: the items of the titles generated under the catalog trie (best beam first), or the
  cosine similarity of a freely generated title to every catalog title; the rest of the catalog
  follows by training popularity.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from llmrec.data.splits import EvalSet, Split
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.amp import autocast
from llmrec.models.base import Recommender, top_k
from llmrec.models.instruct.candidates import Choice, NegativeSampler, build_choice, shuffle_shortlist
from llmrec.models.instruct.config import InstructLMConfig
from llmrec.models.instruct.lm import head, hidden_states, load_lm, trainable
from llmrec.models.instruct.prompts import IGNORE, LETTERS, ItemWords, PromptBuilder, with_answer
from llmrec.models.instruct.titles import pack, title_logprobs
from llmrec.models.instruct.verbalizer import letter_ids, option_logprobs, pad_right
from llmrec.models.train import batch_starts, device_for, fit_loop, num_threads


class OptionsRow(NamedTuple):
    """A training example of title scoring: prompt ids (history only), option item ids, the true option's index."""

    prompt: np.ndarray  # (L,) int64
    options: np.ndarray  # (N,) item ids
    answer: int


Row = tuple[np.ndarray, np.ndarray] | OptionsRow  # (ids, labels) of an answer-token loss, or an OptionsRow


class InstructLM(Recommender):
    """Chat LM fine-tuned on prompts in words; see the module docstring."""

    name = "instruct-lm"
    Config = InstructLMConfig

    def __init__(self, config: InstructLMConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.device = device_for(config.device)
        self.lm: Any = None
        self.tokenizer: Any = None
        self.words: ItemWords | None = None
        self.prompts: PromptBuilder | None = None
        self.letters: np.ndarray | None = None
        self.counts = np.zeros(n_items, dtype=np.float64)  # training popularity
        self.sampler: NegativeSampler | None = None
        self.retriever: Recommender | None = None
        self.mix = 0.0  # weight of the retriever's log-softmax in the shortlist score (chosen on validation)
        self.index: Any = None  # TitleIndex (title mode)
        self._grounder: Any = None
        self.hide_history = config.blind  # True: prompts show no history (the history-blind baseline)
        self.last_generation: dict[str, float] = {}
        self._answers: dict[int, np.ndarray] = {}  # item -> title + end token ids (title scoring)
        self.prior: np.ndarray | None = None  # (n_items,) title log-prob with no history, before fine-tuning ("pmi")

    # --- construction -------------------------------------------------------------------
    @property
    def wants_feedback(self) -> bool:
        return self.config.ratings or self.config.review_chars > 0

    def _setup(self, words: ItemWords, counts: np.ndarray) -> None:
        """Load the backbone with adapters and build the prompt machinery."""
        cfg = self.config
        self.words, self.counts = words, np.asarray(counts, dtype=np.float64)
        self.lm, self.tokenizer = load_lm(cfg, self.device)
        self.prompts = PromptBuilder(self.tokenizer, words, cfg.template, cfg.prompt_instruction, cfg.system,
                                     cfg.max_history_tokens, cfg.max_history, cfg.brand, cfg.category,
                                     cfg.review_chars if cfg.ratings or cfg.review_chars else 0)
        self._answers = {}
        if cfg.scores_titles:
            self.letters = None
        elif cfg.mode in ("choice", "rerank"):
            self.letters = letter_ids(self.tokenizer, cfg.n_candidates)
        else:
            from llmrec.models.instruct.grounding import TitleIndex

            self.index = TitleIndex([self.prompts.answer_ids(t) for t in words.titles], self.counts)

    def _require(self) -> PromptBuilder:
        if self.lm is None or self.prompts is None:
            raise RuntimeError("instruct-lm: the model is not trained or loaded yet")
        return self.prompts

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)

    # --- prompts ------------------------------------------------------------------------
    def prompt(self, history: np.ndarray, user: int | None = None, options: Sequence[int] | None = None) -> np.ndarray:
        """(L,) prompt token ids for ``history`` (item ids, oldest first) and optional options."""
        pb = self._require()
        history = np.asarray(history, dtype=np.int64)
        if self.hide_history:
            return pb.build(history[:0], options).ids
        ratings = reviews = None
        if user is not None and self.feedback is not None:
            ratings, reviews = self.feedback.of(int(user), history)
            ratings = ratings if self.config.ratings else None
            reviews = reviews if self.config.review_chars > 0 else None
        return pb.build(history, options, ratings, reviews).ids

    def render(self, history: np.ndarray, user: int | None = None, options: Sequence[int] | None = None) -> str:
        """The prompt as text."""
        return str(self.tokenizer.decode(self.prompt(history, user, options)))

    def answer(self, target: int, choice: Choice | None) -> np.ndarray:
        """Answer token ids (the option letter, or the target's title) plus the end token."""
        pb = self._require()
        if self.config.mode == "title":
            return pb.answer_ids(self.words.titles[target])  # type: ignore[union-attr]
        assert choice is not None and choice.answer >= 0
        return pb.answer_ids(LETTERS[choice.answer])

    def title_answer(self, item: int) -> np.ndarray:
        """Token ids of ``item``'s title plus the end token (cached)."""
        if item not in self._answers:
            self._answers[item] = self._require().answer_ids(self.words.titles[item])  # type: ignore[union-attr]
        return self._answers[item]

    def training_rows(self, train: list[np.ndarray], cuts: list[tuple[int, int]],
                      rng: np.random.Generator) -> list[Row]:
        """(ids, labels) of every training cut point, or an :class:`OptionsRow` when options are scored by
        their titles (candidates drawn from ``rng``)."""
        cfg = self.config
        histories = [train[u][:c] for u, c in cuts]
        targets = [int(train[u][c]) for u, c in cuts]
        shortlists = self.shortlist_ids(histories) if cfg.mode == "rerank" else None
        rows = []
        for r, ((u, _), h, t) in enumerate(zip(cuts, histories, targets, strict=True)):
            choice = None
            if cfg.mode == "choice":
                assert self.sampler is not None
                choice = build_choice(t, h, cfg.n_candidates, self.sampler, cfg.negatives, rng)
            elif cfg.mode == "rerank":
                assert shortlists is not None
                short = shortlists[r].copy()
                if t not in short:  # the retriever missed: the target takes the last shortlist place
                    short[-1] = t
                choice = shuffle_shortlist(short, t, rng)
            if cfg.scores_titles:
                assert choice is not None
                rows.append(OptionsRow(self.prompt(h, u), np.asarray(choice.options), int(choice.answer)))
                continue
            prompt = self.prompt(h, u, None if choice is None else choice.options)
            rows.append(with_answer(prompt, self.answer(t, choice)))
        return rows

    # --- training -----------------------------------------------------------------------
    def answer_loss(self, batch: Sequence[Row]) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of a batch of (ids, labels) rows, or over the options of a
        batch of :class:`OptionsRow` (softmax of the titles' log-likelihoods)."""
        if isinstance(batch[0], OptionsRow):
            rows: Sequence[OptionsRow] = batch  # type: ignore[assignment]
            target = torch.as_tensor([r.answer for r in rows], device=self.device)
            with autocast(self.config.amp, self.device):
                lp = self.title_scores([r.prompt for r in rows], [r.options for r in rows])
            return F.cross_entropy(lp, target)
        ids, mask = pad_right([b[0] for b in batch], self.pad_id, self.device)
        labels, _ = pad_right([b[1] for b in batch], IGNORE, self.device)
        sel = labels != IGNORE
        if self.config.letter_loss == "letters" and self.config.mode != "title":
            first = sel.int().argmax(dim=1)  # (B,) the answer's first position (its letter)
            sel = torch.zeros_like(sel)
            sel[torch.arange(len(batch)), first] = True
        with autocast(self.config.amp, self.device):
            h = hidden_states(self.lm, ids, mask)  # (B, L, H)
            logits = head(self.lm, h[sel])  # (M, V): the answer positions only
        if self.config.letter_loss == "letters" and self.config.mode != "title":
            assert self.letters is not None
            letters = torch.as_tensor(self.letters, device=self.device)
            target = (labels[sel][:, None] == letters[None]).int().argmax(dim=1)  # (B,) option index
            return F.cross_entropy(logits[:, letters].float(), target)
        return F.cross_entropy(logits.float(), labels[sel])

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Fine-tune on ``split.train`` (early stopping on validation; ``split.test`` is never read)."""
        from llmrec.models.instruct.training import InstructTask

        if split.n_items != self.n_items:
            raise ValueError(f"split has {split.n_items} items but the model was built for {self.n_items}")
        cfg, start = self.config, time.perf_counter()
        retriever_info = None
        with num_threads(cfg.num_threads):
            if cfg.mode == "rerank":
                from llmrec.models.instruct.retriever import get_retriever

                self.retriever, retriever_info = get_retriever(split, cfg.retriever, cfg, cfg.seed, progress)
            self.prepare(split)
            task = InstructTask(self, split)
            if cfg.finetune == "none":  # zero-shot: nothing to train, the loop is not run
                res = self._untrained(task)
            else:
                res = fit_loop(task, task.train_config(), self.device, workdir=workdir, progress=progress)
            mix_info = self.choose_mix(task.valid) if cfg.mode == "rerank" and len(task.valid) else None
            if cfg.finetune == "none" and mix_info is not None:
                res["best_valid_ndcg@10"] = max(mix_info["valid_ndcg@10"])
        return {"steps": res["steps"], "epochs": res["steps"] / res["steps_per_epoch"],
                "steps_per_epoch": res["steps_per_epoch"], "examples_per_epoch": task.n0,
                "best_step": res["best_at"], "best_valid": res["best_valid_ndcg@10"],
                "valid_metric": "accuracy" if cfg.mode == "choice" else "ndcg@10", "valid_users": len(task.valid),
                "train_seconds": time.perf_counter() - start, "seconds_per_step": res["seconds_per_step"],
                "stopped": res["stopped"], "resumed_from": res["resumed_from"], "retriever": retriever_info,
                "rerank_mix": mix_info, "trainable_parameters": sum(p.numel() for p in trainable(self.lm).values()),
                "history": res["history"]}

    def _untrained(self, task: Any) -> dict[str, Any]:
        """What :func:`fit_loop` reports, for ``finetune = "none"``: no steps; the validation score of the backbone
        as it is (left to :meth:`choose_mix` in rerank mode, which scores the validation users once)."""
        valid = float("nan")
        if self.config.mode != "rerank" and task.has_validation():
            valid = task.validate()
        return {"steps": 0, "steps_per_epoch": task.n_batches(), "best_at": 0, "best_valid_ndcg@10": valid,
                "seconds_per_step": float("nan"), "stopped": "finetune=none", "resumed_from": None, "history": []}

    def prepare(self, split: Split) -> None:
        """Everything fine-tuning starts from, read from ``split``'s training data and catalog: the backbone with
        fresh adapters, the prompt machinery, the negative sampler, and the ``"pmi"`` title prior (computed under
        these untuned weights)."""
        cfg = self.config
        self.feedback = split.feedback if self.wants_feedback else None
        self._setup(ItemWords.from_catalog(split.catalog, self.n_items, cfg.title_chars), split.train_item_counts())
        self.sampler = self._sampler(split)
        if cfg.scores_titles and cfg.title_score == "pmi":
            self.prior = self.title_prior()

    def _sampler(self, split: Split) -> NegativeSampler:
        cfg = self.config
        neighbors = None
        if cfg.negatives == "text" and cfg.mode == "choice":
            neighbors = self.text_neighbors(50)
        return NegativeSampler(self.counts, self.words.categories if self.words else None, neighbors)

    def text_neighbors(self, k: int) -> np.ndarray:
        """(n_items, k) nearest items by title embedding (``embedder``), closest first, self excluded."""
        from llmrec.models.semantic_ids.embed import get_embedder

        assert self.words is not None
        x = np.asarray(get_embedder(self.config.embedder).encode(self.words.titles), dtype=np.float32)
        out = np.empty((self.n_items, min(k, self.n_items - 1)), dtype=np.int64)
        for s in range(0, self.n_items, 1024):
            sims = x[s : s + 1024] @ x.T
            sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
            out[s : s + 1024] = np.argsort(-sims, axis=1)[:, : out.shape[1]]
        return out

    # --- option scoring, shortlists -----------------------------------------------------
    def title_scores(self, prompts: Sequence[np.ndarray], options: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, N) float32 ``title_score`` of each option's title after its prompt (differentiable): the mean or
        sum of the title's token log-probabilities, or for ``"pmi"`` the sum minus :attr:`prior`."""
        score = self.config.title_score
        lp = title_logprobs(self.lm, self._pack(prompts, options), per_token=score == "mean").float()
        if score == "pmi":
            if self.prior is None:
                raise RuntimeError("instruct-lm: title_score='pmi' needs the title prior (fit or load the model)")
            lp = lp - torch.as_tensor(self.prior[np.stack(options)], device=lp.device)
        return lp

    def title_prior(self) -> np.ndarray:
        """(n_items,) float32 log p(title + end | a prompt with no history) under the current weights: every item's
        title, ``n_candidates`` titles packed per row."""
        pb, n = self._require(), self.config.n_candidates
        blind = pb.build(np.zeros(0, dtype=np.int64)).ids
        items = np.arange(self.n_items)
        groups = [items[s : s + n] for s in range(0, self.n_items, n)]
        out = np.empty(self.n_items, dtype=np.float32)
        with num_threads(self.config.num_threads), torch.inference_mode(), autocast(self.config.amp, self.device):
            for s in batch_starts(len(groups), self.config.eval_batch_size):
                rows = groups[s : s + self.config.eval_batch_size]
                width = max(len(g) for g in rows)  # the last group may be short: pad it with its own first item
                rows = [np.concatenate([g, np.full(width - len(g), g[0])]) for g in rows]
                lp = title_logprobs(self.lm, self._pack([blind] * len(rows), rows)).float().cpu().numpy()
                for g, v in zip(rows, lp, strict=True):
                    out[g] = v
        return out

    def _pack(self, prompts: Sequence[np.ndarray], options: Sequence[np.ndarray]) -> Any:
        return pack(prompts, [[self.title_answer(int(i)) for i in o] for o in options], self.pad_id, self.device)

    def option_scores(self, histories: Sequence[np.ndarray], options: Sequence[np.ndarray],
                      users: np.ndarray | None = None) -> np.ndarray:
        """(n, N) float32 scores of the options, one forward pass per batch: the log-probability of each
        option's letter (``scoring = "letters"``), or of each option's title (``"titles"``)."""
        self._require()
        titles = self.config.scores_titles
        assert titles or self.letters is not None
        n_opt = len(options[0]) if len(options) else self.config.n_candidates
        prompts = [self.prompt(h, None if users is None else int(users[i]), None if titles else options[i])
                   for i, h in enumerate(histories)]
        out = np.empty((len(prompts), n_opt), dtype=np.float32)
        order = np.argsort([len(p) for p in prompts], kind="stable")
        with num_threads(self.config.num_threads), torch.inference_mode(), autocast(self.config.amp, self.device):
            for s in batch_starts(len(prompts), self.config.eval_batch_size):
                rows = order[s : s + self.config.eval_batch_size]
                if titles:
                    lp = self.title_scores([prompts[i] for i in rows], [options[i] for i in rows])
                else:
                    assert self.letters is not None
                    lp = option_logprobs(self.lm, [prompts[i] for i in rows], self.letters[:n_opt], self.pad_id,
                                         self.device)
                out[rows] = lp.float().cpu().numpy()
        return out

    def shortlists(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """((n, N) shortlist item ids, best first, history excluded; (n, n_items) first-stage scores): the
        retriever's in ``rerank`` mode, training popularity otherwise."""
        hist = [np.asarray(h, dtype=np.int64) for h in histories]
        if self.config.mode == "rerank":
            if self.retriever is None:
                raise RuntimeError("instruct-lm: rerank mode needs its retriever (fit or load the model)")
            base = np.asarray(self.retriever.score(hist), dtype=np.float32)
        else:
            base = np.broadcast_to(np.log1p(self.counts).astype(np.float32), (len(hist), self.n_items)).copy()
        ids, _ = top_k(base, self.config.n_candidates, hist)
        return ids, base

    def shortlist_ids(self, histories: Sequence[np.ndarray], chunk: int = 512) -> np.ndarray:
        """(n, N) shortlists of :meth:`shortlists`, computed in chunks (bounded memory on large catalogs)."""
        parts = [self.shortlists(histories[s : s + chunk])[0] for s in range(0, len(histories), chunk)]
        return np.concatenate(parts) if parts else np.empty((0, self.config.n_candidates), np.int64)

    def _order_seed(self, history: np.ndarray) -> np.random.Generator:
        """The option order of a history's shortlist: seeded by the config seed and the history only."""
        return np.random.default_rng([self.config.seed, 17, zlib.crc32(np.asarray(history, np.int64).tobytes())])

    def shortlist_scores(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shortlists (n, N), LM log-probs (n, N) aligned with them, first-stage scores (n, n_items))."""
        short, base = self.shortlists(histories)
        shuffled = [shuffle_shortlist(s[s >= 0], None, self._order_seed(h)).options for s, h in zip(short, histories,
                                                                                                   strict=True)]
        if any(len(s) != short.shape[1] for s in shuffled):
            raise ValueError("a history leaves fewer unseen items than n_candidates")
        lp = self.option_scores(histories, shuffled, users)  # (n, N) in shuffled order
        aligned = np.empty_like(lp)
        for r, opts in enumerate(shuffled):
            pos = {int(i): j for j, i in enumerate(opts)}
            aligned[r] = lp[r, [pos[int(i)] for i in short[r]]]
        return short, aligned, base

    @staticmethod
    def combine(short: np.ndarray, lm: np.ndarray, base: np.ndarray, mix: float) -> np.ndarray:
        """(n, n_items) scores: ``base`` with the shortlist moved on top, ordered by LM log-prob + ``mix`` x
        the first stage's log-softmax over the shortlist; the other items keep ``base``'s order."""
        out = base.astype(np.float32).copy()
        for r in range(len(short)):
            b = base[r, short[r]].astype(np.float64)
            b = b - b.max()
            c = lm[r].astype(np.float64) + mix * (b - np.log(np.exp(b).sum()))
            finite = out[r][np.isfinite(out[r])]
            top = float(finite.max()) if len(finite) else 0.0
            out[r, short[r]] = (c - c.min() + top + 1.0).astype(np.float32)
        return out

    def choose_mix(self, valid: EvalSet) -> dict[str, Any]:
        """Set :attr:`mix` by NDCG@10 on ``valid`` among ``rerank_mix`` (LM scored once)."""
        short, lm, base = self.shortlist_scores(valid.histories, valid.users)
        table = {}
        for w in self.config.rerank_mix:
            ids, _ = top_k(self.combine(short, lm, base, w), 10, valid.histories)
            table[float(w)] = mean_ndcg(ids, valid.targets)
        self.mix = max(table, key=lambda w: (table[w], -w))
        ids, _ = top_k(base, 10, valid.histories)
        return {"weights": list(table), "valid_ndcg@10": list(table.values()), "chosen": self.mix,
                "retriever_alone_valid_ndcg@10": mean_ndcg(ids, valid.targets), "valid_users": len(valid)}

    def validation_score(self, valid: EvalSet, split: Split) -> float:
        """Choice accuracy on fixed honest candidates (``choice``), else NDCG@10 (``rerank`` at mix 0)."""
        if self.config.mode == "choice":
            from llmrec.models.instruct.evaluate import choice_accuracy

            return float(choice_accuracy(self, valid, seed=self.config.seed)["accuracy"])
        mix, self.mix = self.mix, 0.0
        try:
            ids, _ = top_k(self.score(valid.histories, valid.users), 10, valid.histories)
        finally:
            self.mix = mix
        return mean_ndcg(ids, valid.targets)

    # --- full-catalog scores ------------------------------------------------------------
    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32 scores (see the module docstring)."""
        self._require()
        if self.config.mode == "title":
            from llmrec.models.instruct.evaluate import title_scores

            return title_scores(self, histories, users)
        short, lm, base = self.shortlist_scores(histories, users)
        return self.combine(short, lm, base, self.mix)

    # --- persistence --------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {f"lm.{n}": p.detach().float().cpu().numpy().copy() for n, p in trainable(self._lm()).items()}
        tensors["counts"] = self.counts.astype(np.float64)
        if self.prior is not None:
            tensors["prior"] = self.prior.astype(np.float32)
        assert self.words is not None
        extra: dict[str, Any] = {"titles": self.words.titles, "brands": self.words.brands,
                                 "categories": self.words.categories, "mix": self.mix}
        if self.retriever is not None:
            from llmrec.models.instruct.retriever import pack_retriever

            rt, extra["retriever"] = pack_retriever(self.retriever)
            tensors.update(rt)
        return tensors, extra

    def _lm(self) -> Any:
        self._require()
        return self.lm

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        words = ItemWords(list(extra["titles"]), list(extra["brands"]), list(extra["categories"]))
        if "retriever" in extra:
            from llmrec.models.instruct.retriever import unpack_retriever

            self.retriever = unpack_retriever(tensors, extra["retriever"], self.n_items)
        with num_threads(self.config.num_threads):
            self._setup(words, tensors["counts"])
        self.sampler = NegativeSampler(self.counts, words.categories)
        self.mix = float(extra.get("mix", 0.0))
        self.prior = np.asarray(tensors["prior"], dtype=np.float32) if "prior" in tensors else None
        state = trainable(self.lm)
        names = {k[3:] for k in tensors if k.startswith("lm.")}
        if names != set(state):
            missing, unexpected = sorted(set(state) - names)[:3], sorted(names - set(state))[:3]
            raise ValueError(f"instruct-lm weights do not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for n, p in state.items():
                p.copy_(torch.as_tensor(np.asarray(tensors[f"lm.{n}"])).to(p.dtype))
        self.lm.eval()

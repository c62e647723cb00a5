"""Item-token generative LM: a pretrained causal LM that learns products as tokens.

Every catalog item ``i`` becomes a new special token ``<|item_i|>`` of the backbone's tokenizer
(plus one end/padding row ``<|item_END|>``); with ``user_tokens`` every training user ``u`` gets a
token ``<|user_u|>`` that opens its prompts (``<|user_UNK|>`` for users unseen in training). The model reads a prompt built from the user's
chronological history (item tokens and truncated titles, see :mod:`.prompts`) and predicts the
next item token, or the next ``K`` item tokens.

Cost on a CPU decides the design:

- the base vocabulary stays frozen; the item rows live in small separate matrices
  ``item_emb`` (R, H) (input side) and ``item_head`` (R, H) + ``item_bias`` (R,) (output side),
  R = n_items + 1, initialized from the backbone's embeddings of each item's title tokens
  (optionally tied, or a frozen title base plus a trainable low-rank delta: ``item_rank``);
- where the target is an item, the loss is a softmax over the item rows only, computed from the
  final hidden state (no 49k-wide logits at every position);
- the backbone trains through LoRA adapters (``peft``) or, with ``finetune="full"``, its
  transformer weights (embeddings and LM head stay frozen in both modes);
- :meth:`ItemTokenLM.score` is one forward pass per batch: the item-row logits at the answer
  position rank the whole catalog. Constrained beam search and unconstrained greedy decoding of
  item lists live in :mod:`.decoding` and are reachable through :meth:`ItemTokenLM.generate_lists`.

Training: leave-one-out style next-item targets (with ``dense=True`` every history position also
predicts the next history item, so one forward pass teaches the whole sequence) or next-K targets
padded by the foundation's strategies; both are built from ``split.train`` only. AdamW with
warm-up and cosine decay, gradient accumulation, early stopping on validation NDCG@10 (a fixed
sample of validation users), a wall-clock budget, and checkpoints that resume after an interruption.

Collaborative signal (optional; a SASRec fitted on the same split, :mod:`llmrec.models.collab`):
its item vectors start the item rows' delta (``collab_init``), its states of each history prefix
enter the prompt (``collab_state``), its logits join every item logit as a learned residual
(``collab_logits``) and/or as a prior at inference whose weight is chosen on validation after
training (``collab_prior`` / ``collab_prior_grid``: LM logits + w x SASRec logits, a product of experts).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from llmrec.data.splits import Split
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.amp import autocast
from llmrec.models.base import Recommender, top_k
from llmrec.models.collab import (
    choose_prior,
    fit_companion,
    fit_width,
    pack_companion,
    state_scale,
    unit_rms_rows,
    unpack_companion,
)
from llmrec.models.itemtoken.config import STATE_TOKEN, ItemTokenLMConfig
from llmrec.models.itemtoken.examples import ExampleBuilder
from llmrec.models.itemtoken.net import ItemTokenNet, latest_states, title_rows, truncate_layers
from llmrec.models.itemtoken.prompts import (
    IGNORE,
    PromptBuilder,
    item_token,
    user_token,
)
from llmrec.models.itemtoken.training import LMTask, checkpoint_root
from llmrec.models.train import (
    Checkpoint,
    batch_progress,
    batch_starts,
    device_for,
    fit_loop,
    num_threads,
    say,
)


class ItemTokenLM(ExampleBuilder, Recommender):
    """Pretrained causal LM + item tokens, LoRA fine-tuned to generate the next items."""

    name = "itemtoken-lm"
    Config = ItemTokenLMConfig
    net_class: type[ItemTokenNet] = ItemTokenNet  # subclasses (graph-lm) may run the network their own way

    def __init__(self, config: ItemTokenLMConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.net: ItemTokenNet | None = None
        self.tokenizer: Any = None
        self.prompts: PromptBuilder | None = None
        self.titles: list[str] = []
        self.n_users = 0  # users with their own token (``user_tokens``); row n_users is the unknown user
        self.device = device_for(config.device)
        self.collab_model: Any = None  # the frozen SASRec of ``collab_state`` / ``collab_prior``
        self.prior_weight = config.collab_prior  # the SASRec prior's weight in use (fit may pick it on validation)
        self.prior_alone = False  # True: the companion SASRec alone ranks (chosen when no mix beat it on validation)
        self.state_scale = 1.0  # SASRec states are multiplied by this (mean training state norm -> 1)
        self._collab_rows: torch.Tensor | None = None  # (R, d) SASRec item vectors of ``collab_logits``

    # --- construction -------------------------------------------------------------------
    @property
    def end_row(self) -> int:
        """Item row of the end/padding token (``pad-token`` padding of next-K targets)."""
        return self.n_items

    def _build(self, titles: Sequence[str], init_rows: bool = True, n_users: int = 0,
               collab: np.ndarray | None = None, state_dim: int = 0) -> None:
        """Load the backbone, add item tokens, initialize item rows from titles, attach LoRA.

        ``collab`` (n_items, item_rank): the initial low-rank factor ``a`` of the item rows, so
        that row i starts as title row i + collab[i] @ b (b random, entries as large as the title rows').
        """
        from llmrec.models.llm.backbone import load_backbone

        cfg = self.config
        if len(titles) != self.n_items:
            raise ValueError(f"{len(titles)} titles for {self.n_items} items")
        self.titles = list(titles)
        lm, tok = load_backbone(cfg.backbone, dtype=cfg.dtype, attn=cfg.attn)
        if cfg.n_layers:
            truncate_layers(lm, cfg.n_layers)
        n_base = lm.get_input_embeddings().weight.shape[0]
        if len(tok) > n_base:
            raise ValueError(f"backbone {cfg.backbone}: tokenizer has {len(tok)} tokens but only {n_base} embedding rows")
        # Make tokenizer ids equal model ids: filler tokens up to n_base, then the item tokens.
        fillers = [f"<|llmrec_unused_{j}|>" for j in range(n_base - len(tok))]
        new_tokens = fillers + [item_token(i) for i in range(self.n_items)] + [item_token("END")]
        self.n_users = int(n_users) if cfg.user_tokens else 0
        if cfg.user_tokens:  # users 0..U-1, then the shared row of users unseen in training
            new_tokens += [user_token(u) for u in range(self.n_users)] + [user_token("UNK")]
        if state_dim:
            new_tokens.append(STATE_TOKEN)
        title_ids = tok([" " + t for t in self.titles], add_special_tokens=False)["input_ids"]
        tok.add_tokens(new_tokens, special_tokens=True)
        if tok.convert_tokens_to_ids(item_token(0)) != n_base and self.n_items:
            raise RuntimeError("item tokens did not land right after the backbone vocabulary")
        with torch.no_grad():
            emb = lm.get_input_embeddings().weight.float()
            out = lm.get_output_embeddings().weight.float()
            R = self.n_items + 1
            if init_rows:
                eos = [[tok.eos_token_id]] if tok.eos_token_id is not None else [[]]
                item_emb = title_rows(emb, list(title_ids) + eos, cfg.init_title_tokens)  # (R, H)
                item_head = title_rows(out, list(title_ids) + eos, cfg.init_title_tokens)  # (R, H)
                if cfg.head_init_scale != 1.0:  # the shared component only shifts every item logit alike
                    item_head = cfg.head_init_scale * (item_head - item_head[: self.n_items].mean(dim=0))
            else:
                item_emb = torch.zeros(R, emb.shape[1])
                item_head = torch.zeros(R, emb.shape[1])
            # every user starts as the mean item row (a neutral token); training personalizes it
            user_emb = item_emb[: max(1, self.n_items)].mean(0).expand(self.n_users + 1, -1).clone() \
                if cfg.user_tokens else None
        for p in lm.parameters():
            p.requires_grad_(False)
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            targets: str | list[str] = cfg.lora_targets
            if targets != "all-linear":
                targets = [t.strip() for t in targets.split(",") if t.strip()]
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=targets, bias="none")
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                torch.manual_seed(cfg.seed)
                lm = get_peft_model(lm, lora)
        else:  # full: every transformer weight trains, the (large) vocabulary matrices stay frozen
            frozen = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
            for p in lm.parameters():
                p.requires_grad_(id(p) not in frozen)
        # the new item rows always train in float32, whatever dtype the (frozen) backbone has
        self.net = self.net_class(lm, n_base, item_emb.float(), item_head.float(), rank=cfg.item_rank,
                                tie=cfg.tie_item_rows, head_scale=cfg.head_init_scale,
                                item_dropout=cfg.item_dropout, user_emb=user_emb, state_dim=state_dim,
                                collab_logits=cfg.collab_logits and state_dim > 0).to(self.device)
        if collab is not None:
            if collab.shape != (self.n_items, cfg.item_rank):
                raise ValueError(f"collab vectors have shape {collab.shape}, expected ({self.n_items}, {cfg.item_rank})")
            with torch.no_grad():
                self.net.emb_rows.a[: self.n_items].copy_(torch.as_tensor(collab, dtype=torch.float32))
        self.net.eval()
        self.tokenizer = tok
        self.prompts = PromptBuilder(tok, n_base, self.titles, cfg.template, cfg.instruction, cfg.title_tokens,
                                     cfg.max_prompt_tokens, cfg.max_history, cfg.review_chars)

    @property
    def wants_feedback(self) -> bool:
        return self.config.ratings or self.config.review_chars > 0

    def _lead(self, user: int | None) -> tuple[int, ...]:
        """Token ids that open the prompt of ``user``: its user token (``user_tokens``), else none."""
        if not self.config.user_tokens:
            return ()
        net = self._require_net()
        u = int(user) if user is not None and 0 <= int(user) < self.n_users else self.n_users
        return (net.n_base + net.n_rows + u,)

    def _feedback_of(self, user: int | None, history: np.ndarray) -> tuple[Any, Any]:
        """(ratings, reviews) shown for ``history`` of ``user`` (None where the model or data has none)."""
        if user is None or self.feedback is None:
            return None, None
        ratings, reviews = self.feedback.of(user, history)
        return (ratings if self.config.ratings else None), (reviews if self.config.review_chars > 0 else None)

    def _require_net(self) -> ItemTokenNet:
        if self.net is None:
            raise RuntimeError("itemtoken-lm: the model is not trained or loaded yet")
        return self.net

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that training changes: item rows and adapter (or transformer) weights."""
        net = self._require_net()
        state = {f"item.{n}": p for n, p in net.item_state().items()}
        for n, p in net.lm.named_parameters():
            if p.requires_grad:
                state[f"lm.{n}"] = p
        return state

    def _load_trainable(self, tensors: dict[str, Any]) -> None:
        state = self.trainable_state()
        missing = sorted(set(state) - set(tensors))
        unexpected = sorted(set(tensors) - set(state))
        if missing or unexpected:
            raise ValueError(f"itemtoken-lm weights do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, p in state.items():
                p.copy_(torch.as_tensor(np.asarray(tensors[name])).to(p.dtype))

    def _sas_logits(self, states: torch.Tensor) -> torch.Tensor:
        """(..., d) unscaled SASRec states -> (..., R) float32 SASRec logits (state . item vector; zero for
        the end row and where a position has no state)."""
        net = self._require_net()
        assert self.collab_model is not None
        if self._collab_rows is None:
            vec = torch.as_tensor(self.collab_model.item_vectors(), dtype=torch.float32)  # (n_items, d)
            self._collab_rows = torch.cat([vec, vec.new_zeros(net.n_rows - self.n_items, vec.shape[1])]).to(self.device)
        return states.float().to(self.device) @ self._collab_rows.T

    def _residual(self, states: torch.Tensor) -> torch.Tensor:
        """(..., d) scaled SASRec states -> (..., R) float32 ``collab_logits`` term: w * SASRec's logits."""
        net = self._require_net()
        assert net.collab_weight is not None
        return net.collab_weight * self._sas_logits(states.float() / self.state_scale)

    def _beam_bias(self, histories: Sequence[np.ndarray]) -> Any:
        """``step_bias`` of constrained beam search: SASRec's logits of each beam's history plus the items
        generated so far, times the learned ``collab_logits`` weight plus :attr:`prior_weight` (None when
        neither is in use)."""
        net = self._require_net()
        if self.collab_model is None or (net.collab_weight is None and self.prior_weight <= 0):
            return None
        coef = (net.collab_weight.detach() if net.collab_weight is not None else 0.0) + self.prior_weight
        hist = [np.asarray(h, dtype=np.int64) for h in histories]

        def bias(seqs: torch.Tensor) -> torch.Tensor:  # seqs (n, B, t) item rows -> (n, B, R)
            n, B, t = seqs.shape
            if t == 0:  # every beam is the bare history
                st = self.collab_model.user_states(hist)  # (n, d)
                return (coef * self._sas_logits(torch.from_numpy(st)))[:, None, :].expand(n, B, -1)
            gen = seqs.cpu().numpy()
            prefixes = [np.concatenate([hist[u], gen[u, b]]) for u in range(n) for b in range(B)]
            st = self.collab_model.user_states(prefixes)  # (n*B, d)
            return (coef * self._sas_logits(torch.from_numpy(st))).view(n, B, -1)

        return bias

    def choose_prior(self, valid: Any, weights: Sequence[float] | None = None, n_users: int = 0, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
        """Set :attr:`prior_weight` (and :attr:`prior_alone`) by NDCG@10 of the fast path on ``n_users`` users
        sampled from ``valid`` (an :class:`~llmrec.data.splits.EvalSet`; 0 = all) over ``weights`` (default
        {collab_prior} + grid; widened and with the companion alone as the config says, see
        :func:`llmrec.models.collab.choose_prior`). The LM and SASRec score each user once; the weights only
        re-mix them. Returns the choice's table with ``valid_users`` and ``seconds``."""
        if self.collab_model is None:
            raise RuntimeError("itemtoken-lm: the SASRec prior needs the model's SASRec (fit with collab_prior or "
                               "collab_prior_grid)")
        t0 = time.perf_counter()
        valid = valid.sample(n_users, np.random.default_rng([seed, 11]))
        keys = self.config if weights is None else replace(self.config, collab_prior=0.0, collab_prior_grid=list(weights))
        self.prior_weight, self.prior_alone = 0.0, False
        if progress:
            say(True, f"itemtoken-lm: scoring {len(valid)} validation users for the prior weight")
        with batch_progress("prior-weight scoring", progress):
            lm = self.score(valid.histories, valid.users)  # (n, n_items) without the prior
            sas = self.collab_model.score(valid.histories)  # (n, n_items)

        def ndcg_at(w: float) -> float:  # the fast path re-mixed at weight w
            ids, _ = top_k(lm + np.float32(w) * sas, 10, valid.histories)
            return mean_ndcg(ids, valid.targets)

        def alone() -> float:
            ids, _ = top_k(sas, 10, valid.histories)
            return mean_ndcg(ids, valid.targets)

        pick = choose_prior(keys, ndcg_at, alone, progress)
        self.prior_weight, self.prior_alone = pick["chosen"], pick["alone"]
        return {**pick, "valid_users": len(valid), "seconds": time.perf_counter() - t0}

    # --- training -----------------------------------------------------------------------
    def loss(self, ids: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """Item-softmax cross-entropy at labelled positions (+ full-vocabulary term at answers).

        ids, labels: (B, L) int64, right-padded; answer_mask (B, L) bool.
        """
        net = self._require_net()
        h, _ = net.hidden(ids)  # (B, L, H)
        sel = labels != IGNORE  # (B, L)
        logits = net.item_logits(h[sel]).float()  # (M, R)
        if net.collab_weight is not None and net.states is not None:
            logits = logits + self._residual(latest_states(net.states)[sel])
        loss = F.cross_entropy(logits, labels[sel])
        if self.config.lm_loss_weight > 0 and bool(answer_mask.any()):
            full = net.full_logits(h[answer_mask]).float()  # (A, n_base + R)
            loss = loss + self.config.lm_loss_weight * F.cross_entropy(full, net.n_base + labels[answer_mask])
        return loss

    def _validate(self, evalset: Any) -> float:
        scores = self.score(evalset.histories, evalset.users)
        ids, _ = top_k(scores, 10, evalset.histories)
        return mean_ndcg(ids, evalset.targets)

    def _after_step(self, step: int) -> None:
        """Hook called after every optimizer step (tests use it to simulate an interruption)."""

    def _before_finetune(self, split: Split, checkpoint_dir: Path | None, progress: bool) -> None:
        """Hook between building the network and fine-tuning (graph-lm pre-trains here); nothing by default."""

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Fine-tune on ``split.train``; early stopping on validation NDCG@10 (``split.test`` is never read).
        Checkpoints go to ``checkpoint_dir`` (relative to ``workdir`` when one is given; ``""`` = ``workdir``
        itself, or none) and an interrupted fit resumes from them.

        Returns ``{"steps", "epochs", "best_step", "best_valid_ndcg@10", "train_seconds", "stopped",
        "resumed_from", "history", "seconds_per_step", ...}``.
        """
        if split.n_items != self.n_items:
            raise ValueError(f"split has {split.n_items} items but the model was built for {self.n_items}")
        cfg, start = self.config, time.perf_counter()
        titles = split.catalog.titles if split.catalog is not None else [f"item {i}" for i in range(self.n_items)]
        self.feedback = split.feedback if self.wants_feedback else None
        ckdir = checkpoint_root(cfg.checkpoint_dir, workdir)
        with num_threads(cfg.num_threads):
            resuming = ckdir is not None and Checkpoint(ckdir, {}).exists()
            collab, collab_info, state_dim = self._fit_companion(split, resuming, progress)
            self._build(titles, n_users=len(split.train), collab=collab, state_dim=state_dim)
            self._before_finetune(split, ckdir, progress)
            task = LMTask(self, split)
            res = fit_loop(task, task.train_config(), self.device, workdir=workdir, checkpoint_dir=ckdir,
                           progress=progress)
            prior_info = None
            if cfg.collab_prior_grid and len(split.valid):
                prior_info = self.choose_prior(split.valid, None, cfg.prior_valid_users, seed=cfg.seed,
                                               progress=progress)
        return {"steps": res["steps"], "epochs": res["steps"] / res["steps_per_epoch"],
                "steps_per_epoch": res["steps_per_epoch"], "examples_per_epoch": task.n_examples0,
                "best_step": res["best_at"], "best_valid_ndcg@10": res["best_valid_ndcg@10"],
                "valid_users": len(task.valid), "train_seconds": time.perf_counter() - start,
                "seconds_per_step": res["seconds_per_step"],
                "stopped": "epochs" if res["stopped"] == "max_epochs" else res["stopped"],
                "resumed_from": res["resumed_from"], "processes": res["processes"], "collab": collab_info,
                "collab_prior": prior_info, "history": res["history"]}

    def _fit_companion(self, split: Split, resuming: bool, progress: bool) -> tuple[Any, Any, int]:
        """Fit (or load from the cache) the SASRec that the config reads: (initial rank-r item deltas or
        None, its fit facts or None, the width of its states or 0). A resumed run restores its item rows."""
        cfg = self.config
        init_collab = cfg.collab_init == "sasrec" and not resuming
        if not (init_collab or cfg.collab_state != "none" or cfg.uses_prior):
            return None, None, 0
        sasrec, info = fit_companion(split, cfg, cfg.seed, progress)
        collab = cfg.collab_scale * unit_rms_rows(fit_width(sasrec.item_vectors(), cfg.item_rank)) \
            if init_collab else None
        if cfg.collab_state != "none" or cfg.uses_prior:
            self.collab_model, self._collab_rows = sasrec, None
            self.state_scale = state_scale(sasrec, split.train)
        return collab, info, sasrec.state_size if cfg.collab_state != "none" else 0

    # --- inference ----------------------------------------------------------------------
    def prompt_ids(self, history: np.ndarray, user: int | None = None) -> np.ndarray:
        """(L,) token ids of the prompt for one history (the answer starts after it); with ``user``
        the user's ratings and reviews of the history items are shown where known."""
        assert self.prompts is not None
        history = np.asarray(history, dtype=np.int64)
        ratings, reviews = self._feedback_of(user, history)
        return self.prompts.build(history, ratings=ratings, reviews=reviews, lead=self._lead(user),
                                  tail=self._tail(user)).ids

    def render(self, history: np.ndarray, user: int | None = None) -> str:
        """The prompt for ``history`` as text (item tokens shown as ``<|item_i|>``)."""
        return str(self.tokenizer.decode(self.prompt_ids(history, user)))

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32: item-row logits at the answer position, one forward pass per batch (plus
        :attr:`prior_weight` x SASRec's logits of each history when the prior is on)."""
        net = self._require_net()
        if self.prior_alone and self.collab_model is not None:  # the companion alone (chosen on validation)
            return self.collab_model.score(histories)
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        prompts = [self.prompt_ids(h, None if users is None else int(users[i])) for i, h in enumerate(histories)]
        states = self._prompt_states(prompts, histories)
        order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a batch
        bs = self.config.eval_batch_size
        with num_threads(self.config.num_threads), torch.inference_mode(), autocast(self.config.amp, self.device):
            if True:
                for s in batch_starts(len(prompts), bs):
                    rows = order[s : s + bs]
                    ids = self._pad([prompts[i] for i in rows], 0)  # (b, L), right-padded
                    last = torch.tensor([len(prompts[i]) - 1 for i in rows], device=self.device)  # (b,)
                    st = None if states is None else self._stack_states([states[i] for i in rows])  # (b, L, d)
                    with net.using_states(st):
                        h, _ = net.hidden(ids)  # (b, L, H)
                    at = torch.arange(len(rows))
                    logits = net.item_logits(h[at, last]).float()  # (b, R)
                    if net.collab_weight is not None and st is not None:
                        logits = logits + self._residual(latest_states(st)[at, last])
                    out[rows] = logits[:, : self.n_items].float().cpu().numpy()
        if self.prior_weight > 0:
            if self.collab_model is None:
                raise RuntimeError("itemtoken-lm: collab_prior > 0 needs the model's SASRec (fit or load the model)")
            out += np.float32(self.prior_weight) * self.collab_model.score(histories)
        return out

    def _prompt_states(self, prompts: Sequence[np.ndarray], histories: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Per prompt (L_i, d) SASRec states (``collab_state``), else None."""
        if self.config.collab_state == "none":
            return None
        return self._aligned_states(prompts, [np.asarray(h, dtype=np.int64) for h in histories])

    def generate_lists(
        self, histories: Sequence[np.ndarray], k: int = 10, mode: Literal["beam", "greedy", "fast"] = "beam",
        exclude_seen: bool = True, users: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, k) int64 generated item lists.

        ``beam``: constrained beam search (valid, distinct, history excluded when ``exclude_seen``);
        ``greedy``: unconstrained greedy generation over the whole vocabulary (invalid ids are
        ``>= n_items``, repeats possible); ``fast``: top-``k`` of :meth:`score`.
        """
        from llmrec.models.itemtoken.decoding import (
            constrained_beam_search_batch,
            greedy_generate,
            single_token_trie,
        )

        if mode == "fast":
            return self.recommend(histories, k=k, exclude_seen=exclude_seen, users=users)[0]
        net = self._require_net()
        out = np.empty((len(histories), k), dtype=np.int64)
        trie = single_token_trie(self.n_items, net.n_base)
        if mode not in ("beam", "greedy"):
            raise ValueError(f"unknown decoding mode {mode!r}")
        prompts = [self.prompt_ids(h, None if users is None else int(users[i])) for i, h in enumerate(histories)]
        states = self._prompt_states(prompts, histories)
        with num_threads(self.config.num_threads), autocast(self.config.amp, self.device):
            if True:
                if mode == "beam":  # batched: users of similar prompt length share a batch
                    order = np.argsort([len(p) for p in prompts], kind="stable")
                    bs = self.config.eval_batch_size
                    for s in batch_starts(len(order), bs):
                        rows = order[s : s + bs]
                        banned = [np.asarray(histories[i], dtype=np.int64) if exclude_seen else np.empty(0, np.int64)
                                  for i in rows]
                        with net.using_states(None if states is None else
                                              self._stack_states([states[i] for i in rows], left=True)):
                            out[rows], _ = constrained_beam_search_batch(
                                net, [prompts[i] for i in rows], trie, k, self.config.beam_size, banned,
                                step_bias=self._beam_bias([histories[i] for i in rows]))
                else:
                    for i, ids in enumerate(prompts):
                        with net.using_states(None if states is None else self._stack_states([states[i]])):
                            out[i] = greedy_generate(net, ids, self.n_items, k)
        return out

    # --- persistence --------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {n: p.detach().float().cpu().numpy().copy() for n, p in self.trainable_state().items()}
        extra = {"titles": self.titles, "n_base": self._require_net().n_base, "n_users": self.n_users,
                 "added_tokens": [item_token(i) for i in range(self.n_items)] + [item_token("END")]}
        pack_companion(self, tensors, extra)
        return tensors, extra

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        state_dim = 0
        self._collab_rows = None
        unpack_companion(self, tensors, extra, reads_states=self.config.collab_state != "none")
        if self.config.collab_state != "none":
            state_dim = self.collab_model.state_size
        tensors = {k: v for k, v in tensors.items() if not k.startswith("collab.")}
        with num_threads(self.config.num_threads):
            self._build(extra["titles"], init_rows=False, n_users=int(extra.get("n_users", 0)), state_dim=state_dim)
        if self._require_net().n_base != extra["n_base"]:
            raise ValueError(f"backbone {self.config.backbone} has a vocabulary of {self._require_net().n_base}, "
                             f"the saved model expects {extra['n_base']}")
        self._load_trainable(tensors)
        self._require_net().eval()

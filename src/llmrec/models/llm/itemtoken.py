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

import contextlib
import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.data.splits import Padding, Split, pad_targets, split_digest
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.amp import Amp, autocast
from llmrec.models.base import Recommender, top_k
from llmrec.models.collab import (
    choose_weight,
    default_cache_dir,
    fit_sasrec,
    fit_width,
    pack_frozen,
    prefix_states,
    state_scale,
    unit_rms_rows,
    unpack_frozen,
)
from llmrec.models.llm.backbone import DEFAULT_BACKBONE
from llmrec.models.llm.prompts import (
    IGNORE,
    PromptBuilder,
    Template,
    item_token,
    training_example,
    user_token,
)
from llmrec.models.sasrec import SASRecConfig
from llmrec.models.train import Checkpoint, TrainConfig, TrainTask, device_for, fit_loop, num_threads

STATE_TOKEN = "<|llmrec_state|>"  # the history-state token of ``collab_state = "token"``


@dataclass
class ItemTokenLMConfig:
    """Hyper-parameters of :class:`ItemTokenLM`."""

    backbone: str = DEFAULT_BACKBONE  # "smollm2-135m-instruct" (offline), a local folder, or a hub id
    # backbone weights; "bfloat16" halves memory and saves autocast's casts of the frozen weights
    # (LoRA adapters and item rows stay float32)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn: Literal["sdpa", "eager"] = "sdpa"  # attention implementation of the backbone
    amp: Amp = "auto"  # bfloat16 autocast (weights stay float32): "auto" = where the CPU/GPU runs bf16 fast
    n_layers: int = 0  # keep only the first n transformer blocks of the backbone (0 = all): a CPU budget knob
    # prompt
    template: Template = "alpaca"
    instruction: str = "Given the user's purchases in order, predict the next item."
    title_tokens: int = 8  # title tokens shown after each history item token (0 = item tokens only)
    max_prompt_tokens: int = 256  # token budget; the oldest history is dropped first
    max_history: int = 50  # at most this many history items in a prompt
    ratings: bool = True  # show each history item's rating where the dataset has one
    review_chars: int = 100  # characters of each history item's review shown (0 = none)
    init_title_tokens: int = 32  # title tokens averaged to initialize an item's embedding
    head_init_scale: float = 0.1  # output rows start as scale * (title row - mean title row): calm first logits
    # item-row capacity (regularization): 0 = free (R, H) rows; r > 0 = frozen title rows + a rank-r delta
    item_rank: int = 0
    tie_item_rows: bool = False  # output rows = input rows x a learned scale (starts at head_init_scale)
    item_dropout: float = 0.0  # dropout on item input embeddings during training
    user_tokens: bool = False  # a trainable token per training user opens the prompt (unknown users share one)
    # hybrid item rows: "sasrec" starts the rank-r delta of each item row (needs item_rank > 0) from the
    # item vectors of a SASRec fitted on the same training split (collaborative signal the titles lack)
    collab_init: Literal["none", "sasrec"] = "none"
    collab_scale: float = 1.0  # mean norm of the initial delta rows relative to the mean title row norm
    collab_minutes: float = 5.0  # SASRec's training budget (outside max_minutes; counted in train time)
    collab_cache: bool = True  # reuse a SASRec fitted earlier on the same split and config
    # SASRec states in the prompt (a frozen SASRec fitted on the same split; a trainable linear map):
    # "token": its state of the whole history is one token closing the prompt (A-LLMRec-style soft prompt),
    #          seen by the answer positions only;
    # "items": its state after each history item is added to that item token's embedding (causal: the
    #          state of item t has seen items <= t only), so every dense position sees it too.
    collab_state: Literal["none", "token", "items"] = "none"
    # residual logits (needs collab_state): every item logit also gets w * SASRec's own logit of the
    # history so far (its state . its item vector), w learned (starts at 1), so the LM learns what to add
    # to SASRec's ranking instead of re-deriving it; training, the fast path and beam search all use it
    collab_logits: bool = False
    # SASRec as a prior at inference (a product of experts, as the semantic-ID model's collab_prior): every
    # item logit also gets collab_prior x SASRec's own logits of the whole history (beside what collab_logits
    # learned), in the fast path and at every beam step; with collab_prior_grid, fit then keeps the weight
    # of {collab_prior} + grid with the best NDCG@10 on prior_valid_users validation users (0 = all; never
    # test). Training is unchanged: the prior only re-ranks.
    collab_prior: float = 0.0
    collab_prior_grid: list[float] = field(default_factory=list)
    prior_valid_users: int = 0
    # targets
    target: Literal["next-item", "next-k"] = "next-item"
    next_k: int = 10  # answer length for target="next-k"
    padding: Padding = "repeat"  # next-K targets shorter than next_k: repeat | pad-token (end row) | none
    dense: bool = True  # also predict each next history item inside the prompt (item softmax)
    examples_per_user: int = 0  # cut points sampled per user and epoch when not windowing (0 = all)
    lm_loss_weight: float = 0.1  # weight of a full-vocabulary softmax at the answer positions
    # fine-tuning
    finetune: Literal["lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # comma-separated module names, or "all-linear"
    lr: float = 5e-4  # adapter (or transformer) learning rate
    item_lr: float = 2e-3  # learning rate of the new item rows
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    fit_schedule_to_budget: bool = True  # shorten the decay when max_minutes will stop training first
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # optimizer steps (0 = epochs decide)
    max_minutes: float = 55.0  # wall-clock training budget (validation included)
    eval_every: int = 100  # optimizer steps between validations (and once at the end)
    patience: int = 5  # validations without improvement before stopping
    valid_users: int = 1000  # validation users sampled for early stopping (0 = all)
    checkpoint_dir: str = ""  # where to write resumable checkpoints ("" = none)
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    # inference
    beam_size: int = 4
    eval_batch_size: int = 32
    seed: int = 0
    num_threads: int = 2  # torch CPU threads during fit/score (0 keeps torch's setting)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("n_layers", "title_tokens", "review_chars", "examples_per_user", "max_steps", "valid_users",
                     "num_threads", "warmup_steps", "item_rank", "prior_valid_users"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_history", "init_title_tokens", "next_k", "lora_r", "batch_size",
                     "grad_accum", "epochs", "eval_every", "patience", "checkpoint_every", "beam_size",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes <= 0 or self.lr <= 0 or self.item_lr <= 0 or self.head_init_scale <= 0:
            raise ValueError("max_minutes, lr, item_lr and head_init_scale must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout must be in [0, 1)")
        if not 0.0 <= self.item_dropout < 1.0:
            raise ValueError("item_dropout must be in [0, 1)")
        if self.collab_init != "none" and self.item_rank == 0:
            raise ValueError(f"collab_init={self.collab_init!r} initializes the rank-r delta of the item rows: "
                             "set item_rank > 0")
        if self.collab_logits and self.collab_state == "none":
            raise ValueError("collab_logits adds SASRec's logits of the states in the prompt: set collab_state "
                             "to 'items' or 'token'")
        if self.collab_scale < 0 or self.collab_minutes <= 0:
            raise ValueError("collab_scale must be >= 0 and collab_minutes > 0")
        if self.collab_prior < 0 or any(w < 0 for w in self.collab_prior_grid):
            raise ValueError("collab_prior and collab_prior_grid weights must be >= 0")

    @property
    def uses_prior(self) -> bool:
        """Whether inference may add the SASRec prior (so the fitted SASRec is kept and saved)."""
        return self.collab_prior > 0 or any(w > 0 for w in self.collab_prior_grid)


# Config keys that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"max_minutes", "checkpoint_dir", "checkpoint_every", "num_threads", "eval_batch_size", "device", "amp",
                "collab_prior_grid", "prior_valid_users"}


# --- network ------------------------------------------------------------------------------


class ItemRows(nn.Module):
    """(R, H) item rows: free parameters (``rank=0``) or a frozen base plus a trainable low-rank
    delta ``base + a @ b`` (a: (R, rank), b: (rank, H)), which bounds what the rows can memorize
    and keeps each item near its title embedding (weight decay pulls the delta to zero)."""

    def __init__(self, init: torch.Tensor, rank: int = 0) -> None:
        super().__init__()
        self.rank = int(rank)
        if self.rank:
            R, H = init.shape
            self.register_buffer("base", init.clone())
            self.a = nn.Parameter(torch.zeros(R, self.rank, dtype=init.dtype))
            std = float(init.std()) if init.numel() > 1 else 1.0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(R * 7919 + H)
                self.b = nn.Parameter(torch.randn(self.rank, H, dtype=init.dtype) * (std or 1.0))
        else:
            self.weight = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        """The (R, H) rows."""
        if self.rank:
            return self.base + self.a @ self.b
        return self.weight


class ItemTokenNet(nn.Module):
    """A causal LM whose vocabulary is extended by R item rows kept in separate small matrices.

    Token ``t < n_base`` is a backbone token; token ``n_base + r`` is item row ``r``. Input rows
    ``emb_rows`` (R, H); output rows ``head_rows`` (R, H), or with ``tie`` the input rows times a
    learned scale; a bias (R,). ``item_dropout`` drops elements of item input embeddings in training.
    """

    def __init__(self, lm: nn.Module, n_base: int, item_emb: torch.Tensor, item_head: torch.Tensor,
                 rank: int = 0, tie: bool = False, head_scale: float = 1.0, item_dropout: float = 0.0,
                 user_emb: torch.Tensor | None = None, state_dim: int = 0, collab_logits: bool = False) -> None:
        super().__init__()
        self.lm = lm  # the HF model, possibly wrapped by peft
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        # plain references (not submodules: they are already registered under self.lm)
        object.__setattr__(self, "_decoder", base.base_model)
        object.__setattr__(self, "_embed", base.get_input_embeddings())
        object.__setattr__(self, "_head", base.get_output_embeddings())
        self.n_base = int(n_base)
        self.n_rows = int(item_emb.shape[0])
        self.emb_rows = ItemRows(item_emb, rank)
        self.head_rows: ItemRows | None = None if tie else ItemRows(item_head, rank)
        self.head_scale = nn.Parameter(torch.tensor([float(head_scale)])) if tie else None  # (1,)
        self.item_bias = nn.Parameter(torch.zeros(self.n_rows, dtype=item_head.dtype))  # (R,)
        self.item_drop = nn.Dropout(item_dropout)
        # user rows (U + 1, H) follow the item rows in the token id space: token n_base + R + u
        self.user_rows = ItemRows(user_emb, rank) if user_emb is not None else None
        # the history-state token comes after them; its embedding is state_proj(states[b]) for row b
        self.state_id = self.n_base + self.n_rows + (0 if user_emb is None else int(user_emb.shape[0]))
        self.state_proj: nn.Linear | None = None
        if state_dim:
            self.state_proj = nn.Linear(state_dim, item_emb.shape[1], bias=False)
            std = float(item_emb.std()) if item_emb.numel() > 1 else 1.0
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(state_dim * 7919 + item_emb.shape[1])
                self.state_proj.weight.normal_(0.0, std or 1.0)  # unit-norm states -> rows as large as items
        self.states: torch.Tensor | None = None  # (B, L, state_dim) of the batch being run (see using_states)
        # weight of the residual SASRec logits (``collab_logits``), trained with the item rows
        self.collab_weight = nn.Parameter(torch.ones(1)) if collab_logits else None  # (1,)

    @contextlib.contextmanager
    def using_states(self, states: torch.Tensor | None) -> Iterator[None]:
        """Run the block with ``states`` (B, L, state_dim) aligned with the input ids: position (b, l)
        adds ``state_proj(states[b, l])`` to its embedding (zero rows add nothing); a state token's
        embedding is that vector alone. Calls whose ids are not (B, L) (later decoding steps) get none."""
        old, self.states = self.states, states
        try:
            yield
        finally:
            self.states = old

    @property
    def item_emb(self) -> torch.Tensor:
        """(R, H) input rows."""
        return self.emb_rows()

    @property
    def item_head(self) -> torch.Tensor:
        """(R, H) output rows (the scaled input rows when tied)."""
        if self.head_rows is None:
            assert self.head_scale is not None
            return self.head_scale * self.emb_rows()
        return self.head_rows()

    def item_state(self) -> dict[str, torch.Tensor]:
        """Item parameters and buffers by saved name (``emb``/``head``/``bias`` for free untied rows)."""
        rename = {"emb_rows.weight": "emb", "head_rows.weight": "head", "item_bias": "bias"}
        out = {rename.get(n, n): p for n, p in self.named_parameters() if not n.startswith("lm.")}
        out.update({rename.get(n, n): b for n, b in self.named_buffers() if not n.startswith("lm.")})
        return out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L, H): backbone rows for base tokens, item (and user) rows for theirs."""
        first_user = self.n_base + self.n_rows
        is_new = ids >= self.n_base  # (B, L)
        is_item = is_new & (ids < first_user)
        base = self._embed(torch.where(is_new, 0, ids))  # (B, L, H)
        items = self.item_drop(F.embedding(torch.where(is_item, ids - self.n_base, 0), self.item_emb))  # (B, L, H)
        out = torch.where(is_item[..., None], items.to(base.dtype), base)
        if self.user_rows is not None:
            is_user = (ids >= first_user) & (ids < self.state_id)
            users = F.embedding(torch.where(is_user, ids - first_user, 0), self.user_rows())  # (B, L, H)
            out = torch.where(is_user[..., None], self.item_drop(users).to(base.dtype), out)
        if self.state_proj is None:
            return out
        is_state = ids == self.state_id  # (B, L)
        states = self.states
        if states is None or tuple(states.shape[:2]) != tuple(ids.shape):
            if bool(is_state.any()):
                raise RuntimeError("the prompts hold history-state tokens: run them inside net.using_states(states)")
            return out
        vec = self.state_proj(states.to(self.state_proj.weight.dtype)).to(out.dtype)  # (B, L, H)
        return torch.where(is_state[..., None], vec, out + vec)

    def hidden(
        self, ids: torch.Tensor, past_key_values: Any = None, use_cache: bool = False,
        attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Final hidden states (B, L, H) of ``ids`` (B, L), and the cache.

        Right-padded (or unpadded) ``ids`` need no mask (attention is causal); left-padded ones
        (batched generation) pass ``attention_mask`` (B, L_past + L) and ``position_ids`` (B, L).
        """
        out = self._decoder(inputs_embeds=self.embed(ids), past_key_values=past_key_values, use_cache=use_cache,
                            attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state, out.past_key_values if use_cache else None

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) -> (..., R) logits over the item rows."""
        return F.linear(h, self.item_head.to(h.dtype), self.item_bias.to(h.dtype))

    def full_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) -> (..., n_base + R) logits over backbone tokens then item rows."""
        return torch.cat([self._head(h), self.item_logits(h)], dim=-1)


def latest_states(states: torch.Tensor) -> torch.Tensor:
    """(B, L, d) -> (B, L, d): at each position the most recent non-zero state at or before it
    (zero before the first), so a position between item tokens sees the state after the last item."""
    B, L, d = states.shape
    has = states.abs().sum(-1) > 0  # (B, L)
    idx = torch.where(has, torch.arange(L, device=states.device).expand(B, L), -1)
    idx = torch.cummax(idx, dim=1).values  # (B, L): last position <= l that has a state, or -1
    out = states.gather(1, idx.clamp(min=0)[..., None].expand(B, L, d))
    return out * (idx >= 0)[..., None].to(out.dtype)


def truncate_layers(lm: nn.Module, n_layers: int) -> None:
    """Keep the first ``n_layers`` transformer blocks of ``lm`` (Llama-style ``layers`` or GPT-2 ``h``)."""
    decoder = lm.base_model
    name = "layers" if hasattr(decoder, "layers") else "h" if hasattr(decoder, "h") else None
    if name is None:
        raise ValueError(f"n_layers: cannot find the transformer blocks of {type(lm).__name__}")
    blocks = getattr(decoder, name)
    if not 1 <= n_layers <= len(blocks):
        raise ValueError(f"n_layers must be in 1..{len(blocks)}, got {n_layers}")
    setattr(decoder, name, nn.ModuleList(list(blocks)[:n_layers]))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(lm.config, key):
            setattr(lm.config, key, n_layers)
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:n_layers]


def title_rows(weight: torch.Tensor, token_lists: Sequence[Sequence[int]], n_tokens: int) -> torch.Tensor:
    """(N, H) mean of ``weight`` rows over the first ``n_tokens`` tokens of each list (mean row if empty)."""
    fallback = weight.mean(dim=0)
    rows = [weight[torch.tensor(list(t)[:n_tokens])].mean(dim=0) if len(t) else fallback for t in token_lists]
    return torch.stack(rows) if rows else weight[:0]


# --- the recommender ----------------------------------------------------------------------


class ItemTokenLM(Recommender):
    """Pretrained causal LM + item tokens, LoRA fine-tuned to generate the next items."""

    name = "itemtoken-lm"
    Config = ItemTokenLMConfig

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
        self.net = ItemTokenNet(lm, n_base, item_emb.float(), item_head.float(), rank=cfg.item_rank,
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

    # --- data ---------------------------------------------------------------------------
    def _epoch_examples(self, train: Sequence[np.ndarray], epoch: int) -> list[tuple[np.ndarray, ...]]:
        """(input_ids, labels, answer_mask) examples of one epoch, from training sequences only."""
        cfg = self.config
        assert self.prompts is not None
        rng = np.random.default_rng([cfg.seed, epoch])
        k = cfg.next_k if cfg.target == "next-k" else 1
        examples: list[tuple[np.ndarray, ...]] = []
        prefixes: list[np.ndarray] = []
        for user, seq in enumerate(train):
            seq = np.asarray(seq, dtype=np.int64)
            ratings, reviews = self._feedback_of(user, seq)
            n = len(seq)
            if n < 2:
                continue
            if cfg.target == "next-item" and cfg.dense and cfg.examples_per_user == 0:
                # windows ending at the last item, then every max_history items further back
                cuts = list(range(n - 1, 0, -cfg.max_history))
            else:
                cuts = list(range(1, n))
                if cfg.examples_per_user and len(cuts) > cfg.examples_per_user:
                    cuts = sorted(rng.choice(cuts, cfg.examples_per_user, replace=False).tolist())
            for t in cuts:
                answer = pad_targets(seq[t : t + k], k, cfg.padding, pad_id=self.end_row)
                if len(answer) == 0:
                    continue
                prompt = self.prompts.build(seq[:t], reserve=len(answer) - 1, lead=self._lead(user),
                                            tail=self._tail(), ratings=None if ratings is None else ratings[:t],
                                            reviews=None if reviews is None else reviews[:t])
                examples.append(training_example(prompt, answer, self.prompts.n_base, dense=cfg.dense))
                fed = [a for a in answer[:-1] if a < self.n_items]  # answer items fed as input (next-k)
                prefixes.append(seq[:t] if cfg.collab_state == "token" else np.concatenate([seq[:t], fed]))
        if cfg.collab_state != "none" and examples:  # SASRec states aligned with each example's ids
            states = self._aligned_states([e[0] for e in examples], prefixes)
            examples = [(*e, st) for e, st in zip(examples, states, strict=True)]
        return examples

    def _tail(self) -> tuple[int, ...]:
        """Token ids that close the prompt: the history-state token (``collab_state = "token"``), else none."""
        return (self._require_net().state_id,) if self.config.collab_state == "token" else ()

    def _aligned_states(self, ids: Sequence[np.ndarray], histories: Sequence[np.ndarray]) -> list[np.ndarray]:
        """For each token sequence ``ids[i]`` (L_i,) built from ``histories[i]``: (L_i, d) float32 scaled
        SASRec states, zero where a position gets none. ``token``: the state of the whole history at
        the state token. ``items``: the m item tokens of ``ids[i]`` are the last m items of
        ``histories[i]`` in order (history items, then any answer items fed as input); each gets the
        state of the history up to and including its item."""
        net = self._require_net()
        if self.collab_model is None:
            raise RuntimeError("itemtoken-lm: collab_state needs its SASRec (fit or load the model)")
        d = self.collab_model.config.hidden_size
        out = [np.zeros((len(x), d), dtype=np.float32) for x in ids]
        scale = np.float32(self.state_scale)
        if self.config.collab_state == "token":
            states = self.collab_model.user_states(histories) * scale  # (n, d)
            for o, x, st in zip(out, ids, states, strict=True):
                o[np.asarray(x) == net.state_id] = st
            return out
        pos = [np.flatnonzero((np.asarray(x) >= net.n_base) & (np.asarray(x) < net.n_base + self.n_items)) for x in ids]
        # the state at an item is SASRec's state of the history up to that item (on that prefix alone)
        hists = [np.asarray(h, dtype=np.int64) for h in histories]
        for o, p, st in zip(out, pos, prefix_states(self.collab_model, hists, [len(p) for p in pos]), strict=True):
            if len(st):
                o[p[-len(st):]] = st * scale
        return out

    def _stack_states(self, states: Sequence[np.ndarray], left: bool = False) -> torch.Tensor:
        """(B, L_max, d) of per-row (L_i, d) states, zero-padded on the right (or the left)."""
        width = max(len(x) for x in states)
        out = np.zeros((len(states), width, states[0].shape[1]), dtype=np.float32)
        for i, x in enumerate(states):
            if left:
                out[i, width - len(x):] = x
            else:
                out[i, : len(x)] = x
        return torch.from_numpy(out).to(self.device)

    def _batch_states(self, examples: Sequence[tuple[np.ndarray, ...]], rows: Any) -> torch.Tensor | None:
        if self.config.collab_state == "none":
            return None
        return self._stack_states([examples[i][3] for i in rows])

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

    def choose_prior(self, valid: Any, weights: Sequence[float], n_users: int = 0, seed: int = 0) -> dict[str, Any]:
        """Set :attr:`prior_weight` to the weight of ``weights`` with the best NDCG@10 of the fast path on
        ``n_users`` users sampled from ``valid`` (an :class:`~llmrec.data.splits.EvalSet`; 0 = all; ties go to
        the smaller weight). The LM and SASRec score each user once; the weights only re-mix them.
        Returns ``{"weights", "valid_ndcg@10", "chosen", "valid_users", "seconds"}``."""
        if self.collab_model is None:
            raise RuntimeError("itemtoken-lm: the SASRec prior needs the model's SASRec (fit with collab_prior or "
                               "collab_prior_grid)")
        t0 = time.perf_counter()
        valid = valid.sample(n_users, np.random.default_rng([seed, 11]))
        self.prior_weight = 0.0
        lm = self.score(valid.histories, valid.users)  # (n, n_items) without the prior
        sas = self.collab_model.score(valid.histories)  # (n, n_items)

        def ndcg_at(w: float) -> float:  # the fast path re-mixed at weight w
            ids, _ = top_k(lm + np.float32(w) * sas, 10, valid.histories)
            return mean_ndcg(ids, valid.targets)

        ws, scores, self.prior_weight = choose_weight(weights, ndcg_at)
        return {"weights": ws, "valid_ndcg@10": scores, "chosen": self.prior_weight, "valid_users": len(valid),
                "seconds": time.perf_counter() - t0}

    def _batches(self, n_examples: int, lengths: np.ndarray, epoch: int) -> list[np.ndarray]:
        """Shuffled batches of similar-length examples (deterministic per seed and epoch)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        order = rng.permutation(n_examples)
        chunk = cfg.batch_size * 32
        batches = []
        for s in range(0, n_examples, chunk):
            part = order[s : s + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches.extend(part[i : i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _pad(self, rows: Sequence[np.ndarray], fill: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), fill, dtype=np.asarray(rows[0]).dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return torch.from_numpy(out).to(self.device)

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
            task = _LMTask(self, split)
            res = fit_loop(task, task.train_config(), self.device, workdir=workdir, checkpoint_dir=ckdir,
                           progress=progress)
            prior_info = None
            if cfg.collab_prior_grid and len(split.valid):
                prior_info = self.choose_prior(split.valid, [cfg.collab_prior, *cfg.collab_prior_grid],
                                               cfg.prior_valid_users, seed=cfg.seed)
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
        sasrec, info = fit_sasrec(split, SASRecConfig(max_minutes=cfg.collab_minutes, seed=cfg.seed),
                                  progress=progress, cache_dir=default_cache_dir() if cfg.collab_cache else None)
        collab = cfg.collab_scale * unit_rms_rows(fit_width(sasrec.item_vectors(), cfg.item_rank)) \
            if init_collab else None
        if cfg.collab_state != "none" or cfg.uses_prior:
            self.collab_model, self._collab_rows = sasrec, None
            self.state_scale = state_scale(sasrec, split.train)
        return collab, info, sasrec.config.hidden_size if cfg.collab_state != "none" else 0

    # --- inference ----------------------------------------------------------------------
    def prompt_ids(self, history: np.ndarray, user: int | None = None) -> np.ndarray:
        """(L,) token ids of the prompt for one history (the answer starts after it); with ``user``
        the user's ratings and reviews of the history items are shown where known."""
        assert self.prompts is not None
        history = np.asarray(history, dtype=np.int64)
        ratings, reviews = self._feedback_of(user, history)
        return self.prompts.build(history, ratings=ratings, reviews=reviews, lead=self._lead(user),
                                  tail=self._tail()).ids

    def render(self, history: np.ndarray, user: int | None = None) -> str:
        """The prompt for ``history`` as text (item tokens shown as ``<|item_i|>``)."""
        return str(self.tokenizer.decode(self.prompt_ids(history, user)))

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32: item-row logits at the answer position, one forward pass per batch (plus
        :attr:`prior_weight` x SASRec's logits of each history when the prior is on)."""
        net = self._require_net()
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        prompts = [self.prompt_ids(h, None if users is None else int(users[i])) for i, h in enumerate(histories)]
        states = self._prompt_states(prompts, histories)
        order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a batch
        bs = self.config.eval_batch_size
        with num_threads(self.config.num_threads), torch.inference_mode(), autocast(self.config.amp, self.device):
            if True:
                for s in range(0, len(prompts), bs):
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
        from llmrec.models.llm.decoding import (
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
                    for s in range(0, len(order), bs):
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
        extra["collab_prior"] = float(self.prior_weight)
        if self.collab_model is not None:  # the frozen SASRec of collab_state / the prior travels with the model
            sas_tensors, extra["collab_state"] = pack_frozen(self.collab_model, self.state_scale)
            tensors.update(sas_tensors)
        return tensors, extra

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        state_dim = 0
        self.collab_model, self._collab_rows = None, None
        self.prior_weight = float(extra.get("collab_prior", self.config.collab_prior))
        if self.config.collab_state != "none" or self.prior_weight > 0 or "collab_state" in extra:
            self.collab_model, self.state_scale = unpack_frozen(tensors, extra, self.n_items, "itemtoken-lm")
        if self.config.collab_state != "none":
            state_dim = self.collab_model.config.hidden_size
        tensors = {k: v for k, v in tensors.items() if not k.startswith("collab.")}
        with num_threads(self.config.num_threads):
            self._build(extra["titles"], init_rows=False, n_users=int(extra.get("n_users", 0)), state_dim=state_dim)
        if self._require_net().n_base != extra["n_base"]:
            raise ValueError(f"backbone {self.config.backbone} has a vocabulary of {self._require_net().n_base}, "
                             f"the saved model expects {extra['n_base']}")
        self._load_trainable(tensors)
        self._require_net().eval()


def checkpoint_root(checkpoint_dir: str, workdir: str | Path | None) -> Path | None:
    """Where a fit keeps its checkpoints: ``checkpoint_dir`` (relative to ``workdir``, the run being
    trained, when there is one), ``workdir`` itself for ``""``, or None (no checkpoints)."""
    if checkpoint_dir:
        path = Path(checkpoint_dir)
        return path if path.is_absolute() or workdir is None else Path(workdir) / path
    return None if workdir is None else Path(workdir)


class _LMTask(TrainTask):
    """The item-token LM's fine-tuning for the shared loop: prompts of training prefixes (rebuilt per
    epoch only when cut points are sampled), batches of similar length shuffled per (seed, epoch),
    item-softmax loss; validation NDCG@10 on a fixed sample of validation users."""

    name = "itemtoken-lm"

    def __init__(self, model: ItemTokenLM, split: Split) -> None:
        cfg = model.config
        self.model, self.split, self.module = model, split, model._require_net()
        self.valid = split.valid.sample(cfg.valid_users, np.random.default_rng([cfg.seed, 7]))
        self.examples, self.examples_epoch = model._epoch_examples(split.train, 0), 0
        self.n_examples0 = len(self.examples)

    def train_config(self) -> TrainConfig:
        """Step unit; warm-up then ``schedule`` (fitted to the budget), gradient accumulation, dropout
        reseeded per step, the budget counted from the first step, the loss of the last 50 batches."""
        c = self.model.config
        return TrainConfig(unit="step", max_epochs=c.epochs, max_steps=c.max_steps, max_minutes=c.max_minutes,
                           clock="loop", eval_every=c.eval_every, patience=c.patience, weight_decay=c.weight_decay,
                           schedule=c.schedule, warmup_steps=c.warmup_steps,
                           fit_schedule_to_budget=c.fit_schedule_to_budget, grad_accum=c.grad_accum, rng="per-step",
                           seed=c.seed, checkpoint_every=c.checkpoint_every, loss_window=50)

    def param_groups(self) -> list[dict[str, Any]]:
        c, net = self.model.config, self.module
        item_params = [p for p in net.item_state().values() if isinstance(p, nn.Parameter)]
        lm_params = [p for n, p in self.model.trainable_state().items() if n.startswith("lm.")]
        groups = [{"params": item_params, "lr": c.item_lr, "base_lr": c.item_lr}]
        if lm_params:
            groups.append({"params": lm_params, "lr": c.lr, "base_lr": c.lr})
        return groups

    def n_batches(self) -> int:
        return math.ceil(len(self.examples) / self.model.config.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self.model.config.examples_per_user and self.examples_epoch != epoch:  # cut points sampled per epoch
            self.examples, self.examples_epoch = self.model._epoch_examples(self.split.train, epoch), epoch
        # (otherwise every epoch has the same examples and SASRec states: built once)
        lengths = np.array([len(e[0]) for e in self.examples])
        return self.model._batches(len(self.examples), lengths, epoch)

    def loss(self, rows: np.ndarray) -> tuple[torch.Tensor, float]:
        m, ex = self.model, self.examples
        ids = m._pad([ex[i][0] for i in rows], 0)
        labels = m._pad([ex[i][1] for i in rows], IGNORE)
        amask = m._pad([ex[i][2] for i in rows], False)
        with autocast(m.config.amp, m.device), self.module.using_states(m._batch_states(ex, rows)):
            return m.loss(ids, labels, amask), 1.0

    def has_validation(self) -> bool:
        return len(self.valid) > 0

    def validate(self) -> float:
        return self.model._validate(self.valid)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.trainable_state().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model._load_trainable(state)

    def resume_key(self) -> dict[str, Any]:
        cfg = {k: v for k, v in asdict(self.model.config).items() if k not in _RESUME_FREE}
        return {"config": cfg, "data": split_digest(self.split)}

    def after_step(self, step: int) -> None:
        self.model._after_step(step)

"""Hyper-parameters of the item-token LM (:class:`ItemTokenLMConfig`) and the keys a resumed fit may change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmrec.data.splits import Padding
from llmrec.models.amp import Amp
from llmrec.models.collab import CompanionKeys
from llmrec.models.itemtoken.prompts import (
    Template,
)
from llmrec.models.llm.backbone import DEFAULT_BACKBONE

STATE_TOKEN = "<|llmrec_state|>"  # the history-state token of ``collab_state = "token"``


@dataclass
class ItemTokenLMConfig(CompanionKeys):
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
    # SASRec as a prior at inference (collab_prior, collab_prior_grid, prior_valid_users, prior_widen,
    # prior_alone: the companion's keys, see CompanionKeys): every item logit also gets collab_prior x SASRec's
    # own logits of the whole history (beside what collab_logits learned), in the fast path and at every beam
    # step. Training is unchanged: the prior only re-ranks.
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
                     "num_threads", "warmup_steps", "item_rank"):
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
        if self.collab_scale < 0:
            raise ValueError("collab_scale must be >= 0")
        self.check_companion()



# Config keys that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"max_minutes", "checkpoint_dir", "checkpoint_every", "num_threads", "eval_batch_size", "device", "amp",
                "collab_prior_grid", "prior_valid_users", "prior_widen", "prior_alone"}

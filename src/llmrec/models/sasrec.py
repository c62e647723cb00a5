"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), nanoGPT style.

A causal Transformer reads a user's last ``max_len`` items and predicts the next item at every
position. Training uses the full softmax (cross-entropy over all items) by default, or a sampled
softmax over the target and ``n_negatives`` uniformly drawn items per sequence (``loss =
"sampled_softmax"``, the SASRec+SS of the eSASRec benchmark, arXiv 2508.06450); the item embedding
matrix doubles as the output layer (``logits = h @ E_items^T``).

Id spaces: dataset items are ``0..n_items-1``. Inside the network every item is shifted by +1 so
that token ``0`` is padding; input rows are left-padded and long histories are truncated from the
oldest end, so the most recent item always sits in the last column. Logits are over dataset ids
``0..n_items-1`` (the padding token is never scored).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import numpy as np
import torch

from llmrec.data.splits import Split, split_digest
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.base import Recommender, left_pad, length_batches
from llmrec.models.sasrec_net import (
    Block,
    CausalSelfAttention,
    FeedForward,
    FullSoftmaxCE,
    LowPassFilter,
    SASRecNet,
    sampled_softmax_ce,
)
from llmrec.models.train import TrainConfig, TrainTask, batch_starts, device_for, fit_loop, num_threads

__all__ = ["Block", "CausalSelfAttention", "FeedForward", "FullSoftmaxCE", "LowPassFilter", "SASRec", "SASRecConfig",
           "SASRecNet", "sampled_softmax_ce"]


@dataclass
class SASRecConfig:
    """Hyper-parameters of :class:`SASRec` (defaults tuned on Amazon Beauty validation).

    Threads: on a CPU shared with other jobs, 2+ torch threads can be several times *slower*
    than 1, because OpenMP threads spin-wait for each other; use ``num_threads > 1`` on a
    dedicated machine, or set ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported.
    """

    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256  # feed-forward width
    dropout: float = 0.5  # embedding / residual / feed-forward dropout
    attn_dropout: float = 0.5  # dropout on attention weights
    max_len: int = 50  # longest input sequence; older items are dropped
    lr: float = 3e-3  # peak learning rate (Adam/AdamW)
    weight_decay: float = 0.0  # decoupled (AdamW); 0 gives plain Adam
    label_smoothing: float = 0.0  # softmax target (1 - eps) x onehot + eps / n_items (full softmax only)
    loss: Literal["softmax", "sampled_softmax"] = "softmax"  # full softmax, or target vs n_negatives draws
    n_negatives: int = 256  # sampled_softmax: uniform negatives per sequence, shared by its positions
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decay to 0 over max_epochs
    batch_size: int = 256  # training sequences per step
    max_epochs: int = 20  # also the length of the cosine schedule
    eval_every: int = 1  # epochs between validation evaluations
    patience: int = 10  # evaluations without improvement before stopping
    min_epochs: int = 0  # patience may not stop training before this epoch
    max_minutes: float = 15.0  # wall-clock training budget (validation time included)
    seed: int = 0
    num_threads: int = 1  # torch CPU threads in fit/score (0 keeps torch's); see the note below
    device: str = "cpu"  # "cpu" or "cuda"
    eval_batch_size: int = 512  # histories per scoring batch
    # Low-pass filter beside self-attention (BSARec / FMLP-Rec idea, made causal; see LowPassFilter):
    # each block adds filter_mix x filter + (1 - filter_mix) x attention; 0 = plain SASRec.
    filter_mix: float = 0.0
    filter_window: int = 5  # the filter averages the newest filter_window items up to each position
    emb_scale: bool = True  # multiply input item embeddings by sqrt(hidden_size) (SASRec's paper; RecTools: no)
    block: Literal["pre_ln", "sasrec"] = "pre_ln"  # residual layout (see Block)
    init: Literal["normal", "xavier"] = "normal"  # N(0, 0.02) weights (GPT-2), or Xavier-normal matrices (RecTools)

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})"
            )
        for name in (
            "hidden_size",
            "n_layers",
            "n_heads",
            "inner_size",
            "max_len",
            "batch_size",
            "max_epochs",
            "eval_every",
            "patience",
            "eval_batch_size",
            "filter_window",
            "n_negatives",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attn_dropout < 1.0):
            raise ValueError("dropout and attn_dropout must be in [0, 1)")
        if self.max_minutes <= 0:
            raise ValueError("max_minutes must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        hints = get_type_hints(type(self))
        for name in ("loss", "block", "init"):  # direct construction; config files are checked by from_dict too
            choices = get_args(hints[name])
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.loss == "sampled_softmax" and self.label_smoothing > 0.0:
            raise ValueError("label_smoothing applies to loss='softmax' only")
        if not 0.0 <= self.filter_mix <= 1.0:
            raise ValueError(f"filter_mix must be in [0, 1], got {self.filter_mix}")
        if self.num_threads < 0 or self.min_epochs < 0:
            raise ValueError("num_threads and min_epochs must be >= 0")


# --- recommender --------------------------------------------------------------------------


class SASRec(Recommender):
    """SASRec with (full or sampled) softmax cross-entropy training and validation early stopping."""

    name = "sasrec"
    Config = SASRecConfig

    def __init__(self, config: SASRecConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.device = device_for(config.device)
        self._build_net()

    def _build_net(self) -> None:
        """(Re)build ``self.net`` from ``config.seed`` (the same seed gives the same initial weights)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.net = self._new_net().to(self.device)

    def _new_net(self) -> SASRecNet:
        return SASRecNet(self.config, self.n_items)

    # --- helpers ---------------------------------------------------------------------------
    def _training_rows(self, train: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Shifted (inputs, targets), each (n_rows, max_len), one row per sequence with >= 2 items."""
        L = self.config.max_len
        seqs = [np.asarray(s, dtype=np.int64)[-(L + 1) :] + 1 for s in train if len(s) >= 2]
        inputs = left_pad([s[:-1] for s in seqs], L, fill=0)  # (n_rows, L)
        targets = left_pad([s[1:] for s in seqs], L, fill=0)  # (n_rows, L)
        return inputs, targets

    def _validate(self, split: Split) -> float:
        """Mean NDCG@10 on ``split.valid``: full ranking over all items, history items excluded."""
        valid = split.valid
        order = np.argsort([len(h) for h in valid.histories], kind="stable")  # less padding per batch
        ranked, _ = self.recommend(
            [valid.histories[i] for i in order], k=10, batch_size=self.config.eval_batch_size
        )
        targets = [valid.targets[i] for i in order]
        return mean_ndcg(ranked, targets)

    # --- Recommender API -------------------------------------------------------------------
    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Train on ``split.train``; early-stop on validation NDCG@10 (``split.test`` is never read).

        Returns ``{"epochs", "best_epoch", "best_valid_ndcg@10", "train_seconds", "stopped",
        "history", ...}``; ``stopped`` is "max_epochs", "patience" or "max_minutes", ``history`` one
        ``{"epoch", "loss", "valid_ndcg@10"?, "step", "seconds"}`` record per epoch. The best weights
        are restored. With ``workdir`` training checkpoints there each epoch and resumes from it.
        """
        if split.n_items != self.n_items:
            raise ValueError(f"split has {split.n_items} items but the model was built for {self.n_items}")
        start = time.perf_counter()
        with num_threads(self.config.num_threads, self.device):
            task = _SASRecTask(self, split)
            res = fit_loop(task, task.train_config(), self.device, workdir=workdir, progress=progress, fit_start=start)
        self.net.eval()
        valid = task.has_validation()
        return {"epochs": res["epochs"], "best_epoch": res["best_at"] if valid else res["epochs"],
                "best_valid_ndcg@10": res["best_valid_ndcg@10"], "train_seconds": time.perf_counter() - start,
                "stopped": res["stopped"], "history": res["history"], "steps": res["steps"],
                "resumed_from": res["resumed_from"], "processes": res["processes"]}

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32 next-item logits for each history of dataset item ids."""
        with torch.no_grad():
            out_emb = self.net.item_table()[1:]  # (n_items, H)
        return self._last_hidden(histories, lambda h: h @ out_emb.T, self.n_items)

    @property
    def state_size(self) -> int:
        """Width of :meth:`user_states` and :meth:`item_vectors` (``hidden_size`` unless the net widens it)."""
        return int(self.net.out_width)

    def user_states(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(n, state_size) float32 final hidden state of each history (its logits are this @ item_vectors().T)."""
        return self._last_hidden(histories, lambda h: h, self.state_size)

    def _last_hidden(self, histories: Sequence[np.ndarray], head: Any, width: int) -> np.ndarray:
        """``head`` applied to the (b, H) last-position hidden states of batches of histories: (n, width)."""
        self.net.eval()
        L, bs = self.config.max_len, self.config.eval_batch_size
        out = np.empty((len(histories), width), dtype=np.float32)
        hists = [np.asarray(h, dtype=np.int64)[-L:] + 1 for h in histories]  # shifted ids
        order = np.argsort([len(h) for h in hists], kind="stable")  # similar lengths share a batch
        with num_threads(self.config.num_threads, self.device), torch.no_grad():
            for s in batch_starts(len(hists), bs):
                rows = order[s : s + bs]
                chunk = [hists[i] for i in rows]
                w = max(1, max(len(h) for h in chunk))  # >= 1 column even if all are empty
                tokens = torch.from_numpy(left_pad(chunk, w, fill=0)).to(self.device)  # (b, w)
                out[rows] = head(self.net.hidden(tokens)[:, -1, :]).float().cpu().numpy()
        return out

    def item_vectors(self) -> np.ndarray:
        """(n_items, state_size) float32 item embeddings (input and output rows are tied), row ``j``
        = dataset item ``j``; the collaborative item vectors other models can start from."""
        with torch.no_grad():
            return self.net.item_table()[1:].detach().float().cpu().numpy().copy()

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {k: v.detach().cpu().numpy().copy() for k, v in self.net.state_dict().items()}
        return tensors, {}

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
        self.net.load_state_dict(state, strict=True)
        self.net.eval()


# Config keys that may differ between an interrupted fit and its resumption (they do not change the result).
RESUME_FREE = frozenset({"max_minutes", "num_threads", "device", "eval_batch_size"})


class _SASRecTask(TrainTask):
    """SASRec's training for the shared loop: length-bucketed batches of the training rows drawn
    from one seeded numpy stream, full or sampled softmax loss, validation NDCG@10 on all validation users."""

    name = "sasrec"

    def __init__(self, model: SASRec, split: Split) -> None:
        self.model, self.split, self.module = model, split, model.net
        self.inputs, self.targets = model._training_rows(split.train)  # (R, L) each
        self.lengths = (self.inputs != 0).sum(axis=1)  # (R,)
        self.data_rng = np.random.default_rng(model.config.seed)

    def train_config(self) -> TrainConfig:
        """Epoch unit; cosine-to-zero over ``max_epochs`` (or constant); the budget counts from fit's
        start; dropout seeded once with ``seed + 1``."""
        c = self.model.config
        return TrainConfig(unit="epoch", max_epochs=c.max_epochs, max_minutes=c.max_minutes, clock="fit",
                           eval_every=c.eval_every, patience=c.patience, min_rounds=c.min_epochs,
                           weight_decay=c.weight_decay,
                           schedule="cosine-to-zero" if c.lr_schedule == "cosine" else "constant",
                           rng="stream", seed=c.seed + 1)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.module.parameters()), "lr": self.model.config.lr}]

    def n_batches(self) -> int:
        return math.ceil(len(self.inputs) / self.model.config.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        return length_batches(self.lengths, self.model.config.batch_size, self.data_rng)

    def loss(self, idx: np.ndarray) -> tuple[torch.Tensor, float]:
        width = int(self.lengths[idx].max())
        x = torch.from_numpy(self.inputs[idx, -width:]).to(self.model.device)  # (b, width)
        y = torch.from_numpy(self.targets[idx, -width:]).to(self.model.device)  # (b, width)
        return self.module(x, y), float((y != 0).sum())

    def has_validation(self) -> bool:
        return len(self.split.valid) > 0

    def validate(self) -> float:
        return self.model._validate(self.split)

    def resume_key(self) -> dict[str, Any]:
        cfg = {k: v for k, v in dataclasses.asdict(self.model.config).items() if k not in RESUME_FREE}
        return {"config": cfg, "data": split_digest(self.split)}

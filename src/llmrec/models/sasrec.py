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
import torch.nn.functional as F
from torch import nn

from llmrec.data.splits import Split, split_digest
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.base import Recommender, left_pad, length_batches
from llmrec.models.train import TrainConfig, TrainTask, batch_starts, device_for, fit_loop, num_threads


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


# --- network ------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention that also ignores padding keys."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, H) queries (and keys / values unless ``kv`` (B, L, H) is given); attn_mask: (B, 1, L, L)
        bool, True = may attend. Returns (B, L, H)."""
        B, L, H = x.shape
        if kv is None:
            q, k, v = self.qkv(x).split(H, dim=2)  # 3 x (B, L, H)
        else:
            q = F.linear(x, self.qkv.weight[:H], self.qkv.bias[:H])  # (B, L, H)
            k, v = F.linear(kv, self.qkv.weight[H:], self.qkv.bias[H:]).split(H, dim=2)  # 2 x (B, L, H)
        q = q.view(B, L, self.n_heads, H // self.n_heads).transpose(1, 2)  # (B, nh, L, hs)
        k = k.view(B, L, self.n_heads, H // self.n_heads).transpose(1, 2)  # (B, nh, L, hs)
        v = v.view(B, L, self.n_heads, H // self.n_heads).transpose(1, 2)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, nh, L, hs)
        y = y.transpose(1, 2).contiguous().view(B, L, H)  # (B, L, H)
        return self.resid_dropout(self.proj(y))  # (B, L, H)


class FeedForward(nn.Module):
    """Position-wise two-layer MLP with GELU; dropout on its output."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.hidden_size, cfg.inner_size)
        self.proj = nn.Linear(cfg.inner_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, H) -> (B, L, H)."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, L, H)


class LowPassFilter(nn.Module):
    """A causal low-pass filter with a learned high-frequency gain per channel.

    BSARec (Shin et al., AAAI 2024) adds to self-attention a filter that keeps a sequence's low
    frequencies and rescales the rest by a learned ``beta``; FMLP-Rec filters with an FFT over the
    whole sequence. An FFT lets every position see the items after it, which is a leak when, as
    here, every position is trained to predict its next item. This filter is causal instead: the
    low band at position ``t`` is the mean of the last ``window`` non-padding items up to ``t`` (a
    boxcar, the simplest low-pass FIR filter), the high band is the rest, and the output is
    ``low + beta * high``.
    """

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.window = cfg.filter_window
        self.beta = nn.Parameter(torch.ones(cfg.hidden_size))  # (H,) high-band gain
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, nonpad: torch.Tensor) -> torch.Tensor:
        """x: (B, L, H), zero at padding; nonpad: (B, L) bool. Returns (B, L, H)."""
        w = self.window
        sums = F.pad(x.cumsum(dim=1), (0, 0, 1, 0))  # (B, L+1, H): sums[:, t] = x[:, :t].sum(1)
        counts = F.pad(nonpad.to(x.dtype).cumsum(dim=1), (1, 0))  # (B, L+1)
        L = x.shape[1]
        hi = torch.arange(1, L + 1, device=x.device)  # (L,) window ends (exclusive)
        lo = (hi - w).clamp(min=0)  # (L,) window starts
        n = (counts[:, hi] - counts[:, lo]).clamp(min=1.0).unsqueeze(-1)  # (B, L, 1)
        low = (sums[:, hi] - sums[:, lo]) / n  # (B, L, H)
        return self.dropout(low + self.beta * (x - low))  # (B, L, H)


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + ffn(ln(x)); or with ``block = "sasrec"`` the
    block of SASRec's paper code (and RecTools): q = ln(x), x = q + attn(queries q, keys / values x),
    then f = ln(x), x = f + ffn(f), so every sub-layer's residual is the normalized input.

    With ``filter_mix`` = a > 0 the attention term becomes ``a * filter(h) + (1 - a) * attn(h)``, h the
    normalized input.
    """

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size)
        self.ffn = FeedForward(cfg)
        self.mix = cfg.filter_mix
        self.filter = LowPassFilter(cfg) if cfg.filter_mix > 0 else None
        self.sasrec = cfg.block == "sasrec"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, nonpad: torch.Tensor) -> torch.Tensor:
        """x: (B, L, H); attn_mask: (B, 1, L, L) bool; nonpad: (B, L) bool. Returns (B, L, H)."""
        h = self.ln_1(x)  # (B, L, H)
        kv = x if self.sasrec else None
        if self.filter is None:
            mixed = self.attn(h, attn_mask, kv)  # (B, L, H)
        else:
            h = h * nonpad.unsqueeze(-1)  # the filter averages real items only
            mixed = (1.0 - self.mix) * self.attn(h, attn_mask, kv) + self.mix * self.filter(h, nonpad)
        if self.sasrec:
            f = self.ln_2(h + mixed)  # (B, L, H)
            return f + self.ffn(f)
        x = x + mixed
        return x + self.ffn(self.ln_2(x))  # (B, L, H)


class FullSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of ``logits = h @ w.T`` against ``y``, computed in one (N, V) buffer.

    Equal to ``F.cross_entropy(h @ w.T, y, label_smoothing=eps)`` in value and gradients, but the
    logits are turned into probabilities in place and reused as their own gradient (softmax -
    target), which saves several passes over the (N, V) matrix: the output layer is most of the
    training time on CPU. h: (N, H) float; w: (V, H) float; y: (N,) int64 in ``0..V-1``; eps in
    [0, 1): the target is (1 - eps) x onehot + eps / V. Returns a scalar. Because the buffer is
    consumed, backward can run only once per forward (no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
        probs = h @ w.T  # (N, V) logits for now
        target_logit = probs.gather(1, y[:, None]).squeeze(1)  # (N,)
        mean_logit = probs.mean(dim=1) if eps > 0.0 else None  # (N,)
        row_max = probs.max(dim=1, keepdim=True).values  # (N, 1)
        probs.sub_(row_max).exp_()  # (N, V) unnormalized
        row_sum = probs.sum(dim=1, keepdim=True)  # (N, 1)
        probs.div_(row_sum)  # (N, V) softmax
        log_z = (row_sum.log() + row_max).squeeze(1)  # (N,)
        loss = log_z - target_logit  # (N,) -log p(y)
        if mean_logit is not None:  # -sum_v q_v log p_v with q = (1 - eps) onehot + eps / V
            loss = (1.0 - eps) * loss + eps * (log_z - mean_logit)
        ctx.save_for_backward(h, w, y, probs)
        ctx.eps = eps
        return loss.mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        h, w, y, probs = ctx.saved_tensors
        grad_logits = probs  # (N, V), reused in place: d loss / d logits = (softmax - target) / N
        grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0 - ctx.eps
        if ctx.eps > 0.0:
            grad_logits.sub_(ctx.eps / probs.shape[1])
        grad_logits.mul_(grad / len(y))
        return grad_logits @ w, grad_logits.T @ h, None, None  # (N, H), (V, H)


def sampled_softmax_ce(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                       negatives: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each target against its sequence's sampled negatives.

    h: (B, L, H) hidden states; table: (n_items + 1, H) item rows (row 0 = padding); targets: (B, L)
    shifted ids, 0 = no target; negatives: (B, K) shifted ids in 1..n_items, shared by a row's
    positions. A negative equal to the position's target (an accidental hit) is left out of that
    position's softmax. Returns a scalar: mean over target positions of -log softmax([pos, negs])[0].
    """
    keep = targets != 0  # (B, L)
    pos = (h * table[targets]).sum(-1)  # (B, L)
    neg = torch.einsum("blh,bkh->blk", h, table[negatives])  # (B, L, K)
    neg = neg.masked_fill(negatives[:, None, :] == targets[:, :, None], float("-inf"))
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)[keep]  # (N, 1 + K)
    return (torch.logsumexp(logits, dim=-1) - logits[:, 0]).mean()


class SASRecNet(nn.Module):
    """The Transformer. Tokens are shifted item ids: 0 = padding, 1..n_items = items 0..n_items-1."""

    def __init__(self, cfg: SASRecConfig, n_items: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden_size, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden_size)  # index max_len-1 = newest item
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size)
        self.out_width = cfg.hidden_size  # width of item rows and final states (subclasses may widen it)
        self.apply(self._init_weights)
        if cfg.init == "xavier":  # every weight matrix (embeddings included) ~ Xavier normal; padding row stays 0
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def item_table(self) -> torch.Tensor:
        """(n_items + 1, H) item rows, row 0 = padding: the input embeddings and the output layer.
        Subclasses that build item rows from more than an id embedding override this."""
        return self.item_emb.weight

    def hidden(self, tokens: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, L) int64 left-padded, L <= max_len. Returns (B, L, H) final hidden states.

        Columns are aligned to the right end of the ``max_len`` window, so a batch trimmed to its
        longest row gives the same result as the full ``max_len`` padding. ``table`` is
        :meth:`item_table` (passed in when the caller already computed it).
        """
        L = tokens.shape[1]
        cfg = self.cfg
        table = self.item_table() if table is None else table  # (n_items + 1, H)
        pos = torch.arange(cfg.max_len - L, cfg.max_len, device=tokens.device)  # (L,)
        scale = math.sqrt(cfg.hidden_size) if cfg.emb_scale else 1.0
        x = F.embedding(tokens, table, padding_idx=0) * scale + self.pos_emb(pos)  # (B, L, H)
        nonpad = tokens != 0  # (B, L)
        x = self.drop(x) * nonpad.unsqueeze(-1)  # (B, L, H)
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()  # (L, L)
        eye = torch.eye(L, dtype=torch.bool, device=tokens.device)  # (L, L)
        # a query sees earlier non-pad keys and always itself (so all-pad rows never become NaN)
        attn_mask = (causal & (nonpad[:, None, :] | eye)).unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, attn_mask, nonpad) * nonpad.unsqueeze(-1)  # (B, L, H)
        return self.ln_f(x)  # (B, L, H)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) shifted ids; targets: (B, L) shifted next-item ids, 0 = no target.

        Returns the mean cross-entropy over the positions that have a target: full softmax (the
        (N, n_items) logits are only a scratch buffer inside :class:`FullSoftmaxCE`) or sampled
        (:func:`sampled_softmax_ce`, ``n_negatives`` uniform draws per row). Scores for
        ranking come from :meth:`SASRec.score` (last hidden state @ item rows).
        """
        table = self.item_table()  # (n_items + 1, H)
        h = self.hidden(tokens, table)  # (B, L, H)
        if self.cfg.loss == "sampled_softmax":  # negatives from torch's generator (seeded by the loop)
            n_items = table.shape[0] - 1
            negatives = torch.randint(1, n_items + 1, (tokens.shape[0], self.cfg.n_negatives), device=tokens.device)
            return sampled_softmax_ce(h, table, targets, negatives)
        keep = targets != 0  # (B, L)
        eps = self.cfg.label_smoothing if self.training else 0.0
        return FullSoftmaxCE.apply(h[keep], table[1:], targets[keep] - 1, eps)  # h[keep]: (N, H)


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

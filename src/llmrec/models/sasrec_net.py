"""SASRec's network: attention, feed-forward, the causal low-pass filter, the block layouts, the two
softmax losses and the Transformer that ties them (:class:`SASRecNet`). The recommender around it
(training task, scoring, saving) is :mod:`llmrec.models.sasrec`, which re-exports these names.

Tokens are shifted item ids: ``0`` is padding, ``1..n_items`` are dataset items ``0..n_items-1``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from llmrec.models.sasrec import SASRecConfig


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

    def _init_weights(self, module: nn.Module) -> None:
        """One pass per module: weight matrices ~ N(0, 0.02) (GPT-2) or, with ``init = "xavier"``, Xavier
        normal (RecTools); biases 0; an embedding's padding row 0."""
        if not isinstance(module, nn.Linear | nn.Embedding):
            return
        if self.cfg.init == "xavier":
            nn.init.xavier_normal_(module.weight)
        else:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
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

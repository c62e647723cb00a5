"""A small T5-style encoder-decoder over semantic-ID codes, and trie-constrained beam search.

Encoder: each history item is one token whose embedding is the sum of its code embeddings (one
table per level), optionally a learned per-item embedding, plus a position embedding; pre-LN self-attention blocks. The encoder is causal,
so one pass over a training sequence yields the user state after every prefix and all next-item
targets of the sequence train at once (a bidirectional encoder would need one pass per prefix).

Decoder: reads ``[BOS, c_1, ..., c_{L-1}]`` and predicts ``c_1..c_L`` (one output head slice per
level). Every decoder layer has causal self-attention, cross-attention to the encoder states the
target may see (the prefix before it), optionally cross-attention to the user's interest phrase
embeddings (plus a learned "no interest" slot), and a feed-forward layer. Interest fusion
therefore changes the decoder's scores at inference, not only a training loss.

Shapes: B users, T history positions, G decoder sequences per user (target positions in
training, beams or catalogue items at inference), l decoder length (<= L levels), P interest
phrases, E phrase-embedding width, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NetConfig:
    vocab_sizes: tuple[int, ...]  # codes per level (L levels, collision level included)
    d_model: int = 128
    n_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    ff_size: int = 512
    dropout: float = 0.1
    max_len: int = 20
    interest_dim: int = 0  # E; 0 disables interest fusion
    n_items: int = 0  # > 0 adds a learned per-item embedding to each history token (0: codes only)
    state_dim: int = 0  # > 0: each history token also adds a linear map of a pretrained encoder's state there


class Attention(nn.Module):
    """Multi-head attention; q from x, k/v from ``kv`` (self-attention when ``kv is x``)."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.h = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout
        self.resid = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (N, Lq, d); kv: (N, Lk, d); mask: bool broadcastable to (N, 1, Lq, Lk), True = attend."""
        N, Lq, d = x.shape
        Lk = kv.shape[1]
        hs = d // self.h
        q = self.q(x).view(N, Lq, self.h, hs).transpose(1, 2)  # (N, h, Lq, hs)
        k, v = self.kv(kv).split(d, dim=2)  # 2 x (N, Lk, d)
        k = k.view(N, Lk, self.h, hs).transpose(1, 2)  # (N, h, Lk, hs)
        v = v.view(N, Lk, self.h, hs).transpose(1, 2)  # (N, h, Lk, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (N, h, Lq, hs)
        return self.resid(self.proj(y.transpose(1, 2).reshape(N, Lq, d)))  # (N, Lq, d)


class FeedForward(nn.Module):
    def __init__(self, d: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.ff_size, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d); mask: (B, 1, T, T)."""
        h = self.ln1(x)
        x = x + self.attn(h, h, mask)
        return x + self.ff(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln1, self.ln2, self.ln4 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.cross_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(d, cfg.ff_size, cfg.dropout)
        self.use_interests = cfg.interest_dim > 0
        if self.use_interests:
            self.ln3 = nn.LayerNorm(d)
            self.interest_attn = Attention(d, cfg.n_heads, cfg.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mem_mask: torch.Tensor,
                interests: torch.Tensor | None, int_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, G, l, d); memory: (B, T, d); mem_mask: (B, G, T);
        interests: (B, G or 1, P+1, d); int_mask: (B, G or 1, P+1). Returns (B, G, l, d)."""
        B, G, l, d = x.shape
        causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()  # (l, l)
        h = self.ln1(x).reshape(B * G, l, d)
        x = x + self.self_attn(h, h, causal).view(B, G, l, d)
        # cross-attention to the history: all G*l queries of a user share that user's memory
        h = self.ln2(x).reshape(B, G * l, d)
        m = mem_mask[:, :, None, :].expand(B, G, l, mem_mask.shape[-1]).reshape(B, 1, G * l, -1)  # (B, 1, G*l, T)
        x = x + self.cross_attn(h, memory, m).view(B, G, l, d)
        if self.use_interests and interests is not None:
            h = self.ln3(x).reshape(B * G, l, d)
            kv = interests.expand(B, G, *interests.shape[2:]).reshape(B * G, -1, d)  # (B*G, P+1, d)
            im = int_mask.expand(B, G, int_mask.shape[-1]).reshape(B * G, 1, 1, -1)  # (B*G, 1, 1, P+1)
            x = x + self.interest_attn(h, kv, im).view(B, G, l, d)
        return x + self.ff(self.ln4(x))


class SemIDSeq2Seq(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        V = list(cfg.vocab_sizes)
        self.n_levels = len(V)
        self.v_max = max(V)
        offsets = np.concatenate([[0], np.cumsum(V)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.from_numpy(offsets), persistent=False)  # (L,)
        idx = np.zeros((len(V), self.v_max), dtype=np.int64)
        valid = np.zeros((len(V), self.v_max), dtype=bool)
        for lv, v in enumerate(V):
            idx[lv, :v] = offsets[lv] + np.arange(v)
            valid[lv, :v] = True
        self.register_buffer("head_index", torch.from_numpy(idx), persistent=False)  # (L, Vmax)
        self.register_buffer("head_valid", torch.from_numpy(valid), persistent=False)  # (L, Vmax)
        self.enc_code_emb = nn.Embedding(int(sum(V)), d)
        self.enc_pos = nn.Embedding(cfg.max_len, d)
        self.enc_item_emb = nn.Embedding(cfg.n_items, d) if cfg.n_items > 0 else None
        self.enc_state = nn.Linear(cfg.state_dim, d) if cfg.state_dim > 0 else None
        self.dec_emb = nn.Embedding(1 + int(sum(V)), d)  # 0 = BOS
        self.dec_pos = nn.Embedding(len(V), d)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.enc_layers)])
        self.enc_ln = nn.LayerNorm(d)
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.dec_layers)])
        self.dec_ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, int(sum(V)))
        if cfg.interest_dim > 0:
            self.int_proj = nn.Sequential(nn.Linear(cfg.interest_dim, d), nn.LayerNorm(d))
            self.int_null = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- encoder ---------------------------------------------------------------------------
    def encode(self, hist: torch.Tensor, pad: torch.Tensor, items: torch.Tensor | None = None,
               states: torch.Tensor | None = None) -> torch.Tensor:
        """hist: (B, T, L) codes of history items, left-padded; pad: (B, T) True at padding;
        items: (B, T) their item ids (read only when the net has item embeddings); states:
        (B, T, state_dim) a pretrained encoder's state of the history up to each item (read only
        when ``state_dim > 0``). Returns (B, T, d) causal states (state t summarises items <= t)."""
        _B, T, _L = hist.shape
        tok = self.enc_code_emb(hist.clamp(min=0) + self.offsets).sum(2)  # (B, T, d)
        if self.enc_item_emb is not None:
            if items is None:
                raise ValueError("this network has item embeddings: encode() needs the item ids")
            tok = tok + self.enc_item_emb(items.clamp(min=0))
        if self.enc_state is not None:
            if states is None or tuple(states.shape[:2]) != tuple(hist.shape[:2]):
                raise ValueError("this network reads pretrained states: encode() needs states (B, T, state_dim)")
            tok = tok + self.enc_state(states)
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=hist.device)  # (T,)
        x = self.drop(tok + self.enc_pos(pos)) * (~pad).unsqueeze(-1)  # (B, T, d)
        causal = torch.ones(T, T, dtype=torch.bool, device=hist.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=hist.device)
        mask = (causal & (~pad[:, None, :] | eye)).unsqueeze(1)  # (B, 1, T, T)
        for blk in self.encoder:
            x = blk(x, mask) * (~pad).unsqueeze(-1)
        return self.enc_ln(x)  # (B, T, d)

    def embed_interests(self, vecs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vecs: (B, G, P, E); mask: (B, G, P) -> ((B, G, P+1, d), (B, G, P+1)) with the null slot first."""
        B, G = vecs.shape[:2]
        x = self.int_proj(vecs)  # (B, G, P, d)
        null = self.int_null.expand(B, G, 1, x.shape[-1])
        ones = torch.ones(B, G, 1, dtype=torch.bool, device=vecs.device)
        return torch.cat([null, x], 2), torch.cat([ones, mask], 2)

    # --- decoder ---------------------------------------------------------------------------
    def decode(self, dec_codes: torch.Tensor, memory: torch.Tensor, mem_mask: torch.Tensor,
               interests: tuple[torch.Tensor, torch.Tensor] | None, last_only: bool = False) -> torch.Tensor:
        """dec_codes: (B, G, l-1) codes of levels 0..l-2 (the BOS is added in front);
        memory: (B, T, d); mem_mask: (B, G, T). Returns log-probs (B, G, l, Vmax) over level j's
        codes at position j (-inf past the level's vocabulary); with ``last_only`` just the last
        position, (B, G, 1, Vmax)."""
        B, G, lm1 = dec_codes.shape
        l = lm1 + 1
        tok = torch.cat([torch.zeros(B, G, 1, dtype=torch.long, device=dec_codes.device),
                         1 + dec_codes + self.offsets[:lm1]], 2)  # (B, G, l)
        x = self.drop(self.dec_emb(tok) + self.dec_pos.weight[:l])  # (B, G, l, d)
        iv, im = interests if interests is not None else (None, None)
        for blk in self.decoder:
            x = blk(x, memory, mem_mask, iv, im)
        first = l - 1 if last_only else 0
        out = self.head(self.dec_ln(x[:, :, first:]))  # (B, G, l', sumV)
        idx = self.head_index[first:l].expand(B, G, l - first, self.v_max)
        logits = out.gather(-1, idx).masked_fill(~self.head_valid[first:l], float("-inf"))  # (B, G, l', Vmax)
        return F.log_softmax(logits, dim=-1)

    def forward(self, hist: torch.Tensor, pad: torch.Tensor, targets: torch.Tensor, has_target: torch.Tensor,
                interests: tuple[torch.Tensor, torch.Tensor] | None = None,
                items: torch.Tensor | None = None, states: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced training step.

        hist: (B, T, L) input items' codes; pad: (B, T); targets: (B, T, L) codes of the item after
        position t; has_target: (B, T) bool; interests: raw ((B, T, P, E), (B, T, P)) or None;
        items, states: see :meth:`encode`.
        Returns (log-probs (B, T, L, Vmax), mean cross-entropy per item over valid targets).
        """
        _B, T, _L = hist.shape
        memory = self.encode(hist, pad, items, states)  # (B, T, d)
        mem_mask = torch.ones(T, T, dtype=torch.bool, device=hist.device).tril()[None] & ~pad[:, None, :]  # (B, T, T)
        mem_mask = mem_mask | torch.eye(T, dtype=torch.bool, device=hist.device)[None]
        fused = self.embed_interests(*interests) if (interests is not None and self.cfg.interest_dim > 0) else None
        logp = self.decode(targets[:, :, :-1].clamp(min=0), memory, mem_mask, fused)  # (B, T, L, Vmax)
        nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(-1)  # (B, T)
        loss = nll[has_target].mean()
        return logp, loss


class CodeTrie:
    """Prefix structure of the catalogue's code tuples, as tensors for batched constrained search.

    codes: (N, L) unique tuples. ``prefix_id[l]`` (N,): id of item i's length-l prefix among
    all length-l prefixes (``n_prefix[l]`` of them); ``child[l]`` (n_prefix[l], V_l): id of the
    length-(l+1) prefix extending a length-l prefix by a code, -1 if no item has it.
    """

    def __init__(self, codes: np.ndarray, vocab_sizes: tuple[int, ...]) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        N, L = codes.shape
        if len(np.unique(codes, axis=0)) != N:
            raise ValueError("CodeTrie: code tuples must be unique")
        self.codes = torch.from_numpy(codes)
        self.L = L
        ids = [np.zeros(N, dtype=np.int64)]
        for lv in range(1, L + 1):
            _, inv = np.unique(codes[:, :lv], axis=0, return_inverse=True)
            ids.append(inv.reshape(-1).astype(np.int64))
        self.prefix_id = [torch.from_numpy(p) for p in ids]
        self.n_prefix = [int(p.max()) + 1 for p in ids]
        self.child = []
        for lv in range(L):
            table = torch.full((self.n_prefix[lv], vocab_sizes[lv]), -1, dtype=torch.long)
            table[self.prefix_id[lv], self.codes[:, lv]] = self.prefix_id[lv + 1]
            self.child.append(table)
        leaf = torch.full((self.n_prefix[L],), -1, dtype=torch.long)
        leaf[self.prefix_id[L]] = torch.arange(N)
        self.leaf_item = leaf  # (N,) leaf prefix id -> item id

    def to(self, device: torch.device) -> CodeTrie:
        self.codes = self.codes.to(device)
        self.prefix_id = [p.to(device) for p in self.prefix_id]
        self.child = [c.to(device) for c in self.child]
        self.leaf_item = self.leaf_item.to(device)
        return self


def group_logsumexp(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """values: (B, N) (-inf allowed); group: (N,) ids in [0, n_groups). Returns (B, n_groups):
    log-sum-exp of each group's values (-inf for a group with no finite value)."""
    B = values.shape[0]
    idx = group[None, :].expand(B, -1)
    top = torch.full((B, n_groups), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(1, idx, values, reduce="amax", include_self=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros_like(top).scatter_add_(1, idx, torch.exp(values - top.gather(1, idx)))
    return torch.log(total) + top


@torch.no_grad()
def beam_search(net: SemIDSeq2Seq, trie: CodeTrie, memory: torch.Tensor, mem_mask: torch.Tensor,
                interests: tuple[torch.Tensor, torch.Tensor] | None, allowed: torch.Tensor,
                beam: int, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Constrained beam search: every finished beam is a real, allowed item.

    memory: (B, T, d); mem_mask: (B, T); interests: fused ((B, 1, P+1, d), (B, 1, P+1)) or None;
    allowed: (B, N) bool (False for excluded items, e.g. the history). A prefix survives only if
    some allowed item extends it. ``prior``: optional (B, N) item log-weights (e.g. ``w`` times
    another model's logits); a finished item's score then gains ``prior_i - logsumexp(prior over
    allowed items)``, spread over the levels as the prior's conditional log-probability of each
    code given the prefix (its marginals over the items under each prefix), so partial beams are
    ranked by the product of both models too. Returns (items (B, beam) int64, -1 where fewer exist;
    scores (B, beam) float, -inf there), best first.
    """
    B = memory.shape[0]
    dev = memory.device
    marg: list[torch.Tensor] = []  # marg[l]: (B, n_prefix[l]) log prior mass under each length-l prefix
    if prior is not None:
        masked = prior.float().masked_fill(~allowed, float("-inf"))  # (B, N)
        marg = [group_logsumexp(masked, trie.prefix_id[lv], trie.n_prefix[lv]) for lv in range(trie.L + 1)]
    prefix = torch.zeros(B, 1, dtype=torch.long, device=dev)  # (B, W) prefix ids at level 0
    scores = torch.zeros(B, 1, device=dev)  # (B, W)
    codes = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)  # (B, W, l)
    alive = torch.ones(B, 1, dtype=torch.bool, device=dev)
    for lv in range(trie.L):
        W = prefix.shape[1]
        logp = net.decode(codes, memory, mem_mask[:, None, :].expand(B, W, -1), interests, last_only=True)[:, :, 0]
        V = logp.shape[-1]
        # valid[b, w, c]: an allowed item has prefix beam w followed by code c
        n_pre = trie.n_prefix[lv]
        slot_of = torch.full((B, n_pre + 1), -1, dtype=torch.long, device=dev)  # last column: dead beams
        slot_of.scatter_(1, torch.where(alive, prefix, n_pre), torch.arange(W, device=dev).expand(B, W).contiguous())
        slot_items = slot_of[:, :n_pre][:, trie.prefix_id[lv]]  # (B, N) beam slot of each item's prefix
        b_idx, i_idx = torch.nonzero(allowed & (slot_items >= 0), as_tuple=True)
        valid = torch.zeros(B, W, V, dtype=torch.bool, device=dev)
        valid[b_idx, slot_items[b_idx, i_idx], trie.codes[i_idx, lv]] = True
        step = scores[:, :, None] + logp  # (B, W, V)
        if marg:  # + log prior(code | prefix) = marginal of the child prefix - marginal of the prefix
            child = F.pad(trie.child[lv][prefix].clamp(min=0), (0, V - trie.child[lv].shape[1]))  # (B, W, V)
            step = step + marg[lv + 1].gather(1, child.view(B, W * V)).view(B, W, V) \
                - marg[lv].gather(1, prefix)[:, :, None]
        cand = step.masked_fill(~valid, float("-inf")).view(B, W * V)
        k = min(beam, W * V)
        top, idx = cand.topk(k, dim=1)  # (B, k)
        parent, code = idx // V, idx % V
        alive = torch.isfinite(top)
        new_prefix = trie.child[lv][prefix.gather(1, parent), torch.where(alive, code, 0)]  # (B, k)
        prefix = torch.where(alive, new_prefix, 0)
        codes = torch.cat([codes.gather(1, parent[:, :, None].expand(-1, -1, codes.shape[2])), code[:, :, None]], 2)
        scores = top
    items = torch.where(alive, trie.leaf_item[prefix], -1)
    return items, scores

"""Decoding item lists from an item-token LM: constrained beam search, unconstrained greedy.

Both decoders take a network with the small interface of
:class:`llmrec.models.itemtoken.net.ItemTokenNet`:

- ``net.hidden(ids (B, L), past_key_values=None, use_cache=False, attention_mask=None,
  position_ids=None) -> (hidden (B, L, H), cache)``
- ``net.item_logits(h (..., H)) -> (..., R)`` over the item rows (row ``r`` is token ``n_base + r``)
- ``net.full_logits(h (..., H)) -> (..., n_base + R)`` over the whole vocabulary
- ``net.n_base``: vocabulary size of the backbone.

Every item is a single token here, so the :class:`ItemTrie` of valid item spellings is one level
deep and "constrained beam search over the next-K items" means: generate K item tokens, each step
masked to valid catalog items that are neither in the user's history (unless allowed) nor already
in the same beam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmrec.data.splits import PAD_ITEM


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    item: int | None = None


class ItemTrie:
    """Prefix tree over the token sequences that spell catalog items.

    ``spellings[i]`` is the token-id sequence of item ``i``. ``next_tokens(prefix)`` lists the
    tokens that continue ``prefix`` towards some item; ``item_of(tokens)`` is the item spelled
    exactly by ``tokens`` (or None).
    """

    def __init__(self, spellings: Sequence[Sequence[int]]) -> None:
        self.root = _Node()
        self.depth = 0
        for i, seq in enumerate(spellings):
            if not len(seq):
                raise ValueError(f"item {i} has an empty spelling")
            node = self.root
            for t in seq:
                node = node.children.setdefault(int(t), _Node())
            if node.item is not None:
                raise ValueError(f"items {node.item} and {i} share the spelling {list(seq)}")
            node.item = i
            self.depth = max(self.depth, len(seq))

    def _walk(self, prefix: Sequence[int]) -> _Node | None:
        node: _Node | None = self.root
        for t in prefix:
            node = node.children.get(int(t)) if node is not None else None
        return node

    def next_tokens(self, prefix: Sequence[int] = ()) -> list[int]:
        node = self._walk(prefix)
        return sorted(node.children) if node is not None else []

    def item_of(self, tokens: Sequence[int]) -> int | None:
        node = self._walk(tokens)
        return node.item if node is not None else None

    def __len__(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            count += node.item is not None
            stack.extend(node.children.values())
        return count


def single_token_trie(n_items: int, n_base: int) -> ItemTrie:
    """The trie of an item-token LM: item ``i`` is spelled by the one token ``n_base + i``."""
    return ItemTrie([[n_base + i] for i in range(n_items)])


def _allowed_rows(trie: ItemTrie, n_base: int, n_rows: int, banned: np.ndarray) -> torch.Tensor:
    """(n_rows,) bool: item rows the trie allows as a whole item, minus ``banned`` item ids."""
    if trie.depth != 1:
        raise NotImplementedError("decoding here spells each item with one token (trie depth 1)")
    allowed = torch.zeros(n_rows, dtype=torch.bool)
    rows = torch.tensor([t - n_base for t in trie.next_tokens()], dtype=torch.long)
    rows = rows[(rows >= 0) & (rows < n_rows)]
    allowed[rows] = True
    banned = np.asarray(banned, dtype=np.int64)
    banned = banned[(banned >= 0) & (banned < n_rows)]
    allowed[torch.from_numpy(banned)] = False
    return allowed


def constrained_beam_search(
    net: Any, prompt_ids: np.ndarray, trie: ItemTrie, k: int = 10, beam_size: int = 4, banned: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One user's :func:`constrained_beam_search_batch`: ``(items (k,), step log-probs (k,))``."""
    items, lps = constrained_beam_search_batch(net, [prompt_ids], trie, k, beam_size,
                                               None if banned is None else [banned])
    return items[0], lps[0]


@torch.inference_mode()
def constrained_beam_search_batch(
    net: Any, prompts: Sequence[np.ndarray], trie: ItemTrie, k: int = 10, beam_size: int = 4,
    banned: Sequence[np.ndarray] | None = None,
    step_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``k`` distinct valid items after each prompt (n prompts of token ids) by beam search.

    Prompts are left-padded into one batch (attention mask and position ids keep them exact).
    Each step scores the item rows (a softmax over the items the trie allows), masks the user's
    ``banned`` items and the items already in the beam, and keeps each user's ``beam_size`` best
    partial lists by summed log-probability. Returns ``(items (n, k), step log-probs (n, k))`` of
    each user's best beam; where fewer than ``k`` items are allowed the rest is ``PAD_ITEM`` / ``-inf``.
    ``step_bias(rows so far (n, B, t)) -> (n, B, R)`` adds another scorer's logits at each step.
    """
    n, B = len(prompts), beam_size
    n_rows = int(net.n_rows)
    items = np.full((n, k), PAD_ITEM, dtype=np.int64)
    step_lp = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0:
        return items, step_lp
    none = np.empty(0, np.int64)
    allowed = torch.stack([_allowed_rows(trie, net.n_base, n_rows, none if banned is None else banned[u])
                           for u in range(n)])  # (n, R)
    k_user = torch.clamp(allowed.sum(1), max=k)  # (n,)
    steps = int(k_user.max())
    if steps == 0:
        return items, step_lp
    width = max(len(p) for p in prompts)
    ids = torch.zeros((n, width), dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for u, p in enumerate(prompts):  # left padding: the last position is every prompt's last token
        ids[u, width - len(p):] = torch.as_tensor(np.asarray(p, dtype=np.int64))
        attn[u, width - len(p):] = 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # (n, width)
    h, cache = net.hidden(ids, use_cache=True, attention_mask=attn, position_ids=pos)  # (n, width, H)
    cache.batch_repeat_interleave(B)
    attn = attn.repeat_interleave(B, dim=0)  # (n*B, width)
    next_pos = pos[:, -1:].repeat_interleave(B, dim=0) + 1  # (n*B, 1)
    last = h[:, -1].repeat_interleave(B, dim=0)  # (n*B, H)
    beam_scores = torch.full((n, B), -torch.inf)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand from the first only
    seqs = torch.empty((n, B, 0), dtype=torch.long)  # item rows so far
    lps = torch.empty((n, B, 0))
    user = torch.arange(n)[:, None]  # (n, 1)
    for step in range(steps):
        logits = net.item_logits(last).float().view(n, B, n_rows)  # (n, B, R)
        if step_bias is not None:
            logits = logits + step_bias(seqs)
        mask = allowed[:, None, :].expand(n, B, n_rows).clone()  # (n, B, R)
        if step:
            mask.scatter_(2, seqs, False)  # no repeats inside a beam
        logp = torch.log_softmax(logits.masked_fill(~mask, -torch.inf), dim=-1)  # (n, B, R)
        cand = (beam_scores[:, :, None] + logp).view(n, B * n_rows)  # (n, B*R)
        top = torch.topk(cand, B, dim=1)  # (n, B)
        beam_idx = torch.div(top.indices, n_rows, rounding_mode="floor")  # (n, B)
        rows = top.indices % n_rows  # (n, B)
        finite = torch.isfinite(top.values)  # (n, B)
        best = top.values.argmax(1, keepdim=True)  # (n, 1): fewer live candidates than beams -> copy the best
        beam_idx = torch.where(finite, beam_idx, beam_idx.gather(1, best))
        rows = torch.where(finite, rows, rows.gather(1, best))
        step_logp = logp[user, beam_idx, rows]  # (n, B)
        beam_scores = torch.where(finite, top.values, -torch.inf)
        seqs = torch.cat([seqs[user, beam_idx], rows[:, :, None]], dim=2)  # (n, B, t+1)
        lps = torch.cat([lps[user, beam_idx], step_logp[:, :, None]], dim=2)
        for u in torch.nonzero(k_user == step + 1).flatten().tolist():  # this user's list is complete
            w = int(beam_scores[u].argmax())
            items[u, : step + 1] = seqs[u, w].numpy()
            step_lp[u, : step + 1] = lps[u, w].numpy()
        if step + 1 == steps:
            break
        flat = (user * B + beam_idx).view(-1)  # (n*B,) rows of the cache to keep
        cache.reorder_cache(flat)
        attn = torch.cat([attn[flat], torch.ones((n * B, 1), dtype=attn.dtype)], dim=1)
        next_pos = next_pos[flat]
        h, cache = net.hidden((net.n_base + rows).view(-1, 1), past_key_values=cache, use_cache=True,
                              attention_mask=attn, position_ids=next_pos)  # (n*B, 1, H)
        next_pos = next_pos + 1
        last = h[:, -1]
    return items, step_lp


@torch.inference_mode()
def greedy_generate(net: Any, prompt_ids: np.ndarray, n_items: int, k: int = 10) -> np.ndarray:
    """Unconstrained greedy decoding of ``k`` tokens over the whole vocabulary.

    Returns (k,) int64: item ``i`` for an item token; ``n_items + token`` (an invalid id) for any
    other token; after the end row (``n_items``) the list stops (``PAD_ITEM``). Items may repeat and
    may come from the history: this is the behaviour constrained decoding fixes.
    """
    out = np.full(k, PAD_ITEM, dtype=np.int64)
    ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64))[None]  # (1, L)
    h, cache = net.hidden(ids, use_cache=True)
    for step in range(k):
        token = int(torch.argmax(net.full_logits(h[0, -1])))
        row = token - net.n_base
        if row == n_items:  # the end-of-list row
            break
        out[step] = row if 0 <= row < n_items else n_items + token
        if step + 1 < k:
            h, cache = net.hidden(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return out

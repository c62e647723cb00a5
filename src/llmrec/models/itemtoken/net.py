"""The item-token network: a causal LM whose vocabulary is extended by item (and user, state) rows
kept in separate small matrices, and the helpers that build it."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
        kw = _cache_kw(self._decoder)
        out = self._decoder(inputs_embeds=self.embed(ids), **{kw: past_key_values}, use_cache=use_cache,
                            attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state, getattr(out, kw) if use_cache else None

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


@functools.cache
def _cache_kw_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _cache_kw(decoder: nn.Module) -> str:
    """The name under which ``decoder.forward`` takes the key/value cache: ``cache`` (transformers >= 5.2x,
    where ``past_key_values`` is deprecated and warns on every call) or ``past_key_values``."""
    return _cache_kw_of(type(decoder))

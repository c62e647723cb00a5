"""How the graph bias reaches attention: a custom attention function registered with transformers'
``AttentionInterface`` and the item-token network that feeds it.

Every forward pass of :class:`GraphNet` computes the batch's bias channels (B, K, L, L) once
(:func:`~llmrec.models.graph_lm.graph.bias_channels`) and passes the backbone a 4D additive mask
(B, 1, L, L): the causal mask plus, for ``graph_bias = "fixed"``, ``alpha x sum_k w_k x channel_k``.
For ``"learned"`` the channels travel to :func:`graph_attention` as a keyword argument (transformers
forwards a decoder's extra keyword arguments to each layer's attention function) and each layer l adds
``sum_k scale[l, h, k] x channel_k`` to the mask of head h. Either way the inner attention is the
backbone's own (sdpa or eager), so the causal mask and right padding behave as without the bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from llmrec.models.graph_lm.graph import GraphTables, TorchTables, bias_channels, node_ids
from llmrec.models.itemtoken.net import ItemTokenNet

ATTENTION = "llmrec_graph"  # the name under which graph_attention is registered


def graph_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, graph_bias: torch.Tensor | None = None,
                    graph_scale: torch.Tensor | None = None, graph_inner: str = "sdpa",
                    **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The backbone's attention (``graph_inner``: sdpa or eager) with, when ``graph_bias`` (B, K, L, L) is
    given, ``einsum(graph_bias, graph_scale[layer])`` (B, H, L, L) added to the additive mask (B, 1, L, L);
    ``graph_scale`` is (n_layers, H, K). query (B, H, Lq, d): the last Lq rows of the bias are used."""
    if graph_bias is not None and graph_scale is not None:
        scale = graph_scale[module.layer_idx].to(graph_bias.dtype)  # (H, K)
        extra = torch.einsum("bkpq,hk->bhpq", graph_bias, scale)[..., -query.shape[2]:, :]  # (B, H, Lq, L)
        attention_mask = extra if attention_mask is None else attention_mask + extra
    if attention_mask is not None:
        attention_mask = attention_mask.to(query.dtype)
    inner = eager_attention_forward if graph_inner == "eager" else sdpa_attention_forward
    return inner(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, graph_attention)


def causal_mask(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, 1, L, L) float32 additive causal mask: 0 where key q <= query p, the lowest float elsewhere."""
    m = torch.full((length, length), torch.finfo(torch.float32).min, device=device).triu(1)
    return m[None, None].expand(batch, 1, length, length)


class GraphNet(ItemTokenNet):
    """The item-token network (item rows, user rows, LoRA backbone) whose forward passes carry the graph bias.

    Until :meth:`attach_graph` (or with mode ``"none"``) it is exactly :class:`ItemTokenNet`. Learned scales
    ``graph_scale`` (n_layers, H, K) are a parameter saved with the item rows; fixed ones are a constant."""

    mode: str = "none"

    def attach_graph(self, tables: GraphTables, channels: Sequence[str], mode: str, weights: Sequence[float],
                     alpha: float, inner: str) -> None:
        """Use ``tables`` for the bias of every forward pass (``mode`` fixed | learned | none)."""
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        n_layers, n_heads = int(base.config.num_hidden_layers), int(base.config.num_attention_heads)
        device = self.item_bias.device
        self.mode, self.channels, self.inner = mode, list(channels), inner
        self.tables = TorchTables(tables, device)
        init = alpha * torch.tensor([float(w) for w in weights], device=device)  # (K,)
        if mode == "learned":
            self.graph_scale = nn.Parameter(init.expand(n_layers, n_heads, len(init)).clone())
        self.fixed_weights = init  # (K,)
        if mode != "none":
            base.config._attn_implementation = ATTENTION
            self.base_attention = inner

    def node_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L) graph nodes (see :func:`~llmrec.models.graph_lm.graph.node_ids`)."""
        first_user = self.n_base + self.n_rows
        end_user = self.state_id if self.user_rows is not None else first_user
        return node_ids(ids, self.n_base, self.n_rows - 1, first_user, end_user)

    def bias(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, K, L, L) bias channels of the batch."""
        return bias_channels(self.node_ids(ids), self.tables, self.channels)

    def hidden(
        self, ids: torch.Tensor, past_key_values: Any = None, use_cache: bool = False,
        attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Final hidden states (B, L, H) of right-padded (or unpadded) ``ids`` (B, L), with the graph bias."""
        if self.mode == "none":
            return super().hidden(ids, past_key_values, use_cache, attention_mask, position_ids)
        if past_key_values is not None or use_cache or attention_mask is not None:
            raise NotImplementedError("graph-lm: the graph bias is computed for whole right-padded prompts; "
                                      "cached or left-padded decoding is not supported (use the fast path)")
        B, L = ids.shape
        channels = self.bias(ids)  # (B, K, L, L)
        mask = causal_mask(B, L, ids.device)  # (B, 1, L, L)
        kwargs: dict[str, Any] = {"graph_inner": self.inner}
        if self.mode == "fixed":
            mask = mask + torch.einsum("bkpq,k->bpq", channels, self.fixed_weights)[:, None]
        else:
            kwargs.update(graph_bias=channels, graph_scale=self.graph_scale)
        out = self._decoder(inputs_embeds=self.embed(ids), attention_mask=mask, use_cache=False, **kwargs)
        return out.last_hidden_state, None

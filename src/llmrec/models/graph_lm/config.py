"""Hyper-parameters of the graph-aware LM (:class:`GraphLMConfig`): the item-token LM's keys plus the graph's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmrec.models.itemtoken.config import ItemTokenLMConfig

CHANNELS: tuple[str, ...] = ("self", "ui", "ii", "brand", "category")
PRETRAIN_KINDS: tuple[str, ...] = ("collaborative", "content", "second-order")


@dataclass
class GraphLMConfig(ItemTokenLMConfig):
    """Hyper-parameters of :class:`~llmrec.models.graph_lm.model.GraphLM` (every item-token LM key, with a
    user token opening and closing each prompt by default, plus the graph's keys below)."""

    user_tokens: bool = True  # a token per training user: the user node of the graph
    # a user token also closes the prompt, so that the answer position is the user node: "shared" (the one
    # unknown-user row for everybody: a node marker that cannot memorize a user's last item), "own" (the
    # user's row, which memorizes on small data), "none" (the answer position is the template's last token)
    tail_user: Literal["none", "shared", "own"] = "shared"
    # this share of training examples (drawn per seed) shows the unknown-user token instead of the user's own,
    # so that histories of users unseen in training (a session, a new shopper) get a trained user node
    anonymous_rate: float = 0.1
    # the graph bias: "none" (the same model without it), "fixed" (alpha x fixed channel weights, the same in
    # every layer and head), "learned" (a scale per layer, head and channel, Graphormer-style, starting at fixed)
    graph_bias: Literal["none", "fixed", "learned"] = "fixed"
    # channels of the bias between two node positions (see graph.py): "self" (same node), "ui" (user-item
    # edge, 1/sqrt(item degree)), "ii" (2-hop item-item co-interaction, cosine), "brand", "category" (same value)
    channels: list[str] = field(default_factory=lambda: ["self", "ui", "ii"])
    channel_weights: list[float] = field(default_factory=list)  # fixed weight per channel ([] = 1 each)
    bias_scale: float = 1.0  # alpha: the fixed bias is alpha x sum_k weight_k x channel_k
    max_neighbors: int = 0  # keep each item's strongest co-interaction neighbours only (0 = all)
    # pre-training (before fine-tuning, with the same bias): prompts of these kinds, within the budget
    pretrain: list[str] = field(default_factory=lambda: list(PRETRAIN_KINDS))
    pretrain_minutes: float = 0.0  # 0 = no pre-training
    pretrain_steps: int = 0  # optimizer steps at most (0 = the budget decides)
    pretrain_lr_scale: float = 1.0  # pre-training learning rates = fine-tuning ones x this
    content_tokens: int = 32  # text tokens of an item's content prompt (title, brand, categories, description)
    second_order_items: int = 8  # neighbours shown in an item's second-order prompt

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [c for c in self.channels if c not in CHANNELS]
        if bad or not self.channels:
            raise ValueError(f"channels: unknown {bad} (known: {', '.join(CHANNELS)}); at least one is needed")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels: repeated names in {self.channels}")
        if self.channel_weights and len(self.channel_weights) != len(self.channels):
            raise ValueError(f"channel_weights: {len(self.channel_weights)} weights for {len(self.channels)} channels")
        bad = [k for k in self.pretrain if k not in PRETRAIN_KINDS]
        if bad:
            raise ValueError(f"pretrain: unknown prompt kinds {bad} (known: {', '.join(PRETRAIN_KINDS)})")
        for name in ("pretrain_minutes", "pretrain_steps", "max_neighbors", "content_tokens", "second_order_items"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.anonymous_rate <= 1.0:
            raise ValueError(f"anonymous_rate must be in [0, 1], got {self.anonymous_rate}")
        if self.pretrain_lr_scale <= 0:
            raise ValueError("pretrain_lr_scale must be > 0")
        if self.collab_state == "token":
            raise ValueError("graph-lm: collab_state = 'token' would take the prompt's closing position from the "
                             "user node; use 'items' or 'none'")
        if self.tail_user != "none" and not self.user_tokens:
            raise ValueError("tail_user closes the prompt with the user token: set user_tokens = true")

    @property
    def weights(self) -> list[float]:
        """The fixed weight of each channel (``channel_weights`` or 1 each)."""
        return [float(w) for w in self.channel_weights] if self.channel_weights else [1.0] * len(self.channels)

"""Graph-aware LM (``graph-lm``): the item-token LM with user tokens and the user-item graph of the
training split as an additive attention bias (LLM4REC / CLLM4Rec-style), in pre-training, fine-tuning
and prediction alike.

Built on :class:`~llmrec.models.itemtoken.model.ItemTokenLM` (imported, not copied): backbone loading
(SmolLM2-135M-Instruct offline by default, any HF causal LM id), item rows initialized from titles, LoRA,
user tokens, dense next-item examples with an item softmax over the whole catalog (multinomial
likelihood), the fast scoring path, the optional SASRec companion (``collab_*`` / ``prior_*`` keys) and
persistence. What this model adds:

- :func:`~llmrec.models.graph_lm.graph.build_graph` over ``split.train`` (sparse; saved with the model);
- the user token opens *and* closes every prompt (``tail_user``), so the answer position is the user node
  and reads its items through the ``ui`` channel;
- :class:`~llmrec.models.graph_lm.attention.GraphNet`: every forward pass adds the bias of its batch;
- optional pre-training (:mod:`.pretrain`) on collaborative, content and second-order prompts before the
  fine-tuning, with the same bias.

Id spaces: users ``0..n_users-1`` (the split's; user token ``<|user_u|>``, ``<|user_UNK|>`` for others),
items ``0..n_items-1`` (token ``<|item_i|>``); graph nodes are items and the prompt's one user (see graph.py).
A prompt's user-item edges are the history it shows: validation prompts hold training items only, test
prompts training items + the validation item, and the item-item graph holds training edges only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmrec.data.splits import Split
from llmrec.models.graph_lm.attention import GraphNet
from llmrec.models.graph_lm.config import GraphLMConfig
from llmrec.models.graph_lm.graph import GraphTables, build_graph
from llmrec.models.graph_lm.pretrain import PretrainTask
from llmrec.models.itemtoken.model import ItemTokenLM
from llmrec.models.train import fit_loop, say


class GraphLM(ItemTokenLM):
    """User and item tokens in a pretrained causal LM whose attention is biased by the training graph."""

    name = "graph-lm"
    Config = GraphLMConfig
    net_class = GraphNet
    config: GraphLMConfig

    def __init__(self, config: GraphLMConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.tables: GraphTables | None = None
        self.graph_info: dict[str, Any] = {}
        self.pretrain_info: dict[str, Any] | None = None

    # --- network ------------------------------------------------------------------------
    def _build(self, titles: Sequence[str], init_rows: bool = True, n_users: int = 0,
               collab: np.ndarray | None = None, state_dim: int = 0) -> None:
        """The item-token network, then the graph attached to it (tables must be built or loaded first)."""
        super()._build(titles, init_rows=init_rows, n_users=n_users, collab=collab, state_dim=state_dim)
        if self.tables is None:
            raise RuntimeError("graph-lm: build or load the graph tables before the network")
        cfg = self.config
        self.graph_net.attach_graph(self.tables, cfg.channels, cfg.graph_bias, cfg.weights, cfg.bias_scale, cfg.attn)

    @property
    def graph_net(self) -> GraphNet:
        net = self._require_net()
        assert isinstance(net, GraphNet)
        return net

    def _tail(self, user: int | None = None) -> tuple[int, ...]:
        """A user token closes the prompt too (``tail_user``): the answer position is the user node."""
        mode = self.config.tail_user
        return () if mode == "none" else self._lead(user if mode == "own" else None)

    # --- training -----------------------------------------------------------------------
    def _epoch_examples(self, train: Sequence[np.ndarray], epoch: int) -> list[tuple[np.ndarray, ...]]:
        """The item-token LM's examples, ``anonymous_rate`` of them with the unknown-user token (drawn per seed)."""
        examples = super()._epoch_examples(train, epoch)
        if self.config.user_tokens and self.config.anonymous_rate > 0:
            net = self._require_net()
            first = net.n_base + net.n_rows
            unknown = first + self.n_users
            draw = np.random.default_rng([self.config.seed, 5]).random(len(examples))
            for e in (e for e, r in zip(examples, draw, strict=True) if r < self.config.anonymous_rate):
                e[0][(e[0] >= first) & (e[0] < unknown)] = unknown
        return examples

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Build the graph from ``split.train``, pre-train (if configured), fine-tune (the item-token LM's
        fit, early stopping on validation NDCG@10; ``split.test`` is never read). Returns the item-token LM's
        facts plus ``graph`` (build time, sizes) and ``pretrain`` (its loop's facts or None)."""
        t0 = time.perf_counter()
        self.tables = build_graph(split.train, self.n_items, split.catalog, self.config.max_neighbors)
        self.graph_info = {"seconds": time.perf_counter() - t0, "item_pairs": self.tables.n_pairs,
                           "edges": int(sum(len(np.unique(s)) for s in split.train)),
                           "channels": list(self.config.channels), "bias": self.config.graph_bias}
        info = super().fit(split, progress, workdir)
        return {**info, "graph": self.graph_info, "pretrain": self.pretrain_info}

    def _before_finetune(self, split: Split, checkpoint_dir: Path | None, progress: bool) -> None:
        """Pre-training on collaborative, content and second-order prompts within its own budget."""
        cfg = self.config
        if not cfg.pretrain or not (cfg.pretrain_minutes or cfg.pretrain_steps):
            return
        assert self.tables is not None
        task = PretrainTask(self, split, self.tables)
        say(progress, f"graph-lm: pre-training on {len(task.examples)} prompts ({', '.join(cfg.pretrain)})")
        res = fit_loop(task, task.train_config(), self.device, workdir=None,
                       checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir / "pretrain",
                       progress=progress)
        self.pretrain_info = {"examples": len(task.examples), "steps": res["steps"], "seconds": res["seconds"],
                              "stopped": res["stopped"], "seconds_per_step": res["seconds_per_step"]}

    # --- inference ----------------------------------------------------------------------
    def generate_lists(
        self, histories: Sequence[np.ndarray], k: int = 10, mode: Literal["beam", "greedy", "fast"] = "beam",
        exclude_seen: bool = True, users: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, k) item lists. With a graph bias only ``mode="fast"`` (top-k of :meth:`score`) is available:
        the bias is computed for whole prompts, not for cached decoding steps."""
        if mode != "fast" and self.config.graph_bias != "none":
            raise NotImplementedError("graph-lm: beam and greedy decoding do not carry the graph bias; "
                                      "use mode='fast' (the ranking every metric reads)")
        return super().generate_lists(histories, k, mode, exclude_seen, users)

    # --- persistence --------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, extra = super()._state()
        assert self.tables is not None
        tensors.update({f"graph.{k}": v for k, v in self.tables.to_arrays().items()})
        extra["graph"] = self.graph_info
        return tensors, extra

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        graph = {k[len("graph."):]: v for k, v in tensors.items() if k.startswith("graph.")}
        self.tables = GraphTables.from_arrays(graph, self.n_items)
        self.graph_info = dict(extra.get("graph", {}))
        super()._load_state({k: v for k, v in tensors.items() if not k.startswith("graph.")}, extra)

"""Pre-training prompts of the graph-aware LM and their task for the shared training loop.

Three kinds of prompt, all from the training split (and the catalog's text), all run with the graph bias:

- collaborative: ``<|user_u|> <|item_a|> <|item_b|> ...`` (the user's last ``max_history`` training items,
  oldest first); each position predicts the next item (item softmax);
- content: ``<|item_i|>`` followed by the item's text (title, brand, categories, description; at most
  ``content_tokens`` tokens); each position predicts the next text token (backbone vocabulary);
- second-order: ``<|item_i|> is often bought with <|item_j|> <|item_k|> ...`` (the items sharing the most
  training users with i, strongest first); each position from the joiner on predicts the next neighbour.

An example is ``(ids, item_labels, text_labels)``, each (L,) int64, labels shifted (``labels[p]`` is what
position p predicts) and ``IGNORE`` where nothing is predicted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.data.splits import Split
from llmrec.models.amp import autocast
from llmrec.models.graph_lm.graph import GraphTables
from llmrec.models.itemtoken.prompts import IGNORE
from llmrec.models.itemtoken.training import LMStateTask
from llmrec.models.train import TrainConfig

if TYPE_CHECKING:
    from llmrec.models.graph_lm.model import GraphLM

Example = tuple[np.ndarray, np.ndarray, np.ndarray]
JOINER = " is often bought with"


def _labels(n: int) -> np.ndarray:
    return np.full(n, IGNORE, dtype=np.int64)


def collaborative_example(user_token: int, items: np.ndarray, n_base: int) -> Example:
    """``[user] + items``: position p predicts items[p] (the user token predicts the first item)."""
    items = np.asarray(items, dtype=np.int64)
    ids = np.concatenate([[user_token], n_base + items]).astype(np.int64)
    item_labels = _labels(len(ids))
    item_labels[: len(items)] = items
    return ids, item_labels, _labels(len(ids))


def content_example(item: int, text_ids: Sequence[int], n_base: int) -> Example:
    """``[item] + text``: position p predicts text token p (the item token predicts the first)."""
    ids = np.asarray([n_base + item, *text_ids], dtype=np.int64)
    text_labels = _labels(len(ids))
    text_labels[:-1] = ids[1:]
    return ids, _labels(len(ids)), text_labels


def second_order_example(item: int, neighbors: np.ndarray, joiner: Sequence[int], n_base: int) -> Example:
    """``[item] + joiner + neighbours``: the joiner's last token predicts the first neighbour, each neighbour
    the next."""
    neighbors = np.asarray(neighbors, dtype=np.int64)
    ids = np.asarray([n_base + item, *joiner, *(n_base + neighbors)], dtype=np.int64)
    item_labels = _labels(len(ids))
    start = len(joiner)  # position of the joiner's last token
    item_labels[start : start + len(neighbors)] = neighbors
    return ids, item_labels, _labels(len(ids))


def pretrain_examples(model: GraphLM, split: Split, tables: GraphTables) -> list[Example]:
    """Every pre-training example of the kinds ``model.config.pretrain`` names (training data only)."""
    cfg, net, tok = model.config, model._require_net(), model.tokenizer
    out: list[Example] = []
    if "collaborative" in cfg.pretrain:
        for user, seq in enumerate(split.train):
            if len(seq):
                out.append(collaborative_example(model._lead(user)[0] if cfg.user_tokens else net.n_base,
                                                 np.asarray(seq)[-cfg.max_history:], net.n_base))
    if "content" in cfg.pretrain and cfg.content_tokens:
        cat = split.catalog
        texts = [cat.text(i) if cat is not None else model.titles[i] for i in range(model.n_items)]
        enc = tok([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        out.extend(content_example(i, list(t)[: cfg.content_tokens], net.n_base) for i, t in enumerate(enc) if t)
    if "second-order" in cfg.pretrain and cfg.second_order_items:
        joiner = list(tok(JOINER, add_special_tokens=False)["input_ids"])
        for i in range(model.n_items):
            nb = tables.neighbors(i, cfg.second_order_items)
            if len(nb):
                out.append(second_order_example(i, nb, joiner, net.n_base))
    return out


class PretrainTask(LMStateTask):
    """Pre-training for the shared loop: the examples of :func:`pretrain_examples` in shuffled batches of
    similar length; loss = item-softmax cross-entropy at item labels + vocabulary cross-entropy at text
    labels; no validation (the budget ``pretrain_minutes`` / ``pretrain_steps`` ends it)."""

    name = "graph-lm pretraining"
    stage = "pretrain"

    def __init__(self, model: GraphLM, split: Split, tables: GraphTables) -> None:
        self.model, self.split, self.module = model, split, model._require_net()
        self.examples = pretrain_examples(model, split, tables)
        if not self.examples:
            raise ValueError("graph-lm: pre-training has no examples (empty training split or no prompt kind)")
        self.lengths = np.array([len(e[0]) for e in self.examples])

    def train_config(self) -> TrainConfig:
        c = self.model.config
        return TrainConfig(unit="step", max_epochs=10_000, max_steps=c.pretrain_steps,
                           max_minutes=c.pretrain_minutes or 1e6, clock="loop", schedule="constant",
                           warmup_steps=c.warmup_steps, weight_decay=c.weight_decay, grad_accum=c.grad_accum,
                           rng="per-step", seed=c.seed, checkpoint_every=c.checkpoint_every, loss_window=50)

    def param_groups(self) -> list[dict[str, Any]]:
        c, s = self.model.config, self.model.config.pretrain_lr_scale
        item_params = [p for p in self.module.item_state().values() if isinstance(p, nn.Parameter)]
        lm_params = [p for n, p in self.model.trainable_state().items() if n.startswith("lm.")]
        groups = [{"params": item_params, "lr": c.item_lr * s}]
        if lm_params:
            groups.append({"params": lm_params, "lr": c.lr * s})
        return groups

    def n_batches(self) -> int:
        return math.ceil(len(self.examples) / self.model.config.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        return self.model._batches(len(self.examples), self.lengths, epoch)

    def loss(self, rows: np.ndarray) -> tuple[torch.Tensor, float]:
        m, ex, net = self.model, self.examples, self.module
        ids = m._pad([ex[i][0] for i in rows], 0)  # (B, L)
        item_labels = m._pad([ex[i][1] for i in rows], IGNORE)  # (B, L)
        text_labels = m._pad([ex[i][2] for i in rows], IGNORE)  # (B, L)
        with autocast(m.config.amp, m.device):
            h, _ = net.hidden(ids)  # (B, L, H)
            loss = h.new_zeros((), dtype=torch.float32)
            sel = item_labels != IGNORE
            if bool(sel.any()):
                loss = loss + F.cross_entropy(net.item_logits(h[sel]).float(), item_labels[sel])
            sel = text_labels != IGNORE
            if bool(sel.any()):
                loss = loss + F.cross_entropy(net._head(h[sel]).float(), text_labels[sel])
        return loss, 1.0

"""Training examples of the item-token LM: prompts of training prefixes with their answers, the SASRec
states aligned with their tokens, and similar-length batches. Built from ``split.train`` only.

:class:`ExampleBuilder` is a mixin of :class:`~llmrec.models.itemtoken.model.ItemTokenLM` (it reads the
model's config, prompt builder, network and companion SASRec).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llmrec.data.splits import pad_targets
from llmrec.models.collab import (
    prefix_states,
)
from llmrec.models.itemtoken.prompts import (
    training_example,
)


class ExampleBuilder:
    """Example building of the item-token LM (a mixin of ``ItemTokenLM``)."""

    def _epoch_examples(self, train: Sequence[np.ndarray], epoch: int) -> list[tuple[np.ndarray, ...]]:
        """(input_ids, labels, answer_mask) examples of one epoch, from training sequences only."""
        cfg = self.config
        assert self.prompts is not None
        rng = np.random.default_rng([cfg.seed, epoch])
        k = cfg.next_k if cfg.target == "next-k" else 1
        examples: list[tuple[np.ndarray, ...]] = []
        prefixes: list[np.ndarray] = []
        for user, seq in enumerate(train):
            seq = np.asarray(seq, dtype=np.int64)
            ratings, reviews = self._feedback_of(user, seq)
            n = len(seq)
            if n < 2:
                continue
            if cfg.target == "next-item" and cfg.dense and cfg.examples_per_user == 0:
                # windows ending at the last item, then every max_history items further back
                cuts = list(range(n - 1, 0, -cfg.max_history))
            else:
                cuts = list(range(1, n))
                if cfg.examples_per_user and len(cuts) > cfg.examples_per_user:
                    cuts = sorted(rng.choice(cuts, cfg.examples_per_user, replace=False).tolist())
            for t in cuts:
                answer = pad_targets(seq[t : t + k], k, cfg.padding, pad_id=self.end_row)
                if len(answer) == 0:
                    continue
                prompt = self.prompts.build(seq[:t], reserve=len(answer) - 1, lead=self._lead(user),
                                            tail=self._tail(user), ratings=None if ratings is None else ratings[:t],
                                            reviews=None if reviews is None else reviews[:t])
                examples.append(training_example(prompt, answer, self.prompts.n_base, dense=cfg.dense))
                fed = [a for a in answer[:-1] if a < self.n_items]  # answer items fed as input (next-k)
                prefixes.append(seq[:t] if cfg.collab_state == "token" else np.concatenate([seq[:t], fed]))
        if cfg.collab_state != "none" and examples:  # SASRec states aligned with each example's ids
            states = self._aligned_states([e[0] for e in examples], prefixes)
            examples = [(*e, st) for e, st in zip(examples, states, strict=True)]
        return examples

    def _tail(self, user: int | None = None) -> tuple[int, ...]:
        """Token ids that close the prompt of ``user``: the history-state token (``collab_state = "token"``),
        else none."""
        return (self._require_net().state_id,) if self.config.collab_state == "token" else ()

    def _aligned_states(self, ids: Sequence[np.ndarray], histories: Sequence[np.ndarray]) -> list[np.ndarray]:
        """For each token sequence ``ids[i]`` (L_i,) built from ``histories[i]``: (L_i, d) float32 scaled
        SASRec states, zero where a position gets none. ``token``: the state of the whole history at
        the state token. ``items``: the m item tokens of ``ids[i]`` are the last m items of
        ``histories[i]`` in order (history items, then any answer items fed as input); each gets the
        state of the history up to and including its item."""
        net = self._require_net()
        if self.collab_model is None:
            raise RuntimeError("itemtoken-lm: collab_state needs its SASRec (fit or load the model)")
        d = self.collab_model.state_size
        out = [np.zeros((len(x), d), dtype=np.float32) for x in ids]
        scale = np.float32(self.state_scale)
        if self.config.collab_state == "token":
            states = self.collab_model.user_states(histories) * scale  # (n, d)
            for o, x, st in zip(out, ids, states, strict=True):
                o[np.asarray(x) == net.state_id] = st
            return out
        pos = [np.flatnonzero((np.asarray(x) >= net.n_base) & (np.asarray(x) < net.n_base + self.n_items)) for x in ids]
        # the state at an item is SASRec's state of the history up to that item (on that prefix alone)
        hists = [np.asarray(h, dtype=np.int64) for h in histories]
        for o, p, st in zip(out, pos, prefix_states(self.collab_model, hists, [len(p) for p in pos]), strict=True):
            if len(st):
                o[p[-len(st):]] = st * scale
        return out

    def _stack_states(self, states: Sequence[np.ndarray], left: bool = False) -> torch.Tensor:
        """(B, L_max, d) of per-row (L_i, d) states, zero-padded on the right (or the left)."""
        width = max(len(x) for x in states)
        out = np.zeros((len(states), width, states[0].shape[1]), dtype=np.float32)
        for i, x in enumerate(states):
            if left:
                out[i, width - len(x):] = x
            else:
                out[i, : len(x)] = x
        return torch.from_numpy(out).to(self.device)

    def _batch_states(self, examples: Sequence[tuple[np.ndarray, ...]], rows: Any) -> torch.Tensor | None:
        if self.config.collab_state == "none":
            return None
        return self._stack_states([examples[i][3] for i in rows])

    def _batches(self, n_examples: int, lengths: np.ndarray, epoch: int) -> list[np.ndarray]:
        """Shuffled batches of similar-length examples (deterministic per seed and epoch)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        order = rng.permutation(n_examples)
        chunk = cfg.batch_size * 32
        batches = []
        for s in range(0, n_examples, chunk):
            part = order[s : s + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches.extend(part[i : i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _pad(self, rows: Sequence[np.ndarray], fill: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), fill, dtype=np.asarray(rows[0]).dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return torch.from_numpy(out).to(self.device)

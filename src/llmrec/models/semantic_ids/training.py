"""The semantic-ID generator's training as a task of the shared training loop."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmrec.data.splits import Split, split_digest
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.base import left_pad, length_batches
from llmrec.models.semantic_ids.interests import CachedExtractor
from llmrec.models.train import TrainConfig, TrainTask

if TYPE_CHECKING:
    from llmrec.models.semantic_ids.model import SemanticIDRec


class GeneratorTask(TrainTask):
    """The generator's training for the shared loop: the last ``max_len + 1`` items of each training
    sequence (every position predicts the next item's codes), length-bucketed batches drawn from one
    seeded numpy stream (which first samples the validation users), gradient clipping at 1."""

    name = "semantic-id"

    def __init__(self, model: SemanticIDRec, split: Split, progress: bool) -> None:
        c = model.config
        assert model.net is not None
        self.model, self.module, self.split = model, model.net, split
        L = c.max_len
        users = [u for u, s in enumerate(split.train) if len(s) >= 2]
        seqs = [np.asarray(split.train[u], dtype=np.int64) for u in users]
        self.inputs = left_pad([s[-(L + 1):-1] for s in seqs], L)  # (R, L)
        self.targets = left_pad([s[-L:] for s in seqs], L)  # (R, L)
        self.lengths = (self.inputs >= 0).sum(1)
        # (R, L, d) SASRec states aligned with the inputs: of the training sequence up to each input item
        self.states = None if not c.collab_states else \
            model._history_states([s[:-1] for s in seqs], L).cpu().numpy()
        t0 = time.perf_counter()
        self.int_ids, self.phrase_table = None, None
        if c.use_interests:
            self.int_ids, self.phrase_table = model._training_interests(seqs, progress)
        self.data_rng = np.random.default_rng(c.seed)
        self.valid = split.valid.sample(c.valid_users, self.data_rng)
        if c.use_interests and isinstance(model.extractor, CachedExtractor) and len(self.valid):
            model.interests_of(self.valid.histories, progress=progress)  # LLM interests, ahead of the clock
        self.interest_seconds = time.perf_counter() - t0

    def train_config(self) -> TrainConfig:
        """Epoch unit; warm-up and cosine decay (to 10%) given in epochs, constant without decay; the
        budget counts from the first step; dropout seeded once with ``seed + 1``."""
        c = self.model.config
        return TrainConfig(unit="epoch", max_epochs=c.max_epochs, max_minutes=c.max_minutes, clock="loop",
                           eval_every=c.eval_every, patience=c.patience, min_rounds=c.min_epochs,
                           weight_decay=c.weight_decay, schedule="cosine" if c.decay_epochs > 0 else "constant",
                           schedule_unit="epoch", warmup_steps=c.warmup_epochs, schedule_steps=c.decay_epochs,
                           clip_norm=1.0, rng="stream", seed=c.seed + 1)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.module.parameters()), "lr": self.model.config.lr}]

    def n_batches(self) -> int:
        return -(-len(self.inputs) // self.model.config.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        return length_batches(self.lengths, self.model.config.batch_size, self.data_rng)

    def loss(self, idx: np.ndarray) -> tuple[torch.Tensor, float]:
        m, dev = self.model, self.model.device
        w = int(self.lengths[idx].max())
        x = torch.from_numpy(self.inputs[idx, -w:]).to(dev)  # (b, w)
        y = torch.from_numpy(self.targets[idx, -w:]).to(dev)  # (b, w)
        pad, has_t = x < 0, y >= 0
        interests = None
        if self.int_ids is not None and self.phrase_table is not None:
            pid = torch.from_numpy(self.int_ids[idx, -w:]).to(dev)  # (b, w, P)
            interests = (self.phrase_table[pid.clamp(min=0)], pid >= 0)  # (b, w, P, E), (b, w, P)
        st = None if self.states is None else torch.from_numpy(self.states[idx, -w:]).to(dev)  # (b, w, d)
        _, loss = self.module(m._codes_t[x.clamp(min=0)], pad, m._codes_t[y.clamp(min=0)], has_t, interests, x, st)
        return loss, float(has_t.sum())

    def has_validation(self) -> bool:
        return len(self.valid) > 0

    def validate(self) -> float:
        ranked, _ = self.model.recommend(self.valid.histories, k=10, batch_size=self.model.config.eval_batch_size)
        return mean_ndcg(ranked, self.valid.targets)

    def resume_key(self) -> dict[str, Any]:
        cfg = {k: v for k, v in asdict(self.model.config).items() if k not in RESUME_FREE}
        return {"config": cfg, "data": split_digest(self.split)}


# Config keys that may differ between an interrupted fit and its resumption (they do not change training).
RESUME_FREE = frozenset({"max_minutes", "num_threads", "device", "eval_batch_size", "collab_prior_grid",
                         "prior_valid_users", "prior_widen", "prior_alone", "beam_size", "recommend_mode", "llm_batch_size"})

"""The instruction-tuned LM's fine-tuning as a task of the shared training loop.

Examples come from ``split.train`` only: for every training user the last training item is the
answer to the history before it (plus ``examples_per_user - 1`` random earlier cut points); in
``choice`` mode fresh negatives are drawn every epoch, in ``rerank`` mode the retriever's shortlist
of the history (the target put in place of the shortlist's last item when the retriever missed it)
is shuffled. Loss: cross-entropy on the answer tokens only (or, when options are scored by their titles,
over the options' title log-likelihoods). Validation: ``choice`` accuracy on fixed
candidate lists, or NDCG@10 (full ranking) in the other modes, on a fixed sample of validation users.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmrec.data.splits import Split, split_digest
from llmrec.models.instruct.config import RESUME_FREE
from llmrec.models.instruct.lm import trainable
from llmrec.models.train import TrainConfig, TrainTask

if TYPE_CHECKING:
    from llmrec.models.instruct.model import InstructLM, Row


def cut_points(train: list[np.ndarray], per_user: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(user, cut) pairs: history ``train[user][:cut]``, answer ``train[user][cut]``; the last cut of
    every user with >= 2 training items first, then ``per_user - 1`` random earlier cuts (distinct)."""
    out = []
    for u, s in enumerate(train):
        n = len(s)
        if n < 2:
            continue
        out.append((u, n - 1))
        extra = min(per_user - 1, n - 2)
        if extra > 0:
            out.extend((u, int(c)) for c in rng.choice(np.arange(1, n - 1), size=extra, replace=False))
    return out


class InstructTask(TrainTask):
    """See the module docstring; ``module`` is the backbone with its adapters."""

    name = "instruct-lm"

    def __init__(self, model: InstructLM, split: Split) -> None:
        cfg = model.config
        self.model, self.split, self.module = model, split, model.lm
        self.valid = split.valid.sample(cfg.valid_users, np.random.default_rng([cfg.seed, 7]))
        self.data_rng = np.random.default_rng([cfg.seed, 3])
        self._epoch, self._rows = -1, []
        self.n0 = len(cut_points(split.train, cfg.examples_per_user, np.random.default_rng(0)))

    def train_config(self) -> TrainConfig:
        c = self.model.config
        return TrainConfig(unit="step", max_epochs=c.epochs, max_steps=c.max_steps, max_minutes=c.max_minutes,
                           clock="loop", eval_every=c.eval_every, patience=c.patience, weight_decay=c.weight_decay,
                           schedule=c.schedule, warmup_steps=c.warmup_steps,
                           fit_schedule_to_budget=c.fit_schedule_to_budget, grad_accum=c.grad_accum, rng="per-step",
                           seed=c.seed, checkpoint_every=c.checkpoint_every, loss_window=50, clip_norm=1.0,
                           validate_first=c.validate_first)

    def param_groups(self) -> list[dict[str, Any]]:
        c = self.model.config
        return [{"params": list(trainable(self.module).values()), "lr": c.lr, "base_lr": c.lr}]

    def n_batches(self) -> int:
        return math.ceil(self.n0 / self.model.config.batch_size)

    def batches(self, epoch: int) -> list[list[Row]]:
        """The epoch's micro-batches of training rows (:meth:`InstructLM.training_rows`), similar lengths
        together, in seeded order."""
        cfg, rng = self.model.config, self.data_rng
        cuts = cut_points(self.split.train, cfg.examples_per_user, rng)
        rows = self.model.training_rows(self.split.train, cuts, rng)
        lengths = np.array([len(r[0]) for r in rows])
        order = np.lexsort((rng.random(len(rows)), lengths))
        chunks = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        return [[rows[j] for j in chunks[c]] for c in rng.permutation(len(chunks))]

    def loss(self, batch: list[Row]) -> tuple[torch.Tensor, float]:
        return self.model.answer_loss(batch), float(len(batch))

    def has_validation(self) -> bool:
        return len(self.valid) > 0

    def validate(self) -> float:
        return self.model.validation_score(self.valid, self.split)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainable(self.module).items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in trainable(self.module).items():
                p.copy_(state[n])

    def resume_key(self) -> dict[str, Any]:
        cfg = {k: v for k, v in asdict(self.model.config).items() if k not in RESUME_FREE}
        return {"config": cfg, "data": split_digest(self.split)}

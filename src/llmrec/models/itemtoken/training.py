"""The item-token LM's fine-tuning as a task of the shared training loop, and where its checkpoints live."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llmrec.data.splits import Split, split_digest
from llmrec.models.amp import autocast
from llmrec.models.itemtoken.config import _RESUME_FREE
from llmrec.models.itemtoken.prompts import (
    IGNORE,
)
from llmrec.models.train import TrainConfig, TrainTask

if TYPE_CHECKING:
    from llmrec.models.itemtoken.model import ItemTokenLM


def checkpoint_root(checkpoint_dir: str, workdir: str | Path | None) -> Path | None:
    """Where a fit keeps its checkpoints: ``checkpoint_dir`` (relative to ``workdir``, the run being
    trained, when there is one), ``workdir`` itself for ``""``, or None (no checkpoints)."""
    if checkpoint_dir:
        path = Path(checkpoint_dir)
        return path if path.is_absolute() or workdir is None else Path(workdir) / path
    return None if workdir is None else Path(workdir)


class LMStateTask(TrainTask):
    """What every task that trains an item-token LM's trainable state shares: the snapshot and restore
    of that state, and the resume key (config without the resume-free keys, the split's digest, and
    ``stage`` when the task sets one, so that two stages of one fit never resume each other)."""

    model: ItemTokenLM
    split: Split
    stage: str | None = None

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.trainable_state().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model._load_trainable(state)

    def resume_key(self) -> dict[str, Any]:
        cfg = {k: v for k, v in asdict(self.model.config).items() if k not in _RESUME_FREE}
        key: dict[str, Any] = {"config": cfg, "data": split_digest(self.split)}
        if self.stage is not None:
            key["stage"] = self.stage
        return key


class LMTask(LMStateTask):
    """The item-token LM's fine-tuning for the shared loop: prompts of training prefixes (rebuilt per
    epoch only when cut points are sampled), batches of similar length shuffled per (seed, epoch),
    item-softmax loss; validation NDCG@10 on a fixed sample of validation users."""

    name = "itemtoken-lm"

    def __init__(self, model: ItemTokenLM, split: Split) -> None:
        cfg = model.config
        self.model, self.split, self.module = model, split, model._require_net()
        self.valid = split.valid.sample(cfg.valid_users, np.random.default_rng([cfg.seed, 7]))
        self.examples, self.examples_epoch = model._epoch_examples(split.train, 0), 0
        self.n_examples0 = len(self.examples)

    def train_config(self) -> TrainConfig:
        """Step unit; warm-up then ``schedule`` (fitted to the budget), gradient accumulation, dropout
        reseeded per step, the budget counted from the first step, the loss of the last 50 batches."""
        c = self.model.config
        return TrainConfig(unit="step", max_epochs=c.epochs, max_steps=c.max_steps, max_minutes=c.max_minutes,
                           clock="loop", eval_every=c.eval_every, patience=c.patience, weight_decay=c.weight_decay,
                           schedule=c.schedule, warmup_steps=c.warmup_steps,
                           fit_schedule_to_budget=c.fit_schedule_to_budget, grad_accum=c.grad_accum, rng="per-step",
                           seed=c.seed, checkpoint_every=c.checkpoint_every, loss_window=50)

    def param_groups(self) -> list[dict[str, Any]]:
        c, net = self.model.config, self.module
        item_params = [p for p in net.item_state().values() if isinstance(p, nn.Parameter)]
        lm_params = [p for n, p in self.model.trainable_state().items() if n.startswith("lm.")]
        groups = [{"params": item_params, "lr": c.item_lr, "base_lr": c.item_lr}]
        if lm_params:
            groups.append({"params": lm_params, "lr": c.lr, "base_lr": c.lr})
        return groups

    def n_batches(self) -> int:
        return math.ceil(len(self.examples) / self.model.config.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self.model.config.examples_per_user and self.examples_epoch != epoch:  # cut points sampled per epoch
            self.examples, self.examples_epoch = self.model._epoch_examples(self.split.train, epoch), epoch
        # (otherwise every epoch has the same examples and SASRec states: built once)
        lengths = np.array([len(e[0]) for e in self.examples])
        return self.model._batches(len(self.examples), lengths, epoch)

    def loss(self, rows: np.ndarray) -> tuple[torch.Tensor, float]:
        m, ex = self.model, self.examples
        ids = m._pad([ex[i][0] for i in rows], 0)
        labels = m._pad([ex[i][1] for i in rows], IGNORE)
        amask = m._pad([ex[i][2] for i in rows], False)
        with autocast(m.config.amp, m.device), self.module.using_states(m._batch_states(ex, rows)):
            return m.loss(ids, labels, amask), 1.0

    def has_validation(self) -> bool:
        return len(self.valid) > 0

    def validate(self) -> float:
        return self.model._validate(self.valid)

    def after_step(self, step: int) -> None:
        self.model._after_step(step)

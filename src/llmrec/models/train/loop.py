"""The one training loop of every trained model.

A model hands the loop a :class:`TrainTask`: its parameter groups, the micro-batches of an epoch,
the loss of a micro-batch, a validation function (NDCG@10) and how to snapshot and restore its
weights. The loop owns everything else, each policy a named option of :class:`TrainConfig`:

========================  ==================================================================
option                    meaning
========================  ==================================================================
``unit``                  what ``eval_every``, ``patience`` and ``min_rounds`` count:
                          ``"epoch"`` (validate at epoch ends; one history record per epoch)
                          or ``"step"`` (optimizer steps; one record per validation)
``max_epochs``            epochs at most (stop reason ``max_epochs``)
``max_steps``             optimizer steps at most, 0 = none (stop reason ``max_steps``)
``max_minutes``           wall-clock budget, validation included (stop reason ``max_minutes``)
``clock``                 when the budget starts: ``"fit"`` (the model's fit began: data
                          preparation counts) or ``"loop"`` (the first step)
``schedule``              ``constant`` | ``linear`` | ``cosine`` (to 10%) | ``cosine-to-zero``
``warmup_steps``          linear warm-up, in optimizer steps (may be fractional)
``schedule_steps``        steps the decay spans (0 = the planned steps)
``schedule_unit``         ``"epoch"``: ``warmup_steps`` and ``schedule_steps`` count epochs
``fit_schedule_to_budget`` shrink the decay to the steps that the budget allows (re-estimated at
                          step 10 and after each validation)
``grad_accum``            micro-batches per optimizer step (losses averaged)
``clip_norm``             gradient-norm clipping, 0 = none
``rng``                   torch randomness (dropout): ``"stream"`` (seeded once with ``seed``)
                          or ``"per-step"`` (reseeded with ``seed * 1_000_003 + step`` every step)
``checkpoint_every``      optimizer steps between checkpoints (0 = none mid-epoch); with a
                          ``workdir`` a checkpoint is also written at every epoch end and at the end
``checkpoints``           False: never write or resume checkpoints
``loss_window``           the loss shown and recorded: mean of the epoch's last N micro-batches, or 0 =
                          the epoch's mean weighted by each batch's target count
``validate_first``        validate the initial weights too (round 0), so a pretrained model that
                          fine-tuning does not improve on validation is kept as it was
========================  ==================================================================

Stop reasons: ``max_epochs``, ``max_steps``, ``max_minutes``, ``patience``. After training the best
validated weights are restored. Several processes (``accelerate launch``, ``torchrun``) train
data-parallel: step ``s`` of rank ``r`` takes the ``(s * world + r)``-th group of micro-batches,
gradients are averaged, and validation scores and stop decisions are the main process's.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from llmrec.models.train.checkpoint import Checkpoint
from llmrec.models.train.progress import Curves, Progress, batch_progress
from llmrec.models.train.runtime import Processes
from llmrec.models.train.schedule import Schedule, budget_steps, learning_rate
from llmrec.models.train.stopping import EarlyStopping


@dataclass
class TrainConfig:
    """The loop's policies (see the module docstring); models fill it from their own config keys."""

    unit: Literal["epoch", "step"] = "epoch"
    max_epochs: int = 1
    max_steps: int = 0
    max_minutes: float = 15.0
    clock: Literal["fit", "loop"] = "loop"
    eval_every: int = 1
    patience: int = 10
    min_rounds: int = 0
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    schedule_unit: Literal["step", "epoch"] = "step"
    warmup_steps: float = 0.0
    schedule_steps: float = 0.0
    fit_schedule_to_budget: bool = False
    grad_accum: int = 1
    clip_norm: float = 0.0
    rng: Literal["stream", "per-step"] = "stream"
    seed: int = 0
    checkpoint_every: int = 0
    checkpoints: bool = True
    loss_window: int = 0
    validate_first: bool = False  # validate the initial weights too (a pretrained model's own candidate, step 0)

    def __post_init__(self) -> None:
        for name in ("max_epochs", "eval_every", "patience", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "min_rounds", "checkpoint_every", "loss_window", "warmup_steps", "clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


class TrainTask(ABC):
    """What a model hands the loop. ``module`` holds every trainable parameter (train/eval modes);
    ``data_rng``, if the batches draw from it, is checkpointed at each epoch start."""

    name: str = "model"
    module: nn.Module
    data_rng: np.random.Generator | None = None

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with its ``lr`` (the schedule's base rate)."""

    @abstractmethod
    def n_batches(self) -> int:
        """Micro-batches in an epoch (the first epoch's count: it plans the schedule and the bar)."""

    @abstractmethod
    def batches(self, epoch: int) -> Sequence[Any]:
        """The micro-batches of 0-based ``epoch``, in training order."""

    @abstractmethod
    def loss(self, batch: Any) -> tuple[torch.Tensor, float]:
        """(scalar mean loss to minimize, its weight in the epoch's mean loss, e.g. targets)."""

    def has_validation(self) -> bool:
        return False

    def validate(self) -> float:
        """Validation NDCG@10 of the current weights (higher is better)."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the weights that training changes (the best ones are kept this way)."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def resume_key(self) -> dict[str, Any]:
        """``{"config": ..., "data": ...}`` that a checkpoint must match to be resumed."""
        return {}

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (tests simulate an interruption here)."""


class _Run:
    """The loop's position and bookkeeping (JSON-able ``state``, saved in checkpoints)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "history": [],
                                      "resumed_from": None}
        self.stopper = EarlyStopping(cfg.patience, cfg.min_rounds)
        self.recent: deque[float] = deque(maxlen=cfg.loss_window or None)
        self.epoch_sum, self.epoch_n = 0.0, 0.0
        self.step_times: list[float] = []

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.state[key] = value


def fit_loop(task: TrainTask, cfg: TrainConfig, device: torch.device, *, workdir: str | Path | None = None,
             checkpoint_dir: str | Path | None = None, progress: bool = True,
             fit_start: float | None = None) -> dict[str, Any]:
    """Train ``task`` under ``cfg`` on ``device``; curves and TensorBoard events go to ``workdir``,
    checkpoints to ``checkpoint_dir`` (default ``workdir``; none without either). ``fit_start``:
    ``time.perf_counter()`` when the model's fit began (``clock="fit"``). Returns ``{"steps", "epochs", "steps_per_epoch", "best_valid_ndcg@10",
    "best_at", "stopped", "history", "seconds", "seconds_per_step", "resumed_from", "processes"}``."""
    ckdir = checkpoint_dir if checkpoint_dir is not None else workdir
    loop = _Loop(task, cfg, device, Path(workdir) if workdir is not None else None,
                 Path(ckdir) if ckdir is not None else None, progress, fit_start)
    return loop.run()


class _Loop:
    def __init__(self, task: TrainTask, cfg: TrainConfig, device: torch.device, workdir: Path | None,
                 ckdir: Path | None, progress: bool, fit_start: float | None) -> None:
        self.task, self.cfg, self.device = task, cfg, device
        self.procs = Processes(device)
        groups = [{**g, "base_lr": g.get("base_lr", g["lr"])} for g in task.param_groups()]
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.params = [p for g in self.opt.param_groups for p in g["params"] if p.requires_grad]
        per_epoch = math.ceil(task.n_batches() / cfg.grad_accum)
        self.steps_per_epoch = max(1, math.ceil(per_epoch / self.procs.world))
        self.planned = cfg.max_steps or cfg.max_epochs * self.steps_per_epoch
        per = self.steps_per_epoch if cfg.schedule_unit == "epoch" else 1
        self.warmup = cfg.warmup_steps * per
        self.sched_total: float = cfg.schedule_steps * per or self.planned
        self.budget = 60.0 * cfg.max_minutes
        self.clock0 = fit_start if (cfg.clock == "fit" and fit_start is not None) else time.perf_counter()
        write = workdir is not None and self.procs.main
        self.ckpt = Checkpoint(ckdir, task.resume_key()) if ckdir is not None and cfg.checkpoints else None
        self.curves = Curves(workdir if write else None, task.name)
        self.run_ = _Run(cfg)
        self.has_valid = task.has_validation()
        self.show = progress and self.procs.main
        self.bar: Progress | None = None

    # --- clock, checkpoints ----------------------------------------------------------------
    def elapsed(self) -> float:
        return float(self.run_["elapsed"]) + time.perf_counter() - self.clock0

    def _rng_state(self) -> dict[str, torch.Tensor]:
        return {"torch": torch.get_rng_state()} if self.cfg.rng == "stream" else {}

    def save(self) -> None:
        if self.ckpt is None:
            return
        r = self.run_
        if self.procs.main:
            state = dict(r.state, elapsed=self.elapsed(), loss_sum=[r.epoch_sum, r.epoch_n], recent=list(r.recent),
                         best=r.stopper.best, best_step=r.stopper.best_at, bad=r.stopper.bad)
            rng = self.task.data_rng
            if rng is not None:  # where the current epoch's batches were drawn from, or the next epoch's will be
                state["data_rng"] = r.state.get("data_rng_epoch") if r["batch"] > 0 else rng.bit_generator.state
            self.ckpt.save(state, self.task.snapshot(), r.stopper.best_state, self.opt, self._rng_state())
        self.procs.barrier()

    def resume(self) -> dict[str, torch.Tensor]:
        """Restore weights, optimizer and position from the checkpoint if there is one; its rng."""
        if self.ckpt is None or not self.ckpt.exists():
            return {}
        state, current, best, rng = self.ckpt.load(self.opt)
        r = self.run_
        r.state.update(state)
        self.task.restore(current)
        r.stopper.best_state = best
        r.stopper.restore_position({"best": state["best"], "best_at": state["best_step"], "bad": state["bad"]})
        r.epoch_sum, r.epoch_n = state.get("loss_sum", [0.0, 0.0])
        r.recent.extend(state.get("recent", []))
        if "sched_total" in state:
            self.sched_total = state["sched_total"]
        if state.get("data_rng") is not None and self.task.data_rng is not None:
            self.task.data_rng.bit_generator.state = state["data_rng"]
        r["resumed_from"] = r["step"]
        self.clock0 = time.perf_counter()
        return rng

    # --- validation ------------------------------------------------------------------------
    def validate(self, at: int) -> float:
        r = self.run_
        if self.bar is not None:
            self.bar.note(stage="validating")
        self.task.module.eval()
        with batch_progress(f"{self.task.name} validation", self.show):
            score = float(self.procs.agree(float(self.task.validate())))
        r.stopper.update(score, at, self.task.snapshot)
        self.curves.validation(r["step"], self.elapsed(), score)
        if self.bar is not None:
            self.bar.note(ndcg=score, best=r.stopper.best, stage="training")
        return score

    # --- one optimizer step ----------------------------------------------------------------
    def step(self, group: Sequence[Any]) -> None:
        cfg, r, task = self.cfg, self.run_, self.task
        t0 = time.perf_counter()
        if cfg.rng == "per-step":
            torch.manual_seed(cfg.seed * 1_000_003 + r["step"])  # dropout: the same after resuming
        task.module.train()
        for g in self.opt.param_groups:
            g["lr"] = learning_rate(g["base_lr"], r["step"], self.sched_total, self.warmup, cfg.schedule)
        self.opt.zero_grad(set_to_none=True)
        for batch in group:
            loss, weight = task.loss(batch)
            (loss if len(group) == 1 else loss / len(group)).backward()
            value = float(loss.detach())
            r.recent.append(value)
            r.epoch_sum += value * weight
            r.epoch_n += weight
        self.procs.average_gradients(self.params)
        if cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
        self.opt.step()
        r["step"] += 1
        r["loss"] = float(np.mean(r.recent)) if cfg.loss_window else r.epoch_sum / max(r.epoch_n, 1)
        r.step_times.append(time.perf_counter() - t0)
        self.curves.loss(r["step"], self.elapsed(), value if group else float("nan"))
        if self.bar is not None:
            self.bar.step(r["step"], self.elapsed(), r["loss"])
        task.after_step(r["step"])
        if cfg.fit_schedule_to_budget and (r["step"] == 10 or r["step"] % cfg.eval_every == 1):
            self.sched_total = r["sched_total"] = budget_steps(r["step"], self.planned, self.elapsed(), self.budget)

    # --- epochs ----------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[Any]]:
        """This process's step groups of ``epoch`` (the data rng restored to the epoch's start)."""
        rng = self.task.data_rng
        if rng is not None:
            self.run_["data_rng_epoch"] = rng.bit_generator.state
        micro = list(self.task.batches(epoch))
        acc, world, rank = self.cfg.grad_accum, self.procs.world, self.procs.rank
        groups = [micro[i : i + acc] for i in range(0, len(micro), acc)]
        return [groups[s * world + rank] if s * world + rank < len(groups) else []
                for s in range(math.ceil(len(groups) / world))]

    def run_epoch_unit(self) -> str:
        cfg, r = self.cfg, self.run_
        while True:
            epoch = r["epoch"]
            if epoch >= cfg.max_epochs:
                return "max_epochs"
            steps = self.epoch_batches(epoch)
            out_of_time = capped = False
            for s in range(r["batch"], len(steps)):
                self.step(steps[s])
                r["batch"] = s + 1
                if cfg.checkpoint_every and r["step"] % cfg.checkpoint_every == 0 and s + 1 < len(steps):
                    self.save()
                capped = bool(cfg.max_steps) and r["step"] >= cfg.max_steps
                out_of_time = self.procs.agree(self.elapsed() > self.budget)
                if out_of_time or capped:
                    break
            e = epoch + 1
            loss_sum, loss_n = self.procs.total([r.epoch_sum, r.epoch_n])
            record = {"epoch": float(e), "loss": loss_sum / max(loss_n, 1), "step": r["step"]}
            if self.has_valid and (e % cfg.eval_every == 0 or out_of_time or capped or e == cfg.max_epochs):
                record["valid_ndcg@10"] = self.validate(e)
            record["seconds"] = self.elapsed()
            r["history"].append(record)
            r["epoch"], r["batch"] = e, 0
            r.epoch_sum, r.epoch_n = 0.0, 0.0
            r.recent.clear()
            self.save()
            if out_of_time or self.procs.agree(self.elapsed() > self.budget):
                return "max_minutes"
            if capped:
                return "max_steps"
            if self.has_valid and r.stopper.should_stop(e):
                return "patience"

    def run_step_unit(self) -> str:
        cfg, r = self.cfg, self.run_
        if r["step"] >= self.planned:
            return "max_steps"
        while r["epoch"] < cfg.max_epochs:
            steps = self.epoch_batches(r["epoch"])
            for s in range(r["batch"], len(steps)):
                self.step(steps[s])
                r["batch"] = s + 1
                if self.has_valid and r["step"] % cfg.eval_every == 0:
                    r["history"].append(self.validation_record())
                if cfg.checkpoint_every and (r["step"] % cfg.checkpoint_every == 0 or s + 1 == len(steps)):
                    self.save()
                stop = None
                if r["step"] >= self.planned:
                    stop = "max_steps"
                elif self.elapsed() > self.budget:
                    stop = "max_minutes"
                elif self.has_valid and r.stopper.should_stop(r["step"]):
                    stop = "patience"
                stop = self.procs.agree(stop)
                if stop is not None:
                    return stop
            r["epoch"] += 1
            r["batch"] = 0
            r.epoch_sum, r.epoch_n = 0.0, 0.0
            r.recent.clear()
        return "max_epochs"

    def validation_record(self) -> dict[str, Any]:
        r = self.run_
        ndcg = self.validate(r["step"])
        return {"step": r["step"], "epoch": r["epoch"], "valid_ndcg@10": ndcg, "loss": r.state.get("loss", float("nan")),
                "seconds": self.elapsed()}

    # --- the whole run ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.run_
        with torch.random.fork_rng(devices=[]):
            if cfg.rng == "stream":
                torch.manual_seed(cfg.seed)
            rng = self.resume()
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            self.bar = Progress(self.task.name, self.planned, self.budget, self.show, initial=r["step"]) \
                if self.show else None
            try:
                stopped = r.state.get("stopped")  # a finished checkpoint: nothing left to train
                if stopped is None and cfg.validate_first and self.has_valid and not r["history"]:
                    r["history"].append(self.validation_record())  # round 0: the weights before any step
                if stopped is None:
                    stopped = self.run_epoch_unit() if cfg.unit == "epoch" else self.run_step_unit()
                if cfg.unit == "step" and self.has_valid and (not r["history"] or r["history"][-1]["step"] != r["step"]):
                    r["history"].append(self.validation_record())
            finally:
                if self.bar is not None:
                    self.bar.close()
        if self.has_valid and r.stopper.best_state is not None:
            self.task.restore(r.stopper.best_state)
        self.task.module.eval()
        r["stopped"] = stopped
        self.save()
        best = f", best validation NDCG@10 {r.stopper.best:.4f} at {cfg.unit} {r.stopper.best_at}" if self.has_valid else ""
        self.curves.close(f"stopped by {stopped} after {r['step']} steps{best}")
        return {
            "steps": r["step"], "epochs": r["epoch"], "steps_per_epoch": self.steps_per_epoch,
            "best_valid_ndcg@10": r.stopper.best if self.has_valid else float("nan"),
            "best_at": r.stopper.best_at, "stopped": stopped, "history": r["history"], "seconds": self.elapsed(),
            "seconds_per_step": float(np.median(r.step_times)) if r.step_times else float("nan"),
            "resumed_from": r["resumed_from"], "processes": self.procs.world,
        }

"""The shared training loop on a toy task: stop reasons, schedules, resumption to the same result,
checkpoint errors, the progress bar's end, curves and TensorBoard events."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmrec.models.train import (
    Checkpoint,
    CheckpointError,
    TrainConfig,
    TrainTask,
    fit_loop,
    learning_rate,
    lr_factor,
)
from llmrec.models.train.progress import Progress


class Interrupted(Exception):
    pass


class ToyTask(TrainTask):
    """Linear regression with dropout; validation score = -MSE on held-out rows (higher is better)."""

    name = "toy"

    def __init__(self, seed: int = 0, n: int = 96, batch: int = 8, stop_at: int = 0, scores: list[float] | None = None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = self.x @ torch.arange(1.0, 6.0) + 0.1 * torch.randn(n, generator=g)
        torch.manual_seed(seed)
        self.module = nn.Sequential(nn.Dropout(0.2), nn.Linear(5, 1))
        self.batch, self.stop_at, self.scores = batch, stop_at, scores
        self.data_rng = np.random.default_rng(seed)
        self.validations = 0

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.module.parameters()), "lr": 0.05}]

    def n_batches(self) -> int:
        return math.ceil(80 / self.batch)

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = self.data_rng.permutation(80)
        return [order[i : i + self.batch] for i in range(0, 80, self.batch)]

    def loss(self, idx: np.ndarray) -> tuple[torch.Tensor, float]:
        t = torch.from_numpy(idx)
        return ((self.module(self.x[t]).squeeze(1) - self.y[t]) ** 2).mean(), float(len(idx))

    def has_validation(self) -> bool:
        return True

    def validate(self) -> float:
        self.validations += 1
        if self.scores is not None:
            return self.scores[min(self.validations, len(self.scores)) - 1]
        with torch.no_grad():
            return -float(((self.module(self.x[80:]).squeeze(1) - self.y[80:]) ** 2).mean())

    def resume_key(self) -> dict[str, Any]:
        return {"config": {"batch": self.batch}, "data": "toy"}

    def after_step(self, step: int) -> None:
        if step == self.stop_at:
            raise Interrupted


def weights(task: ToyTask) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in task.module.parameters()]).numpy()


def test_stop_reasons() -> None:
    cpu = torch.device("cpu")
    res = fit_loop(ToyTask(), TrainConfig(max_epochs=3), cpu, progress=False)
    assert (res["stopped"], res["epochs"], res["steps"]) == ("max_epochs", 3, 30)
    res = fit_loop(ToyTask(), TrainConfig(unit="step", max_epochs=9, max_steps=25, eval_every=5), cpu, progress=False)
    assert (res["stopped"], res["steps"]) == ("max_steps", 25)
    assert [h["step"] for h in res["history"]] == [5, 10, 15, 20, 25]
    # scores that never improve after the first validation: patience 2 stops at the third validation
    task = ToyTask(scores=[0.5, 0.4, 0.3, 0.2])
    res = fit_loop(task, TrainConfig(max_epochs=9, patience=2), cpu, progress=False)
    assert (res["stopped"], res["epochs"], res["best_at"]) == ("patience", 3, 1)
    # ... but not before min_rounds
    task = ToyTask(scores=[0.5, 0.4, 0.3, 0.2])
    res = fit_loop(task, TrainConfig(max_epochs=9, patience=2, min_rounds=5), cpu, progress=False)
    assert (res["stopped"], res["epochs"]) == ("patience", 5)
    res = fit_loop(ToyTask(), TrainConfig(max_epochs=99, max_minutes=1e-9), cpu, progress=False)
    assert res["stopped"] == "max_minutes" and res["steps"] == 1
    assert "valid_ndcg@10" in res["history"][-1]  # the partial epoch is validated before stopping


def test_best_weights_are_restored() -> None:
    task = ToyTask(scores=[0.1, 0.9, 0.2])
    snapshots: list[np.ndarray] = []
    original = task.snapshot

    def spy() -> dict[str, torch.Tensor]:
        snapshots.append(weights(task))
        return original()

    task.snapshot = spy  # type: ignore[method-assign]
    fit_loop(task, TrainConfig(max_epochs=3), torch.device("cpu"), progress=False)
    np.testing.assert_array_equal(weights(task), snapshots[1])  # epoch 2's weights, not the last ones


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_validate_first_keeps_the_initial_weights_when_training_never_beats_them(unit: str) -> None:
    task = ToyTask(scores=[0.9, 0.5, 0.4, 0.3])
    initial = weights(task)
    res = fit_loop(task, TrainConfig(unit=unit, max_epochs=3, max_steps=30, eval_every=10 if unit == "step" else 1,
                                     validate_first=True), torch.device("cpu"), progress=False)
    assert res["history"][0]["step"] == 0 and res["best_at"] == 0 and len(res["history"]) == 4
    np.testing.assert_array_equal(weights(task), initial)


@pytest.mark.parametrize("unit,rng,accum", [("epoch", "stream", 1), ("step", "per-step", 2), ("epoch", "stream", 3)])
def test_resume_gives_the_uninterrupted_result(tmp_path: Path, unit: str, rng: str, accum: int) -> None:
    cfg = TrainConfig(unit=unit, max_epochs=4, eval_every=3 if unit == "step" else 1, grad_accum=accum,  # type: ignore[arg-type]
                      rng=rng, checkpoint_every=2, schedule="cosine", warmup_steps=2)  # type: ignore[arg-type]
    reference = ToyTask()
    ref = fit_loop(reference, cfg, torch.device("cpu"), progress=False)
    with pytest.raises(Interrupted):
        fit_loop(ToyTask(stop_at=7), cfg, torch.device("cpu"), workdir=tmp_path, progress=False)
    resumed = ToyTask()
    res = fit_loop(resumed, cfg, torch.device("cpu"), workdir=tmp_path, progress=False)
    assert res["resumed_from"] in (5, 6)  # the last checkpoint before step 7
    np.testing.assert_array_equal(weights(resumed), weights(reference))
    for got, want in zip(res["history"], ref["history"], strict=True):
        assert {k: v for k, v in got.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in want.items() if k != "seconds"}, rel=1e-9)
    assert (res["stopped"], res["steps"], res["best_at"]) == (ref["stopped"], ref["steps"], ref["best_at"])
    # a finished checkpoint resumes as finished: nothing more is trained
    again = ToyTask()
    assert fit_loop(again, cfg, torch.device("cpu"), workdir=tmp_path, progress=False)["steps"] == ref["steps"]
    np.testing.assert_array_equal(weights(again), weights(reference))


def test_checkpoint_of_another_config_or_damaged_is_a_clear_error(tmp_path: Path) -> None:
    fit_loop(ToyTask(), TrainConfig(max_epochs=1), torch.device("cpu"), workdir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"another config \(differs in \['batch'\]\)"):
        fit_loop(ToyTask(batch=4), TrainConfig(max_epochs=1), torch.device("cpu"), workdir=tmp_path, progress=False)
    other = ToyTask()
    other.resume_key = lambda: {"config": {"batch": 8}, "data": "other"}  # type: ignore[method-assign]
    with pytest.raises(CheckpointError, match="other training data"):
        fit_loop(other, TrainConfig(max_epochs=1), torch.device("cpu"), workdir=tmp_path, progress=False)
    (tmp_path / "ckpt" / "optim.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        fit_loop(ToyTask(), TrainConfig(max_epochs=1), torch.device("cpu"), workdir=tmp_path, progress=False)
    Checkpoint(tmp_path, {}).remove()
    assert not (tmp_path / "ckpt").exists()


def test_curves_and_tensorboard_events_are_written(tmp_path: Path) -> None:
    fit_loop(ToyTask(), TrainConfig(max_epochs=2), torch.device("cpu"), workdir=tmp_path, progress=False)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    pytest.importorskip("tensorboard")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_progress_bar_ends_where_the_budget_ends() -> None:
    bar = Progress("x", planned=15720, budget_s=1800.0, enabled=False)
    bar.step(1228, elapsed=1802.0, loss=1.0)  # the budget is spent: training ends now, not in 5 hours
    assert bar.bar.total == 1228 and bar.post["ends"] == "budget"
    bar = Progress("x", planned=1000, budget_s=100.0, enabled=False)
    bar.step(10, elapsed=10.0, loss=1.0)  # 1 s per step, 90 s left: about 100 steps in all
    assert bar.bar.total == 100
    bar = Progress("x", planned=50, budget_s=100.0, enabled=False)
    bar.step(10, elapsed=1.0, loss=1.0)  # the steps run out first
    assert bar.bar.total == 50 and bar.post["ends"] == "steps"


@settings(max_examples=200, deadline=None)
@given(step=st.integers(0, 500), total=st.integers(1, 400), warmup=st.integers(0, 50),
       schedule=st.sampled_from(["constant", "linear", "cosine"]))
def test_lr_factor_is_a_bounded_warmup_then_decay(step: int, total: int, warmup: int, schedule: str) -> None:
    f = lr_factor(step, total, warmup, schedule)  # type: ignore[arg-type]
    assert 0.0 <= f <= 1.0
    if step >= warmup and step >= 1:
        assert lr_factor(step - 1, total, warmup, schedule) >= f - 1e-12 or step - 1 < warmup  # type: ignore[arg-type]
    if schedule == "cosine" and step >= max(total, warmup):
        assert f == pytest.approx(0.1 if total > warmup else 1.0)


def test_cosine_to_zero_is_sasrecs_historical_schedule() -> None:
    for step in range(0, 200, 7):
        assert learning_rate(3e-3, step, 200, 0, "cosine-to-zero") == 3e-3 * 0.5 * (1.0 + math.cos(math.pi * step / 200))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0)
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=0)

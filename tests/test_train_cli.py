"""``llmrec train`` of every trained model: kill -9 and rerun resumes to the uninterrupted result;
two CPU processes (torchrun, gloo) train a model that loads and evaluates; run folders get curves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from llmrec.runs import evaluate_run, load_run, partial_dir

TINY: dict[str, dict[str, Any]] = {
    "sasrec": {"hidden_size": 16, "n_heads": 1, "n_layers": 1, "inner_size": 32, "max_len": 12, "batch_size": 4,
               "max_epochs": 300, "patience": 1000, "dropout": 0.2, "num_threads": 1},
    "semantic-id": {"embedder": "hash", "rq_levels": 2, "rq_codebook_size": 8, "rq_latent_dim": 8, "rq_hidden": 16,
                    "rq_steps": 50, "d_model": 16, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ff_size": 32,
                    "dropout": 0.1, "max_len": 12, "batch_size": 4, "max_epochs": 150, "patience": 1000,
                    "min_epochs": 1, "beam_size": 10, "num_threads": 1},
    "itemtoken-lm": {"backbone": "random-tiny-llama", "template": "plain", "title_tokens": 2, "batch_size": 8,
                     "epochs": 2, "eval_every": 3, "num_threads": 1, "amp": "off"},
}


def train_command(model: str, ds: Path, out: Path, **extra: Any) -> list[str]:
    args = ["train", "--model", model, "--dataset", str(ds), "--out", str(out), "--quiet"]
    for k, v in {**TINY[model], **extra}.items():
        args += ["--set", f"model.params.{k}={json.dumps(v)}"]
    return args


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [*(launcher or [sys.executable]), "-m", "llmrec.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_when_checkpointed(args: list[str], out: Path, min_epoch: int, timeout: float = 240) -> int:
    """Start ``llmrec train``, kill -9 it once its checkpoint has passed ``min_epoch`` epochs; that step."""
    state = partial_dir(out) / "ckpt" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "llmrec.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                run = json.loads(state.read_text())["run"]
            except (OSError, ValueError, KeyError):
                run = {"epoch": -1}
            if run["epoch"] >= min_epoch:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return int(run["step"])
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
    pytest.fail("training finished (or timed out) before it could be killed")


@pytest.mark.parametrize("model", ["sasrec", "semantic-id"])
def test_kill_9_then_rerun_resumes_to_the_same_model(model: str, cycle_dataset: Path, tmp_path: Path) -> None:
    ref_out, out = tmp_path / "reference", tmp_path / "run"
    run_cli(train_command(model, cycle_dataset, ref_out))
    killed_at = kill_when_checkpointed(train_command(model, cycle_dataset, out), out, min_epoch=3)
    assert not out.exists() and partial_dir(out).exists()  # nothing half-written where the run goes
    run_cli(train_command(model, cycle_dataset, out))  # the same command again
    fit = json.loads((out / "run.json").read_text())["fit"]
    ref = json.loads((ref_out / "run.json").read_text())["fit"]
    assert fit["resumed_from"] is not None and 0 < fit["resumed_from"] <= killed_at
    assert (fit["epochs"], fit["best_epoch"], fit["stopped"]) == (ref["epochs"], ref["best_epoch"], ref["stopped"])
    assert [h.get("valid_ndcg@10") for h in fit["history"]] == [h.get("valid_ndcg@10") for h in ref["history"]]
    got, want = load_file(str(out / "model" / "weights.safetensors")), load_file(str(ref_out / "model" / "weights.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert not partial_dir(out).exists() and not (out / "ckpt").exists()  # the finished run keeps no checkpoint
    assert (out / "curves.png").exists()


@pytest.mark.parametrize("model", sorted(TINY))
def test_two_cpu_processes_train_a_model_that_loads_and_evaluates(model: str, cycle_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = {"max_epochs": 4} if model != "itemtoken-lm" else {"epochs": 1}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = run_cli(train_command(model, cycle_dataset, out, **extra), launcher=launcher)
    assert proc.stdout.count("trained ") == 1  # only the main process reports (and writes)
    record = json.loads((out / "run.json").read_text())
    assert record["fit"]["processes"] == 2
    run = load_run(out)
    result = evaluate_run(run, progress=False, write=False)
    assert 0.0 <= result.overall["ndcg@10"] <= 1.0 and result.n_users == 40
    assert (out / "curves.png").exists()

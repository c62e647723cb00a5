"""Hardening, command line: bad arguments are usage errors (exit 2, no traceback), k is capped, a history can
be given by item ids, a closed pipe ends quietly, runs record the source's commit, no warning noise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmrec.cli import main

SASREC = ["--set", "model.params.max_epochs=2", "--set", "model.params.hidden_size=16", "--set", "model.params.n_heads=1"]


@pytest.fixture(scope="module")
def run(cycle_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--model", "sasrec", "--dataset", str(cycle_dataset), "--out", str(out), "--quiet", *SASREC]) == 0
    return out


@pytest.mark.parametrize("args,needle", [
    (["recommend", "{run}", "--user", "u0", "-k", "0"], "must be >= 1"),
    (["recommend", "{run}", "--user", "u0", "-k", "-1"], "must be >= 1"),
    (["recommend", "{run}", "--user", "u0", "-k", "many"], "not an integer"),
    (["recommend", "{run}"], "give --user"),
    (["recommend", "{run}", "--user", "u0", "--history", "item-1"], "not both"),
    (["recommend", "{run}", "--history", "item-1,ghost"], "unknown item id 'ghost'"),
    (["evaluate", "{run}", "--ks", "0"], "must be >= 1"),
    (["evaluate", "{run}", "--ks", "abc"], "not an integer"),
    (["evaluate", "{run}", "--protocol", "sampled", "--negatives", "-3"], "must be >= 1"),
])
def test_bad_arguments_exit_2_with_a_message(run: Path, args: list[str], needle: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.replace("{run}", str(run)) for a in args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_an_eval_cutoff_of_zero_is_refused_before_training(cycle_dataset: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--model", "sasrec", "--dataset", str(cycle_dataset), "--out", str(tmp_path / "r"),
                 "--set", "eval.ks=[0]", "--quiet", *SASREC])
    assert code == 2 and "ks must be cut-offs >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()


def test_k_is_capped_at_the_catalog_and_a_history_can_be_given(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", str(run), "--user", "u0", "-k", "1000000000", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)[0]["recommendations"]
    assert 0 < len(recs) <= 20
    assert main(["recommend", str(run), "--history", "item-3,item-4", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)[0]
    assert out["user_id"] == "(history)" and [h["item_id"] for h in out["history"]] == ["item-3", "item-4"]
    got = [r["item_id"] for r in out["recommendations"]]
    assert len(got) == 3 and not {"item-3", "item-4"} & set(got)


def test_a_closed_pipe_ends_quietly(run: Path) -> None:
    cmd = f"{sys.executable} -m llmrec.cli recommend {run} --user u0 --user u1 --user u2 -k 20 --json | head -c 20"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_run_records_the_source_commit_from_any_working_directory(cycle_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere-run"
    code = subprocess.run([sys.executable, "-m", "llmrec.cli", "train", "--model", "popularity", "--dataset",
                           str(cycle_dataset), "--out", str(out), "--quiet"], cwd=tmp_path, capture_output=True,
                          timeout=120, check=False).returncode
    assert code == 0
    commit = json.loads((out / "run.json").read_text())["git_commit"]
    in_checkout = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                 text=True, check=False).returncode == 0
    assert commit != "unknown" if in_checkout else commit == "unknown"


def test_no_deprecation_noise_from_the_backbone() -> None:
    code = ("import sys; sys.path.insert(0, 'tests'); from test_itemtoken import built; from conftest import cycle_split; "
            "built().generate_lists([cycle_split().test.histories[0]], k=2, mode='beam')")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1], check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "past_key_values" not in proc.stderr

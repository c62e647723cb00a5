"""Hardening, artifact layer: datasets, runs, weights and checkpoints that were edited, damaged or left half
written give a clear error (exit 2) naming the file; writers leave nothing behind and never race."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_cycle_source
from safetensors.numpy import load_file, save_file

from llmrec.cli import main
from llmrec.data.dataset import Dataset
from llmrec.errors import DataError, LlmrecError
from llmrec.fsutil import output_lock, remove_stale_temporaries
from llmrec.runs import load_run

SASREC = ["--set", "model.params.max_epochs=2", "--set", "model.params.hidden_size=16", "--set", "model.params.n_heads=1"]


@pytest.fixture()
def dataset(cycle_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the cycle dataset (tests edit it)."""
    return Path(shutil.copytree(cycle_dataset, tmp_path / "ds"))


@pytest.fixture()
def run(dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    assert main(["train", "--model", "sasrec", "--dataset", str(dataset), "--out", str(out), "--quiet", *SASREC]) == 0
    return out


def test_an_edited_interactions_file_fails_the_fingerprint(dataset: Path) -> None:
    table = pq.read_table(dataset / "interactions.parquet")
    items = table.column("item").to_numpy().copy()
    items[[0, 1]] = items[[1, 0]]  # two items swapped: same shape, other content
    pq.write_table(table.set_column(table.schema.get_field_index("item"), "item", pa.array(items)),
                   dataset / "interactions.parquet")
    with pytest.raises(DataError, match="does not match the fingerprint"):
        Dataset.load(dataset)


@pytest.mark.parametrize("name", ["interactions.parquet", "items.parquet", "manifest.json"])
def test_garbage_dataset_files_are_named(dataset: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    (dataset / name).write_bytes(b"garbage")
    with pytest.raises(DataError, match="damaged dataset directory"):
        Dataset.load(dataset)
    assert main(["data", "stats", str(dataset)]) == 2
    assert "damaged dataset directory" in capsys.readouterr().err


def test_an_edited_run_json_is_refused(run: Path) -> None:
    record = json.loads((run / "run.json").read_text())
    record["config"]["split"]["kind"] = "ratio"
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(LlmrecError, match="edited after training"):
        load_run(run)
    (run / "run.json").write_text("{not json")
    with pytest.raises(LlmrecError, match="damaged run record"):
        load_run(run)


@pytest.mark.parametrize("damage", ["nan", "truncated", "shape", "garbage-json"])
def test_damaged_weights_are_named(run: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    weights = run / "model" / "weights.safetensors"
    if damage == "nan":
        tensors = load_file(str(weights))
        tensors = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in tensors.items()}
        save_file(tensors, str(weights))
        why = "NaN or infinite"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
        why = "damaged or truncated weights"
    elif damage == "shape":
        tensors = load_file(str(weights))
        key = next(k for k in tensors if k.endswith("item_emb.weight"))
        tensors[key] = tensors[key][:-3]
        save_file(tensors, str(weights))
        why = "does not fit the model"
    else:
        (run / "model" / "model.json").write_text("{")
        why = "damaged model record"
    assert main(["evaluate", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err


def test_writing_where_a_file_is_in_the_way(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["train", "--model", "sasrec", "--dataset", str(dataset), "--out", str(blocker / "run"), "--quiet",
                 *SASREC]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    src = write_cycle_source(tmp_path / "src")
    assert main(["data", "prepare", str(src), str(blocker / "ds"), "--quiet"]) == 2


def test_force_onto_a_file_leaves_no_old_file(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "target"
    out.write_text("an old file in the way")
    assert main(["train", "--model", "sasrec", "--dataset", str(dataset), "--out", str(out), "--quiet", "--force",
                 *SASREC]) == 0
    assert (out / "run.json").exists()
    src = write_cycle_source(tmp_path / "src")
    ds_out = tmp_path / "ds-target"
    ds_out.write_text("in the way too")
    assert main(["data", "prepare", str(src), str(ds_out), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_force_keeps_the_old_run_until_the_new_one_is_complete(run: Path, dataset: Path) -> None:
    before = (run / "run.json").read_text()
    code = main(["train", "--model", "sasrec", "--dataset", str(dataset), "--out", str(run), "--quiet", "--force",
                 "--set", "model.params.max_epochs=0"])  # fails before training
    assert code == 2 and (run / "run.json").read_text() == before


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = [tmp_path / f".ds.tmp-{pid}-abc", tmp_path / f".ds.old-{pid}"]
    stale[0].mkdir()
    stale[1].write_text("x")
    live = tmp_path / f".ds.tmp-{os.getpid()}-xyz"
    live.mkdir()
    assert sorted(remove_stale_temporaries(out)) == sorted(stale)
    assert live.exists() and not any(p.exists() for p in stale)
    src = write_cycle_source(tmp_path / "src")
    (tmp_path / f".ds.tmp-{pid}-left").mkdir()
    assert main(["data", "prepare", str(src), str(out), "--quiet"]) == 0
    assert not (tmp_path / f".ds.tmp-{pid}-left").exists()


def test_a_second_writer_of_one_output_fails_clearly(tmp_path: Path, dataset: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with output_lock(out):
        assert main(["train", "--model", "sasrec", "--dataset", str(dataset), "--out", str(out), "--quiet",
                     *SASREC]) == 2
        assert "another llmrec process is writing it" in capsys.readouterr().err
    assert not (tmp_path / ".run.lock").exists()  # released and removed


def test_itemtoken_checkpoint_of_another_split_is_not_resumed(dataset: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from test_itemtoken import TINY

    out = tmp_path / "lm"
    sets = [a for k, v in {**TINY, "epochs": 1, "max_steps": 2}.items() for a in ("--set", f"model.params.{k}={json.dumps(v)}")]
    args = ["train", "--model", "itemtoken-lm", "--dataset", str(dataset), "--out", str(out), "--quiet", *sets]
    partial = tmp_path / ".lm.partial"
    # a finished checkpoint left in the run's folder (as an interrupted save would leave it)
    assert main([*args, "--set", 'split.kind="ratio"']) == 0
    shutil.copytree(out, partial)
    from llmrec.models.train import Checkpoint

    assert not Checkpoint(partial, {}).exists()  # finished runs keep no checkpoint; make one by interrupting
    shutil.rmtree(partial)
    from llmrec.models.itemtoken import ItemTokenLM

    class Stop(Exception):
        pass

    original = ItemTokenLM._after_step
    ItemTokenLM._after_step = lambda self, step: (_ for _ in ()).throw(Stop()) if step == 2 else None  # type: ignore[method-assign]
    try:
        with pytest.raises(Stop):
            main([*args, "--out", str(tmp_path / "lm2"), "--set", "model.params.checkpoint_every=1"])
    finally:
        ItemTokenLM._after_step = original  # type: ignore[method-assign]
    # the same output, another split: the checkpoint is refused instead of resumed
    assert main([*args, "--out", str(tmp_path / "lm2"), "--set", "model.params.checkpoint_every=1",
                 "--set", 'split.kind="ratio"', "--set", "split.valid_frac=0.3", "--set", "split.test_frac=0.3"]) == 2
    assert "other training data" in capsys.readouterr().err

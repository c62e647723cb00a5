"""The CLI end to end on the real Office data: prepare, train, evaluate, recommend, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmrec.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICE = SHARED / "amazon-office-2014"


@pytest.fixture(scope="module")
def office(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "office"
    assert main(["data", "prepare", str(OFFICE), str(out), "--quiet"]) == 0
    return out


def test_train_evaluate_recommend(office: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"knn{seed}"
        code = main(["train", "--model", "itemknn", "--dataset", str(office), "--seed", str(seed),
                     "--set", "model.params.neighbors=50", "--out", str(run), "--quiet"])
        assert code == 0
        record = json.loads((run / "run.json").read_text())
        assert record["seed"] == seed
        assert record["config"]["model"]["params"]["neighbors"] == 50
        assert len(record["dataset"]["fingerprint"]) == 16
        assert record["git_commit"]
        assert (run / "model" / "weights.safetensors").exists()
        runs.append(run)
    capsys.readouterr()
    assert main(["evaluate", *map(str, runs), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "protocol: full" in out and "ndcg@10" in out and "95% confidence interval" in out
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["protocol"] == "full"
    assert 0.02 < metrics["overall"]["ndcg@10"] < 0.2  # ItemKNN on Office: about 0.05
    assert len(metrics["per_user"]["ndcg@10"]) == metrics["n_users"] == 4905

    assert main(["evaluate", str(runs[0]), "--protocol", "sampled", "--negatives", "50", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sampled-uniform-50" in out
    sampled = json.loads((runs[0] / "metrics.sampled-uniform-50.json").read_text())
    assert sampled["protocol"] == "sampled-uniform-50"
    assert json.loads((runs[0] / "metrics.json").read_text())["protocol"] == "full"  # never overwritten
    assert sampled["overall"]["ndcg@10"] > metrics["overall"]["ndcg@10"]  # easier than full ranking

    assert main(["recommend", str(runs[0]), "--user", "office-user-0", "-k", "5", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs[0]["recommendations"]) == 5
    assert all(r["title"] for r in recs[0]["recommendations"])


def test_train_refuses_to_overwrite(office: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "pop"
    args = ["train", "--model", "popularity", "--dataset", str(office), "--out", str(run), "--quiet"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "nope", "--dataset", "x", "--out", "r"], "unknown model 'nope'"),
        (["train", "--model", "popularity", "--dataset", "/nonexistent/ds", "--out", "r"], "/nonexistent/ds"),
        (["train", "--model", "itemknn", "--dataset", "x", "--set", "model.params.k=3", "--out", "r"], None),
        (["evaluate", "/nonexistent/run"], "not a run directory"),
        (["data", "stats", "/nonexistent/ds"], "/nonexistent/ds"),
        (["data", "download", "Not_A_Category", "--out", "dl"], "Not_A_Category"),
    ],
)
def test_user_errors_exit_2_with_a_message(
    args: list[str], message: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], office: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [str(office) if a == "x" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmrec: error: ")
    if message:
        assert message in err
    assert not (tmp_path / "r").exists()


def test_unknown_model_param_names_the_key(office: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--model", "itemknn", "--dataset", str(office), "--set", "model.params.neighbours=3",
                 "--out", str(tmp_path / "r")])
    assert code == 2
    assert "model.params.neighbours" in capsys.readouterr().err


def test_demo_prints_table_and_titles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--data", str(OFFICE), "--workdir", str(tmp_path), "--models", "popularity,itemknn",
                 "--users", "2", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| itemknn |" in out and "| popularity |" in out
    assert "full ranking over all 2420 items" in out
    assert out.count("recommended:") == 2
    # the shown model is picked on validation NDCG@10 (ItemKNN beats popularity there by far)
    assert "from itemknn (best validation NDCG@10" in out
    metrics = json.loads((tmp_path / "runs" / "amazon-office-2014-itemknn-seed0" / "metrics.json").read_text())
    assert metrics["extra"]["on"] == "test"  # the validation pass did not overwrite the test metrics

"""The mixture of trained models, its weights chosen on validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import N_ITEMS
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmrec.config import ConfigError
from llmrec.models.mixture import Mixture, normalise_rows
from llmrec.models.registry import build_model

KNN = {"name": "itemknn", "params": {"neighbors": 10, "window": 1, "transition_weight": 1.0}}
rows = arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 12)),
              elements=st.floats(-50, 50, allow_nan=False, allow_infinity=False))


@settings(max_examples=40, deadline=None)
@given(rows)
def test_normalised_rows_keep_each_rows_order(x: np.ndarray) -> None:
    for how in ("zscore", "rank"):
        z = normalise_rows(x, how).astype(np.float64)
        for r in range(len(x)):
            i, j = np.triu_indices(x.shape[1], 1)
            higher = x[r, i] > x[r, j] + 1e-9
            assert np.all(z[r, i][higher] >= z[r, j][higher] - 1e-6)
    z = normalise_rows(x, "zscore").astype(np.float64)
    spread = x.std(axis=1) > 1e-6
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[spread].std(axis=1), 1.0, atol=1e-3)


def test_minus_infinity_becomes_the_row_minimum() -> None:
    z = normalise_rows(np.array([[1.0, -np.inf, 3.0, np.nan]]), "rank")
    assert np.isfinite(z).all() and z[0, 2] > z[0, 0] >= z[0, 1]


def test_a_useless_member_gets_weight_zero_and_the_mixture_round_trips(make_cycle_split, tmp_path: Path) -> None:
    split = make_cycle_split()
    model = build_model("mixture", {"members": [KNN, {"name": "popularity"}]}, N_ITEMS)
    info = model.fit(split, progress=False)
    knn_alone = info["valid_ndcg@10_by_weight"][0]["0.0"]
    assert info["best_valid_ndcg@10"] >= knn_alone  # never worse than the first member on validation
    assert model.weights[0] == 1.0 and model.weights[1] in model.config.weight_grid
    model.save(tmp_path / "m")
    again = Mixture.load(tmp_path / "m")
    hist = split.test.histories[:7]
    np.testing.assert_allclose(again.score(hist), model.score(hist), rtol=1e-6)
    assert again.weights == model.weights


def test_two_members_that_agree_mix_to_the_same_ranking(make_cycle_split) -> None:
    split = make_cycle_split()
    model = build_model("mixture", {"members": [KNN, KNN], "weight_grid": [1.0]}, N_ITEMS)
    model.fit(split, progress=False)
    single = build_model("itemknn", KNN["params"], N_ITEMS)
    single.fit(split, progress=False)
    hist = split.test.histories[:9]
    assert np.array_equal(model.recommend(hist, k=5)[0], single.recommend(hist, k=5)[0])


def test_bad_members_are_errors_that_name_them() -> None:
    with pytest.raises(ConfigError, match=r"members\[1\]\.params\.neighbours"):
        build_model("mixture", {"members": [KNN, {"name": "itemknn", "params": {"neighbours": 3}}]}, N_ITEMS)
    with pytest.raises(ValueError, match=r"members\[0\]: a mixture cannot contain a mixture"):
        build_model("mixture", {"members": [{"name": "mixture"}]}, N_ITEMS)
    with pytest.raises(ConfigError, match="unknown model 'knn'"):
        build_model("mixture", {"members": [{"name": "knn"}]}, N_ITEMS)


def test_trained_runs_join_a_mixture_without_refitting(served_runs, make_cycle_split, tmp_path: Path) -> None:
    from llmrec.runs import load_run

    sas, knn = load_run(served_runs["sasrec"]), load_run(served_runs["itemknn"])
    members = [{"run": str(served_runs["sasrec"])}, {"name": "itemknn", "run": str(served_runs["itemknn"])}]
    model = build_model("mixture", {"members": members, "weight_grid": [0.0, 1.0]}, sas.model.n_items)
    info = model.fit(sas.split, progress=False)
    assert info["member_fits"][0] == {"run": str(served_runs["sasrec"])}
    hist = sas.split.test.histories[:6]
    np.testing.assert_array_equal(model.members[0].score(hist), sas.model.score(hist))  # the run's weights
    np.testing.assert_array_equal(model.members[1].score(hist), knn.model.score(hist))
    model.save(tmp_path / "m")
    again = Mixture.load(tmp_path / "m")
    np.testing.assert_allclose(again.score(hist), model.score(hist), rtol=1e-6)

    other = make_cycle_split(seed=5)  # another split of as many items
    with pytest.raises(ValueError, match=r"members\[0\]\.run: .* another dataset or split"):
        build_model("mixture", {"members": members}, sas.model.n_items).fit(other, progress=False)


def test_bad_run_members_are_errors_that_name_them(served_runs, tmp_path: Path) -> None:
    run = str(served_runs["sasrec"])
    with pytest.raises(ConfigError, match=r"members\[0\]\.run: .* holds a 'sasrec' model, not 'itemknn'"):
        build_model("mixture", {"members": [{"name": "itemknn", "run": run}]}, N_ITEMS)
    with pytest.raises(ConfigError, match=r"members\[1\]\.run: .* is not a trained run"):
        build_model("mixture", {"members": [KNN, {"run": str(tmp_path)}]}, N_ITEMS)
    with pytest.raises(ValueError, match=r"members\[0\]: give params .* or run .*, not both"):
        build_model("mixture", {"members": [{"run": run, "params": {"neighbors": 3}}]}, N_ITEMS)
    with pytest.raises(ValueError, match=r"members\[0\]: needs name"):
        build_model("mixture", {"members": [{}]}, N_ITEMS)


def test_the_cli_trains_and_evaluates_a_mixture_of_trained_runs(served_runs, cycle_dataset: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from llmrec.cli import main

    config = tmp_path / "mix.toml"
    config.write_text(f'dataset = "{cycle_dataset}"\n[model]\nname = "mixture"\n'
                      f'[[model.params.members]]\nrun = "{served_runs["sasrec"]}"\n'
                      f'[[model.params.members]]\nrun = "{served_runs["popularity"]}"\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["overall"]["ndcg@10"] <= 1.0

    from llmrec.runs import load_run

    mixed = load_run(tmp_path / "run")  # member 0 of that trained mixture, beside a model fitted here
    pick = build_model("mixture", {"members": [{"run": str(tmp_path / "run"), "member": 0}, KNN]}, mixed.model.n_items)
    assert pick.members[0].name == "sasrec"
    pick.fit(mixed.split, progress=False)
    hist = mixed.split.test.histories[:5]
    np.testing.assert_array_equal(pick.members[0].score(hist), load_run(served_runs["sasrec"]).model.score(hist))
    with pytest.raises(ConfigError, match=r"members\[0\]\.run: .* holds a 'sasrec' model, which has no member 1"):
        build_model("mixture", {"members": [{"run": str(served_runs["sasrec"]), "member": 1}]}, N_ITEMS)
    with pytest.raises(ValueError, match=r"members\[0\]: member = 0 picks a member of a trained run; give run"):
        build_model("mixture", {"members": [{"name": "itemknn", "member": 0}]}, N_ITEMS)

    config.write_text(config.read_text().replace(str(served_runs["popularity"]), str(tmp_path / "missing")))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "members[1].run" in capsys.readouterr().err and not (tmp_path / "bad").exists()

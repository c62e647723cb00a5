"""Typed configs: unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrec.config import ConfigError, apply_overrides, from_dict, parse_override
from llmrec.models.itemknn import ItemKNNConfig
from llmrec.runs import RunConfig, load_run_config


def test_run_config_from_toml_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('dataset = "data/x"\nseed = 3\n[model]\nname = "itemknn"\n[model.params]\nneighbors = 50\n'
                 "[eval]\nks = [5, 10]\n")
    cfg = load_run_config(f, ["model.params.window=2", "split.kind=ratio", "eval.on=valid"])
    assert cfg.seed == 3 and cfg.model.name == "itemknn"
    assert cfg.model.params == {"neighbors": 50, "window": 2}
    assert cfg.split.kind == "ratio" and cfg.eval.ks == [5, 10] and cfg.eval.on == "valid"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('dataset = "x"\nsede = 1\n', "unknown key sede"),
        ('dataset = "x"\n[split]\nkind = "random"\n', "split.kind"),
        ('dataset = "x"\nseed = "one"\n', "seed: expected an integer"),
        ('dataset = "x"\n[eval]\nks = [5, "ten"]\n', r"eval.ks\[1\]"),
        ('dataset = "x"\n[model]\nname = "nope"\n', "unknown model 'nope'"),
        ("seed = 1\n", "missing key dataset"),
        ('dataset = "x"\n[eval\n', "run.toml"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "run.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(f)


def test_model_params_are_strict() -> None:
    with pytest.raises(ConfigError, match="unknown key model.params.neighbours"):
        from_dict(ItemKNNConfig, {"neighbours": 3}, prefix="model.params.")
    with pytest.raises(ConfigError, match="transition_weight"):
        from_dict(ItemKNNConfig, {"transition_weight": 2.0})
    assert from_dict(ItemKNNConfig, {"shrink": 1}).shrink == 1.0  # int accepted where float expected


def test_overrides_parse_toml_values() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("name=sasrec") == (["name"], "sasrec")  # bare word -> string
    assert parse_override('name="a=b"') == (["name"], "a=b")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=true"]) == {"a": {"b": 1, "c": True}}
    for bad in ["novalue", "=3", "a..b=1"]:
        with pytest.raises(ConfigError):
            parse_override(bad)
    with pytest.raises(ConfigError, match="not a table"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_booleans_are_not_numbers() -> None:
    with pytest.raises(ConfigError, match="seed"):
        from_dict(RunConfig, {"dataset": "x", "seed": True})

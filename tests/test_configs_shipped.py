"""Every config file shipped in configs/ parses strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrec.runs import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.dataset
    from llmrec.models.registry import build_model

    build_model(cfg.model.name, cfg.model.params, n_items=10)  # model params are valid too


def test_there_are_configs() -> None:
    assert CONFIGS

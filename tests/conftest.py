"""Shared test fixtures: the tiny "cycle" splits that every model test trains on.

Users walk deterministic cycles over a small catalog (item i is always followed by item i+1 mod
N), so a trained sequential model must predict the next item of the cycle.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrec.data.dataset import Catalog
from llmrec.data.splits import Split, leave_one_out

N_ITEMS = 20


def cycle_sequences(n_users: int = 40, seed: int = 0, n_items: int = N_ITEMS,
                    lengths: tuple[int, int] = (6, 14)) -> list[np.ndarray]:
    """``n_users`` walks of the cycle 0 -> 1 -> ... -> n_items-1 -> 0, each from a random start, of a
    random length in ``[lengths[0], lengths[1])`` (two draws per user, start first)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, length = int(rng.integers(n_items)), int(rng.integers(*lengths))
        seqs.append((start + np.arange(length)) % n_items)
    return seqs


def cycle_catalog(n_items: int = N_ITEMS) -> Catalog:
    """Text for text-aware models: item i is 'Product i', in one of four categories."""
    return Catalog(
        item_ids=[f"item-{i}" for i in range(n_items)],
        titles=[f"Product {i}" for i in range(n_items)],
        brands=[None] * n_items,
        categories=[[f"Category {i % 4}"] for i in range(n_items)],
        descriptions=[None] * n_items,
    )


def cycle_split(n_users: int = 40, seed: int = 0, n_items: int = N_ITEMS, lengths: tuple[int, int] = (6, 14),
                catalog: bool = True) -> Split:
    """Leave-one-out split of :func:`cycle_sequences`, with the catalog of :func:`cycle_catalog`."""
    split = leave_one_out(cycle_sequences(n_users, seed, n_items, lengths), n_items)
    return split.with_catalog(cycle_catalog(n_items)) if catalog else split


@pytest.fixture(scope="session")
def make_cycle_split() -> Callable[..., Split]:
    """The :func:`cycle_split` factory (tests that need other sizes, seeds or no catalog)."""
    return cycle_split


@pytest.fixture(scope="module")
def split() -> Split:
    """The default tiny split: 40 users, 20 items, with titles."""
    return cycle_split()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread avoids spin-waiting on a busy machine (10x faster there)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_cycle_source(folder: Path, n_users: int = 40, seed: int = 0, n_items: int = N_ITEMS) -> Path:
    """The full cycle sequences (train + validation + test items) as a sequence-format source folder
    (``sequences.jsonl.gz`` + ``items.jsonl.gz``) for ``llmrec data prepare``."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "sequences.jsonl.gz", "wt") as f:
        for u, s in enumerate(cycle_sequences(n_users, seed, n_items)):
            f.write(json.dumps({"user_id": f"u{u}", "item_ids": [f"item-{i}" for i in s]}) + "\n")
    with gzip.open(folder / "items.jsonl.gz", "wt") as f:
        for i in range(n_items):
            f.write(json.dumps({"item_id": f"item-{i}", "title": f"Product {i}", "categories": [f"C{i % 4}"]}) + "\n")
    return folder


@pytest.fixture(scope="session")
def cycle_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset directory of the cycle sequences (40 users, 20 items, titles)."""
    from llmrec.cli import main

    root = tmp_path_factory.mktemp("cycle")
    out = root / "ds"
    assert main(["data", "prepare", str(write_cycle_source(root / "src")), str(out), "--quiet"]) == 0
    return out


SERVED_MODELS: dict[str, dict[str, object]] = {
    "popularity": {},
    "itemknn": {"neighbors": 10},
    "sasrec": {"hidden_size": 16, "n_heads": 1, "n_layers": 1, "inner_size": 32, "max_len": 12, "max_epochs": 30,
               "num_threads": 1},
    "semantic-id": {"embedder": "hash", "rq_levels": 2, "rq_codebook_size": 8, "rq_latent_dim": 8, "rq_hidden": 16,
                    "rq_steps": 50, "d_model": 16, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ff_size": 32,
                    "max_len": 12, "max_epochs": 20, "beam_size": 10, "num_threads": 1},
}


@pytest.fixture(scope="session")
def served_runs(cycle_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained and evaluated runs of :data:`SERVED_MODELS` on the cycle dataset (for the service tests)."""
    from llmrec.config import from_dict
    from llmrec.runs import ModelSection, RunConfig, evaluate_run, load_run, train

    root = tmp_path_factory.mktemp("served")
    runs = {}
    for name, params in SERVED_MODELS.items():
        cfg = from_dict(RunConfig, {"dataset": str(cycle_dataset), "seed": 0})
        cfg.model = ModelSection(name=name, params=dict(params))
        train(cfg, root / name, progress=False)
        evaluate_run(load_run(root / name), progress=False)
        runs[name] = root / name
    return runs

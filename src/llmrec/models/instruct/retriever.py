"""The first stage of ``rerank`` mode: a retriever fitted on the same training split, saved inside the model.

``retriever`` names it: ``"sasrec"`` (the LLM families' SASRec companion, :func:`~llmrec.models.collab.fit_companion`,
cached per split), ``"itemknn"`` (fitted here), or a run directory of ``llmrec train`` whose split
must be this very split (its training sequences and validation set, compared by digest), so the
retriever has seen nothing the re-ranker may not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.data.splits import Split, split_digest
from llmrec.models.base import Recommender

PREFIX = "retriever."


def get_retriever(split: Split, spec: str, keys: Any, seed: int, progress: bool = False) -> tuple[Recommender, dict[str, Any]]:
    """(a retriever fitted on ``split.train`` only, facts about it) for ``spec`` (see the module docstring)."""
    if spec == "sasrec":
        from llmrec.models.collab import fit_companion

        model, info = fit_companion(split, keys, seed, progress)
        return model, {"retriever": "sasrec", **info}
    if spec == "itemknn":
        from llmrec.models.itemknn import ItemKNN

        knn = ItemKNN(ItemKNN.Config(), split.n_items)
        knn.fit(split, progress=progress)
        return knn, {"retriever": "itemknn"}
    path = Path(spec)
    if not (path / "run.json").exists():
        raise ValueError(f"retriever {spec!r}: expected 'sasrec', 'itemknn' or a run directory (no run.json there)")
    from llmrec.runs import load_run

    run = load_run(path)
    if run.model.n_items != split.n_items or split_digest(run.split) != split_digest(split):
        raise ValueError(f"retriever {spec}: that run was trained on another split than this model's "
                         "(its training sequences or validation set differ)")
    return run.model, {"retriever": str(path), "model": run.config.model.name}


def pack_retriever(model: Recommender) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The retriever's weights (``retriever.*`` tensors) and its name and config (an ``extra`` entry)."""
    tensors, extra = model._state()
    entry = {"name": model.name, "config": dataclasses.asdict(model.config), "extra": json.loads(json.dumps(extra))}
    return {f"{PREFIX}{k}": np.asarray(v) for k, v in tensors.items()}, entry


def unpack_retriever(tensors: dict[str, np.ndarray], entry: dict[str, Any], n_items: int) -> Recommender:
    """The retriever :func:`pack_retriever` stored (its class looked up in the registry)."""
    from llmrec.config import from_dict
    from llmrec.models.registry import model_class

    cls = model_class(entry["name"])
    model = cls(from_dict(cls.Config, entry["config"]), n_items)
    model._load_state({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}, entry["extra"])
    return model

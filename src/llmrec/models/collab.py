"""Collaborative item vectors: the item embeddings of a SASRec fitted on a split's training sequences.

Other model families start from them where text alone lacks co-purchase signal (the hybrid item
representations of LLaRA / E4SRec / ETEGRec / LETTER): the item-token LM initializes the low-rank
part of its item rows with them, the semantic-ID model can quantize text and collaborative vectors
together. SASRec reads ``split.train`` and early-stops on ``split.valid``; ``split.test`` is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.data.splits import Split, hash_split_into
from llmrec.models.sasrec import SASRec, SASRecConfig


def default_cache_dir() -> Path:
    """``$LLMREC_CACHE/collab`` (default ``~/.cache/llmrec/collab``)."""
    from llmrec.models.semantic_ids.embed import cache_root

    return cache_root() / "collab"


def split_key(split: Split, config: SASRecConfig) -> str:
    """sha256 of everything SASRec's fit reads: the config, the training sequences and the
    validation histories and targets (never the test set)."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    hash_split_into(h, split)
    return h.hexdigest()


def fit_sasrec(split: Split, config: SASRecConfig | None = None, progress: bool = False,
               cache_dir: Path | None = None) -> tuple[SASRec, dict[str, Any]]:
    """A SASRec fitted on ``split`` (early stopping on ``split.valid``) and
    ``{"seconds", "best_valid_ndcg@10", "best_epoch", "stopped", "cached"}``.

    With ``cache_dir`` the fitted weights are stored there under :func:`split_key` (written to a
    temporary file, then renamed) and a later call on the same split and config loads them
    (``cached`` True; ``seconds`` stays the original fit's time, so budgets can count it).
    """
    cfg = config or SASRecConfig()
    path = cache_dir / f"sasrec-{split_key(split, cfg)[:32]}.npz" if cache_dir is not None else None
    model = SASRec(cfg, split.n_items)
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                info = json.loads(str(z["__info__"]))
                model._load_state({k: z[k] for k in z.files if k != "__info__"}, {})
            return model, {**info, "cached": True}
        except (OSError, ValueError, KeyError, RuntimeError):  # damaged or foreign: fit again, overwrite
            model = SASRec(cfg, split.n_items)
    t0 = time.perf_counter()
    fit = model.fit(split, progress=progress)
    info = {"seconds": time.perf_counter() - t0, "best_valid_ndcg@10": float(fit["best_valid_ndcg@10"]),
            "best_epoch": int(fit["best_epoch"]), "stopped": str(fit["stopped"])}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors, _ = model._state()
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, __info__=np.array(json.dumps(info)), **tensors)
            os.replace(tmp, path)
        except OSError:  # a read-only cache must not stop training
            pass
    return model, {**info, "cached": False}


def sasrec_item_vectors(split: Split, config: SASRecConfig | None = None, progress: bool = False,
                        cache_dir: Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(n_items, hidden_size) float32 item vectors (dataset item ids) of :func:`fit_sasrec`, and its info."""
    model, info = fit_sasrec(split, config, progress, cache_dir)
    return model.item_vectors(), info


def fit_width(vectors: np.ndarray, width: int) -> np.ndarray:
    """(N, d) -> (N, width): centred, then the top-``width`` principal components when d > width,
    zero columns appended when d < width. Dot products between centred rows are kept exactly when
    d <= width and as well as a rank-``width`` approximation allows otherwise."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or width < 1:
        raise ValueError(f"expected an (N, d) array and width >= 1, got shape {x.shape} and width {width}")
    x = x - x.mean(axis=0, keepdims=True)
    n, d = x.shape
    if d > width:
        _, _, vt = np.linalg.svd(x, full_matrices=False)  # vt: (min(n, d), d)
        x = x @ vt[:width].T  # (N, min(width, n))
        d = x.shape[1]
    if d < width:
        x = np.concatenate([x, np.zeros((n, width - d))], axis=1)
    return x.astype(np.float32)


def unit_rms_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled so that their mean Euclidean norm is 1 (relative sizes kept; all-zero stays zero)."""
    x = np.asarray(vectors, dtype=np.float32)
    mean = float(np.linalg.norm(x, axis=1).mean()) if len(x) else 0.0
    return x / mean if mean > 0 else x


def prefix_states(model: SASRec, sequences: Sequence[np.ndarray], last: int | Sequence[int]) -> list[np.ndarray]:
    """For each sequence (dataset item ids) the (m, hidden_size) float32 SASRec states of its last
    ``m = min(last, len)`` prefixes (``last``: one count for all, or one per sequence), oldest
    first: row j is the state of the sequence up to and including its ``len - m + j``-th item,
    computed on that prefix alone (SASRec's positions count from the newest item, so a longer
    input would shift them): no row sees a later item."""
    counts = [int(last)] * len(sequences) if isinstance(last, (int, np.integer)) else [int(x) for x in last]
    if len(counts) != len(sequences):
        raise ValueError(f"{len(counts)} prefix counts for {len(sequences)} sequences")
    prefixes, sizes = [], []
    for s, c in zip(sequences, counts, strict=True):
        a = np.asarray(s, dtype=np.int64)
        m = max(0, min(c, len(a)))
        prefixes.extend(a[: len(a) - m + j + 1] for j in range(m))
        sizes.append(m)
    d = model.config.hidden_size
    flat = model.user_states(prefixes) if prefixes else np.zeros((0, d), np.float32)
    out, start = [], 0
    for m in sizes:
        out.append(flat[start : start + m])
        start += m
    return out


def state_scale(model: SASRec, train: Sequence[np.ndarray]) -> float:
    """1 / the mean norm of SASRec's states of the non-empty training sequences (1.0 if there are
    none): states times this have mean norm 1, whatever scale SASRec's training gave them."""
    seqs = [s for s in train if len(s)]
    if not seqs:
        return 1.0
    return float(1.0 / max(float(np.linalg.norm(model.user_states(seqs), axis=1).mean()), 1e-8))


def pack_frozen(model: SASRec, scale: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A frozen SASRec (and its state scale) as ``collab.*`` tensors and an ``extra`` entry, so that
    it travels inside the saved files of the model that reads its states (see :func:`unpack_frozen`)."""
    tensors, _ = model._state()
    entry = {"sasrec_config": dataclasses.asdict(model.config), "state_scale": float(scale)}
    return {f"collab.{k}": v for k, v in tensors.items()}, entry


def unpack_frozen(tensors: dict[str, np.ndarray], extra: dict[str, Any], n_items: int,
                  owner: str) -> tuple[SASRec, float]:
    """The SASRec and state scale that :func:`pack_frozen` stored in ``tensors`` (its ``collab.*``
    entries) and ``extra["collab_state"]``; ``owner`` names the model in the error when they are missing."""
    from llmrec.config import from_dict

    if "collab_state" not in extra:
        raise ValueError(f"{owner}: its config reads SASRec states but the saved model has no SASRec")
    entry = extra["collab_state"]
    model = SASRec(from_dict(SASRecConfig, entry["sasrec_config"]), n_items)
    model._load_state({k[len("collab."):]: v for k, v in tensors.items() if k.startswith("collab.")}, {})
    return model, float(entry["state_scale"])


def choose_weight(weights: Sequence[float], ndcg_at: Callable[[float], float]) -> tuple[list[float], list[float], float]:
    """Pick a SASRec prior weight on validation: the distinct ``weights`` in ascending order (all >= 0, at
    least one), ``ndcg_at(w)`` (validation NDCG@10 at weight w) of each, and the chosen weight, the first
    maximum (so the smallest weight among ties)."""
    ws = sorted({float(w) for w in weights})
    if not ws or any(w < 0 for w in ws):
        raise ValueError(f"prior weights must be >= 0 and not empty, got {list(weights)}")
    scores = [float(ndcg_at(w)) for w in ws]
    return ws, scores, ws[int(np.argmax(scores))]

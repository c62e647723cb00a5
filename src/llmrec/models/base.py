"""The one interface every recommender implements, and shared top-K selection.

Id spaces: items are the dataset's integer ids ``0..n_items-1``; a history is a 1-D int64 array
of item ids in chronological order. Score matrices are always ``(n_histories, n_items)`` float32,
users in rows, items in columns (the orientation never changes).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from llmrec.data.splits import PAD_ITEM, Feedback, Split
from llmrec.fsutil import atomic_path, atomic_write_text
from llmrec.models.train.progress import batch_starts


def top_k(
    scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items per row of ``scores`` (n, n_items), best first.

    ``exclude[i]`` lists item ids removed from row ``i``. Ties are broken by the lower item id,
    so the result does not depend on batching. Rows with fewer than ``k`` rankable items are
    padded with item ``PAD_ITEM`` (-1) and score ``-inf``. Returns ``(ids int64, scores float32)``.
    """
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    scores = np.array(scores, dtype=np.float32, copy=True)
    n, n_items = scores.shape
    if exclude is not None:
        for i, items in enumerate(exclude):
            items = np.asarray(items, dtype=np.int64)
            items = items[(items >= 0) & (items < n_items)]
            scores[i, items] = -np.inf
    scores[np.isnan(scores)] = -np.inf
    k_eff = min(k, n_items)
    if k_eff < n_items:
        part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        # argpartition is unstable on ties at the boundary: take every item that ties the k-th score.
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
        cand_mask = scores >= kth
        ids = np.full((n, k), PAD_ITEM, dtype=np.int64)
        out = np.full((n, k), -np.inf, dtype=np.float32)
        for i in range(n):
            cand = np.flatnonzero(cand_mask[i])
            order = np.lexsort((cand, -scores[i, cand]))[:k_eff]
            ids[i, :k_eff] = cand[order]
            out[i, :k_eff] = scores[i, cand[order]]
    else:
        order = np.lexsort((np.broadcast_to(np.arange(n_items), scores.shape), -scores), axis=1)
        ids = np.full((n, k), PAD_ITEM, dtype=np.int64)
        out = np.full((n, k), -np.inf, dtype=np.float32)
        ids[:, :k_eff] = order[:, :k_eff]
        out[:, :k_eff] = np.take_along_axis(scores, order[:, :k_eff], axis=1)
    ids[out == -np.inf] = PAD_ITEM
    return ids, out


def left_pad(seqs: Sequence[np.ndarray], width: int, fill: int = PAD_ITEM) -> np.ndarray:
    """(n, width) int64: the last ``width`` entries of each sequence, right-aligned, ``fill`` before."""
    out = np.full((len(seqs), width), fill, dtype=np.int64)
    if width <= 0:
        return out
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-width:]
        if len(s):
            out[i, width - len(s) :] = s
    return out


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row-index batches of similar length (less padding), in random order.

    Rows are sorted by length with random tie-breaking, cut into ``batch_size`` chunks, and the
    chunk order is shuffled (two draws from ``rng``).
    """
    order = np.lexsort((rng.random(len(lengths)), lengths))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


class Recommender(ABC):
    """Base class of every model: ``fit``, ``score``, ``recommend``, ``save``, ``load``.

    Subclasses set ``name`` (registry key) and ``Config`` (a dataclass) and implement
    ``fit``, ``score``, ``_state`` / ``_load_state``. Weights are stored as safetensors,
    everything else as JSON; never pickle.
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any, n_items: int) -> None:
        self.config = config
        self.n_items = int(n_items)
        self.feedback: Feedback | None = None  # ratings/reviews by user, for models that read them

    @property
    def wants_feedback(self) -> bool:
        """True if this model reads users' ratings and reviews (``Split.feedback``, ``users=``)."""
        return False

    @abstractmethod
    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Train on ``split.train`` (``split.valid`` may be used for early stopping, never ``test``).

        ``workdir``: the folder of the run being trained; trained models keep their checkpoints
        (and resume from them), training curves and TensorBoard events there.
        Returns a dict of training facts (epochs, best validation metric, ...).
        """

    @abstractmethod
    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32 scores; higher is better. Seen items are *not* masked here.

        ``users`` (n,) optional user ids of the histories; only models that read feedback use them.
        """

    def recommend(
        self, histories: Sequence[np.ndarray], k: int = 10, exclude_seen: bool = True, batch_size: int = 256,
        users: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids, scores), each (n, k); history items are excluded unless told otherwise."""
        ids, scores = [], []
        for start in batch_starts(len(histories), batch_size):
            batch = [np.asarray(h, dtype=np.int64) for h in histories[start : start + batch_size]]
            s = self.score(batch, None if users is None else users[start : start + batch_size])
            i, v = top_k(s, k, batch if exclude_seen else None)
            ids.append(i)
            scores.append(v)
        if not ids:
            return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
        return np.concatenate(ids), np.concatenate(scores)

    # --- persistence -------------------------------------------------------------------
    @abstractmethod
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(tensors, json-able extra state) to persist."""

    @abstractmethod
    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        """Restore from what ``_state`` returned."""

    def save(self, path: str | Path) -> None:
        """Write ``model.json`` and ``weights.safetensors`` into directory ``path``."""
        from dataclasses import asdict

        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, extra = self._state()
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        with atomic_path(path / "weights.safetensors") as tmp:
            save_file(tensors, str(tmp))
        meta = {"model": self.name, "n_items": self.n_items, "config": asdict(self.config), "extra": extra}
        atomic_write_text(path / "model.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Load a model saved by :meth:`save` (the class must match ``model.json``)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from llmrec.config import from_dict

        path = Path(path)
        meta_file, weights = path / "model.json", path / "weights.safetensors"
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file}: no saved model here")
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as e:
            raise ValueError(f"{meta_file}: damaged model record ({e})") from None
        if meta.get("model") != cls.name:
            raise ValueError(f"{meta_file}: holds a {meta.get('model')!r} model, not {cls.name!r}")
        model = cls(from_dict(cls.Config, meta["config"], where=str(meta_file)), meta["n_items"])
        try:
            tensors = load_file(str(weights))
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{weights}: damaged or truncated weights ({e})") from None
        bad = [k for k, v in tensors.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            raise ValueError(f"{weights}: tensor {bad[0]!r} holds NaN or infinite values (a diverged or damaged model)")
        try:
            model._load_state(tensors, meta["extra"])
        except (RuntimeError, KeyError, ValueError) as e:  # shapes or names that do not fit the config
            raise ValueError(f"{weights}: does not fit the model in {meta_file.name} ({str(e).splitlines()[0][:300]})") from None
        return model


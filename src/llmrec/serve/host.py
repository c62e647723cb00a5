"""What the service serves: the loaded runs (one :class:`ServedModel` each, with its micro-batcher) and the
catalog and users of the dataset they were trained on (:class:`Shop`).

Id spaces: the API speaks the dataset's raw item and user ids; inside, items are the dataset's integer
ids ``0..n_items-1`` as everywhere in llmrec.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.data.dataset import Dataset
from llmrec.errors import LlmrecError
from llmrec.models.base import Recommender
from llmrec.runs import LoadedRun, load_run
from llmrec.serve.batching import MicroBatcher
from llmrec.serve.settings import ServeSettings

_WORD = re.compile(r"[a-z0-9]+")


class Shop:
    """The catalog (titles, brands, categories, popularity) and the users of one dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        cat = dataset.catalog()
        self.item_ids = cat.item_ids
        self.titles, self.brands = cat.titles, cat.brands
        self.categories = [list(c or []) for c in cat.categories]
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        counts = np.bincount(np.concatenate([*dataset.sequences, np.empty(0, np.int64)]), minlength=len(self.item_ids))
        self.popularity = counts.astype(np.int64)  # interactions per item in the whole dataset
        self._words = [set(_WORD.findall(f"{t} {b or ''}".lower())) for t, b in zip(self.titles, self.brands, strict=True)]
        self._lower = [t.lower() for t in self.titles]
        self._users = {u: i for i, u in enumerate(dataset.user_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, item_id: str) -> int | None:
        return self.index.get(item_id)

    def user_index(self, user_id: str) -> int | None:
        return self._users.get(user_id)

    def item(self, i: int) -> dict[str, Any]:
        return {"item_id": self.item_ids[i], "title": self.titles[i], "brand": self.brands[i],
                "categories": self.categories[i], "popularity": int(self.popularity[i])}

    def search(self, query: str, limit: int) -> list[int]:
        """Items whose title (or brand) holds every word of ``query`` (or the query as a substring), the
        most popular first; an empty query lists the most popular items."""
        q = query.lower().strip()
        if not q:
            return [int(i) for i in np.argsort(-self.popularity, kind="stable")[:limit]]
        words = set(_WORD.findall(q))
        hits = [i for i in range(self.n_items) if (words and words <= self._words[i]) or q in self._lower[i]]
        hits.sort(key=lambda i: (-int(self.popularity[i]), i))
        return hits[:limit]

    def in_category(self, i: int, category: str) -> bool:
        c = category.lower()
        return any(c == x.lower() for x in self.categories[i])


@dataclass
class RecRequest:
    """One recommendation request as a model sees it: a history of item ids, the user's id if known,
    how many items to return before filtering."""

    history: np.ndarray
    user: int | None
    fetch: int


@dataclass
class ServedModel:
    """A loaded run: its model, its offline test metrics and its micro-batcher."""

    label: str
    run: LoadedRun
    metrics: dict[str, Any] | None
    batcher: MicroBatcher[RecRequest, tuple[np.ndarray, np.ndarray]] = field(init=False)
    _vectors: np.ndarray | None = field(init=False, default=None)

    @property
    def model(self) -> Recommender:
        return self.run.model

    def score_batch(self, requests: Sequence[RecRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-``fetch`` (ids, scores) of each request (history items excluded), one ``recommend`` call per
        group of requests with and without a known user."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(requests)
        k = min(self.model.n_items, max(r.fetch for r in requests))
        for known in (True, False):
            rows = [i for i, r in enumerate(requests) if (r.user is not None) == known]
            if not rows:
                continue
            users = np.array([requests[i].user for i in rows], dtype=np.int64) if known else None
            ids, scores = self.model.recommend([requests[i].history for i in rows], k=k, users=users)
            for j, i in enumerate(rows):
                out[i] = (ids[j], scores[j])
        return out  # type: ignore[return-value]

    def item_vectors(self) -> np.ndarray | None:
        """(n_items, d) unit-norm item vectors of the model (or of its SASRec companion), if it has any."""
        if self._vectors is None:
            m = self.model
            source = m if hasattr(m, "item_vectors") else getattr(m, "collab_model", None)
            if source is None or not hasattr(source, "item_vectors"):
                return None
            v = np.asarray(source.item_vectors(), dtype=np.float32)
            self._vectors = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
        return self._vectors

    def relatedness(self, items: np.ndarray, others: np.ndarray) -> np.ndarray | None:
        """(len(items), len(others)) how related each pair is by this model (item-item similarity or vector
        cosine), or None when the model cannot say."""
        sim = getattr(self.model, "sim", None)
        if sim is not None:
            return np.asarray(sim[items][:, others].toarray(), dtype=np.float32)
        vecs = self.item_vectors()
        if vecs is None:
            return None
        return vecs[items] @ vecs[others].T

    def because(self, history: np.ndarray, items: np.ndarray, n: int = 2) -> list[list[int]]:
        """For each recommended item, the (at most ``n``) history items that explain it best; empty lists
        when the model cannot say (popularity) or the history is empty."""
        if len(history) == 0 or len(items) == 0:
            return [[] for _ in items]
        hist = np.unique(history)
        rel = self.relatedness(items, hist)
        if rel is None:
            return [[] for _ in items]
        out = []
        for row in rel:
            order = np.argsort(-row, kind="stable")[:n]
            out.append([int(hist[j]) for j in order if row[j] > 0])
        return out

    def similar(self, item: int, k: int) -> list[tuple[int, float]]:
        """The ``k`` items most related to ``item`` by this model (its recommendations after that item alone
        when it has no item-item relation)."""
        rel = self.relatedness(np.array([item]), np.arange(self.model.n_items))
        if rel is None:
            ids, scores = self.model.recommend([np.array([item])], k=k)
            return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        row = rel[0]
        row[item] = -np.inf
        order = np.argsort(-row, kind="stable")[:k]
        return [(int(i), float(row[i])) for i in order if np.isfinite(row[i])]


def _metrics_of(path: Path) -> dict[str, Any] | None:
    f = path / "metrics.json"
    if not f.exists():
        return None
    try:
        d = json.loads(f.read_text())
        return {"protocol": d.get("protocol"), "n_users": d.get("n_users"), "on": d.get("extra", {}).get("on"),
                **{k: v for k, v in d.get("overall", {}).items() if k.endswith(("@10", "@20"))}}
    except (OSError, ValueError):
        return None


def load_models(settings: ServeSettings) -> tuple[Shop, dict[str, ServedModel]]:
    """Load every run of ``settings`` (LlmrecError naming the run and why when one cannot be served)."""
    if not settings.runs:
        raise LlmrecError("serve: no run directories given (llmrec serve RUN_DIR [RUN_DIR ...])")
    models: dict[str, ServedModel] = {}
    shop: Shop | None = None
    for path in settings.runs:
        try:
            run = load_run(path)
        except (LlmrecError, OSError, ValueError, KeyError, RuntimeError) as e:
            raise LlmrecError(f"serve: cannot load run {path}: {e}") from None
        if shop is None:
            shop = Shop(run.dataset)
        elif run.dataset.fingerprint != shop.dataset.fingerprint:
            raise LlmrecError(f"serve: run {path} was trained on dataset {run.dataset.path} (fingerprint "
                              f"{run.dataset.fingerprint}), the other runs on {shop.dataset.path}; serve runs of one "
                              "dataset together")
        label = Path(path).resolve().name
        if label in models:
            raise LlmrecError(f"serve: two runs are named {label!r}; give run directories distinct names")
        served = ServedModel(label, run, _metrics_of(Path(path)))
        served.batcher = MicroBatcher(served.score_batch, settings.batch_window_ms / 1000.0, settings.batch_max,
                                      settings.microbatch, name=label)
        models[label] = served
    assert shop is not None
    return shop, models

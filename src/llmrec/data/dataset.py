"""The dataset directory and its in-memory view.

A dataset directory holds:

- ``interactions.parquet``: ``user`` (int32), ``item`` (int32), ``order`` (int32, 0-based position
  in the user's chronological history), and where the source has them ``timestamp`` (int64 unix
  ms), ``rating`` (float32), ``review`` (string); rows sorted by ``(user, order)``.
- ``items.parquet``: ``item`` (int32), ``item_id`` (raw id), ``title``, ``brand``, ``categories``
  (list of strings), ``description`` and any extra text fields of the source.
- ``users.parquet``: ``user`` (int32), ``user_id`` (raw id).
- ``stats.json`` (counts, density, history length distribution) and ``manifest.json`` (source,
  filters, parse reports, fingerprint).

Ids: users ``0..n_users-1``, items ``0..n_items-1``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec.data.splits import Feedback
from llmrec.errors import DataError

REQUIRED_FILES = ("interactions.parquet", "items.parquet", "users.parquet", "stats.json", "manifest.json")


def fingerprint(users: np.ndarray, items: np.ndarray) -> str:
    """A short content hash of the interaction log (user and item columns in row order)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(users, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(items, dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def history_stats(lengths: np.ndarray) -> dict[str, Any]:
    """Summary of per-user history lengths."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return {"min": 0, "max": 0, "mean": 0.0}
    qs = np.percentile(lengths, [25, 50, 75, 90, 99])
    edges = [1, 2, 3, 5, 10, 20, 50, 100, 1000]
    hist = {}
    for lo, hi in itertools.pairwise(edges):
        hist[f"{lo}-{hi - 1}"] = int(((lengths >= lo) & (lengths < hi)).sum())
    hist[f"{edges[-1]}+"] = int((lengths >= edges[-1]).sum())
    return {
        "min": int(lengths.min()),
        "p25": float(qs[0]),
        "median": float(qs[1]),
        "mean": float(lengths.mean()),
        "p75": float(qs[2]),
        "p90": float(qs[3]),
        "p99": float(qs[4]),
        "max": int(lengths.max()),
        "histogram": hist,
    }


def compute_stats(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> dict[str, Any]:
    """Counts, density and history length distribution of an interaction log."""
    return stats_from_counts(np.bincount(users, minlength=n_users), np.bincount(items, minlength=n_items))


def stats_from_counts(per_user: np.ndarray, per_item: np.ndarray) -> dict[str, Any]:
    """:func:`compute_stats` from the interactions of each user (n_users,) and of each item (n_items,)."""
    n_users, n_items, n = len(per_user), len(per_item), int(np.sum(per_user))
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "density": n / (n_users * n_items) if n_users and n_items else 0.0,
        "history_length": history_stats(per_user) if n else history_stats(np.empty(0)),
        "item_popularity": history_stats(per_item) if n else history_stats(np.empty(0)),
    }


@dataclass(frozen=True)
class Catalog:
    """Item text, indexed by item id ``0..n_items-1`` (what text-aware models read)."""

    item_ids: list[str]
    titles: list[str]
    brands: list[str | None]
    categories: list[list[str]]
    descriptions: list[str | None]

    def __len__(self) -> int:
        return len(self.item_ids)

    def text(self, item: int, max_description_chars: int = 300) -> str:
        """One line describing ``item``: title, brand, categories, start of the description."""
        parts = [self.titles[item]]
        if self.brands[item]:
            parts.append(f"Brand: {self.brands[item]}")
        if self.categories[item]:
            parts.append("Categories: " + ", ".join(self.categories[item]))
        desc = self.descriptions[item]
        if desc and max_description_chars > 0:
            parts.append("Description: " + desc[:max_description_chars])
        return ". ".join(parts)


@dataclass
class Dataset:
    """An in-memory dataset: per-user chronological sequences plus the item table.

    ``sequences[u]``: (len_u,) int64 items of user ``u``; ``timestamps[u]``: (len_u,) int64 unix ms
    or None when the source has no times; ``items``: the items table (row ``i`` is item ``i``).
    """

    path: Path
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    items: pa.Table
    user_ids: list[str]
    stats: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return self.items.num_rows

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def item_ids(self) -> list[str]:
        return self.items.column("item_id").to_pylist()

    def titles(self) -> list[str]:
        """Title of every item (the raw id where the title is missing)."""
        titles = self.items.column("title").to_pylist() if "title" in self.items.column_names else []
        ids = self.item_ids
        return [t if t else ids[i] for i, t in enumerate(titles or [None] * len(ids))]

    def catalog(self) -> Catalog:
        """The item text of this dataset as a :class:`Catalog`."""
        cols = set(self.items.column_names)
        n = self.n_items

        def col(name: str) -> list:
            return self.items.column(name).to_pylist() if name in cols else [None] * n

        return Catalog(
            item_ids=self.item_ids,
            titles=self.titles(),
            brands=col("brand"),
            categories=[c or [] for c in col("categories")],
            descriptions=col("description"),
        )

    def feedback(self) -> Feedback:
        """Ratings and review texts of every interaction (read from ``interactions.parquet``)."""
        cols = pq.read_schema(self.path / "interactions.parquet").names
        want = [c for c in ("rating", "review") if c in cols]
        table = pq.read_table(self.path / "interactions.parquet", columns=want) if want else None
        bounds = np.cumsum([0] + [len(s) for s in self.sequences])
        ratings = reviews = None
        if table is not None and "rating" in want:
            r = table.column("rating").to_numpy(zero_copy_only=False).astype(np.float32)
            ratings = [r[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]
        if table is not None and "review" in want:
            t = table.column("review").to_pylist()
            reviews = [t[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]
        return Feedback(self.sequences, ratings, reviews)

    def user_index(self, user_id: str) -> int:
        """Integer id of raw user id ``user_id`` (DataError if unknown)."""
        if not hasattr(self, "_user_lookup"):
            self._user_lookup = {u: i for i, u in enumerate(self.user_ids)}
        try:
            return self._user_lookup[user_id]
        except KeyError:
            raise DataError(f"{self.path}: unknown user id {user_id!r}") from None

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        """Read a dataset directory written by ``prepare``."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"{path}: dataset directory not found (run `llmrec data prepare` first)")
        missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
        if missing:
            raise DataError(f"{path}: not a dataset directory (missing {', '.join(missing)})")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            stats = json.loads((path / "stats.json").read_text())
            names = pq.read_schema(path / "interactions.parquet").names  # the text columns stay on disk
            inter = pq.read_table(path / "interactions.parquet",
                                  columns=[c for c in ("user", "item", "timestamp") if c in names])
            user_table = pq.read_table(path / "users.parquet")
            items_table = pq.read_table(path / "items.parquet")
            users = inter.column("user").to_numpy().astype(np.int64)
            items = inter.column("item").to_numpy().astype(np.int64)
            user_ids = user_table.column("user_id").to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise DataError(f"{path}: damaged dataset directory ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            "prepare it again") from None
        # the content is checked against the manifest: an edited or damaged interactions file is refused
        if "fingerprint" not in manifest or fingerprint(users, items) != manifest["fingerprint"]:
            raise DataError(f"{path}: interactions.parquet does not match the fingerprint in manifest.json "
                            "(edited or damaged); prepare the dataset again")
        n_users = len(user_ids)
        if len(users) and (users.min() < 0 or users.max() >= n_users or np.any(np.diff(users) < 0)
                           or items.min() < 0 or items.max() >= items_table.num_rows):
            raise DataError(f"{path}: interactions.parquet holds user or item codes outside users.parquet / "
                            "items.parquet or out of order; prepare the dataset again")
        bounds = np.searchsorted(users, np.arange(n_users + 1))
        sequences = [items[bounds[u] : bounds[u + 1]] for u in range(n_users)]
        timestamps = None
        if "timestamp" in inter.column_names:
            ts = inter.column("timestamp").to_numpy(zero_copy_only=False)
            timestamps = [ts[bounds[u] : bounds[u + 1]].astype(np.int64) for u in range(n_users)]
        return cls(
            path=path,
            sequences=sequences,
            timestamps=timestamps,
            items=items_table,
            user_ids=user_ids,
            stats=stats,
            manifest=manifest,
        )

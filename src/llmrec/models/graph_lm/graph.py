"""The user-item graph of a split's *training* edges, built sparsely, and the pure function that turns it
into attention-bias channels between the token positions of a batch of prompts.

Id spaces. Items are the dataset's ids ``0..n_items-1``; a prompt position's *node* is its item id (an
item token), :data:`USER` (the prompt's user token: one user per prompt) or :data:`OTHER` (text, the
end row, padding). The user-item edges of a prompt's user are the items its prompt shows, i.e. the
recorded history it was built from (training prefixes in training; the validation history, or the test
history = training items + the validation item, at prediction): no other edge of that user is ever read.
The item-item graph is built from ``split.train`` alone, so no validation or test interaction is in it.

Channels (each (B, L, L), symmetric, zero between non-nodes):

- ``self``: 1 between two positions of the same node (a repeated item, the user token opening and
  closing the prompt);
- ``ui``: between the user and an item of its prompt, ``1 / sqrt(deg(i))`` (``deg`` = the item's number of
  training users; 1 for an item without any), the user-side half of the GCN normalization (the user
  side is left out: its degree would tell a position how many items follow it);
- ``ii``: 2-hop item-item proximity, the cosine of co-interaction ``|U(i) & U(j)| / sqrt(deg(i) deg(j))``
  over training users (i != j);
- ``brand`` / ``category``: 1 between two different items of the same brand / the same most specific
  category (catalog text; none when the catalog lacks it).

Cost: the adjacency ``A`` (users x items) has one entry per training edge; ``A.T @ A`` costs the sum over
users of their degree squared and holds one entry per co-interacting pair; the bias of a batch is one
``searchsorted`` over the sorted pair keys, vectorized over (B, L, L). Nothing is dense in the number of
nodes (the published code's Floyd-Warshall over all users and items is cubic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

USER = -2  # node id of the prompt's user token
OTHER = -1  # node id of a non-node position (text, end row, padding)


@dataclass(frozen=True)
class GraphTables:
    """The training graph as flat arrays (saved with the model).

    ``degree`` (n_items,) int64 training users per item; ``ii_keys`` (E,) int64 sorted keys
    ``i * n_items + j`` of co-interacting item pairs (both directions, i != j) and ``ii_vals`` (E,) float32
    their cosine; ``brand`` / ``category`` (n_items,) int64 attribute ids (-1 = none)."""

    n_items: int
    degree: np.ndarray
    ii_keys: np.ndarray
    ii_vals: np.ndarray
    brand: np.ndarray
    category: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"degree": self.degree, "ii_keys": self.ii_keys, "ii_vals": self.ii_vals, "brand": self.brand,
                "category": self.category}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_items: int) -> GraphTables:
        missing = sorted({"degree", "ii_keys", "ii_vals", "brand", "category"} - set(arrays))
        if missing:
            raise ValueError(f"graph tables: missing {missing}")
        for name in ("degree", "brand", "category"):
            if arrays[name].shape != (n_items,):
                raise ValueError(f"graph tables: {name} has shape {arrays[name].shape}, expected ({n_items},)")
        return cls(n_items, *(np.asarray(arrays[k]) for k in ("degree", "ii_keys", "ii_vals", "brand", "category")))

    def neighbors(self, item: int, k: int) -> np.ndarray:
        """The (<= k,) items most co-interacted with ``item`` (strongest first, ties by lower id)."""
        lo, hi = np.searchsorted(self.ii_keys, [item * self.n_items, (item + 1) * self.n_items])
        cols, vals = self.ii_keys[lo:hi] % self.n_items, self.ii_vals[lo:hi]
        return cols[np.lexsort((cols, -vals))[:k]]

    @property
    def n_pairs(self) -> int:
        return len(self.ii_keys)


def adjacency(train: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """(n_users, n_items) binary CSR matrix of training edges (a repeated purchase counts once)."""
    lengths = np.fromiter((len(s) for s in train), dtype=np.int64, count=len(train))
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in train] + [np.empty(0, np.int64)])
    if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
        bad = cols[(cols < 0) | (cols >= n_items)][0]
        raise ValueError(f"training item id {bad} outside 0..{n_items - 1}")
    rows = np.repeat(np.arange(len(train), dtype=np.int64), lengths)
    a = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(train), n_items))
    a.sum_duplicates()
    a.data[:] = 1.0
    return a


def _attribute_ids(values: Sequence[Any]) -> np.ndarray:
    """(n,) int64 ids of the distinct non-empty values (-1 for None / empty)."""
    ids: dict[Any, int] = {}
    return np.array([ids.setdefault(v, len(ids)) if v else -1 for v in values], dtype=np.int64)


def build_graph(train: Sequence[np.ndarray], n_items: int, catalog: Any = None, max_neighbors: int = 0) -> GraphTables:
    """The :class:`GraphTables` of the training sequences ``train`` (user u's items, dataset ids).

    ``catalog`` (optional, a :class:`~llmrec.data.dataset.Catalog`) gives brands and categories;
    ``max_neighbors`` > 0 keeps each item's strongest co-interaction pairs only (a pair stays when either
    end keeps it, so the table stays symmetric)."""
    a = adjacency(train, n_items)
    degree = np.asarray(a.sum(axis=0)).ravel().astype(np.int64)  # (n_items,)
    co = (a.T @ a).tocsr()  # (n_items, n_items) co-interaction counts
    co.setdiag(0)
    co.eliminate_zeros()
    co = co.tocoo()
    vals = co.data / np.sqrt(degree[co.row].astype(np.float64) * degree[co.col])
    if max_neighbors and len(vals):
        keep = _top_per_row(co.row, vals, max_neighbors)
        pruned = sp.csr_matrix((vals[keep], (co.row[keep], co.col[keep])), shape=(n_items, n_items))
        sym = pruned.maximum(pruned.T).tocoo()
        rows, cols, vals = sym.row, sym.col, sym.data
    else:
        rows, cols = co.row, co.col
    keys = rows.astype(np.int64) * n_items + cols
    order = np.argsort(keys, kind="stable")
    brands = _attribute_ids(catalog.brands) if catalog is not None else np.full(n_items, -1, np.int64)
    cats = _attribute_ids([c[-1] if c else None for c in catalog.categories]) if catalog is not None \
        else np.full(n_items, -1, np.int64)
    return GraphTables(n_items, degree, keys[order], vals[order].astype(np.float32), brands, cats)


def _top_per_row(rows: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``vals`` within each row (rows given per entry)."""
    order = np.lexsort((-vals, rows))
    r = rows[order]
    starts = np.searchsorted(r, r, side="left")
    rank = np.arange(len(r)) - starts
    return order[rank < k]


class TorchTables:
    """:class:`GraphTables` as torch tensors on one device (what :func:`bias_channels` reads)."""

    def __init__(self, tables: GraphTables, device: torch.device | str = "cpu") -> None:
        self.n_items = tables.n_items
        deg = torch.as_tensor(tables.degree, dtype=torch.float32)
        self.inv_sqrt_degree = (1.0 / deg.clamp(min=1.0).sqrt()).to(device)  # (n_items,)
        self.ii_keys = torch.as_tensor(tables.ii_keys, dtype=torch.int64).to(device)  # (E,)
        self.ii_vals = torch.as_tensor(tables.ii_vals, dtype=torch.float32).to(device)  # (E,)
        self.brand = torch.as_tensor(tables.brand, dtype=torch.int64).to(device)
        self.category = torch.as_tensor(tables.category, dtype=torch.int64).to(device)


def node_ids(ids: torch.Tensor, n_base: int, n_items: int, first_user: int, end_user: int) -> torch.Tensor:
    """ids (B, L) token ids -> (B, L) int64 nodes: item id for item tokens ``n_base + i`` (i < n_items),
    :data:`USER` for user tokens ``first_user <= t < end_user``, :data:`OTHER` elsewhere."""
    is_item = (ids >= n_base) & (ids < n_base + n_items)
    is_user = (ids >= first_user) & (ids < end_user)
    nodes = torch.where(is_item, ids - n_base, torch.full_like(ids, OTHER))
    return torch.where(is_user, torch.full_like(ids, USER), nodes)


def bias_channels(nodes: torch.Tensor, tables: TorchTables, channels: Sequence[str]) -> torch.Tensor:
    """nodes (B, L) int64 (see :func:`node_ids`) -> (B, K, L, L) float32 channels, K = len(channels), in
    the order given; entry [b, k, p, q] relates positions p and q of prompt b. Pure: reads nothing but its
    arguments; one vectorized pass per channel (no loop over batch or positions)."""
    a, b = nodes[:, :, None], nodes[:, None, :]  # (B, L, 1), (B, 1, L)
    ia, ib = a >= 0, b >= 0
    a0, b0 = a.clamp(min=0), b.clamp(min=0)
    zero = torch.zeros((), dtype=torch.float32, device=nodes.device)
    out = []
    for ch in channels:
        if ch == "self":
            v = ((a == b) & (a != OTHER)).float()
        elif ch == "ui":
            inv = tables.inv_sqrt_degree
            v = torch.where((a == USER) & ib, inv[b0], zero) + torch.where((b == USER) & ia, inv[a0], zero)
        elif ch == "ii":
            pair = ia & ib & (a != b)  # (B, L, L)
            v = torch.zeros(pair.shape, dtype=torch.float32, device=nodes.device)
            if len(tables.ii_keys) and bool(pair.any()):
                key = (a0 * tables.n_items + b0)[pair]  # (M,)
                pos = torch.searchsorted(tables.ii_keys, key).clamp(max=len(tables.ii_keys) - 1)
                v[pair] = torch.where(tables.ii_keys[pos] == key, tables.ii_vals[pos], zero)
        elif ch in ("brand", "category"):
            attr = tables.brand if ch == "brand" else tables.category
            va, vb = attr[a0], attr[b0]
            v = (ia & ib & (a != b) & (va == vb) & (va >= 0)).float()
        else:
            raise ValueError(f"unknown graph channel {ch!r}")
        out.append(v.expand(nodes.shape[0], nodes.shape[1], nodes.shape[1]))
    return torch.stack(out, dim=1)  # (B, K, L, L)

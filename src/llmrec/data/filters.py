"""Pure filters over interaction arrays (integer user and item codes, one row per interaction)."""

from __future__ import annotations

import numpy as np


def kcore_mask(users: np.ndarray, items: np.ndarray, k_user: int, k_item: int) -> np.ndarray:
    """Iterative k-core: (n,) bool mask of the rows kept.

    Repeatedly drops every interaction of users with fewer than ``k_user`` kept interactions
    and of items with fewer than ``k_item``, until nothing changes. In the result every kept
    user has >= ``k_user`` and every kept item >= ``k_item`` kept rows, and the kept set is the
    largest such subset (the k-core is unique). ``users``/``items``: (n,) non-negative ints.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if users.shape != items.shape:
        raise ValueError("kcore_mask: users and items must have the same shape")
    keep = np.ones(users.shape[0], dtype=bool)
    if users.size == 0:
        return keep
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    while True:
        u_count = np.bincount(users[keep], minlength=n_users)
        i_count = np.bincount(items[keep], minlength=n_items)
        new_keep = keep & (u_count[users] >= k_user) & (i_count[items] >= k_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def first_occurrence_mask(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(n,) bool: True for the first row of each (user, item) pair, in row order."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if users.size == 0:
        return np.ones(0, dtype=bool)
    key = users * (int(items.max()) + 1) + items
    _, first = np.unique(key, return_index=True)
    mask = np.zeros(users.shape[0], dtype=bool)
    mask[first] = True
    return mask

"""Chronological splits and next-K targets.

Id spaces: users are ``0..n_users-1`` and items ``0..n_items-1`` (the dataset's integer ids).
Every sequence is a 1-D int64 array of item ids in chronological order.

A :class:`Split` holds, for every user, the part of their history a model may train on, and
two :class:`EvalSet` objects. For each evaluated user an ``EvalSet`` gives the history the
model sees (never containing a target) and the held-out target items. The splits guarantee
that no training sequence contains an interaction from the same user's validation or test
period, and the temporal split never trains on anything at or after its validation cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from llmrec.data.dataset import Catalog

Padding = Literal["repeat", "pad-token", "none"]
PAD_ITEM: int = -1
"""Item id used for padding in target arrays (``pad-token`` strategy) and empty list slots."""


@dataclass(frozen=True)
class Feedback:
    """What users said about their purchases, aligned with their full chronological sequences.

    ``sequences[u]``: (len_u,) int64 items of user ``u``; ``ratings[u]``: (len_u,) float32 with NaN
    where there is none (or ``ratings`` is None); ``reviews[u]``: len_u strings or None (or
    ``reviews`` is None). Every split here gives each user a training sequence and evaluation
    histories that are prefixes of that user's sequence, so position ``j`` of any of them is
    position ``j`` of ``sequences[u]``: feedback on a history never includes a target's.
    """

    sequences: list[np.ndarray]
    ratings: list[np.ndarray] | None = None
    reviews: list[list[str | None]] | None = None

    def of(self, user: int, history: np.ndarray) -> tuple[np.ndarray | None, list[str | None] | None]:
        """(ratings, reviews) of the items of ``history`` if it is a prefix of ``user``'s recorded
        sequence (else ``(None, None)``: unknown users and made-up histories get no feedback)."""
        if not 0 <= user < len(self.sequences):
            return None, None
        n = len(history)
        seq = self.sequences[user]
        if n > len(seq) or not np.array_equal(seq[:n], np.asarray(history)):
            return None, None
        return (None if self.ratings is None else self.ratings[user][:n],
                None if self.reviews is None else self.reviews[user][:n])


@dataclass(frozen=True)
class EvalSet:
    """Users to evaluate, what the model sees, and what it must find.

    users: (n,) int64 user ids; histories[i]: items of users[i] before the target period;
    targets[i]: held-out items of users[i] (at least one), chronological.
    """

    users: np.ndarray
    histories: list[np.ndarray]
    targets: list[np.ndarray]

    def __post_init__(self) -> None:
        if not (len(self.users) == len(self.histories) == len(self.targets)):
            raise ValueError("EvalSet: users, histories and targets must have the same length")

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, index: np.ndarray | Sequence[int]) -> EvalSet:
        idx = np.asarray(index, dtype=np.int64)
        return EvalSet(
            users=self.users[idx],
            histories=[self.histories[i] for i in idx],
            targets=[self.targets[i] for i in idx],
        )

    def sample(self, n: int, rng: np.random.Generator) -> EvalSet:
        """``n`` users drawn by ``rng`` without replacement, kept in their original order; the whole set
        (and no draw) when ``n`` is 0 or not smaller than the set."""
        if not n or len(self) <= n:
            return self
        return self.subset(np.sort(rng.choice(len(self), n, replace=False)))

    def first_k_targets(self, k: int) -> EvalSet:
        """The same users with targets truncated to the next ``k`` items (next-K protocol)."""
        return EvalSet(self.users, self.histories, [t[:k] for t in self.targets])


@dataclass(frozen=True)
class Split:
    """A split of one dataset. ``train[u]`` is the training sequence of user ``u`` (may be empty).

    ``catalog`` carries the item text for models that read it (None for pure id data);
    ``feedback`` the users' ratings and reviews, for models that read them (None otherwise).
    """

    name: str
    n_users: int
    n_items: int
    train: list[np.ndarray]
    valid: EvalSet
    test: EvalSet
    params: dict[str, object] = field(default_factory=dict)
    catalog: Catalog | None = None
    feedback: Feedback | None = None

    def with_feedback(self, feedback: Feedback) -> Split:
        """The same split carrying ``feedback`` (which must cover ``n_users`` users)."""
        import dataclasses

        if len(feedback.sequences) != self.n_users:
            raise ValueError(f"feedback covers {len(feedback.sequences)} users, split has {self.n_users}")
        return dataclasses.replace(self, feedback=feedback)

    def with_catalog(self, catalog: Catalog) -> Split:
        """The same split carrying ``catalog`` (which must have ``n_items`` items)."""
        import dataclasses

        if len(catalog) != self.n_items:
            raise ValueError(f"catalog has {len(catalog)} items, split has {self.n_items}")
        return dataclasses.replace(self, catalog=catalog)

    def train_item_counts(self) -> np.ndarray:
        """(n_items,) int64 number of training interactions per item."""
        if not self.train:
            return np.zeros(self.n_items, dtype=np.int64)
        return np.bincount(np.concatenate(self.train + [np.empty(0, np.int64)]), minlength=self.n_items)


def hash_split_into(h: Any, split: Split) -> None:
    """Feed ``h`` (a hashlib object) everything a model's fit reads of ``split``: the item count, the
    training sequences, the validation histories, targets and users (never the test set)."""
    h.update(f"n_items={split.n_items};n_train={len(split.train)}".encode())
    for seqs in (split.train, split.valid.histories, split.valid.targets):
        for s in seqs:
            a = np.asarray(s, dtype=np.int64)
            h.update(len(a).to_bytes(8, "little"))
            h.update(a.tobytes())
        h.update(b"|")
    h.update(np.asarray(split.valid.users, dtype=np.int64).tobytes())


def split_digest(split: Split) -> str:
    """sha256 hex of what training reads of ``split`` (see :func:`hash_split_into`): a checkpoint
    written on other data is not resumed."""
    import hashlib

    h = hashlib.sha256()
    hash_split_into(h, split)
    return h.hexdigest()


def _as_seq(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def leave_one_out(sequences: Sequence[np.ndarray], n_items: int) -> Split:
    """Leave-one-out: last item is the test target, second-to-last the validation target.

    Users with fewer than 3 items are not evaluated; their whole sequence is training data.
    Validation history = train; test history = train + the validation item.
    """
    train: list[np.ndarray] = []
    vu, vh, vt, tu, th, tt = [], [], [], [], [], []
    for u, seq in enumerate(sequences):
        seq = _as_seq(seq)
        if len(seq) < 3:
            train.append(seq)
            continue
        train.append(seq[:-2])
        vu.append(u)
        vh.append(seq[:-2])
        vt.append(seq[-2:-1])
        tu.append(u)
        th.append(seq[:-1])
        tt.append(seq[-1:])
    return Split(
        name="leave-one-out",
        n_users=len(sequences),
        n_items=n_items,
        train=train,
        valid=EvalSet(np.asarray(vu, dtype=np.int64), vh, vt),
        test=EvalSet(np.asarray(tu, dtype=np.int64), th, tt),
    )


def temporal(
    sequences: Sequence[np.ndarray],
    timestamps: Sequence[np.ndarray],
    n_items: int,
    valid_start: int,
    test_start: int,
) -> Split:
    """Global temporal split at two cut points (same unit as ``timestamps``).

    Interactions with ``t < valid_start`` are training data; ``valid_start <= t < test_start``
    are validation targets; ``t >= test_start`` are test targets. The validation history is the
    training part; the test history is everything before ``test_start``. A user is evaluated on a
    period only if they have at least one item before it and one inside it.
    """
    if not valid_start <= test_start:
        raise ValueError(f"temporal split: valid_start ({valid_start}) must be <= test_start ({test_start})")
    train: list[np.ndarray] = []
    vu, vh, vt, tu, th, tt = [], [], [], [], [], []
    for u, (seq, ts) in enumerate(zip(sequences, timestamps, strict=True)):
        seq, ts = _as_seq(seq), np.asarray(ts)
        if len(seq) != len(ts):
            raise ValueError(f"temporal split: user {u} has {len(seq)} items but {len(ts)} timestamps")
        n_train = int(np.searchsorted(ts, valid_start, side="left"))
        n_before_test = int(np.searchsorted(ts, test_start, side="left"))
        train.append(seq[:n_train])
        if n_train > 0 and n_before_test > n_train:
            vu.append(u)
            vh.append(seq[:n_train])
            vt.append(seq[n_train:n_before_test])
        if n_before_test > 0 and len(seq) > n_before_test:
            tu.append(u)
            th.append(seq[:n_before_test])
            tt.append(seq[n_before_test:])
    return Split(
        name="temporal",
        n_users=len(sequences),
        n_items=n_items,
        train=train,
        valid=EvalSet(np.asarray(vu, dtype=np.int64), vh, vt),
        test=EvalSet(np.asarray(tu, dtype=np.int64), th, tt),
        params={"valid_start": valid_start, "test_start": test_start},
    )


def ratio(
    sequences: Sequence[np.ndarray], n_items: int, valid_frac: float = 0.1, test_frac: float = 0.1
) -> Split:
    """Per-user chronological ratio split: first part train, then validation, then test.

    Each period gets ``round(frac * n)`` items, at least one when the user has 3 or more items;
    users with fewer than 3 items are training data only.
    """
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError("ratio split: valid_frac and test_frac must be in (0, 1) and sum to < 1")
    train: list[np.ndarray] = []
    vu, vh, vt, tu, th, tt = [], [], [], [], [], []
    for u, seq in enumerate(sequences):
        seq = _as_seq(seq)
        n = len(seq)
        if n < 3:
            train.append(seq)
            continue
        n_test = max(1, round(test_frac * n))
        n_valid = max(1, round(valid_frac * n))
        n_train = max(1, n - n_test - n_valid)
        n_valid = n - n_test - n_train
        train.append(seq[:n_train])
        if n_valid > 0:
            vu.append(u)
            vh.append(seq[:n_train])
            vt.append(seq[n_train : n_train + n_valid])
        tu.append(u)
        th.append(seq[: n - n_test])
        tt.append(seq[n - n_test :])
    return Split(
        name="ratio",
        n_users=len(sequences),
        n_items=n_items,
        train=train,
        valid=EvalSet(np.asarray(vu, dtype=np.int64), vh, vt),
        test=EvalSet(np.asarray(tu, dtype=np.int64), th, tt),
        params={"valid_frac": valid_frac, "test_frac": test_frac},
    )


def pad_targets(targets: np.ndarray, k: int, padding: Padding, pad_id: int = PAD_ITEM) -> np.ndarray:
    """Bring a target list to length ``k``.

    ``repeat``: cycle the available targets; ``pad-token``: fill with ``pad_id``;
    ``none``: truncate only (the result may be shorter than ``k``). Empty input stays empty
    under ``repeat`` and ``none``.
    """
    targets = _as_seq(targets)[:k]
    if len(targets) == k or padding == "none":
        return targets
    if padding == "pad-token":
        return np.concatenate([targets, np.full(k - len(targets), pad_id, dtype=np.int64)])
    if padding == "repeat":
        if len(targets) == 0:
            return targets
        return np.resize(targets, k)
    raise ValueError(f"unknown padding strategy {padding!r}; expected repeat, pad-token or none")


def next_k_examples(
    sequences: Sequence[np.ndarray],
    k: int,
    padding: Padding,
    min_prefix: int = 1,
    pad_id: int = PAD_ITEM,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Training examples (prefix, next ``k`` items) from training sequences only.

    Returns ``(users, prefix_lengths, targets)``: example ``j`` uses the first
    ``prefix_lengths[j]`` items of ``sequences[users[j]]`` as input and ``targets[j]`` (the
    following items, padded per ``padding``) as output. Because only the given sequences are
    read, passing ``split.train`` can never put a validation or test item in an example.
    """
    if k < 1:
        raise ValueError("next_k_examples: k must be >= 1")
    users, lengths, targets = [], [], []
    for u, seq in enumerate(sequences):
        seq = _as_seq(seq)
        for t in range(max(min_prefix, 1), len(seq)):
            users.append(u)
            lengths.append(t)
            targets.append(pad_targets(seq[t : t + k], k, padding, pad_id))
    return np.asarray(users, dtype=np.int64), np.asarray(lengths, dtype=np.int64), targets

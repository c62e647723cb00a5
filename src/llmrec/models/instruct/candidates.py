"""Candidate lists for choice and re-ranking prompts, built honestly (and the leaky way, for a test).

Honest choice among N (:class:`NegativeSampler`, :func:`build_choice`): the true next item plus
N-1 negatives that are neither the target nor in the user's history, drawn uniformly, by training
popularity, or hard (same category as the target / nearest titles by text embedding, topped up by
popularity); the option order is a seeded permutation, so the true option's letter is uniform;
and every option is rendered by the same normalization (:func:`~.prompts.normalize_text`), so
formatting carries no signal. Ids are dataset item ids throughout.

:func:`leaky_choice` rebuilds the flaw seen in published demos (only the true option's text was
cleaned); it exists for the regression test that shows a history-blind model exploiting it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from llmrec.models.instruct.config import Negatives


@dataclass(frozen=True)
class Choice:
    """A candidate list: ``options`` (N,) item ids in prompt order and the index of the true item (-1: absent)."""

    options: np.ndarray
    answer: int


class NegativeSampler:
    """Draws negatives. ``counts`` (n_items,) training popularity; ``categories`` (n_items,) a category
    label per item ("" = none) for ``category``; ``neighbors`` (n_items, K) nearest items by text
    embedding, closest first, for ``text``."""

    def __init__(self, counts: np.ndarray, categories: Sequence[str] | None = None,
                 neighbors: np.ndarray | None = None) -> None:
        self.counts = np.asarray(counts, dtype=np.float64)
        self.n_items = len(self.counts)
        self.categories = list(categories) if categories is not None else None
        self.neighbors = neighbors
        self._by_cat: dict[str, np.ndarray] = {}
        if self.categories is not None:
            cats = np.asarray(self.categories, dtype=object)
            for c in set(self.categories) - {""}:
                self._by_cat[c] = np.flatnonzero(cats == c)

    def sample(self, target: int, history: np.ndarray, n: int, strategy: Negatives,
               rng: np.random.Generator) -> np.ndarray:
        """(n,) distinct negatives for ``target``: never the target, never a history item."""
        banned = np.zeros(self.n_items, dtype=bool)
        banned[np.asarray(history, dtype=np.int64)] = True
        banned[target] = True
        if self.n_items - int(banned.sum()) < n:
            raise ValueError(f"only {self.n_items - int(banned.sum())} items are left for {n} negatives")
        picked: list[int] = []
        if strategy == "category":
            if self.categories is None:
                raise ValueError("negatives='category' needs item categories")
            pool = self._by_cat.get(self.categories[target], np.empty(0, np.int64))
            picked = self._draw(pool[~banned[pool]], n, rng, None)
        elif strategy == "text":
            if self.neighbors is None:
                raise ValueError("negatives='text' needs nearest neighbours by text embedding")
            near = self.neighbors[target]
            picked = [int(i) for i in near[~banned[near]][:n]]
        elif strategy == "uniform":
            picked = self._draw(np.flatnonzero(~banned), n, rng, None)
        elif strategy != "popularity":
            raise ValueError(f"unknown negatives strategy {strategy!r}")
        if len(picked) < n:  # popularity draws (and the top-up of the hard strategies)
            banned[picked] = True
            pool = np.flatnonzero(~banned)
            picked += self._draw(pool, n - len(picked), rng, self.counts[pool] + 1.0)
        return np.asarray(picked, dtype=np.int64)

    @staticmethod
    def _draw(pool: np.ndarray, n: int, rng: np.random.Generator, weights: np.ndarray | None) -> list[int]:
        n = min(n, len(pool))
        if n == 0:
            return []
        p = None if weights is None else weights / weights.sum()
        return [int(i) for i in rng.choice(pool, size=n, replace=False, p=p)]


def build_choice(target: int, history: np.ndarray, n: int, sampler: NegativeSampler, strategy: Negatives,
                 rng: np.random.Generator) -> Choice:
    """The true item and ``n - 1`` negatives in a seeded random order."""
    negs = sampler.sample(target, history, n - 1, strategy, rng)
    options = np.concatenate([[target], negs]).astype(np.int64)
    perm = rng.permutation(n)
    options = options[perm]
    return Choice(options, int(np.flatnonzero(options == target)[0]))


def shuffle_shortlist(shortlist: np.ndarray, target: int | None, rng: np.random.Generator) -> Choice:
    """A retriever's shortlist in a seeded random order (so option "A" is not the retriever's favourite);
    ``answer`` is the target's index, or -1 when the target is not in the shortlist (or unknown)."""
    options = np.asarray(shortlist, dtype=np.int64)[rng.permutation(len(shortlist))]
    hit = np.flatnonzero(options == target) if target is not None else np.empty(0)
    return Choice(options, int(hit[0]) if len(hit) else -1)


def leaky_choice(target: int, history: np.ndarray, n: int, sampler: NegativeSampler, raw_titles: Sequence[str],
                 clean: Callable[[str], str], rng: np.random.Generator) -> tuple[list[str], int]:
    """The FLAWED candidate list of the published demos, for the regression test only: the same
    shuffled options as :func:`build_choice`, but only the true option's text is cleaned; the
    negatives keep their raw text. Returns (option texts in prompt order, index of the true one)."""
    choice = build_choice(target, history, n, sampler, "popularity", rng)
    texts = [clean(raw_titles[i]) if i == target else raw_titles[i] for i in choice.options]
    return texts, choice.answer

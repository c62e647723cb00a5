"""Title generation grounded in the catalog: trie-constrained decoding, or free decoding + nearest title.

- :class:`TitleIndex`: every catalog title as answer token ids (title + end token), a prefix trie
  over them, and the map back to item ids (items that share a title are listed most popular first).
- :func:`trie_generate`: beam search through ``transformers``' ``generate`` with
  ``prefix_allowed_tokens_fn`` reading the trie, so every finished beam is a real catalog title;
  the beams, best first, map back to a ranked item list.
- :func:`free_generate` + :class:`Grounder`: greedy decoding over the whole vocabulary, then the
  text is matched to the catalog (exactly, after normalization) or, when it is no catalog title,
  grounded to the nearest title by sentence-embedding cosine similarity (all-MiniLM-L6-v2); the
  similarities rank the whole catalog. The share of outputs that needed grounding is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class TitleIndex:
    """Answer token ids of every item's title and a trie over them (item ids ``0..n_items-1``)."""

    def __init__(self, answers: Sequence[np.ndarray], popularity: np.ndarray) -> None:
        self.answers = [tuple(int(t) for t in a) for a in answers]
        self.items_of: dict[tuple[int, ...], list[int]] = {}
        for i in np.argsort(-np.asarray(popularity), kind="stable"):  # most popular first
            self.items_of.setdefault(self.answers[int(i)], []).append(int(i))
        self.trie: dict[int, Any] = {}
        for seq in self.items_of:
            node = self.trie
            for t in seq:
                node = node.setdefault(t, {})

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Token ids that may follow ``generated`` (empty once a whole title has been generated)."""
        node = self.trie
        for t in generated:
            node = node.get(int(t))
            if node is None:
                return []
        return list(node)

    def items(self, generated: Sequence[int]) -> list[int]:
        """The item ids whose title is exactly ``generated`` (empty if none)."""
        return self.items_of.get(tuple(int(t) for t in generated), [])


def trie_generate(lm: Any, prompt: np.ndarray, index: TitleIndex, num_beams: int, pad_id: int, eos_id: int,
                  device: torch.device) -> list[list[int]]:
    """Up to ``num_beams`` generated answers (token ids, best first), each a complete catalog title (the
    length limit is the longest title's, so no beam is cut short)."""
    ids = torch.as_tensor(prompt, device=device)[None]
    start = ids.shape[1]
    depth = max(len(a) for a in index.answers)

    def allowed(_batch: int, seq: torch.Tensor) -> list[int]:
        nxt = index.allowed(seq[start:].tolist())
        return nxt or [eos_id]  # a finished title can only end (it already ends with the end token)

    out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=depth,
                      num_beams=num_beams, num_return_sequences=num_beams, do_sample=False, early_stopping=True,
                      prefix_allowed_tokens_fn=allowed, pad_token_id=pad_id, eos_token_id=eos_id)
    answers = []
    for row in out[:, start:].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        answers.append(row[:cut])
    return answers


def ranked_items(answers: Sequence[Sequence[int]], index: TitleIndex, banned: np.ndarray) -> tuple[list[int], int]:
    """Item ids of the generated answers in order (several per shared title, history items and repeats
    dropped), and how many answers were not complete catalog titles (0 under the trie)."""
    seen = {int(b) for b in banned}
    out, invalid = [], 0
    for a in answers:
        items = index.items(a)
        if not items:
            invalid += 1
        for i in items:
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out, invalid


def free_generate(lm: Any, prompt: np.ndarray, max_new_tokens: int, pad_id: int, eos_id: int,
                  device: torch.device) -> list[int]:
    """Greedy decoding over the whole vocabulary (no constraint): the answer's token ids, end token cut."""
    ids = torch.as_tensor(prompt, device=device)[None]
    out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id)
    row = out[0, ids.shape[1]:].tolist()
    return row[: row.index(eos_id)] if eos_id in row else row


class Grounder:
    """Maps free text to catalog items: exact (normalized) title match, else nearest by embedding."""

    def __init__(self, titles: Sequence[str], embedder: str = "all-MiniLM-L6-v2") -> None:
        from llmrec.models.instruct.prompts import normalize_text
        from llmrec.models.semantic_ids.embed import get_embedder

        self.norm = lambda s: normalize_text(s, 10_000).lower()
        self.exact = {}
        for i, t in enumerate(titles):
            self.exact.setdefault(self.norm(t), i)
        self.embedder = get_embedder(embedder)
        self.matrix = np.asarray(self.embedder.encode(list(titles)), dtype=np.float32)  # (n_items, d), unit rows

    def scores(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """((n, n_items) cosine similarities of each text to every title, (n,) bool: needed grounding).
        An exact title match gets the top score for its item."""
        sims = np.asarray(self.embedder.encode(list(texts)), dtype=np.float32) @ self.matrix.T
        grounded = np.ones(len(texts), dtype=bool)
        for r, t in enumerate(texts):
            hit = self.exact.get(self.norm(t))
            if hit is not None:
                sims[r, hit] = 2.0  # above any cosine
                grounded[r] = False
        return sims, grounded

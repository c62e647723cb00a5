"""Three-part prompts in words: instruction, input (the user's history), output (the answer).

The input lists the user's purchases oldest first, one line each, in words::

    - Swingline Stapler, Desk, 20 Sheets | brand: Swingline | category: Staplers | rated 5: works great

(brand, category, rating and review where the dataset has them). In ``choice`` / ``rerank`` mode a
candidate list follows (``A. <title>`` per option, every option normalized by the same
:func:`normalize_text`). The prompt is rendered in the backbone's own chat template (a user turn,
then the assistant turn the answer fills) or in Alpaca. When the history does not fit
``max_history_tokens``, the oldest purchases are dropped first.

Label convention: ``labels[p]`` is the token predicted from position ``p`` (already shifted), and
only the answer's tokens (and the end-of-turn token after them) are labelled; ``IGNORE`` elsewhere.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from llmrec.data.dataset import Catalog

IGNORE = -100
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MARK = "\u0000BODY\u0000"
_ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{body}\n### Response:\n"
)
_SPACES = re.compile(r"\s+")


def normalize_text(text: str | None, max_chars: int) -> str:
    """NFKC, whitespace collapsed, stripped, cut to ``max_chars`` (at a word end where one is near).
    Every option of a candidate list goes through this same function, so formatting says nothing."""
    s = _SPACES.sub(" ", unicodedata.normalize("NFKC", text or "")).strip()
    if len(s) > max_chars:
        cut = s[:max_chars]
        space = cut.rfind(" ")
        s = (cut[:space] if space >= max_chars * 0.6 else cut).rstrip(" ,;:-")
    return s


@dataclass(frozen=True)
class ItemWords:
    """The words shown for items: normalized titles, brands and (most specific) categories, by item id."""

    titles: list[str]
    brands: list[str]
    categories: list[str]

    @classmethod
    def from_catalog(cls, catalog: Catalog | None, n_items: int, title_chars: int) -> ItemWords:
        if catalog is None:
            return cls([f"item {i}" for i in range(n_items)], [""] * n_items, [""] * n_items)
        if len(catalog) != n_items:
            raise ValueError(f"catalog has {len(catalog)} items, the split {n_items}")
        titles = [normalize_text(t, title_chars) or f"item {i}" for i, t in enumerate(catalog.titles)]
        brands = [normalize_text(b, 40) for b in catalog.brands]
        cats = [normalize_text(c[-1] if c else "", 40) for c in catalog.categories]
        return cls(titles, brands, cats)


def history_line(words: ItemWords, item: int, rating: float | None, review: str | None, brand: bool,
                 category: bool, review_chars: int) -> str:
    """One purchase in words (ends with a newline)."""
    parts = [words.titles[item]]
    if brand and words.brands[item]:
        parts.append(f"brand: {words.brands[item]}")
    if category and words.categories[item]:
        parts.append(f"category: {words.categories[item]}")
    note = []
    if rating is not None and not np.isnan(rating):
        note.append(f"rated {rating:g}")
    if review and review_chars > 0:
        note.append(normalize_text(review, review_chars))
    if note:
        parts.append(": ".join(note))
    return "- " + " | ".join(parts) + "\n"


def options_block(words: ItemWords, options: Sequence[int]) -> str:
    """``Candidates:`` then ``A. <title>`` per option (option ``j`` gets letter ``j``)."""
    return "Candidates:\n" + "".join(f"{LETTERS[j]}. {words.titles[i]}\n" for j, i in enumerate(options))


def render(template: Literal["chat", "alpaca"], instruction: str, system: str,
           tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prefix, suffix) text around the body (history and options); the answer follows the suffix."""
    if template == "alpaca":
        text = _ALPACA.format(instruction=instruction, body=_MARK)
    elif template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat': this backbone's tokenizer has no chat template (use 'alpaca')")
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": f"{instruction}\n\n{_MARK}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        raise ValueError(f"unknown template {template!r}; expected 'chat' or 'alpaca'")
    prefix, _, suffix = str(text).partition(_MARK)
    return prefix, suffix


@dataclass
class Prompt:
    """Token ids of one prompt (the answer starts right after them) and the purchases it shows."""

    ids: np.ndarray  # (L,) int64
    shown: int  # history items shown (the newest ``shown``)


class PromptBuilder:
    """Token-level prompt assembly with a per-line token cache; see the module docstring."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, words: ItemWords, template: Literal["chat", "alpaca"],
                 instruction: str, system: str = "", max_history_tokens: int = 192, max_history: int = 20,
                 brand: bool = True, category: bool = True, review_chars: int = 60) -> None:
        self.tok, self.words = tokenizer, words
        self.max_history_tokens, self.max_history = max_history_tokens, max_history
        self.brand, self.category, self.review_chars = brand, category, review_chars
        prefix, suffix = render(template, instruction, system, tokenizer)
        self.prefix = self.encode(prefix + "Purchases, oldest first:\n")
        self.suffix = self.encode(suffix)
        self.none = self.encode("(no purchases shown)\n")
        eos = tokenizer.eos_token_id
        self.end = np.array([] if eos is None else [eos], dtype=np.int64)  # closes every answer
        self._lines: dict[tuple[int, float | None, str | None], np.ndarray] = {}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def line(self, item: int, rating: float | None, review: str | None) -> np.ndarray:
        key = (int(item), rating, review)
        if key not in self._lines:
            self._lines[key] = self.encode(history_line(self.words, int(item), rating, review, self.brand,
                                                        self.category, self.review_chars))
        return self._lines[key]

    def history_ids(self, history: np.ndarray, ratings: np.ndarray | None = None,
                    reviews: Sequence[str | None] | None = None) -> tuple[np.ndarray, int]:
        """(ids of the newest purchases that fit the budget, oldest first; how many are shown)."""
        lines: list[np.ndarray] = []
        used = 0
        n = len(history)
        for j in range(n - 1, max(-1, n - 1 - self.max_history), -1):  # newest first, oldest dropped
            r = None if ratings is None else float(ratings[j])
            line = self.line(int(history[j]), None if r is not None and np.isnan(r) else r,
                             None if reviews is None else reviews[j])
            if used + len(line) > self.max_history_tokens:
                break
            lines.append(line)
            used += len(line)
        if not lines:
            return self.none, 0
        return np.concatenate(lines[::-1]), len(lines)

    def build(self, history: np.ndarray, options: Sequence[int] | None = None, ratings: np.ndarray | None = None,
              reviews: Sequence[str | None] | None = None) -> Prompt:
        """The prompt for ``history`` (item ids, oldest first) and optional candidate ``options``."""
        hist, shown = self.history_ids(np.asarray(history, dtype=np.int64), ratings, reviews)
        parts = [self.prefix, hist]
        if options is not None:
            parts.append(self.encode("\n" + options_block(self.words, options)))
        parts.append(self.suffix)
        return Prompt(np.concatenate(parts), shown)

    def answer_ids(self, text: str) -> np.ndarray:
        """Token ids of an answer text plus the end token."""
        return np.concatenate([self.encode(text), self.end])


def with_answer(prompt: np.ndarray, answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of prompt + answer: ``labels[p]`` = ``ids[p + 1]`` where ``p + 1`` is an answer
    token, ``IGNORE`` elsewhere (the loss reads the answer only)."""
    ids = np.concatenate([prompt, answer]).astype(np.int64)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    start = len(prompt) - 1
    labels[start : start + len(answer)] = answer
    return ids, labels

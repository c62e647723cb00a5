"""Prompts built from a user's chronological history, as token ids, with answer-only labels.

A prompt is ``prefix + history + suffix`` where ``prefix``/``suffix`` come from a template
(Alpaca, Phi-3, the backbone's own chat template, or a bare one) rendered around a placeholder,
and the history is one segment per purchase, oldest first::

    <|item_17|> Swingline Stapler, Desk, 20 Sheets\n
    <|item_4|> Post-it Notes, 3 x 3 in (rated 5: works great)\n

Segments are token ids assembled directly (each item's segment is tokenized once and cached), so
item tokens are never split into sub-word pieces. When the history does not fit the token budget
the oldest segments are dropped. The answer (one or more item tokens) follows the suffix; its
labels are the only ones set (``IGNORE`` elsewhere), unless the caller asks for the next-item
labels inside the history as well (``dense``).

Label convention: ``labels[p]`` is the item row predicted from the hidden state at position ``p``
(already shifted), so a loss reads ``hidden[labels != IGNORE]`` against ``labels[labels != IGNORE]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Template = Literal["alpaca", "phi3", "chat", "plain"]
TEMPLATES: tuple[str, ...] = ("alpaca", "phi3", "chat", "plain")
IGNORE = -100
HISTORY_MARK = "\u0000HISTORY\u0000"

_ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{history}\n### Response:\n"
)
_PHI3 = "<|user|>\n{instruction}\n{history}<|end|>\n<|assistant|>\n"
_PLAIN = "{instruction}\n{history}Next:"


def item_token(i: int | str) -> str:
    """The tokenizer string of item ``i`` (``<|item_END|>`` for the end/padding row)."""
    return f"<|item_{i}|>"


def user_token(u: int | str) -> str:
    """The tokenizer string of user ``u`` (``<|user_UNK|>`` for users unseen in training)."""
    return f"<|user_{u}|>"


def render_template(template: Template, instruction: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prefix, suffix) text around the history for ``template``."""
    if template == "alpaca":
        text = _ALPACA.format(instruction=instruction, history=HISTORY_MARK)
    elif template == "phi3":
        text = _PHI3.format(instruction=instruction, history=HISTORY_MARK)
    elif template == "plain":
        text = _PLAIN.format(instruction=instruction, history=HISTORY_MARK)
    elif template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat': this backbone's tokenizer has no chat template")
        messages = [{"role": "user", "content": f"{instruction}\n{HISTORY_MARK}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    prefix, _, suffix = str(text).partition(HISTORY_MARK)
    return prefix, suffix


def interaction_note(rating: float | None, review: str | None, max_review_chars: int) -> str:
    """`` (rated 5: text)`` for the purchases where the dataset has a rating or review."""
    parts = []
    if rating is not None and not np.isnan(rating):
        parts.append(f"rated {rating:g}")
    if review and max_review_chars > 0:
        parts.append(review[:max_review_chars].replace("\n", " "))
    return f" ({': '.join(parts)})" if parts else ""


@dataclass
class Prompt:
    """One tokenized prompt. ``ids`` (L,) int64; ``seg_ends[j]`` the position of the last token of
    history segment ``j``; ``items`` the history items kept (oldest first, same length)."""

    ids: np.ndarray
    seg_ends: np.ndarray
    items: np.ndarray


class PromptBuilder:
    """Turns histories of dataset item ids into token-id prompts for one tokenizer and template.

    ``n_base`` is the backbone's vocabulary size: item ``i`` is token ``n_base + i``.
    ``titles`` (one per item) are shown truncated to ``title_tokens`` tokens (0 = item tokens only).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n_base: int,
        titles: Sequence[str],
        template: Template = "alpaca",
        instruction: str = "Given the user's purchases in order, predict the next item.",
        title_tokens: int = 8,
        max_tokens: int = 256,
        max_history: int = 50,
        max_review_chars: int = 100,
    ) -> None:
        self.tokenizer = tokenizer
        self.n_base = int(n_base)
        self.max_tokens = int(max_tokens)
        self.max_history = int(max_history)
        self.max_review_chars = int(max_review_chars)
        prefix, suffix = render_template(template, instruction, tokenizer)
        self.prefix = self._encode(prefix)
        self.suffix = self._encode(suffix)
        self.newline = self._encode("\n")
        titles_ids = tokenizer([" " + t for t in titles], add_special_tokens=False)["input_ids"] if titles else []
        # segment of item i: [item token] + first title tokens + newline
        self.segments = [
            [self.n_base + i, *list(t)[:title_tokens], *self.newline] for i, t in enumerate(titles_ids)
        ]
        if self.max_tokens < len(self.prefix) + len(self.suffix) + 2:
            raise ValueError(f"max_tokens={max_tokens} cannot hold the template ({len(self.prefix) + len(self.suffix)} tokens)")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def segment(self, item: int, rating: float | None = None, review: str | None = None) -> list[int]:
        seg = self.segments[item]
        note = interaction_note(rating, review, self.max_review_chars)
        if note:
            seg = seg[:-len(self.newline)] + self._encode(note) + self.newline
        return seg

    def build(
        self,
        history: np.ndarray,
        reserve: int = 0,
        ratings: Sequence[float | None] | None = None,
        reviews: Sequence[str | None] | None = None,
        lead: Sequence[int] = (),
        tail: Sequence[int] = (),
    ) -> Prompt:
        """The prompt for ``history`` (chronological item ids), leaving ``reserve`` tokens for the answer.

        Segments are taken from the newest end until the budget ``max_tokens - reserve`` is used;
        at least the newest item token is always kept. ``lead`` token ids (a user token) come
        right after the template's prefix, ``tail`` ids (a history-state token) after its suffix,
        so that only the answer positions see them.
        """
        history = np.asarray(history, dtype=np.int64)
        budget = self.max_tokens - reserve - len(self.prefix) - len(self.suffix) - len(lead) - len(tail)
        segs: list[list[int]] = []
        used = 0
        start = max(0, len(history) - self.max_history)
        for j in range(len(history) - 1, start - 1, -1):
            seg = self.segment(
                int(history[j]),
                None if ratings is None else ratings[j],
                None if reviews is None else reviews[j],
            )
            if used + len(seg) > budget:
                if not segs:  # the newest item always appears, as its bare token
                    segs.append([seg[0]])
                break
            segs.append(seg)
            used += len(seg)
        segs.reverse()
        ids = list(self.prefix) + [int(t) for t in lead]
        ends = []
        for seg in segs:
            ids.extend(seg)
            ends.append(len(ids) - 1)
        ids.extend(self.suffix)
        ids.extend(int(t) for t in tail)
        kept = history[len(history) - len(segs):] if segs else history[:0]
        return Prompt(np.asarray(ids, dtype=np.int64), np.asarray(ends, dtype=np.int64), kept)


def training_example(
    prompt: Prompt, answer: Sequence[int], n_base: int, dense: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids (L,), labels (L,), answer_mask (L,) bool) for a prompt and its answer item rows.

    Input is ``prompt + answer[:-1]`` as item tokens; ``labels`` hold the answer rows at the
    positions that predict them (prompt end, then each answer token) and ``IGNORE`` elsewhere,
    so the loss covers the answer tokens only. With ``dense`` the end of each history segment
    also predicts the next history item.
    """
    answer = [int(a) for a in answer]
    ids = np.concatenate([prompt.ids, np.asarray([n_base + a for a in answer[:-1]], dtype=np.int64)])
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    start = len(prompt.ids) - 1
    labels[start : start + len(answer)] = answer
    answer_mask = labels != IGNORE
    if dense and len(prompt.items) > 1:
        labels[prompt.seg_ends[:-1]] = prompt.items[1:]
    return ids, labels, answer_mask

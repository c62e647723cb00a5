"""Scoring every option of a candidate list in one forward pass, through its letter (a verbalizer).

The prompt ends where the answer begins; the logits at that last position, read at the token ids
of the letters ``A``, ``B``, ... give every option's score at once (log-softmax over the
vocabulary, then restricted to the N letters). :func:`per_option_logprob` computes the same
quantity the slow way (one forward pass per option, reading the log-probability of the option's
letter as the answer's first token) and exists to test that the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llmrec.models.instruct.lm import head, hidden_states
from llmrec.models.instruct.prompts import LETTERS


def letter_ids(tokenizer: Any, n: int) -> np.ndarray:
    """(n,) token ids of the letters ``A``.. as an answer's first token; each letter must be one token."""
    ids = []
    for letter in LETTERS[:n]:
        enc = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"option letter {letter!r} is {len(enc)} tokens in this tokenizer; the verbalizer "
                             "needs single-token letters")
        ids.append(enc[0])
    if len(set(ids)) != n:
        raise ValueError("option letters share token ids in this tokenizer")
    return np.asarray(ids, dtype=np.int64)


def pad_right(rows: Sequence[np.ndarray], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded int64 ids and their (B, L) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def option_logprobs(lm: Any, prompts: Sequence[np.ndarray], letters: np.ndarray, pad_id: int,
                    device: torch.device) -> torch.Tensor:
    """(B, N) float32 log-probabilities of each option's letter as the answer's first token (log-softmax
    over the whole vocabulary), one forward pass for the batch of ``prompts``."""
    ids, mask = pad_right(prompts, pad_id, device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    h = hidden_states(lm, ids, mask)  # (B, L, H)
    logits = head(lm, h[torch.arange(len(prompts), device=device), last])  # (B, V)
    return torch.log_softmax(logits, dim=-1)[:, torch.as_tensor(letters, device=device)]


def per_option_logprob(lm: Any, prompt: np.ndarray, letters: np.ndarray, device: torch.device) -> np.ndarray:
    """(N,) the same as :func:`option_logprobs` for one prompt, one full forward pass per option (slow)."""
    out = []
    for letter in letters:
        ids = torch.as_tensor(np.concatenate([prompt, [letter]]), device=device)[None]
        logits = causal_logits(lm, ids)[0, len(prompt) - 1]  # (V,)
        out.append(float(torch.log_softmax(logits.float(), -1)[int(letter)]))
    return np.asarray(out)


def causal_logits(lm: Any, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of the whole model's own forward (the reference path)."""
    return lm(input_ids=ids).logits

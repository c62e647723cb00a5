"""Scoring every option of a candidate list by the likelihood of its *title*, in one forward pass.

The letter verbalizer (:mod:`.verbalizer`) asks the LM to name an option's letter, a skill a small
backbone must first learn from many examples. This scorer asks what a causal LM already does: how
likely is each option's title (plus the end token) as the answer to the prompt? All N titles are
packed after one shared prompt::

    [prompt p_0 .. p_{L-1}] [title 1 + end] [title 2 + end] ... [title N + end]

under a 4D attention mask in which a title's tokens see the prompt and the earlier tokens of their
own title only, with position ids that restart at ``L`` for every title, so each title is read
exactly as if it alone followed the prompt (:func:`per_option_title_logprob` checks that the slow
way). An option's score is the sum of its tokens' log-probabilities (log p(title, end | prompt)), or
their mean (``per_token``): sums of titles of different lengths differ by tens of nats, so a softmax
over sums starts saturated on the shortest titles. Training uses the same scores: a softmax over the
N options, cross-entropy on the true one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmrec.models.instruct.lm import causal, head


@dataclass
class Packed:
    """A batch of packed prompts + options (see the module docstring); B rows, width W, N options."""

    ids: torch.Tensor  # (B, W) int64, padding = pad id
    positions: torch.Tensor  # (B, W) int64 position ids
    mask: torch.Tensor  # (B, 1, W, W) bool, True = may attend
    src: torch.Tensor  # (M,) flat index b * W + position whose logits predict token ``tgt``
    tgt: torch.Tensor  # (M,) int64 predicted token ids
    option: torch.Tensor  # (M,) flat option index b * N + j of each predicted token
    n_options: int


def pack(prompts: Sequence[np.ndarray], options: Sequence[Sequence[np.ndarray]], pad_id: int,
         device: torch.device) -> Packed:
    """Pack each prompt (L_b,) with its N answer token rows (title + end, each >= 1 token)."""
    n_opt = len(options[0])
    if any(len(o) != n_opt for o in options):
        raise ValueError("every prompt needs the same number of options")
    rows, pos, seg = [], [], []
    src, tgt, opt = [], [], []
    width = max(len(p) + sum(len(a) for a in o) for p, o in zip(prompts, options, strict=True))
    for b, (p, opts) in enumerate(zip(prompts, options, strict=True)):
        n_p = len(p)
        ids, ps, sg = [np.asarray(p, np.int64)], [np.arange(n_p)], [np.zeros(n_p, np.int64)]
        at = n_p
        for j, a in enumerate(opts):
            if len(a) == 0:
                raise ValueError("an option's answer has no tokens")
            ids.append(np.asarray(a, np.int64))
            ps.append(n_p + np.arange(len(a)))
            sg.append(np.full(len(a), j + 1))
            # token t of the answer is predicted from the prompt's last position (t = 0) or the answer's token t-1
            src.append(b * width + np.concatenate([[n_p - 1], at + np.arange(len(a) - 1)]))
            tgt.append(np.asarray(a, np.int64))
            opt.append(np.full(len(a), b * n_opt + j))
            at += len(a)
        rows.append(np.concatenate(ids))
        pos.append(np.concatenate(ps))
        seg.append(np.concatenate(sg))
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    seg_t = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 = padding
    for b, (r, ps, sg) in enumerate(zip(rows, pos, seg, strict=True)):
        ids_t[b, : len(r)], pos_t[b, : len(r)], seg_t[b, : len(r)] = (torch.as_tensor(r), torch.as_tensor(ps),
                                                                       torch.as_tensor(sg))
    q, k = seg_t[:, :, None], seg_t[:, None, :]  # (B, W, 1), (B, 1, W)
    causal_mask = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal_mask & (k >= 0) & ((k == 0) | (k == q))  # (B, W, W)
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    return Packed(ids_t.to(device), pos_t.to(device), mask[:, None].to(device),
                  torch.as_tensor(np.concatenate(src), device=device), torch.as_tensor(np.concatenate(tgt),
                                                                                         device=device),
                  torch.as_tensor(np.concatenate(opt), device=device), n_opt)


def attention_mask(lm: Any, allowed: torch.Tensor) -> torch.Tensor:
    """The 4D mask in the form the backbone's attention takes it: boolean for SDPA (True = may attend), but
    additive (0 / most negative float) for eager attention, which *adds* the mask to its scores (a boolean
    mask would be added as 1 / 0 and mask nothing)."""
    if getattr(causal(lm).config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def title_logprobs(lm: Any, packed: Packed, per_token: bool = False, chunk: int = 1024) -> torch.Tensor:
    """(B, N) float32 log p(option's answer tokens | prompt), summed over its tokens (``per_token``: the
    mean over them); differentiable. The vocabulary logits are formed ``chunk`` tokens at a time."""
    h = causal(lm).base_model(input_ids=packed.ids, attention_mask=attention_mask(lm, packed.mask),
                              position_ids=packed.positions).last_hidden_state  # (B, W, H)
    flat = h.reshape(-1, h.shape[-1])[packed.src]  # (M, H)
    parts = []
    for s in range(0, len(flat), chunk):
        logits = head(lm, flat[s : s + chunk])  # (m, V) float32
        tok = packed.tgt[s : s + chunk]
        parts.append(logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1))
    token_lp = torch.cat(parts)  # (M,)
    b = packed.ids.shape[0]
    out = torch.zeros(b * packed.n_options, dtype=torch.float32, device=token_lp.device)
    out = out.index_add(0, packed.option, token_lp)
    if per_token:
        out = out / torch.bincount(packed.option, minlength=len(out)).clamp(min=1)
    return out.view(b, packed.n_options)


def per_option_title_logprob(lm: Any, prompt: np.ndarray, answers: Sequence[np.ndarray],
                             device: torch.device) -> np.ndarray:
    """(N,) the same as :func:`title_logprobs` for one prompt, one plain forward pass per option (slow)."""
    out = []
    for a in answers:
        ids = torch.as_tensor(np.concatenate([prompt, a]), device=device)[None]
        logits = lm(input_ids=ids).logits[0].float()  # (L, V)
        lp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(a)], dim=-1)
        out.append(float(lp[torch.arange(len(a)), torch.as_tensor(a, device=device)].sum()))
    return np.asarray(out)

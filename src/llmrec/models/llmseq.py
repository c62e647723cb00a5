"""LLM-enhanced sequential recommender: SASRec whose item rows are read from the item text by a
language model (the UniSRec / LLM-ESR / AlphaFuse idea, written from the papers' descriptions).

Every item's text (title, brand, categories, optionally the start of its description) is embedded
once by a frozen language model: a sentence-transformers model (all-MiniLM-L6-v2 offline by
default) or a causal LM's mean-pooled hidden states (``text_model="lm:smollm2-135m-instruct"``).
The vectors are cached on disk (``$LLMREC_CACHE/embeddings``), normalised (centred and PCA-whitened
by default) and stored with the weights, so scoring never re-embeds. A trainable adapter maps them
to the encoder's width, and the item row of item ``j`` is

    fused:  id_emb[j] + adapter(text[j])     text:  adapter(text[j])     id:  id_emb[j]

used both as the encoder's input embedding and as the output layer (tied, as in SASRec), so an item
bought too rarely for its id embedding to learn anything still gets a row from its text.
``item_repr="dual"`` keeps the two views apart (LLM-ESR's dual-view modelling): the encoder reads the
sequence twice, once through the text rows and once through the id rows, and a history's logit for
item ``j`` is ``h_text . adapter(text[j]) + h_id . id_emb[j]`` (the two states concatenated, width
``2 * hidden_size``). ``id_init="text"`` starts the id rows from the text's first principal axes
(LLM-ESR / LLMInit), so ids begin where the text puts them and training moves them from there. The
encoder is :class:`llmrec.models.sasrec.SASRecNet` with all of its options (the causal low-pass
filter beside attention included), trained by the same task on the shared loop.

Id spaces as in SASRec: dataset items ``0..n_items-1``; network tokens are shifted by +1 (0 = pad).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from llmrec.data.dataset import Catalog
from llmrec.data.splits import Split
from llmrec.models.sasrec import SASRec, SASRecConfig, SASRecNet
from llmrec.models.train import say

TEXT_FIELDS = ("title", "brand", "categories", "description")


@dataclass
class LLMSeqRecConfig(SASRecConfig):
    """SASRec's options plus where the item rows come from (defaults chosen on Beauty validation)."""

    item_repr: Literal["fused", "text", "id", "dual"] = "fused"
    id_init: Literal["normal", "text"] = "normal"  # id rows ~ N(0, 0.02), or the text's principal axes
    text_model: str = "all-MiniLM-L6-v2"  # sentence-transformers id/folder, "lm:<backbone>", or "hash"
    text_fields: list[str] = field(default_factory=lambda: ["title", "brand", "categories"])
    description_chars: int = 200  # characters of the description, when "description" is a field
    text_norm: Literal["whiten", "center", "none"] = "whiten"
    adapter: Literal["linear", "mlp"] = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [f for f in self.text_fields if f not in TEXT_FIELDS]
        if bad or not self.text_fields:
            raise ValueError(f"text_fields must be a non-empty subset of {list(TEXT_FIELDS)}, got {self.text_fields}")
        if self.description_chars < 0:
            raise ValueError("description_chars must be >= 0")
        if self.id_init == "text" and self.item_repr == "text":
            raise ValueError("id_init='text' needs id rows; item_repr='text' has none")

    @property
    def needs_text(self) -> bool:
        """Whether fitting embeds the item texts (for text rows or for the id rows' start)."""
        return self.item_repr != "id" or self.id_init == "text"


def item_text(catalog: Catalog, item: int, fields: Sequence[str], description_chars: int = 200) -> str:
    """The text of dataset item ``item`` made of ``fields`` (its raw id when all of them are empty)."""
    parts = []
    if "title" in fields and catalog.titles[item]:
        parts.append(catalog.titles[item])
    if "brand" in fields and catalog.brands[item]:
        parts.append(f"Brand: {catalog.brands[item]}")
    if "categories" in fields and catalog.categories[item]:
        parts.append("Categories: " + ", ".join(catalog.categories[item]))
    if "description" in fields and catalog.descriptions[item] and description_chars > 0:
        parts.append("Description: " + catalog.descriptions[item][:description_chars])
    return ". ".join(parts) if parts else str(catalog.item_ids[item])


def normalise_text_vectors(x: np.ndarray, how: str) -> np.ndarray:
    """(n, D) -> (n, D) float32: ``"center"`` subtracts the mean row; ``"whiten"`` also rotates to the
    principal axes and scales each to unit variance (axes with ~zero variance are dropped to 0)."""
    x = np.asarray(x, dtype=np.float64)
    if how == "none":
        return x.astype(np.float32)
    x = x - x.mean(axis=0, keepdims=True)
    if how == "center":
        return x.astype(np.float32)
    if how != "whiten":
        raise ValueError(f"unknown text_norm {how!r}")
    cov = x.T @ x / max(1, len(x) - 1)  # (D, D)
    vals, vecs = np.linalg.eigh(cov)
    scale = np.where(vals > 1e-8 * max(vals.max(), 1e-12), 1.0 / np.sqrt(np.maximum(vals, 1e-12)), 0.0)
    return (x @ vecs * scale).astype(np.float32)


def text_init_rows(text: torch.Tensor, width: int, std: float = 0.02) -> torch.Tensor:
    """(n_items, D) whitened text vectors -> (n_items, width) id rows with spread ``std``: the first
    ``width`` principal axes of the text (zero columns when D < width), each scaled to std ``std``."""
    x = text.double() - text.double().mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # rows of v: principal axes, largest first
    z = x @ v[:width].T  # (n_items, min(width, D))
    z = z / z.std(dim=0, keepdim=True).clamp_min(1e-12) * std
    return torch.cat([z, z.new_zeros(len(z), width - z.shape[1])], dim=1).float()


class TextItemNet(SASRecNet):
    """SASRecNet whose item rows are ``id_emb + adapter(text)`` (or one of the two, or both side by side).

    ``text``: (n_items, D) frozen vectors of dataset items, or None for ``item_repr="id"`` with
    ``id_init="normal"``.
    """

    def __init__(self, cfg: LLMSeqRecConfig, n_items: int, text: torch.Tensor | None) -> None:
        super().__init__(cfg, n_items)
        self.repr = cfg.item_repr
        if self.repr == "dual":
            self.out_width = 2 * cfg.hidden_size
        if self.repr == "text":
            del self.item_emb  # no id embedding at all: every row comes from the text
        elif cfg.id_init == "text":
            if text is None:
                raise ValueError("id_init='text' needs item text vectors")
            with torch.no_grad():
                self.item_emb.weight[1:] = text_init_rows(text, cfg.hidden_size)
        if self.repr != "id":
            if text is None:
                raise ValueError(f"item_repr={self.repr!r} needs item text vectors")
            D, H = int(text.shape[1]), cfg.hidden_size
            self.register_buffer("text", torch.cat([text.new_zeros(1, D), text.float()]))  # (n_items + 1, D)
            if cfg.adapter == "linear":
                self.adapter: nn.Module = nn.Linear(D, H)
            else:
                self.adapter = nn.Sequential(nn.Linear(D, cfg.inner_size), nn.GELU(), nn.Linear(cfg.inner_size, H))
            self.adapter.apply(self._init_weights)

    def item_table(self) -> torch.Tensor:
        """(n_items + 1, out_width) item rows, row 0 (padding) all zero; "dual": [text rows, id rows]."""
        if self.repr == "id":
            return self.item_emb.weight
        rows = self.adapter(self.text)  # (n_items + 1, H)
        rows = torch.cat([rows.new_zeros(1, rows.shape[1]), rows[1:]])  # padding row stays 0
        if self.repr == "dual":
            return torch.cat([rows, self.item_emb.weight], dim=1)  # (n_items + 1, 2H)
        return rows if self.repr == "text" else rows + self.item_emb.weight

    def hidden(self, tokens: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) tokens -> (B, L, out_width); "dual" runs the shared encoder once per view and
        concatenates [text-view states, id-view states]."""
        if self.repr != "dual":
            return super().hidden(tokens, table)
        table = self.item_table() if table is None else table  # (n_items + 1, 2H)
        H = self.cfg.hidden_size
        return torch.cat([super().hidden(tokens, table[:, :H]), super().hidden(tokens, table[:, H:])], dim=-1)


class LLMSeqRec(SASRec):
    """SASRec with language-model item rows (see the module docstring). Needs ``split.catalog``."""

    name = "llm-seqrec"
    Config = LLMSeqRecConfig

    def __init__(self, config: LLMSeqRecConfig, n_items: int) -> None:
        self._text: torch.Tensor | None = None  # (n_items, D) once fit / load has embedded the item texts
        self.config: LLMSeqRecConfig = config
        super().__init__(config, n_items)
        self.text_seconds = 0.0

    def _new_net(self) -> SASRecNet:
        if self.config.needs_text and self._text is None:
            return super()._new_net()  # a placeholder until fit / load knows the text vectors
        return TextItemNet(self.config, self.n_items, self._text)

    def _build(self, text: np.ndarray | None) -> None:
        self._text = None if text is None else torch.from_numpy(np.asarray(text, dtype=np.float32))
        self._build_net()

    def text_vectors(self, catalog: Catalog | None, progress: bool = False) -> np.ndarray:
        """(n_items, D) normalised frozen text vectors of every item (embedded once, cached on disk)."""
        from llmrec.models.semantic_ids.embed import get_embedder

        c = self.config
        if catalog is None:
            raise ValueError(f"llm-seqrec with item_repr={c.item_repr!r}, id_init={c.id_init!r} needs item text, and "
                             "this split has no catalog; use item_repr='id', id_init='normal' for id-only data")
        if len(catalog) != self.n_items:
            raise ValueError(f"catalog has {len(catalog)} items, the model was built for {self.n_items}")
        texts = [item_text(catalog, i, c.text_fields, c.description_chars) for i in range(self.n_items)]
        say(progress, f"llm-seqrec: embedding {len(texts)} item texts with {c.text_model}")
        t0 = time.perf_counter()
        vecs = get_embedder(c.text_model, device=c.device).encode(texts)  # (n_items, D)
        self.text_seconds = time.perf_counter() - t0
        return normalise_text_vectors(vecs, c.text_norm)

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Embed the item texts (when ``config.needs_text``), then train exactly as SASRec does."""
        if split.n_items != self.n_items:
            raise ValueError(f"split has {split.n_items} items but the model was built for {self.n_items}")
        if self.config.needs_text:
            self._build(self.text_vectors(split.catalog, progress))
        out = super().fit(split, progress=progress, workdir=workdir)
        out["text_seconds"] = self.text_seconds
        return out

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        text = tensors.get("text")
        self._build(None if text is None else np.asarray(text)[1:])
        super()._load_state(tensors, extra)

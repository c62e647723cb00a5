"""Collaborative item vectors: the item embeddings of a SASRec fitted on a split's training sequences.

Other model families start from them where text alone lacks co-purchase signal (the hybrid item
representations of LLaRA / E4SRec / ETEGRec / LETTER): the item-token LM initializes the low-rank
part of its item rows with them, the semantic-ID model can quantize text and collaborative vectors
together. SASRec reads ``split.train`` and early-stops on ``split.valid``; ``split.test`` is never read.

The *companion* (this SASRec as the LLM families share it) is written once here: its config keys
(:class:`CompanionKeys`, which the families' configs extend), its fit and disk cache
(:func:`fit_companion`), the choice of its prior weight on validation (:func:`choose_prior`), packing
it into a saved model (:func:`pack_frozen` / :func:`unpack_frozen`) and changing the weight of a
saved model (:func:`set_prior`, behind ``llmrec evaluate --prior-weight``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.data.splits import Split, hash_split_into
from llmrec.fsutil import atomic_path
from llmrec.models.sasrec import SASRec, SASRecConfig
from llmrec.models.train import is_main_process


def default_cache_dir() -> Path:
    """``$LLMREC_CACHE/collab`` (default ``~/.cache/llmrec/collab``)."""
    from llmrec.cache import cache_root

    return cache_root() / "collab"


# SASRec config keys that cannot change the fitted model unless the budget binds (see fit_key)
_FIT_FREE = ("max_minutes", "num_threads", "device", "eval_batch_size")


@dataclass
class CompanionKeys:
    """Config keys of the SASRec companion; the LLM families' configs extend this (and may give other
    defaults). ``prior_widen`` and ``prior_alone`` 0 / False keep the choice of the releases before them."""

    # which model is the companion: "sasrec", or "llm-seqrec" (SASRec with language-model item rows, whose
    # states, item vectors and logits the families read the same way)
    companion: str = "sasrec"
    collab_minutes: float = 10.0  # the companion's training budget (before the family's own; counted in train time)
    collab_cache: bool = True  # reuse a companion fitted earlier on the same split and config
    # SASRec as a prior at inference (a product of experts; 0 = the family alone). With a grid, fit picks the
    # weight among {collab_prior} + the grid by NDCG@10 on prior_valid_users validation users (0 = all; never test)
    collab_prior: float = 0.0
    collab_prior_grid: list[float] = field(default_factory=list)
    prior_valid_users: int = 0
    prior_widen: int = 3  # doublings of the grid's top weight tried while the best weight is the largest one
    prior_alone: bool = True  # the companion alone is a candidate too (chosen when no mix beats it)

    def check_companion(self) -> None:
        if self.companion not in _companions():
            raise ValueError(f"companion must be one of {sorted(_companions())}, got {self.companion!r}")
        if self.collab_minutes <= 0:
            raise ValueError(f"collab_minutes must be > 0, got {self.collab_minutes}")
        if self.collab_prior < 0 or any(w < 0 for w in self.collab_prior_grid):
            raise ValueError("collab_prior and collab_prior_grid weights must be >= 0")
        if self.prior_valid_users < 0 or self.prior_widen < 0:
            raise ValueError("prior_valid_users and prior_widen must be >= 0")

    @property
    def uses_prior(self) -> bool:
        """Whether inference may add the SASRec prior (so the fitted SASRec is kept and saved)."""
        return self.collab_prior > 0 or any(w > 0 for w in self.collab_prior_grid)


def _companions() -> dict[str, type[SASRec]]:
    """The models a family may take as its companion, by name."""
    from llmrec.models.llmseq import LLMSeqRec

    return {SASRec.name: SASRec, LLMSeqRec.name: LLMSeqRec}


def fit_companion(split: Split, keys: CompanionKeys, seed: int, progress: bool = False) -> tuple[SASRec, dict[str, Any]]:
    """The companion of a family configured by ``keys``, with its default config, ``collab_minutes`` and
    ``seed`` (cached on disk unless ``collab_cache`` is off)."""
    cls = _companions()[keys.companion]
    return fit_sasrec(split, cls.Config(max_minutes=keys.collab_minutes, seed=seed), progress=progress,
                      cache_dir=default_cache_dir() if keys.collab_cache else None)


def split_key(split: Split, config: SASRecConfig) -> str:
    """The cache key before :func:`fit_key` (still read): sha256 of the whole config, the training
    sequences and the validation histories and targets (never the test set)."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    hash_split_into(h, split)
    return h.hexdigest()


def fit_key(split: Split, config: SASRecConfig) -> str:
    """The cache key of what determines a fitted SASRec: the config without its time budget, threads,
    device and scoring batch (they change nothing unless the budget binds, which the cached entry
    records), and the split as :func:`split_key` reads it."""
    free = dict.fromkeys(_FIT_FREE)
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in free}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True).encode())
    hash_split_into(h, split)
    return h.hexdigest()


def _load_cached(path: Path, model: SASRec, config: SASRecConfig) -> dict[str, Any] | None:
    """The info of the cached fit at ``path`` loaded into ``model``, or None (missing, damaged, foreign, or
    stopped by a time budget other than ``config``'s)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            info = json.loads(str(z["__info__"]))
            if info.get("stopped") == "max_minutes" and info.get("max_minutes", config.max_minutes) != config.max_minutes:
                return None  # the budget bound that fit: another budget gives another model
            model._load_state({k: z[k] for k in z.files if k != "__info__"}, {})
        return info
    except (OSError, ValueError, KeyError, RuntimeError):  # damaged or foreign: fit again, overwrite
        return None


def fit_sasrec(split: Split, config: SASRecConfig | None = None, progress: bool = False,
               cache_dir: Path | None = None) -> tuple[SASRec, dict[str, Any]]:
    """A SASRec fitted on ``split`` (early stopping on ``split.valid``) and
    ``{"seconds", "best_valid_ndcg@10", "best_epoch", "stopped", "max_minutes", "cached"}``.

    With ``cache_dir`` the fitted weights are stored there under :func:`fit_key` (written to a temporary
    file, then renamed) and a later call on the same split and config loads them (``cached`` True;
    ``seconds`` stays the original fit's time, so budgets can count it). Entries written under the
    older key (:func:`split_key`, which included the budget) are still found.
    """
    cfg = config or SASRecConfig()
    cls = _class_of(cfg)
    model = cls(cfg, split.n_items)
    new_key = fit_key(split, cfg) if cache_dir is not None else ""
    if cache_dir is not None:
        for key in (split_key(split, cfg), new_key):
            info = _load_cached(cache_dir / f"{cls.name}-{key[:32]}.npz", model, cfg)
            if info is not None:
                return model, {**info, "cached": True}
            model = cls(cfg, split.n_items)
    t0 = time.perf_counter()
    fit = model.fit(split, progress=progress)
    info = {"seconds": time.perf_counter() - t0, "best_valid_ndcg@10": float(fit["best_valid_ndcg@10"]),
            "best_epoch": int(fit["best_epoch"]), "stopped": str(fit["stopped"]), "max_minutes": cfg.max_minutes}
    if cache_dir is not None and is_main_process():
        path = cache_dir / f"{cls.name}-{new_key[:32]}.npz"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors, _ = model._state()
            with atomic_path(path) as tmp, tmp.open("wb") as f:
                np.savez(f, __info__=np.array(json.dumps(info)), **tensors)
        except OSError:  # a read-only cache must not stop training
            pass
    return model, {**info, "cached": False}


def _class_of(config: SASRecConfig) -> type[SASRec]:
    """The companion class whose config ``config`` is (the most derived match)."""
    for cls in reversed(list(_companions().values())):
        if isinstance(config, cls.Config):
            return cls
    raise TypeError(f"no companion model takes a {type(config).__name__}")


def sasrec_item_vectors(split: Split, config: SASRecConfig | None = None, progress: bool = False,
                        cache_dir: Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(n_items, hidden_size) float32 item vectors (dataset item ids) of :func:`fit_sasrec`, and its info."""
    model, info = fit_sasrec(split, config, progress, cache_dir)
    return model.item_vectors(), info


def fit_width(vectors: np.ndarray, width: int) -> np.ndarray:
    """(N, d) -> (N, width): centred, then the top-``width`` principal components when d > width,
    zero columns appended when d < width. Dot products between centred rows are kept exactly when
    d <= width and as well as a rank-``width`` approximation allows otherwise."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or width < 1:
        raise ValueError(f"expected an (N, d) array and width >= 1, got shape {x.shape} and width {width}")
    x = x - x.mean(axis=0, keepdims=True)
    n, d = x.shape
    if d > width:
        _, _, vt = np.linalg.svd(x, full_matrices=False)  # vt: (min(n, d), d)
        x = x @ vt[:width].T  # (N, min(width, n))
        d = x.shape[1]
    if d < width:
        x = np.concatenate([x, np.zeros((n, width - d))], axis=1)
    return x.astype(np.float32)


def unit_rms_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled so that their mean Euclidean norm is 1 (relative sizes kept; all-zero stays zero)."""
    x = np.asarray(vectors, dtype=np.float32)
    mean = float(np.linalg.norm(x, axis=1).mean()) if len(x) else 0.0
    return x / mean if mean > 0 else x


def prefix_states(model: SASRec, sequences: Sequence[np.ndarray], last: int | Sequence[int]) -> list[np.ndarray]:
    """For each sequence (dataset item ids) the (m, hidden_size) float32 SASRec states of its last
    ``m = min(last, len)`` prefixes (``last``: one count for all, or one per sequence), oldest
    first: row j is the state of the sequence up to and including its ``len - m + j``-th item,
    computed on that prefix alone (SASRec's positions count from the newest item, so a longer
    input would shift them): no row sees a later item."""
    counts = [int(last)] * len(sequences) if isinstance(last, (int, np.integer)) else [int(x) for x in last]
    if len(counts) != len(sequences):
        raise ValueError(f"{len(counts)} prefix counts for {len(sequences)} sequences")
    prefixes, sizes = [], []
    for s, c in zip(sequences, counts, strict=True):
        a = np.asarray(s, dtype=np.int64)
        m = max(0, min(c, len(a)))
        prefixes.extend(a[: len(a) - m + j + 1] for j in range(m))
        sizes.append(m)
    d = model.state_size
    flat = model.user_states(prefixes) if prefixes else np.zeros((0, d), np.float32)
    out, start = [], 0
    for m in sizes:
        out.append(flat[start : start + m])
        start += m
    return out


def state_scale(model: SASRec, train: Sequence[np.ndarray]) -> float:
    """1 / the mean norm of SASRec's states of the non-empty training sequences (1.0 if there are
    none): states times this have mean norm 1, whatever scale SASRec's training gave them."""
    seqs = [s for s in train if len(s)]
    if not seqs:
        return 1.0
    return float(1.0 / max(float(np.linalg.norm(model.user_states(seqs), axis=1).mean()), 1e-8))


def pack_frozen(model: SASRec, scale: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A frozen SASRec (and its state scale) as ``collab.*`` tensors and an ``extra`` entry, so that
    it travels inside the saved files of the model that reads its states (see :func:`unpack_frozen`)."""
    tensors, _ = model._state()
    entry = {"sasrec_config": dataclasses.asdict(model.config), "state_scale": float(scale), "model": model.name}
    return {f"collab.{k}": v for k, v in tensors.items()}, entry


def unpack_frozen(tensors: dict[str, np.ndarray], extra: dict[str, Any], n_items: int,
                  owner: str) -> tuple[SASRec, float]:
    """The SASRec and state scale that :func:`pack_frozen` stored in ``tensors`` (its ``collab.*``
    entries) and ``extra["collab_state"]``; ``owner`` names the model in the error when they are missing."""
    from llmrec.config import from_dict

    if "collab_state" not in extra:
        raise ValueError(f"{owner}: its config reads SASRec states but the saved model has no SASRec")
    entry = extra["collab_state"]
    cls = _companions()[entry.get("model", SASRec.name)]  # saves before the choice of companion hold a SASRec
    model = cls(from_dict(cls.Config, entry["sasrec_config"]), n_items)
    model._load_state({k[len("collab."):]: v for k, v in tensors.items() if k.startswith("collab.")}, {})
    return model, float(entry["state_scale"])


def pack_companion(model: Any, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
    """Add an LLM family's prior (weight, alone) and its frozen companion, if it has one, to the
    ``tensors`` and ``extra`` it saves (in place); :func:`unpack_companion` reads them back."""
    extra["collab_prior"] = float(model.prior_weight)
    extra["collab_prior_alone"] = bool(model.prior_alone)
    if model.collab_model is not None:  # the frozen SASRec of the states / the prior travels with the model
        sas_tensors, extra["collab_state"] = pack_frozen(model.collab_model, model.state_scale)
        tensors.update(sas_tensors)


def unpack_companion(model: Any, tensors: dict[str, np.ndarray], extra: dict[str, Any], reads_states: bool) -> None:
    """Restore what :func:`pack_companion` saved onto ``model``; the companion is required when the model
    ``reads_states`` or its prior weight is on, and loaded whenever it was saved (so a weight can be re-chosen)."""
    model.collab_model = None
    model.prior_weight = float(extra.get("collab_prior", model.config.collab_prior))
    model.prior_alone = bool(extra.get("collab_prior_alone", False))
    if reads_states or model.prior_weight > 0 or "collab_state" in extra:
        model.collab_model, model.state_scale = unpack_frozen(tensors, extra, model.n_items, model.name)


def choose_weight(weights: Sequence[float], ndcg_at: Callable[[float], float],
                  widen: int = 0) -> tuple[list[float], list[float], float]:
    """Pick a SASRec prior weight on validation: the distinct ``weights`` in ascending order (all >= 0, at
    least one), ``ndcg_at(w)`` (validation NDCG@10 at weight w) of each, and the chosen weight, the first
    maximum (so the smallest weight among ties). While the best weight is the largest one tried (and > 0),
    up to ``widen`` more weights are tried, each twice the largest so far."""
    ws = sorted({float(w) for w in weights})
    if not ws or any(w < 0 for w in ws):
        raise ValueError(f"prior weights must be >= 0 and not empty, got {list(weights)}")
    scores = [float(ndcg_at(w)) for w in ws]
    for _ in range(widen):
        if int(np.argmax(scores)) != len(ws) - 1 or ws[-1] <= 0:
            break
        ws.append(2.0 * ws[-1])
        scores.append(float(ndcg_at(ws[-1])))
    return ws, scores, ws[int(np.argmax(scores))]


def choose_prior(keys: CompanionKeys, ndcg_at: Callable[[float], float], alone: Callable[[], float],
                 progress: bool = False) -> dict[str, Any]:
    """The prior choice of a family configured by ``keys``: every weight of {collab_prior} + grid (widened
    by ``prior_widen``) scored by ``ndcg_at``, and, with ``prior_alone``, the companion alone (``alone()``,
    its validation NDCG@10 on the same users), chosen only when it beats every mix. Returns
    ``{"weights", "valid_ndcg@10", "chosen", "companion_alone_ndcg@10", "alone"}``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(set(keys.collab_prior_grid) | {keys.collab_prior}) + int(keys.prior_alone),
               desc="prior weight", unit="w", disable=not progress)

    def scored(w: float) -> float:
        value = ndcg_at(w)
        bar.set_postfix(w=w, ndcg=f"{value:.4f}")
        bar.update(1)
        return value

    try:
        ws, scores, chosen = choose_weight([keys.collab_prior, *keys.collab_prior_grid], scored, keys.prior_widen)
        solo = float(alone()) if keys.prior_alone else float("nan")
        bar.update(int(keys.prior_alone))
    finally:
        bar.close()
    return {"weights": ws, "valid_ndcg@10": scores, "chosen": chosen, "companion_alone_ndcg@10": solo,
            "alone": bool(keys.prior_alone and solo > max(scores))}


def set_prior(model: Any, value: str | float) -> None:
    """Set a saved LLM model's prior: a weight >= 0 (0 = the LLM alone) or ``"alone"`` (the companion alone).
    Raises ValueError for a model without a saved companion or a bad value."""
    if getattr(model, "collab_model", None) is None:
        raise ValueError(f"{model.name}: this model has no SASRec companion saved with it, so it has no prior weight")
    if str(value) == "alone":
        model.prior_alone = True
        return
    try:
        weight = float(value)
    except ValueError:
        raise ValueError(f"prior weight must be a number >= 0 or 'alone', got {value!r}") from None
    if not weight >= 0 or weight == float("inf"):
        raise ValueError(f"prior weight must be a finite number >= 0 or 'alone', got {value!r}")
    model.prior_weight, model.prior_alone = weight, False

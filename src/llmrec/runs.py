"""Train, evaluate and recommend with run directories.

A run directory holds ``run.json`` (resolved config, dataset path and fingerprint, seed, git
commit, training facts), ``model/`` (``model.json`` + ``weights.safetensors``) and, after
``evaluate``, ``metrics.json``. Runs are written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmrec.config import ConfigError, apply_overrides, from_dict, load_toml
from llmrec.data.dataset import Dataset
from llmrec.data.splits import EvalSet, Split, leave_one_out, ratio, temporal
from llmrec.errors import LlmrecError
from llmrec.eval.protocol import EvalResult, evaluate_full, evaluate_sampled
from llmrec.eval.report import write_metrics_json
from llmrec.fsutil import atomic_write_text, output_lock
from llmrec.models.base import Recommender
from llmrec.models.collab import set_prior
from llmrec.models.registry import build_model, model_class
from llmrec.models.train import Checkpoint, is_main_process


@dataclass
class SplitConfig:
    """kind: leave-one-out | temporal (cut points in unix ms) | ratio (per-user fractions)."""

    kind: Literal["leave-one-out", "temporal", "ratio"] = "leave-one-out"
    valid_start: int | None = None
    test_start: int | None = None
    valid_frac: float = 0.1
    test_frac: float = 0.1


@dataclass
class ModelSection:
    """name: a key of the model registry; params: that model's config keys."""

    name: str = "sasrec"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Full ranking over the catalog by default; ``sampled`` ranks targets among N negatives."""

    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_seen: bool = True
    protocol: Literal["full", "sampled"] = "full"
    n_negatives: int = 100
    sampling: Literal["uniform", "popularity"] = "uniform"
    on: Literal["test", "valid"] = "test"

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be cut-offs >= 1, got {self.ks}")
        if self.n_negatives < 1:
            raise ValueError(f"n_negatives must be >= 1, got {self.n_negatives}")


@dataclass
class RunConfig:
    """Everything a training run needs; written back resolved into ``run.json``."""

    dataset: str = ""
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelSection = field(default_factory=ModelSection)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from an optional TOML file plus ``key=value`` overrides (strict)."""
    data = load_toml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data, where=str(path) if path else "config")
    model_class(cfg.model.name)  # unknown model names fail here, before any work
    if not cfg.dataset:
        raise ConfigError("missing key dataset (the prepared dataset directory)")
    return cfg


def make_split(ds: Dataset, cfg: SplitConfig, feedback: bool = False) -> Split:
    """The split that ``cfg`` describes (deterministic for a dataset), carrying the item catalog
    and, with ``feedback``, the users' ratings and reviews."""
    if cfg.kind == "leave-one-out":
        split = leave_one_out(ds.sequences, ds.n_items)
    elif cfg.kind == "ratio":
        split = ratio(ds.sequences, ds.n_items, cfg.valid_frac, cfg.test_frac)
    else:
        if ds.timestamps is None:
            raise ConfigError(f"split.kind=temporal: dataset {ds.path} has no timestamps")
        if cfg.valid_start is None or cfg.test_start is None:
            raise ConfigError("split.kind=temporal needs split.valid_start and split.test_start (unix ms)")
        split = temporal(ds.sequences, ds.timestamps, ds.n_items, cfg.valid_start, cfg.test_start)
    split = split.with_catalog(ds.catalog())
    return split.with_feedback(ds.feedback()) if feedback else split


def run_digest(record: dict[str, Any]) -> str:
    """sha256 of what decides how a run is loaded and evaluated (its config, dataset fingerprint and
    split), stored in ``run.json`` at training: an edited ``run.json`` no longer matches it."""
    what = {"config": record["config"], "fingerprint": record["dataset"]["fingerprint"], "split": record["split"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def git_commit() -> str:
    """The git commit of the llmrec source that runs (``+dirty`` if modified), or ``unknown`` when it is
    not a git checkout (an installed package); the working directory does not matter."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True, cwd=src)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True,
                               text=True, timeout=5, cwd=src)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _with_seed(model_name: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    cls = model_class(model_name)
    names = {f.name for f in fields(cls.Config)} if is_dataclass(cls.Config) else set()
    if "seed" in names and "seed" not in params:
        return {**params, "seed": seed}
    return params


def partial_dir(out: Path) -> Path:
    """The folder of a run still being trained into ``out``: its checkpoints, curves and TensorBoard
    events. Running the same ``train`` command again resumes from its checkpoint; when training is
    complete the model and ``run.json`` are written into it and it is renamed to ``out``."""
    return out.parent / f".{out.name}.partial"


def train(cfg: RunConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fit the configured model and write a run directory at ``out``; returns ``run.json``.

    Under a multi-process launch (``accelerate launch``, ``torchrun``) every process trains and only
    the main one writes the run directory."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LlmrecError(f"{out}: run directory already exists (use --force to replace it)")
    ds = Dataset.load(cfg.dataset)
    params = _with_seed(cfg.model.name, cfg.model.params, cfg.seed)
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, params, ds.n_items)
    split = make_split(ds, cfg.split, feedback=model.wants_feedback)
    work = partial_dir(out)
    main = is_main_process()
    lock = output_lock(out) if main else contextlib.nullcontext()
    with lock:
        return _train_locked(cfg, ds, model, split, out, work, main, progress)


def _train_locked(cfg: RunConfig, ds: Dataset, model: Recommender, split: Split, out: Path, work: Path, main: bool,
                  progress: bool) -> dict[str, Any]:
    if main:
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LlmrecError(f"{out}: cannot create the run folder ({e.strerror})") from None
    t0 = time.perf_counter()
    fit_info = model.fit(split, progress=progress, workdir=work)
    train_seconds = time.perf_counter() - t0
    resolved = asdict(cfg)
    resolved["model"]["params"] = asdict(model.config)
    record = {
        "config": resolved,
        "dataset": {"path": str(Path(cfg.dataset).resolve()), "fingerprint": ds.fingerprint,
                    "users": ds.n_users, "items": ds.n_items},
        "split": {"kind": split.name, "train_users": len(split.train), "valid_users": len(split.valid),
                  "test_users": len(split.test), **split.params},
        "seed": cfg.seed,
        "git_commit": git_commit(),
        "fit": fit_info,
        "train_seconds": train_seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record["digest"] = run_digest(record)
    if main:
        _finish_run(model, record, work, out)
    return record


def _finish_run(model: Recommender, record: dict[str, Any], work: Path, out: Path) -> None:
    """Save the model and ``run.json`` into the finished run's folder ``work``, drop its checkpoint,
    and move it to ``out`` (an older run there is replaced only once the new one is complete)."""
    for name in ("model", "run.json"):
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    model.save(work / "model")
    atomic_write_text(work / "run.json", json.dumps(record, indent=2, default=str))
    Checkpoint(work, {}).remove()
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(work, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@dataclass
class LoadedRun:
    path: Path
    record: dict[str, Any]
    config: RunConfig
    dataset: Dataset
    split: Split
    model: Recommender


def load_run(path: str | Path, dataset: str | Path | None = None) -> LoadedRun:
    """Load a run directory with its dataset (checked against the recorded fingerprint) and model."""
    path = Path(path)
    run_file = path / "run.json"
    if not run_file.exists():
        raise LlmrecError(f"{path}: not a run directory (no run.json; run `llmrec train` first)")
    try:
        record = json.loads(run_file.read_text())
        cfg = from_dict(RunConfig, record["config"], where=str(run_file))
        digest = run_digest(record)
        digest_ok = record.get("digest", digest) == digest  # runs from before digests pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LlmrecError(f"{run_file}: damaged run record ({type(e).__name__}: {e})") from None
    if not digest_ok:
        raise LlmrecError(f"{run_file}: edited after training (its config, dataset or split no longer match the "
                          "digest written with the model); train the run again")
    ds = Dataset.load(dataset or record["dataset"]["path"])
    if ds.fingerprint != record["dataset"]["fingerprint"]:
        raise LlmrecError(
            f"{ds.path}: dataset fingerprint {ds.fingerprint} differs from the one the run was trained on "
            f"({record['dataset']['fingerprint']})"
        )
    try:
        model = model_class(cfg.model.name).load(path / "model")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LlmrecError(f"{path / 'model'}: cannot load the model ({type(e).__name__}: {str(e)[:300]})") from None
    split = make_split(ds, cfg.split, feedback=model.wants_feedback)
    model.feedback = split.feedback
    return LoadedRun(path, record, cfg, ds, split, model)


def evaluate_run(
    run: LoadedRun, ecfg: EvalConfig | None = None, progress: bool = True, write: bool = True,
    prior_weight: str | float | None = None,
) -> EvalResult:
    """Evaluate a loaded run (on test by default) and write ``metrics.json`` beside it.

    ``prior_weight``: score an LLM model at another weight of its SASRec companion (a number >= 0, 0 =
    the LLM alone, or ``"alone"``: the companion alone) instead of the weight chosen on validation; the
    figures then go to ``metrics.prior-<weight>.json``, never over ``metrics.json``."""
    ecfg = ecfg or run.config.eval
    name = "metrics.json" if ecfg.protocol == "full" else f"metrics.sampled-{ecfg.sampling}-{ecfg.n_negatives}.json"
    if prior_weight is not None:
        try:
            set_prior(run.model, prior_weight)
        except ValueError as e:
            raise LlmrecError(f"{run.path}: --prior-weight: {e}") from None
        name = name.replace("metrics", f"metrics.prior-{prior_weight}", 1)
    evalset: EvalSet = run.split.test if ecfg.on == "test" else run.split.valid
    if len(evalset) == 0:
        raise LlmrecError(f"{run.path}: the {ecfg.on} set of this split is empty")
    if ecfg.protocol == "full":
        result = evaluate_full(run.model, evalset, ks=ecfg.ks, exclude_seen=ecfg.exclude_seen, progress=progress)
    else:
        counts = run.split.train_item_counts() if ecfg.sampling == "popularity" else None
        result = evaluate_sampled(run.model, evalset, n_negatives=ecfg.n_negatives, strategy=ecfg.sampling,
                                  item_counts=counts, ks=ecfg.ks, seed=run.config.seed)
    if write:
        write_metrics_json(run.path / name, result, {
            "run": str(run.path), "model": run.config.model.name, "seed": run.config.seed, "on": ecfg.on,
            "exclude_seen": ecfg.exclude_seen, "dataset_fingerprint": run.dataset.fingerprint,
            "prior_weight": prior_weight,
        })
    return result


def recommend_for_users(run: LoadedRun, user_ids: list[str], k: int = 10,
                        history: list[str] | None = None) -> list[dict[str, Any]]:
    """Top-``k`` next items (``k`` capped at the catalog size) for raw user ids, from each user's whole recorded
    history; with ``history`` (raw item ids, oldest first) for that one ad-hoc history instead."""
    if k < 1:
        raise LlmrecError(f"k must be >= 1, got {k}")
    k = min(k, run.dataset.n_items)
    titles = run.dataset.titles()
    item_ids = run.dataset.item_ids
    if history is not None:
        index = {item: i for i, item in enumerate(item_ids)}
        unknown = [h for h in history if h not in index]
        if unknown:
            raise LlmrecError(f"{run.dataset.path}: unknown item id {unknown[0]!r}")
        user_ids = ["(history)"]
        histories = [np.array([index[h] for h in history], dtype=np.int64)]
        ids, scores = run.model.recommend(histories, k=k)
    else:
        idx = [run.dataset.user_index(u) for u in user_ids]
        histories = [run.dataset.sequences[i] for i in idx]
        ids, scores = run.model.recommend(histories, k=k, users=np.asarray(idx, dtype=np.int64))
    out = []
    for u, h, row, sc in zip(user_ids, histories, ids, scores, strict=True):
        out.append({
            "user_id": u,
            "history": [{"item_id": item_ids[i], "title": titles[i]} for i in h[-5:]],
            "recommendations": [
                {"rank": r + 1, "item_id": item_ids[i], "title": titles[i], "score": float(s)}
                for r, (i, s) in enumerate(zip(row, sc, strict=True)) if i >= 0
            ],
        })
    return out

"""The main job end to end: prepare a dataset, train and evaluate models, show recommendations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from llmrec.config import from_dict
from llmrec.data.dataset import Dataset
from llmrec.data.prepare import PrepareConfig, prepare_dataset
from llmrec.eval.report import format_table
from llmrec.runs import (
    EvalConfig,
    ModelSection,
    RunConfig,
    evaluate_run,
    load_run,
    recommend_for_users,
    train,
)

DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "popularity": {},
    "itemknn": {},
    "sasrec": {"max_minutes": 10.0},
}


def demo_run_dir(workdir: Path, source: Path, model: str, seed: int) -> Path:
    """The run directory of ``model`` that :func:`run_demo` trains."""
    return workdir / "runs" / f"{source.name}-{model}-seed{seed}"


def ensure_dataset(source: Path, out: Path, progress: bool = True) -> Dataset:
    """Prepare ``source`` into ``out`` unless a dataset from the same source is already there."""
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        if Path(manifest["source"]["interactions"]).resolve().parent == source.resolve():
            return Dataset.load(out)
    prepare_dataset(source, out, PrepareConfig(), overwrite=True, progress=progress)
    return Dataset.load(out)


def run_demo(
    source: Path,
    workdir: Path,
    models: dict[str, dict[str, Any]] | None = None,
    n_users: int = 3,
    seed: int = 0,
    progress: bool = True,
    out: TextIO | None = None,
) -> dict[str, dict[str, float]]:
    """Prepare ``source``, train/evaluate every model (leave-one-out, full ranking), print a table
    and the top-10 of a few users; returns ``{model: overall metrics}``."""
    import sys

    out = out or sys.stdout
    models = models if models is not None else DEFAULT_MODELS
    ds_dir = workdir / "datasets" / source.name
    ds = ensure_dataset(source, ds_dir, progress)
    print(f"dataset {ds_dir}: {ds.n_users} users, {ds.n_items} items, "
          f"{ds.stats['interactions']} interactions (fingerprint {ds.fingerprint})", file=out)
    rows: dict[str, dict[str, float]] = {}
    valid_ndcg: dict[str, float] = {}
    runs = {}
    for name, params in models.items():
        cfg = from_dict(RunConfig, {"dataset": str(ds_dir), "seed": seed})
        cfg.model = ModelSection(name=name, params=dict(params))
        run_dir = demo_run_dir(workdir, source, name, seed)
        print(f"training {name} ...", file=out)
        record = train(cfg, run_dir, overwrite=True, progress=progress)
        run = load_run(run_dir)
        result = evaluate_run(run, progress=progress)
        valid = evaluate_run(run, EvalConfig(on="valid", ks=[10]), progress=False, write=False)
        rows[name] = {**result.overall, "train_s": record["train_seconds"]}
        valid_ndcg[name] = float(valid.overall["ndcg@10"])
        runs[name] = run
    cols = [f"{m}@{k}" for m in ("ndcg", "hit_rate", "recall", "mrr") for k in (10, 20)] + ["coverage@10", "train_s"]
    print(f"\nTest metrics, leave-one-out, full ranking over all {ds.n_items} items "
          f"(history items excluded):", file=out)
    print(format_table(rows, cols), file=out)
    best = max(valid_ndcg, key=lambda m: valid_ndcg[m])  # chosen on validation, never on test
    users = [ds.user_ids[i] for i in range(min(n_users, ds.n_users))]
    print(f"\nTop-10 next products from {best} (best validation NDCG@10, {valid_ndcg[best]:.4f}):", file=out)
    for rec in recommend_for_users(runs[best], users, k=10):
        print(f"\nuser {rec['user_id']}, last purchases:", file=out)
        for h in rec["history"]:
            print(f"    - {h['title'][:90]}", file=out)
        print("  recommended:", file=out)
        for r in rec["recommendations"]:
            print(f"  {r['rank']:>2}. {r['title'][:90]}  ({r['item_id']})", file=out)
    return rows

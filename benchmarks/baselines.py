"""Baselines benchmark: popularity, ItemKNN and SASRec on Office and Beauty.

Leave-one-out split, full ranking over the whole catalog (history items excluded), K = 5, 10,
20, test-set metrics of the checkpoint selected on validation. Each (dataset, model) pair runs in
its own child process so its wall time and peak memory are its own. Writes
``benchmarks/results/baselines.json`` and ``baselines.md``.

    python benchmarks/baselines.py                       # everything (about 20-30 min on 2 cores)
    python benchmarks/baselines.py --datasets amazon-office-2014 --models itemknn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see SASRecConfig)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ["amazon-office-2014", "amazon-beauty-2014"]
MODELS = ["popularity", "itemknn", "sasrec"]
KS = [5, 10, 20]
# Budget for SASRec on this 2-core CPU: the target is <= 20 minutes of training.
PARAMS: dict[str, dict[str, object]] = {"popularity": {}, "itemknn": {}, "sasrec": {"max_minutes": 18.0}}


def run_one(dataset: str, model: str, workdir: Path) -> dict[str, object]:
    """Prepare (cached), train and evaluate one model in this process; returns its figures."""
    from llmrec.config import from_dict
    from llmrec.pipeline import ensure_dataset
    from llmrec.runs import EvalConfig, ModelSection, RunConfig, evaluate_run, load_run, train

    ds_dir = workdir / "datasets" / dataset
    ensure_dataset(SHARED / dataset, ds_dir, progress=False)
    cfg = from_dict(RunConfig, {"dataset": str(ds_dir), "seed": 0})
    cfg.model = ModelSection(name=model, params=dict(PARAMS[model]))
    run_dir = workdir / "runs" / f"{dataset}-{model}"
    t0 = time.perf_counter()
    record = train(cfg, run_dir, overwrite=True, progress=False)
    train_s = time.perf_counter() - t0
    run = load_run(run_dir)
    t0 = time.perf_counter()
    result = evaluate_run(run, EvalConfig(ks=KS), progress=False)
    eval_s = time.perf_counter() - t0
    valid = evaluate_run(run, EvalConfig(ks=[10], on="valid"), progress=False, write=False)
    return {
        "dataset": dataset,
        "model": model,
        "protocol": result.protocol,
        "test_users": result.n_users,
        "test": result.overall,
        "valid_ndcg@10": valid.overall["ndcg@10"],
        "fit": record["fit"],
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": record["config"]["model"]["params"],
    }


def markdown(rows: list[dict[str, object]]) -> str:
    cols = [f"{m}@{k}" for m in ("ndcg", "hit_rate") for k in KS] + ["mrr@10", "coverage@10"]
    lines = ["| dataset | model | " + " | ".join(cols) + " | train s | eval s | peak MB |",
             "|---|---|" + "---:|" * (len(cols) + 3)]
    for r in rows:
        test = r["test"]  # type: ignore[index]
        cells = [f"{test[c]:.4f}" for c in cols]  # type: ignore[index]
        lines.append(f"| {r['dataset']} | {r['model']} | " + " | ".join(cells)
                     + f" | {r['train_seconds']:.0f} | {r['eval_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench")
    ap.add_argument("--one", nargs=2, metavar=("DATASET", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], args.one[1], args.workdir), default=float))
        return
    rows = []
    for dataset in args.datasets.split(","):
        for model in args.models.split(","):
            print(f"== {dataset} / {model}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", dataset, model, "--workdir", str(args.workdir)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{dataset}/{model} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
            print(f"   ndcg@10 {row['test']['ndcg@10']:.4f}  hr@10 {row['test']['hit_rate@10']:.4f}  "
                  f"train {row['train_seconds']:.0f}s  peak {row['peak_rss_mb']:.0f} MB", flush=True)
            rows.append(row)
    # Merge with rows of earlier runs (other datasets or models), newest wins.
    old = RESULTS / "baselines.json"
    if old.exists():
        done = {(r["dataset"], r["model"]) for r in rows}
        kept = [r for r in json.loads(old.read_text())["rows"] if (r["dataset"], r["model"]) not in done]
        rows = sorted(kept + rows, key=lambda r: (DATASETS.index(r["dataset"]) if r["dataset"] in DATASETS else 99,
                                                  MODELS.index(r["model"]) if r["model"] in MODELS else 99))
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "load_avg_at_end": os.getloadavg()}
    targets = {}
    for r in rows:
        if r["dataset"] == "amazon-beauty-2014" and r["model"] == "sasrec":
            t = r["test"]
            targets = {
                "sasrec_beauty_ndcg@10>=0.040": t["ndcg@10"] >= 0.040,
                "sasrec_beauty_hit_rate@10>=0.070": t["hit_rate@10"] >= 0.070,
                "sasrec_beauty_train_minutes<=20": r["train_seconds"] <= 20 * 60,
            }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "baselines.json").write_text(json.dumps(
        {"protocol": "leave-one-out, full ranking, history items excluded, test set", "ks": KS,
         "machine": machine, "targets": targets, "rows": rows}, indent=2, default=float))
    md = ["# Baselines (leave-one-out, full ranking over all items, test set)", "",
          (f"Machine: {machine['cpus']} CPUs, {machine['platform']}; no GPU. "
           "Checkpoints selected on validation NDCG@10."), "", markdown(rows), ""]
    if targets:
        md += ["Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()), ""]
    (RESULTS / "baselines.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

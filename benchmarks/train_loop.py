"""SASRec through the shared training loop against the figures recorded before the loop existed.

Trains SASRec (the baselines' settings: leave-one-out, 18-minute budget, seed 0) with ``llmrec.runs.train``
(so through ``models/train``, with its per-epoch checkpoints and curves) and evaluates it on the test
set with full ranking; the recorded row of ``benchmarks/results/baselines.json`` is the reference.
Writes ``benchmarks/results/train_loop.json`` and ``train_loop.md``.

    python benchmarks/train_loop.py                                  # Beauty (about 10 minutes)
    python benchmarks/train_loop.py --dataset amazon-office-2014     # Office (about 1 minute)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-beauty-2014")
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench")
    args = ap.parse_args()
    before = next(r for r in json.loads((RESULTS / "baselines.json").read_text())["rows"]
                  if r["dataset"] == args.dataset and r["model"] == "sasrec")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--one", args.dataset, "sasrec",
                           "--workdir", str(args.workdir)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"sasrec on {args.dataset} failed:\n{proc.stderr[-3000:]}")
    after = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    rows = []
    for label, r in (("before the shared loop (recorded)", before), ("through models/train", after)):
        f = r["fit"]
        rows.append({"run": label, "ndcg@10": r["test"]["ndcg@10"], "hit_rate@10": r["test"]["hit_rate@10"],
                     "valid_ndcg@10": r["valid_ndcg@10"], "train_seconds": r["train_seconds"], "epochs": f["epochs"],
                     "best_epoch": f["best_epoch"], "stopped": f["stopped"], "peak_rss_mb": r["peak_rss_mb"]})
    out = {"dataset": args.dataset, "model": "sasrec", "protocol": "leave-one-out, full ranking, test set, seed 0",
           "rows": rows, "same_epochs": rows[0]["epochs"] == rows[1]["epochs"],
           "ndcg_delta": rows[1]["ndcg@10"] - rows[0]["ndcg@10"],
           "time_ratio": rows[1]["train_seconds"] / rows[0]["train_seconds"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "train_loop" if args.dataset == "amazon-beauty-2014" else f"train_loop-{args.dataset}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2, default=float))
    md = [f"# SASRec on {args.dataset}: before and through the shared training loop", "",
          "| run | NDCG@10 | HR@10 | valid NDCG@10 | train s | epochs | best epoch | stopped | peak MB |",
          "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    md += [f"| {r['run']} | {r['ndcg@10']:.4f} | {r['hit_rate@10']:.4f} | {r['valid_ndcg@10']:.4f} | "
           f"{r['train_seconds']:.0f} | {r['epochs']} | {r['best_epoch']} | {r['stopped']} | {r['peak_rss_mb']:.0f} |"
           for r in rows]
    md += ["", (f"NDCG@10 difference {out['ndcg_delta']:+.4f}; training time ratio {out['time_ratio']:.2f} "
                "(2-core CPU shared with other work; one torch thread)."), ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

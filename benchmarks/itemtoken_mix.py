"""What the item-token LM adds to SASRec: re-weight the residual SASRec logits of a saved
``collab_logits`` model, choosing the weight on validation only.

A ``collab_logits`` model scores items as ``LM logits + w * SASRec logits``. This script splits the
two terms of a saved model (trained by ``benchmarks/itemtoken.py``), ranks all items with
``LM + a * SASRec`` for a grid of ``a`` (multiples of the learned ``w``; a huge ``a`` is SASRec
alone, ``a = 0`` the LM's own logits), picks ``a`` by NDCG@10 on all validation users and reports
the test metrics of every ``a`` beside the chosen one (leave-one-out, full ranking, history
excluded). Writes ``benchmarks/results/itemtoken_mix.json``.

    python benchmarks/itemtoken_mix.py --model work/bench/itemtoken/itemtoken-loo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DATASET = "amazon-office-2014"
MULTIPLES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 1e4]


def main() -> None:
    import torch

    from llmrec.data.splits import leave_one_out
    from llmrec.eval.metrics import ranking_metrics
    from llmrec.models.base import top_k
    from llmrec.models.llm.itemtoken import ItemTokenLM
    from llmrec.pipeline import ensure_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "work" / "bench" / "itemtoken" / "itemtoken-loo")
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    ds = ensure_dataset(SHARED / DATASET, args.workdir / "datasets" / DATASET, progress=False)
    split = leave_one_out(ds.sequences, ds.n_items).with_catalog(ds.catalog())
    model = ItemTokenLM.load(args.model)
    net = model.net
    if net is None or net.collab_weight is None or model.collab_model is None:
        raise SystemExit(f"{args.model}: not a collab_logits item-token model")
    model.config.num_threads = args.threads
    w = float(net.collab_weight.detach())
    with torch.no_grad():
        net.collab_weight.zero_()  # score() now returns the LM's own logits
    rows: dict[str, Any] = {}
    for name, part in (("valid", split.valid), ("test", split.test)):
        t0 = time.perf_counter()
        lm, sas = model.score(part.histories), model.collab_model.score(part.histories)
        print(f"{name}: scored {len(part)} users in {time.perf_counter() - t0:.0f} s", flush=True)
        for m in MULTIPLES:
            ids, _ = top_k(lm + (m * w) * sas, 10, part.histories)
            r = ranking_metrics(ids, part.targets, [10], ["ndcg", "recall"])
            cell = {k: float(np.nanmean(v)) for k, v in r.items()}
            rows.setdefault(str(m), {})[name] = cell
            print(f"{name} a = {m:g} w: ndcg@10 {cell['ndcg@10']:.4f} recall@10 {cell['recall@10']:.4f}", flush=True)
    best = max(MULTIPLES, key=lambda m: rows[str(m)]["valid"]["ndcg@10"])
    out = {"dataset": DATASET, "model": str(args.model), "learned_w": w, "multiples_of_w": rows,
           "chosen_on_validation": best, "test_at_chosen": rows[str(best)]["test"],
           "notes": "a = 0: the LM's own logits; a = 1e4 w: SASRec alone (ties broken by the LM); "
                    "validation = all validation users, full ranking"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "itemtoken_mix.json").write_text(json.dumps(out, indent=2))
    print(f"chosen on validation: a = {best:g} w -> test {rows[str(best)]['test']}")


if __name__ == "__main__":
    main()

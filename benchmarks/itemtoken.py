"""Item-token LM benchmark on amazon-office-2014, beside the baselines.

Part 1 (leave-one-out, full ranking over all items, history excluded, test set; checkpoint chosen
on validation NDCG@10 of a fixed validation sample): NDCG@10 / Recall@10 of the item-token LM on
SmolLM2-135M-Instruct, training time, inference latency per user (median, p95), peak memory, and
the invalid / duplicate rates of constrained beam search vs unconstrained greedy generation of
10-item lists (on a sample of test users; generation is per user).

Part 2 (the next-10 protocol of the earlier GPT-2 project, made leak-free): per-user ratio split
(first 70% train, next 10% validation, last 20% test), next-10 training targets built from the
training part only (``repeat`` padding), so no target reaches into the validation or test period;
Precision@10, Recall@10, HR@10, MRR@10, NDCG@10 of 10-item lists against each user's test items
(the first 10 of them), for the LM (fast path on all users, constrained beam on a sample) and ItemKNN.

Writes ``benchmarks/results/itemtoken.json`` and ``itemtoken.md``. Baseline rows come from
``benchmarks/results/baselines.json`` (run ``benchmarks/baselines.py`` first for SASRec).

    python benchmarks/itemtoken.py                      # about 90 min on a 2-core CPU
    python benchmarks/itemtoken.py --recipe states+prior --lm seed=1   # one seeded run (35 min), kept
                                                        # beside the others; the report pairs each seed with
                                                        # the very same SASRec alone
    python benchmarks/itemtoken.py --smoke              # the same code path in a minute (tiny random LM)
    python benchmarks/itemtoken.py --lm key=value ...   # override ItemTokenLM config keys (part 1)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DATASET = "amazon-office-2014"
HARDWARE = "2-core CPU, no GPU"
MARGIN = 0.02  # relative NDCG@10 lead over SASRec that one run needs to count as beating it
KS = [5, 10, 20]

# Sized for the 60-minute CPU budget on a 2-core CPU that runs a second benchmark beside it (so one
# torch thread): item tokens only (titles enter through the item rows' initialization), the plain
# template, the first 12 of SmolLM2's 30 blocks, bf16 autocast where the CPU has AMX/AVX512-BF16,
# dense next-item targets (every history position predicts the next item).
LOO_PARAMS: dict[str, Any] = {
    "n_layers": 12, "template": "plain", "title_tokens": 0, "max_history": 20, "max_prompt_tokens": 64,
    "batch_size": 16, "epochs": 30, "lr": 1e-3, "item_lr": 3e-3, "warmup_steps": 50, "eval_every": 150,
    "checkpoint_every": 50, "head_init_scale": 0.1,
    "lm_loss_weight": 0.3, "num_threads": 1, "amp": "auto",
    # CPU speed (about 1.7x per step, measured): frozen backbone in bf16, eager attention
    "dtype": "bfloat16", "attn": "eager",
    # item tokens only: no ratings or review text in the prompt (the CPU budget)
    "ratings": False, "review_chars": 0,
    # regularization (the first run, without it, memorized the training sequences: item loss 2.4):
    # item rows = frozen title rows + a rank-64 delta, output rows tied to input rows, dropout
    "item_rank": 64, "tie_item_rows": True, "item_dropout": 0.2, "weight_decay": 0.01, "lora_dropout": 0.1,
    # collaborative signal: a SASRec fitted on the same split (about 40 s) starts the rank-64 item deltas from
    # its item vectors and adds its state of the history up to each item to that item token's embedding
    "collab_init": "sasrec", "collab_state": "items", "collab_minutes": 2.0,
    # and its logits as a residual term of every item logit (w learned): the LM learns what to add to SASRec
    "collab_logits": True,
    # the SASRec states make the LM learn in a few hundred steps; a 40-minute budget, and more validation
    # users and patience against the noise of early stopping (patience 4 on 500 users stopped a run at step 900)
    "max_minutes": 40.0, "patience": 8, "valid_users": 1000,
}
# Recipes of the seeded runs (``--recipe NAME --lm seed=S``): overrides of LOO_PARAMS. Both add SASRec
# as a prior at inference, its weight chosen after training on all validation users from {0} + the grid
# (0 = the LM as trained); 30-minute LM budgets (the best validation step of the 40-minute runs was 1350,
# about 20 minutes in).
PRIOR_GRID = [0.5, 1.0, 2.0, 4.0, 8.0]
RECIPES: dict[str, dict[str, Any]] = {
    # the LM learns a residual over SASRec's logits (collab_logits), then the prior re-weights SASRec's part
    "residual+prior": {"collab_prior_grid": PRIOR_GRID, "prior_valid_users": 0, "max_minutes": 30.0},
    # the LM learns to rank on its own (SASRec vectors and states as input only), SASRec joins as a prior:
    # a product of two experts, as the semantic-ID model's v7
    "states+prior": {"collab_logits": False, "collab_prior_grid": PRIOR_GRID, "prior_valid_users": 0,
                     "max_minutes": 30.0},
}
NEXT10_PARAMS: dict[str, Any] = {
    # the leave-one-out model's recipe (states+prior: SASRec vectors and states in, SASRec as a prior chosen on
    # validation) with next-10 targets, one cut point per user and epoch, a 20-minute budget
    **LOO_PARAMS, **RECIPES["states+prior"], "target": "next-k", "next_k": 10, "padding": "repeat",
    "examples_per_user": 1, "max_minutes": 20.0, "max_prompt_tokens": 72, "eval_every": 100,
}
SMOKE: dict[str, Any] = {"backbone": "random-tiny-llama", "n_layers": 0, "max_minutes": 0.5, "valid_users": 50, "eval_every": 20,
                         "max_prompt_tokens": 160}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency(fn: Any, histories: list[np.ndarray]) -> dict[str, float]:
    """Median and p95 milliseconds of ``fn([h])`` over single users."""
    times = []
    for h in histories:
        t0 = time.perf_counter()
        fn([h])
        times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "n_users": len(times)}


def without_prior(model: Any, evalset: Any, ks: list[int]) -> Any:
    """Full-ranking evaluation of the same LM at prior weight 0 (its own logits); the weight is restored."""
    from llmrec.eval.protocol import evaluate_full

    w, model.prior_weight = model.prior_weight, 0.0
    try:
        return evaluate_full(model, evalset, ks=ks)
    finally:
        model.prior_weight = w


def part_loo(ds: Any, params: dict[str, Any], workdir: Path, n_gen: int, n_latency: int,
             from_saved: bool = False, tag: str = "loo", dataset: str = DATASET) -> dict[str, Any]:
    from llmrec.data.splits import leave_one_out
    from llmrec.eval.protocol import evaluate_full, evaluate_lists
    from llmrec.models.itemtoken import ItemTokenLM, ItemTokenLMConfig

    split = leave_one_out(ds.sequences, ds.n_items).with_catalog(ds.catalog())
    saved, fit_file = workdir / f"itemtoken-{tag}", workdir / f"itemtoken-{tag}-fit.json"
    if from_saved:  # evaluate the model a previous run trained and saved (its fit record beside it)
        model = ItemTokenLM.load(saved)
        cfg = model.config
        record = json.loads(fit_file.read_text())
        fit, train_s = record["fit"], record["train_seconds"]
    else:
        cfg = ItemTokenLMConfig(**{**params, "checkpoint_dir": str(workdir / f"ckpt-{tag}")})
        model = ItemTokenLM(cfg, ds.n_items)
        t0 = time.perf_counter()
        fit = model.fit(split, progress=True)
        train_s = time.perf_counter() - t0
        if (fit.get("collab") or {}).get("cached"):  # SASRec came from the cache: count its original fit time
            train_s += float(fit["collab"]["seconds"])
        model.save(saved)
        fit_file.write_text(json.dumps({"fit": fit, "train_seconds": train_s, "peak_rss_mb": rss_mb()}, default=float))
    print(f"fit: {json.dumps({k: v for k, v in fit.items() if k != 'history'})}", flush=True)

    t0 = time.perf_counter()
    test = evaluate_full(model, split.test, ks=KS, batch_size=256)
    eval_s = time.perf_counter() - t0
    print(f"test (fast path, {test.n_users} users): ndcg@10 {test.overall['ndcg@10']:.4f}", flush=True)
    paired: dict[str, Any] = {}
    if model.collab_model is not None:  # the same SASRec (seed, split, budget) alone, and the LM without the prior
        paired["sasrec_alone"] = evaluate_full(model.collab_model, split.test, ks=KS, batch_size=256).overall
        if model.prior_weight > 0:
            paired["without_prior"] = without_prior(model, split.test, KS).overall
        print(f"paired test figures: {json.dumps(paired)}", flush=True)

    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(split.test), min(n_gen, len(split.test)), replace=False))
    sub = split.test.subset(sample)
    lists: dict[str, Any] = {}
    for mode in ("fast", "beam", "greedy"):
        t0 = time.perf_counter()
        ranked = model.generate_lists(sub.histories, k=10, mode=mode, users=sub.users)
        per_user_ms = 1000 * (time.perf_counter() - t0) / len(sub)
        r = evaluate_lists(ranked, sub, ds.n_items, ks=[10], protocol=f"generated-{mode}")
        lists[mode] = {"ndcg@10": r.overall["ndcg@10"], "recall@10": r.overall["recall@10"],
                       "hit_rate@10": r.overall["hit_rate@10"], "invalid_rate": r.overall["invalid_rate"],
                       "duplicate_rate": r.overall["duplicate_rate"],
                       "in_history_rate": float(np.mean([np.isin(row[(row >= 0) & (row < ds.n_items)], h).sum() / 10
                                                         for row, h in zip(ranked, sub.histories, strict=True)])),
                       "distinct_per_list": float(np.mean([len(set(row[row >= 0].tolist())) for row in ranked])),
                       "ms_per_user": per_user_ms}
        print(f"lists {mode}: {lists[mode]}", flush=True)
    lat_users = [split.test.histories[i] for i in sample[:n_latency]]
    lat = {"fast": latency(model.score, lat_users),
           "beam": latency(lambda h: model.generate_lists(h, k=10, mode="beam"), lat_users[: max(1, n_latency // 2)])}
    return {
        "dataset": dataset, "model": "itemtoken-lm", "protocol": test.protocol,
        "backbone": cfg.backbone + (f" (first {cfg.n_layers} blocks)" if cfg.n_layers else ""),
        "test_users": test.n_users, "test": test.overall, "valid_ndcg@10_sample": fit["best_valid_ndcg@10"],
        "fit": fit, "train_seconds": train_s, "eval_seconds": eval_s, "latency_per_user": lat, **paired,
        "prior_weight": model.prior_weight,
        "generated_lists": {"users": len(sub), "k": 10, **lists},
        "peak_rss_mb": max(rss_mb(), json.loads(fit_file.read_text()).get("peak_rss_mb", 0.0)), "hardware": HARDWARE,
        "params": {k: v for k, v in cfg.__dict__.items()},
    }


def part_next10(ds: Any, params: dict[str, Any], workdir: Path, n_gen: int) -> dict[str, Any]:
    from llmrec.data.splits import ratio
    from llmrec.eval.protocol import evaluate_full, evaluate_lists
    from llmrec.models.collab import default_cache_dir, fit_sasrec
    from llmrec.models.itemknn import ItemKNN, ItemKNNConfig
    from llmrec.models.itemtoken import ItemTokenLM, ItemTokenLMConfig
    from llmrec.models.sasrec import SASRecConfig

    split = ratio(ds.sequences, ds.n_items, valid_frac=0.1, test_frac=0.2).with_catalog(ds.catalog())
    test10 = split.test.first_k_targets(10)
    # leak check: no training sequence holds an item of the same user's validation or test period
    for u, h, t in zip(split.test.users, split.test.histories, split.test.targets, strict=True):
        assert len(split.train[u]) + len(t) <= len(ds.sequences[u]) and len(h) == len(ds.sequences[u]) - len(t)
    metrics = ["precision@10", "recall@10", "hit_rate@10", "mrr@10", "ndcg@10"]
    rows: dict[str, Any] = {}

    knn = ItemKNN(ItemKNNConfig(), ds.n_items)
    knn.fit(split, progress=False)
    r = evaluate_full(knn, test10, ks=[10])
    rows["itemknn (full ranking)"] = {m: r.overall[m] for m in metrics} | {"users": r.n_users}
    # SASRec as the LM's fit builds it (same split, config and seed; cached on disk): the LM's prior, alone
    sas, _ = fit_sasrec(split, SASRecConfig(max_minutes=params.get("collab_minutes", 5.0), seed=params.get("seed", 0)),
                        cache_dir=default_cache_dir())
    r = evaluate_full(sas, test10, ks=[10])
    rows["sasrec (full ranking; the LM's prior)"] = {m: r.overall[m] for m in metrics} | {"users": r.n_users}

    cfg = ItemTokenLMConfig(**{**params, "checkpoint_dir": str(workdir / "ckpt-next10")})
    model = ItemTokenLM(cfg, ds.n_items)
    t0 = time.perf_counter()
    fit = model.fit(split, progress=True)
    train_s = time.perf_counter() - t0
    print(f"fit next-10: {json.dumps({k: v for k, v in fit.items() if k != 'history'})}", flush=True)
    r = evaluate_full(model, test10, ks=[10])
    rows["itemtoken-lm, fast path (all users)"] = {m: r.overall[m] for m in metrics} | {"users": r.n_users}
    if model.prior_weight > 0:
        r = without_prior(model, test10, [10])
        rows["itemtoken-lm without the prior, fast path (all users)"] = (
            {m: r.overall[m] for m in metrics} | {"users": r.n_users})
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(test10), min(n_gen, len(test10)), replace=False))
    sub = test10.subset(sample)
    for mode in ("fast", "beam", "greedy"):
        ranked = model.generate_lists(sub.histories, k=10, mode=mode, users=sub.users)
        r = evaluate_lists(ranked, sub, ds.n_items, ks=[10])
        rows[f"itemtoken-lm, {mode} ({len(sub)} sampled users)"] = (
            {m: r.overall[m] for m in metrics} | {"users": r.n_users, "invalid_rate": r.overall["invalid_rate"],
                                                  "duplicate_rate": r.overall["duplicate_rate"]})
    return {"split": "ratio (train 70% / valid 10% / test 20% per user), next-10 targets from train only, "
                     "padding repeat", "rows": rows, "train_seconds": train_s, "fit": fit,
            "prior_weight": model.prior_weight, "params": dict(cfg.__dict__),
            "mean_test_targets": float(np.mean([len(t) for t in test10.targets])), "hardware": HARDWARE,
            "earlier_project_gpt2_appliances": {"precision@10": 0.022, "recall@10": 0.055, "hit_rate@10": 0.057,
                                                "invalid_rate": 0.04, "distinct_per_list": 6.9}}


def baseline_rows() -> list[dict[str, Any]]:
    path = RESULTS / "baselines.json"
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["rows"] if r["dataset"] == DATASET]


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Item-token LM on {DATASET}", "",
             (f"Hardware: {HARDWARE} ({result['machine']['platform']}). Leave-one-out, full ranking over all "
             "items, history items excluded, test set; checkpoints chosen on validation NDCG@10 only."), "",
             ("| model | backbone | ndcg@10 | recall@10 | hit_rate@10 | ndcg@5 | ndcg@20 | train s | "
             "latency median / p95 ms | peak MB | hardware |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    # earlier leave-one-out runs kept for comparison ("variant" says what differed), then the current one
    rows = list(result["baselines"]) + list(result.get("loo_earlier", []))
    if result.get("loo"):
        rows.append(result["loo"])
    rows += seeded_means(result)
    for r in rows:
        t = r["test"]
        lat = r.get("latency_per_user", {}).get("fast")
        lat_s = f"{lat['median_ms']:.0f} / {lat['p95_ms']:.0f}" if lat else "-"
        name = f"{r['model']} ({r['variant']})" if r.get("variant") else r["model"]
        lines.append(f"| {name} | {r.get('backbone', '-')} | {t['ndcg@10']:.4f} | {t['recall@10']:.4f} | "
                     f"{t['hit_rate@10']:.4f} | {t['ndcg@5']:.4f} | {t['ndcg@20']:.4f} | {r['train_seconds']:.0f} | "
                     f"{lat_s} | {r['peak_rss_mb']:.0f} | {r.get('hardware', HARDWARE)} |")
    loo = result.get("loo")
    if loo:
        g = loo["generated_lists"]
        lines += ["", f"## Generated 10-item lists ({g['users']} sampled test users, leave-one-out model)", "",
                  ("| decoding | ndcg@10 | hit_rate@10 | invalid rate | duplicate rate | in-history rate | "
                  "distinct items per list | ms per user |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
        names = {"fast": "fast path (one forward pass, top-10)", "beam": "constrained beam search",
                 "greedy": "unconstrained greedy"}
        for mode in ("fast", "beam", "greedy"):
            x = g[mode]
            lines.append(f"| {names[mode]} | {x['ndcg@10']:.4f} | {x['hit_rate@10']:.4f} | {x['invalid_rate']:.3f} | "
                         f"{x['duplicate_rate']:.3f} | {x['in_history_rate']:.3f} | {x['distinct_per_list']:.1f} | "
                         f"{x['ms_per_user']:.0f} |")
        fit = loo["fit"]
        lines += ["", (f"Training: {fit['steps']} steps ({fit['epochs']:.2f} epochs, {fit['seconds_per_step']:.1f} s "
                  f"per step), stopped by {fit['stopped']}, best validation NDCG@10 {fit['best_valid_ndcg@10']:.4f} "
                  f"on {fit['valid_users']} sampled validation users at step {fit['best_step']}; "
                  f"{loo['train_seconds'] / 60:.1f} min including model loading and validation.")]
        sas = next((r for r in result["baselines"] if r["model"] == "sasrec"), None)
        if sas:
            ours, theirs = loo["test"]["ndcg@10"], sas["test"]["ndcg@10"]
            # one run each: a lead smaller than MARGIN is a tie, not a win (validation samples of these runs
            # already differ by more than that)
            if ours <= theirs or loo["train_seconds"] > 3600:
                verdict = "NOT met"
            elif ours < theirs * (1 + MARGIN):
                verdict = (f"NOT met in substance: {ours:.4f} is ahead by {100 * (ours / theirs - 1):.1f}%, less than "
                           f"the {100 * MARGIN:.0f}% a single run needs to count as a win (a tie)")
            else:
                verdict = "met"
            lines += ["", (f"Single-run check of the collab_logits row (last stop; beat SASRec NDCG@10 {theirs:.4f} within "
                           f"60 min of CPU training): {verdict}. The seeded runs below are judged on paired gains.")]
        else:
            lines += ["", ("SASRec has no Office row in baselines.json yet: run `python benchmarks/baselines.py "
                      "--datasets amazon-office-2014 --models sasrec` and re-run with `--table-only`.")]
    lines += seeded_section(result)
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    n10 = result.get("next10")
    if not n10:
        lines += ["", "## Next-10 protocol", "", ("Not recorded yet: run `python benchmarks/itemtoken.py --skip-loo` "
                  "(ratio split, next-10 targets from the training part only).")]
    if n10:
        lines += ["", "## Next-10 protocol (earlier project's metrics, leak-free split)", "",
                  (f"Split: {n10['split']}; test targets: the first 10 test items "
                  f"(mean {n10['mean_test_targets']:.2f} per user). Training {n10['train_seconds'] / 60:.1f} min"
                  + (f"; SASRec prior weight {n10['prior_weight']:g}, chosen on validation" if n10.get("prior_weight")
                     else "") + "."), "",
                  "| model | precision@10 | recall@10 | hit_rate@10 | mrr@10 | ndcg@10 | invalid | duplicates | users |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        table = list(n10["rows"].items())
        earlier = result.get("next10_earlier")
        if earlier:  # the LM rows of the earlier next-10 run, kept for comparison
            table += [(f"{earlier['variant']}: {name}", x) for name, x in earlier["rows"].items()
                      if name.startswith("itemtoken-lm")]
        for name, x in table:
            inv = f"{x['invalid_rate']:.3f}" if "invalid_rate" in x else "-"
            dup = f"{x['duplicate_rate']:.3f}" if "duplicate_rate" in x else "-"
            lines.append(f"| {name} | {x['precision@10']:.4f} | {x['recall@10']:.4f} | {x['hit_rate@10']:.4f} | "
                         f"{x['mrr@10']:.4f} | {x['ndcg@10']:.4f} | {inv} | {dup} | {x['users']} |")
        e = n10["earlier_project_gpt2_appliances"]
        lines += ["", (f"Earlier project (GPT-2 medium, Amazon 2023 Appliances, test period leaked into training "
                  f"targets, unconstrained decoding): precision@10 {e['precision@10']}, recall@10 {e['recall@10']}, "
                  f"HR@10 {e['hit_rate@10']}, about {e['invalid_rate']:.0%} malformed items and "
                  f"{e['distinct_per_list']} distinct items per list of 10. Different data: compare the protocol, "
                  "not the figures.")]
    return "\n".join(lines) + "\n"


def seeded_means(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Main-table rows for the seeded Office recipes: test metrics, train time, latency and peak memory
    averaged over seeds."""
    runs = [r for r in (result.get("loo_runs") or {}).values() if r["dataset"] == DATASET]
    out = []
    for recipe in sorted({r["recipe"] for r in runs}):
        rs = [r for r in runs if r["recipe"] == recipe]
        fast = [r["latency_per_user"]["fast"] for r in rs]
        out.append({"model": "itemtoken-lm", "backbone": rs[0]["backbone"],
                    "variant": (f"{recipe}, mean of seeds {','.join(str(r['seed']) for r in rs)}" if len(rs) > 1
                                else f"{recipe}, seed {rs[0]['seed']}"),
                    "test": {k: float(np.mean([r["test"][k] for r in rs])) for k in rs[0]["test"]},
                    "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
                    "latency_per_user": {"fast": {"median_ms": float(np.mean([f["median_ms"] for f in fast])),
                                                  "p95_ms": float(np.mean([f["p95_ms"] for f in fast]))}},
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "hardware": rs[0].get("hardware", HARDWARE)})
    return out


def seeded_section(result: dict[str, Any]) -> list[str]:
    """Markdown for the seeded recipe runs: mean [95% CI] per recipe, each seed paired with the very same
    SASRec alone (the LM's prior / input), and the target verdict on the paired gains."""
    from llmrec.eval.report import summarize_seeds

    runs = result.get("loo_runs") or {}
    if not runs:
        return []
    lines = ["", "## Seeded runs: SASRec as a prior chosen on validation (leave-one-out, full ranking, test)", "",
             ("Each seed trains its own SASRec (within collab_minutes: 2 on Office, 9 on Beauty; cached on disk, its fit time counted) "
              "and LM; the prior weight w is chosen after training "
              "by NDCG@10 on all validation users from {0} + grid (w = 0: the LM as trained). \"SASRec alone\" is "
              "that same SASRec on the same test users; \"without prior\" is the same LM at w = 0."), "",
             ("| dataset | recipe | seeds | ndcg@10 [95% CI] | recall@10 | SASRec alone ndcg@10 / recall@10 | without prior "
              "ndcg@10 | paired ndcg@10 gain per seed | chosen w | train min |"),
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    verdicts, extra = [], []
    for dataset, recipe in sorted({(r["dataset"], r["recipe"]) for r in runs.values()}, key=lambda x: (x[0] != DATASET, x)):
        rs = sorted((r for r in runs.values() if r["recipe"] == recipe and r["dataset"] == dataset),
                    key=lambda r: r["seed"])
        gains = [r["test"]["ndcg@10"] - r["sasrec_alone"]["ndcg@10"] for r in rs]
        stat = summarize_seeds([{"ndcg": r["test"]["ndcg@10"], "gain": g} for r, g in zip(rs, gains, strict=True)])
        m, lo, hi = stat["ndcg"]
        sas_n = np.mean([r["sasrec_alone"]["ndcg@10"] for r in rs])
        sas_r = np.mean([r["sasrec_alone"]["recall@10"] for r in rs])
        wo = [r["without_prior"]["ndcg@10"] for r in rs if "without_prior" in r]
        wo_s = f"{np.mean(wo):.4f}" if wo else "-"
        lines.append(f"| {dataset} | {recipe} | {','.join(str(r['seed']) for r in rs)} | {m:.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{np.mean([r['test']['recall@10'] for r in rs]):.4f} | {sas_n:.4f} / {sas_r:.4f} | {wo_s} | "
                     f"{' / '.join(f'{g:+.4f}' for g in gains)} | {', '.join(format(r['prior_weight'], 'g') for r in rs)} | "
                     f"{np.mean([r['train_seconds'] for r in rs]) / 60:.0f} |")
        prior = [r["fit"]["collab_prior"] for r in rs]
        valid = np.mean([max(p["valid_ndcg@10"]) for p in prior])
        g = [r["generated_lists"] for r in rs]
        lat = [r["latency_per_user"] for r in rs]
        extra.append(f"| {dataset} | {recipe} | {valid:.4f} | {np.mean([r['fit']['best_step'] for r in rs]):.0f} | "
                     f"{np.mean([x['fast']['median_ms'] for x in lat]):.0f} / {np.mean([x['fast']['p95_ms'] for x in lat]):.0f} | "
                     f"{np.mean([x['beam']['median_ms'] for x in lat]):.0f} | {np.mean([x['fast']['ndcg@10'] for x in g]):.4f} | "
                     f"{np.mean([x['beam']['ndcg@10'] for x in g]):.4f} | {max(x['beam']['invalid_rate'] for x in g):.3f} / "
                     f"{max(x['beam']['duplicate_rate'] for x in g):.3f} | {np.mean([x['greedy']['invalid_rate'] for x in g]):.3f} / "
                     f"{np.mean([x['greedy']['duplicate_rate'] for x in g]):.3f} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
        gm, glo, ghi = stat["gain"]
        ok = len(rs) >= 3 and glo > 0 and max(r["train_seconds"] for r in rs) <= 3600
        verdicts.append(f"{dataset}, {recipe}: mean paired gain {gm:+.4f} ({100 * gm / sas_n:+.1f}%), 95% interval "
                        f"[{glo:+.4f}, {ghi:+.4f}] over {len(rs)} seed(s): "
                        + ("met (every run within 60 min; the interval excludes 0)" if ok else
                           "not shown (needs 3 or more seeds whose paired interval excludes 0, within 60 min)"))
    lines += ["", ("Per recipe (means over its seeds): validation NDCG@10 at the chosen w (all validation users, what "
                   "picked w and compares recipes), the best validation step, fast-path latency per user, beam latency "
                   "per user, and 10-item lists of 200 sampled test users (fast path, constrained beam; invalid / "
                   "duplicate rates of constrained beam vs unconstrained greedy)."), "",
              ("| dataset | recipe | valid ndcg@10 | best step | fast ms median / p95 | beam ms median | lists fast ndcg@10 | "
               "lists beam ndcg@10 | beam invalid / dup | greedy invalid / dup | peak MB |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *extra]
    lines += ["", "Target (beat SASRec's NDCG@10 within 60 min of CPU training), judged on the paired gains:", ""]
    lines += [f"- {v}" for v in verdicts]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench")
    ap.add_argument("--lm", nargs="*", default=[], help="ItemTokenLM config overrides for part 1 (key=value)")
    ap.add_argument("--next10", nargs="*", default=[], help="ItemTokenLM config overrides for part 2 (key=value)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                    help="a seeded leave-one-out run of this recipe (seed from --lm seed=S), kept beside the others "
                         "under loo_runs; implies --skip-next10")
    ap.add_argument("--dataset", default=DATASET, help="dataset folder under ../shared/data (seeded --recipe runs only)")
    ap.add_argument("--skip-loo", action="store_true")
    ap.add_argument("--skip-next10", action="store_true")
    ap.add_argument("--loo-from-saved", action="store_true",
                    help="evaluate the leave-one-out model saved by an earlier run instead of training")
    ap.add_argument("--gen-users", type=int, default=200, help="test users for beam / greedy lists")
    ap.add_argument("--latency-users", type=int, default=60)
    ap.add_argument("--smoke", action="store_true", help="tiny random backbone, results not written to results/")
    ap.add_argument("--table-only", action="store_true", help="rebuild the markdown from the JSON")
    args = ap.parse_args()

    out_dir = RESULTS if not args.smoke else args.workdir / "smoke-results"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "itemtoken.json"
    result: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "hardware": HARDWARE}
    result["baselines"] = baseline_rows()
    if not args.table_only:
        from llmrec.pipeline import ensure_dataset

        if args.dataset != DATASET and not args.recipe:
            raise SystemExit(f"--dataset {args.dataset}: only seeded --recipe runs take another dataset")
        ds = ensure_dataset(SHARED / args.dataset, args.workdir / "datasets" / args.dataset, progress=False)
        smoke = SMOKE if args.smoke else {}
        workdir = args.workdir / ("itemtoken-smoke" if args.smoke else "itemtoken")
        workdir.mkdir(parents=True, exist_ok=True)
        gen_users = 20 if args.smoke else args.gen_users
        n_latency = 10 if args.smoke else args.latency_users
        if args.recipe:
            params = {**LOO_PARAMS, **RECIPES[args.recipe], **smoke, **parse_overrides(args.lm)}
            tag = ("" if args.dataset == DATASET else f"{args.dataset}-") + f"{args.recipe}-s{params.get('seed', 0)}"
            row = part_loo(ds, params, workdir, gen_users, n_latency, from_saved=args.loo_from_saved, tag=tag,
                           dataset=args.dataset)
            result.setdefault("loo_runs", {})[tag] = {**row, "recipe": args.recipe, "seed": params.get("seed", 0)}
            json_path.write_text(json.dumps(result, indent=2, default=float))
        elif not args.skip_loo:
            params = {**LOO_PARAMS, **smoke, **parse_overrides(args.lm)}
            result["loo"] = part_loo(ds, params, workdir, gen_users, n_latency, from_saved=args.loo_from_saved)
            json_path.write_text(json.dumps(result, indent=2, default=float))
        if not args.skip_next10 and not args.recipe:
            params = {**NEXT10_PARAMS, **smoke, **parse_overrides(args.next10)}
            result["next10"] = part_next10(ds, params, workdir, gen_users)
            json_path.write_text(json.dumps(result, indent=2, default=float))
    json_path.write_text(json.dumps(result, indent=2, default=float))
    md = markdown(result)
    (out_dir / "itemtoken.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

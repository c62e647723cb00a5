"""Instruction-tuned chat LM (instruct-lm) benchmark: honest choice among 20, SASRec-top-20 re-ranking,
grounded title generation, LoRA vs QLoRA, and the error analysis of one run.

Leave-one-out split (as every benchmark here); checkpoints chosen on validation only. On this CPU
the test figures are computed on a FIXED SEEDED SAMPLE of test users (``--users``; the same users for
every run and seed of a dataset, labelled with its size), with 95% intervals (Wilson for accuracies,
a user bootstrap for paired NDCG gains, Student t over seeds when there are several).

    python benchmarks/instruct.py --part choice --seed 0            # train + evaluate one seeded run
    python benchmarks/instruct.py --part rerank --seed 0
    python benchmarks/instruct.py --part title --seed 0
    python benchmarks/instruct.py --part adapters                   # LoRA vs QLoRA (each in a subprocess)
    python benchmarks/instruct.py --part analyze --run-tag choice-amazon-office-2014-s0
    python benchmarks/instruct.py --part zeroshot --users 150       # the untuned LM's title scores (validation)
    python benchmarks/instruct.py --part table                      # rebuild instruct.md from the JSON
    python benchmarks/instruct.py --part choice --smoke             # the same code path in a minute (tiny LM)
    ... --set key=value                                             # override InstructLM config keys

Results: ``benchmarks/results/instruct.json`` / ``instruct.md`` (the analysis plots under
``benchmarks/results/instruct-analysis/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import parse_overrides as parse_sets

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
HARDWARE = "2-core CPU (shared, 1 torch thread), no GPU"
SAMPLE_SEED = 12345  # the fixed test-user sample

# Sized for a shared 2-core CPU: SmolLM2-135M-Instruct cut to its first 8 of 30 blocks, frozen weights in
# bf16 (AMX), short titles (40 characters) and the newest 6 purchases, LoRA r=16 on every linear layer,
# the letter loss (cross-entropy over the option letters at the answer position).
COMMON: dict[str, Any] = {
    "n_layers": 8, "dtype": "bfloat16", "attn": "eager", "amp": "auto", "num_threads": 1, "template": "chat",
    "system": "You recommend products.", "title_chars": 40, "max_history": 6, "max_history_tokens": 100,
    "ratings": False, "review_chars": 0, "batch_size": 8, "lr": 1e-3, "lora_r": 16, "lora_alpha": 32,
    "warmup_steps": 10, "eval_every": 50, "valid_users": 200, "patience": 5, "max_minutes": 12.0, "epochs": 1,
    "checkpoint_every": 25,
}
PARAMS: dict[str, dict[str, Any]] = {
    "choice": {"mode": "choice", "n_candidates": 20, "negatives": "popularity", "letter_loss": "letters"},
    "rerank": {"mode": "rerank", "n_candidates": 20, "retriever": "sasrec", "letter_loss": "letters",
               "collab_minutes": 5.0,
               "rerank_mix": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]},
    "title": {"mode": "title", "decoding": "trie", "num_beams": 10, "max_new_tokens": 24, "valid_users": 40,
              "eval_every": 100},
}
SMOKE = {"backbone": "random-tiny-llama", "n_layers": 0, "max_minutes": 0.3, "valid_users": 10, "eval_every": 5,
         "collab_minutes": 0.2, "num_beams": 3}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_run(part: str, dataset: Path, seed: int, params: dict[str, Any], out: Path) -> dict[str, Any]:
    from llmrec.runs import ModelSection, RunConfig, train

    cfg = RunConfig(dataset=str(dataset), seed=seed, model=ModelSection("instruct-lm", params))
    t0 = time.perf_counter()
    record = train(cfg, out, overwrite=True, progress=True)
    return {"train_seconds": time.perf_counter() - t0, "fit": {k: v for k, v in record["fit"].items() if k != "history"},
            "history": record["fit"].get("history")}


def test_sample(run: Any, users: int) -> Any:
    return run.split.test.sample(users, np.random.default_rng(SAMPLE_SEED))


def part_choice(run: Any, users: int) -> dict[str, Any]:
    from llmrec.models.instruct.evaluate import choice_accuracy

    sample = test_sample(run, users)
    t0 = time.perf_counter()
    seed = run.config.seed  # the run's seed draws its candidate lists (negatives, option order)
    res = choice_accuracy(run.model, sample, seed=seed)
    secs = time.perf_counter() - t0
    blind = choice_accuracy(run.model, sample, seed=seed, blind=True)
    pos = np.bincount(res["records"]["chosen"], minlength=run.model.config.n_candidates)
    refs = reference_choice(run, sample, res["records"])
    return {"references": refs, "accuracy": res["accuracy"], "ci95": res["ci95"], "chance": res["chance"],
            "history_blind_accuracy": blind["accuracy"], "history_blind_ci95": blind["ci95"],
            "test_users": res["n_users"], "ms_per_user": 1000 * secs / max(1, res["n_users"]),
            "chosen_letter_counts": pos.tolist()}


def reference_choice(run: Any, sample: Any, records: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of classic recommenders fitted on the same training split, picking among the very same
    candidate lists (the highest-scored option): how hard the task is for a model of the item sequence."""
    from llmrec.models.collab import fit_companion
    from llmrec.models.instruct.evaluate import wilson
    from llmrec.models.itemknn import ItemKNN

    sasrec, _ = fit_companion(run.split, run.model.config, run.config.seed)
    knn = ItemKNN(ItemKNN.Config(), run.split.n_items)
    knn.fit(run.split, progress=False)
    out = {}
    for name, model in (("sasrec", sasrec), ("itemknn", knn)):
        scores = model.score(sample.histories)
        hits = sum(int(np.argmax(scores[r, opts]) == t) for r, (opts, t) in
                   enumerate(zip(records["options"], records["truth"], strict=True)))
        out[name] = {"accuracy": hits / len(sample), "ci95": wilson(hits, len(sample))}
    return out


def part_rerank(run: Any, users: int) -> dict[str, Any]:
    from llmrec.models.instruct.evaluate import rerank_report

    sample = test_sample(run, users)
    t0 = time.perf_counter()
    rep = rerank_report(run.model, sample)
    secs = time.perf_counter() - t0
    keep = ("reranked", "retriever", "lm_only", "reranked_in_shortlist", "retriever_in_shortlist",
            "lm_only_in_shortlist", "in_shortlist_rate", "gain_ndcg@10", "gain_ndcg@10_ci95", "mix", "n_users")
    return {**{k: rep[k] for k in keep}, "ms_per_user": 1000 * secs / max(1, len(sample)),
            "per_user_gain": (np.asarray(rep["reranked_per_user"]["ndcg@10"])
                              - np.asarray(rep["retriever_per_user"]["ndcg@10"])).tolist()}


def part_zeroshot(dataset: Path, users: int, n_layers: int, smoke: bool) -> dict[str, Any]:
    """The untuned backbone's choice accuracy among 20 on VALIDATION users by five title scores: the title's
    log-likelihood after the history (sum, per-token mean), after an empty history (sum, mean: text-only
    baselines that see the options but not the history), and their difference (PMI)."""
    from llmrec.data.dataset import Dataset
    from llmrec.data.splits import leave_one_out
    from llmrec.models.instruct import InstructLM, InstructLMConfig
    from llmrec.models.instruct.evaluate import choice_lists, true_positions, wilson

    ds = Dataset.load(dataset)
    split = leave_one_out(ds.sequences, ds.n_items).with_catalog(ds.catalog())
    params = {**COMMON, **PARAMS["choice"], "scoring": "titles", "title_score": "sum", "n_layers": n_layers,
              **(SMOKE if smoke else {})}
    model = InstructLM(InstructLMConfig(**params), split.n_items)
    model.prepare(split)
    valid = split.valid.sample(users, np.random.default_rng(SAMPLE_SEED))
    options = choice_lists(model, valid, seed=0)
    truth = true_positions(options, valid)
    t0 = time.perf_counter()
    hist = model.option_scores(valid.histories, options)
    model.hide_history = True
    blind = model.option_scores(valid.histories, options)
    lengths = np.array([[len(model.title_answer(int(i))) for i in o] for o in options])
    rows = {}
    for name, score in [("history, sum", hist), ("history, mean", hist / lengths), ("no history, sum", blind),
                        ("no history, mean", blind / lengths), ("PMI (history sum - no-history sum)", hist - blind)]:
        k = int((score.argmax(axis=1) == truth).sum())
        rows[name] = {"accuracy": k / len(truth), "ci95": wilson(k, len(truth))}
    return {"dataset": dataset.name, "n_layers": n_layers, "valid_users": len(truth), "rows": rows,
            "seconds": time.perf_counter() - t0, "chance": 1.0 / options[0].size}


def part_title(run: Any, users: int) -> dict[str, Any]:
    from llmrec.eval.protocol import evaluate_full

    sample = test_sample(run, users)
    out = {}
    for decoding in ("trie", "free"):
        run.model.config.decoding = decoding
        t0 = time.perf_counter()
        res = evaluate_full(run.model, sample, ks=[10], batch_size=32)
        out[decoding] = {"ndcg@10": res.overall["ndcg@10"], "recall@10": res.overall["recall@10"],
                         "ms_per_user": 1000 * (time.perf_counter() - t0) / len(sample),
                         **{k: v for k, v in run.model.last_generation.items() if k != "examples"},
                         "examples": run.model.last_generation.get("examples", [])}
    out["test_users"] = len(sample)
    return out


def adapter_one(dataset: Path, finetune: str, steps: int, users: int, smoke: bool) -> dict[str, Any]:
    """One adapter variant in this process: a fixed number of steps, then choice accuracy (run in a subprocess
    so that peak memory is its own)."""
    from llmrec.data.dataset import Dataset
    from llmrec.data.splits import leave_one_out
    from llmrec.models.instruct import InstructLM, InstructLMConfig
    from llmrec.models.instruct.evaluate import choice_accuracy

    ds = Dataset.load(dataset)
    split = leave_one_out(ds.sequences, ds.n_items).with_catalog(ds.catalog())
    params = {**COMMON, **PARAMS["choice"], **(SMOKE if smoke else {}), "finetune": finetune, "max_steps": steps,
              "max_minutes": 60.0, "valid_users": 20, "eval_every": 10_000}
    if finetune == "qlora":
        params["dtype"] = "bfloat16"  # the compute dtype of the 4-bit layers
    model = InstructLM(InstructLMConfig(**params), ds.n_items)
    fit = model.fit(split, progress=False)
    res = choice_accuracy(model, split.test.sample(users, np.random.default_rng(SAMPLE_SEED)), seed=0)
    return {"finetune": finetune, "steps": fit["steps"], "seconds_per_step": fit["seconds_per_step"],
            "peak_rss_mb": rss_mb(), "accuracy": res["accuracy"], "ci95": res["ci95"], "test_users": res["n_users"],
            "trainable_parameters": fit["trainable_parameters"], "train_seconds": fit["train_seconds"]}


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def record(path: Path, keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    """Set ``result[keys[0]][keys[1]]... = value`` in the JSON at ``path`` as it is *now* (runs that ended while
    this one ran are kept), with this machine's description; write it back and return it."""
    result = load_json(path)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "hardware": HARDWARE}
    node = result
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    path.write_text(json.dumps(result, indent=2, default=float))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=["choice", "rerank", "title", "adapters", "adapter-one",
                                                      "analyze", "zeroshot", "table"])
    ap.add_argument("--dataset", default="amazon-office-2014")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=0, help="test users in the fixed sample (default per part)")
    ap.add_argument("--set", nargs="*", default=[], help="InstructLM config overrides key=value")
    ap.add_argument("--tag", default="", help="extra label of the run (e.g. blind)")
    ap.add_argument("--run-tag", default="", help="--part analyze: the run to analyse")
    ap.add_argument("--finetune", default="lora")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the run trained earlier, do not train")
    ap.add_argument("--refs-only", action="store_true", help="with --eval-only --part choice: only the references")
    ap.add_argument("--smoke", action="store_true", help="tiny random LM; results go to the workdir, not results/")
    args = ap.parse_args()

    out_dir = args.workdir / "smoke-results" if args.smoke else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "instruct.json"
    from llmrec.pipeline import ensure_dataset

    dataset = args.workdir / "datasets" / args.dataset
    ensure_dataset(SHARED / args.dataset, dataset, progress=False)
    if args.part == "adapter-one":
        print("RESULT " + json.dumps(adapter_one(dataset, args.finetune, args.steps, args.users or 200, args.smoke)))
        return
    if args.part == "adapters":
        rows = []
        for ft in ("lora", "qlora"):
            cmd = [sys.executable, __file__, "--part", "adapter-one", "--finetune", ft, "--steps", str(args.steps),
                   "--dataset", args.dataset, "--workdir", str(args.workdir), "--users", str(args.users or 200)]
            cmd += ["--smoke"] if args.smoke else []
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                rows.append({"finetune": ft, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(line[-1][7:]))
            print(rows[-1], flush=True)
        result = record(json_path, ("adapters",), {"dataset": args.dataset, "rows": rows})
    elif args.part == "zeroshot":
        res = part_zeroshot(dataset, args.users or 150, int(parse_sets(args.set).get("n_layers", 0)), args.smoke)
        result = record(json_path, ("zeroshot", f"{args.dataset}-L{res['n_layers']}"), res)
    elif args.part == "analyze":
        from llmrec.models.instruct.analysis import analyze

        run_dir = args.workdir / "runs" / args.run_tag
        plots = out_dir / "instruct-analysis"
        rep = analyze(run_dir, n_users=args.users or 300, out=plots)
        result = record(json_path, ("analysis",), {"run": args.run_tag, "summary": rep["summary"],
                                                   "dir": str(plots.relative_to(ROOT)) if plots.is_relative_to(ROOT)
                                                   else str(plots)})
    elif args.part == "table":
        result = load_json(json_path)
    else:
        from llmrec.runs import load_run

        params = {**COMMON, **PARAMS[args.part], **(SMOKE if args.smoke else {}), **parse_sets(args.set)}
        tag = f"{args.part}-{args.dataset}-s{args.seed}" + (f"-{args.tag}" if args.tag else "")
        run_dir = args.workdir / "runs" / tag
        if args.eval_only:  # evaluate the run trained earlier (its training facts kept from the JSON)
            trained = {k: v for k, v in load_json(json_path)["runs"][tag].items()
                       if k in ("train_seconds", "fit", "history")}
        else:
            trained = train_run(args.part, dataset, args.seed, params, run_dir)
        run = load_run(run_dir)
        users = args.users or {"choice": 500, "rerank": 800, "title": 100}[args.part]
        if args.refs_only:  # add the classic recommenders' accuracy on the very same candidate lists
            from llmrec.models.instruct.evaluate import choice_lists, true_positions

            sample = test_sample(run, users)
            options = choice_lists(run.model, sample, seed=run.config.seed)
            truth = true_positions(options, sample).tolist()
            refs = reference_choice(run, sample, {"options": options, "truth": truth})
            result = record(json_path, ("runs", tag, "test", "references"), refs)
        else:
            evaluated = {"choice": part_choice, "rerank": part_rerank, "title": part_title}[args.part](run, users)
            result = record(json_path, ("runs", tag), {"part": args.part, "dataset": args.dataset, "seed": args.seed,
                                                       "tag": args.tag, **trained, "test": evaluated,
                                                       "peak_rss_mb": rss_mb(), "params": params})
            if not args.smoke and run_dir.exists():
                shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    from instruct_report import markdown  # the tables, in the module beside this script

    (out_dir / "instruct.md").write_text(markdown(result))
    print((out_dir / "instruct.md").read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

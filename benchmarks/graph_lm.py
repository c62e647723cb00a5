"""Graph-aware LM benchmark: the graph bias on and off, and what building the graph costs.

Parts (each a sub-command; results accumulate in ``benchmarks/results/graph_lm.json`` and the markdown
``graph_lm.md`` is rebuilt from it after each):

- ``graph``: the training graph of amazon-games-2018 (leave-one-out training split): build time and peak
  memory (tracemalloc peak of the build, process peak RSS), pairs kept; the bias of a batch (16 prompts x 64
  tokens, Games histories) in microseconds; and the naive dense approach of the published code (dense
  adjacency over all users and items, Floyd-Warshall shortest paths, a Python loop over batch x L x L
  filling the bias) against this one on subsets of growing size, to show the scaling (never at full size).
- ``baselines``: SASRec and ItemKNN on the same leave-one-out split (seeds as given), NDCG/Recall@10/20.
- ``run``: one graph-lm run (``--variant none|fixed|learned``, ``--seed``), leave-one-out, full ranking over
  all items, history excluded, test set read once after training; checkpoint chosen on validation NDCG@10.
- ``table``: rebuild the markdown (paired gains: each variant against ``none`` of the same seed; a paired
  bootstrap interval over test users per seed, and a t-interval over seeds when there are 2 or more).

    flock /tmp/llmrec-lm-bench.lock python benchmarks/graph_lm.py graph
    flock /tmp/llmrec-lm-bench.lock python benchmarks/graph_lm.py baselines --seeds 0 1 2
    flock /tmp/llmrec-lm-bench.lock python benchmarks/graph_lm.py run --variant fixed --seed 0
    python benchmarks/graph_lm.py run --variant learned --smoke     # the same path in a minute (tiny LM)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import resource
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
HARDWARE = "2-core CPU, no GPU"
KS = [10, 20]
METRICS = ["ndcg@10", "recall@10", "ndcg@20", "recall@20"]

# Sized for short CPU budgets (1 torch thread; other benchmarks share the 2 cores): the first 4 of SmolLM2's
# 30 blocks, item tokens only (titles enter through the item rows' initialization), 240 pre-training steps and
# 600 fine-tuning steps (about 2 + 8 minutes on an unloaded core). The budget counts steps, not minutes, so
# that variants run under different machine load get the same training. Everything else as the item-token
# LM's benchmark (regularized item rows).
PARAMS: dict[str, Any] = {
    "n_layers": 4, "template": "plain", "title_tokens": 0, "max_history": 20, "max_prompt_tokens": 64,
    "batch_size": 16, "epochs": 30, "lr": 1e-3, "item_lr": 3e-3, "warmup_steps": 50, "eval_every": 150,
    "checkpoint_every": 150, "head_init_scale": 0.1, "lm_loss_weight": 0.3, "num_threads": 1, "amp": "auto",
    "dtype": "bfloat16", "attn": "eager", "ratings": False, "review_chars": 0,
    "item_rank": 64, "tie_item_rows": True, "item_dropout": 0.2, "weight_decay": 0.01, "lora_dropout": 0.1,
    "patience": 8, "valid_users": 1000, "max_steps": 600, "max_minutes": 40.0,
    "pretrain_steps": 240, "pretrain_minutes": 0.0, "channels": ["self", "ui", "ii", "brand", "category"], "bias_scale": 1.0,
}
SMOKE: dict[str, Any] = {"backbone": "random-tiny-llama", "n_layers": 0, "max_steps": 40, "pretrain_steps": 20,
                         "valid_users": 50, "eval_every": 20, "dtype": "float32"}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_split(dataset: str, workdir: Path) -> Any:
    from llmrec.data.splits import leave_one_out
    from llmrec.pipeline import ensure_dataset

    ds = ensure_dataset(SHARED / dataset, workdir / "datasets" / dataset, progress=False)
    return leave_one_out(ds.sequences, ds.n_items).with_catalog(ds.catalog())


# --- part: the graph build and its scaling ------------------------------------------------------------


def prompt_nodes(histories: list[np.ndarray], length: int = 64, items: int = 20) -> np.ndarray:
    """(B, length) nodes of item-token prompts: a few text positions, the user, then item / newline pairs."""
    from llmrec.models.graph_lm.graph import OTHER, USER

    out = np.full((len(histories), length), OTHER, dtype=np.int64)
    for b, h in enumerate(histories):
        row = [OTHER] * 8 + [USER]
        for i in h[-items:]:
            row += [int(i), OTHER]
        row = (row + [OTHER, USER])[:length]
        out[b, : len(row)] = row
    return out


def dense_reference(train: list[np.ndarray], n_items: int, nodes: np.ndarray, users: np.ndarray) -> tuple[float, float, float]:
    """The published code's way on ``train``: dense (U + I)^2 adjacency, Floyd-Warshall, a Python loop over
    batch x L x L for the bias (1 / shortest-path length). Returns (seconds for the shortest paths, bytes of the
    distance matrix, seconds for one batch's bias)."""
    n_users = len(train)
    n = n_users + n_items
    dist = np.full((n, n), np.inf, dtype=np.float32)
    np.fill_diagonal(dist, 0)
    for u, s in enumerate(train):
        dist[u, n_users + s] = dist[n_users + s, u] = 1
    t0 = time.perf_counter()
    for k in range(n):  # Floyd-Warshall, vectorized over (i, j) only: O(n^3)
        np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :], out=dist)
    fw = time.perf_counter() - t0
    times = []
    for _ in range(3):  # the median of 3
        t0 = time.perf_counter()
        B, L = nodes.shape
        bias = np.zeros((B, L, L), dtype=np.float32)
        for b in range(B):
            for p in range(L):
                for q in range(L):
                    x, y = nodes[b, p], nodes[b, q]
                    if x == -1 or y == -1:
                        continue
                    gx = users[b] if x == -2 else n_users + x
                    gy = users[b] if y == -2 else n_users + y
                    d = dist[gx, gy]
                    bias[b, p, q] = 0.0 if not np.isfinite(d) or d == 0 else 1.0 / d
        times.append(time.perf_counter() - t0)
    return fw, float(dist.nbytes), float(np.median(times))


def part_graph(workdir: Path, dataset: str = "amazon-games-2018", sizes: tuple[int, ...] = (100, 200, 400)) -> dict[str, Any]:
    import torch

    from llmrec.models.graph_lm.graph import TorchTables, adjacency, bias_channels, build_graph

    torch.set_num_threads(1)
    split = load_split(dataset, workdir)
    rss0 = rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    tables = build_graph(split.train, split.n_items, split.catalog)
    build_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    edges = int(adjacency(split.train, split.n_items).nnz)
    tt = TorchTables(tables)
    rng = np.random.default_rng(0)
    channels = ["self", "ui", "ii", "brand", "category"]
    times = []
    for _ in range(200):
        users = rng.choice(len(split.train), 16, replace=False)
        nodes = torch.as_tensor(prompt_nodes([split.train[u] for u in users]))
        t0 = time.perf_counter()
        bias_channels(nodes, tt, channels)
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "dataset": dataset, "users": len(split.train), "items": split.n_items, "train_edges": edges,
        "item_pairs": tables.n_pairs, "build_seconds": build_s, "build_peak_mb": peak / 2**20,
        "table_mb": sum(v.nbytes for v in tables.to_arrays().values()) / 2**20,
        "process_peak_rss_mb": rss_mb(), "rss_before_mb": rss0,
        "bias_batch_us": {"median": 1e6 * float(np.median(times)), "p95": 1e6 * float(np.percentile(times, 95)),
                          "batch": 16, "length": 64, "channels": channels},
        "scaling": [],
    }
    # dense vs sparse on subsets: the first n_users users with at least 3 training items, their items
    order = [u for u in range(len(split.train)) if len(split.train[u]) >= 3]
    for n_users in sizes:
        sub = [split.train[u] for u in order[:n_users]]
        items, remap = np.unique(np.concatenate(sub), return_inverse=True)
        pos = np.cumsum([0] + [len(s) for s in sub])
        sub = [remap[pos[i] : pos[i + 1]] for i in range(len(sub))]
        t0 = time.perf_counter()
        sub_tables = build_graph(sub, len(items))
        sparse_s = time.perf_counter() - t0
        users = rng.choice(len(sub), 16, replace=True)
        nodes = prompt_nodes([sub[u] for u in users])
        st = TorchTables(sub_tables)
        reps = []
        for _ in range(21):  # the first call warms up: the median of 21
            t0 = time.perf_counter()
            bias_channels(torch.as_tensor(nodes), st, channels)
            reps.append(time.perf_counter() - t0)
        sparse_bias = float(np.median(reps))
        fw, nbytes, loop = dense_reference(sub, len(items), nodes, users)
        out["scaling"].append({"users": len(sub), "items": len(items), "nodes": len(sub) + len(items),
                               "sparse_build_s": sparse_s, "dense_floyd_warshall_s": fw, "dense_matrix_mb": nbytes / 2**20,
                               "sparse_bias_batch_us": 1e6 * sparse_bias, "python_loop_bias_batch_us": 1e6 * loop})
        print(out["scaling"][-1], flush=True)
    last = out["scaling"][-1]
    n_full = len(split.train) + split.n_items
    out["dense_extrapolated_full"] = {
        "nodes": n_full, "floyd_warshall_hours": last["dense_floyd_warshall_s"] * (n_full / last["nodes"]) ** 3 / 3600,
        "distance_matrix_gb": 4 * n_full**2 / 2**30,
    }
    return out


# --- part: baselines on the same split -----------------------------------------------------------------


def recorded_baselines(dataset: str) -> dict[str, Any]:
    """SASRec and ItemKNN rows of ``benchmarks/results/baselines.json`` (the same leave-one-out split, full
    ranking, test set, seed 0): what ``baselines`` reports unless told to train them again (``--train``)."""
    rows = json.loads((RESULTS / "baselines.json").read_text())["rows"]
    return {f"{r['model']} (baselines.json, seed 0)": {**{k: r["test"][k] for k in METRICS}, "train_s": r["train_seconds"]}
            for r in rows if r["dataset"] == dataset and r["model"] in ("sasrec", "itemknn")}


def part_baselines(dataset: str, seeds: list[int], workdir: Path) -> dict[str, Any]:
    from llmrec.eval.protocol import evaluate_full
    from llmrec.models.itemknn import ItemKNN, ItemKNNConfig
    from llmrec.models.sasrec import SASRec, SASRecConfig

    split = load_split(dataset, workdir)
    rows: dict[str, Any] = {}
    knn = ItemKNN(ItemKNNConfig(), split.n_items)
    knn.fit(split, progress=False)
    rows["itemknn"] = {k: evaluate_full(knn, split.test, ks=KS).overall[k] for k in METRICS}
    for seed in seeds:
        t0 = time.perf_counter()
        sas = SASRec(SASRecConfig(seed=seed, num_threads=1), split.n_items)
        sas.fit(split, progress=False)
        r = evaluate_full(sas, split.test, ks=KS).overall
        rows[f"sasrec-s{seed}"] = {**{k: r[k] for k in METRICS}, "train_s": time.perf_counter() - t0}
        print(dataset, seed, rows[f"sasrec-s{seed}"], flush=True)
    return rows


# --- part: one graph-lm run ------------------------------------------------------------------------------


def part_run(dataset: str, variant: str, seed: int, overrides: dict[str, Any], workdir: Path, smoke: bool) -> dict[str, Any]:
    from llmrec.eval.protocol import evaluate_full
    from llmrec.models.graph_lm import GraphLM, GraphLMConfig

    split = load_split(dataset, workdir)
    params = {**PARAMS, **(SMOKE if smoke else {}), "graph_bias": variant, "seed": seed, **overrides}
    model = GraphLM(GraphLMConfig(**params), split.n_items)
    tag = f"{dataset}-{variant}-s{seed}"
    t0 = time.perf_counter()
    info = model.fit(split, progress=False, workdir=workdir / "runs" / tag)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate_full(model, split.test, ks=KS, batch_size=256)
    eval_s = time.perf_counter() - t0
    per_user = workdir / "per_user"
    per_user.mkdir(parents=True, exist_ok=True)
    np.savez(per_user / f"{tag}.npz", users=res.users, **{k: res.per_user[k] for k in ("ndcg@10", "recall@10")})
    row = {"dataset": dataset, "variant": variant, "seed": seed, **{k: res.overall[k] for k in METRICS},
           "train_s": train_s, "eval_s": eval_s, "peak_rss_mb": rss_mb(), "best_valid_ndcg@10": info["best_valid_ndcg@10"],
           "best_step": info["best_step"], "steps": info["steps"], "stopped": info["stopped"],
           "seconds_per_step": info["seconds_per_step"], "pretrain": info["pretrain"], "graph": info["graph"],
           "params": params}
    if variant == "learned":
        scale = model.graph_net.graph_scale.detach().float()  # (layers, heads, channels)
        row["learned_scale_mean_per_layer_channel"] = scale.mean(1).tolist()
    print(json.dumps({k: v for k, v in row.items() if k != "params"}, default=float), flush=True)
    return row


# --- the report -----------------------------------------------------------------------------------------


def paired(workdir: Path, runs: dict[str, Any], recorded: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Each fixed / learned run against ``none`` of the same dataset and seed: NDCG@10 and Recall@10 gains,
    with a paired bootstrap 95% interval over test users (2000 resamples). A pair whose per-user files are
    not in ``workdir`` (runs made on another checkout) keeps the interval ``recorded`` for it."""
    before = {(p["dataset"], p["variant"], p["seed"]): p for p in recorded}
    out = []
    for tag, r in sorted(runs.items()):
        if r["variant"] == "none":
            continue
        base_tag = f"{r['dataset']}-none-s{r['seed']}"
        if base_tag not in runs:
            continue
        row: dict[str, Any] = {"dataset": r["dataset"], "variant": r["variant"], "seed": r["seed"]}
        recorded_row = before.get((r["dataset"], r["variant"], r["seed"]), {})
        a, b = workdir / "per_user" / f"{tag}.npz", workdir / "per_user" / f"{base_tag}.npz"
        for m in ("ndcg@10", "recall@10"):
            row[m] = r[m] - runs[base_tag][m]
            if a.exists() and b.exists():
                x, y = np.load(a), np.load(b)
                d = np.nan_to_num(x[m]) - np.nan_to_num(y[m])
                rng = np.random.default_rng(0)
                boots = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)]
                row[f"{m}_ci"] = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
            elif f"{m}_ci" in recorded_row:
                row[f"{m}_ci"] = recorded_row[f"{m}_ci"]
        out.append(row)
    return out


def seed_interval(gains: list[float]) -> str:
    from llmrec.eval.report import seed_interval as interval

    if len(gains) < 2:
        return f"{gains[0]:+.4f} (1 seed)"
    mean, lo, hi = interval(gains)
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] ({len(gains)} seeds)"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Graph-aware LM (graph-lm)", "",
             (f"Hardware: {HARDWARE} ({result.get('machine', {}).get('platform', '')}). Leave-one-out, full ranking "
             "over all items, history items excluded, test set; checkpoints chosen on validation NDCG@10 only."), ""]
    runs = result.get("runs", {})
    if runs:
        lines += ["## With and without the graph bias", "",
                  ("| dataset | model | seed | ndcg@10 | recall@10 | ndcg@20 | recall@20 | valid ndcg@10 | best step / steps | "
                  "train min (pre-train + fine-tune + load) | s/step | peak MB |"),
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in sorted(runs.values(), key=lambda r: (r["dataset"], r["seed"], r["variant"])):
            lines.append(f"| {r['dataset']} | graph-lm, bias {r['variant']} | {r['seed']} | {r['ndcg@10']:.4f} | "
                         f"{r['recall@10']:.4f} | {r['ndcg@20']:.4f} | {r['recall@20']:.4f} | {r['best_valid_ndcg@10']:.4f} | "
                         f"{r['best_step']} / {r['steps']} | {r['train_s'] / 60:.1f} | {r['seconds_per_step']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} |")
        for ds, rows in sorted(result.get("baselines", {}).items()):
            for name, r in rows.items():
                lines.append(f"| {ds} | {name} (same split) | - | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | "
                             f"{r['ndcg@20']:.4f} | {r['recall@20']:.4f} | - | - | {r.get('train_s', 0) / 60:.1f} | - | - |")
        pairs = paired(Path(result.get("workdir", ROOT / "work" / "bench" / "graph_lm")), runs, result.get("paired", []))
        result["paired"] = pairs
        if pairs:
            lines += ["", ("Paired gains over the same model without the bias (same dataset, seed, budget), with a "
                      "paired bootstrap 95% interval over test users:"), "",
                      "| dataset | variant | seed | ndcg@10 gain [95% CI over users] | recall@10 gain [95% CI] |",
                      "|---|---|---:|---|---|"]
            for p in pairs:
                ci = {m: (" [{:+.4f}, {:+.4f}]".format(*p[f"{m}_ci"]) if f"{m}_ci" in p else "") for m in ("ndcg@10", "recall@10")}
                lines.append(f"| {p['dataset']} | {p['variant']} | {p['seed']} | {p['ndcg@10']:+.4f}{ci['ndcg@10']} | "
                             f"{p['recall@10']:+.4f}{ci['recall@10']} |")
            lines += ["", "Over seeds (mean, t-interval when 2 or more seeds):", ""]
            for key in sorted({(p["dataset"], p["variant"]) for p in pairs}):
                gains = [p["ndcg@10"] for p in pairs if (p["dataset"], p["variant"]) == key]
                lines.append(f"- {key[0]}, {key[1]} vs none: NDCG@10 {seed_interval(gains)}")
    g = result.get("graph")
    if g:
        lines += ["", (f"## Graph build: {g['dataset']} ({g['users']} users, {g['items']} items, {g['train_edges']} "
                  "training edges)"), "",
                  (f"Sparse build (scipy.sparse A.T @ A, cosine, sorted pair keys): {g['build_seconds']:.2f} s, "
                  f"peak {g['build_peak_mb']:.0f} MB allocated during the build (tracemalloc), tables "
                  f"{g['table_mb']:.0f} MB, {g['item_pairs']} item pairs; process peak RSS {g['process_peak_rss_mb']:.0f} MB "
                  f"(dataset loaded: {g['rss_before_mb']:.0f} MB before the build)."),
                  (f"Bias of one batch ({g['bias_batch_us']['batch']} prompts x {g['bias_batch_us']['length']} tokens, "
                  f"channels {', '.join(g['bias_batch_us']['channels'])}): median {g['bias_batch_us']['median']:.0f} us, "
                  f"p95 {g['bias_batch_us']['p95']:.0f} us (1 thread)."), "",
                  ("Naive dense approach of the published code (dense adjacency over users + items, Floyd-Warshall, a "
                  "Python loop over batch x L x L) against this one, on subsets of Games users:"), "",
                  ("| users | items | nodes | sparse build s | dense Floyd-Warshall s | dense matrix MB | vectorized bias us/batch (median) | "
                  "Python-loop bias us/batch (median) |"), "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in g["scaling"]:
            lines.append(f"| {s['users']} | {s['items']} | {s['nodes']} | {s['sparse_build_s']:.4f} | "
                         f"{s['dense_floyd_warshall_s']:.2f} | {s['dense_matrix_mb']:.1f} | {s['sparse_bias_batch_us']:.0f} | "
                         f"{s['python_loop_bias_batch_us']:.0f} |")
        e = g["dense_extrapolated_full"]
        lines += ["", (f"Dense at full size ({e['nodes']} nodes), extrapolated (n^3 from the largest subset): "
                  f"Floyd-Warshall about {e['floyd_warshall_hours']:.0f} hours and a {e['distance_matrix_gb']:.1f} GB "
                  "float32 distance matrix; not run.")]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["graph", "baselines", "run", "table"])
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench")
    ap.add_argument("--dataset", default="amazon-office-2014")
    ap.add_argument("--variant", choices=["none", "fixed", "learned"], default="fixed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--lm", nargs="*", default=[], help="GraphLM config overrides (key=value)")
    ap.add_argument("--smoke", action="store_true", help="tiny random backbone; results under the workdir")
    ap.add_argument("--train", action="store_true", help="baselines: train SASRec / ItemKNN again (else the recorded rows)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_dir = args.workdir / "smoke-results" if args.smoke else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "graph_lm.json"
    workdir = args.workdir / ("graph_lm-smoke" if args.smoke else "graph_lm")
    new: dict[str, Any] = {}
    if args.part == "graph":
        new["graph"] = part_graph(args.workdir, sizes=(50, 100) if args.smoke else (100, 200, 400))
    elif args.part == "baselines":
        new["baselines"] = part_baselines(args.dataset, args.seeds, args.workdir) if args.train \
            else recorded_baselines(args.dataset)
    elif args.part == "run":
        new["run"] = part_run(args.dataset, args.variant, args.seed, parse_overrides(args.lm), workdir, args.smoke)
    # read the results only now, under a lock: runs of other variants may have finished while this one trained
    with (out_dir / ".graph_lm.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
        result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "hardware": HARDWARE}
        result["workdir"] = str(workdir)
        if "graph" in new:
            result["graph"] = new["graph"]
        if "baselines" in new:
            result.setdefault("baselines", {})[args.dataset] = new["baselines"]
        if "run" in new:
            result.setdefault("runs", {})[f"{args.dataset}-{args.variant}-s{args.seed}"] = new["run"]
        md = markdown(result)
        json_path.write_text(json.dumps(result, indent=2, default=float))
        (out_dir / "graph_lm.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Error analysis of a trained ``instruct-lm`` run: ``llmrec analyze RUN_DIR``.

Scores a fixed seeded sample of test users (or all) and writes ``analysis/analysis.md`` and PNG
plots (matplotlib) into the run directory: the metric (choice accuracy, or NDCG@10 for title and
rerank) by history length, by the target's category and by the target's training popularity; the
popularity of the top prediction against the truth's (popularity bias); the position (option letter)
of the chosen option against the true one's (position bias); and the most frequent confusions, with
titles.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

BINS_LEN = [0, 3, 5, 8, 13, 21, 10_000]


def _records(run: Any, n_users: int, seed: int) -> dict[str, Any]:
    """Per-user records: target, top-1 item, metric, chosen / true option position, history length."""
    from llmrec.eval.metrics import ranking_metrics
    from llmrec.models.instruct.evaluate import choice_accuracy

    model, test = run.model, run.split.test.sample(n_users, np.random.default_rng([seed, 5]))
    if model.config.mode == "choice":
        res = choice_accuracy(model, test, seed=seed)
        rec = res["records"]
        top1 = [o[c] for o, c in zip(rec["options"], rec["chosen"], strict=True)]
        metric = [float(c == t) for c, t in zip(rec["chosen"], rec["truth"], strict=True)]
        blind = choice_accuracy(model, test, seed=seed, blind=True)
        return {"metric_name": "accuracy", "targets": rec["targets"], "top1": top1, "metric": metric,
                "chosen_pos": rec["chosen"], "true_pos": rec["truth"], "history_len": rec["history_len"],
                "summary": {"accuracy": res["accuracy"], "ci95": res["ci95"], "chance": res["chance"],
                            "history_blind_accuracy": blind["accuracy"], "users": res["n_users"]}}
    if model.config.mode == "rerank":
        from llmrec.models.instruct.evaluate import rerank_report

        rep = rerank_report(model, test)
        rec = rep["records"]
        ranked = np.asarray(rec["ranked"])
        shortl = np.asarray(rec["shortlists"])
        chosen = [int(np.flatnonzero(s == r[0])[0]) if r[0] in s else -1 for s, r in zip(shortl, ranked, strict=True)]
        truth = [int(np.flatnonzero(s == t)[0]) if t in s else -1 for s, t in zip(shortl, rec["targets"], strict=True)]
        return {"metric_name": "ndcg@10", "targets": rec["targets"], "top1": ranked[:, 0].tolist(),
                "metric": rep["reranked_per_user"]["ndcg@10"], "chosen_pos": chosen, "true_pos": truth,
                "position_kind": "retriever rank", "history_len": rec["history_len"],
                "summary": {k: rep[k] for k in ("reranked", "retriever", "lm_only", "reranked_in_shortlist",
                                                "retriever_in_shortlist", "in_shortlist_rate", "gain_ndcg@10",
                                                "gain_ndcg@10_ci95", "n_users", "mix")}}
    ids = model.recommend(test.histories, k=10, users=test.users)[0]
    per = ranking_metrics(ids, test.targets, [10], ["ndcg"])["ndcg@10"]
    return {"metric_name": "ndcg@10", "targets": [int(t[0]) for t in test.targets], "top1": ids[:, 0].tolist(),
            "metric": per.tolist(), "chosen_pos": [], "true_pos": [], "history_len": [len(h) for h in test.histories],
            "summary": {"ndcg@10": float(np.nanmean(per)), "users": len(test), **model.last_generation}}


def _by(keys: list[Any], values: np.ndarray) -> list[tuple[Any, int, float]]:
    groups: dict[Any, list[float]] = {}
    for k, v in zip(keys, values, strict=True):
        groups.setdefault(k, []).append(float(v))
    return [(k, len(v), float(np.mean(v))) for k, v in groups.items()]


def _bar(path: Path, labels: list[str], values: list[float], title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(values)), values, color="#4477aa")
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze(run_dir: str | Path, n_users: int = 500, seed: int | None = None, out: str | Path | None = None
            ) -> dict[str, Any]:
    """Write the error-analysis report of ``run_dir`` (see the module docstring); returns its figures. ``seed`` draws
    the user sample and the candidate lists (default: the run's own seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmrec.runs import load_run

    run = load_run(run_dir)
    if run.config.model.name != "instruct-lm":
        raise ValueError(f"{run_dir}: llmrec analyze reads instruct-lm runs, this is a {run.config.model.name} run")
    out = Path(out) if out else Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    rec = _records(run, n_users, run.config.seed if seed is None else seed)
    words, counts = run.model.words, run.split.train_item_counts()
    metric, name = np.asarray(rec["metric"], dtype=np.float64), rec["metric_name"]
    targets, top1 = np.asarray(rec["targets"]), np.asarray(rec["top1"])
    hl = np.asarray(rec["history_len"])
    len_bin = [f"{BINS_LEN[i]}-{BINS_LEN[i + 1] - 1}" if BINS_LEN[i + 1] < 10_000 else f">={BINS_LEN[i]}"
               for i in np.digitize(hl, BINS_LEN[1:])]
    edges = np.quantile(counts[targets], [0.25, 0.5, 0.75])
    pop_names = ["Q1 (rarest)", "Q2", "Q3", "Q4 (most popular)"]
    pop_bin = [pop_names[int(np.searchsorted(edges, counts[t], side="right"))] for t in targets]
    cats = [words.categories[t] or "(none)" for t in targets]
    tables = {"history length": sorted(_by(len_bin, metric), key=lambda r: int(str(r[0]).strip(">=").split("-")[0])),
              "target popularity (training-count quartile)": sorted(_by(pop_bin, metric), key=lambda r: pop_names.index(r[0])),
              "target category (10 most frequent)": sorted(_by(cats, metric), key=lambda r: -r[1])[:10]}
    for i, (title, rows) in enumerate(tables.items()):
        _bar(out / f"by_{['length', 'popularity', 'category'][i]}.png", [str(r[0]) for r in rows],
             [r[2] for r in rows], f"{name} by {title}", name)
    # popularity bias: training counts of the top prediction vs of the truth
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.logspace(0, np.log10(max(2.0, counts.max() + 1)), 25)
    ax.hist(counts[targets] + 1, bins=bins, alpha=0.6, label="true next item")
    ax.hist(counts[top1[top1 >= 0]] + 1, bins=bins, alpha=0.6, label="top prediction")
    ax.set_xscale("log")
    ax.set_xlabel("training count + 1")
    ax.set_ylabel("users")
    ax.legend()
    ax.set_title("popularity of predictions vs truth")
    fig.tight_layout()
    fig.savefig(out / "popularity_bias.png", dpi=110)
    plt.close(fig)
    pos = {}
    if rec["chosen_pos"]:
        n_opt = run.model.config.n_candidates
        chosen = np.bincount(np.asarray([c for c in rec["chosen_pos"] if c >= 0], dtype=int), minlength=n_opt)
        truth = np.bincount(np.asarray([c for c in rec["true_pos"] if c >= 0], dtype=int), minlength=n_opt)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(n_opt)
        ax.bar(x - 0.2, truth, 0.4, label="true option")
        ax.bar(x + 0.2, chosen, 0.4, label="chosen option")
        kind = rec.get("position_kind", "option letter")
        ax.set_xticks(x, [chr(65 + i) if kind == "option letter" else str(i + 1) for i in x])
        ax.set_xlabel(kind)
        ax.legend()
        ax.set_title(f"position bias ({kind})")
        fig.tight_layout()
        fig.savefig(out / "position_bias.png", dpi=110)
        plt.close(fig)
        pos = {"chosen": chosen.tolist(), "truth": truth.tolist(), "kind": kind}
    wrong = [(int(t), int(p)) for t, p, m in zip(targets, top1, metric, strict=True) if m == 0 and p >= 0]
    conf = Counter((words.categories[t] or "(none)", words.categories[p] or "(none)") for t, p in wrong).most_common(8)
    examples = [(words.titles[t], words.titles[p]) for t, p in wrong[:8]]
    bias = {"median_count_truth": float(np.median(counts[targets])),
            "median_count_top1": float(np.median(counts[top1[top1 >= 0]])) if (top1 >= 0).any() else float("nan")}
    report = {"summary": rec["summary"], "metric": name, "tables": tables, "popularity_bias": bias, "position": pos,
              "category_confusions": conf, "confusion_examples": examples}
    (out / "analysis.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "analysis.md").write_text(markdown(report, str(run_dir), len(metric)))
    return report


def markdown(rep: dict[str, Any], run_dir: str, n: int) -> str:
    name = rep["metric"]
    lines = [f"# Error analysis of {run_dir}", "",
             f"{n} test users (a fixed seeded sample; leave-one-out split). Summary: `{json.dumps(rep['summary'], default=str)}`", ""]
    for title, rows in rep["tables"].items():
        lines += [f"## {name} by {title}", "", "| group | users | " + name + " |", "|---|---:|---:|"]
        lines += [f"| {g} | {c} | {v:.4f} |" for g, c, v in rows] + [""]
    b = rep["popularity_bias"]
    bias = (f"Median training count of the true next item {b['median_count_truth']:.0f}, "
            f"of the top prediction {b['median_count_top1']:.0f} (`popularity_bias.png`).")
    lines += ["## Popularity bias", "", bias, ""]
    if rep["position"]:
        p = rep["position"]
        lines += [f"## Position bias ({p['kind']})", "", "| position | true | chosen |", "|---:|---:|---:|"]
        lines += [f"| {i + 1} | {t} | {c} |" for i, (t, c) in enumerate(zip(p["truth"], p["chosen"], strict=True))] + [""]
    lines += ["## Typical confusions", "", "| true category | predicted category | users |", "|---|---|---:|"]
    lines += [f"| {a} | {b_} | {c} |" for (a, b_), c in rep["category_confusions"]] + ["",
              "| true next item | top prediction |", "|---|---|"]
    lines += [f"| {t} | {p} |" for t, p in rep["confusion_examples"]] + [""]
    lines += ["Plots: `by_length.png`, `by_popularity.png`, `by_category.png`, `popularity_bias.png`"
              + (", `position_bias.png`" if rep["position"] else "") + ".", ""]
    return "\n".join(lines)

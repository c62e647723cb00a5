"""Markdown tables of ``benchmarks/results/instruct.json`` (written by ``benchmarks/instruct.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.eval.report import seed_interval

RESULTS = Path(__file__).resolve().parent / "results"


def t_interval(values: list[float]) -> str:
    """mean [95% Student t interval] over seeds (the mean alone for one seed)."""
    if len(values) < 2:
        return f"{float(np.mean(values)):.4f} (1 seed)"
    m, lo, hi = seed_interval(values)
    return f"{m:.4f} [{lo:.4f}, {hi:.4f}]"


def _runs(result: dict[str, Any], part: str) -> list[dict[str, Any]]:
    return sorted((r for r in (result.get("runs") or {}).values() if r["part"] == part),
                  key=lambda r: (r["dataset"], r["tag"], r["seed"]))


def _scoring(r: dict[str, Any]) -> str:
    """How the run scores options (its letters, the verbalizer, or its titles' likelihood) and with how many
    of the backbone's 30 blocks."""
    p = r.get("params") or {}
    scoring = str(p.get("scoring", "letters"))
    if scoring == "titles":
        scoring += f" ({p.get('title_score', 'mean')})"
    n = int(p.get("n_layers", 8))
    return f"{scoring}, {n if n else 30} blocks"


def _fit(r: dict[str, Any]) -> str:
    f = r["fit"]
    if f["stopped"] == "finetune=none":
        return (f"untuned (finetune none), valid {f['valid_metric']} {f['best_valid']:.4f} on {f['valid_users']} users, "
                f"{r['train_seconds'] / 60:.1f} min")
    return (f"{f['steps']} steps ({f['seconds_per_step']:.1f} s/step, stopped by {f['stopped']}, best valid "
            f"{f['valid_metric']} {f['best_valid']:.4f} at step {f['best_step']}), {r['train_seconds'] / 60:.1f} min")


def choice_section(result: dict[str, Any]) -> list[str]:
    runs = _runs(result, "choice")
    if not runs:
        return []
    lines = ["## (a) Choice among 20: the true next item + 19 popularity-sampled negatives", "",
             ("Options normalized identically and shuffled with a seed; one forward pass scores all 20 options, "
             "through their letters after a prompt that lists them (scoring `letters`) or through the likelihood of "
             "each title after a prompt with the history only, all titles packed in the same pass (scoring `titles`). "
             "\"History-blind\" is the same fine-tuned model with the purchases removed from its prompts (it sees "
             "the options only). Test users: a fixed seeded sample (size in the table), 95% Wilson intervals."), "",
             ("| dataset | run | scoring | seed | accuracy [95% CI] | chance | history-blind accuracy [95% CI] | test users "
              "| training |"),
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        t = r["test"]
        lines.append(f"| {r['dataset']} | {r['tag'] or 'lora'} | {_scoring(r)} | {r['seed']} | {t['accuracy']:.4f} [{t['ci95'][0]:.4f}, "
                     f"{t['ci95'][1]:.4f}] | {t['chance']:.3f} | {t['history_blind_accuracy']:.4f} "
                     f"[{t['history_blind_ci95'][0]:.4f}, {t['history_blind_ci95'][1]:.4f}] | {t['test_users']} | {_fit(r)} |")
    refs = [(r, name, v) for r in runs for name, v in (r["test"].get("references") or {}).items()]
    if refs:
        lines += ["", ("Reference: classic recommenders fitted on the same training split picking the highest-scored "
                  "option of the very same candidate lists (those of the run named):"), "",
                  "| dataset | run | seed | model | accuracy [95% CI] | test users |", "|---|---|---:|---|---:|---:|"]
        lines += [f"| {r['dataset']} | {r['tag'] or 'lora'} | {r['seed']} | {name} | {v['accuracy']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | "
                  f"{r['test']['test_users']} |" for r, name, v in refs]
    groups = _groups(runs)
    lines += ["", "Over seeds (mean [95% t interval]):", "", "| dataset | run | seeds | accuracy | history-blind |",
              "|---|---|---|---:|---:|"]
    for (d, tag), rs in groups.items():
        lines.append(f"| {d} | {tag or 'lora'} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{t_interval([r['test']['accuracy'] for r in rs])} | "
                     f"{t_interval([r['test']['history_blind_accuracy'] for r in rs])} |")
    return lines + [""]


def rerank_section(result: dict[str, Any]) -> list[str]:
    runs = _runs(result, "rerank")
    if not runs:
        return []
    lines = ["## (c) Re-ranking SASRec's top 20 (full ranking over the whole catalog)", "",
             ("The SASRec is the one the run trained on the same training split (its seed); items outside the "
             "shortlist keep SASRec's order. The shortlist is shown to the LM in a seeded random order; the "
             "shortlist score is LM log-prob + w x SASRec's log-softmax over the shortlist, w chosen on validation "
             "(w = 0: the LM's order alone, column \"LM order\"). Gain: re-ranked minus the same SASRec on the same "
             "users, 95% user-bootstrap interval."), "",
             ("| dataset | run | scoring | seed | re-ranked ndcg@10 / recall@10 | SASRec alone ndcg@10 / recall@10 | gain ndcg@10 [95% CI] "
             "| LM order ndcg@10 | target in top 20 | in-shortlist users: re-ranked / SASRec ndcg@10 | w | test users | training |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        t = r["test"]
        lines.append(
            f"| {r['dataset']} | {r['tag'] or 'lora'} | {_scoring(r)} | {r['seed']} | {t['reranked']['ndcg@10']:.4f} / {t['reranked']['recall@10']:.4f} | "
            f"{t['retriever']['ndcg@10']:.4f} / {t['retriever']['recall@10']:.4f} | {t['gain_ndcg@10']:+.4f} "
            f"[{t['gain_ndcg@10_ci95'][0]:+.4f}, {t['gain_ndcg@10_ci95'][1]:+.4f}] | {t['lm_only']['ndcg@10']:.4f} | "
            f"{t['in_shortlist_rate']:.3f} | {t['reranked_in_shortlist']['ndcg@10']:.4f} / "
            f"{t['retriever_in_shortlist']['ndcg@10']:.4f} | {t['mix']:g} | {t['n_users']} | {_fit(r)} |")
    return lines + [""]


def title_section(result: dict[str, Any]) -> list[str]:
    runs = _runs(result, "title")
    if not runs:
        return []
    lines = ["## (b) Title generation (full ranking over the catalog)", "",
             ("Trie: beam search (10 beams) constrained to the catalog's titles; the beams, best first, are the "
             "ranking (then training popularity). Free: greedy decoding over the whole vocabulary, then the text is "
             "grounded to the nearest catalog title by all-MiniLM-L6-v2 cosine similarity, which ranks the catalog."), "",
             "| dataset | seed | decoding | valid-title rate | grounding rate | ndcg@10 | recall@10 | ms per user | test users |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for dec in ("trie", "free"):
            t = r["test"][dec]
            lines.append(f"| {r['dataset']} | {r['seed']} | {dec} | {t.get('valid_title_rate', float('nan')):.3f} | "
                         f"{t.get('grounding_rate', float('nan')):.3f} | {t['ndcg@10']:.4f} | {t['recall@10']:.4f} | "
                         f"{t['ms_per_user']:.0f} | {r['test']['test_users']} |")
    it = RESULTS / "itemtoken.json"
    if it.exists():
        loo = json.loads(it.read_text()).get("loo") or {}
        if loo:
            gen = loo.get("generated_lists", {})
            lines += ["", (f"Beside the item-token LM (its leave-one-out run `loo` in benchmarks/results/itemtoken.json, Office): fast path "
                      f"ndcg@10 {loo['test']['ndcg@10']:.4f} on all {loo['test_users']} test users; constrained beam lists "
                      f"ndcg@10 {gen.get('beam', {}).get('ndcg@10', float('nan')):.4f} on {gen.get('users')} sampled users.")]
    examples = [e for r in runs for e in r["test"]["free"].get("examples", [])][:5]
    if examples:
        lines += ["", "Free generations (first users): " + "; ".join(f"`{e}`" for e in examples)]
    return lines + [""]


def zeroshot_section(result: dict[str, Any]) -> list[str]:
    zs = result.get("zeroshot")
    if not zs:
        return []
    lines = ["## The untuned backbone's title scores (choice among 20, VALIDATION users)", "",
             ("No training: SmolLM2-135M-Instruct (blocks kept: column) scores each of the 20 options by its title's "
              "log-likelihood (title + end token) after the prompt with the history, or after the same prompt with "
              "no history (a text-only baseline: it sees the options, not the shopper), summed or averaged per "
              "token; PMI is the difference of the two sums. The same candidate lists as the choice runs' "
              "construction (popularity negatives), on a fixed seeded sample of validation users; Wilson intervals."),
             "", "| dataset | blocks | score | accuracy [95% CI] | chance | valid users | seconds |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for z in zs.values():
        for name, v in z["rows"].items():
            lines.append(f"| {z['dataset']} | {z['n_layers'] or 'all'} | {name} | {v['accuracy']:.4f} "
                         f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | {z['chance']:.3f} | {z['valid_users']} | "
                         f"{z['seconds']:.0f} |")
    return lines + [""]


def adapters_section(result: dict[str, Any]) -> list[str]:
    a = result.get("adapters")
    if not a:
        return []
    lines = ["## LoRA vs QLoRA (same data, same steps, same seed; each in its own process)", "",
             "| fine-tuning | steps | s / step | peak RSS MB | trainable params | choice-20 accuracy [95% CI] | test users |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in a["rows"]:
        if "error" in r:
            lines.append(f"| {r['finetune']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['finetune']} | {r['steps']} | {r['seconds_per_step']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['trainable_parameters']:,} | {r['accuracy']:.4f} [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] | "
                     f"{r['test_users']} |")
    return lines + [""]


def _groups(runs: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Runs of one dataset and tag (the same recipe) under different seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["tag"]), []).append(r)
    return groups


def targets_section(result: dict[str, Any]) -> list[str]:
    """The issue's targets, judged from the figures above: per run, and over seeds where a recipe has 3."""
    lines = ["## Targets of the issue", ""]
    for (d, tag), rs in _groups(_runs(result, "choice")).items():
        for r in rs:
            t = r["test"]
            met = t["ci95"][0] > t["chance"] and t["ci95"][0] > t["history_blind_ci95"][1]
            lines.append(f"- Choice among 20, {d} run {tag or 'lora'} seed {r['seed']}: accuracy {t['accuracy']:.4f} "
                         f"[{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] vs chance {t['chance']:.3f} and history-blind "
                         f"{t['history_blind_accuracy']:.4f}: **{'met' if met else 'NOT met'}** for this seed (far above "
                         "chance and above the history-blind baseline).")
        if len(rs) >= 3:
            m, lo, _ = seed_interval([r["test"]["accuracy"] for r in rs])
            bm, _, bhi = seed_interval([r["test"]["history_blind_accuracy"] for r in rs])
            chance = rs[0]["test"]["chance"]
            met = lo > chance and lo > bhi
            lines.append(f"- **Choice among 20, {d} run {tag or 'lora'} over {len(rs)} seeds**: accuracy {m:.4f} (95% t "
                         f"interval from {lo:.4f}) vs chance {chance:.3f} and history-blind {bm:.4f} (up to {bhi:.4f}): "
                         f"**{'met' if met else 'NOT met'}**.")
    for (d, tag), rs in _groups(_runs(result, "rerank")).items():
        for r in rs:
            t = r["test"]
            met = t["gain_ndcg@10_ci95"][0] > 0
            lines.append(f"- Re-ranking SASRec's top 20, {d} run {tag or 'lora'} seed {r['seed']}: NDCG@10 "
                         f"{t['reranked']['ndcg@10']:.4f} vs the same SASRec {t['retriever']['ndcg@10']:.4f}, gain "
                         f"{t['gain_ndcg@10']:+.4f} [{t['gain_ndcg@10_ci95'][0]:+.4f}, {t['gain_ndcg@10_ci95'][1]:+.4f}]: "
                         f"**{'met' if met else 'NOT met'}** for this seed (gain interval excluding zero); training "
                         f"{r['train_seconds'] / 60:.0f} min of CPU (within 60).")
        if len(rs) >= 3:
            m, lo, hi = seed_interval([r["test"]["gain_ndcg@10"] for r in rs])
            lines.append(f"- **Re-ranking, {d} run {tag or 'lora'} over {len(rs)} seeds**: paired NDCG@10 gain {m:+.4f} "
                         f"[{lo:+.4f}, {hi:+.4f}] (95% t interval): **{'met' if lo > 0 else 'NOT met'}**.")
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    lines = ["# Instruction-tuned chat LM (instruct-lm)", "",
             (f"Hardware: {m.get('hardware')} ({m.get('platform')}). Leave-one-out split; checkpoints and weights chosen "
             "on validation only. Backbone: SmolLM2-135M-Instruct, cut to its first 8 of 30 blocks (a CPU budget) where the scoring column says so, "
             "LoRA r=16 on every linear layer, frozen weights in bf16, chat template, the newest 6 purchases, titles "
             "cut to 40 characters (see `COMMON` in benchmarks/instruct.py). Test figures are on a FIXED SEEDED "
             "SAMPLE of test users (sizes below), not the whole test set."), ""]
    lines += targets_section(result)
    lines += choice_section(result) + zeroshot_section(result) + rerank_section(result) + title_section(result)
    lines += adapters_section(result)
    an = result.get("analysis")
    if an:
        lines += ["## Error analysis", "", f"Run `{an['run']}`: see `{an['dir']}/analysis.md` and its plots.", ""]
    return "\n".join(lines)

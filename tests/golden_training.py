"""Golden training results, recorded from the code before the shared training loop existed.

Each case fits a model on a tiny cycle split with one torch thread and a budget that never binds,
and summarizes what training produced: every weight tensor (its float64 sum and sum of squares),
the validation history, the stop reason and the best epoch/step. ``tests/test_train_golden.py``
refits each case and compares; ``python tests/golden_training.py`` re-records (only when a
change of training results is intended).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cycle_split

from llmrec.models.registry import build_model

GOLDEN = Path(__file__).parent / "golden" / "training.json"

SASREC = {"hidden_size": 32, "n_layers": 1, "n_heads": 2, "inner_size": 64, "dropout": 0.1, "attn_dropout": 0.0,
          "max_len": 12, "lr": 1e-2, "batch_size": 16, "max_epochs": 40, "eval_every": 5, "patience": 100,
          "max_minutes": 30.0, "seed": 0, "num_threads": 1, "eval_batch_size": 7}
SEMID = {"embedder": "hash", "rq_levels": 2, "rq_codebook_size": 8, "rq_latent_dim": 8, "rq_hidden": 32,
         "rq_steps": 100, "d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ff_size": 64,
         "dropout": 0.1, "max_len": 12, "lr": 0.005, "batch_size": 16, "max_epochs": 30, "eval_every": 10,
         "patience": 100, "max_minutes": 30.0, "beam_size": 10, "seed": 0, "num_threads": 1}
LM = {"backbone": "random-tiny-llama", "template": "plain", "title_tokens": 2, "max_prompt_tokens": 128,
      "lr": 1e-2, "item_lr": 3e-2, "batch_size": 8, "epochs": 6, "eval_every": 10, "patience": 100,
      "warmup_steps": 5, "num_threads": 1, "lora_dropout": 0.1, "amp": "off", "collab_cache": False}

# name -> (model, params, split kwargs)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "sasrec-cosine": ("sasrec", SASREC, {"n_users": 30, "lengths": (6, 16), "catalog": False}),
    "sasrec-patience": ("sasrec", {**SASREC, "lr_schedule": "constant", "weight_decay": 0.01, "eval_every": 1,
                                   "patience": 2, "min_epochs": 6, "lr": 3e-2}, {"n_users": 30, "lengths": (6, 16)}),
    "semantic-id": ("semantic-id", SEMID, {}),
    "semantic-id-schedule": ("semantic-id", {**SEMID, "warmup_epochs": 1.5, "decay_epochs": 12, "eval_every": 2,
                                             "patience": 2, "min_epochs": 4, "valid_users": 20,
                                             "collab_states": True, "collab_cache": False, "collab_minutes": 1.0,
                                             "item_embeddings": True}, {}),
    "itemtoken": ("itemtoken-lm", LM, {}),
    "itemtoken-accum": ("itemtoken-lm", {**LM, "grad_accum": 2, "examples_per_user": 3, "eval_every": 3,
                                         "patience": 2, "schedule": "linear", "valid_users": 20, "epochs": 20,
                                         "fit_schedule_to_budget": False, "weight_decay": 0.01}, {}),
    "itemtoken-collab": ("itemtoken-lm", {**LM, "item_rank": 4, "tie_item_rows": True, "collab_init": "sasrec",
                                          "collab_state": "items", "collab_minutes": 1.0, "max_steps": 25,
                                          "target": "next-k", "next_k": 3, "dense": False}, {}),
}

HISTORY_KEYS = ("epoch", "step", "loss", "valid_ndcg@10")
FIT_KEYS = ("stopped", "epochs", "steps", "best_epoch", "best_step", "best_valid_ndcg@10")


def run_case(name: str) -> dict[str, Any]:
    """Fit case ``name`` and summarize its weights and training facts (JSON-able)."""
    model_name, params, split_kw = CASES[name]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = cycle_split(**split_kw)
        model = build_model(model_name, params, split.n_items)
        fit = model.fit(split, progress=False)
        tensors, _ = model._state()
    finally:
        torch.set_num_threads(old)
    weights = {k: [float(np.asarray(v, dtype=np.float64).sum()), float((np.asarray(v, dtype=np.float64) ** 2).sum())]
               for k, v in sorted(tensors.items()) if np.asarray(v).dtype.kind == "f"}
    history = [{k: float(r[k]) for k in HISTORY_KEYS if k in r} for r in fit["history"]]
    facts = {k: (fit[k] if isinstance(fit[k], str) else float(fit[k])) for k in FIT_KEYS if k in fit}
    return {"weights": weights, "history": history, "fit": facts}


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    out = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    for name in names:
        out[name] = run_case(name)
        print(name, out[name]["fit"], len(out[name]["weights"]), "tensors", flush=True)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

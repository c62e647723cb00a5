"""Hyper-parameters of the instruction-tuned chat LM (:class:`InstructLMConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmrec.models.amp import Amp
from llmrec.models.collab import CompanionKeys
from llmrec.models.llm.backbone import DEFAULT_BACKBONE

Mode = Literal["choice", "title", "rerank"]
Negatives = Literal["uniform", "popularity", "category", "text"]

DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "choice": "The user bought these products, oldest first. Which candidate will the user buy next? "
              "Answer with the candidate's letter.",
    "rerank": "The user bought these products, oldest first. Which candidate will the user buy next? "
              "Answer with the candidate's letter.",
    "title": "The user bought these products, oldest first. Write the title of the product the user will buy next.",
}


@dataclass
class InstructLMConfig(CompanionKeys):
    """Hyper-parameters of :class:`~llmrec.models.instruct.model.InstructLM`.

    ``mode``: ``choice`` (pick the true next item among ``n_candidates`` options: the true one and
    negatives drawn by ``negatives``), ``title`` (generate the next item's title, decoded under a trie
    of catalog titles or freely and grounded), ``rerank`` (re-order the top-``n_candidates`` shortlist
    of ``retriever``).
    """

    mode: Mode = "choice"
    backbone: str = DEFAULT_BACKBONE  # "smollm2-135m-instruct" (offline), a local folder, or a hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # frozen backbone weights
    attn: Literal["sdpa", "eager"] = "sdpa"
    amp: Amp = "auto"  # bfloat16 autocast where the hardware runs it fast
    n_layers: int = 0  # keep only the first n transformer blocks (0 = all): a CPU budget knob
    # prompt
    template: Literal["chat", "alpaca"] = "chat"  # the backbone's own chat template, or Alpaca
    system: str = ""  # chat system message ("" = none; some templates then add their default)
    instruction: str = ""  # "" = the mode's default (DEFAULT_INSTRUCTIONS)
    max_history_tokens: int = 192  # token budget of the history part; the oldest purchases are dropped first
    max_history: int = 20  # at most this many purchases shown
    title_chars: int = 80  # characters of each title shown in the history and the options (identical for all)
    brand: bool = True  # show brand and category (last category path element) where the dataset has them
    category: bool = True
    ratings: bool = True  # the user's rating and a review snippet where the dataset has them
    review_chars: int = 60
    blind: bool = False  # history-blind: prompts show no history (the text-only baseline)
    # candidates (choice / rerank)
    n_candidates: int = 20
    # the answer's loss in choice / rerank: "vocab" = cross-entropy over the whole vocabulary on every answer
    # token (letter and end token); "letters" = cross-entropy over the N option letters at the answer's first
    # token (the verbalizer's own normalization; learns faster from few steps, e.g. on a truncated backbone)
    letter_loss: Literal["vocab", "letters"] = "vocab"
    # how choice / rerank score an option: "letters" = its letter as the answer to a prompt that lists the options
    # (the verbalizer); "titles" = log p(its title | a prompt with the history only), all N titles in one forward
    # pass (titles.py), trained with a softmax over the N options (what a small LM knows before any training)
    scoring: Literal["letters", "titles"] = "letters"
    # "titles": the per-token mean or the sum of the title's log-probabilities, or "pmi": the sum minus the same
    # title's log-probability after a prompt with no history under the backbone before fine-tuning (a per-item prior
    # computed once): how much the history raises the title, whatever its length or rare words
    title_score: Literal["mean", "sum", "pmi"] = "mean"
    negatives: Negatives = "popularity"
    # title mode
    decoding: Literal["trie", "free"] = "trie"  # trie-constrained beam search, or free greedy + grounding
    num_beams: int = 10
    embedder: str = "all-MiniLM-L6-v2"  # grounding of free titles and text-nearest negatives ("hash" in tests)
    max_new_tokens: int = 32  # free decoding's limit (the trie's is the longest title)
    # rerank mode: "sasrec" (the companion, fitted on this split), "itemknn" (fitted here), or a run directory
    retriever: str = "sasrec"
    # weights w of the retriever in the shortlist score (LM log-prob + w x retriever log-softmax), chosen on validation
    rerank_mix: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    # fine-tuning
    # "none": the backbone as it is (zero-shot): fit reads the catalog, computes the "pmi" prior and, in rerank
    # mode, chooses ``rerank_mix`` on validation in one pass, without running the training loop
    finetune: Literal["lora", "qlora", "full", "none"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # comma-separated module names, or "all-linear"
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    fit_schedule_to_budget: bool = True
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0
    max_minutes: float = 55.0
    eval_every: int = 100
    patience: int = 5
    validate_first: bool = False  # the weights before fine-tuning are a validation candidate too (step 0)
    examples_per_user: int = 1  # training cut points per user and epoch (the last, then random earlier ones)
    valid_users: int = 300  # validation users sampled for early stopping (0 = all)
    checkpoint_every: int = 50
    eval_batch_size: int = 16
    seed: int = 0
    num_threads: int = 2  # torch CPU threads during fit/score (0 keeps torch's setting)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("n_layers", "review_chars", "max_steps", "valid_users", "num_threads", "warmup_steps",
                     "examples_per_user"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_history_tokens", "max_history", "title_chars", "lora_r", "batch_size", "grad_accum",
                     "epochs", "eval_every", "patience", "checkpoint_every", "eval_batch_size", "num_beams",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.n_candidates <= 26:
            raise ValueError(f"n_candidates must be in 2..26 (option letters A..Z), got {self.n_candidates}")
        if self.max_minutes <= 0 or self.lr <= 0:
            raise ValueError("max_minutes and lr must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout must be in [0, 1)")
        if any(w < 0 for w in self.rerank_mix):
            raise ValueError(f"rerank_mix weights must be >= 0, got {self.rerank_mix}")
        if self.finetune == "qlora" and self.dtype == "float16" and self.device == "cpu":
            raise ValueError("finetune='qlora' on the CPU computes in bfloat16 or float32, not float16")
        if not self.rerank_mix:
            raise ValueError("rerank_mix needs at least one weight")
        self.check_companion()

    @property
    def prompt_instruction(self) -> str:
        if self.instruction:
            return self.instruction
        return DEFAULT_INSTRUCTIONS["title" if self.scores_titles else self.mode]

    @property
    def scores_titles(self) -> bool:
        """Options are scored by their titles' likelihood (choice / rerank with ``scoring = "titles"``)."""
        return self.scoring == "titles" and self.mode != "title"


# Config keys that may differ between an interrupted run and its resumption.
RESUME_FREE = {"max_minutes", "checkpoint_every", "num_threads", "eval_batch_size", "device", "amp", "rerank_mix",
               "num_beams", "max_new_tokens", "decoding"}

"""Hyper-parameters of the semantic-ID model (:class:`SemanticIDConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmrec.models.collab import CompanionKeys
from llmrec.models.semantic_ids.embed import DEFAULT_EMBEDDER
from llmrec.models.semantic_ids.interests import SMOLLM2


@dataclass
class SemanticIDConfig(CompanionKeys):
    """Hyper-parameters of :class:`SemanticIDRec`."""

    embedder: str = DEFAULT_EMBEDDER  # sentence-transformers name/folder, or "hash" for tests
    description_chars: int = 300  # description characters in the item text
    # what the RQ-VAE quantizes: the text embedding, or the text embedding beside the item vectors of a
    # SASRec fitted on the same training split (LETTER / ETEGRec-style collaborative codes), or those alone
    rq_input: Literal["text", "text+sasrec", "sasrec"] = "text"
    collab_weight: float = 1.0  # mean norm of the SASRec part relative to the text part ("text+sasrec")
    # a pretrained sequence encoder beside the codes: each history token also reads (through a trainable
    # linear map) the state of that SASRec (frozen) of the history up to and including its item
    collab_states: bool = False
    # product of experts with that SASRec at inference (the companion's keys, see CompanionKeys: collab_minutes,
    # collab_cache, collab_prior, collab_prior_grid, prior_widen, prior_alone): an item's score is the
    # generator's log-probability of its codes + the item's log-probability under softmax(collab_prior x
    # SASRec's logits) (beam search ranks partial code prefixes by that distribution's mass under them)
    prior_valid_users: int = 5000  # 0 = all validation users
    rq_levels: int = 3
    rq_codebook_size: int = 256
    rq_latent_dim: int = 32
    rq_hidden: int = 256
    rq_steps: int = 1500
    rq_batch_size: int = 1024
    rq_lr: float = 1e-3
    rq_beta: float = 0.25
    d_model: int = 128
    n_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    ff_size: int = 256
    dropout: float = 0.1
    max_len: int = 20  # history items the encoder reads
    item_embeddings: bool = False  # add a learned per-item embedding to each history token (codes only if False)
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 0.0  # linear learning-rate warm-up over this many epochs
    decay_epochs: int = 0  # cosine decay of the learning rate to 10% over this many epochs (0 = constant)
    batch_size: int = 128
    max_epochs: int = 200
    eval_every: int = 1
    patience: int = 5
    min_epochs: int = 10  # early stopping may not stop training before this epoch (noisy first epochs)
    max_minutes: float = 20.0  # wall-clock budget of the generator's training (validation included)
    valid_users: int = 1000  # validation users for early stopping (0 = all)
    beam_size: int = 20  # beams kept (at least k)
    recommend_mode: Literal["beam", "exact"] = "beam"
    use_interests: bool = True  # ablation flag: False builds the model without interest fusion
    interests: Literal["keyword", "llm", "openai"] = "keyword"
    n_interests: int = 5
    interest_items: int = 10  # most recent history items the extractor reads
    interest_stride: int = 1  # training prefixes get interests of length floor(p / stride) * stride
    llm_model: str = SMOLLM2
    llm_batch_size: int = 32
    llm_items: int = 3  # the LLM reads at most this many recent items (prompt length drives its cost)
    llm_max_new_tokens: int = 20
    openai_url: str = ""
    openai_model: str = ""
    openai_api_key_env: str = "OPENAI_API_KEY"
    seed: int = 0
    num_threads: int = 2
    device: str = "cpu"
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("rq_levels", "rq_codebook_size", "rq_latent_dim", "rq_hidden", "rq_steps", "d_model",
                     "n_heads", "enc_layers", "dec_layers", "ff_size", "max_len", "batch_size", "max_epochs",
                     "eval_every", "patience", "min_epochs", "beam_size", "n_interests", "interest_items", "interest_stride",
                     "llm_batch_size", "llm_items", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.warmup_epochs < 0 or self.decay_epochs < 0:
            raise ValueError("warmup_epochs and decay_epochs must be >= 0")
        if self.max_minutes <= 0:
            raise ValueError("max_minutes must be > 0")
        if self.collab_weight <= 0:
            raise ValueError("collab_weight must be > 0")
        self.check_companion()
        if self.openai_api_key_env != "OPENAI_API_KEY":
            raise ValueError("openai_api_key_env: the key is read only from OPENAI_API_KEY (a config cannot choose "
                             "which environment variable is sent)")
        if self.interests == "openai" and self.use_interests and not (self.openai_url and self.openai_model):
            raise ValueError("interests='openai' needs openai_url and openai_model")

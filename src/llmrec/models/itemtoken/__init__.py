"""Item-token generative LM (``itemtoken-lm``): a pretrained causal LM that learns products as tokens.

config.py (hyper-parameters), net.py (the extended network), prompts.py (templates, truncation),
examples.py (training examples and batches), training.py (the task of the shared training loop),
decoding.py (constrained beam search, greedy), model.py (the recommender).
"""

from llmrec.models.itemtoken.config import ItemTokenLMConfig
from llmrec.models.itemtoken.model import ItemTokenLM

__all__ = ["ItemTokenLM", "ItemTokenLMConfig"]

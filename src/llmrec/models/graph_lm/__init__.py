"""Graph-aware LM (``graph-lm``): user and item tokens in a pretrained causal LM whose attention gets an
additive bias from the user-item graph of the training split (LLM4REC / CLLM4Rec-style).

config.py (hyper-parameters), graph.py (the sparse graph of training edges and the pure, vectorized bias
function), attention.py (the custom attention function and the network that feeds it), pretrain.py
(collaborative, content and second-order pre-training prompts and their loop task), model.py (the
recommender: the item-token LM with the graph bias in pre-training, fine-tuning and prediction).
"""

from llmrec.models.graph_lm.config import GraphLMConfig
from llmrec.models.graph_lm.model import GraphLM

__all__ = ["GraphLM", "GraphLMConfig"]

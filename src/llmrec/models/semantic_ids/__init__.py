"""Semantic-ID generative retrieval (TIGER / ETEGRec style) with user-interest fusion.

Modules: :mod:`.embed` (item/phrase text embeddings, on-disk cache), :mod:`.rqvae` (residual
quantisation into code tuples), :mod:`.seq2seq` (encoder-decoder, code trie, constrained beam
search), :mod:`.interests` (interest extractors), :mod:`.config` (its hyper-parameters), :mod:`.training` (the
generator's task of the shared training loop), :mod:`.model` (the ``semantic-id`` recommender).
"""

from llmrec.models.semantic_ids.config import SemanticIDConfig
from llmrec.models.semantic_ids.model import SemanticIDRec

__all__ = ["SemanticIDConfig", "SemanticIDRec"]

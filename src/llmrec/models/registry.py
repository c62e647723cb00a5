"""The explicit model registry: name -> class. Add new model families here."""

from __future__ import annotations

from typing import Any

from llmrec.config import ConfigError, from_dict
from llmrec.models.base import Recommender
from llmrec.models.graph_lm import GraphLM
from llmrec.models.instruct import InstructLM
from llmrec.models.itemknn import ItemKNN
from llmrec.models.itemtoken import ItemTokenLM
from llmrec.models.llmseq import LLMSeqRec
from llmrec.models.mixture import Mixture
from llmrec.models.popularity import Popularity
from llmrec.models.sasrec import SASRec
from llmrec.models.semantic_ids import SemanticIDRec

MODELS: dict[str, type[Recommender]] = {
    Popularity.name: Popularity,
    ItemKNN.name: ItemKNN,
    SASRec.name: SASRec,
    SemanticIDRec.name: SemanticIDRec,
    ItemTokenLM.name: ItemTokenLM,
    LLMSeqRec.name: LLMSeqRec,
    Mixture.name: Mixture,
    GraphLM.name: GraphLM,
    InstructLM.name: InstructLM,
}


def model_class(name: str) -> type[Recommender]:
    """The class registered under ``name`` (ConfigError listing the known names otherwise)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def build_model(name: str, params: dict[str, Any], n_items: int, where: str = "model.params") -> Recommender:
    """Instantiate model ``name`` with its typed config built (strictly) from ``params``."""
    cls = model_class(name)
    return cls(from_dict(cls.Config, params, prefix=f"{where}."), n_items)

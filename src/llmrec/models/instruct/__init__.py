"""Instruction-tuned chat LM (LoRA / QLoRA / full): choice among candidates, grounded title
generation, shortlist re-ranking. See :mod:`.model`."""

from llmrec.models.instruct.config import InstructLMConfig
from llmrec.models.instruct.model import InstructLM

__all__ = ["InstructLM", "InstructLMConfig"]

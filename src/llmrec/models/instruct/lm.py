"""The backbone with its fine-tuning adapters: LoRA (peft), QLoRA (bitsandbytes 4-bit + LoRA), full, or none.

QLoRA loads the backbone's linear layers as 4-bit NF4 weights (``bitsandbytes``; on GPUs, and on
CPUs where bitsandbytes has a CPU backend, as it has here) and trains LoRA adapters on top in the
compute dtype. Everything returned is on ``device`` and in eval mode.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmrec.models.llm.backbone import DEFAULT_BACKBONE, TINY_BACKBONE, load_backbone, smollm2_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmrec.models.instruct.config import InstructLMConfig


def _qlora_backbone(cfg: InstructLMConfig, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The backbone with 4-bit NF4 linear layers (bitsandbytes)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("finetune='qlora' needs bitsandbytes (pip install bitsandbytes)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
    tmp = None
    if cfg.backbone == TINY_BACKBONE:  # write the random test model to a folder so that it loads quantized
        lm, tok = load_backbone(TINY_BACKBONE)
        tmp = tempfile.TemporaryDirectory(prefix="llmrec-tiny-")
        lm.save_pretrained(tmp.name)
        folder: str | Path = tmp.name
    else:
        folder = smollm2_folder() if cfg.backbone == DEFAULT_BACKBONE else cfg.backbone
        tok = AutoTokenizer.from_pretrained(folder)
    try:
        lm = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map={"": str(device)},
                                                  attn_implementation=cfg.attn)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def load_lm(cfg: InstructLMConfig, device: torch.device) -> tuple[Any, PreTrainedTokenizerBase]:
    """(model with adapters or trainable weights, tokenizer) for ``cfg``; the seed fixes the adapters' init."""
    from llmrec.models.itemtoken.net import truncate_layers

    if cfg.finetune == "qlora":
        lm, tok = _qlora_backbone(cfg, device)
    else:
        lm, tok = load_backbone(cfg.backbone, dtype=cfg.dtype, attn=cfg.attn)
        lm = lm.to(device)
    if cfg.n_layers:
        truncate_layers(lm, cfg.n_layers)
    for p in lm.parameters():
        p.requires_grad_(False)
    if cfg.finetune in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets: str | list[str] = cfg.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            torch.manual_seed(cfg.seed)
            lm = get_peft_model(lm, lora)
        for p in lm.parameters():  # adapters train in float32 whatever the backbone's dtype
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    elif cfg.finetune == "full":  # every transformer weight trains; the vocabulary matrices stay frozen
        frozen = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
        for p in lm.parameters():
            p.requires_grad_(id(p) not in frozen)
    return lm.eval(), tok


def causal(lm: Any) -> Any:
    """The causal LM under a peft wrapper (or ``lm`` itself)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def hidden_states(lm: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) right-padded ids and attention mask -> (B, L, H) final hidden states (adapters active)."""
    return causal(lm).base_model(input_ids=ids, attention_mask=mask).last_hidden_state


def head(lm: Any, h: torch.Tensor) -> torch.Tensor:
    """(..., H) hidden states -> (..., V) float32 vocabulary logits."""
    out = causal(lm).get_output_embeddings()
    return out(h.to(out.weight.dtype) if out.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
               else h).float()


def trainable(lm: Any) -> dict[str, torch.nn.Parameter]:
    """The parameters that fine-tuning changes (adapters, or the transformer weights), by name."""
    return {n: p for n, p in lm.named_parameters() if p.requires_grad}

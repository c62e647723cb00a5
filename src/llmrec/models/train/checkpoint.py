"""Resumable training state: ``<dir>/ckpt`` holds the current and the best trainable weights,
the optimizer moments and the random-number state (safetensors), and the loop position (JSON).

A checkpoint is written into ``ckpt.tmp`` and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one. ``state.json`` records the model's resume key (its
config without the keys that may change between an interruption and its resumption, and a digest
of the training data): resuming with another key is an error instead of a silently wrong model.
The layout is the item-token LM's checkpoint format from before the loop was shared (``rng`` and
``data`` were added; checkpoints without them still resume).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from llmrec.errors import LlmrecError


class CheckpointError(LlmrecError, ValueError):
    """A checkpoint exists but cannot be resumed (another config or data, or damaged files)."""


class Checkpoint:
    """The checkpoint folder ``root/ckpt`` of one training run, for a model with resume key ``key``."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        self.root = Path(root)
        self.dir = self.root / "ckpt"
        self.key = key

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def save(self, run: dict[str, Any], current: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
             opt: torch.optim.Optimizer, rng: dict[str, torch.Tensor]) -> None:
        """Write the loop position ``run``, weights, optimizer and random state atomically."""
        from safetensors.torch import save_file

        tmp = self.root / "ckpt.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: t.detach().contiguous().clone() for n, t in current.items()}, str(tmp / "trainable.safetensors"))
        save_file({n: t.detach().contiguous().clone() for n, t in (best or current).items()},
                  str(tmp / "best.safetensors"))
        sd = opt.state_dict()
        moments = {f"{pid}.{key}": torch.as_tensor(v).contiguous().clone()
                   for pid, st in sd["state"].items() for key, v in st.items()}
        save_file(moments, str(tmp / "optim.safetensors"))
        save_file({n: t.contiguous() for n, t in rng.items()}, str(tmp / "rng.safetensors"))
        state = {"run": run, "config": self.key.get("config", {}), "data": self.key.get("data"),
                 "param_groups": [dict(g) for g in sd["param_groups"]], "has_best": best is not None}
        (tmp / "state.json").write_text(json.dumps(state, default=float))
        old = self.root / "ckpt.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                         dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """(run position, current weights, best weights or None, random state); the optimizer is
        restored in place. Raises :class:`CheckpointError` naming the folder and the cause."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.dir / 'state.json'}: damaged checkpoint ({e}); delete {self.dir}") from None
        config = self.key.get("config", {})
        if state.get("config") != config:
            diff = sorted(k for k in set(state.get("config", {})) | set(config)
                          if state.get("config", {}).get(k) != config.get(k))
            raise CheckpointError(f"{self.dir}: checkpoint was written with another config (differs in {diff}); "
                                  "use another checkpoint_dir or delete it")
        if state.get("data") is not None and self.key.get("data") is not None and state["data"] != self.key["data"]:
            raise CheckpointError(f"{self.dir}: checkpoint was written on other training data (the dataset or "
                                  "split changed); delete it to train from scratch")
        try:
            current = load_file(str(self.dir / "trainable.safetensors"))
            best = load_file(str(self.dir / "best.safetensors")) if state.get("has_best", True) else None
            moments = load_file(str(self.dir / "optim.safetensors"))
            rng_file = self.dir / "rng.safetensors"
            rng = load_file(str(rng_file)) if rng_file.exists() else {}
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # damaged or truncated files
            raise CheckpointError(f"{self.dir}: damaged checkpoint ({e}); delete it to train from scratch") from None
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in moments.items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = v
        try:
            opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.dir}: optimizer state does not fit the model ({e})") from None
        return state["run"], current, best, rng

    def remove(self) -> None:
        """Delete the checkpoint (after the run it belongs to was saved complete)."""
        for name in ("ckpt", "ckpt.tmp", "ckpt.old"):
            shutil.rmtree(self.root / name, ignore_errors=True)

"""Where training runs: torch CPU threads, the device, and the processes that train together.

Under ``accelerate launch`` or ``torchrun`` several processes train one model data-parallel; they
are reached through Hugging Face ``accelerate`` (its ``Accelerator`` sets up the process group:
gloo on CPUs, NCCL on GPUs). A single process needs no launcher and gets the same code path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def num_threads(n: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (0 keeps torch's setting; GPUs are not affected)."""
    old = torch.get_num_threads()
    if n > 0 and torch.device(device).type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def distributed() -> bool:
    """True inside a multi-process launch (``accelerate launch``, ``torchrun``: ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for(name: str) -> torch.device:
    """The torch device of a model config's ``device``: ``cpu``; ``cuda`` (this process's GPU under a
    multi-process launch, so each process trains on its own)."""
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None and distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


class Processes:
    """The processes training one model: ``world`` of them, this one ``rank`` (0 = main)."""

    def __init__(self, device: torch.device) -> None:
        self.acc: Any = None
        self.world, self.rank = 1, 0
        if distributed():
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device.type == "cpu")
            self.world, self.rank = self.acc.num_processes, self.acc.process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes (one all-reduce of a flat buffer)."""
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def agree(self, value: Any) -> Any:
        """The main process's ``value`` on every process (validation scores, stop decisions)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def total(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (the epoch's loss sums)."""
        if self.world == 1:
            return values
        return [float(v) for v in self.acc.reduce(torch.tensor(values, dtype=torch.float64), reduction="sum")]

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a multi-process launch (the one that writes files)."""
    return int(os.environ.get("RANK", "0")) == 0

"""Micro-batching: concurrent requests to one model share a forward pass.

Requests that arrive while the model is busy, or within ``window_s`` of the first one, are scored by one
call of the batch function, in a thread of the model's own (so torch calls on one model never overlap and
the event loop stays free). Under load the batches grow by themselves: throughput rises with concurrency
instead of requests queueing one forward pass each. ``enabled=False`` scores each request alone (the same
thread, one at a time), for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")


class MicroBatcher(Generic[Req, Res]):
    """Runs ``fn(requests) -> results`` (same length, same order) over batches of concurrent requests."""

    def __init__(self, fn: Callable[[Sequence[Req]], Sequence[Res]], window_s: float = 0.002,
                 max_batch: int = 256, enabled: bool = True, name: str = "model") -> None:
        self.fn, self.window_s, self.max_batch, self.enabled = fn, window_s, max_batch, enabled
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llmrec-{name}")
        self._queue: asyncio.Queue[tuple[Req, asyncio.Future[Res]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # forward passes so far (tests and the benchmark read it)
        self.requests = 0

    async def submit(self, request: Req) -> Res:
        """The result of ``request``, scored in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if not self.enabled:
            self.batches += 1
            self.requests += 1
            return (await loop.run_in_executor(self.executor, self.fn, [request]))[0]
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        future: asyncio.Future[Res] = loop.create_future()
        await self._queue.put((request, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        queue, loop = self._queue, asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            live = [(r, f) for r, f in batch if not f.cancelled()]
            if not live:
                continue
            self.batches += 1
            self.requests += len(live)
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [r for r, _ in live])
            except Exception as e:  # noqa: BLE001 - the requests of this batch fail with it; the worker goes on
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), res in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(res)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self.executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests,
                "mean_batch": self.requests / self.batches if self.batches else 0.0}

"""What a person sees of training: a progress bar whose end is the true end, training curves as a
PNG (loss and validation NDCG@10 against optimizer steps and minutes), and TensorBoard event
files when ``tensorboard`` is installed. Only the main process shows or writes any of it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

CURVES_PNG = "curves.png"
_SHOWN: ContextVar[str | None] = ContextVar("llmrec_batch_progress", default=None)


@contextlib.contextmanager
def batch_progress(desc: str, enabled: bool = True) -> Iterator[None]:
    """While active, :func:`batch_starts` loops (scoring, beam search, embedding) show a bar named ``desc``
    (validation inside training, the prior-weight choice): long inner loops are never silent."""
    token = _SHOWN.set(desc if enabled else None)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress_shown() -> bool:
    """Whether an enclosing :func:`batch_progress` asks inner loops to show their progress."""
    return _SHOWN.get() is not None


def batch_starts(n: int, size: int) -> Iterable[int]:
    """``range(0, n, size)``, shown as a transient bar inside :func:`batch_progress` (results are unchanged)."""
    starts = range(0, n, size)
    desc = _SHOWN.get()
    if desc is None or len(starts) < 2:
        return starts
    return tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def say(enabled: bool, message: str) -> None:
    """One progress line on stderr (beside any bars) for a stage that has no bar of its own."""
    if enabled:
        tqdm.write(message, file=sys.stderr)


class Progress:
    """The training bar of one run, in optimizer steps.

    The bar's total is the step at which training is expected to end: the planned steps, or, when
    the wall-clock budget will stop training first, the steps that fit the time left at the pace so
    far; ``ends`` says which limit decides. A validation in progress is shown in the postfix.
    """

    def __init__(self, name: str, planned: int, budget_s: float, enabled: bool, initial: int = 0) -> None:
        self.planned, self.budget_s = max(1, planned), budget_s
        self.bar = tqdm(total=self.planned, initial=initial, desc=name, unit="step", disable=not enabled,
                        dynamic_ncols=True)
        self.post: dict[str, str] = {}

    def step(self, step: int, elapsed: float, loss: float, n: int = 1) -> None:
        """After optimizer step ``step`` (1-based), ``elapsed`` seconds into the budget."""
        pace = elapsed / max(1, step)
        left = max(0.0, self.budget_s - elapsed)
        by_time = step + int(left / max(pace, 1e-9)) if math.isfinite(left) else self.planned
        end = max(step, min(self.planned, by_time))
        if end != self.bar.total:
            self.bar.total = end
        self.post.update(loss=f"{loss:.4f}", ends="budget" if end < self.planned else "steps")
        self.bar.set_postfix(self.post, refresh=False)
        self.bar.update(n)

    def note(self, **values: Any) -> None:
        """Show ``values`` (validation NDCG@10, best, a stage in progress) in the postfix now."""
        self.post.update({k: (f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in values.items()})
        self.bar.set_postfix(self.post)

    def close(self) -> None:
        self.bar.close()


class Curves:
    """Training curves of a run: per-step loss, per-validation NDCG@10; a PNG and TensorBoard events
    in ``folder`` (nothing is written when it is None)."""

    def __init__(self, folder: Path | None, title: str) -> None:
        self.folder, self.title = folder, title
        self.steps: list[tuple[int, float, float]] = []  # (step, minutes, loss)
        self.valid: list[tuple[int, float, float]] = []  # (step, minutes, ndcg@10)
        self._tb: Any = None
        self._last_plot = 0.0
        if folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(folder / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def loss(self, step: int, seconds: float, value: float) -> None:
        self.steps.append((step, seconds / 60.0, value))
        if self._tb is not None:
            self._tb.add_scalar("train/loss", value, step)

    def validation(self, step: int, seconds: float, ndcg: float) -> None:
        self.valid.append((step, seconds / 60.0, ndcg))
        if self._tb is not None:
            self._tb.add_scalar("valid/ndcg@10", ndcg, step)
            self._tb.flush()
        if time.monotonic() - self._last_plot > 60.0:
            self.plot()

    def plot(self) -> Path | None:
        """Write ``curves.png`` (2 x 2: loss and NDCG@10 against steps and minutes); its path."""
        if self.folder is None or not (self.steps or self.valid):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex="col")
        for col, (idx, label) in enumerate(((0, "optimizer step"), (1, "minutes"))):
            if self.steps:
                xs, ys = [s[idx] for s in self.steps], [s[2] for s in self.steps]
                axes[0, col].plot(xs, ys, color="tab:blue", lw=0.6, alpha=0.35, label="per step")
                axes[0, col].plot(xs, _smooth(ys), color="tab:blue", lw=1.6, label="smoothed")
                axes[0, col].legend(loc="upper right", fontsize=8)
            if self.valid:
                axes[1, col].plot([v[idx] for v in self.valid], [v[2] for v in self.valid], "o-", color="tab:green")
                best = max(self.valid, key=lambda v: v[2])
                axes[1, col].axhline(best[2], color="tab:green", ls=":", lw=1)
                axes[1, col].plot([best[idx]], [best[2]], "*", color="tab:red", ms=12, label="best (restored)")
                axes[1, col].legend(loc="lower right", fontsize=8)
            axes[0, col].set_ylabel("training loss")
            axes[1, col].set_ylabel("validation NDCG@10")
            axes[1, col].set_xlabel(label)
            for ax in axes[:, col]:
                ax.grid(alpha=0.3)
        fig.suptitle(self.title)
        fig.tight_layout()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / CURVES_PNG
        fig.savefig(path, dpi=90)
        plt.close(fig)
        self._last_plot = time.monotonic()
        return path

    def close(self, summary: str = "") -> None:
        """Write the final plot (``summary``, e.g. the stop reason, joins its title) and the events."""
        if summary:
            self.title = f"{self.title}: {summary}"
        self.plot()
        if self._tb is not None:
            self._tb.close()


def _smooth(values: list[float]) -> list[float]:
    """Exponential moving average (bias-corrected) of a loss curve, over about a tenth of its length."""
    alpha = min(0.5, max(0.01, 10.0 / max(1, len(values))))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out

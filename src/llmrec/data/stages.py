"""Progress and timing of ``data prepare``'s stages: one progress bar per stage, with its row counts.

Each stage (parse, filter, dedup, k-core, recode, write, stats) opens a bar when it starts and closes it with
its counts and seconds; the seconds go into the manifest (``timings``), so a slow stage can be found after
the fact without re-running with a profiler.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm.auto import tqdm


@dataclass
class Stages:
    """Opens :meth:`stage` bars (printed to stderr unless ``progress`` is False) and keeps their seconds."""

    progress: bool = True
    label: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, unit: str = "rows") -> Iterator[tqdm]:
        """A bar for stage ``name``: ``bar.n`` is its count so far (set it with :func:`count`); its wall
        seconds are added to ``seconds[name]`` when the block ends, whether or not it succeeded."""
        desc = f"{self.label} {name}".strip()
        bar = tqdm(desc=f"{desc:<24}", unit=f" {unit}", disable=not self.progress, leave=True,
                   bar_format="{desc}: {n_fmt}{unit} [{elapsed}]{postfix}")
        start = time.perf_counter()
        try:
            yield bar
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            bar.close()


def count(bar: tqdm, n: int, note: str = "") -> None:
    """Show ``n`` rows done in ``bar`` (counts come from finished SQL statements, so they jump)."""
    bar.n = n
    if note:
        bar.set_postfix_str(note, refresh=False)
    bar.refresh()

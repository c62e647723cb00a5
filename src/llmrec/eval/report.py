"""Reporting: markdown tables, seed summaries with Student-t intervals, metrics JSON files."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from llmrec.eval.protocol import EvalResult
from llmrec.fsutil import atomic_write_text

MISSING = "-"
"""Cell text for a metric a row does not have."""


def _cell(value: float | None, decimals: int) -> str:
    if value is None:
        return MISSING
    return "nan" if math.isnan(value) else f"{value:.{decimals}f}"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_table(rows: dict[str, dict[str, float]], columns: list[str], decimals: int = 4) -> str:
    """Markdown table: one row per model (``rows`` key), one column per metric in ``columns``.

    Values are printed with ``decimals`` decimals; a missing metric prints ``-``, NaN ``nan``.
    """
    body = [[model] + [_cell(metrics.get(c), decimals) for c in columns] for model, metrics in rows.items()]
    return _markdown(["model", *columns], body)


def summarize_seeds(
    results: Sequence[dict[str, float]], confidence: float = 0.95
) -> dict[str, tuple[float, float, float]]:
    """``{metric: (mean, low, high)}`` over seeds, with a Student-t confidence interval.

    The interval is ``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample
    standard deviation (ddof=1) over the ``n`` seeds. With a single seed there is no spread to
    estimate, so the interval collapses to ``(mean, mean)`` — it is *not* a real interval. Every
    result must have the same metrics; a NaN value makes that metric's summary NaN.
    """
    if not results:
        raise ValueError("summarize_seeds needs at least one result")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    names = list(results[0])
    for i, r in enumerate(results):
        if set(r) != set(names):
            raise ValueError(f"result {i} has metrics {sorted(r)}, expected {sorted(names)}")
    out: dict[str, tuple[float, float, float]] = {}
    n = len(results)
    for name in names:
        values = np.array([float(r[name]) for r in results], dtype=np.float64)
        mean = float(values.mean())
        if n == 1:
            out[name] = (mean, mean, mean)
            continue
        sem = float(values.std(ddof=1)) / math.sqrt(n)
        half = float(stats.t.ppf((1 + confidence) / 2, df=n - 1)) * sem
        out[name] = (mean, mean - half, mean + half)
    return out


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of one metric over seeds: :func:`summarize_seeds` for a plain list."""
    return summarize_seeds([{"v": float(v)} for v in values], confidence)["v"]


def format_summary_table(
    rows: dict[str, dict[str, tuple[float, float, float]]], columns: list[str], decimals: int = 4
) -> str:
    """Markdown table of ``mean ± half-width`` cells from :func:`summarize_seeds` outputs per model."""
    body = []
    for model, summary in rows.items():
        cells = [model]
        for c in columns:
            if c not in summary:
                cells.append(MISSING)
                continue
            mean, low, high = summary[c]
            cells.append(f"{_cell(mean, decimals)} ± {_cell((high - low) / 2, decimals)}")
        body.append(cells)
    return _markdown(["model", *columns], body)


def write_metrics_json(path: str | Path, result: EvalResult, extra: dict[str, Any] | None = None) -> None:
    """Write ``result.to_json()`` plus ``{"extra": extra}`` to ``path`` atomically.

    The file holds ``protocol``, ``ks``, ``n_users``, ``overall``, ``users`` (ids) and
    ``per_user`` (``{metric: [value per user]}``, aligned with ``users``); NaN is ``null``.
    Written to a temporary file in the same directory, then moved into place with ``os.replace``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**result.to_json(), "extra": _plain(extra or {})}
    text = json.dumps(payload, indent=2, allow_nan=False)
    atomic_write_text(path, text)


def read_metrics_json(path: str | Path) -> tuple[EvalResult, dict[str, Any]]:
    """Read a file written by :func:`write_metrics_json`: ``(result, extra)``."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    return EvalResult.from_json(d), d.get("extra", {})


def _plain(obj: Any) -> Any:
    """``extra`` as strict JSON values: numpy to Python, NaN/inf floats to ``None``, paths to str."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"extra: {type(obj).__name__} is not JSON serializable")

"""Helpers shared by the benchmark scripts (each is run as ``python benchmarks/NAME.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations

import json
from typing import Any


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}``; values are JSON (``3``, ``0.5``, ``["a"]``, ``"x"``), and
    anything that is not JSON stays a plain string."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out

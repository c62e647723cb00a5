"""Where llmrec keeps what it derives once and reuses: converted model folders, text embeddings,
interest phrases, fitted companion SASRecs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LLMREC_CACHE`` (``~`` expanded) or ``~/.cache/llmrec``."""
    env = os.environ.get("LLMREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmrec"

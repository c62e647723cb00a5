"""llmrec: next-product recommendation with language models on Amazon review data."""

__version__ = "0.1.0"

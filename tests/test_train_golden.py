"""The shared training loop reproduces the training of the code before it, case by case.

For the same seed and one thread: the same weights, validation history, stop reason and best
epoch/step as recorded in ``tests/golden/training.json`` (see ``tests/golden_training.py``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden_training import CASES, GOLDEN, run_case

RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_matches_the_recorded_result(name: str) -> None:
    want, got = RECORDED[name], run_case(name)
    assert got["fit"]["stopped"] == want["fit"]["stopped"]
    numbers = {k: v for k, v in want["fit"].items() if k != "stopped"}
    assert {k: got["fit"][k] for k in numbers} == pytest.approx(numbers, rel=1e-9)
    assert len(got["history"]) == len(want["history"])
    for g, w in zip(got["history"], want["history"], strict=True):
        assert g.keys() >= w.keys()  # records may carry more (steps, seconds) than before
        assert {k: g[k] for k in w} == pytest.approx(w, rel=1e-6)
    assert sorted(got["weights"]) == sorted(want["weights"])
    for key, (s, sq) in want["weights"].items():
        np.testing.assert_allclose(got["weights"][key], [s, sq], rtol=1e-6, atol=1e-7, err_msg=key)

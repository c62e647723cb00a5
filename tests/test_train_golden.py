"""The shared training loop reproduces the training of the code before it, case by case.

For the same seed and one thread: the same stop reason, epochs, steps and best epoch/step, and the same
validation history and weights (each tensor's float64 sum and sum of squares) as recorded in
``tests/golden/training.json`` (see ``tests/golden_training.py``), up to floating-point rounding. CPUs
round differently (other SIMD kernels): on an AMD EPYC the results recorded on another machine drift by up
to ~1e-4 relative in the history, ~1e-3 in a sum of squares and ~6% of a tensor's norm in its plain sum
(semantic-id, 30 epochs). A change of training (a step more or less, another learning rate or batch
order) moves them by far more, and usually moves the epochs or the best step as well.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden_training import CASES, GOLDEN, run_case

RECORDED = json.loads(GOLDEN.read_text())
ROUNDING = 1e-3  # relative, history and best validation figure
WEIGHT_ROUNDING = 5e-3  # relative, a tensor's sum of squares (its sum: 20x this, of the tensor's norm)


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_matches_the_recorded_result(name: str) -> None:
    want, got = RECORDED[name], run_case(name)
    assert got["fit"]["stopped"] == want["fit"]["stopped"]
    counts = {k: v for k, v in want["fit"].items() if k in ("epochs", "steps", "best_epoch", "best_step")}
    assert {k: got["fit"][k] for k in counts} == counts
    numbers = {k: v for k, v in want["fit"].items() if k != "stopped" and k not in counts}
    assert {k: got["fit"][k] for k in numbers} == pytest.approx(numbers, rel=ROUNDING)
    assert len(got["history"]) == len(want["history"])
    for g, w in zip(got["history"], want["history"], strict=True):
        assert g.keys() >= w.keys()  # records may carry more (steps, seconds) than before
        assert {k: g[k] for k in w} == pytest.approx(w, rel=ROUNDING)
    assert sorted(got["weights"]) == sorted(want["weights"])
    for key, (s, sq) in want["weights"].items():
        got_s, got_sq = got["weights"][key]
        # a sum may be near 0 whatever the weights' size: measure its drift against the tensor's norm
        assert abs(got_s - s) <= WEIGHT_ROUNDING * 20 * np.sqrt(sq) + 1e-7, (key, got_s, s)
        assert got_sq == pytest.approx(sq, rel=WEIGHT_ROUNDING, abs=1e-7), key

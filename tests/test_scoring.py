"""The core's teacher-forced scoring (`blenderbot_mb.scoring`), on NumPy: inputs and targets, log-probabilities
against float64 arithmetic written out here, the likeliest tokens, the JSON floor."""

from __future__ import annotations

import math

import numpy as np

from blenderbot_mb.scoring import LOGPROB_FLOOR, floor, teacher_forcing, token_log_probs
from blenderbot_mb.search_ops import NumpyOps


def test_teacher_forcing_shifts_each_reply_behind_the_start_token():
    inputs, targets = teacher_forcing([[5, 6, 2], [7], []], start_id=1, pad_id=0)
    assert inputs.tolist() == [[1, 5, 6], [1, 0, 0], [0, 0, 0]]
    assert targets.tolist() == [[5, 6, 2], [7, 0, 0], [0, 0, 0]]
    assert teacher_forcing([], 1, 0)[0].shape == (0, 1)


def test_token_log_probs_against_float64():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 11)).astype(np.float32) * 4
    logits[1, 2, 4] = logits[1, 2, 9] = 50.0  # a tie: the lower id first
    targets = rng.integers(0, 11, size=(2, 3)).astype(np.int32)
    chosen, values, ids = token_log_probs(NumpyOps(), logits, targets, top=3)
    for r in range(2):
        for t in range(3):
            row = [float(x) for x in logits[r, t]]
            total = math.log(sum(math.exp(x - max(row)) for x in row)) + max(row)
            assert abs(chosen[r, t] - (row[targets[r, t]] - total)) < 1e-5
            best = sorted(range(11), key=lambda i: (-row[i], i))[:3]
            assert ids[r, t].tolist() == best
            assert np.allclose(values[r, t], [row[i] - total for i in best], atol=1e-5)
    assert ids[1, 2, :2].tolist() == [4, 9]
    none = token_log_probs(NumpyOps(), logits, targets, top=0)
    assert none[1].shape == (2, 3, 0) and np.array_equal(none[0], chosen)
    assert token_log_probs(NumpyOps(), logits, targets, top=50)[2].shape == (2, 3, 11)  # at most the vocabulary


def test_floor_keeps_json_finite():
    assert floor(-1.5) == -1.5
    assert floor(float("-inf")) == floor(-1e6) == floor(float("nan")) == LOGPROB_FLOOR

"""The log-probabilities of given replies under a model (teacher forcing), written once over `ArrayOps`.

A reply's tokens are scored by one forward pass of the decoder over the start token and the reply (each
position's logits predict the next token), as the model's own distribution: before any decoding setting
(temperature, top-k/top-p, penalties, bans) touched it. This is what OpenAI-style `logprobs` report and
what vLLM reports by default. Backends supply the logits; the rest is here.
"""

from __future__ import annotations

import numpy as np

LOGPROB_FLOOR = -9999.0  # what OpenAI's API reports for a token of (numerically) zero probability; JSON has no -inf


def teacher_forcing(replies: list[list[int]], start_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoder inputs and targets [rows, T] (T the longest reply, at least 1) for replies of token ids: row r's
    inputs are the start token and its reply without the last token, its targets the reply; the rest is pad."""
    width = max(1, max((len(r) for r in replies), default=1))
    inputs = np.full((len(replies), width), pad_id, np.int32)
    targets = np.full((len(replies), width), pad_id, np.int32)
    for row, reply in enumerate(replies):
        if reply:
            inputs[row, 0] = start_id
            inputs[row, 1:len(reply)] = reply[:-1]
            targets[row, :len(reply)] = reply
    return inputs, targets


def token_log_probs(ops, logits, targets: np.ndarray, top: int = 0):
    """The log-probabilities of `targets` [R, T] under `logits` [R, T, V] (a backend's array, any float dtype),
    and the `top` most likely tokens at each position, as host arrays: chosen [R, T] float32, top_values
    [R, T, top] float32, top_ids [R, T, top] int64 (most likely first). The log-softmax runs in float32 on the
    logits' device; only these values come back to the host."""
    rows, width = targets.shape
    vocab = logits.shape[-1]
    flat = ops.log_softmax(ops.cast(ops.reshape(logits, (rows * width, vocab)), "float32"))
    index = ops.constant(targets.reshape(rows * width, 1).astype(np.int32), "int32")
    chosen = np.asarray(ops.to_host(ops.take_along(flat, index, axis=-1)), np.float32).reshape(rows, width)
    top = min(top, vocab)
    if top > 0:
        values, ids = ops.top_k(flat, top)
        values = np.asarray(ops.to_host(values), np.float32).reshape(rows, width, top)
        ids = np.asarray(ops.to_host(ids), np.int64).reshape(rows, width, top)
    else:
        values, ids = np.zeros((rows, width, 0), np.float32), np.zeros((rows, width, 0), np.int64)
    return chosen, values, ids


def floor(value: float) -> float:
    """A log-probability JSON can carry (-inf and values below the floor become LOGPROB_FLOOR)."""
    value = float(value)
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR

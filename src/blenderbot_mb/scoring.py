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


def transition_scores(sequences, scores, beam_indices=None, normalize_logits: bool = False) -> np.ndarray:
    """transformers' `compute_transition_scores`: the score of each generated token of `sequences` [R, L] in
    the per-step `scores` (generate's `scores`, or its raw `logits` with `normalize_logits=True`: each step
    log-softmaxed first), [R, generated] float32; for beam search, `beam_indices` (generate's) says which beam
    each token came from, and columns after a hypothesis' end are 0. Arrays of any backend, on the host."""
    from .errors import InputError
    from .generation_hooks import host_array

    if not isinstance(scores, (tuple, list)) or not scores:
        raise InputError("scores must be generate()'s per-step scores (a non-empty tuple): pass "
                         "output_scores=True (or output_logits=True) and return_dict_in_generate=True")
    steps = np.stack([host_array(s).astype(np.float32) for s in scores], axis=1)  # [rows, S, V]
    if steps.ndim != 3:
        raise InputError(f"each step's scores must be [rows, vocab], got shape {host_array(scores[0]).shape}")
    if normalize_logits:
        shifted = steps - steps.max(axis=-1, keepdims=True)
        steps = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    sequences = host_array(sequences).astype(np.int64)
    rows, count = steps.shape[0], steps.shape[1]
    beams = (np.broadcast_to(np.arange(rows)[:, None], (rows, count)) if beam_indices is None
             else host_array(beam_indices).astype(np.int64))
    if sequences.ndim != 2 or beams.ndim != 2 or beams.shape[0] != sequences.shape[0]:
        raise InputError(f"sequences {sequences.shape}, beam_indices {None if beam_indices is None else beams.shape} "
                         f"and scores of {rows} rows do not belong to one generate() call")
    ended = beams < 0
    width = int((~ended).sum(axis=-1).max(initial=0))
    if width > min(count, sequences.shape[1]) or beams.max(initial=0) >= rows:
        raise InputError(f"sequences {sequences.shape}, beam_indices and {count} steps of scores do not belong to "
                         "one generate() call")
    beams, ended = np.where(ended, 0, beams)[:, :width], ended[:, :width]
    tokens = sequences[:, sequences.shape[1] - width:]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= steps.shape[-1]):
        raise InputError(f"sequences hold ids outside the scores' vocabulary of {steps.shape[-1]}")
    out = steps[beams, np.arange(width)[None, :], tokens]
    out[ended] = 0.0
    return out.astype(np.float32)

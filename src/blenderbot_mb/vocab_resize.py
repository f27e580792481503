"""`resize_token_embeddings` for every backend: which tensors have a vocabulary axis and how they grow.

The backends hand over those few tensors as numpy arrays (PyTorch layout) and put the results back; the
rule lives here once. Growing keeps the old rows; new embedding (and untied `lm_head`) rows are the mean
of the old rows (transformers' `mean_resizing=True` samples around that mean with 1e-9 times the old
covariance, i.e. within ~1e-5 of it) or, with `mean_resizing=False`, normal(0, init_std) draws from a
fixed seed; new `final_logits_bias` entries are 0. Shrinking keeps the first rows.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .naming import EMBEDDING, LOGITS_BIAS, tensor_specs


def vocab_tensor_names(config, architecture: str) -> tuple[str, ...]:
    """Canonical names of the tensors whose first axis (last, for final_logits_bias) is the vocabulary."""
    return tuple(s.name for s in tensor_specs(config, architecture)
                 if s.kind == LOGITS_BIAS or (s.kind == EMBEDDING and "embed_positions" not in s.name))


def resized_vocab_size(config, new_num_tokens: int | None, pad_to_multiple_of: int | None = None) -> int:
    """The new vocabulary size: `new_num_tokens` (default: the current size) rounded up to a multiple of
    `pad_to_multiple_of`. Raises ConfigError if the special token ids would not fit."""
    size = config.vocab_size if new_num_tokens is None else new_num_tokens
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
    if pad_to_multiple_of is not None:
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
            raise ConfigError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    config.replace(vocab_size=size)  # validates: every special token id must stay below the new size
    return size


def resize_vocab_tensor(name: str, value: np.ndarray, new_size: int, init_std: float = 0.02,
                        mean_resizing: bool = True) -> np.ndarray:
    """One vocabulary tensor (PyTorch layout) resized to `new_size` entries; float32 arithmetic."""
    value = np.asarray(value, dtype=np.float32)
    if name == "final_logits_bias":  # (1, vocab)
        out = np.zeros((1, new_size), np.float32)
        keep = min(new_size, value.shape[1])
        out[:, :keep] = value[:, :keep]
        return out
    old, dim = value.shape  # (vocab, d_model)
    if new_size <= old:
        return value[:new_size].copy()
    if mean_resizing:
        new_rows = np.broadcast_to(value.mean(axis=0), (new_size - old, dim))
    else:
        new_rows = np.random.default_rng(0).normal(0.0, init_std, (new_size - old, dim))
    return np.concatenate([value, new_rows.astype(np.float32)], axis=0)

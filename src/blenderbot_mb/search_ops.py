"""The array operations the search (`search.py`) and the logits processors (`logits_process.py`) are written
against, and their NumPy implementation.

Each backend implements `ArrayOps` in a few lines with its own framework (`torch/generation.py`,
`tf/generation.py`, `flax/generation.py`); `NumpyOps` drives any runtime that hands back NumPy arrays
(onnxruntime, tests). Plain arithmetic, comparisons, `&`, `|`, `~` and static slicing (`x[:, 2:5]`) are written
with the operators every array type has; everything else goes through these methods.

Scalars: the step counter `cur_len` is a Python int where the loop runs in Python (NumPy, PyTorch) and a 0-d
array under a compiled loop (TF, JAX). Methods that take a scalar accept both; `select(pred, a, b)` branches
in Python on a Python bool, so eager loops run only the branch they need.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


class ArrayOps:
    """The interface. Shapes: N rows, V vocabulary entries, L buffer columns, B batch items, K beams."""

    eager = True  # the loop runs in Python: cur_len is a Python int, host hooks are plain calls
    processor_arguments = ("input_ids", "scores")  # what a caller's logits processor takes (call_processor)

    # creation and conversion
    def constant(self, value, dtype: str):  # host value -> array of "int32" | "float32" | "bool"
        raise NotImplementedError

    def full(self, shape, value, dtype: str):
        raise NotImplementedError

    def seed_words(self, seed):  # a scalar integer tensor seed -> [1, 4] int32, its four 16-bit words
        raise ConfigError("seed must be an integer or a list of integers (one per input); a seed tensor is taken "
                          "inside the tf backend's compiled functions only")

    def arange(self, n: int):  # int32 [n]
        raise NotImplementedError

    def cast(self, x, dtype: str):
        raise NotImplementedError

    def to_host(self, x) -> np.ndarray:
        raise NotImplementedError

    def size(self, x, axis: int):  # a dimension: an int, or a 0-d array where it is only known at run time
        return x.shape[axis]

    # selection and reduction
    def where(self, cond, x, y):  # elementwise, broadcasting; x or y may be a Python number
        raise NotImplementedError

    def masked_fill(self, x, mask, value):  # `value` (a Python number or a scalar) where `mask`, else x
        raise NotImplementedError

    def fill_columns(self, x, ids: tuple, value: float):  # x [N, V] with the columns `ids` (Python ints) = value
        raise NotImplementedError

    def select(self, pred, if_true, if_false):
        """`if_true()` where the scalar `pred` holds, else `if_false()` (thunks: an eager loop runs one)."""
        return if_true() if pred else if_false()

    def any(self, x, axis=None, keepdims=False):
        raise NotImplementedError

    def all(self, x, axis=None, keepdims=False):
        raise NotImplementedError

    def max(self, x, axis=None, keepdims=False):
        raise NotImplementedError

    def min(self, x, axis=None, keepdims=False):
        raise NotImplementedError

    def argmax(self, x):  # last axis -> int32
        raise NotImplementedError

    def top_k(self, x, k: int):  # last axis, descending; ties keep the lower index first -> (values, int32 indices)
        raise NotImplementedError

    def sort(self, x):  # last axis, ascending -> (values, int32 indices)
        raise NotImplementedError

    # indexing
    def take_along(self, x, index, axis: int):  # numpy.take_along_axis
        raise NotImplementedError

    def gather_beams(self, x, index):  # x [B, K, ...], index [B, J] -> [B, J, ...]
        raise NotImplementedError


    def column(self, x, index):  # x[..., index], index a scalar
        raise NotImplementedError

    def set_column(self, x, index, values):  # x[..., index] = values; may write in place (callers drop x)
        raise NotImplementedError

    def slice_columns(self, x, start, size: int):  # x[:, start:start + size] with start clamped to [0, L - size]
        raise NotImplementedError

    def mark(self, ids, valid, size: int):  # [N, M] ids, [N, M] bool -> [N, size] bool: which ids occur (valid ones)
        raise NotImplementedError

    def count(self, ids, valid, size: int):  # [N, M] ids, [N, M] bool -> [N, size] float32: how often each occurs
        raise NotImplementedError

    # shapes
    def reshape(self, x, shape):
        raise NotImplementedError

    def concat(self, xs, axis: int):
        raise NotImplementedError

    def repeat(self, x, count: int, axis: int):  # numpy.repeat
        raise NotImplementedError

    # math
    def log_softmax(self, x):  # last axis
        raise NotImplementedError

    def softmax(self, x):
        raise NotImplementedError

    def cumsum(self, x):  # last axis
        raise NotImplementedError

    def sum(self, x, axis=None, keepdims=False):
        raise NotImplementedError

    def exp(self, x):
        raise NotImplementedError

    def log(self, x):
        raise NotImplementedError

    # randomness: one stream per row (the search samples a row's token from its own stream only)
    def streams(self, ids, base=None):
        """The backend's random state for N rows from their names `ids` [N, 6] int32 (`search.stream_ids`),
        derived from `base` (a backend's own root state, e.g. a JAX key; None: its fixed default)."""
        raise NotImplementedError

    def uniform(self, key, shape: tuple):  # -> (uniform [0, 1) float32 [N, *shape], row r from stream r; next key)
        raise NotImplementedError

    # control flow
    def while_loop(self, cond, body, state: tuple, max_steps: int, lazy: bool = False):
        """Run `body` while `cond(state)` holds, at most `max_steps` times (every driver keeps that bound: the
        search's conditions rely on it). `state`: compiled loops get a tuple of arrays and nests (None
        allowed), eager ones the search's state object as it is. `lazy`: `body` leaves a finished state's results unchanged, so an eager driver may
        test `cond` (a host sync) only every few steps."""
        for _ in range(max_steps):
            if not bool(cond(state)):
                break
            state = body(state)
        return state

    def call_processor(self, fn, tokens, cur_len, scores):
        """A caller's logits processor. Eager backends: transformers' PyTorch convention, fn(input_ids [N,
        cur_len], scores); compiled loops: its TF/Flax convention, fn(input_ids [N, L], scores, cur_len)."""
        return fn(tokens[:, :cur_len], scores)

    def host_call(self, fn, args: tuple, result_rows: int | None = None):
        """Call `fn(*args)` on the host (args as the backend's host arrays); the result, if `result_rows`, is a
        bool array [result_rows] brought back into the loop. Eager loops just call it."""
        result = fn(*args)
        return None if result_rows is None else self.constant(result, "bool")


_DTYPES = {"int32": np.int32, "float32": np.float32, "bool": np.bool_}


class NumpyOps(ArrayOps):
    """ArrayOps over NumPy; the random state is a list of numpy.random.Generator, one per row."""

    def constant(self, value, dtype):
        return np.asarray(value, _DTYPES[dtype])

    def full(self, shape, value, dtype):
        return np.full(shape, value, _DTYPES[dtype])

    def arange(self, n):
        return np.arange(n, dtype=np.int32)

    def cast(self, x, dtype):
        return np.asarray(x).astype(_DTYPES[dtype])

    def to_host(self, x):
        return np.asarray(x)

    def where(self, cond, x, y):
        return np.where(cond, x, y)

    def masked_fill(self, x, mask, value):
        return np.where(mask, np.asarray(value, x.dtype), x)

    def fill_columns(self, x, ids, value):
        x = x.copy()
        x[:, list(ids)] = value
        return x

    def any(self, x, axis=None, keepdims=False):
        return np.any(x, axis=axis, keepdims=keepdims)

    def all(self, x, axis=None, keepdims=False):
        return np.all(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def min(self, x, axis=None, keepdims=False):
        return np.min(x, axis=axis, keepdims=keepdims)

    def argmax(self, x):
        return np.argmax(x, axis=-1).astype(np.int32)

    def top_k(self, x, k):
        index = np.argsort(-x, axis=-1, kind="stable")[..., :k].astype(np.int32)
        return np.take_along_axis(x, index, -1), index

    def sort(self, x):
        index = np.argsort(x, axis=-1, kind="stable").astype(np.int32)
        return np.take_along_axis(x, index, -1), index

    def take_along(self, x, index, axis):
        return np.take_along_axis(x, index, axis)

    def gather_beams(self, x, index):
        return x[np.arange(x.shape[0])[:, None], index]


    def column(self, x, index):
        return x[..., index]

    def set_column(self, x, index, values):
        x[..., index] = values
        return x

    def slice_columns(self, x, start, size):
        start = min(max(int(start), 0), x.shape[1] - size)
        return x[:, start:start + size]

    def mark(self, ids, valid, size):
        out = np.zeros((ids.shape[0], size + 1), bool)
        np.put_along_axis(out, np.where(valid, ids, size).astype(np.int64), True, axis=1)
        return out[:, :size]

    def count(self, ids, valid, size):
        out = np.zeros((ids.shape[0], size + 1), np.float32)
        rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
        np.add.at(out, (rows, np.where(valid, ids, size).astype(np.int64)), 1.0)
        return out[:, :size]

    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def repeat(self, x, count, axis):
        return np.repeat(x, count, axis=axis)

    def log_softmax(self, x):
        shifted = x - np.max(x, axis=-1, keepdims=True)
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))

    def softmax(self, x):
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)

    def cumsum(self, x):
        return np.cumsum(x, axis=-1)

    def sum(self, x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims, dtype=x.dtype)  # (as the other backends: int32 stays int32)

    def exp(self, x):
        return np.exp(x)

    def log(self, x):
        return np.log(x)

    def streams(self, ids, base=None):
        return [np.random.default_rng([int(w) for w in row]) for row in np.asarray(ids)]

    def uniform(self, key, shape):
        return np.stack([g.random(shape, dtype=np.float32) for g in key]), key

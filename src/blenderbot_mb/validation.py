"""One validation of what users hand the models, shared by the three backends.

Every check here works from plain facts about an array (its shape, its dtype name, its smallest and largest
value), so this module imports no framework and the three backends raise the same error, with the same
message, for the same bad input. `describe(x)` reads those facts from a numpy, PyTorch, TensorFlow or JAX
array, or a nested list; pass `values=False` while tracing (`tf.function`, `jax.jit`), where only the
shape and dtype are known.

    check_input_ids(ids, vocab_size=..., max_positions=...)   input_ids / decoder_input_ids
    check_attention_mask(mask, shape=ids_shape)               same shape as the ids, values 0 and 1
    check_model_inputs(input_ids, attention_mask, config)     both, as generate() takes them
    check_weight_dtypes(tensors, source=path)                 weights are floating point
    check_generation_lengths(max_length, min_length)          the decoder lengths a generate loop runs
    check_finite(name, value)                                 NaN / inf generation settings
    check_limit(name, value)                                  sizes against LIMITS, before any allocation
    check_text(text, what, turn=True)                         Unicode text; a conversation turn not too long
    check_field_types(obj, what)                              a config dataclass's fields against their types

Limits. Sizes far above any real model are refused before anything is allocated, with an error naming the
field and the limit: a crafted config.json or command line cannot ask for terabytes. `LIMITS` holds the
defaults; a user with a reason raises one for a process with the environment variable
`BLENDERBOT_MB_LIMITS="decoder_layers=512,num_beams=1000"`, or in Python by assigning
`blenderbot_mb.validation.LIMITS["decoder_layers"] = 512`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, ConfigError, InputError, check_input_ids_range, check_sequence_length

LIMITS_ENV = "BLENDERBOT_MB_LIMITS"
# The published checkpoints: d_model <= 2560, 24 layers, ffn 10240, 32 heads, vocab 8008, 128 positions,
# 10 beams, n-grams of 3. Every limit is far above that.
LIMITS: dict[str, int] = {
    # config.json
    "vocab_size": 1 << 20,
    "max_position_embeddings": 1 << 16,
    "d_model": 1 << 15,
    "encoder_layers": 256,
    "decoder_layers": 256,
    "encoder_ffn_dim": 1 << 17,
    "decoder_ffn_dim": 1 << 17,
    "encoder_attention_heads": 1024,
    "decoder_attention_heads": 1024,
    "parameters": 50_000_000_000,  # the whole model, estimated from the config
    # generation settings
    "max_length": 1 << 16,
    "max_new_tokens": 1 << 16,
    "min_length": 1 << 16,
    "min_new_tokens": 1 << 16,
    "num_beams": 256,
    "num_return_sequences": 256,
    "top_k": 1 << 20,
    "no_repeat_ngram_size": 64,
    "encoder_no_repeat_ngram_size": 64,
    "bad_words_ids": 1 << 16,  # token ids in all the banned words together
    "sequence_bias": 1 << 16,  # token ids in all the biased sequences together
    "suppress_tokens": 1 << 16,  # token ids in suppress_tokens and begin_suppress_tokens together
    # text
    "turn_chars": 100_000,  # characters in one conversation turn (one chat line)
}

INTEGER_DTYPES = frozenset(f"{u}int{b}" for u in ("", "u") for b in (8, 16, 32, 64))
FLOAT_DTYPES = frozenset(("float16", "bfloat16", "float32", "float64"))


# ---------------------------------------------------------------------- limits
def limit(name: str) -> int:
    """The limit called `name`: LIMITS, overridden by the BLENDERBOT_MB_LIMITS environment variable."""
    return _env_limits(os.environ.get(LIMITS_ENV, "")).get(name, LIMITS[name])


@functools.lru_cache(maxsize=8)
def _env_limits(setting: str) -> dict[str, int]:
    """The limits a BLENDERBOT_MB_LIMITS value sets (parsed once per value: text checks ask per turn)."""
    out = {}
    for item in filter(None, (s.strip() for s in setting.split(","))):
        key, _, number = item.partition("=")
        if key.strip() not in LIMITS or not number.strip().isdigit():
            raise ConfigError(f"{LIMITS_ENV} entry {short(item)} is not NAME=INTEGER with NAME one of "
                              f"{', '.join(LIMITS)}")
        out[key.strip()] = int(number)
    return out


def check_limit(name: str, value: int, what: str = "config field", error: type[Exception] = ConfigError) -> None:
    """Raise `error` when `value` is above the limit called `name`."""
    bound = limit(name)
    if value > bound:
        raise error(f"{what} {name!r} is {short(value)}, above the limit of {bound} (far above any real model); "
                    f"to raise it, set {LIMITS_ENV}={name}=N")


def short(value: Any, width: int = 60) -> str:
    """repr(value) cut to `width` characters (a hostile file may hold a 10 MB string or a huge integer)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "<a number too long to print>"
    return text if len(text) <= width else text[: width - 3] + "..."


def check_text(text: str, what: str = "text", turn: bool = False) -> None:
    """Text is Unicode: no lone surrogates (bytes that were not UTF-8, decoded with surrogateescape as Python
    does for command-line arguments). A conversation `turn` also has at most LIMITS["turn_chars"] characters."""
    if turn and len(text) > limit("turn_chars"):
        raise InputError(f"{what} has {len(text)} characters, above the limit of {limit('turn_chars')}; to raise "
                         f"it, set {LIMITS_ENV}=turn_chars=N")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{what} is not valid text: character {e.start} is {text[e.start]!r}, a byte that "
                             "was not UTF-8") from None


# ---------------------------------------------------------------------- types of config fields
def check_field_types(obj: Any, what: str) -> None:
    """Check every field of a config dataclass against its annotation, e.g. `int`, `bool`, `float | None`.

    JSON's types are kept apart: a bool is not an int, the string "false" is not a bool, 1.0 is not an int;
    an int is accepted where a float is expected. Raises ConfigError naming the field.
    """
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if not any(_is_kind(value, kind) for kind in kinds):
            expected = " or ".join(_KIND_WORDS.get(k, k) for k in kinds)
            raise ConfigError(f"{what} {f.name!r} must be {expected}, got {short(value)} "
                              f"({type(value).__name__})")


_KIND_WORDS = {"int": "an integer", "bool": "a boolean (true/false)", "float": "a number", "str": "a string",
               "None": "null", "list[int]": "a list of integers", "list[list[int]]": "a list of lists of integers",
               "tuple[int, float]": "a pair [integer, number]",
               "list[tuple[list[int], float]]": "a list of [token ids, bias] pairs"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_kind(value, kind: str) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "float":
        return _is_int(value) or isinstance(value, float)
    if kind == "str":
        return isinstance(value, str)
    if kind == "None":
        return value is None
    if kind == "list[int]":
        return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
    if kind == "list[tuple[list[int], float]]":
        return isinstance(value, (list, tuple)) and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and _is_kind(pair[0], "list[int]")
            and all(t >= 0 for t in pair[0]) and _is_kind(pair[1], "float") for pair in value)
    if kind == "tuple[int, float]":
        return isinstance(value, (list, tuple)) and len(value) == 2 and _is_int(value[0]) and _is_kind(value[1], "float")
    if kind == "list[list[int]]":
        return isinstance(value, (list, tuple)) and all(_is_kind(v, "list[int]") for v in value)
    raise TypeError(f"no type check for annotation {kind!r}")  # a field added without a check here


def check_finite(name: str, value: float, what: str = "generation setting") -> None:
    """NaN and inf have no meaning as a length penalty, temperature, ... and backends treat them differently."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ConfigError(f"{what} {name!r} must be a finite number, got {short(value)}")


def check_generation_lengths(max_length: int, min_length: int) -> None:
    """The decoder lengths of a generate loop (start token included) must leave room for one new token."""
    if max_length < 2:
        raise ConfigError(
            f"generation max_length {max_length} leaves no room for a reply: the decoder length counts the start "
            "token, so max_length must be >= 2 (or use max_new_tokens >= 1)"
        )
    if min_length < 0:
        raise ConfigError(f"generation min_length must be >= 0, got {min_length}")


# ---------------------------------------------------------------------- arrays
@dataclass(frozen=True)
class TensorInfo:
    """What the checks need to know about an array; `low`/`high` are None when the values were not read."""

    shape: tuple  # ints, None for a dimension unknown while tracing
    dtype: str  # numpy-style name: "int64", "bfloat16", "bool"
    low: float | None = None
    high: float | None = None


def dtype_name(dtype) -> str:
    """numpy / TensorFlow / JAX dtypes have `.name`; torch's print as 'torch.int64'."""
    name = getattr(dtype, "name", None)
    return (name if isinstance(name, str) else str(dtype)).rsplit(".", 1)[-1]


def describe(x, values: bool = True) -> TensorInfo:
    """Shape, dtype and (when `values`, the array is numeric and not empty) the smallest and largest value."""
    if isinstance(x, TensorInfo):
        return x
    x = _array(x)
    shape = tuple(None if d is None else int(d) for d in x.shape)
    dtype = dtype_name(x.dtype)
    if not values or dtype not in INTEGER_DTYPES | FLOAT_DTYPES | {"bool"} or not all(shape):
        return TensorInfo(shape, dtype)
    low, high = _min_max(x)
    return TensorInfo(shape, dtype, low, high)


def _array(x, what: str = "the input"):
    """Arrays of any framework as they are; nested lists and scalars as numpy arrays (InputError for rows of
    different lengths, naming `what` and the lengths)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    import numpy as np

    try:
        return np.asarray(x)
    except ValueError:
        lengths = [len(row) if isinstance(row, (list, tuple)) else "a number" for row in x] \
            if isinstance(x, (list, tuple)) else []
        if len(set(map(str, lengths))) > 1:
            raise InputError(f"{what} has rows of different lengths ({short(lengths, 80).strip('[]')}): pad them "
                             "to one length, as tokenizer(texts, padding=True) gives them with their "
                             "attention_mask") from None
        raise InputError(f"cannot read {what} ({type(x).__name__}) as an array of numbers: "
                         f"{short(x, 80)}") from None


def host_array(x, what: str = "the input"):
    """A numpy array of ids or mask values given as a numpy array, a nested list or a scalar; InputError for
    ragged rows or values that are not numbers."""
    import numpy as np

    array = _array(x, what)
    if not isinstance(array, np.ndarray):
        array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{what} must hold numbers (token ids or mask values), got {short(x, 80)}")
    return array


def _min_max(x) -> tuple[float, float]:
    if not hasattr(x, "min"):  # TensorFlow eager tensors
        import numpy as np

        x = np.asarray(x)
    low, high = x.min(), x.max()
    low, high = (v.item() if hasattr(v, "item") else v for v in (low, high))
    return low, high


def check_input_ids(ids, vocab_size: int, max_positions: int | None = None, what: str = "input_ids",
                    values: bool = True) -> TensorInfo:
    """Token ids: rank 2 (batch, length), an integer dtype, not empty, within the position table and the
    vocabulary. Raises InputError; returns what it learned about `ids`."""
    info = describe(_array(ids, what), values)
    if len(info.shape) != 2:
        raise InputError(f"{what} must have shape (batch_size, sequence_length), got shape {info.shape}")
    if info.dtype not in INTEGER_DTYPES:
        raise InputError(f"{what} must hold integer token ids, got dtype {info.dtype}")
    if 0 in info.shape:
        raise InputError(f"{what} is empty (shape {info.shape}); every row needs at least one token")
    if max_positions is not None and info.shape[1] is not None:
        check_sequence_length(info.shape[1], max_positions, what)
    if info.low is not None:
        check_input_ids_range(int(info.high), int(info.low), vocab_size, what)
    return info


def check_attention_mask(mask, shape, what: str = "attention_mask", values: bool = True) -> None:
    """A mask (None is fine) has the ids' shape and holds only 0 (padding) and 1 (token)."""
    if mask is None:
        return
    mask = _array(mask, what)
    info = describe(mask, values)
    shape = tuple(None if d is None else int(d) for d in shape)
    if len(info.shape) != len(shape) or any(a != b for a, b in zip(info.shape, shape, strict=True)
                                            if a is not None and b is not None):
        raise InputError(f"{what} has shape {info.shape}, expected {shape} (the shape of the ids)")
    if info.dtype not in INTEGER_DTYPES | FLOAT_DTYPES | {"bool"}:
        raise InputError(f"{what} must hold 0 and 1 (integer, bool or float), got dtype {info.dtype}")
    if info.low is None:
        return
    binary = info.low >= 0 and info.high <= 1
    if binary and info.dtype in FLOAT_DTYPES:  # 0.5 lies in [0, 1]: x * (1 - x) is 0 only for 0 and 1
        binary = _min_max(mask * (1 - mask))[1] == 0
    if not binary:
        raise InputError(f"{what} must hold only 0 (padding) and 1 (token), got values in "
                         f"[{info.low}, {info.high}]")


def check_model_inputs(input_ids, attention_mask, config, values: bool = True) -> TensorInfo:
    """The encoder inputs of a forward pass or of generate: ids (see check_input_ids) and their mask."""
    info = check_input_ids(input_ids, config.vocab_size, config.max_position_embeddings, values=values)
    check_attention_mask(attention_mask, info.shape, values=values)
    return info


def check_labels(labels, shape, vocab_size: int, values: bool = True, ignore_index: int = -100,
                 max_positions: int | None = None) -> None:
    """Targets of the LM loss: the logits' (batch, decoder length) (`shape`; None: any (batch, length), the
    labels giving the decoder inputs, at most `max_positions` long), integer ids in the vocabulary or
    `ignore_index` (positions that do not count). Raises InputError."""
    labels = _array(labels, "labels")
    info = describe(labels, values=False)
    if info.dtype not in INTEGER_DTYPES:
        raise InputError(f"labels must hold integer token ids (or {ignore_index}), got dtype {info.dtype}")
    if shape is None:
        if len(info.shape) != 2 or 0 in info.shape:
            raise InputError(f"labels must have shape (batch_size, sequence_length), not empty; got {info.shape}")
        if max_positions is not None and info.shape[1] is not None:
            check_sequence_length(int(info.shape[1]), max_positions, "labels (the decoder reads them, shifted)")
        shape = info.shape
    shape = tuple(None if d is None else int(d) for d in shape)
    if len(info.shape) != len(shape) or any(a != b for a, b in zip(info.shape, shape, strict=True)
                                            if a is not None and b is not None):
        raise InputError(f"labels have shape {info.shape}, expected {shape}: one target per decoder position")
    if not values or not all(info.shape):
        return
    labels = _array(labels)
    if not hasattr(labels, "min"):  # TensorFlow eager tensors
        import numpy as np

        labels = np.asarray(labels)
    high = labels.max()
    low = (labels * (labels != ignore_index)).min()  # ignored positions read as 0, a valid id
    low, high = (int(v.item() if hasattr(v, "item") else v) for v in (low, high))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"labels hold {bad}, neither a token id of the model's vocabulary [0, {vocab_size}) nor "
                         f"{ignore_index} (a position that does not count)")


def check_batch_rows(decoder_rows, encoder_rows) -> None:
    """The decoder reads one encoder row per decoder row (None: not known before tracing)."""
    if decoder_rows is not None and encoder_rows is not None and int(decoder_rows) != int(encoder_rows):
        raise InputError(f"the decoder inputs have {int(decoder_rows)} rows and the encoder's {int(encoder_rows)}: "
                         "each decoder row continues the encoder row of the same index")


def check_weight_dtypes(tensors: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Every weight is floating point: integer or bool tensors are refused, whatever the backend."""
    for name, tensor in tensors.items():
        dtype = dtype_name(tensor.dtype)
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: tensor {name} has dtype {dtype}; weights must be floating point "
                                  f"({', '.join(sorted(FLOAT_DTYPES))})")


__all__ = ["LIMITS", "LIMITS_ENV", "TensorInfo", "check_attention_mask", "check_batch_rows", "check_field_types",
           "check_finite", "check_labels",
           "check_generation_lengths", "check_input_ids", "check_limit", "check_model_inputs",
           "check_text", "check_weight_dtypes", "describe",
           "dtype_name", "limit", "short"]

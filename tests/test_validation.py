"""The core validation (blenderbot_mb.validation) on numpy inputs; test_cross_backend_errors.py runs the
same bad inputs through the three backends."""

import math

import numpy as np
import pytest

from blenderbot_mb import validation
from blenderbot_mb.errors import CheckpointError, ConfigError, InputError


def test_describe_reads_shape_dtype_and_bounds():
    info = validation.describe(np.array([[3, -1], [7, 2]], dtype=np.int32))
    assert info == validation.TensorInfo((2, 2), "int32", -1, 7)
    assert validation.describe([[1, 2]]).dtype == "int64"
    assert validation.describe(np.zeros((2, 0), np.int64)).low is None  # empty: nothing to read
    assert validation.describe(np.ones((1, 2)), values=False).low is None


@pytest.mark.parametrize("ids, message", [
    (np.ones((1, 3), np.float32), "must hold integer token ids, got dtype float32"),
    (np.ones((1, 3), bool), "must hold integer token ids, got dtype bool"),
    (np.ones(3, np.int64), "must have shape (batch_size, sequence_length), got shape (3,)"),
    (np.ones((1, 1, 3), np.int64), "got shape (1, 1, 3)"),
    (np.ones((1, 0), np.int64), "is empty"),
    (np.full((1, 3), 10, np.int64), "token id 10, outside the model's vocabulary [0, 10)"),
    (np.full((1, 3), -1, np.int64), "token id -1"),
    (np.ones((1, 9), np.int64), "has length 9, but the model has only 8 position embeddings"),
])
def test_bad_ids(ids, message):
    with pytest.raises(InputError) as e:
        validation.check_input_ids(ids, vocab_size=10, max_positions=8)
    assert message in str(e.value)


def test_good_ids_and_tracing():
    validation.check_input_ids(np.array([[0, 9]], np.uint8), vocab_size=10)
    # while tracing only the shape and dtype are known: out-of-range values are not read
    validation.check_input_ids(np.full((1, 3), 99), vocab_size=10, values=False)


@pytest.mark.parametrize("mask, message", [
    (np.ones((2, 4), np.int64), "has shape (2, 4), expected (2, 3)"),
    (np.ones(3, np.int64), "has shape (3,), expected (2, 3)"),
    (np.full((2, 3), 2), "only 0 (padding) and 1 (token), got values in [2, 2]"),
    (np.full((2, 3), 0.5, np.float32), "only 0 (padding) and 1 (token)"),
    (np.full((2, 3), "1"), "got dtype str32"),
])
def test_bad_masks(mask, message):
    with pytest.raises(InputError) as e:
        validation.check_attention_mask(mask, (2, 3))
    assert message in str(e.value)


def test_good_masks():
    validation.check_attention_mask(None, (2, 3))
    for dtype in (np.int64, np.float32, bool):
        validation.check_attention_mask(np.array([[1, 1, 0], [1, 0, 0]], dtype), (2, 3))
    validation.check_attention_mask(np.ones((2, 3)), (None, 3))  # unknown dims are not compared


@pytest.mark.parametrize("dtype", [np.int64, np.int8, bool, np.uint8])
def test_weight_dtypes_refused(dtype):
    with pytest.raises(CheckpointError, match="tensor b has dtype .*; weights must be floating point"):
        validation.check_weight_dtypes({"a": np.zeros(2, np.float16), "b": np.zeros(2, dtype)}, "f.safetensors")


def test_limits_env_and_python(monkeypatch):
    with pytest.raises(ConfigError, match=r"'num_beams' is 1000000, above the limit of 256 .*"
                                          r"BLENDERBOT_MB_LIMITS=num_beams=N"):
        validation.check_limit("num_beams", 1_000_000, what="generation setting")
    monkeypatch.setenv(validation.LIMITS_ENV, "num_beams=2000000, decoder_layers=512")
    validation.check_limit("num_beams", 1_000_000)
    assert validation.limit("decoder_layers") == 512
    monkeypatch.setenv(validation.LIMITS_ENV, "num_beams=lots")
    with pytest.raises(ConfigError, match="BLENDERBOT_MB_LIMITS entry 'num_beams=lots'"):
        validation.limit("num_beams")
    monkeypatch.delenv(validation.LIMITS_ENV)
    monkeypatch.setitem(validation.LIMITS, "num_beams", 10**7)
    validation.check_limit("num_beams", 1_000_000)


def test_short_never_prints_huge_values():
    assert len(validation.short("x" * 10**6)) == 60
    assert validation.short(10**5000) == "<a number too long to print>"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_check_finite(value):
    with pytest.raises(ConfigError, match="'length_penalty' must be a finite number"):
        validation.check_finite("length_penalty", value)


def test_generation_lengths():
    validation.check_generation_lengths(2, 0)
    with pytest.raises(ConfigError, match="max_length 1 leaves no room"):
        validation.check_generation_lengths(1, 0)


def test_docs_list_every_limit_with_its_value():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "security.md").read_text()
    section = text[text.index("### Limits"):]
    documented = {}
    for names, value in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| ([\d,]+)(?: each)? \|", section, re.M):
        for name in re.findall(r"`(\w+)`", names):
            documented[name] = int(value.replace(",", ""))
    assert documented == validation.LIMITS


def test_lists_are_read_as_arrays():
    validation.check_attention_mask([[1.0, 0.0]], (1, 2))
    with pytest.raises(InputError, match="only 0"):
        validation.check_attention_mask([[1.0, 0.5]], (1, 2))
    with pytest.raises(InputError, match=r"input_ids has rows of different lengths \(2, 1\): pad them"):
        validation.check_input_ids([[1, 2], [3]], vocab_size=10)

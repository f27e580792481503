"""`convert` options and guarantees: --dtype (with overflow refused), --verify, streaming, and bad inputs that
give one clear line and leave nothing behind."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint
from typer.testing import CliRunner

from blenderbot_mb.checkpoint import read_weights
from blenderbot_mb.cli import app
from blenderbot_mb.convert import convert_checkpoint, verify_conversion
from blenderbot_mb.errors import BlenderbotError, CheckpointError
from blenderbot_mb.fileio import TEMP_TAG

ARCH = "BlenderbotForConditionalGeneration"


@pytest.fixture
def source(tmp_path):
    config = make_config("tiny")
    weights = random_weights(config, seed=4)
    return write_checkpoint(tmp_path / "src", config, weights), config, weights


def nothing_left(parent, name="out"):
    assert not os.path.exists(os.path.join(parent, name))
    assert not [n for n in os.listdir(parent) if TEMP_TAG in n]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_cast_rounds_like_numpy(source, tmp_path, dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    folder, config, weights = source
    out = convert_checkpoint(folder, tmp_path / "out", dtype=dtype)
    target = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        for name, value in weights.items():
            stored = f.get_tensor(name)
            assert stored.dtype == np.dtype(target), name
            np.testing.assert_array_equal(stored.view(np.uint16), value.astype(target).view(np.uint16))


def test_dtype_overflow_is_refused(source, tmp_path):
    folder, config, weights = source
    weights["model.decoder.layers.1.fc2.bias"][3] = 1e5  # beyond float16's 65504, fine in bfloat16
    src = write_checkpoint(tmp_path / "big", config, weights)
    with pytest.raises(CheckpointError, match=r"model\.decoder\.layers\.1\.fc2\.bias.*float16"):
        convert_checkpoint(src, tmp_path / "out", dtype="float16")
    nothing_left(tmp_path)
    convert_checkpoint(src, tmp_path / "out", dtype="bfloat16")


def test_verify_passes_and_catches_a_wrong_result(source, tmp_path):
    pytest.importorskip("torch")
    folder, config, weights = source
    out = convert_checkpoint(folder, tmp_path / "out")
    result = verify_conversion(folder, out)
    assert result.ok and result.max_abs_diff == 0.0 and result.token_agreement == 1.0
    other = dict(weights)
    other["model.decoder.layers.0.fc1.weight"] = weights["model.decoder.layers.0.fc1.weight"] * 1.001
    write_checkpoint(tmp_path / "out", config, other)  # a result that is slightly wrong
    result = verify_conversion(folder, out)
    assert not result.ok and result.max_abs_diff > 1e-5
    runner = CliRunner()
    assert runner.invoke(app, ["convert", folder, str(tmp_path / "ok"), "--verify", "-q"]).exit_code == 0


def test_verify_across_frameworks(source, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    folder, _, _ = source
    out = convert_checkpoint(folder, tmp_path / "h5", to="tf")
    result = verify_conversion(folder, out, to="tf")
    assert (result.src_backend, result.dst_backend) == ("torch", "tf") and result.ok, str(result)


def test_conversion_streams_one_tensor_at_a_time(tmp_path):
    """h5 -> safetensors: tensors are read one at a time, so the peak allocation stays near the largest tensor."""
    pytest.importorskip("h5py")
    config = make_config("tiny", vocab_size=512, d_model=256, encoder_layers=4, decoder_layers=4,
                         encoder_ffn_dim=1024, decoder_ffn_dim=1024)
    weights = random_weights(config)
    total = sum(v.nbytes for v in weights.values())
    h5 = convert_checkpoint(write_checkpoint(tmp_path / "src", config, weights), tmp_path / "h5", to="tf")
    del weights
    tracemalloc.start()
    convert_checkpoint(h5, tmp_path / "out")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.25 * total, (peak, total)


@pytest.mark.parametrize("case", ["format", "shard size", "dtype", "truncated", "unwritable", "int weights"])
def test_bad_inputs_one_line_nothing_left(source, tmp_path, case):
    folder, config, weights = source
    args = [folder, str(tmp_path / "out")]
    if case == "format":
        args += ["--to", "parquet"]
    elif case == "shard size":
        args += ["--max-shard-size", "abc"]
    elif case == "dtype":
        args += ["--dtype", "float8"]
    elif case == "truncated":
        path = os.path.join(folder, "model.safetensors")
        os.truncate(path, os.path.getsize(path) - 100)
    elif case == "unwritable":
        args[1] = "/proc/blenderbot-mb-out/model"  # no one, root included, can create a folder there
    elif case == "int weights":
        weights["model.encoder.layers.0.fc1.bias"] = np.arange(32, dtype=np.int64)
        write_checkpoint(folder, config, weights)
    result = CliRunner().invoke(app, ["convert", *args, "-q"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) >= 1 and "Traceback" not in result.output
    if case not in ("format", "dtype"):  # those two are typer's own usage errors
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if case == "int weights":
        assert "model.encoder.layers.0.fc1.bias" in lines[0] and "int64" in lines[0]
    nothing_left(tmp_path)


def test_errors_are_the_packages_own(source, tmp_path):
    folder, _, _ = source
    with pytest.raises(BlenderbotError):
        convert_checkpoint(folder, tmp_path / "out", dtype="float8")
    with pytest.raises(BlenderbotError):
        convert_checkpoint(folder, tmp_path / "out", max_shard_size="-3GB")
    assert read_weights(folder, make_config("tiny"), ARCH)

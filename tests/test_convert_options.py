"""`convert` options and guarantees: --dtype (with overflow refused), --verify, streaming, and bad inputs that
give one clear line and leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint
from typer.testing import CliRunner

from blenderbot_mb.checkpoint import read_weights
from blenderbot_mb.cli import app
from blenderbot_mb.convert import convert_checkpoint, verify_conversion
from blenderbot_mb.errors import BlenderbotError, CheckpointError, InputError
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


# ---------------------------------------------------------------------- what users of convert ran into
def test_bfloat16_safetensors_convert_without_a_framework_loaded(source, tmp_path):
    """A bfloat16 safetensors source is read as numpy (ml_dtypes), in a fresh process where no framework has
    registered bfloat16 with numpy yet; its values survive the trip bit for bit."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    folder, config, weights = source
    bf16 = convert_checkpoint(folder, tmp_path / "bf16", dtype="bfloat16")
    out = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "-m", "blenderbot_mb.cli", "convert", bf16, out, "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        name = "model.decoder.layers.0.fc1.weight"
        np.testing.assert_array_equal(f.get_tensor(name).view(np.uint16),
                                      weights[name].astype(ml_dtypes.bfloat16).view(np.uint16))


def test_tf_h5_refuses_bfloat16(source, tmp_path):
    """HDF5 has no bfloat16: h5py would store opaque bytes no reader takes. Refused, nothing left."""
    pytest.importorskip("h5py")
    folder, _, _ = source
    with pytest.raises(CheckpointError, match="bfloat16"):
        convert_checkpoint(folder, tmp_path / "out", to="tf", dtype="bfloat16")
    nothing_left(tmp_path)
    bf16 = convert_checkpoint(folder, tmp_path / "bf16", dtype="bfloat16")
    with pytest.raises(CheckpointError, match="bfloat16"):
        convert_checkpoint(bf16, tmp_path / "out", to="tf")
    nothing_left(tmp_path)


def test_verify_runs_before_the_result_replaces_dst(source, tmp_path, monkeypatch):
    """A failed --verify leaves DST as it was (with --force too) and no temporary folder; a verify that
    passes shows its line, then the result is in place."""
    pytest.importorskip("torch")
    import blenderbot_mb.convert as convert_module

    folder, _, _ = source
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    seen = []

    def failing(src, out, **kwargs):
        seen.append(sorted(os.listdir(out)))
        assert TEMP_TAG in os.path.basename(out)  # the written folder, not DST
        return convert_module.Verification("torch", "torch", 1.0, 0.5, 1e-4, "float32")

    monkeypatch.setattr(convert_module, "verify_conversion", failing)
    result = CliRunner().invoke(app, ["convert", folder, str(dst), "--force", "--verify", "-q"])
    assert result.exit_code == 1 and "verify FAILED" in result.stderr and "verify" not in result.stdout
    assert "model.safetensors" in seen[0]
    assert sorted(os.listdir(dst)) == ["mine.txt"]
    assert not [n for n in os.listdir(tmp_path) if TEMP_TAG in n]
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["convert", folder, str(dst), "--force", "--verify", "-q"])
    assert result.exit_code == 0, result.output
    assert "verify OK" in result.output and "model.safetensors" in os.listdir(dst)


def test_verify_tolerance_scales_with_the_logits(source, tmp_path):
    """float32's tolerance is relative to the largest logit, as the narrower dtypes' are (TOLERANCES)."""
    pytest.importorskip("torch")
    from blenderbot_mb.convert import TOLERANCES, _batch, model_logits

    folder, config, _ = source
    result = verify_conversion(folder, convert_checkpoint(folder, tmp_path / "out"))
    peak = float(np.abs(model_logits("torch", folder, _batch(config))).max())
    assert result.tolerance == pytest.approx(TOLERANCES["float32"] * max(1.0, peak))


def test_verify_of_a_causal_lm(tmp_path):
    """BlenderbotForCausalLM (PyTorch's only) is verified with its own class, on decoder ids."""
    pytest.importorskip("torch")
    arch = "BlenderbotForCausalLM"
    config = make_config("tiny")
    src = write_checkpoint(tmp_path / "src", config, random_weights(config, arch, seed=2), architecture=arch)
    result = CliRunner().invoke(app, ["convert", src, str(tmp_path / "out"), "--verify", "-q"])
    assert result.exit_code == 0, result.output
    assert "verify OK" in result.output


def test_a_tokenizer_folder_must_hold_a_tokenizer(source, tmp_path):
    folder, _, _ = source
    with pytest.raises(InputError, match="no such folder"):
        convert_checkpoint(folder, tmp_path / "out", tokenizer=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no tokenizer files"):
        convert_checkpoint(folder, tmp_path / "out", tokenizer=tmp_path / "empty")
    nothing_left(tmp_path)


@pytest.mark.parametrize("option", [["--dtype", "float16"], ["--tokenizer", "."], ["--max-shard-size", "1GB"],
                                    ["--verify"], ["--from-parlai"]])
def test_exports_refuse_the_options_they_would_ignore(source, tmp_path, option):
    folder, _, _ = source
    result = CliRunner().invoke(app, ["convert", folder, str(tmp_path / "out"), "--to", "ctranslate2", *option])
    assert result.exit_code == 2 and f"{option[0]}: not for --to ctranslate2" in result.output
    nothing_left(tmp_path)


def test_exports_refuse_a_causal_lm_before_any_framework(tmp_path):
    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.export import export_model

    arch = "BlenderbotForCausalLM"
    config = make_config("tiny")
    src = write_checkpoint(tmp_path / "src", config, random_weights(config, arch), architecture=arch)
    for to in ("onnx", "savedmodel", "ctranslate2"):
        with pytest.raises(ConfigError, match="BlenderbotForCausalLM"):
            export_model(src, tmp_path / "out", to=to)
    nothing_left(tmp_path)


@pytest.mark.parametrize("where", ["same folder", "parent folder"])
def test_dst_that_holds_the_source_is_refused_even_with_force(source, tmp_path, where):
    """--force replaces DST whole: where DST is SRC or holds it, that would delete the source."""
    folder, _, _ = source
    before = sorted(os.listdir(folder))
    dst = folder if where == "same folder" else os.path.dirname(folder)
    for to in ("tf", "onnx"):
        result = CliRunner().invoke(app, ["convert", folder, dst, "--to", to, "--force"])
        assert result.exit_code == 2 and "would replace the source" in result.output
    assert sorted(os.listdir(folder)) == before


def test_a_symlinked_dst_writes_its_target(source, tmp_path):
    """DST a link to a folder: that folder gets the model, the link stays, no temporary link is left."""
    folder, _, _ = source
    target = tmp_path / "models" / "v1"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    link = tmp_path / "current"
    link.symlink_to(target, target_is_directory=True)
    convert_checkpoint(folder, link, force=True)
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert "model.safetensors" in os.listdir(target) and "old.txt" not in os.listdir(target)
    for parent in (tmp_path, target.parent):
        assert not [n for n in os.listdir(parent) if TEMP_TAG in n]


def test_architectures_as_a_bare_string(source, tmp_path):
    folder, _, _ = source
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        data = json.load(f)
    data["architectures"] = "BlenderbotForConditionalGeneration"
    with open(path, "w") as f:
        json.dump(data, f)
    out = convert_checkpoint(folder, tmp_path / "out")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["BlenderbotForConditionalGeneration"]


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"hello, world", "neither a zip archive nor a pickle"),
                                             (b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "HDF5")])
def test_pickle_files_that_are_not_pickles(tmp_path, content, message):
    from blenderbot_mb.checkpoint_pickle import load_pickle

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_pickle(str(path), allow_pickle=True)


def test_sigterm_during_convert_is_an_interrupt():
    """convert turns SIGTERM into KeyboardInterrupt (the clean-up of Ctrl-C) while it runs, then restores
    the handler it found."""
    import signal

    from blenderbot_mb.cli import _interrupt_on_sigterm

    def command():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_on_sigterm(command)()
    assert signal.getsignal(signal.SIGTERM) is before

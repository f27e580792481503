"""Exports refuse bad requests with one clear line and leave nothing behind (any format: the checks run
before an exporter loads a framework)."""

import os
import stat

import pytest
from helpers import make_config, random_weights, write_checkpoint
from typer.testing import CliRunner

from blenderbot_mb.cli import app
from blenderbot_mb.errors import BlenderbotError
from blenderbot_mb.export import export_model

runner = CliRunner()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    config = make_config("tiny")
    return write_checkpoint(tmp_path_factory.mktemp("src"), config, random_weights(config))


def fails_cleanly(args, parent):
    before = sorted(os.listdir(parent))
    lock = f".{os.path.basename(args[2])}.bbmb-lock"  # the writers' lock file may stay, empty
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert sorted(set(os.listdir(parent)) - {lock}) == before  # no temporary folder, no partial export
    return lines[0]


def test_unknown_format(source, tmp_path):
    with pytest.raises(BlenderbotError, match="unknown export format 'tflite'"):
        export_model(source, tmp_path / "out", to="tflite")
    with pytest.raises(BlenderbotError, match="export to onnx takes opset, not generation"):
        export_model(source, tmp_path / "out", to="onnx", generation={"num_beams": 1})
    with pytest.raises(BlenderbotError, match="unknown CTranslate2 variant.*'int4'"):  # a name, not its letters
        export_model(source, tmp_path / "out", to="ctranslate2", quantization="int4")
    with pytest.raises(BlenderbotError, match="exports to onnx, savedmodel and ctranslate2: .*export_model"):
        from blenderbot_mb.convert import convert_checkpoint

        convert_checkpoint(source, tmp_path / "out", to="onnx")
    assert os.listdir(tmp_path) == []


def test_refuses_non_empty_destination(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    line = fails_cleanly(["convert", source, str(dst), "--to", "ctranslate2"], tmp_path)
    assert "not empty" in line and "--force" in line
    assert os.listdir(dst) == ["mine.txt"]
    result = runner.invoke(app, ["convert", source, str(dst), "--to", "ctranslate2", "--force"])
    assert result.exit_code == 0, result.output
    assert {"float32", "int8", "config.json"} <= set(os.listdir(dst)) and "mine.txt" not in os.listdir(dst)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_destination(source, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        line = fails_cleanly(["convert", source, str(parent / "out"), "--to", "onnx"], parent)
        assert "cannot write" in line
    finally:
        parent.chmod(stat.S_IRWXU)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_destination(source):
    line = fails_cleanly(["convert", source, "/proc/bbmb-export", "--to", "onnx"], "/proc")
    assert line.startswith("error: cannot write /proc")


@pytest.mark.parametrize("to", ["onnx", "savedmodel", "ctranslate2"])
def test_truncated_source(source, tmp_path, to):
    src = tmp_path / "src"
    src.mkdir()
    for name in os.listdir(source):
        data = open(os.path.join(source, name), "rb").read()
        (src / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    out = tmp_path / "out"
    out.mkdir()
    line = fails_cleanly(["convert", str(src), str(out / "model"), "--to", to], out)
    assert "model.safetensors" in line


@pytest.mark.parametrize("generation_file", [True, False])
def test_exported_generation_config_generates_as_the_source_does(tmp_path, generation_file):
    """The exported generation_config.json holds what generate() uses on the source: the special ids it
    fills in from config.json, and forced_eos_token_id only where the source applies it (no
    generation_config.json: config.json's legacy fields; with one: only if that file sets it)."""
    import json

    from blenderbot_mb.export import save_configs
    from blenderbot_mb.generation_config import GenerationConfig

    config = make_config("tiny", forced_eos_token_id=2)
    generation = {"num_beams": 1, "max_length": 20} if generation_file else None
    src = write_checkpoint(tmp_path / "src", config, random_weights(config), generation=generation)
    save_configs(src, str(tmp_path))
    with open(tmp_path / "generation_config.json") as f:
        saved = json.load(f)
    assert (saved.get("forced_eos_token_id") == 2) == (not generation_file)
    assert saved["decoder_start_token_id"] == config.decoder_start_token_id
    assert saved["eos_token_id"] == config.eos_token_id
    source = GenerationConfig.from_pretrained(src, config).resolve(config)
    exported = GenerationConfig.from_pretrained(str(tmp_path), config).resolve(config)
    assert exported.forced_eos_token_id == source.forced_eos_token_id

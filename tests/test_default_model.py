"""The embedded default model: built on first use into BLENDERBOT_MB_HOME, atomically, and it gives the
corpus replies to corpus prompts (it memorizes the packaged dialogues)."""

from __future__ import annotations

import os
from importlib import resources

import pytest
from test_cli import default_model_folder
from typer.testing import CliRunner

from blenderbot_mb import default_model
from blenderbot_mb.cli import app
from blenderbot_mb.errors import CheckpointError

pytestmark = pytest.mark.slow  # builds a model (~5-30 s on 2 cores), once per session


def corpus():
    """(prompt, reply) pairs read straight from the packaged file: the expected outputs."""
    text = resources.files("blenderbot_mb").joinpath("data/dialogues.txt").read_text(encoding="utf-8")
    return [tuple(line.split("\t")) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("torch")
    return default_model_folder(tmp_path_factory)


@pytest.fixture
def home(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "blenderbot-mb-home"
    monkeypatch.setenv("BLENDERBOT_MB_HOME", str(path))
    return path


def test_built_in_home_with_tokenizer(built, home):
    assert os.path.dirname(built) == str(home)
    assert default_model.default_model_path(build=False) == built
    files = set(os.listdir(built))
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt"} <= files
    assert [f for f in os.listdir(home) if f.startswith(".")] == []  # no temp folder left behind


def test_greedy_replies_are_the_corpus_replies(built):
    import torch

    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    tokenizer = BlenderbotTokenizer.from_pretrained(built)
    model = BlenderbotForConditionalGeneration.from_pretrained(built)
    pairs = corpus()
    assert len(pairs) >= 20
    for prompt, reply in pairs[::3]:
        ids = build_conversation_ids(tokenizer, [prompt])
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), num_beams=1, do_sample=False)
        assert tokenizer.decode(out[0], skip_special_tokens=True).strip() == reply


def test_cli_uses_the_default_model(built, home):
    runner = CliRunner()
    prompt, reply = corpus()[4]
    result = runner.invoke(app, ["generate", prompt])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == reply
    result = runner.invoke(app, ["chat"], input=f"{corpus()[0][0]}\n/reset\n{prompt}\n")
    assert result.stdout.splitlines() == [corpus()[0][1], reply]
    result = runner.invoke(app, ["default-model"])
    assert result.exit_code == 0 and result.stdout.strip() == built


def test_not_built_without_permission(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENDERBOT_MB_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="default-model"):
        default_model.default_model_path(build=False)


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    """A build that fails half way leaves neither the cache folder nor its temporary folder."""
    monkeypatch.setenv("BLENDERBOT_MB_HOME", str(tmp_path))

    def half_build(folder, progress=True):
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{}")  # written before the weights: must never be seen under the real name
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "build_default_model", half_build)
    with pytest.raises(KeyboardInterrupt):
        default_model.default_model_path(progress=False)
    assert os.listdir(tmp_path) == []

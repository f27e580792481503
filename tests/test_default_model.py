"""The default model that ships inside the package: intact, loaded at once, the same replies on every
backend, and replies a user would accept (non-empty, no word repeated back to back)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil

import pytest
from typer.testing import CliRunner

from blenderbot_mb import default_model
from blenderbot_mb.cli import app
from blenderbot_mb.errors import CheckpointError

PROMPTS = ["Hello, how are you?", "What do you do for a living?", "Do you have any pets?",
           "Tell me about quantum physics.", "What's your favorite food?", "I'm feeling a bit tired today."]


def test_packaged_files_match_their_checksums_and_limits():
    folder = default_model.default_model_path()
    with open(os.path.join(folder, "SHA256SUMS")) as f:
        listed = dict(reversed(line.split()) for line in f if line.strip())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= set(listed)
    for name, digest in listed.items():
        with open(os.path.join(folder, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    assert os.path.getsize(os.path.join(folder, "model.safetensors")) <= 50 * 2**20  # ships inside the wheel


def test_a_damaged_copy_is_detected(tmp_path):
    copy = tmp_path / "default_model"
    shutil.copytree(default_model.packaged_folder(), copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="damaged"):
        default_model.verify(str(copy))
    os.remove(weights)
    with pytest.raises(CheckpointError, match="cannot be read"):
        default_model.verify(str(copy))


def test_default_model_command_prints_the_folder():
    result = CliRunner().invoke(app, ["default-model"])
    assert result.exit_code == 0
    assert result.output.strip() == default_model.packaged_folder()


def test_empty_message_is_one_clear_error():
    result = CliRunner().invoke(app, ["generate", "   "])
    assert result.exit_code == 2
    assert "empty" in result.output and "Traceback" not in result.output


def _words(text):
    return re.findall(r"[a-z']+", text.lower())


def test_replies_are_non_empty_and_never_repeat_a_word_back_to_back():
    torch = pytest.importorskip("torch")
    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    folder = default_model.default_model_path()
    tokenizer = BlenderbotTokenizer.from_pretrained(folder)
    model = BlenderbotForConditionalGeneration.from_pretrained(folder, dtype="float32").eval()
    for prompt in PROMPTS:
        ids = torch.tensor([build_conversation_ids(tokenizer, [prompt])])
        with torch.no_grad():
            reply = tokenizer.decode(model.generate(input_ids=ids)[0], skip_special_tokens=True).strip()
        words = _words(reply)
        assert len(words) >= 2, (prompt, reply)
        assert all(a != b for a, b in zip(words, words[1:], strict=False)), (prompt, reply)


def test_three_backends_give_the_same_greedy_replies():
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    pytest.importorskip("jax")
    import numpy as np
    import torch

    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    folder = default_model.default_model_path()
    tokenizer = BlenderbotTokenizer.from_pretrained(folder)
    rows = [build_conversation_ids(tokenizer, [p]) for p in PROMPTS[:3]]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows])
    mask = (np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int64)
    settings = dict(num_beams=1, max_new_tokens=12, min_length=0, no_repeat_ngram_size=0)
    pt = BlenderbotForConditionalGeneration.from_pretrained(folder, dtype="float32").eval()
    with torch.no_grad():
        expected = pt.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **settings).numpy()
    tf_out = TFBlenderbotForConditionalGeneration.from_pretrained(folder, dtype="float32").generate(
        input_ids=ids, attention_mask=mask, **settings)
    fx = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, dtype="float32")
    fx_out = fx.generate(ids, attention_mask=mask, **settings).sequences
    for got in (np.asarray(tf_out), np.asarray(fx_out)):
        n = min(got.shape[1], expected.shape[1])
        np.testing.assert_array_equal(got[:, :n], expected[:, :n])

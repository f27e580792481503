"""The `blenderbot-mb` command: replies equal the backend's own, chat keeps history, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint
from typer.testing import CliRunner

from blenderbot_mb import cli
from blenderbot_mb.cli import app

runner = CliRunner()
GENERATION = {"max_length": 12, "num_beams": 1}


@pytest.fixture(scope="module")
def checkpoint(tokenizer_folder, tmp_path_factory):
    """A tiny model with random weights and the test tokenizer (the vocabulary sets the embedding size)."""
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = make_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=128,
                         encoder_no_repeat_ngram_size=0)
    folder = tmp_path_factory.mktemp("cli-model")
    write_checkpoint(folder, config, random_weights(config, seed=7), generation=GENERATION, tokenizer=tokenizer)
    return str(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny trained model (the default model's recipe): random weights answer every prompt with the same
    repeated token, which could not tell a reply to the history from a reply to the last turn."""
    pytest.importorskip("torch")
    return default_model_folder(tmp_path_factory)


def default_model_folder(tmp_path_factory=None) -> str:
    """The default model that ships inside the package (checked against its SHA256SUMS)."""
    from blenderbot_mb.default_model import default_model_path

    return default_model_path()


def reference_reply(folder, turns, **settings) -> str:
    """The reply as a user of the PyTorch backend gets it, without the CLI (raw: leading space kept)."""
    torch = pytest.importorskip("torch")
    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    tokenizer = BlenderbotTokenizer.from_pretrained(folder)
    model = BlenderbotForConditionalGeneration.from_pretrained(folder)
    ids = build_conversation_ids(tokenizer, turns, max_length=128, keep_persona=True)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), **settings)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_generate_matches_backend(model):
    expected = reference_reply(model, ["Do you have any pets?"])
    assert len(expected.split()) >= 2  # a real reply, not an empty or one-token string
    result = runner.invoke(app, ["generate", "Do", "you", "have", "any", "pets?", "--model", model])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected.strip() + "\n"


def test_torch_decodes_with_packed_weights_on_the_cpu(model):
    """The CLI's float32 CPU models run the packed step (the replies above equal the model's forward's)."""
    from blenderbot_mb.cli import load_model

    assert load_model(model, "torch").decoding_options.packed
    assert not load_model(model, "torch", quantize="int8").decoding_options.packed


def test_generate_settings_reach_the_model(model):
    expected = reference_reply(model, ["Hello!", " Hi, how are you?", "Fine."], num_beams=3,
                               max_new_tokens=5, no_repeat_ngram_size=2)
    result = runner.invoke(app, ["generate", "Fine.", "--context", "Hello!", "--context", " Hi, how are you?",
                                 "--model", model, "--num-beams", "3", "--max-new-tokens", "5",
                                 "--no-repeat-ngram-size", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected.strip()
    assert len(expected.split()) <= 5


def test_generate_sampling_is_seeded(model):
    args = ["generate", "Hi!", "--model", model, "--do-sample", "--top-k", "50", "--temperature", "1.5"]
    expected = reference_reply(model, ["Hi!"], do_sample=True, top_k=50, temperature=1.5, seed=3)
    a = runner.invoke(app, [*args, "--seed", "3"])
    b = runner.invoke(app, [*args, "--seed", "3"])
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout == expected.strip() + "\n"


def test_chat_keeps_history_and_resets(model):
    first = reference_reply(model, ["Hello! How are you today?"])
    second = reference_reply(model, ["Hello! How are you today?", first, "I like to cook."])
    after_reset = reference_reply(model, ["I like to cook."])
    assert second != after_reset  # so the test tells a chat with history from one without
    stdin = "Hello! How are you today?\n\nI like to cook.\n/reset\nI like to cook.\n/quit\nnever read\n"
    result = runner.invoke(app, ["chat", "--model", model], input=stdin)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [first.strip(), second.strip(), after_reset.strip()]


def test_persona_lines(model):
    """--persona lines go before the turns as the library's system messages do (and as the server's persona),
    survive /reset, and change the reply; a persona line that is empty or of two lines is refused."""
    persona = [{"role": "system", "content": "I love cats."}, {"role": "system", "content": "I have two cats."}]
    question = {"role": "user", "content": "Do you have any pets?"}
    first = reference_reply(model, [*persona, question])
    with_none = reference_reply(model, [question])
    assert first != with_none  # the persona reaches the model
    result = runner.invoke(app, ["generate", "Do you have any pets?", "--persona", "I love cats.", "-p",
                                 "I have two cats.", "--model", model])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == first.strip()
    second = reference_reply(model, [*persona, question, {"role": "assistant", "content": first},
                                     {"role": "user", "content": "What are their names?"}])
    stdin = "Do you have any pets?\nWhat are their names?\n/reset\nDo you have any pets?\n"
    result = runner.invoke(app, ["chat", "-p", "I love cats.", "-p", "I have two cats.", "--model", model],
                           input=stdin)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [first.strip(), second.strip(), first.strip()]
    for bad in ("", "two\nlines"):
        result = runner.invoke(app, ["generate", "Hi", "--persona", bad, "--model", model])
        assert result.exit_code == 2 and "--persona 1 must be one non-empty line" in result.output


def test_chat_keeps_the_newest_turns(model):
    """Past 128 tokens the history is cut from the left: the reply is the one to the newest turns."""
    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(model)
    lines = [f"Turn number {i} is about my favorite music and the weather today." for i in range(12)]
    history = []
    for line in lines:
        history.append(line)
        history.append(reference_reply(model, history))
    assert len(tokenizer(" ".join(history))["input_ids"]) > 128
    assert len(build_conversation_ids(tokenizer, history[:-1], max_length=128)) == 128
    result = runner.invoke(app, ["chat", "--model", model], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [r.strip() for r in history[1::2]]


@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_generate_other_backends_agree(model, backend):
    module = pytest.importorskip(f"blenderbot_mb.{backend}")
    name = {"tf": "TFBlenderbotForConditionalGeneration", "flax": "FlaxBlenderbotForConditionalGeneration"}[backend]
    if not hasattr(module, name):
        pytest.skip(f"{backend} backend not available")
    expected = reference_reply(model, ["Do you have any pets?"])
    result = runner.invoke(app, ["generate", "Do you have any pets?", "--model", model, "--backend", backend])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected.strip()


def test_tf_command_prints_only_the_reply(model):
    """The command with --backend tf: the reply on stdout, and nothing on stderr (TensorFlow's import-time C++
    lines, such as the CUDA stub's on a machine without a GPU, are filtered out; see cli._import_tensorflow_quietly)."""
    pytest.importorskip("tensorflow")
    expected = reference_reply(model, ["Do you have any pets?"])
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "-m", "blenderbot_mb.cli", "generate", "Do you have any pets?", "--model", model,
                        "--backend", "tf"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected.strip() and r.stderr == ""


def test_flax_replies_keep_their_compiled_search(checkpoint, tmp_path):
    """The command line's Flax models keep XLA's compiles in <cache home>/jax (JAX's persistent compilation
    cache): the second reply loads what the first compiled, and gives the same text; damaged entries are
    compiled again. A folder the user gave JAX is kept."""
    pytest.importorskip("flax")
    env = {**os.environ, "BLENDERBOT_MB_HOME": str(tmp_path / "home"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "blenderbot_mb.cli", "generate", "Hello there", "--model", checkpoint,
               "--backend", "flax"]

    def reply(**extra):
        r = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**env, **extra})
        assert r.returncode == 0, r.stderr
        return r.stdout

    kept = tmp_path / "home" / "jax"
    first = reply()
    entries = sorted(os.listdir(kept))
    assert any(name.startswith("jit__run") for name in entries)  # the search
    assert reply() == first and sorted(os.listdir(kept)) == entries  # loaded, nothing compiled again
    for name in entries:  # a damaged entry is compiled again, with JAX's warning
        (kept / name).write_bytes(b"not a compiled search")
    assert reply() == first
    own = tmp_path / "own"
    assert reply(JAX_COMPILATION_CACHE_DIR=str(own)) == first
    assert any(name.startswith("jit__run") for name in os.listdir(own)) and sorted(os.listdir(kept)) == entries


def test_convert_command(checkpoint, tmp_path):
    from blenderbot_mb.checkpoint import read_weights
    from blenderbot_mb.config import BlenderbotConfig

    out = tmp_path / "sharded"
    result = runner.invoke(app, ["convert", checkpoint, str(out), "--to", "safetensors", "--max-shard-size", "50KB"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors.index.json" in os.listdir(out) and "vocab.json" in os.listdir(out)
    config = BlenderbotConfig.from_pretrained(checkpoint)
    a = read_weights(checkpoint, config, "BlenderbotForConditionalGeneration")
    b = read_weights(str(out), config, "BlenderbotForConditionalGeneration")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the converted folder answers as the original does
    result = runner.invoke(app, ["generate", "Hi!", "--model", str(out)])
    assert result.stdout.strip() == reference_reply(checkpoint, ["Hi!"]).strip()


def test_convert_parlai_needs_allow_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save({"model": {"embeddings.weight": torch.zeros(8, 4)}, "opt": {"variant": "prelayernorm"}}, path)
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "out"), "--from-parlai"])
    assert result.exit_code == 2
    assert "--allow-pickle" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # told from the file without the flag; --no-from-parlai reads it as a transformers checkpoint, which it is not
    guessed = runner.invoke(app, ["convert", str(path), str(tmp_path / "out")])
    assert guessed.exit_code == 2 and "--allow-pickle" in guessed.stderr
    refused = runner.invoke(app, ["convert", str(path), str(tmp_path / "out"), "--no-from-parlai", "--allow-pickle"])
    assert refused.exit_code == 2 and "is a file; pass the folder" in refused.stderr


def test_info(checkpoint):
    from blenderbot_mb.naming import tensor_names

    result = runner.invoke(app, ["info", checkpoint])
    assert result.exit_code == 0, result.output
    config = json.load(open(os.path.join(checkpoint, "config.json")))
    from blenderbot_mb.config import BlenderbotConfig

    shapes = tensor_names(BlenderbotConfig.from_dict(config))
    expected = sum(int(np.prod(s)) for n, s in shapes.items() if n != "final_logits_bias")
    assert f"parameters: {expected:,}" in result.stdout
    assert "model.safetensors" in result.stdout and f"d_model {config['d_model']}" in result.stdout
    assert "format: checkpoint (model.safetensors)" in result.stdout


# ---------------------------------------------------------------------- bad input: one line, exit code 2
def _broken(tmp_path, checkpoint, what):
    import shutil

    folder = tmp_path / what
    shutil.copytree(checkpoint, folder)
    if what == "config":
        (folder / "config.json").write_text('{"d_model": 16, "encoder_attention_heads": ')
    elif what == "truncated":
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(folder)


@pytest.mark.parametrize("what, words", [
    ("missing", "no model folder"), ("config", "not valid JSON"), ("truncated", "truncated"),
])
@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_bad_input_is_one_line_exit_2(checkpoint, tmp_path, what, words, command):
    if command == "info" and what == "truncated":
        pytest.skip("info reads no weights")
    folder = str(tmp_path / "nowhere") if what == "missing" else _broken(tmp_path, checkpoint, what)
    args = {"generate": ["generate", "Hi", "--model", folder], "chat": ["chat", "--model", folder],
            "info": ["info", folder]}[command]
    result = runner.invoke(app, args, input="Hi\n")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_console_script_bad_input(tmp_path):
    """The installed entry point (not just the typer app): exit code 2, one line, no traceback."""
    result = subprocess.run([sys.executable, "-m", "blenderbot_mb.cli", "convert", str(tmp_path / "none"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_cli_imports_no_framework():
    code = ("import sys, blenderbot_mb.cli, blenderbot_mb.convert, blenderbot_mb.default_model; "
            "print([m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args, words", [
    (["--device", "cpu"], "--device cuda"), (["--backend", "flax"], "torch backend"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_kernels_off_an_nvidia_gpu_is_one_line_exit_2(checkpoint, command, args, words):
    pytest.importorskip("torch")
    if "flax" in args:
        pytest.importorskip("flax")
    base = ["generate", "Hi", "--model", checkpoint] if command == "generate" else ["chat", "--model", checkpoint]
    result = runner.invoke(app, [*base, "--kernels", *args], input="Hi\n")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--kernels" in lines[0] and words in lines[0], result.stderr


def test_kernel_decoding_refuses_where_it_cannot_run_and_can_leave_the_search_eager(checkpoint):
    torch = pytest.importorskip("torch")
    from blenderbot_mb.errors import ConfigError, InputError
    from blenderbot_mb.serve.server import check_options
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration
    from blenderbot_mb.torch.decoding import DecodingOptions
    from blenderbot_mb.torch.generation import _compiled_search

    model = BlenderbotForConditionalGeneration.from_pretrained(checkpoint)
    with pytest.raises(ConfigError, match="this model is on cpu"):
        model.kernel_decoding()
    assert model.decoding_options == DecodingOptions()  # unchanged by the refusal
    cuda = torch.device("cuda")
    assert _compiled_search(DecodingOptions(fused=True, kernels=True), cuda)
    assert not _compiled_search(DecodingOptions(fused=True, kernels=True, compile_search=False), cuda)
    assert DecodingOptions(fused=True, kernels=True, compile_search=False).replace(compile=None).compile_search is False
    assert model.kernel_decoding(enabled=False).decoding_options == DecodingOptions()
    for bad in (dict(backend="flax"), dict(quantize="int8")):
        with pytest.raises(InputError, match="--kernels"):
            check_options(**bad, kernels=True)


def test_replies_without_a_seed_sample_afresh_in_every_backend():
    """Without --seed, every reply gets a fresh seed (Flax's generate() would take 0, its reference's default,
    and repeat the same sampled reply); with one, that seed."""
    from blenderbot_mb.cli import generate_ids

    seen = []

    class Model:
        def generate(self, input_ids, **settings):
            seen.append(settings["seed"])
            return input_ids

    for _ in range(3):
        generate_ids(Model(), "flax", [5, 2], do_sample=True)
    generate_ids(Model(), "flax", [5, 2], do_sample=True, seed=7)
    assert len(set(seen[:3])) == 3 and all(0 <= s < 2**64 for s in seen[:3]) and seen[3] == 7


def test_one_context_turn_is_the_bots(model):
    """The message is the user's whatever the number of --context turns: the turn before it is the bot's."""
    turns = [{"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Fine, thanks."}]
    expected = reference_reply(model, turns, num_beams=2, max_new_tokens=6)
    result = runner.invoke(app, ["generate", "Fine, thanks.", "--context", "Hello! How are you?", "--model", model,
                                 "--num-beams", "2", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected.strip()
    from blenderbot_mb.cli import Bot
    from blenderbot_mb.conversation import build_conversation_ids

    bot = Bot(model)
    assert bot.encode([t["content"] for t in turns]) == build_conversation_ids(bot.tokenizer, turns, max_length=128)
    # the roles show where a turn starts with a space: a bot's keeps it, a user's gets one more
    spaced = [{**turns[0], "content": " Hello! How are you?"}, turns[1]]
    ids = build_conversation_ids(bot.tokenizer, spaced, max_length=128)
    assert ids != build_conversation_ids(bot.tokenizer, [t["content"] for t in spaced], max_length=128)  # user first
    assert bot.encode([t["content"] for t in spaced]) == ids


def test_tensorflow_is_imported_quietly_where_a_command_uses_it(tmp_path):
    """The command's filter of TensorFlow's import noise covers a TF checkpoint verified as a source, too."""
    from blenderbot_mb.cli import _uses_tensorflow

    (tmp_path / "tf_model.h5").write_bytes(b"")
    assert _uses_tensorflow(["convert", str(tmp_path), "out", "--verify"])
    assert _uses_tensorflow(["generate", "--backend", "tf", "Hi"]) and _uses_tensorflow(["convert", "a", "b",
                                                                                         "--to", "savedmodel"])
    assert not _uses_tensorflow(["convert", str(tmp_path), "out"])  # not loaded by TF without --verify
    assert not _uses_tensorflow(["generate", "Hi"])


def test_a_reader_that_leaves_ends_the_command_quietly(checkpoint):
    """`... | head -1`: output to a closed pipe ends the command without an error line, with the code of a
    process ended by SIGPIPE (as `cat` gives; help text: click's 1)."""
    from helpers import CLI

    for argv, code in ((["generate", "Hi", "--model", checkpoint], 141), (["train", "--help"], 1)):  # (click's)
        proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader left before the command wrote
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == code and err == b"", (argv, err)


def test_sigterm_ends_chat_as_ctrl_c(checkpoint):
    """`kill` / `timeout` / `docker stop` send SIGTERM: chat and generate end as on Ctrl-C (docs/cli.md)."""
    import signal

    from helpers import CLI

    proc = subprocess.Popen([*CLI, "chat", "--model", checkpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(b"Hi!\n")
    proc.stdin.flush()
    assert proc.stdout.readline()  # a reply: the chat runs, waiting for the next line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.decode().splitlines()[-1:] == ["error: interrupted"], err


def test_chat_at_a_terminal_edits_and_recalls_lines(checkpoint):
    """At a terminal, chat reads lines with readline's editing: the left arrow moves within the line ("/rest",
    left, "e" is /reset) and the up arrow recalls the previous line (/help again); Ctrl-D ends the chat."""
    import pty
    import select

    from helpers import CLI

    main, sub = pty.openpty()
    proc = subprocess.Popen([*CLI, "chat", "--model", checkpoint], stdin=sub, stdout=sub, stderr=sub,
                            env={**os.environ, "TERM": "xterm"}, start_new_session=True)
    os.close(sub)
    seen = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while seen.count(marker) < count and time.monotonic() < deadline:
            if select.select([main], [], [], 1)[0]:
                try:
                    seen += os.read(main, 4096)
                except OSError:  # the process closed the terminal
                    break
        assert seen.count(marker) >= count, seen[-2000:]

    try:
        for i, keys in enumerate((b"/rest\x1b[De\r", b"/help\r", b"\x1b[A\r", b"\x04")):
            read_until(b"you> ", i + 1)
            os.write(main, keys)
        assert proc.wait(timeout=60) == 0, seen[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    text = seen.decode(errors="replace")
    assert text.count("(history cleared)") == 1, text
    assert text.count(cli.CHAT_COMMANDS) == 3, text  # at the start, then /help typed and recalled
    assert "unknown command" not in text


def test_chat_refuses_unknown_commands_and_sends_doubled_slashes(model):
    """A /word chat does not know is one error line (not a message to the model), the chat goes on and exits 2;
    `//text` sends "/text"."""
    want = reference_reply(model, ["/shrug"])
    result = runner.invoke(app, ["chat", "--model", model], input="/shurg\n//shrug\n")
    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines() == [want.strip()]
    assert "error: unknown command /shurg; /help lists the commands" in result.stderr


def test_python_dash_m_runs_the_command():
    """`python -m blenderbot_mb` is the `blenderbot-mb` command (its name in the help, its exit codes)."""
    from blenderbot_mb import __version__

    done = subprocess.run([sys.executable, "-m", "blenderbot_mb", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith(__version__), done
    done = subprocess.run([sys.executable, "-m", "blenderbot_mb", "generate", "--bogus"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: No such option: --bogus\n", done
    done = subprocess.run([sys.executable, "-m", "blenderbot_mb", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.startswith("Usage: blenderbot-mb "), done.stdout[:200]

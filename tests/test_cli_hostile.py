"""Hostile input through the `blenderbot-mb` command: every case exits with code 2, prints exactly one line on
stderr (no traceback) and writes nothing, neither into the model folder nor the working or cache folders.

The cases run in-process through `cli.main` (the console script's own entry point, usage errors included);
test_cli.py runs the installed script in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import pytest
from helpers import make_config, random_weights, write_checkpoint

from blenderbot_mb import cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_folder(tokenizer_folder, tmp_path_factory):
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = make_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=128,
                         encoder_no_repeat_ngram_size=0)
    folder = tmp_path_factory.mktemp("hostile-model")
    write_checkpoint(folder, config, random_weights(config, seed=3), generation={"max_length": 6},
                     tokenizer=tokenizer)
    return folder


def _json_edit(name, **changes):
    def edit(folder):
        path = folder / name
        data = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**data, **changes}))
    return edit


def _write(name, content: bytes | str):
    def edit(folder):
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def _folder_instead(name):
    def edit(folder):
        (folder / name).unlink()
        (folder / name).mkdir()
    return edit


def _without_tokenizer_json(then):
    def edit(folder):
        (folder / "tokenizer.json").unlink()
        then(folder)
    return edit


def _int_weights(folder):
    from safetensors.numpy import load_file

    config = make_config("tiny", vocab_size=json.loads((folder / "config.json").read_text())["vocab_size"],
                         max_position_embeddings=128, encoder_no_repeat_ngram_size=0)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.encoder.layer_norm.weight"] = weights["model.encoder.layer_norm.weight"].astype("int32")
    (folder / "model.safetensors").unlink()
    write_checkpoint(folder, config, weights)


HI = ["generate", "Hi", "--model", "{model}"]
TRAIN = ["train", "--data", "{model}/d.tsv", "--out", "{model}/run", "--model", "{model}", "--no-progress"]
DATA = _write("d.tsv", "Hi!\tHello.\nBye.\tSee you.\n")
# name: (arguments, stdin bytes, a change to a copy of the model folder, words the error line holds)
CASES = {
    "argument not UTF-8": (["generate", "caf\udce9", "--model", "{model}"], b"", None, "not valid text"),
    "context not UTF-8": ([*HI, "--context", "\udcff"], b"", None, "--context 1 is not valid text"),
    "message too long": (["generate", "x" * 100_001, "--model", "{model}"], b"", None, "above the limit"),
    "device banana": ([*HI, "--device", "banana"], b"", None, "unknown device 'banana'"),
    "device meta": ([*HI, "--device", "meta"], b"", None, "device 'meta' holds no weights"),
    "device for tf": ([*HI, "--backend", "tf", "--device", "cpu"], b"", None, "--device is for the torch"),
    "backend banana": ([*HI, "--backend", "banana"], b"", None, "'--backend'"),
    "beams not a number": ([*HI, "--num-beams", "abc"], b"", None, "'--num-beams'"),
    "a million beams": ([*HI, "--num-beams", "1000000"], b"", None, "--num-beams is 1000000, above the limit"),
    "huge n-gram": ([*HI, "--no-repeat-ngram-size", "10000000"], b"", None, "above the limit of 64"),
    "no new tokens": ([*HI, "--max-new-tokens", "0"], b"", None, "--max-new-tokens must be an integer >= 1"),
    "NaN temperature": ([*HI, "--do-sample", "--temperature", "nan"], b"", None, "finite"),
    "seed too large": ([*HI, "--do-sample", "--seed", str(2**70)], b"", None, "'--seed'"),
    "unknown command": (["banana"], b"", None, "No such command"),
    "missing argument": (["generate"], b"", None, "Missing argument"),
    "model is a file": (["generate", "Hi", "--model", "{model}/config.json"], b"", None, "is a file"),
    "model missing": (["generate", "Hi", "--model", "{model}/nothing"], b"", None, "nothing"),
    "scale_embedding 'false'": (HI, b"", _json_edit("config.json", scale_embedding="false"),
                                "'scale_embedding' must be a boolean"),
    "a million layers": (HI, b"", _json_edit("config.json", encoder_layers=1_000_000),
                         "'encoder_layers' is 1000000, above the limit of 256"),
    "huge encoder n-gram in config": (HI, b"", _json_edit("config.json", encoder_no_repeat_ngram_size=10**12),
                                      "'encoder_no_repeat_ngram_size'"),
    "do_sample 'false'": (HI, b"", _json_edit("generation_config.json", do_sample="false"),
                          "'do_sample' must be a boolean"),
    "max_length 1": (HI, b"", _json_edit("generation_config.json", max_length=1), "max_length 1 leaves no room"),
    "5000-digit integer": (HI, b"", _write("config.json", '{"d_model": ' + "9" * 5000 + "}"), "config.json"),
    "deeply nested config": (HI, b"", _write("config.json", "[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "config.json a folder": (HI, b"", _folder_instead("config.json"), "config.json"),
    "config.json not UTF-8": (HI, b"", _write("config.json", b"\xff\xfe{}"), "not valid JSON"),
    "integer weights": (HI, b"", _int_weights, "weights must be floating point"),
    "tokenizer.json garbage": (HI, b"", _write("tokenizer.json", "garbage"), "cannot read the tokenizer"),
    "tokenizer.json binary": (HI, b"", _write("tokenizer.json", bytes(range(256))), "cannot read the tokenizer"),
    "vocab.json garbage": (HI, b"", _without_tokenizer_json(_write("vocab.json", '{"a": ')),
                           "cannot read the tokenizer"),
    "vocab.json a list": (HI, b"", _without_tokenizer_json(_write("vocab.json", "[1, 2]")),
                          "cannot read the tokenizer"),
    "tokenizer_config a list": (HI, b"", _write("tokenizer_config.json", "[1]"), "must hold a JSON object"),
    "tokenizer_config not UTF-8": (HI, b"", _write("tokenizer_config.json", b"\xff"), "not valid JSON"),
    "add_prefix_space 'false'": (HI, b"", _json_edit("tokenizer_config.json", add_prefix_space="false"),
                                 "'add_prefix_space' must be a boolean"),
    "model_max_length 'big'": (HI, b"", _json_edit("tokenizer_config.json", model_max_length="big"),
                               "'model_max_length'"),
    "errors handler unknown": (HI, b"", _json_edit("tokenizer_config.json", errors="banana"), "'errors'"),
    "eos_token a number": (HI, b"", _json_edit("tokenizer_config.json", eos_token=5), "'eos_token'"),
    "chat line not UTF-8": (["chat", "--model", "{model}"], b"\xff\xfe\n", None, "not UTF-8"),
    "chat line of 1 MB": (["chat", "--model", "{model}"], b"y" * 1_000_000 + b"\n", None, "longer than a turn"),
    "chat with no beams": (["chat", "--model", "{model}", "--num-beams", "0"], b"Hi\n", None, "--num-beams must be"),
    "info of a bad config": (["info", "{model}"], b"", _json_edit("config.json", d_model=-1), "'d_model'"),
    "train batch size 0": ([*TRAIN, "--batch-size", "0"], b"", DATA, "--batch-size and --grad-accum must be at least 1"),
    "train eval without data": ([*TRAIN, "--eval-every", "2"], b"", DATA, "--eval-every needs --eval-data"),
    "train on device banana": ([*TRAIN, "--device", "banana"], b"", DATA, "--device banana: not available"),
    "train tf on a device": ([*TRAIN, "--backend", "tf", "--device", "cuda:0"], b"", DATA,
                             "--device is a PyTorch option (--backend torch)"),
    "train flax compiled": ([*TRAIN, "--backend", "flax", "--compile", "--cuda-graphs"], b"", DATA,
                            "--compile and --cuda-graphs are PyTorch options"),
    "train on an absent GPU": ([*TRAIN, "--device", "cuda:99"], b"", DATA, "--device cuda:99: not available"),
    "convert below a file": (["convert", "{model}", "{model}/config.json/out"], b"", None, "config.json"),
    "convert into a file": (["convert", "{model}", "{model}/config.json"], b"", None, "config.json"),
    # settings in the options' own words
    "no beams": (["generate", "Hi", "--model", "{model}", "--num-beams", "0"], b"", None,
                 "--num-beams must be an integer >= 1"),
    "a reply past the positions": (["generate", "Hi", "--model", "{model}", "--max-new-tokens", "300"], b"", None,
                                   "--max-new-tokens: at most 127 for this model"),
    "a Windows path": (["generate", "Hi", "--model", "C:\\Users\\me\\model"], b"", None,
                       "no model folder at C:\\Users\\me\\model"),
}


def _snapshot(*folders) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in f.rglob("*")}


def run_cli(argv, stdin: bytes, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_one_line_exit_2(case, model_folder, tmp_path, monkeypatch, capsys):
    argv, stdin, edit, words = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    if edit is not None:
        edit(folder)
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("BLENDERBOT_MB_HOME", str(home))
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    code, out, err = run_cli([a.replace("{model}", str(folder)) for a in argv], stdin, monkeypatch, capsys)
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:2000]
    assert words in lines[0], lines[0]
    assert "Traceback" not in err and len(lines[0]) <= 1100
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


def test_unfeasible_lengths_are_one_warning_line(model_folder, monkeypatch, capsys):
    """--min-length above what --max-new-tokens allows: the reply stops at the maximum (the reference's rule,
    checked by its length in tokens), with the reference's warning as one `warning:` line."""
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    code, out, err = run_cli(["generate", "Hi", "--model", str(model_folder), "--min-length", "30",
                              "--max-new-tokens", "3", "--num-beams", "1"], b"", monkeypatch, capsys)
    assert code == 0, err
    assert err.splitlines() == [err.strip()] and err.startswith("warning: Unfeasible length constraints: min_length "
                                                                "(30) is larger than the maximum possible length (4)")
    ids = BlenderbotTokenizer.from_pretrained(str(model_folder))(out.strip())["input_ids"]
    assert 1 <= len(ids) - 1 <= 3  # no more than 3 tokens (less the tokenizer's closing </s>)


def test_warmup_past_the_run_is_one_warning_line(model_folder, tmp_path, monkeypatch, capsys):
    """--warmup at or above the run's updates trains at a fraction of --lr throughout: one `warning:` line."""
    (tmp_path / "d.tsv").write_text("Hi!\tHello.\nBye.\tSee you.\n")
    code, out, err = run_cli(["train", "--data", str(tmp_path / "d.tsv"), "--out", str(tmp_path / "run"), "--model",
                              str(model_folder), "--no-progress", "--max-steps", "2", "--warmup", "5"], b"",
                             monkeypatch, capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: --warmup 5 is not below the run's 2 updates: the learning rate never reaches --lr "
                      "(update n trains at lr * n / 5, the first at 0)"]
    import json

    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"lr"' in line]
    assert lrs == pytest.approx([0.0, 5e-5 / 5])  # --lr's default 5e-5, n / 5 of it


def test_chat_survives_every_byte(model_folder, monkeypatch, capsys):
    """Every byte value on stdin: lines that are UTF-8 (control characters, NUL, typed special tokens)
    get a reply; the others get one error line each; the chat goes on to the end."""
    good = [bytes(range(1, 10)) + b"\x0b\x0c" + bytes(range(14, 128)), b"\x00 <mask> </s> <s> <pad> <unk>",
            "caf\u00e9 \U0001f600 \u202e".encode()]
    bad = [bytes(range(128, 256)), b"\xc3", b"ok \xed\xa0\x80"]  # high bytes, a cut sequence, a surrogate
    stdin = b"\n".join([good[0], bad[0], good[1], bad[1], good[2], bad[2]]) + b"\n"
    code, out, err = run_cli(["chat", "--model", str(model_folder)], stdin, monkeypatch, capsys)
    assert code == 2
    assert len(out.splitlines()) == len(good)
    assert len(err.splitlines()) == len(bad) and "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folders(model_folder, tmp_path, monkeypatch, capsys):
    """A read-only destination (and a read-only cache folder, where the write lock would go)."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    monkeypatch.setenv("BLENDERBOT_MB_HOME", str(parent / "cache"))
    parent.chmod(0o500)
    try:
        code, out, err = run_cli(["convert", str(model_folder), str(parent / "out")], b"", monkeypatch, capsys)
    finally:
        parent.chmod(0o700)
    assert code == 2 and len(err.splitlines()) == 1 and "Permission denied" in err, err
    assert list(parent.iterdir()) == []


def test_help_version_and_sampling_options_without_sampling(model_folder, monkeypatch, capsys):
    from importlib.metadata import version

    code, out, err = run_cli(["-h"], b"", monkeypatch, capsys)
    assert code == 0 and out.startswith("Usage:") and "--version" in out and not err
    code, out, err = run_cli(["--version"], b"", monkeypatch, capsys)
    assert code == 0 and out == f"blenderbot-mb {version('blenderbot-mb')}\n"
    code, out, err = run_cli(["train", "-h"], b"", monkeypatch, capsys)  # (no option name cut at 80 columns)
    assert code == 0 and "--gradient-checkpointing" in out and "--skip-bad-lines" in out and "\u2026" not in out
    plain = run_cli(["generate", "Hi", "--model", str(model_folder)], b"", monkeypatch, capsys)
    code, out, err = run_cli(["generate", "Hi", "--model", str(model_folder), "--temperature", "1.5", "--top-k", "3"],
                             b"", monkeypatch, capsys)
    assert (code, out) == plain[:2]  # greedy all the same (the model's settings do not sample)
    assert err == "warning: --temperature and --top-k apply only when sampling: add --do-sample\n"


def test_message_from_stdin_and_chat_commands(model_folder, monkeypatch, capsys):
    """`generate -` reads the message from stdin; chat's /help lists the commands, and a first line after a byte
    order mark (a file saved by a Windows editor) is a command like any other."""
    plain = run_cli(["generate", "Do you like cats?", "--model", str(model_folder)], b"", monkeypatch, capsys)
    piped = run_cli(["generate", "-", "--model", str(model_folder)], b"Do you like\ncats?\n", monkeypatch, capsys)
    assert piped == plain and plain[0] == 0
    code, out, err = run_cli(["chat", "--model", str(model_folder)], "\ufeff/help\r\n/quit\r\nHi!\r\n".encode(),
                             monkeypatch, capsys)
    assert code == 0 and out == "" and err == cli.CHAT_COMMANDS + "\n"


def test_empty_compile_cache_entries_are_dropped(tmp_path):
    """A compile cache entry a full disk cut short (0 bytes) is removed before JAX reads the folder (JAX warned
    on every later run and never wrote it again); the other entries stay."""
    (tmp_path / "cut").write_bytes(b"")
    (tmp_path / "whole").write_bytes(b"compiled")
    cli._drop_empty_entries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]


def test_a_missing_backend_names_the_installed_ones():
    import subprocess

    code = ("import sys; sys.modules['torch'] = None\n"
            "from blenderbot_mb._backends import require\n"
            "try:\n    require('torch')\nexcept Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "pip install 'blenderbot-mb[torch]'" in out and "installed here (tf, flax: --backend" in out, out

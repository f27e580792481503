"""The training rules of the core (schedules, weight decay, loss mask) against independent oracles, and the
PyTorch options that change how, not what, a step computes (gradient checkpointing, bf16), what a run reports
(progress bar, metrics file, TensorBoard) and processes that would start from different updates."""

import json
import math
import os
import re

import numpy as np
import pytest

from blenderbot_mb.naming import EMBEDDING, LINEAR, tensor_specs
from blenderbot_mb.training import IGNORE_INDEX, TrainingOptions, counted, decays, lr_schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_equals_optax(schedule):
    optax = pytest.importorskip("optax")
    lr, warmup, total = 3e-3, 4, 20
    decay = {"linear": optax.linear_schedule(lr, 0.0, total - warmup),
             "cosine": optax.cosine_decay_schedule(lr, total - warmup),
             "constant": optax.constant_schedule(lr)}[schedule]
    oracle = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    for step in range(total + 2):
        got = float(lr_schedule(step, lr=lr, warmup=warmup, total_steps=total, schedule=schedule))
        np.testing.assert_allclose(got, float(oracle(step)), rtol=1e-6, atol=1e-12, err_msg=str(step))


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    from helpers import make_config

    for spec in tensor_specs(make_config("odd")):
        assert decays(spec.name) == (spec.kind in (LINEAR, EMBEDDING)), spec.name
        flax_name = spec.name.replace(".", "/").replace("layer_norm/weight", "layer_norm/scale")
        assert decays(flax_name) == (spec.kind in (LINEAR, EMBEDDING)), flax_name


def test_loss_mask_and_options_are_checked():
    labels = np.array([[5, 0, IGNORE_INDEX]])
    assert counted(labels).tolist() == [[True, True, False]]  # pad (0) counts; only -100 is ignored
    for bad, match in [(dict(schedule="step"), "schedule"), (dict(precision="fp8"), "precision"),
                       (dict(model="a", preset="b"), "at most one"), (dict(merge=True), "--merge needs"),
                       (dict(label_smoothing=1.0), "label_smoothing"), (dict(epochs=0.5), "whole number"),
                       (dict(log_every=0), "log_every"), (dict(max_length=0), "max_length"),
                       (dict(max_length=-3), "max_length"), (dict(lr=float("inf")), "finite"),
                       (dict(lr=float("nan")), "lr"), (dict(lora_rank=2, lora_alpha=-1.0), "lora_alpha"),
                       (dict(eval_every=2), "eval_every needs eval_data")]:
        with pytest.raises(ValueError, match=match):
            TrainingOptions(data="d", out="o", **bad)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tokenizer_folder):
    torch = pytest.importorskip("torch")
    from helpers import make_config, random_weights, write_checkpoint

    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    folder = tmp_path_factory.mktemp("core")
    tok = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = make_config("tiny", vocab_size=len(tok), dropout=0.1)
    model = write_checkpoint(folder / "model", config, random_weights(config, seed=5), tokenizer=tok)
    data = folder / "d.tsv"
    data.write_text("Hi!\tHello there.\nDo you like cats?\tYes, very much.\nBye.\tSee you soon!\tTake care.\n")
    return torch, str(model), str(data)


def test_gradient_checkpointing_recomputes_and_makes_the_same_update(tmp_path, small_run):
    torch, model, data = small_run
    from safetensors.numpy import load_file

    from blenderbot_mb.torch import training

    calls = []
    real = training.enable_gradient_checkpointing

    def counting(m):  # count layer forwards: with checkpointing each layer runs again in the backward pass
        def counted_forward(forward):
            return lambda *args, **kwargs: (calls.append(1), forward(*args, **kwargs))[1]

        for layer in [*m.get_encoder().layers, *m.get_decoder().layers]:
            layer.forward = counted_forward(layer.forward)
        real(m)

    common = dict(data=data, model=model, max_steps=2, batch_size=2, lr=1e-2, progress=False)
    training.train(out=str(tmp_path / "plain"), **common)
    training.enable_gradient_checkpointing = counting
    try:
        training.train(out=str(tmp_path / "ckpt"), gradient_checkpointing=True, **common)
    finally:
        training.enable_gradient_checkpointing = real
    assert len(calls) == 2 * 2 * 4  # 2 steps x (forward + recompute) x 4 layers
    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("plain", "ckpt"))
    for name in a:  # dropout on: the recompute replays the same masks
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_follows_fp32(tmp_path, small_run, precision):
    torch, model, data = small_run
    from blenderbot_mb.torch.training import train

    common = dict(data=data, model=model, max_steps=4, batch_size=2, lr=1e-2, eval_data=data, progress=False,
                  device="cpu")
    runs = {p: train(out=str(tmp_path / p), precision=p, **common) for p in ("fp32", precision)}
    lines = {p: [json.loads(x) for x in open(tmp_path / p / "metrics.jsonl")] for p in runs}
    losses = {p: [x["loss"] for x in lines[p] if "loss" in x] for p in runs}
    assert len(losses[precision]) == 4 and runs[precision].steps == 4
    np.testing.assert_allclose(losses[precision], losses["fp32"], rtol=2e-2)  # 8 or 11 significant bits
    assert losses[precision] != losses["fp32"]  # it did compute in half precision
    assert runs[precision].eval_loss == pytest.approx(runs["fp32"].eval_loss, rel=2e-2)
    state = json.load(open(os.path.join(runs[precision].checkpoint, "trainer_state.json")))
    assert (state["optimizer"].get("scaler") is not None) == (precision == "fp16")  # resumes with its scale


def test_processes_that_would_start_from_different_updates_stop(tmp_path, small_run):
    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.trainer import prepare_run

    _, model, data = small_run
    run = prepare_run(data=data, out=str(tmp_path / "run"), model=model, progress=False)

    class OtherResumes:  # rank 0 of 2; rank 1 found checkpoint-4 in its --out
        rank, world_size, framework = 0, 2, "numpy"

        def all_sum(self, values):
            return values + np.array([0, 4])

    with pytest.raises(ConfigError, match=r"different updates \(0, 4, by rank\)"):
        run.fit(OtherResumes())
    assert not (tmp_path / "run").exists()  # stopped before writing anything


def test_progress_bar_metrics_file_and_tensorboard_agree(tmp_path, small_run, capsys):
    _, model, data = small_run
    from blenderbot_mb.torch.training import train

    train(data=data, out=str(tmp_path / "run"), model=model, max_steps=3, batch_size=2, lr=1e-2, warmup=1,
          eval_data=data, eval_every=2, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    # tqdm: updates done / total, elapsed<ETA, and the postfix: loss, tokens/s, lr
    assert re.search(r"3/3 \[[\d:]+<[\d:]+, .*loss=[\d.]+, tok/s=[\d,]+, lr=[\d.e+-]+\]", bar), bar
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    updates = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in updates] == [1, 2, 3] and [x["step"] for x in evals] == [2, 3]
    assert updates[0]["lr"] == 0.0 and updates[1]["lr"] > 0  # warmup from 0
    assert all(x["tokens_per_s"] > 0 and x["grad_norm"] > 0 for x in updates)
    for x in evals:
        assert x["eval_perplexity"] == pytest.approx(math.exp(x["eval_loss"]))
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for tag, records in (("loss", updates), ("lr", updates), ("eval_perplexity", evals)):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(x["step"], pytest.approx(x[tag], rel=1e-6)) for x in records], tag


def test_a_new_model_from_a_config_with_a_given_or_learned_tokenizer(tmp_path, small_run, tokenizer_folder):
    _, _, data = small_run
    from helpers import make_config
    from safetensors.numpy import load_file

    from blenderbot_mb import BlenderbotConfig
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch.training import train

    config = tmp_path / "config.json"
    config.write_text(make_config("tiny", vocab_size=50).to_json_string())  # the vocabulary follows the tokenizer
    common = dict(data=data, config=str(config), max_steps=2, batch_size=2, lr=1e-2, progress=False)
    runs = {name: train(out=str(tmp_path / name), tokenizer=tokenizer_folder, seed=seed, **common)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    given = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    assert BlenderbotConfig.from_pretrained(runs["a"].model).vocab_size == len(given)
    assert BlenderbotTokenizer.from_pretrained(runs["a"].model).get_vocab() == given.get_vocab()
    a, b, c = (load_file(os.path.join(runs[n].model, "model.safetensors")) for n in "abc")
    assert a["model.shared.weight"].shape == (len(given), 16)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the initialization is seeded
    assert not np.array_equal(a["model.shared.weight"], c["model.shared.weight"])
    # without --tokenizer: a byte-level BPE learned from the data, at most --tokenizer-vocab tokens
    learned = train(out=str(tmp_path / "d"), tokenizer_vocab=300, **common)
    tok = BlenderbotTokenizer.from_pretrained(learned.model)
    assert 256 + 4 < len(tok) <= 300 and len(tok) == BlenderbotConfig.from_pretrained(learned.model).vocab_size
    assert tok.decode(tok(" Do you like cats?")["input_ids"], skip_special_tokens=True) == " Do you like cats?"
    with pytest.raises(ValueError, match="--tokenizer is for a new model"):
        train(out=str(tmp_path / "e"), tokenizer=tokenizer_folder, **dict(common, config=None, model=runs["a"].model))


def test_lines_beyond_the_turn_limit_or_nested_too_deep_are_bad_lines(tmp_path):
    """Found in the first pass (file and line named, --skip-bad-lines skips them), not mid-run."""
    from blenderbot_mb.data import TrainingData
    from blenderbot_mb.errors import InputError
    from blenderbot_mb.validation import limit

    most = limit("turn_chars")
    good = json.dumps({"context": "Hi!", "reply": "Hello."})
    for bad, match in [(json.dumps({"context": "w" * (most + 1), "reply": "ok"}), "a turn has"),
                       (json.dumps({"context": "Hi", "reply": "x" * (most + 1)}), "the reply has"),
                       (json.dumps({"turns": ["a", "b" * (most + 1), "c"]}), "a turn has"),
                       (json.dumps({"persona": ["p" * (most + 1)], "context": "Hi", "reply": "ok"}), "persona"),
                       ("[" * 100_000, "nested too deeply")]:
        path = tmp_path / "d.jsonl"
        path.write_text(f"{good}\n{bad}\n{good}\n", encoding="utf-8")
        with pytest.raises(InputError, match=rf"d.jsonl, line 2.*{match}"):
            TrainingData(str(path))
        assert len(TrainingData(str(path), skip_bad_lines=True)) == 2


def _finished_run(tmp_path, small_run):
    from blenderbot_mb.torch.training import train

    _, model, data = small_run

    out = str(tmp_path / "run")
    result = train(TrainingOptions(data=data, out=out, model=model, max_steps=2, batch_size=2, progress=False))
    assert result.steps == 2 and result.loss is not None
    return model, data, out


def test_resume_checks_the_backend_the_step_and_a_finished_run(tmp_path, small_run):
    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.torch.training import train
    from blenderbot_mb.trainer import prepare_run

    model, data, out = _finished_run(tmp_path, small_run)
    options = dict(data=data, out=out, model=model, batch_size=2, progress=False, resume=True)
    for backend in ("tf", "flax"):  # refused before the framework loads
        with pytest.raises(ConfigError, match="written by the torch backend.*--backend torch"):
            prepare_run(backend=backend, max_steps=2, **options)
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    again = train(TrainingOptions(max_steps=2, **options))  # a retried job: nothing to do, nothing rewritten
    assert again.steps == 2 and again.loss is None
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
    with pytest.raises(ConfigError, match="past the 1 updates"):
        train(TrainingOptions(max_steps=1, **options))


def test_adapters_name_their_base_folder_absolutely(tmp_path, small_run, monkeypatch):
    from blenderbot_mb.torch.training import train

    _, model, data = small_run
    monkeypatch.chdir(os.path.dirname(model))
    out = tmp_path / "lora"
    train(TrainingOptions(data=data, out=str(out), model=os.path.basename(model), lora_rank=2, max_steps=1,
                          batch_size=2, progress=False))
    with open(out / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == model


def test_a_diverged_run_stops_with_an_error_and_writes_no_model(tmp_path, small_run):
    """A loss of nan or inf ends the run (exit 2 on the command line), not a model of nan weights."""
    from blenderbot_mb.errors import TrainingError
    from blenderbot_mb.torch.training import train

    _, model, data = small_run
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"diverged: the loss of update \d is nan.*checkpoint-1.*--lr"):
        train(TrainingOptions(data=data, out=str(out), model=model, max_steps=6, batch_size=2, lr=1e30,
                              max_grad_norm=None, save_every=1, keep_checkpoints=None, progress=False))
    assert not (out / "model").exists()
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert math.isnan(records[-1]["loss"]) and all(math.isfinite(x["loss"]) for x in records[:-1])
    assert not (out / f"checkpoint-{records[-1]['step']}").exists()  # no checkpoint of the diverged weights


def test_resume_rewinds_the_metrics_and_names_changed_options(tmp_path, small_run, caplog):
    """Updates logged after the last checkpoint of an interrupted run are trained again: their records go from
    metrics.jsonl and TensorBoard, so each update is logged once."""
    import shutil

    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.torch.training import train

    _, model, data = small_run
    out = tmp_path / "run"
    common = dict(data=data, out=str(out), model=model, max_steps=4, batch_size=2, lr=1e-2, progress=False)
    train(TrainingOptions(save_every=2, **common))
    shutil.rmtree(out / "checkpoint-4")  # as if killed after logging updates 3 and 4, before their checkpoint
    shutil.rmtree(out / "model")
    with caplog.at_level("WARNING", logger="blenderbot_mb.trainer"):
        train(TrainingOptions(**dict(common, lr=2e-2, resume=True)))
    assert "lr 0.02 (was 0.01)" in caplog.text and "batch" not in caplog.text
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    assert records[2]["lr"] == pytest.approx(2e-2 * 2 / 4)  # the resumed part's, at the new peak
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("lr")] == [(x["step"], x["lr"]) for x in records]
    caplog.clear()
    shutil.rmtree(out / "model")
    with caplog.at_level("WARNING", logger="blenderbot_mb.trainer"):
        train(TrainingOptions(**dict(common, max_steps=5, batch_size=1, grad_accum=2, lr=2e-2, resume=True)))
    assert "batch" not in caplog.text  # the same global batch, made of two micro-batches
    with pytest.raises(ConfigError, match="trained with no --lora-rank.*asks for --lora-rank 2"):
        train(TrainingOptions(**dict(common, max_steps=5, resume=True, lora_rank=2)))  # what it holds is fixed
    # the run's folder given as a model names the model inside it
    from blenderbot_mb.config import BlenderbotConfig

    with pytest.raises(ConfigError, match=f"{out} is a training run's folder, not a model: its model is {out}/model"):
        BlenderbotConfig.from_pretrained(str(out))
    caplog.clear()
    with caplog.at_level("WARNING", logger="blenderbot_mb.trainer"):  # a length above the positions is cut, said
        train(TrainingOptions(**dict(common, out=str(tmp_path / "long"), max_steps=1, max_length=500)))
    assert "--max-length 500 is above the model's" in caplog.text


def test_a_run_stopped_before_its_first_checkpoint_starts_over_with_resume(tmp_path, small_run):
    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.torch.training import train

    _, model, data = small_run
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    common = dict(data=data, out=str(out), model=model, max_steps=2, batch_size=2, progress=False)
    with pytest.raises(ConfigError, match="before its first checkpoint: --resume starts it over"):
        train(TrainingOptions(**common))
    train(TrainingOptions(resume=True, **common))
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it(tmp_path):
    from blenderbot_mb.data import TrainingData

    for name, text in (("d.jsonl", '{"context": "Hi!", "reply": "Hello."}\n{"context": "Yo", "reply": "Hey"}\n'),
                       ("d.tsv", "Hi!\tHello.\nYo\tHey\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        data = TrainingData(str(path))
        assert len(data) == 2 and data[0].context == ("Hi!",) and data[1].reply == "Hey"
        assert list(data.texts())[0] == "Hi!"


def test_options_are_written_as_the_command_line_writes_them():
    from blenderbot_mb.trainer import _option

    assert [_option("lora_rank", v) for v in (None, 0, 4)] == ["no --lora-rank", "--lora-rank 0", "--lora-rank 4"]
    assert [_option("lora_ffn", v) for v in (False, True)] == ["no --lora-ffn", "--lora-ffn"]


def test_a_process_stuck_in_native_code_ends_after_a_signal():
    """A multi-process run's process blocked in a collective does not come back to Python to raise
    KeyboardInterrupt: `end_if_stuck_after_a_signal` ends it with exit code 130 and its line once the grace
    has passed (here the main thread waits on a locked pthread mutex, which no signal interrupts)."""
    import signal
    import subprocess
    import sys
    import time

    code = """
import ctypes, signal, sys
from blenderbot_mb.trainer import end_if_stuck_after_a_signal
def interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, interrupt)
end_if_stuck_after_a_signal(lambda: "interrupted after 3 updates; stuck", grace=1.0)
libc = ctypes.CDLL(None)
mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER
libc.pthread_mutex_lock(mutex)
print("blocked", flush=True)
libc.pthread_mutex_lock(mutex)  # a default mutex locked twice: waits forever, in C
"""
    from helpers import ended

    with ended(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)) as proc:
        assert proc.stdout.readline() == "blocked\n"
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip().splitlines() == ["error: interrupted after 3 updates; stuck"], err
    assert 1.0 <= time.monotonic() - started < 10
    # disarmed (a run that ended without a signal), a later signal is the program's own business again
    code = code.replace('grace=1.0)', 'grace=1.0)()').replace("libc.pthread_mutex_lock(mutex)  #", "# ")
    code += "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('caught', flush=True)\n" \
            "time.sleep(3)\nprint('still here', flush=True)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "blocked\n"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.splitlines() == ["caught", "still here"], (out, err)

"""PyTorch training (`blenderbot_mb.torch.training.train`, the `train` command): a SIGKILLed run resumes to the
same fp32 weights, 2 gloo processes (DDP, FSDP2) make the same update as 1 process on the same global batch,
a run resumes at another process count (2 -> 1, and 1 -> 2 to the uninterrupted run's weights), gradient
accumulation equals a bigger batch, LoRA adapters merge exactly and load in peft, bad input fails before any
step."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import KERNELS_LANE, make_config, random_weights, run_check, start_check, write_checkpoint  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from blenderbot_mb.cli import app  # noqa: E402
from blenderbot_mb.tokenizer import BlenderbotTokenizer  # noqa: E402
from blenderbot_mb.torch.training import train  # noqa: E402
from blenderbot_mb.trainer import latest_checkpoint, read_state  # noqa: E402

LINES = [
    {"context": "Hi there!", "reply": "Hello, how are you today?"},
    {"turns": ["I like cats.", "Me too, they are great.", "Do you have one?", "Yes, a black one."]},
    {"context": ["What is your name?"], "reply": "I am a bot.", "persona": ["I am a bot."]},
    {"context": "Do you like music?", "reply": "Yes, I play the piano."},
    {"context": "Where do you live?", "reply": "In a small town by the sea."},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return str(path)  # 7 examples


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer_folder):
    """A tiny pretrained-style folder (random weights, the test tokenizer) to fine-tune."""
    return make_base(tmp_path_factory.mktemp("base"), tokenizer_folder, dropout=0.1)


def make_base(folder, tokenizer_folder, dropout):
    tok = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = make_config("tiny", vocab_size=len(tok), dropout=dropout)
    return write_checkpoint(folder, config, random_weights(config, seed=3), tokenizer=tok)


@pytest.fixture(scope="module")
def base_no_dropout(tmp_path_factory, base_model):
    """The same model without dropout: layouts that split a batch differently draw different masks."""
    folder = tmp_path_factory.mktemp("base-no-dropout")
    for name in os.listdir(base_model):
        if name == "config.json":
            config = json.load(open(os.path.join(base_model, name)))
            (folder / name).write_text(json.dumps(dict(config, dropout=0.0)))
        else:
            shutil.copy(os.path.join(base_model, name), folder / name)
    return str(folder)


def assert_same_update(a, b, atol):
    """Equal weights, except the attention key biases: softmax ignores them, so their true gradient is 0 and
    AdamW turns its float rounding noise into full-size steps whatever the batch layout."""
    for name in a:
        if not name.endswith("k_proj.bias"):
            np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


def weights(folder):
    """The weights of a model folder, or of a run's final model (DIR/model)."""
    if os.path.isdir(os.path.join(folder, "model")):
        folder = os.path.join(folder, "model")
    return load_file(os.path.join(folder, "model.safetensors"))


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


OPTIONS = dict(max_steps=6, batch_size=2, lr=3e-3, warmup=2, schedule="cosine", weight_decay=0.01,
               label_smoothing=0.1, save_every=2, progress=False, seed=7)


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, data, base_model):
    whole = train(data=data, out=str(tmp_path / "whole"), model=base_model, **OPTIONS)
    assert whole.steps == 6
    killed = tmp_path / "killed"
    code = (f"import os, signal, torch; torch.set_num_threads({torch.get_num_threads()})\n"
            "from blenderbot_mb.torch.training import train\n"
            "def kill(step, metrics):\n"
            "    if step == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"train(data={data!r}, out={str(killed)!r}, model={base_model!r}, callbacks=[kill], **{OPTIONS!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(os.listdir(killed)) == ["checkpoint-2", "metrics.jsonl", "tensorboard"]  # died after step 3
    resumed = train(data=data, out=str(killed), model=base_model, resume=True, **OPTIONS)
    assert resumed.steps == 6
    assert [m["step"] for m in metrics(killed) if "loss" in m] == [1, 2, 3, 4, 5, 6]  # update 3 once
    assert [m["loss"] for m in metrics(killed) if "loss" in m] == [m["loss"] for m in metrics(tmp_path / "whole")
                                                                   if "loss" in m]
    a, b, base = weights(tmp_path / "whole"), weights(killed), weights(base_model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert max(np.abs(a[n] - base[n]).max() for n in a if n != "final_logits_bias") > 1e-3  # it trained
    # a fresh run without --resume refuses the used folder instead of overwriting it
    with pytest.raises(Exception, match="not empty; pass --resume"):
        train(data=data, out=str(killed), model=base_model, **OPTIONS)


def test_ctrl_c_says_where_the_run_stopped_and_how_to_go_on(tmp_path, data, base_model):
    """Ctrl-C mid-run: exit code 130 and one line naming the updates done and the newest checkpoint, which
    --resume continues from."""
    import re
    import signal
    import time

    from helpers import CLI

    out = tmp_path / "out"
    from helpers import ended

    with ended(subprocess.Popen([*CLI, "train", "--data", data, "--out", str(out), "--model", base_model,
                                 "--max-steps", "100000", "--save-every", "2", "--batch-size", "2", "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) as proc:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-2").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    found = re.fullmatch(r"error: interrupted after (\d+) updates; (.+) holds the last checkpoint: the same command "
                         r"with --resume goes on from it", errors[-1] if errors else "")
    assert len(errors) == 1 and found, err
    newest = latest_checkpoint(str(out))
    assert found[2] == newest and read_state(newest)["step"] <= int(found[1]), (found[0], newest)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, data, base_no_dropout):
    """Two accumulated micro-batches make the update of one batch of both (compiled: the next test)."""
    common = dict(OPTIONS, max_steps=2, save_every=None, warmup=0)
    train(data=data, out=str(tmp_path / "big"), model=base_no_dropout, **dict(common, batch_size=4))
    train(data=data, out=str(tmp_path / "acc"), model=base_no_dropout, **dict(common, batch_size=2, grad_accum=2))
    assert_same_update(weights(tmp_path / "big"), weights(tmp_path / "acc"), atol=1e-5)


def compiled_model_check(folder, tokenizer_folder):
    """compile="model" on micro-batches of 10 shapes (more than torch.compile's 8 per code object, past which a
    static fullgraph compile fails), two accumulated a step (torch.compile has no DDP no_sync of its own): the
    eager run's weights."""
    folder = pathlib.Path(folder)
    base = make_base(folder / "base", tokenizer_folder, dropout=0.0)
    words = "the cat sat on a mat and looked at birds in the garden all day".split()
    path = folder / "shapes.jsonl"
    path.write_text("".join(json.dumps({"context": " ".join(words[:n]), "reply": " ".join(words[:n % 4 + 1])})
                            + "\n" for n in range(1, 11)))
    common = dict(OPTIONS, max_steps=5, batch_size=1, grad_accum=2, save_every=None, warmup=0)
    train(data=str(path), out=str(folder / "eager"), model=base, **common)
    # dynamic shapes from the first compile: a static compile first, then the dynamic one, takes ~2x as long
    # on a CPU (a regression to dynamic=False still fails here, past the 8 shapes)
    with torch._dynamo.config.patch(assume_static_by_default=False):
        train(data=str(path), out=str(folder / "compiled"), model=base, compile="model", **common)
    assert_same_update(weights(folder / "eager"), weights(folder / "compiled"), atol=1e-5)


def test_compiled_model_trains_on_batches_of_many_shapes():
    """(compiled_model_check, in a process of its own started early in the kernels' lane: helpers.run_check)"""
    start_check("test_train_torch:compiled_model_check", lane=KERNELS_LANE)
    run_check("test_train_torch:compiled_model_check")


test_compiled_model_trains_on_batches_of_many_shapes.early = partial(
    start_check, "test_train_torch:compiled_model_check", lane=KERNELS_LANE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(**kwargs)


def _spawn(world, **kwargs):
    torch.multiprocessing.start_processes(_worker, args=(world, _free_port(), kwargs), nprocs=world,
                                          start_method="spawn")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_make_the_same_update_as_one(tmp_path, data, base_no_dropout, fsdp):
    common = dict(data=data, model=base_no_dropout, max_steps=3, lr=1e-2, warmup=0, schedule="constant",
                  weight_decay=0.01, progress=False, seed=1)
    train(out=str(tmp_path / "one"), batch_size=4, **common)
    _spawn(2, out=str(tmp_path / "two"), batch_size=2, fsdp=fsdp, **common)
    assert_same_update(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
    losses = [m["loss"] for m in metrics(tmp_path / "two") if "loss" in m]
    one = [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m]
    np.testing.assert_allclose(losses, one, rtol=1e-5)
    assert losses[-1] < losses[0]
    # the 2-process run resumes in 1 process (full optimizer state, position counted in examples:
    # 7 examples, 4 per update -> epoch 0 ends after update 2, epoch 1 after update 4)
    result = train(out=str(tmp_path / "two"), batch_size=4, resume=True, **dict(common, max_steps=5))
    state = json.load(open(tmp_path / "two" / "checkpoint-5" / "trainer_state.json"))
    assert result.steps == 5 and state["world_size"] == 1 and (state["epoch"], state["position"]) == (2, 4)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_one_process_run_resumes_in_two_to_the_uninterrupted_weights(tmp_path, data, base_no_dropout, fsdp):
    # cosine with warmup over 5 updates of 4 examples (7 examples: epochs end after updates 2 and 4, each
    # last batch with one empty row); the run stops after update 3 and resumes from checkpoint-2
    common = dict(data=data, model=base_no_dropout, max_steps=5, lr=1e-2, warmup=1, schedule="cosine",
                  weight_decay=0.01, save_every=2, progress=False, seed=1)
    train(out=str(tmp_path / "whole"), batch_size=4, **common)

    class Stopped(Exception):
        pass

    def stop(step, metrics):
        if step == 3:
            raise Stopped

    with pytest.raises(Stopped):
        train(out=str(tmp_path / "run"), batch_size=4, callbacks=[stop], **common)
    assert read_state(latest_checkpoint(str(tmp_path / "run")))["world_size"] == 1
    _spawn(2, out=str(tmp_path / "run"), batch_size=2, fsdp=fsdp, resume=True, **common)
    assert_same_update(weights(tmp_path / "whole"), weights(tmp_path / "run"), atol=1e-5)
    logged = [(m["step"], m["loss"], m["lr"]) for m in metrics(tmp_path / "run") if "loss" in m]
    whole = [(m["step"], m["loss"], m["lr"]) for m in metrics(tmp_path / "whole") if "loss" in m]
    assert [s for s, _, _ in logged] == [1, 2, 3, 4, 5]  # update 3, logged before the stop, logged once
    np.testing.assert_allclose(np.array(logged), np.array(whole), rtol=1e-5)
    state = read_state(str(tmp_path / "run" / "checkpoint-5"))
    assert state["world_size"] == 2 and (state["epoch"], state["position"]) == (2, 4)


def test_lora_adapters_merge_exactly_and_load_in_peft(tmp_path, data, base_model):
    from blenderbot_mb import lora as lora_files
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration
    from blenderbot_mb.torch.lora import add_lora, load_adapters

    out = tmp_path / "lora"
    train(data=data, out=str(out), model=base_model, max_steps=3, batch_size=2, lr=1e-2, lora_rank=4, lora_alpha=8,
          merge=True, progress=False)
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint-3", "merged", "metrics.jsonl", "tensorboard"]
    adapters, config = lora_files.read_adapters(str(out / "adapter"))
    assert config["r"] == 4 and config["task_type"] == "SEQ_2_SEQ_LM" and len(adapters) == 2 * 4 + 2 * 4 * 2
    assert any(np.abs(b).max() > 0 for _, b in adapters.values())  # B starts at zero: it trained
    result = CliRunner().invoke(app, ["merge-lora", str(out / "adapter"), str(tmp_path / "cli-merged"), "--base", base_model])
    assert result.exit_code == 0, result.output
    for command in (["info", str(out / "adapter")], ["generate", "Hi", "--model", str(out / "adapter")]):
        refused = CliRunner().invoke(app, command)  # an adapter folder is named as one, with what to do
        assert refused.exit_code == 2 and "holds LoRA adapters" in refused.output and "merge-lora" in refused.output
    # base + adapters (our LoRA layers) == merged model (the CLI's and the run's --merge)
    ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 2, 0]])
    mask = (ids != 0).long()
    dec = torch.tensor([[1, 12, 13], [1, 14, 15]])
    model = BlenderbotForConditionalGeneration.from_pretrained(base_model)
    add_lora(model, rank=4, alpha=8)
    load_adapters(model, adapters)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for folder in (tmp_path / "cli-merged", out / "merged"):
            merged = BlenderbotForConditionalGeneration.from_pretrained(folder)
            got = merged(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    base = BlenderbotForConditionalGeneration.from_pretrained(base_model)
    with torch.no_grad():
        assert (base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits - expected).abs().max() > 1e-4
    # the same adapter files in the peft library, on transformers' own model
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BlenderbotForConditionalGeneration.from_pretrained(base_model).eval()
    wrapped = peft.PeftModel.from_pretrained(hf, str(out / "adapter")).eval()
    with torch.no_grad():
        got = wrapped(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_cli_bad_line_fails_before_any_step_and_can_be_skipped(tmp_path, data, base_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(data).read() + '{"context": "no reply"}\n')
    out = tmp_path / "out"
    args = ["train", "--data", str(bad), "--out", str(out), "--model", base_model, "--max-steps", "1",
            "--batch-size", "2", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"{bad}, line 6" in result.output and not out.exists()
    result = CliRunner().invoke(app, [*args, "--skip-bad-lines"])
    assert result.exit_code == 0, result.output
    assert metrics(out)[0] == {"step": 0, "skipped_bad_lines": 1}
    # (the `data` fixture's 7 examples: LINES, its dialogue of 4 turns giving 3)
    assert "trained 1 step on 7 examples (1 malformed line skipped); loss" in result.output
    assert BlenderbotTokenizer.from_pretrained(str(out / "model")) is not None
    assert os.path.isfile(out / "model" / "model.safetensors")
    # the evaluation data's skipped lines apart, in the metrics file and the summary; the evaluation's line is
    # printed without a progress bar too
    again = tmp_path / "again"
    result = CliRunner().invoke(app, [*args[:4], str(again), *args[5:], "--skip-bad-lines", "--eval-data", str(bad)])
    assert result.exit_code == 0, result.output
    assert metrics(again)[0] == {"step": 0, "skipped_bad_lines": 1, "skipped_bad_eval_lines": 1}
    assert "(1 malformed line skipped; 1 malformed line skipped in the evaluation data)" in result.output
    assert "step 1 eval_loss " in result.output


def test_bad_label_ids_fail_on_the_host_before_the_device(tmp_path, data, base_model):
    from blenderbot_mb.errors import InputError
    from blenderbot_mb.torch.training import TorchEngine
    from blenderbot_mb.trainer import prepare_run

    engine = TorchEngine(prepare_run(data=data, out=str(tmp_path / "out"), model=base_model, batch_size=2))
    vocab = engine.model.config.vocab_size
    batch = {"input_ids": np.array([[5, 6, 2]]), "attention_mask": np.ones((1, 3), dtype=np.int64),
             "labels": np.array([[7, vocab, -100]])}
    with pytest.raises(InputError, match="labels"):
        engine.train_step([batch], lr=1e-3, step=0, global_tokens=2)


def test_loader_processes_feed_the_same_batches_as_the_thread(tmp_path, data, base_model):
    common = dict(data=data, model=base_model, max_steps=4, batch_size=2, lr=1e-2, progress=False, seed=5)
    train(out=str(tmp_path / "thread"), **common)
    train(out=str(tmp_path / "processes"), loader_workers=2, **common)  # 7 examples: epoch 1 starts at update 4
    a, b = weights(tmp_path / "thread"), weights(tmp_path / "processes")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [m["loss"] for m in metrics(tmp_path / "thread")] == [m["loss"] for m in metrics(tmp_path / "processes")]


def test_padding_to_one_shape_makes_the_same_update(tmp_path, data, base_no_dropout):
    """The graphed update's data path, run eagerly on CPU: micro-batches padded to a fixed shape (extra rows,
    columns on both sides) give the update of the unpadded ones (fp32), over accumulation and several steps."""
    from blenderbot_mb.data import pad_batch
    from blenderbot_mb.torch.training import GraphedUpdate, TorchEngine, token_loss_sum
    from blenderbot_mb.trainer import prepare_run
    from blenderbot_mb.training import IGNORE_INDEX

    def engine():
        return TorchEngine(prepare_run(data=data, out=str(tmp_path / "out"), model=base_no_dropout, batch_size=2,
                                       grad_accum=2, weight_decay=0.01, max_grad_norm=0.5))

    eager, padded = engine(), engine()
    run = eager.run
    graphed = GraphedUpdate(padded, rows=3, source_length=40, target_length=20, capture=False)
    for step, start in enumerate((0, 4, 2)):
        micro = run.micro_batches(run.data, np.arange(start, start + 4) % 7, 2, 1, 0)
        tokens = sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro)
        a = eager.train_step(micro, lr=1e-3, step=step, global_tokens=tokens)
        b = graphed(micro, lr=1e-3, step=step, global_tokens=tokens)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(b[key]), float(a[key]), rtol=1e-6)
    assert_same_update({n: p.detach().numpy() for n, p in padded.model.named_parameters()},
                       {n: p.detach().numpy() for n, p in eager.model.named_parameters()}, atol=1e-6)
    # the padded rows and columns count for nothing: oracle, the loss sum on the unpadded batch
    batch = micro[0]
    wide = pad_batch(batch, rows=4, source_length=30, target_length=25, pad_token_id=0)
    assert (wide["labels"][2:] == IGNORE_INDEX).all() and wide["attention_mask"][2:, 0].all()
    logits = torch.randn(4, 25, 9)
    labels = np.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % 9)
    wide_labels = pad_batch(dict(batch, labels=labels), 4, 30, 25, 0)["labels"]
    narrow = token_loss_sum(logits[:2, :labels.shape[1]], torch.from_numpy(labels))
    assert float(token_loss_sum(logits, torch.from_numpy(wide_labels))) == pytest.approx(float(narrow), rel=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(batch, rows=1, source_length=30, target_length=25, pad_token_id=0)


def test_cuda_graphs_say_clearly_where_they_do_not_apply(tmp_path, data, base_model):
    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.torch.training import check_cuda_graphs
    from blenderbot_mb.training import TrainingOptions

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "--data", data, "--out", str(out), "--model", base_model,
                                      "--max-steps", "1", "--no-progress", "--cuda-graphs", "--device", "cpu"])
    assert result.exit_code == 2 and "--cuda-graphs needs a CUDA device (this run is on cpu)" in result.output
    cuda = torch.device("cuda")
    for option, words in [(dict(fsdp=True), "not --fsdp"), (dict(precision="fp16"), "fp32 or bf16"),
                          (dict(gradient_checkpointing=True), "--gradient-checkpointing")]:
        with pytest.raises(ConfigError, match=words):
            check_cuda_graphs(TrainingOptions(data="-", out="-", cuda_graphs=True, **option), cuda)
    with pytest.raises(ConfigError, match="PyTorch option"):
        TrainingOptions(data="-", out="-", backend="flax", cuda_graphs=True)
    with pytest.raises(ConfigError, match="compile must be true, 'layers' or 'model', got 'all'"):
        TrainingOptions(data="-", out="-", compile="all")


def test_the_distributed_timeout_is_ten_minutes_or_the_environments(monkeypatch):
    """init_process_group's timeout: 600 s (PyTorch's 30 minutes left a process whose peer died at startup
    waiting that long), or $BLENDERBOT_MB_DIST_TIMEOUT; anything else than a positive number is refused."""
    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.torch.training import DIST_TIMEOUT_ENV, distributed_timeout

    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert distributed_timeout() == 600
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "42.5")
    assert distributed_timeout() == 42.5
    for bad in ("0", "-3", "ten", "nan"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=DIST_TIMEOUT_ENV):
            distributed_timeout()

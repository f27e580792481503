"""Shared test material for every backend: tiny configs, random weights (numpy, canonical names),
checkpoint folders, and the optional Hugging Face transformers oracle."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np

from blenderbot_mb import BlenderbotConfig, GenerationConfig
from blenderbot_mb.checkpoint import write_safetensors
from blenderbot_mb.naming import BIAS, EMBEDDING, LINEAR, LOGITS_BIAS, NORM_BIAS, NORM_WEIGHT, tensor_specs

VOCAB = 128  # small configs without a tokenizer

# Tiny configs, including odd ones: 1 and 3 layers, encoder and decoder sizes that differ,
# scale_embedding both ways, another activation.
TINY_CONFIGS = {
    "tiny": dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                 scale_embedding=True, dropout=0.0),
    "odd": dict(vocab_size=VOCAB + 3, d_model=24, encoder_layers=1, decoder_layers=3, encoder_attention_heads=3,
                decoder_attention_heads=6, encoder_ffn_dim=40, decoder_ffn_dim=56, max_position_embeddings=48,
                scale_embedding=False, dropout=0.0),
    "relu": dict(vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=8, encoder_ffn_dim=24, decoder_ffn_dim=64, max_position_embeddings=40,
                 scale_embedding=True, activation_function="relu", dropout=0.0),
}


def make_config(name: str = "tiny", **overrides) -> BlenderbotConfig:
    return BlenderbotConfig.from_dict({**TINY_CONFIGS[name], **overrides})


def random_weights(config, architecture: str = "BlenderbotForConditionalGeneration", seed: int = 0,
                   dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights with every tensor non-trivial (biases, norms and final_logits_bias too), so that a
    backend that forgets one of them fails the parity tests."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in tensor_specs(config, architecture):
        if spec.kind in (LINEAR, EMBEDDING):
            t = rng.normal(0.0, 0.2, spec.shape)
        elif spec.kind == NORM_WEIGHT:
            t = 1.0 + rng.normal(0.0, 0.1, spec.shape)
        elif spec.kind in (BIAS, NORM_BIAS, LOGITS_BIAS):
            t = rng.normal(0.0, 0.1, spec.shape)
        else:  # pragma: no cover
            raise AssertionError(spec.kind)
        out[spec.name] = t.astype(dtype)
    return out


def random_batch(config, batch: int = 3, src_len: int = 9, tgt_len: int = 7, seed: int = 1, pad: bool = True):
    """input_ids/attention_mask (right-padded, uneven lengths) and decoder ids/labels as numpy int64."""
    rng = np.random.default_rng(seed)
    low = 4  # keep clear of special ids
    input_ids = rng.integers(low, config.vocab_size, (batch, src_len))
    attention_mask = np.ones_like(input_ids)
    if pad:
        for b in range(1, batch):
            n = max(1, src_len - 2 * b)
            input_ids[b, n:] = config.pad_token_id
            attention_mask[b, n:] = 0
    input_ids[np.arange(batch), attention_mask.sum(1) - 1] = config.eos_token_id
    labels = rng.integers(low, config.vocab_size, (batch, tgt_len))
    labels[:, -1] = config.eos_token_id
    if pad and batch > 1:
        labels[-1, tgt_len - 2:] = -100
    decoder_input_ids = np.concatenate(
        [np.full((batch, 1), config.decoder_start_token_id), np.where(labels[:, :-1] == -100, 0, labels[:, :-1])], 1
    )
    return {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask.astype(np.int64),
        "decoder_input_ids": decoder_input_ids.astype(np.int64),
        "labels": labels.astype(np.int64),
    }


def write_checkpoint(folder, config, weights, generation: GenerationConfig | dict | None = None,
                     tokenizer=None, architecture: str = "BlenderbotForConditionalGeneration", **save_kwargs):
    """A folder as `save_pretrained` writes it, built from numpy weights without any backend."""
    os.makedirs(folder, exist_ok=True)
    config.replace(architectures=[architecture]).save_pretrained(folder)
    if generation is not None:
        if isinstance(generation, dict):
            generation = GenerationConfig.from_dict(generation)
        generation.save_pretrained(folder)
    write_safetensors(weights, str(folder), **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


def pad_after_eos(sequences, eos: int = 2, pad: int = 0) -> np.ndarray:
    """transformers 5 fills finished beams with </s> when pad_token_id is 0 (a `pad or eos` slip); the v4.37
    reference, and all three of our backends, pad them. Normalize its output to compare."""
    out = np.array(sequences, copy=True)
    for row in out:
        hits = np.nonzero(row[1:] == eos)[0]
        if len(hits):
            row[hits[0] + 2:] = pad
    return out


# ---------------------------------------------------------------------- transformers oracle
def hf_model(config, weights, architecture: str = "BlenderbotForConditionalGeneration"):
    """transformers' own PyTorch class with the same weights (eval mode, fp32). Skips without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf_config = transformers.BlenderbotConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    if architecture == "BlenderbotForCausalLM":
        hf_config.is_decoder = True
        hf_config.is_encoder_decoder = False
    model = getattr(transformers, architecture)(hf_config).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
            "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert not unexpected, unexpected
    assert set(missing) <= tied, missing
    model.tie_weights()
    return model


def training_files(folder, tokenizer_folder, examples: int = 12, **config_overrides) -> tuple[str, str]:
    """(a tiny model folder with the test tokenizer, a TSV of `examples` packaged dialogue pairs) in `folder`."""
    from blenderbot_mb.data import corpus_pairs
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = make_config("tiny", vocab_size=len(tokenizer), **config_overrides)
    base = write_checkpoint(os.path.join(folder, "base"), config, random_weights(config, seed=0), tokenizer=tokenizer)
    data = os.path.join(folder, "data.tsv")
    with open(data, "w", encoding="utf-8") as f:
        f.write("".join(f"{c}\t{r}\n" for c, r in corpus_pairs()[:examples]))
    return base, data


def check_lora_run(train, folder, tokenizer_folder, backend: str) -> None:
    """A LoRA run of `train` (a backend's training.train): adapters in peft's names, the merged model equal to
    the core's merge of base + adapters, and a resumed run that continues from the saved adapters."""
    from safetensors.numpy import load_file

    from blenderbot_mb import lora

    base, data = training_files(folder, tokenizer_folder)
    options = dict(data=data, eval_data=data, model=base, backend=backend, batch_size=4, lr=1e-2, save_every=2,
                   lora_rank=2, lora_alpha=4, lora_ffn=True, merge=True, progress=False, seed=1)
    out = os.path.join(folder, "run")
    first = train(out=out, max_steps=2, **options)
    modules, config = lora.read_adapters(first.model)
    assert config["r"] == 2 and config["lora_alpha"] == 4
    assert sorted(modules) == sorted(lora.target_modules(BlenderbotConfig.from_pretrained(base), lora.target_names(True)))
    weights = load_file(os.path.join(base, "model.safetensors"))
    merged = load_file(os.path.join(out, "merged", "model.safetensors"))
    expected = lora.merge(weights, modules, 2.0)
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name], value, atol=1e-5, err_msg=name)
    assert max(np.abs(merged[k] - weights[k]).max() for k in weights) > 1e-4  # the adapters learned something
    again = train(out=out, max_steps=3, resume=True, **options)
    assert again.steps == 3 and again.eval_loss < first.eval_loss


# TensorFlow's graph optimizer (grappler) off in the suite's processes, conftest's and these: it spent longer
# rewriting each tiny model's training graph than the steps took (a 5-update `train --backend tf` process: 33 s of
# CPU, 23 s without; the same losses). test_tf_training.py's step equal to PyTorch's runs with it on.
TF_OPTIMIZER_OPTIONS = {"disable_meta_optimizer": True}
TF_GRAPH_OPTIMIZER_OFF = ("import sys\nif 'tensorflow' in sys.modules or 'tf' in sys.argv:\n    import tensorflow\n"
                          f"    tensorflow.config.optimizer.set_experimental_options({TF_OPTIMIZER_OPTIONS!r})\n")


def tensorflow_graph_optimizer_off() -> None:
    """TF_GRAPH_OPTIMIZER_OFF in this process, where it imported TensorFlow (conftest, early_check.py)."""
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].config.optimizer.set_experimental_options(TF_OPTIMIZER_OPTIONS)


# `blenderbot-mb` in the checks' processes (as python -m blenderbot_mb.cli, TF_GRAPH_OPTIMIZER_OFF first)
CLI = [sys.executable, "-c", TF_GRAPH_OPTIMIZER_OFF + "from blenderbot_mb.cli import main\nmain()"]

# the resume tests' run: 5 updates, a checkpoint every 2; KILLED_RUN (argv: data, out, model) dies after update 3
RESUME_OPTIONS = dict(max_steps=5, batch_size=2, grad_accum=2, lr=3e-3, warmup=2, save_every=2, seed=3)
KILLED_RUN = TF_GRAPH_OPTIMIZER_OFF.replace("{", "{{").replace("}", "}}").replace("'tf' in sys.argv",
                                                                                "{backend!r} == 'tf'") + """
import os, signal, sys
from blenderbot_mb.{backend}.training import train
kill = lambda step, metrics: os.kill(os.getpid(), signal.SIGKILL) if step == 3 else None
train(data=sys.argv[1], out=sys.argv[2], model=sys.argv[3], progress=False, callbacks=[kill], **{options!r})
"""


# XLA's LLVM backend at its lowest optimization level for the suite's JAX and TensorFlow compiles (CPU), and one
# thread per operation (the tiny models' operations gain nothing from more; the run's processes share two cores:
# ~5% less CPU on the Flax tests): conftest puts it in XLA_FLAGS; checks that start a process with XLA_FLAGS of
# their own add it there too
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@contextlib.contextmanager
def ended(proc):
    """`proc` (a subprocess.Popen) for the block, killed and waited for at its end if it still runs."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_killed_run_resumes(backend: str, folder, tokenizer_folder) -> None:
    """A run of `blenderbot_mb.<backend>.training.train` killed with SIGKILL after update 3 (checkpoint at 2) and
    resumed ends with exactly the weights of an uninterrupted run (optimizer state, update count, data position
    and dropout restored; the tiny model has dropout 0.1)."""
    import importlib
    import subprocess
    import sys

    from safetensors.numpy import load_file

    train = importlib.import_module(f"blenderbot_mb.{backend}.training").train
    base, data = training_files(folder, tokenizer_folder, dropout=0.1)
    options = dict(data=data, model=base, progress=False, **RESUME_OPTIONS)
    whole = train(out=os.path.join(folder, "whole"), **options)
    out = os.path.join(folder, "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS, CUDA_VISIBLE_DEVICES="")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(backend=backend, options=RESUME_OPTIONS), data, out, base], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "checkpoint-2" in os.listdir(out) and "checkpoint-4" not in os.listdir(out)
    resumed = train(out=out, resume=True, **options)
    assert whole.steps == resumed.steps == 5
    a = load_file(os.path.join(whole.model, "model.safetensors"))
    b = load_file(os.path.join(resumed.model, "model.safetensors"))
    start = load_file(os.path.join(base, "model.safetensors"))
    assert max(np.abs(a[k] - start[k]).max() for k in a) > 1e-3
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------------- several training processes on localhost
def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_processes(commands, timeout: float, first_ends_all: bool = False) -> list[tuple[int, str]]:
    """Start every (argv, env) of `commands` at once and wait for all, `timeout` seconds in total; whatever still
    runs then (a process waiting for a dead peer) is killed, and with `first_ends_all` whatever still runs when
    the first process ends (as a cluster manager does when one worker dies). Returns (return code, output)."""
    import subprocess
    import time

    procs = []
    try:
        for argv, env in commands:
            procs.append(subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT))
        deadline, out = time.monotonic() + timeout, []
        for p in procs:
            try:
                out.append((p.communicate(timeout=max(deadline - time.monotonic(), 1))[0], False))
            except subprocess.TimeoutExpired:
                p.kill()
                out.append((p.communicate()[0] + f"\n[killed after {timeout} s]", True))
            if first_ends_all:
                for other in procs[1:]:
                    if other.poll() is None:
                        other.kill()
        return [(p.returncode, text) for p, (text, _) in zip(procs, out, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_two_process_refusals_and_sigterm(backend: str, folder, tokenizer_folder, envs: list[dict],
                                           unavailable=()) -> None:
    """2 processes of `blenderbot-mb train --backend B` on localhost (`envs()`: what connects each, new for every
    start): given
    different options, both stop at once with one error naming them (a different --max-steps had made one wait
    forever); SIGTERM to both mid-run stops both as Ctrl-C does, exit code 130 (the distributed runtimes had
    taken SIGTERM over and the run went on to its end)."""
    import signal
    import subprocess
    import time

    base, data = training_files(folder, tokenizer_folder)
    argv = [*CLI, "train", "--backend", backend, "--model", base, "--data", data, "--batch-size", "2", "--no-progress"]
    outs = [os.path.join(folder, f"differ{i}") for i in range(2)]
    results = run_processes([([*argv, "--out", out, "--max-steps", str(3 + i), *(["--lr", "0.01"] if i else [])],
                              env) for i, (out, env) in enumerate(zip(outs, envs(), strict=True))], timeout=240)
    check_exits(results, unavailable, expected=(2, 2))
    for rank, (_, log) in enumerate(results):
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert errors == [f"error: the 2 processes were started with different --lr, --max-steps (this is rank "
                          f"{rank}): give every process the same options and the same data (--data and --eval-data "
                          "files with the same lines)"], log
    long = [os.path.join(folder, f"long{i}") for i in range(2)]
    procs = [subprocess.Popen([*argv, "--out", out, "--max-steps", "100000", "--log-every", "1"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for out, env in zip(long, envs(),
                                                                                                   strict=True)]
    try:
        metrics, deadline = os.path.join(long[0], "metrics.jsonl"), time.monotonic() + 420  # (TF on a busy machine)
        while not (os.path.exists(metrics) and '"loss"' in open(metrics).read()):  # the run is training
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [
                p.communicate()[0] if p.poll() is not None else "running" for p in procs]
            time.sleep(0.2)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=90)[0] for p in procs]
        codes = [p.returncode for p in procs]
        # each stops as on Ctrl-C; on a busy machine one may be waiting at a collective when the other has
        # gone, and fail with the collective's error line instead (exit code 2)
        assert 130 in codes and set(codes) <= {130, 2}, (codes, logs)
        for rank, (code, log) in enumerate(zip(codes, logs, strict=True)):
            errors = [line for line in log.splitlines() if line.startswith("error:")]
            if code == 130 and rank > 0:  # rank 0 says where the run stopped, once for both
                assert errors == [], log
            elif code == 130:
                assert len(errors) == 1 and errors[0].startswith("error: interrupted after "), log
            else:
                assert len(errors) == 1, (code, log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_two_process_cli_run(backend: str, folder, tokenizer_folder, envs: list[dict], unavailable=()) -> None:
    """`blenderbot-mb train --backend B` in 2 processes on localhost (`envs`: what connects each) with batch 2
    each makes the updates of one process with batch 4: same losses, eval loss and weights (AdamW, clipping,
    weight decay). Process 1 is given its own --out and writes nothing there; the 2-process checkpoint resumes
    in one process to the weights of the uninterrupted run. Skips when a log shows a sign of `unavailable`."""
    import importlib
    import json

    from safetensors.numpy import load_file

    train = importlib.import_module(f"blenderbot_mb.{backend}.training").train
    base, data = training_files(folder, tokenizer_folder)  # 12 examples, no dropout
    common = dict(data=data, eval_data=data, model=base, lr=1e-2, warmup=0, schedule="constant", weight_decay=0.01,
                  max_grad_norm=0.5, seed=1)
    one = os.path.join(folder, "one")
    train(out=one, batch_size=4, max_steps=5, save_every=1, eval_every=3, keep_checkpoints=None, progress=False,
          **common)
    argv = [*CLI, "train", "--backend", backend, "--batch-size", "2",
            "--max-steps", "3", "--save-every", "2", "--no-progress",
            *(x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", str(v)))]
    outs = [os.path.join(folder, "two"), os.path.join(folder, "process1")]
    results = run_processes([([*argv, "--out", out], env) for out, env in zip(outs, envs, strict=True)], timeout=240)
    check_exits(results, unavailable)

    assert not os.path.exists(outs[1])  # process 1 wrote nothing
    assert [("trained 3 steps" in log) for _, log in results] == [True, False]  # one summary, from rank 0
    assert not [line for _, log in results for line in log.splitlines() if line.startswith("warning:")], results
    lines, ref = ([json.loads(x) for x in open(os.path.join(f, "metrics.jsonl"))] for f in (outs[0], one))
    losses = [x["loss"] for x in lines if "loss" in x]
    np.testing.assert_allclose(losses, [x["loss"] for x in ref if "loss" in x][:3], rtol=1e-5)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose([x["eval_loss"] for x in lines if "eval_loss" in x],
                               [x["eval_loss"] for x in ref if "eval_loss" in x][:1], rtol=1e-5)
    state = json.load(open(os.path.join(outs[0], "checkpoint-3", "trainer_state.json")))
    assert (state["world_size"], state["global_batch"]) == (2, 4)

    def weights(model_folder):
        return load_file(os.path.join(model_folder, "model.safetensors"))

    def same_update(a, b):  # attention key biases aside: their true gradient is 0 and AdamW amplifies rounding
        for name, value in a.items():
            if not name.endswith("k_proj.bias"):
                np.testing.assert_allclose(value, b[name], atol=1e-5, rtol=0, err_msg=name)

    start, trained = weights(base), weights(os.path.join(outs[0], "model"))
    assert max(np.abs(trained[k] - start[k]).max() for k in start) > 1e-3  # it trained
    same_update(trained, weights(os.path.join(one, "checkpoint-3")))
    # the 2-process checkpoint resumes in one process (world size 2 -> 1) to the uninterrupted run's weights
    resumed = train(out=outs[0], batch_size=4, max_steps=5, resume=True, progress=False, **common)
    assert resumed.steps == 5
    same_update(weights(resumed.model), weights(os.path.join(one, "model")))


def check_exits(results: list[tuple[int, str]], unavailable=(), expected: tuple = (0, 0)) -> None:
    """Fail (naming each process's exit and log) unless the return codes of `run_processes`' `results` are
    `expected` (None: any); skip when a log shows a sign of `unavailable` (collectives that do not run here)."""
    import pytest

    if all(want is None or rc == want for (rc, _), want in zip(results, expected, strict=True)):
        return
    failed = "\n".join(f"process {i}: rc {rc}\n{log[-3000:]}" for i, (rc, log) in enumerate(results))
    if any(sign in failed for sign in unavailable):
        pytest.skip(f"these collectives do not run here: {failed[-500:]}")
    pytest.fail(failed)


def check_two_process_killed_run_resumes(backend: str, folder, tokenizer_folder, envs, unavailable=()) -> None:
    """`blenderbot-mb train --backend B` in 2 processes on localhost sharing one --out (`envs()`: what connects
    each, new for every start), with dropout 0.1 and 2 accumulated micro-batches, killed after update 3 (process
    0 SIGKILLs itself, then process 1 is killed) and resumed with --resume in 2 processes from the checkpoint of
    update 2 (mid-epoch: 20 examples, 8 an update): the losses of updates 3-5 and the final fp32 weights equal
    those of an uninterrupted 2-process run (1e-5). Skips when a log shows a sign of `unavailable`."""
    import json
    import sys

    from safetensors.numpy import load_file

    base, data = training_files(folder, tokenizer_folder, examples=20, dropout=0.1)
    argv = [*CLI, "train", "--backend", backend, "--data", data, "--model", base,
            "--no-progress", *(x for k, v in RESUME_OPTIONS.items() for x in (f"--{k.replace('_', '-')}", str(v)))]
    whole, out = os.path.join(folder, "whole"), os.path.join(folder, "run")
    check_exits(run_processes([([*argv, "--out", whole], env) for env in envs()], timeout=240), unavailable)
    killed = [sys.executable, "-c", KILLED_RUN.format(backend=backend, options=RESUME_OPTIONS), data, out, base]
    results = run_processes([(killed, env) for env in envs()], timeout=240, first_ends_all=True)
    check_exits(results, unavailable, expected=(-9, None))  # process 1: killed, or failed on its dead peer
    assert "checkpoint-2" in os.listdir(out) and "checkpoint-4" not in os.listdir(out) and "model" not in os.listdir(out)
    check_exits(run_processes([([*argv, "--out", out, "--resume"], env) for env in envs()], timeout=240), unavailable)

    state = json.load(open(os.path.join(out, "checkpoint-5", "trainer_state.json")))
    assert (state["step"], state["world_size"], state["global_batch"]) == (5, 2, 8)
    lines, ref = ([json.loads(x) for x in open(os.path.join(f, "metrics.jsonl"))] for f in (out, whole))
    # update 3, logged before the kill and trained again, is logged once: the records of the resumed run
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5]
    losses = [x["loss"] for x in ref if "loss" in x]
    np.testing.assert_allclose([x["loss"] for x in lines if "loss" in x], losses, rtol=1e-5)
    a, b = (load_file(os.path.join(f, "model", "model.safetensors")) for f in (whole, out))
    start = load_file(os.path.join(base, "model.safetensors"))
    assert max(np.abs(a[k] - start[k]).max() for k in start) > 1e-3  # it trained
    for name in start:
        np.testing.assert_allclose(b[name], a[name], atol=1e-5, rtol=0, err_msg=name)


# ---------------------------------------------------------------------- long subprocesses, started early
_EARLY: dict = {}  # key: (process, stdout file, stderr file)
_LANES: dict = {}  # lane: [(key, argv, env), ...] waiting their turn
_LOCK = threading.Lock()


def start_early(key: str, argv: list, env: dict | None = None, lane: str | None = None) -> None:
    """Start `argv` in a process of its own, once per `key`, at a lower priority (nice 10), its output into
    temporary files. conftest.py calls each collected test's `early` function (which calls this) as soon as the
    suite is collected, so that the test's long subprocess overlaps the rest of the run; the test itself calls
    it too (when it runs alone: once is enough), then takes the result with early_result(). Processes of one
    `lane` run one after another, in the order started (a background thread starts each when the one before
    it ends), so that a few long checks share a core instead of all of them crowding the machine at once."""
    with _LOCK:
        if key in _EARLY or any(key == queued[0] for waiting in _LANES.values() for queued in waiting):
            return
        if lane is None:
            _start(key, argv, env)
            return
        waiting = _LANES.setdefault(lane, [])
        waiting.append((key, argv, env))
        if len(waiting) == 1:  # no thread serves this lane now
            threading.Thread(target=_serve_lane, args=(lane,), daemon=True).start()


def _start(key: str, argv: list, env: dict | None) -> None:
    import atexit
    import subprocess
    import tempfile

    out, err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
    # `nice` rather than preexec_fn=os.nice: a preexec_fn makes Python fork with the at-fork hooks, and JAX's
    # warns (a RuntimeWarning) in this process, where a test's command line may be catching warnings right then
    process = subprocess.Popen(["nice", "-n", "10", *argv], env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                               stdout=out, stderr=err, text=True)
    _EARLY[key] = process, out, err
    atexit.register(lambda: process.poll() is None and process.kill())


def _serve_lane(lane: str) -> None:
    while True:
        with _LOCK:
            waiting = _LANES[lane]
            key, argv, env = waiting[0]
            if key not in _EARLY:  # (its test may have started it already)
                _start(key, argv, env)
            process = _EARLY[key][0]
        process.wait()
        with _LOCK:
            waiting.pop(0)
            if not waiting:
                del _LANES[lane]
                return


def early_result(key: str, timeout: float) -> tuple[int, str, str]:
    """(return code, stdout, stderr) of start_early()'s process `key`, once it ends (killed after `timeout`
    seconds more). One still waiting in its lane starts now."""
    import subprocess

    with _LOCK:
        if key not in _EARLY:
            _, argv, env = next(q for waiting in _LANES.values() for q in waiting if q[0] == key)
            _start(key, argv, env)
        process, out, err = _EARLY[key]
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    out.seek(0)
    err.seek(0)
    return process.returncode, out.read(), err.read()


CHECKS_LANE = "checks"  # the lane of the multi-process training checks (start_check)
KERNELS_LANE = "kernels"  # the Triton interpreter's cases, then other long compiles (a second lane beside it)


def start_check(check: str, lane: str = CHECKS_LANE) -> None:
    """Run `check`, "module:function" of this folder, in a process of its own (early_check.py: the function is
    called with a fresh folder and the test tokenizer's folder), in a lane of long checks."""
    import sys

    start_early(check, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "early_check.py"),
                        check], dict(os.environ), lane=lane)


def run_check(check: str, timeout: float = 900) -> None:
    """The test of `check` (start_check's): passes when it did, skips when it skipped, else fails with its log."""
    import pytest

    start_check(check)
    code, out, err = early_result(check, timeout)
    for line in out.splitlines():
        if line.startswith("SKIPPED: "):
            pytest.skip(line[len("SKIPPED: "):])
    assert code == 0 and "CHECK PASSED" in out, out[-6000:] + err[-6000:]


def check_info_and_refusal(folder: str, kind: str) -> None:
    """`blenderbot-mb info` on an export folder names its format and lists the files of its subfolders;
    loading it as a checkpoint is one line naming the export (not a list of missing weight files)."""
    from typer.testing import CliRunner

    from blenderbot_mb.cli import app

    runner = CliRunner()
    info = runner.invoke(app, ["info", folder])
    assert info.exit_code == 0, info.output
    assert f"format: {kind} export" in info.stdout
    for root, _, names in os.walk(folder):
        for name in names:
            assert f"  {os.path.relpath(os.path.join(root, name), folder)}  " in info.stdout
    refused = runner.invoke(app, ["convert", folder, os.path.join(os.path.dirname(folder), "converted"), "--to", "tf"])
    assert refused.exit_code == 2 and f"is {kind} export" in refused.stderr and "not a checkpoint" in refused.stderr

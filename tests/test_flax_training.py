"""Flax training: loss, optimizer, jit/pmap/sharded steps (8 fake CPU devices in a subprocess), 2 JAX processes,
LoRA, remat, bf16, and a SIGKILLed `train` run resumed."""

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

pytest.importorskip("flax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import XLA_FLAGS, make_config, random_batch, random_weights, start_check  # noqa: E402

from blenderbot_mb.checkpoint_msgpack import params_from_tensors  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration, cross_entropy_loss, training  # noqa: E402

LM = "BlenderbotForConditionalGeneration"
HERE = os.path.dirname(os.path.abspath(__file__))


def model_and_batch(name="tiny", **overrides):
    config = make_config(name, **overrides)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_tensors(random_weights(config, LM, seed=0), config, LM))
    model = FlaxBlenderbotForConditionalGeneration(config, _do_init=False, params=params)
    batch = {k: v.astype(np.int32) for k, v in random_batch(config).items() if k != "decoder_input_ids"}
    return model, batch


def test_masked_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = np.array([[3, 4, 0, -100, -100], [1, 2, 5, 6, 0]])  # 0 (pad) counts: only -100 is ignored
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels != -100
    nll = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    expected = nll[keep].mean()
    got = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    smooth = 0.1 * (-logp.mean(-1))[keep].mean() + 0.9 * expected
    got = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=0.1)
    np.testing.assert_allclose(float(got), smooth, rtol=1e-6)


def test_fine_tune_takes_replies_longer_than_their_contexts(tokenizer_folder):
    """fine_tune pads every batch to one width that holds the longest context and the longest reply (a reply
    longer than every context was refused); its first loss is numpy's cross-entropy of the model's logits."""
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    model, _ = model_and_batch(vocab_size=len(tokenizer))
    pairs = [("Hi there!", "Hello, how are you doing on this fine day?"), ("Bye", "See you later, my friend!")]
    batch = training.make_batch(tokenizer, pairs, model.config.max_position_embeddings)
    assert batch["labels"].shape[1] > batch["input_ids"].shape[1]
    logits = np.asarray(model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = batch["labels"] != -100
    expected = -np.take_along_axis(logp, np.where(keep, batch["labels"], 0)[..., None], -1)[..., 0][keep].mean()
    losses = training.fine_tune(model, tokenizer, pairs, epochs=20, lr=1e-2, batch_size=2)
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_jit_step_lowers_loss_freezes_logits_bias_and_uses_dropout():
    model, batch = model_and_batch(dropout=0.1)
    state = training.create_train_state(model, learning_rate=1e-2, warmup_steps=2, total_steps=12, weight_decay=0.01)
    step = jax.jit(training.make_train_step(model, label_smoothing=0.05))
    eval_step = jax.jit(training.make_eval_step(model))
    before = float(eval_step(state.params, batch))
    rngs = []
    for _ in range(10):
        rngs.append(np.asarray(state.dropout_rng))
        state, metrics = step(state, batch)
    assert float(eval_step(state.params, batch)) < before - 0.5
    assert int(state.step) == 10 and len({r.tobytes() for r in rngs}) == 10  # a fresh dropout key every step
    np.testing.assert_array_equal(np.asarray(state.params["final_logits_bias"]),
                                  np.asarray(model.params["final_logits_bias"]))
    # the first step is pure warmup (lr 0): no change at all (the same settings: no second compile)
    state0 = training.create_train_state(model, learning_rate=1e-2, warmup_steps=2, total_steps=12, weight_decay=0.01)
    state1, _ = step(state0, batch)
    for a, b in zip(jax.tree_util.tree_leaves(state1.params), jax.tree_util.tree_leaves(state0.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def start_multidevice_check() -> None:
    """flax_multidevice_check.py (~1 minute) in its process, started early (helpers.start_early)."""
    from helpers import CHECKS_LANE, start_early

    start_early("flax multidevice", [sys.executable, os.path.join(HERE, "flax_multidevice_check.py"), "--devices-only"],
                env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 " + XLA_FLAGS,
                         JAX_PLATFORMS="cpu"),
                lane=CHECKS_LANE)


def test_multidevice_steps_in_subprocess():
    """pmap over 8 devices, NamedSharding over 8 devices and jit on one give the same params (the script)."""
    from helpers import early_result

    start_multidevice_check()
    code, out, err = early_result("flax multidevice", timeout=600)
    print(out, err[-3000:])
    assert "devices: 8 x cpu" in out
    assert code == 0 and "ALL PASS" in out
    assert "FAIL " not in out


test_multidevice_steps_in_subprocess.early = start_multidevice_check


# ---------------------------------------------------------------------- Trainer over a mesh, LoRA, remat, resume
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes_check(folder, tokenizer_folder):
    """2 JAX processes on localhost (gloo on CPU), each feeding its rows of the global batch, make the update one
    process makes on the whole batch: params replicated, and params sharded with accumulated micro-batches."""
    import optax

    out, port = os.path.join(folder, "out.npz"), free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS)
    script = os.path.join(HERE, "flax_distributed_check.py")
    procs = [subprocess.Popen([sys.executable, script, str(i), "2", str(port), out], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = np.load(out)
    assert list(got["rows"]) == [0, 2]  # process 0 fed rows 0-1, process 1 rows 2-3

    model, _ = model_and_batch()
    batch = random_batch(model.config, batch=4, src_len=9, tgt_len=7, seed=1)
    batch = {k: v.astype(np.int32) for k, v in batch.items() if k != "decoder_input_ids"}
    state = training.create_train_state(model, training.frozen_logits_bias(optax.sgd(0.5)))
    state, _ = jax.jit(training.make_train_step(model))(state, batch)
    expected, start = model.state_dict(state.params), model.state_dict()
    assert max(np.abs(expected[k] - start[k]).max() for k in expected) > 1e-2  # the step moves the params
    for run in ("replicated", "fsdp_accum"):
        for name, value in expected.items():
            np.testing.assert_allclose(got[f"{run}/{name}"], value, atol=1e-5, rtol=0, err_msg=f"{run} {name}")
    losses = got["losses"]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)  # warmup: lr 0 at the first update
    assert losses[-1] < losses[0] - 0.5


def test_lora_trains_adapters_only_and_merges_as_the_core_rule(tmp_path):
    from blenderbot_mb import lora

    model, batch = model_and_batch()
    base = model.state_dict()
    trainer = training.Trainer(model, training.adamw(), lora_rank=4, lora_alpha=8,
                               lora_targets=lora.target_names(ffn=True))
    losses = [trainer.update([batch], lr=1e-2, seed=s)["loss"] for s in range(6)]
    assert losses[-1] < losses[0] - 0.1
    np.testing.assert_array_equal(np.asarray(trainer.state.frozen["model"]["shared"]["embedding"]),
                                  base["model.shared.weight"])  # the base is frozen
    tensors = training.lora_tensors(trainer.adapters())
    modules = lora.target_modules(model.config, lora.target_names(ffn=True))
    assert sorted(tensors) == sorted(k for m in modules for k in lora.adapter_keys(m))  # peft's names
    key_a, key_b = lora.adapter_keys("model.decoder.layers.1.self_attn.q_proj")
    assert tensors[key_a].shape == (4, 16) and tensors[key_b].shape == (16, 4)  # PyTorch layout
    # the file round trip, and the merged model equals the core's merge of base + adapters
    lora.save_adapters(str(tmp_path), tensors, rank=4, alpha=8, targets=lora.target_names(True))
    modules, config = lora.read_adapters(str(tmp_path))
    merged = lora.merge(base, modules, config["lora_alpha"] / config["r"])
    ours = model.state_dict(trainer.model_params())
    for name, value in merged.items():
        np.testing.assert_allclose(ours[name], value, atol=1e-6, err_msg=name)
    assert np.abs(ours["model.encoder.layers.0.fc1.weight"] - base["model.encoder.layers.0.fc1.weight"]).max() > 0
    again = training.merge_lora(model.params, training.lora_from_modules(modules), 2.0)
    np.testing.assert_allclose(model.state_dict(again)["model.decoder.layers.0.fc2.weight"],
                               merged["model.decoder.layers.0.fc2.weight"], atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, batch = model_and_batch()
    remat = FlaxBlenderbotForConditionalGeneration(model.config, _do_init=False, params=model.params)
    remat.enable_gradient_checkpointing()

    def grads(m):  # jitted: op by op, the backward pass takes ~4x as long on a CPU
        return jax.jit(jax.grad(lambda p: training.loss_sum_and_count(m, p, batch)[0]))(m.params)

    def remat_calls(m):  # rematerialized blocks in the backward pass: one per encoder and decoder layer
        return str(jax.make_jaxpr(jax.grad(lambda p: training.loss_sum_and_count(m, p, batch)[0]))(m.params)).count(
            "remat")

    assert remat_calls(model) == 0 and remat_calls(remat) == 4
    for a, b in zip(jax.tree_util.tree_leaves(grads(model)), jax.tree_util.tree_leaves(grads(remat)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # (fused differently)


def test_bf16_compute_keeps_float32_master_weights():
    model, batch = model_and_batch()
    bf16 = FlaxBlenderbotForConditionalGeneration(model.config, _do_init=False, params=model.params, dtype=jnp.bfloat16)
    trainer = training.Trainer(bf16, training.adamw())
    first = trainer.update([batch], lr=1e-2, seed=0)["loss"]
    exact = float(jax.jit(training.make_eval_step(model))(model.params, batch))
    assert first == pytest.approx(exact, abs=0.05) and first != exact  # bf16 logits, close to fp32
    losses = [trainer.update([batch], lr=1e-2, seed=s)["loss"] for s in range(1, 5)]
    assert losses[-1] < first
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(trainer.state.params))


def test_two_processes_make_the_same_update_as_one():
    """(two_processes_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_flax_training:two_processes_check")


test_two_processes_make_the_same_update_as_one.early = partial(start_check, "test_flax_training:two_processes_check")


def killed_run_check(folder, tokenizer_folder):
    from helpers import check_killed_run_resumes

    check_killed_run_resumes("flax", folder, tokenizer_folder)


def test_killed_run_resumes_to_the_same_weights():
    """(killed_run_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_flax_training:killed_run_check")


test_killed_run_resumes_to_the_same_weights.early = partial(start_check, "test_flax_training:killed_run_check")


def test_lora_run_writes_peft_adapters_merges_and_resumes(tmp_path, tokenizer_folder):
    from helpers import check_lora_run

    check_lora_run(training.train, str(tmp_path), tokenizer_folder, "flax")


def cli_two_processes_check(folder, tokenizer_folder):
    """`blenderbot-mb train --backend flax` in 2 processes connected by jax.distributed from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (gloo on CPU), process 0 writing (helpers.check_two_process_cli_run)."""
    from helpers import check_two_process_cli_run, free_ports

    address = f"127.0.0.1:{free_ports(1)[0]}"
    envs = [dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i)) for i in range(2)]
    check_two_process_cli_run("flax", folder, tokenizer_folder, envs)


def cli_refusals_check(folder, tokenizer_folder):
    """2 processes of the CLI (jax.distributed) given different options both stop with one error naming them;
    SIGTERM to both mid-run stops both, exit code 130 (helpers.check_two_process_refusals_and_sigterm)."""
    from helpers import check_two_process_refusals_and_sigterm, free_ports

    def envs():
        address = f"127.0.0.1:{free_ports(1)[0]}"
        return [dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS, JAX_COORDINATOR_ADDRESS=address,
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]

    check_two_process_refusals_and_sigterm("flax", folder, tokenizer_folder, envs)


def test_two_processes_refuse_different_options_and_stop_on_sigterm():
    """(cli_refusals_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_flax_training:cli_refusals_check")


test_two_processes_refuse_different_options_and_stop_on_sigterm.early = partial(
    start_check, "test_flax_training:cli_refusals_check")


def test_two_processes_of_the_cli_make_the_same_updates_as_one():
    """(cli_two_processes_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_flax_training:cli_two_processes_check")


test_two_processes_of_the_cli_make_the_same_updates_as_one.early = partial(
    start_check, "test_flax_training:cli_two_processes_check")

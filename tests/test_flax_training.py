"""Flax training: loss, optimizer, jit/pmap/sharded steps (8 fake CPU devices in a subprocess)."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import make_config, random_batch, random_weights  # noqa: E402

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
    # the first step is pure warmup (lr 0): no change at all
    state0 = training.create_train_state(model, learning_rate=1e-2, warmup_steps=2, total_steps=12)
    state1, _ = step(state0, batch)
    for a, b in zip(jax.tree_util.tree_leaves(state1.params), jax.tree_util.tree_leaves(state0.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_multidevice_steps_in_subprocess():
    """pmap over 8 devices, NamedSharding over 8 devices and jit on one give the same params (the script)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "flax_multidevice_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout, proc.stderr[-3000:])
    assert "devices: 8 x cpu" in proc.stdout
    assert proc.returncode == 0 and "ALL PASS" in proc.stdout
    assert "FAIL " not in proc.stdout

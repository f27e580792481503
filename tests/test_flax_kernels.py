"""The Pallas decode kernels (interpret mode on the CPU) against numpy in float64 and their jax.numpy twins;
the kernel decode step against the module's step; generate(kernels=True) against generate()."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402

from blenderbot_mb.flax import kernels  # noqa: E402

RNG = np.random.default_rng(0)
ERF = np.vectorize(math.erf)


def _normal(*shape, scale=1.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def numpy_linear(x, weight, bias, norm=None, activation=None, residual=None, transposed=False):
    """The oracle, in float64."""
    h = x.astype(np.float64)
    if norm is not None:
        scale, shift, eps = norm
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps) * scale + shift
    out = h @ (weight.T if transposed else weight).astype(np.float64) + bias
    if activation == "gelu":
        out = 0.5 * out * (1.0 + ERF(out / math.sqrt(2.0)))
    elif activation == "relu":
        out = np.maximum(out, 0.0)
    return out if residual is None else out + residual


def numpy_attention(q, k, v, keep):
    """keep: [rows, L] booleans."""
    s = np.einsum("bhd,bhkd->bhk", q.astype(np.float64), k.astype(np.float64)) / math.sqrt(q.shape[-1])
    s = np.where(keep[:, None, :], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhk,bhkd->bhd", w, v.astype(np.float64))


# (rows, K, N, norm, activation, residual, transposed, block_k, block_n): one row and several, K and N not
# multiples of the blocks, the LM head's transposed weight
LINEAR_CASES = [
    (1, 20, 37, True, "gelu", True, False, 16, 16),
    (3, 20, 37, True, "gelu", True, False, 16, 16),
    (3, 70, 130, False, None, False, True, 32, 64),
    (1, 70, 130, True, "relu", False, True, 32, 32),
    (17, 40, 24, True, None, True, False, 16, 16),
]


@pytest.mark.parametrize("rows,k,n,norm,activation,residual,transposed,block_k,block_n", LINEAR_CASES)
def test_linear_matches_numpy_and_twin(rows, k, n, norm, activation, residual, transposed, block_k, block_n):
    x = _normal(rows, k, scale=2.0) + 0.5
    weight = _normal(*((n, k) if transposed else (k, n)), scale=0.2)
    bias = _normal(n, scale=0.1)
    ln = (1.0 + _normal(k, scale=0.1), _normal(k, scale=0.1), 1e-5) if norm else None
    res = _normal(rows, n) if residual else None
    expected = numpy_linear(x, weight, bias, ln, activation, res, transposed)
    args = dict(norm=None if ln is None else tuple(jnp.asarray(a) if i < 2 else a for i, a in enumerate(ln)),
                activation=activation, residual=None if res is None else jnp.asarray(res), transposed=transposed)
    got = kernels.linear(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), block_k=block_k,
                         block_n=block_n, **args)
    twin = kernels.linear_reference(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), **args)
    assert got.shape == (rows, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(twin), expected, rtol=1e-5, atol=1e-5)


def test_linear_bfloat16_rounds_once():
    """bf16 inputs: float32 accumulation, one rounding of the output (within bf16's precision of float64)."""
    x, weight, bias = _normal(2, 48), _normal(48, 40, scale=0.2), _normal(40, scale=0.1)
    got = kernels.linear(jnp.asarray(x, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16),
                         jnp.asarray(bias, jnp.bfloat16), activation="gelu")
    assert got.dtype == jnp.bfloat16
    x16, w16, b16 = (np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in (x, weight, bias))
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), numpy_linear(x16, w16, b16, activation="gelu"),
                               rtol=1e-2, atol=1e-2)


def test_erf_approximation():
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(kernels._erf(jnp.asarray(x))), ERF(x.astype(np.float64)), rtol=0, atol=4e-7)


@pytest.mark.parametrize("rows,heads,length,head_dim,block_l", [(1, 2, 37, 40, 16), (3, 2, 20, 5, 8)])
def test_decode_attention_by_index(rows, heads, length, head_dim, block_l):
    q, k, v = _normal(rows, heads, head_dim), _normal(rows, heads, length, head_dim), _normal(rows, heads, length, head_dim)
    for index in (0, length // 2, length - 1):
        keep = np.broadcast_to(np.arange(length) <= index, (rows, length))
        expected = numpy_attention(q, k, v, keep)
        got = kernels.decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), valid=jnp.int32(index),
                                       block_l=block_l)
        twin = kernels.decode_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), valid=index)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(twin), expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_key_mask_weighs_masked_keys_zero():
    rows, heads, length, head_dim = 3, 2, 21, 40
    q, k, v = _normal(rows, heads, head_dim), _normal(rows, heads, length, head_dim), _normal(rows, heads, length, head_dim)
    keep = np.ones((rows, length), bool)
    keep[1, 5:] = False  # right padding
    keep[2, :17] = False  # every key of the first blocks masked
    expected = numpy_attention(q, k, v, keep)
    got = kernels.decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), valid=jnp.asarray(keep),
                                   block_l=8)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    # huge values on masked keys change nothing: their weight is exactly zero
    masked = np.broadcast_to(~keep[:, None, :, None], k.shape)
    k2, v2 = np.where(masked, 1e4, k).astype(np.float32), np.where(masked, 1e30, v).astype(np.float32)
    again = kernels.decode_attention(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), valid=jnp.asarray(keep),
                                     block_l=8)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def _lower_for_gpu(fn, *args):
    """Lower for CUDA on this CPU-only machine: runs the Pallas Triton lowering (power-of-two shapes, the
    primitives it knows) without a GPU."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_to_triton(rows, dtype):
    """The real 400M shapes (head_dim 40, vocabulary 8008) pass the Triton lowering, which the interpreter does
    not check."""
    d, ffn, vocab, heads = 1280, 5120, 8008, 32
    zeros = partial(jnp.zeros, dtype=dtype)
    norm = (jnp.ones(d), jnp.zeros(d), 1e-5)
    x = zeros((rows, d))
    calls = [
        lambda x: kernels.linear(x, zeros((d, 3 * d)), zeros(3 * d), norm=norm, interpret=False),
        lambda x: kernels.linear(x, zeros((d, ffn)), zeros(ffn), norm=norm, activation="gelu", interpret=False),
        lambda x: kernels.linear(kernels.linear(x, zeros((d, ffn)), zeros(ffn), interpret=False), zeros((ffn, d)),
                                 zeros(d), residual=x, activation="relu", interpret=False),
        lambda x: kernels.linear(x, zeros((vocab, d)), zeros(vocab), norm=norm, transposed=True,
                                 out_dtype=jnp.float32, interpret=False),
        lambda x: kernels.decode_attention(x.reshape(rows, heads, -1), zeros((rows, heads, 128, 40)),
                                           zeros((rows, heads, 128, 40)), valid=jnp.int32(7), interpret=False),
        lambda x: kernels.decode_attention(x.reshape(rows, heads, -1), zeros((rows, heads, 37, 40)),
                                           zeros((rows, heads, 37, 40)), valid=jnp.ones((rows, 37)),
                                           interpret=False),
    ]
    for call in calls:
        assert "triton" in _lower_for_gpu(call, x)


# ---------------------------------------------------------------------- the kernel step and generate(kernels=True)
LM = "BlenderbotForConditionalGeneration"
# odd: vocabulary 131, 3 layers, no embedding scale; head_dim 10 (not a power of two); relu
STEP_CONFIGS = [("odd", {}), ("tiny", dict(d_model=20, decoder_attention_heads=2, encoder_attention_heads=2)),
                ("relu", {})]


def _model(name, overrides, seed=3):
    from helpers import make_config, random_weights

    from blenderbot_mb.checkpoint_msgpack import params_from_tensors
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

    config = make_config(name, **overrides)
    weights = random_weights(config, LM, seed=seed)
    weights["final_logits_bias"][0, config.eos_token_id] += 1.0  # replies end at different steps
    params = jax.tree_util.tree_map(jnp.asarray, params_from_tensors(weights, config, LM))
    return FlaxBlenderbotForConditionalGeneration(config, _do_init=False, params=params)


@pytest.mark.parametrize("name,overrides", STEP_CONFIGS)
def test_kernel_step_matches_module_step(name, overrides):
    from helpers import random_batch

    from blenderbot_mb.flax import decoding
    from blenderbot_mb.flax import generation as G

    model = _model(name, overrides)
    config, params = model.config, model.params
    batch = random_batch(config, batch=3)
    mask = jnp.asarray(batch["attention_mask"], jnp.int32)
    enc = model.encode(batch["input_ids"], attention_mask=mask).last_hidden_state
    cross = G._cross_kv(model, params, enc, mask)
    module_step = jax.jit(partial(G._decode_step, model))
    kernel_step = jax.jit(partial(decoding.decode_step, config, launch=decoding.Launch(block_n=16, block_l=4)))
    weights = decoding.prepare_weights(params, config, jnp.float32)
    ours = theirs = model.init_cache(3, 7)
    tokens = np.random.default_rng(1).integers(3, config.vocab_size, (6, 3)).astype(np.int32)
    for t, token in enumerate(jnp.asarray(tokens)):
        expected, theirs = module_step(params, theirs, cross, token, t + 1, enc, mask)
        got, ours = kernel_step(weights, ours, cross, token, t + 1, mask)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,settings", [(1, dict(num_beams=1, max_length=9, min_length=3)),  # one-row kernels
                                           (2, dict(num_beams=4, max_length=9, no_repeat_ngram_size=2,
                                                    encoder_no_repeat_ngram_size=2, num_return_sequences=2))])
def test_generate_with_kernels_gives_the_same_tokens(rows, settings):
    from helpers import random_batch

    model = _model("odd", {})
    batch = random_batch(model.config, batch=rows)
    args = dict(attention_mask=batch["attention_mask"], do_sample=False, **settings)
    expected = model.generate(batch["input_ids"], **args).sequences
    got = model.generate(batch["input_ids"], kernels=True, **args).sequences
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_generate_with_kernels_refuses_what_it_does_not_compute():
    from helpers import random_batch

    from blenderbot_mb.errors import ConfigError

    model = _model("tiny", dict(activation_function="silu"))
    batch = random_batch(model.config, batch=1)
    with pytest.raises(ConfigError, match="activations"):
        model.generate(batch["input_ids"], kernels=True, max_length=4)
    with pytest.raises(ConfigError, match="kernels="):
        model.generate(batch["input_ids"], kernels="yes", max_length=4)

"""Flax models against transformers' PyTorch classes (the oracle) and our PyTorch backend, on the same weights."""

import numpy as np
import pytest

pytest.importorskip("flax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import TINY_CONFIGS, hf_model, make_config, random_batch, random_weights, write_checkpoint  # noqa: E402

from blenderbot_mb.checkpoint_msgpack import params_from_tensors  # noqa: E402
from blenderbot_mb.errors import InputError  # noqa: E402
from blenderbot_mb.flax import (  # noqa: E402
    FlaxBlenderbotForConditionalGeneration,
    FlaxBlenderbotModel,
    shift_tokens_right,
)
from blenderbot_mb.naming import flax_path, tensor_specs  # noqa: E402

LM = "BlenderbotForConditionalGeneration"


def flax_model(config, weights, cls=FlaxBlenderbotForConditionalGeneration, **kwargs):
    params = jax.tree_util.tree_map(jnp.asarray, params_from_tensors(weights, config, cls.architecture))
    return cls(config, _do_init=False, params=params, **kwargs)


def torch_inputs(batch):
    torch = pytest.importorskip("torch")
    return {k: torch.from_numpy(v) for k, v in batch.items() if k != "decoder_input_ids"}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_and_loss_match_transformers(name):
    torch = pytest.importorskip("torch")
    config = make_config(name)
    weights = random_weights(config, LM, seed=1)
    batch = random_batch(config)  # padded encoder batch, -100 in the labels
    with torch.no_grad():
        ref = hf_model(config, weights, LM)(**torch_inputs(batch), output_hidden_states=True)
    out = flax_model(config, weights)(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                                      output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.encoder_last_hidden_state), ref.encoder_last_hidden_state.numpy(),
                               atol=1e-5, rtol=0)
    assert len(out.decoder_hidden_states) == config.decoder_layers + 1
    assert len(out.encoder_hidden_states) == config.encoder_layers + 1


def test_base_model_matches_transformers_and_has_no_model_level():
    torch = pytest.importorskip("torch")
    config = make_config("odd")
    weights = random_weights(config, "BlenderbotModel", seed=2)
    batch = random_batch(config, batch=2)
    with torch.no_grad():
        ref = hf_model(config, weights, "BlenderbotModel")(
            input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"]),
            decoder_input_ids=torch.from_numpy(batch["decoder_input_ids"]))
    model = flax_model(config, weights, FlaxBlenderbotModel)
    assert set(model.params) == {"shared", "encoder", "decoder"}
    out = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)


def test_matches_our_torch_backend(tmp_path):
    try:
        from blenderbot_mb.torch import BlenderbotForConditionalGeneration
    except ImportError:
        pytest.skip("PyTorch backend not importable")
    torch = pytest.importorskip("torch")
    config = make_config("relu")
    weights = random_weights(config, LM, seed=3)
    batch = random_batch(config)
    ours_pt = BlenderbotForConditionalGeneration.from_pretrained(write_checkpoint(tmp_path / "m", config, weights))
    ours_pt.eval()
    with torch.no_grad():
        ref = ours_pt(**torch_inputs(batch))
    out = flax_model(config, weights)(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), atol=1e-5, rtol=0)


def test_params_paths_are_hugging_face_flax_names():
    config = make_config("tiny")
    model = FlaxBlenderbotForConditionalGeneration(config, seed=0)  # random init through the linen modules
    paths = {tuple(str(k.key) for k in path): leaf.shape
             for path, leaf in jax.tree_util.tree_leaves_with_path(model.params)}
    expected = {}
    for spec in tensor_specs(config, LM):
        shape = spec.shape[::-1] if spec.kind == "linear" else spec.shape
        expected[flax_path(spec)] = shape
    assert paths == expected
    assert ("model", "encoder", "layers", "0", "self_attn", "k_proj", "kernel") in paths
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(model.params))


def test_untied_lm_head_is_a_dense_kernel():
    config = make_config("tiny", tie_word_embeddings=False)
    weights = random_weights(config, LM, seed=4)
    model = flax_model(config, weights)
    assert model.params["lm_head"]["kernel"].shape == (config.d_model, config.vocab_size)
    batch = random_batch(config, batch=2)
    torch = pytest.importorskip("torch")
    # transformers 5 unties the encoder/decoder embed_tokens too when tie_word_embeddings is False; the
    # architecture shares them with model.shared, so hand the oracle the same matrix for all three
    shared = weights["model.shared.weight"]
    oracle = {**weights, "model.encoder.embed_tokens.weight": shared, "model.decoder.embed_tokens.weight": shared}
    with torch.no_grad():
        ref = hf_model(config, oracle, LM)(**torch_inputs(batch))
    out = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)


def test_cached_decode_step_by_step_equals_full_forward():
    config = make_config("odd")
    model = flax_model(config, random_weights(config, LM, seed=5))
    batch = random_batch(config, batch=2, tgt_len=6)
    ids, mask, dec = batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
    full = model(ids, mask, dec).logits
    enc = model.encode(ids, mask)
    cache = model.init_cache(2, 8)
    steps = []
    # first two tokens in one call, then one at a time
    out = model.decode(dec[:, :2], enc, mask, past_key_values=cache)
    steps.append(out.logits)
    for t in range(2, dec.shape[1]):
        out = model.decode(dec[:, t:t + 1], enc, mask, past_key_values=out.past_key_values)
        steps.append(out.logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), np.asarray(full), atol=1e-5)
    with pytest.raises(InputError, match="cache"):
        model.decode(dec[:, :3], enc, mask, past_key_values=out.past_key_values)


def test_outputs_are_pytrees_under_jit_and_tuples_on_request():
    config = make_config("tiny")
    model = flax_model(config, random_weights(config, LM, seed=6))
    batch = random_batch(config, batch=2)

    @jax.jit
    def forward(params, ids, mask, dec):
        return model(ids, mask, dec, params=params)

    out = forward(model.params, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    eager = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    assert type(out).__name__ == "Seq2SeqLMOutput"
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(eager.logits), atol=1e-5)
    as_tuple = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], return_dict=False)
    np.testing.assert_allclose(np.asarray(as_tuple[0]), np.asarray(eager.logits), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    config = make_config("tiny")
    weights = random_weights(config, LM, seed=7)
    model = flax_model(config, weights, dtype=jnp.bfloat16)
    batch = random_batch(config, batch=2)
    out = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    assert out.logits.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(model.params))
    ref = flax_model(config, weights)(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    assert np.abs(np.asarray(out.logits, np.float32) - np.asarray(ref.logits)).max() < 0.15
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(model.to_bf16()))


def test_shift_tokens_right():
    labels = np.array([[5, 6, 2, -100], [7, 2, -100, -100]])
    expected = np.array([[1, 5, 6, 2], [1, 7, 2, 0]])  # start token, drop last, -100 -> pad
    np.testing.assert_array_equal(np.asarray(shift_tokens_right(labels, 0, 1)), expected)


def test_bad_input_gives_clear_errors():
    config = make_config("tiny")
    model = flax_model(config, random_weights(config, LM, seed=8))
    too_long = np.full((1, config.max_position_embeddings + 1), 5)
    with pytest.raises(InputError, match="position embeddings"):
        model(too_long)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        model(np.array([[5, config.vocab_size]]))
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        model.encode(np.array([[-1, 5]]))
    with pytest.raises(InputError, match="decoder_input_ids"):
        model(np.array([[5, 2]]), decoder_input_ids=np.array([[1, config.vocab_size + 7]]))
    with pytest.raises(InputError, match="position embeddings"):
        model.init_cache(1, config.max_position_embeddings + 1)
    with pytest.raises(InputError, match="shape"):
        model(np.array([5, 6, 2]))


def test_layer_norm_of_rows_far_from_zero_keeps_their_variance():
    """The variance as the mean of (x - mean)^2 (PyTorch's), not E[x^2] - E[x]^2: in float32 the latter loses a
    row of mean 1e4 and standard deviation ~1 to rounding (E[x^2] ~ 1e8, spaced 8 apart)."""
    from blenderbot_mb.flax import modeling

    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(0, 1, (3, 64))).astype(np.float32)
    g, b = rng.normal(1, 0.1, 64).astype(np.float32), rng.normal(0, 0.1, 64).astype(np.float32)
    norm = modeling._norm("n", jnp.float32)
    got = norm.apply({"params": {"scale": g, "bias": b}}, jnp.asarray(x))
    xd = x.astype(np.float64)
    want = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3)

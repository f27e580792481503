"""TF backend model: parity with transformers' PyTorch classes (and our PyTorch backend), caches, inputs, errors."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from helpers import TINY_CONFIGS, hf_model, make_config, random_batch, random_weights, write_checkpoint  # noqa: E402

from blenderbot_mb.errors import CheckpointError, InputError  # noqa: E402
from blenderbot_mb.tf import (  # noqa: E402
    TFBlenderbotForConditionalGeneration,
    TFBlenderbotModel,
    shift_tokens_right,
)

ATOL = 1e-5


def tf_lm(config, weights):
    model = TFBlenderbotForConditionalGeneration(config)
    model.load_weights_dict(weights)
    return model


def torch_forward(model, batch, **kwargs):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_and_loss_match_transformers(name):
    config = make_config(name)
    weights = random_weights(config, seed=3)
    batch = random_batch(config)  # right-padded, uneven lengths, -100 labels
    ours = tf_lm(config, weights)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"])
    ref = torch_forward(hf_model(config, weights), {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    np.testing.assert_allclose(ours.logits.numpy(), ref.logits.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(float(ours.loss), float(ref.loss), atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours.encoder_last_hidden_state.numpy(), ref.encoder_last_hidden_state.numpy(),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_base_model_matches_transformers(name):
    config = make_config(name)
    weights = random_weights(config, "BlenderbotModel", seed=4)
    model = TFBlenderbotModel(config)
    model.load_weights_dict(weights)
    batch = random_batch(config)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    ours = model(**inputs)
    ref = torch_forward(hf_model(config, weights, "BlenderbotModel"), inputs)
    np.testing.assert_allclose(ours.last_hidden_state.numpy(), ref.last_hidden_state.numpy(), atol=ATOL, rtol=0)


def test_logits_match_our_torch_backend():
    torch_modeling = pytest.importorskip("blenderbot_mb.torch.modeling")
    torch = pytest.importorskip("torch")
    config = make_config("odd")
    weights = random_weights(config, seed=5)
    batch = random_batch(config)
    pt = torch_modeling.BlenderbotForConditionalGeneration(config).eval()
    pt.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    if hasattr(pt, "tie_weights"):
        pt.tie_weights()
    ref = torch_forward(pt, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    ours = tf_lm(config, weights)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"])
    np.testing.assert_allclose(ours.logits.numpy(), ref.logits.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(float(ours.loss), float(ref.loss), atol=ATOL, rtol=0)


def test_cached_decoding_equals_full_forward():
    config = make_config("odd")
    model = tf_lm(config, random_weights(config, seed=6))
    batch = random_batch(config)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["decoder_input_ids"]).logits.numpy()
    enc = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    past, steps = None, []
    for t in range(batch["decoder_input_ids"].shape[1]):
        out = model(attention_mask=batch["attention_mask"], encoder_outputs=enc, past_key_values=past,
                    decoder_input_ids=batch["decoder_input_ids"][:, t:t + 1], use_cache=True)
        past = out.past_key_values
        steps.append(out.logits.numpy())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=ATOL, rtol=0)
    assert len(past) == config.decoder_layers and len(past[0]) == 4
    # the fixed-shape cache generate() uses gives the same logits
    cache = model._init_generation_cache(enc.last_hidden_state, 10)
    for t in range(batch["decoder_input_ids"].shape[1]):
        logits, cache = model._step(tf.constant(batch["decoder_input_ids"][:, t], tf.int32), tf.constant(t), cache,
                                    enc.last_hidden_state, tf.constant(batch["attention_mask"]))
        np.testing.assert_allclose(logits.numpy(), full[:, t], atol=ATOL, rtol=0)


def test_hidden_states_attentions_and_tuple_output():
    config = make_config("tiny")
    model = tf_lm(config, random_weights(config))
    batch = random_batch(config)
    out = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
                output_hidden_states=True, output_attentions=True)
    assert len(out.encoder_hidden_states) == config.encoder_layers + 1
    assert len(out.decoder_hidden_states) == config.decoder_layers + 1
    assert out.decoder_attentions[0].shape == (3, 4, 7, 7)
    assert out.cross_attentions[0].shape == (3, 4, 7, 9)
    np.testing.assert_allclose(out.encoder_attentions[0].numpy().sum(-1), 1.0, atol=1e-5)
    as_tuple = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"], return_dict=False)
    np.testing.assert_array_equal(as_tuple[0].numpy(), out.logits.numpy())
    # the reference's other calling conventions: a dict or a list as the first argument
    as_dict = model({"input_ids": batch["input_ids"], "decoder_input_ids": batch["decoder_input_ids"]})
    np.testing.assert_array_equal(as_dict.logits.numpy(), out.logits.numpy())
    as_list = model([batch["input_ids"], np.ones_like(batch["input_ids"]), batch["decoder_input_ids"]])
    np.testing.assert_array_equal(as_list.logits.numpy(), out.logits.numpy())


def test_outputs_returned_from_tf_functions_keep_every_field():
    """TensorFlow rebuilds a mapping that leaves a tf.function from (name, value) pairs: the model's outputs and
    generate()'s come back whole, as eager calls give them (each field once, in the class' order)."""
    config = make_config("tiny")
    model = tf_lm(config, random_weights(config))
    batch = random_batch(config)
    ids, labels = tf.constant(batch["input_ids"]), tf.constant(batch["labels"])
    eager = model(input_ids=ids, labels=labels, output_hidden_states=True)
    traced = tf.function(lambda i, y: model(input_ids=i, labels=y, output_hidden_states=True))(ids, labels)
    assert type(traced) is type(eager) and list(traced) == list(eager)
    np.testing.assert_allclose(traced.loss.numpy(), eager.loss.numpy(), atol=1e-5)
    np.testing.assert_allclose(traced[1].numpy(), eager.logits.numpy(), atol=1e-5)
    assert len(traced.decoder_hidden_states) == config.decoder_layers + 1
    want = model.generate(ids, num_beams=2, max_length=8, return_dict_in_generate=True)
    for jit in (False, True):
        got = tf.function(model.generate, jit_compile=jit)(ids, num_beams=2, max_length=8,
                                                            return_dict_in_generate=True)
        assert list(got) == ["sequences", "sequences_scores", "beam_indices"], jit
        width = want.sequences.shape[1]  # (compiled: max_length columns)
        assert got.sequences.numpy()[:, :width].tolist() == want.sequences.numpy().tolist()
        np.testing.assert_allclose(got.sequences_scores.numpy(), want.sequences_scores.numpy(), atol=1e-5)
        assert got.beam_indices.numpy()[:, :width - 1].tolist() == want.beam_indices.numpy().tolist()


def test_dropout_only_in_training():
    config = make_config("tiny", dropout=0.3, attention_dropout=0.2, activation_dropout=0.1)
    model = tf_lm(config, random_weights(config))
    batch = random_batch(config)
    inputs = dict(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
    a, b = model(**inputs).logits.numpy(), model(**inputs).logits.numpy()
    np.testing.assert_array_equal(a, b)
    c = model(**inputs, training=True).logits.numpy()
    assert np.abs(a - c).max() > 1e-3


def test_tied_embeddings_and_logits_bias():
    config = make_config("tiny")
    model = tf_lm(config, random_weights(config))
    assert model.get_output_embeddings() is model.get_input_embeddings()
    assert not any(v is model.final_logits_bias for v in model.trainable_weights)
    assert len(model.trainable_weights) == len(model.named_weights()) - 1  # all but final_logits_bias


def test_untied_lm_head_matches_transformers():
    config = make_config("tiny", tie_word_embeddings=False)
    weights = random_weights(config, seed=8)
    assert "lm_head.weight" in weights
    batch = random_batch(config)
    ours = tf_lm(config, weights)(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
    # transformers 5 unties the encoder/decoder token embeddings too when tie_word_embeddings is False; give
    # them the shared matrix, as the reference's 4.x classes (and the HF file layout) do
    shared = weights["model.shared.weight"]
    oracle = hf_model(config, {**weights, "model.encoder.embed_tokens.weight": shared,
                               "model.decoder.embed_tokens.weight": shared})
    ref = torch_forward(oracle, {k: batch[k] for k in ("input_ids", "decoder_input_ids")})
    np.testing.assert_allclose(ours.logits.numpy(), ref.logits.numpy(), atol=ATOL, rtol=0)


def test_shift_tokens_right():
    labels = np.array([[5, 6, 2, -100], [7, 2, -100, -100]])
    np.testing.assert_array_equal(shift_tokens_right(labels, 0, 1).numpy(), [[1, 5, 6, 2], [1, 7, 2, 0]])


def test_safetensors_round_trip_and_transformers_loads_it(tmp_path):
    config = make_config("odd")
    weights = random_weights(config, seed=9)
    model = tf_lm(config, weights)
    model.save_pretrained(tmp_path / "ours")
    again = TFBlenderbotForConditionalGeneration.from_pretrained(tmp_path / "ours")
    batch = random_batch(config)
    inputs = dict(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
    np.testing.assert_array_equal(again(**inputs).logits.numpy(), model(**inputs).logits.numpy())
    transformers = pytest.importorskip("transformers")
    hf = transformers.BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ref = torch_forward(hf, inputs)
    np.testing.assert_allclose(model(**inputs).logits.numpy(), ref.logits.numpy(), atol=ATOL, rtol=0)


def test_lm_file_loads_into_base_model(tmp_path):
    config = make_config("tiny")
    weights = random_weights(config, seed=10)
    write_checkpoint(tmp_path / "lm", config, weights)
    bare = TFBlenderbotModel.from_pretrained(tmp_path / "lm")
    np.testing.assert_array_equal(bare.state_dict()["shared.weight"], weights["model.shared.weight"])
    np.testing.assert_array_equal(bare.state_dict()["encoder.layers.1.fc2.weight"],
                                  weights["model.encoder.layers.1.fc2.weight"])


def test_bad_input_gives_clear_errors(tmp_path):
    config = make_config("tiny")
    model = tf_lm(config, random_weights(config))
    too_long = np.full((1, config.max_position_embeddings + 1), 5)
    with pytest.raises(InputError, match="position embeddings"):
        model(input_ids=too_long, decoder_input_ids=[[1]])
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        model(input_ids=[[5, config.vocab_size]], decoder_input_ids=[[1]])
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        model(input_ids=[[5, -1]], decoder_input_ids=[[1]])
    with pytest.raises(InputError, match="position embeddings"):
        model(input_ids=[[5, 6]], decoder_input_ids=np.ones((1, config.max_position_embeddings + 1), int))
    with pytest.raises(InputError, match="unexpected model input"):
        model(input_ids=[[5, 6]], decoder_input_ids=[[1]], token_type_ids=[[0, 0]])
    # while tracing, a static over-long shape is still caught (autograph may wrap the InputError, with its message)
    traced = tf.function(lambda ids: model(input_ids=ids, decoder_input_ids=tf.ones((1, 1), tf.int32)).logits)
    with pytest.raises(Exception, match="has only 64 position embeddings"):
        traced(tf.constant(too_long, tf.int32))
    # checkpoints: mis-shaped, missing and extra tensors listed by name
    weights = random_weights(config)
    weights["model.encoder.layers.0.fc1.weight"] = weights["model.encoder.layers.0.fc1.weight"][:, :-1]
    del weights["model.decoder.layer_norm.bias"]
    weights["model.encoder.layers.9.fc1.bias"] = np.zeros(3, np.float32)
    write_checkpoint(tmp_path / "bad", config, weights)
    with pytest.raises(CheckpointError) as err:
        TFBlenderbotForConditionalGeneration.from_pretrained(tmp_path / "bad")
    message = str(err.value)
    for name in ("model.encoder.layers.0.fc1.weight", "model.decoder.layer_norm.bias",
                 "model.encoder.layers.9.fc1.bias"):
        assert name in message

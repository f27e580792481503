"""The reference's Flax usage examples, run against a tiny local checkpoint and tokenizer."""

import os

import numpy as np
import pytest

pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
from helpers import random_weights, write_checkpoint  # noqa: E402

from blenderbot_mb import BlenderbotConfig  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration, FlaxBlenderbotModel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def checkpoint(tokenizer_folder, tmp_path_factory):
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = BlenderbotConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=64, scale_embedding=True)
    folder = tmp_path_factory.mktemp("flax_example_model")
    generation = dict(num_beams=10, min_length=20, max_length=60, length_penalty=0.65, no_repeat_ngram_size=3,
                      encoder_no_repeat_ngram_size=3, forced_eos_token_id=2, decoder_start_token_id=1,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the published settings
    return write_checkpoint(folder, config, random_weights(config, seed=0), generation=generation,
                            tokenizer=tokenizer), tokenizer


def test_model_call_example(checkpoint):
    folder, tokenizer = checkpoint
    model = FlaxBlenderbotModel.from_pretrained(folder)
    inputs = tokenizer("Hello, my dog is cute", return_tensors="jax")
    outputs = model(**inputs)
    last_hidden_states = outputs.last_hidden_state
    # without decoder_input_ids the decoder reads shift_tokens_right(input_ids), as the reference does
    assert last_hidden_states.shape == (1, inputs["input_ids"].shape[1], model.config.d_model)


def test_encode_decode_examples(checkpoint):
    folder, tokenizer = checkpoint
    model = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)
    text = "My friends are cool but they eat too many carbs."
    inputs = tokenizer(text, max_length=1024, return_tensors="jax")
    encoder_outputs = model.encode(**inputs)
    assert encoder_outputs.last_hidden_state.shape == (1, inputs["input_ids"].shape[1], model.config.d_model)

    decoder_start_token_id = model.config.decoder_start_token_id
    decoder_input_ids = jnp.ones((inputs.input_ids.shape[0], 1), dtype="i4") * decoder_start_token_id
    outputs = model.decode(decoder_input_ids, encoder_outputs)
    logits = outputs.logits
    full = model(inputs["input_ids"], inputs["attention_mask"], decoder_input_ids).logits
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=1e-5)

    base = FlaxBlenderbotModel.from_pretrained(folder)
    last_decoder_hidden_states = base.decode(decoder_input_ids, base.encode(**inputs)).last_hidden_state
    assert last_decoder_hidden_states.shape == (1, 1, model.config.d_model)


def test_conversation_example(checkpoint):
    folder, tokenizer = checkpoint
    model = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)
    UTTERANCE = "My friends are cool but they eat too many carbs."
    inputs = tokenizer([UTTERANCE], max_length=1024, return_tensors="np")
    reply_ids = model.generate(inputs["input_ids"], num_beams=4, max_length=5, early_stopping=True).sequences
    replies = [tokenizer.decode(g, skip_special_tokens=True, clean_up_tokenization_spaces=False) for g in reply_ids]
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert reply_ids.shape[1] <= 5 and int(reply_ids[0, 0]) == model.config.decoder_start_token_id


def test_finetune_example_lowers_the_loss():
    import importlib.util

    spec = importlib.util.spec_from_file_location("flax_finetune", os.path.join(HERE, "..", "docs", "examples",
                                                                                 "flax_finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.main(["--steps", "12", "--batch-size", "4"])
    assert losses[-1] < losses[0] - 0.3

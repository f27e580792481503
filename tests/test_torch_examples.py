"""The PyTorch usage examples of the API reference, run against a tiny local checkpoint and tokenizer.

Each test follows its example line by line; only the checkpoint name (a local folder instead of
facebook/blenderbot-400M-distill) and the model size differ.
"""

import pytest

torch = pytest.importorskip("torch")

from helpers import make_config, random_weights, write_checkpoint  # noqa: E402

from blenderbot_mb import BlenderbotConfig  # noqa: E402
from blenderbot_mb.torch import (  # noqa: E402
    BlenderbotForCausalLM,
    BlenderbotForConditionalGeneration,
    BlenderbotModel,
)


@pytest.fixture(scope="module")
def mname(tokenizer_folder, tmp_path_factory):
    """A tiny model folder with the test tokenizer, laid out like facebook/blenderbot-400M-distill."""
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = make_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=128)
    generation = {"num_beams": 4, "min_length": 5, "max_length": 20, "length_penalty": 0.65,
                  "no_repeat_ngram_size": 3, "encoder_no_repeat_ngram_size": 3, "forced_eos_token_id": 2}
    return write_checkpoint(tmp_path_factory.mktemp("bb") / "blenderbot-tiny", config,
                            random_weights(config, seed=0), generation=generation, tokenizer=tokenizer)


def test_config_and_model_example():
    # >>> configuration = BlenderbotConfig(); model = BlenderbotModel(configuration); configuration = model.config
    configuration = BlenderbotConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4)
    model = BlenderbotModel(configuration)
    configuration = model.config
    assert configuration.d_model == 32 and configuration.vocab_size == 8008
    assert BlenderbotConfig().d_model == 2560 and BlenderbotConfig().decoder_layers == 24  # the 3B-style default


def test_conditional_generation_chat_example(mname):
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    model = BlenderbotForConditionalGeneration.from_pretrained(mname)
    tokenizer = BlenderbotTokenizer.from_pretrained(mname)
    UTTERANCE = "My friends are cool but they eat too many carbs."
    inputs = tokenizer([UTTERANCE], return_tensors="pt")
    reply_ids = model.generate(**inputs)
    assert reply_ids[0, 0].item() == model.config.decoder_start_token_id
    assert 5 <= reply_ids.shape[1] <= 20  # min_length / max_length of the checkpoint's generation settings
    reply = tokenizer.batch_decode(reply_ids, skip_special_tokens=True)[0]
    assert isinstance(reply, str)

    NEXT_UTTERANCE = (
        "My friends are cool but they eat too many carbs.</s> <s>That's unfortunate. "
        "Are they trying to lose weight or are they just trying to be healthier?</s> "
        "<s> I'm not sure."
    )
    inputs = tokenizer([NEXT_UTTERANCE], return_tensors="pt")
    next_reply_ids = model.generate(**inputs)
    assert isinstance(tokenizer.batch_decode(next_reply_ids, skip_special_tokens=True)[0], str)


def test_base_model_example(mname):
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    model = BlenderbotModel.from_pretrained(mname)
    tokenizer = BlenderbotTokenizer.from_pretrained(mname)
    inputs = tokenizer("Studies have been shown that owning a dog is good for you", return_tensors="pt")
    decoder_input_ids = tokenizer("Studies show that", return_tensors="pt").input_ids  # Batch size 1
    outputs = model(input_ids=inputs.input_ids, decoder_input_ids=decoder_input_ids)
    last_hidden_states = outputs.last_hidden_state
    assert list(last_hidden_states.shape) == [1, decoder_input_ids.shape[1], model.config.d_model]


def test_causal_lm_example(mname):
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(mname)
    model = BlenderbotForCausalLM.from_pretrained(mname, add_cross_attention=False)
    assert model.config.is_decoder, f"{model.__class__} has to be configured as a decoder."
    inputs = tokenizer("Hello, my dog is cute", return_tensors="pt")
    outputs = model(**inputs)
    logits = outputs.logits
    expected_shape = [1, inputs.input_ids.shape[-1], model.config.vocab_size]
    assert list(logits.shape) == expected_shape


def test_fine_tune_helper_lowers_the_loss(mname):
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch import fine_tune

    torch.manual_seed(0)
    model = BlenderbotForConditionalGeneration.from_pretrained(mname)
    tokenizer = BlenderbotTokenizer.from_pretrained(mname)
    pairs = [("Hi, how are you?", "I am fine, thanks."), ("Do you like dogs?", "Yes, I love dogs.")]
    losses = fine_tune(model, tokenizer, pairs, epochs=40, lr=1e-2, batch_size=2)
    assert losses[-1] < 0.3 * losses[0]
    assert not model.training


def test_train_step_takes_a_batch_dict(mname):
    from blenderbot_mb.errors import InputError
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch import train_step
    from blenderbot_mb.torch.training import make_batch

    model = BlenderbotForConditionalGeneration.from_pretrained(mname)
    batch = make_batch(BlenderbotTokenizer.from_pretrained(mname), [("Hi!", "Hello.")])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    assert train_step(model, batch, optimizer) > 0
    with pytest.raises(InputError, match="a batch as a dict .* got tuple"):
        train_step(model, tuple(batch.values()), optimizer)

"""The TF usage examples of the API reference, run against a tiny local checkpoint and tokenizer."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("blenderbot_mb.tokenizer")

from helpers import make_config, random_weights, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_folder):
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    tokenizer = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    config = make_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("tf_example")
    generation = dict(num_beams=3, min_length=4, max_length=12, length_penalty=0.65, no_repeat_ngram_size=3,
                      encoder_no_repeat_ngram_size=3, forced_eos_token_id=2, decoder_start_token_id=1, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    return write_checkpoint(folder, config, random_weights(config), generation=generation, tokenizer=tokenizer)


def test_tf_blenderbot_model_example(checkpoint):
    from blenderbot_mb.tf import TFBlenderbotModel
    from blenderbot_mb.tokenizer import BlenderbotTokenizer as AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = TFBlenderbotModel.from_pretrained(checkpoint)

    inputs = tokenizer("Hello, my dog is cute", return_tensors="tf")
    outputs = model(inputs)

    last_hidden_states = outputs.last_hidden_state
    assert isinstance(last_hidden_states, tf.Tensor)
    assert last_hidden_states.shape == (1, 1, model.config.d_model)


def test_tf_conditional_generation_example(checkpoint):
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration
    from blenderbot_mb.tokenizer import BlenderbotTokenizer as AutoTokenizer

    mname = checkpoint
    model = TFBlenderbotForConditionalGeneration.from_pretrained(mname)
    tokenizer = AutoTokenizer.from_pretrained(mname)
    UTTERANCE = "My friends are cool but they eat too many carbs."
    inputs = tokenizer([UTTERANCE], return_tensors="tf")
    reply_ids = model.generate(**inputs)
    reply = tokenizer.batch_decode(reply_ids, skip_special_tokens=True)[0]
    assert isinstance(reply, str)
    ids = reply_ids.numpy()
    assert ids[0, 0] == 1 and 4 <= ids.shape[1] <= 12  # the checkpoint's min/max length were used

    NEXT_UTTERANCE = (
        "My friends are cool but they eat too many carbs.</s> <s>That's unfortunate. "
        "Are they trying to lose weight or are they just trying to be healthier?</s> "
        "<s> I'm not sure."
    )
    inputs = tokenizer([NEXT_UTTERANCE], return_tensors="tf")
    next_reply_ids = model.generate(**inputs)
    assert isinstance(tokenizer.batch_decode(next_reply_ids, skip_special_tokens=True)[0], str)
    # the same reply through the PyTorch oracle on the same folder (when transformers is installed)
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = transformers.BlenderbotForConditionalGeneration.from_pretrained(mname).eval()
    with torch.no_grad():
        expected = hf.generate(input_ids=torch.tensor(inputs["input_ids"].numpy()),
                               attention_mask=torch.tensor(inputs["attention_mask"].numpy())).numpy()
    np.testing.assert_array_equal(next_reply_ids.numpy(), expected)


def test_finetune_example_runs(tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "tf_finetune.py")
    spec = importlib.util.spec_from_file_location("tf_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(["--out", str(tmp_path), "--epochs", "3"])
    assert losses[-1] < losses[0]
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration

    assert TFBlenderbotForConditionalGeneration.from_pretrained(tmp_path).config.d_model == 64

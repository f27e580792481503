"""One checkpoint folder, three backends: the same logits (fp32, 1e-5) and the same greedy and beam tokens.

Each backend is also tested against transformers on its own; this checks the contract directly, through
each backend's public from_pretrained / __call__ / generate on the very same files.
"""

import numpy as np
import pytest
from helpers import make_config, random_batch, random_weights, write_checkpoint

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jnp = pytest.importorskip("jax.numpy")

from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402

EOS = 2
SETTINGS = {
    "greedy": dict(max_length=14, min_length=3),
    "published": dict(num_beams=4, max_length=16, min_length=5, length_penalty=0.65, no_repeat_ngram_size=3,
                      encoder_no_repeat_ngram_size=3, num_return_sequences=2),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = make_config("odd")
    weights = random_weights(config, seed=11)
    weights["final_logits_bias"][0, EOS] += 4.0  # replies end at different lengths
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt"), config, weights)
    return (config, BlenderbotForConditionalGeneration.from_pretrained(folder).eval(),
            TFBlenderbotForConditionalGeneration.from_pretrained(folder),
            FlaxBlenderbotForConditionalGeneration.from_pretrained(folder))


def test_logits_agree(models):
    config, pt, tf_model, fx = models
    b = random_batch(config, batch=3, src_len=11, tgt_len=6)
    with torch.no_grad():
        want = pt(**{k: torch.from_numpy(v) for k, v in b.items()})
    got_tf = tf_model(**{k: tf.constant(v) for k, v in b.items() if k != "labels"}, labels=tf.constant(b["labels"]))
    got_fx = fx(b["input_ids"], b["attention_mask"], b["decoder_input_ids"])
    for got in (np.asarray(got_tf.logits), np.asarray(got_fx.logits)):
        np.testing.assert_allclose(got, want.logits.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(got_tf.loss), float(want.loss), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_generate_tokens_agree(models, name):
    config, pt, tf_model, fx = models
    b = random_batch(config, batch=3, src_len=10)
    settings = SETTINGS[name]
    with torch.no_grad():
        want = pt.generate(torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"]),
                           **settings).numpy()
    got_tf = tf_model.generate(tf.constant(b["input_ids"]), attention_mask=tf.constant(b["attention_mask"]),
                               **settings).numpy()
    got_fx = np.asarray(fx.generate(b["input_ids"], b["attention_mask"], **settings).sequences)
    lengths = {int((row != 0).sum()) for row in want}
    assert len(lengths) > 1  # the rows end at different steps, so padding is exercised
    np.testing.assert_array_equal(got_tf, want)
    np.testing.assert_array_equal(got_fx, want)


def test_float64_models_give_a_float64_loss(models, tmp_path):
    """A float64 model's loss is float64 (narrower logits are widened to float32) and equal, in each backend, to
    the mean cross-entropy numpy computes in float64 from its logits; the three backends' float64 logits agree
    to 1e-7 (float32 rounding would be ~1e-6 here; TensorFlow's float64 erf, in the exact gelu, is good to
    ~5e-9)."""
    import jax

    config = models[0]
    folder = write_checkpoint(tmp_path, config, random_weights(config, seed=11))
    b = random_batch(config, batch=3, src_len=11, tgt_len=6)
    b["labels"][0, -2:] = -100

    def numpy_loss(logits):
        logits = np.asarray(logits, np.float64)
        keep = b["labels"] != -100
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, np.where(keep, b["labels"], 0)[..., None], -1)[..., 0]
        return -(picked * keep).sum() / keep.sum()

    pt = BlenderbotForConditionalGeneration.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        out_pt = pt(**{k: torch.from_numpy(v) for k, v in b.items()})
    out_tf = TFBlenderbotForConditionalGeneration.from_pretrained(folder, dtype="float64")(
        **{k: tf.constant(v) for k, v in b.items()})
    with jax.enable_x64(True):
        fx = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, dtype=jnp.float64,
                                                                    param_dtype=jnp.float64)
        out_fx = fx(b["input_ids"], b["attention_mask"], b["decoder_input_ids"], labels=b["labels"])
        fx_logits, fx_loss = np.asarray(out_fx.logits), np.asarray(out_fx.loss)
    results = {"torch": (out_pt.logits.numpy(), out_pt.loss.numpy()), "tf": (np.asarray(out_tf.logits),
               np.asarray(out_tf.loss)), "flax": (fx_logits, fx_loss)}
    for name, (logits, loss) in results.items():
        assert logits.dtype == np.float64 and loss.dtype == np.float64, (name, logits.dtype, loss.dtype)
        np.testing.assert_allclose(loss, numpy_loss(logits), rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(logits, results["torch"][0], rtol=0, atol=1e-7, err_msg=name)

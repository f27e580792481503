"""TF generate(): tokens equal transformers' PyTorch generate (greedy and beam), eager and under XLA."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

from helpers import hf_model, make_config, pad_after_eos, random_batch, random_weights  # noqa: E402

from blenderbot_mb.errors import ConfigError, InputError  # noqa: E402
from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration  # noqa: E402


def models(name="tiny", eos_bias=1.0, seed=0):
    """Ours and transformers' on the same weights; `eos_bias` makes eos likely, so beams end at varied lengths."""
    config = make_config(name)
    weights = random_weights(config, seed=seed)
    weights["final_logits_bias"][0, config.eos_token_id] += eos_bias
    ours = TFBlenderbotForConditionalGeneration(config)
    ours.load_weights_dict(weights)
    return ours, hf_model(config, weights), random_batch(config, batch=3)


def ours_generate(model, batch, **kwargs):
    """Settings set to None (e.g. forced_eos_token_id) go through a GenerationConfig: keyword None means "unset"."""
    unset = {k: None for k, v in kwargs.items() if v is None}
    config = model.generation_config.update(**unset) if unset else None
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config,
                          **kwargs).numpy()


def reference(hf, batch, **kwargs):
    with torch.no_grad():
        return pad_after_eos(hf.generate(input_ids=torch.tensor(batch["input_ids"]),
                                         attention_mask=torch.tensor(batch["attention_mask"]), **kwargs).numpy())


CASES = [
    dict(max_length=16),
    dict(max_new_tokens=10, min_new_tokens=4, no_repeat_ngram_size=2, repetition_penalty=1.4),
    dict(max_length=14, encoder_no_repeat_ngram_size=2, bad_words_ids=[[5], [7, 9]], forced_eos_token_id=None),
    dict(num_beams=3, max_length=16),
    dict(num_beams=4, max_length=18, num_return_sequences=3, length_penalty=0.65, no_repeat_ngram_size=3,
         encoder_no_repeat_ngram_size=3, min_length=4),
    dict(num_beams=3, max_length=16, early_stopping=True, forced_eos_token_id=None, forced_bos_token_id=9),
    dict(num_beams=2, max_length=16, early_stopping="never", length_penalty=-0.5, num_return_sequences=2),
]


@pytest.mark.parametrize("name,eos_bias,cases", [("tiny", 1.0, (0, 1, 2, 3, 4, 5, 6)), ("odd", 2.0, (1, 4, 6)),
                                                ("relu", 0.0, (0, 3))])
def test_tokens_equal_transformers(name, eos_bias, cases):
    ours, hf, batch = models(name, eos_bias)
    lengths = set()
    for kwargs in [CASES[i] for i in cases]:
        expected = reference(hf, batch, **kwargs)
        got = ours_generate(ours, batch, **kwargs)
        assert got.shape == expected.shape, kwargs
        np.testing.assert_array_equal(got, expected, err_msg=str(kwargs))
        lengths.add(expected.shape[1])
    assert len(lengths) > 1 or eos_bias == 0.0  # the cases do end at different lengths


def test_published_settings_from_the_checkpoint(tmp_path):
    """The checkpoint's generation settings (beam 10, min length, ngram blocking...) are the defaults."""
    ours, hf, batch = models("tiny", eos_bias=1.5)
    settings = dict(num_beams=5, min_length=5, max_length=20, length_penalty=0.65, no_repeat_ngram_size=3,
                    encoder_no_repeat_ngram_size=3, forced_eos_token_id=2)
    ours.generation_config = ours.generation_config.update(**settings)
    np.testing.assert_array_equal(ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"]).numpy(),
                                  reference(hf, batch, **settings))


def test_xla_greedy_and_beam_equal_transformers():
    ours, hf, batch = models("tiny", eos_bias=1.0)
    xla = tf.function(ours.generate, jit_compile=True)
    ids, mask = tf.constant(batch["input_ids"], tf.int32), tf.constant(batch["attention_mask"], tf.int32)
    for kwargs in (dict(max_length=16, no_repeat_ngram_size=2),
                   dict(num_beams=3, max_length=16, num_return_sequences=2, length_penalty=0.65,
                        no_repeat_ngram_size=3, encoder_no_repeat_ngram_size=3)):
        expected = reference(hf, batch, **kwargs)
        got = xla(ids, attention_mask=mask, **kwargs).numpy()
        assert got.shape == (expected.shape[0], kwargs["max_length"])  # static width under XLA
        np.testing.assert_array_equal(got[:, :expected.shape[1]], expected, err_msg=str(kwargs))
        assert (got[:, expected.shape[1]:] == 0).all()  # padded with pad, greedy and beam alike


def test_sampling_is_seeded_and_respects_top_k():
    ours, _, batch = models("tiny")
    kwargs = dict(do_sample=True, max_length=12, temperature=0.7, top_k=5, top_p=0.9)
    a = ours.generate(batch["input_ids"], seed=3, **kwargs).numpy()
    b = ours.generate(batch["input_ids"], seed=3, **kwargs).numpy()
    np.testing.assert_array_equal(a, b)
    c = ours.generate(batch["input_ids"], seed=4, do_sample=True, max_length=12, top_k=0).numpy()
    assert not np.array_equal(a, c)
    greedy = ours.generate(batch["input_ids"], max_length=12).numpy()
    top1 = ours.generate(batch["input_ids"], do_sample=True, top_k=1, max_length=12, seed=1).numpy()
    np.testing.assert_array_equal(top1, greedy)
    several = ours.generate(batch["input_ids"], do_sample=True, num_return_sequences=2, max_length=12, seed=1)
    assert several.shape[0] == 6
    beams = ours.generate(batch["input_ids"], do_sample=True, num_beams=3, max_length=12, seed=1).numpy()
    assert beams.shape[0] == 3 and (beams[:, 0] == 1).all()


def test_return_dict_and_scores():
    ours, hf, batch = models("tiny", eos_bias=1.0)
    out = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, max_length=14,
                        return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(batch["input_ids"]),
                          attention_mask=torch.tensor(batch["attention_mask"]), num_beams=3, max_length=14,
                          return_dict_in_generate=True, output_scores=True)
    np.testing.assert_array_equal(out.sequences.numpy(), ref.sequences.numpy())
    np.testing.assert_allclose(out.sequences_scores.numpy(), ref.sequences_scores.numpy(), atol=1e-5)


def test_bad_generation_input():
    ours, _, batch = models("tiny")
    with pytest.raises(InputError, match="position embeddings"):
        ours.generate(np.full((1, 65), 5))
    with pytest.raises(InputError, match="vocabulary"):
        ours.generate(np.array([[5, 500]]))
    with pytest.raises(ConfigError, match="max_length"):
        ours.generate(batch["input_ids"], max_length=1000)
    with pytest.raises(ConfigError, match="unknown generation setting"):
        ours.generate(batch["input_ids"], num_beam=3)


def test_xla_beam_search_with_batch_one():
    """Batch 1 under XLA (the shape the benchmark and chat use): beam tokens equal transformers'."""
    ours, hf, batch = models("tiny", eos_bias=1.0)
    one = {k: v[:1] for k, v in batch.items()}
    xla = tf.function(ours.generate, jit_compile=True)
    kwargs = dict(num_beams=4, max_length=14, min_length=3, no_repeat_ngram_size=2)
    expected = reference(hf, one, **kwargs)
    got = xla(tf.constant(one["input_ids"], tf.int32), attention_mask=tf.constant(one["attention_mask"], tf.int32),
              **kwargs).numpy()
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)


def test_eager_generate_runs_the_decoder_step_as_a_graph(monkeypatch):
    """Eager generate() runs the decoder step through a tf.function (the search around it stays eager): the
    step's Python runs only when it traces (twice, then the shapes generalize), and the tokens equal those of
    the step run op by op (tf.function run eagerly) and transformers'."""
    from blenderbot_mb.tf import generation as tf_generation

    ours, hf, _ = models("tiny", 1.0)
    config = ours.config
    traces = []
    step = tf_generation.TFGenerationMixin._step
    monkeypatch.setattr(tf_generation.TFGenerationMixin, "_step", lambda self, *a: traces.append(1) or step(self, *a))
    settings = dict(num_beams=3, max_length=12, no_repeat_ngram_size=2)
    batches = [random_batch(config, batch=b, src_len=n, seed=s) for b, n, s in ((2, 5, 1), (3, 9, 2), (2, 7, 3),
                                                                             (1, 11, 4))]
    graph = [ours_generate(ours, batch, **settings) for batch in batches]
    assert len(traces) == 2
    tf.config.run_functions_eagerly(True)
    try:
        eager = [ours_generate(ours, batch, **settings) for batch in batches]
    finally:
        tf.config.run_functions_eagerly(False)
    for g, e, batch in zip(graph, eager, batches, strict=True):
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(g, reference(hf, batch, **settings))

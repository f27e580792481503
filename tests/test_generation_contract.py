"""One table of generation edge cases, run on the three backends: each case gives the same tokens everywhere,
or the same error (class and message). The rules live once in the core (`blenderbot_mb.search`)."""

import numpy as np
import pytest
from helpers import make_config, random_batch, random_weights, write_checkpoint

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")

from blenderbot_mb import logits_process as LP  # noqa: E402
from blenderbot_mb.errors import BlenderbotError, ConfigError  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.generation_config import GenerationConfig  # noqa: E402
from blenderbot_mb.search import decode, fallback_pad_id, prepare  # noqa: E402
from blenderbot_mb.search_ops import NumpyOps  # noqa: E402
from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402

EOS = 2
CLASSES = {"torch": BlenderbotForConditionalGeneration, "tf": TFBlenderbotForConditionalGeneration,
           "flax": FlaxBlenderbotForConditionalGeneration}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = make_config("tiny")
    weights = random_weights(config, seed=7)
    weights["final_logits_bias"][0, EOS] += 1.5  # replies end at different lengths
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt"), config, weights)
    batch = random_batch(config, batch=3, src_len=9)
    return config, {name: cls.from_pretrained(folder) for name, cls in CLASSES.items()}, batch


def run(backend, model, ids, mask, **kwargs):
    """generate() on one backend with numpy inputs; numpy ids back."""
    if backend == "torch":
        out = model.generate(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                             **kwargs)
    elif backend == "tf":
        out = model.generate(tf.constant(ids), attention_mask=None if mask is None else tf.constant(mask), **kwargs)
    else:
        out = model.generate(ids, attention_mask=mask, **kwargs)
    return np.asarray(getattr(out, "sequences", out))


def outcome(backend, model, ids, mask, **kwargs):
    try:
        return run(backend, model, ids, mask, **kwargs).tolist()
    except BlenderbotError as e:
        return type(e).__name__, str(e)


def eos_in_the_middle(batch):
    ids = batch["input_ids"].copy()
    ids[:, 2] = EOS
    return ids, batch["attention_mask"]


def all_padding_row(batch):
    mask = batch["attention_mask"].copy()
    mask[1] = 0
    return batch["input_ids"], mask


# name: (inputs from the batch, settings, expected: "tokens" or the error class)
CASES = {
    "sampling 3 sequences over 2 beams": (None, dict(do_sample=True, num_beams=2, num_return_sequences=3, seed=1),
                                          "ConfigError"),
    "greedy with 2 sequences": (None, dict(num_return_sequences=2), "ConfigError"),
    "beam 3 returns 2": (None, dict(num_beams=3, num_return_sequences=2, max_length=12, min_length=3), "tokens"),
    "all-padding row": (all_padding_row, dict(max_length=8), "InputError"),
    "missing attention mask": (lambda b: (b["input_ids"], None), dict(max_length=12), "tokens"),
    "missing attention mask, beams": (lambda b: (b["input_ids"], None), dict(max_length=12, num_beams=3), "tokens"),
    "eos in the encoder input": (eos_in_the_middle, dict(max_length=12, num_beams=2), "tokens"),
    "max_new_tokens 0": (None, dict(max_new_tokens=0), "ConfigError"),
    "min length above max length": (None, dict(max_length=8, min_length=30), "tokens"),
    "min length above max length, beams": (None, dict(max_length=8, min_length=30, num_beams=3), "tokens"),
    "top_k 1 sampling with a seed is greedy": (None, dict(do_sample=True, top_k=1, seed=5, max_length=10), "tokens"),
    "seed that is not an integer": (None, dict(do_sample=True, seed="x"), "ConfigError"),
    "stop_strings without a tokenizer": (None, dict(stop_strings=["a"]), "ConfigError"),
    "negative max_time": (None, dict(max_time=-1.0), "ConfigError"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tokens_or_same_error(setup, case):
    config, models, batch = setup
    make_inputs, settings, expected = CASES[case]
    ids, mask = make_inputs(batch) if make_inputs else (batch["input_ids"], batch["attention_mask"])
    results = {name: outcome(name, model, ids, mask, **settings) for name, model in models.items()}
    assert len({repr(r) for r in results.values()}) == 1, results
    result = results["torch"]
    if expected == "tokens":
        assert isinstance(result, list), result
    else:
        assert result[0] == expected, result


def test_seeds_repeat_in_every_backend(setup):
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs = dict(do_sample=True, max_length=12, temperature=1.5, top_k=0)
    for name, model in models.items():
        a = run(name, model, ids, mask, seed=11, **kwargs)
        assert np.array_equal(a, run(name, model, ids, mask, seed=11, **kwargs)), name
        assert any(not np.array_equal(a, run(name, model, ids, mask, seed=s, **kwargs)) for s in (12, 13, 14)), name
    native = {"torch": dict(generator=torch.Generator().manual_seed(3)), "flax": dict(prng_key=jax.random.PRNGKey(3))}
    for name, extra in native.items():
        assert run(name, models[name], ids, mask, **kwargs, **extra).shape[0] == 3
        with pytest.raises(BlenderbotError, match="not both"):
            run(name, models[name], ids, mask, seed=3, **kwargs, **extra)


@pytest.mark.parametrize("backends, settings", [(("torch", "tf", "flax"), dict(num_return_sequences=2)),
                                                (("torch",), dict(num_beams=2, num_return_sequences=2))],
                         ids=["sample", "beam_sample"])
def test_a_sampled_reply_does_not_depend_on_its_batch(setup, backends, settings):
    """Each sampled row draws from its own stream: an input's replies with seed s are the same alone
    (seed=s) and at any place of a batch with a seed per input; an int seed s gives the first input the
    stream of seed=[s]."""
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs = dict(do_sample=True, max_length=9, temperature=1.5, top_k=0, **settings)
    per = kwargs["num_return_sequences"]
    for name in backends:
        model = models[name]
        together = run(name, model, ids, mask, seed=[50, 51, 52], **kwargs)
        for i in (0, 2):
            alone = run(name, model, ids[i:i + 1], mask[i:i + 1], seed=50 + i, **kwargs)
            assert together[i * per:(i + 1) * per, :alone.shape[1]].tolist() == alone.tolist(), (name, i)
        first = run(name, model, ids, mask, seed=50, **kwargs)[:per]
        assert first[:, :together.shape[1]].tolist() == together[:per, :first.shape[1]].tolist(), name
        assert len({tuple(r) for r in together[:, :6].tolist()}) > 1, name  # not one stream repeated


def test_sampling_draws_from_the_softmax():
    """The core's draw (one uniform per row, the first token whose cumulative probability reaches it)
    against numpy's softmax: frequencies within 4 standard errors, a masked token never drawn."""
    from blenderbot_mb.search import _categorical

    ops, rows = NumpyOps(), 20000
    logits = np.log(np.array([0.5, 0.0, 0.3, 0.15, 0.05], np.float32) + 1e-30)
    logits[1] = -np.inf
    names = np.stack([np.zeros(rows), np.zeros(rows), np.zeros(rows), np.full(rows, 9), np.arange(rows),
                      np.zeros(rows)], axis=1).astype(np.int32)
    drawn, _ = _categorical(ops, ops.streams(names), np.tile(logits, (rows, 1)))
    freq = np.bincount(drawn, minlength=5) / rows
    p = np.exp(logits) / np.exp(logits).sum()
    assert freq[1] == 0
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / rows) + 1e-12), (freq, p)


def test_seed_lists_are_checked(setup):
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for name, model in models.items():
        for seed, message in (([1, 2], "seed has 2 values for 3 inputs"), (["x", 1, 2], "seed must be")):
            with pytest.raises(BlenderbotError, match=message):
                run(name, model, ids, mask, do_sample=True, max_length=8, seed=seed)


class WordTokenizer:
    """Decodes ids as space-separated numbers (enough for streamers and stop strings)."""

    def decode(self, ids, **kwargs):
        return "".join(f"{i} " for i in ids)


@pytest.mark.parametrize("settings", [dict(max_length=12), dict(max_length=12, num_beams=3)])
def test_transformers_streamer_and_stop_criteria_in_every_backend(setup, settings):
    from transformers import TextIteratorStreamer

    config, models, batch = setup
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    streamed, outputs = {}, {}
    for name, model in models.items():
        streamer = TextIteratorStreamer(WordTokenizer(), skip_prompt=True)
        outputs[name] = run(name, model, ids, mask, streamer=streamer, **settings)
        streamed[name] = "".join(streamer)
        assert streamed[name] == WordTokenizer().decode(outputs[name][0, 1:].tolist()), name
    assert len(set(streamed.values())) == 1, streamed

    # a stopping criterion (rows stop once they hold 5 tokens), a stop string and max_time, on the host
    def five_tokens(input_ids, scores):
        return np.full(np.asarray(input_ids).shape[0], np.asarray(input_ids).shape[1] >= 5)

    stopped = {name: run(name, model, ids, mask, stopping_criteria=[five_tokens], **settings)
               for name, model in models.items()}
    assert all(s.shape[1] <= 5 for s in stopped.values()) and len({str(s.tolist()) for s in stopped.values()}) == 1
    word = f"{outputs['torch'][0, 2]} "
    cut = {name: run(name, model, ids, mask, stop_strings=[word], tokenizer=WordTokenizer(), **settings)
           for name, model in models.items()}
    assert len({str(c.tolist()) for c in cut.values()}) == 1, cut
    if "num_beams" not in settings:  # greedy stops at the word; beam search may return another hypothesis
        assert cut["torch"].shape[1] <= 3, cut
    timed = {name: run(name, model, ids, mask, max_time=1e-9, **settings) for name, model in models.items()}
    assert all(t.shape[1] == 2 for t in timed.values()), timed  # one token, then the time is up


def test_user_logits_processor_runs_after_the_built_in_ones(setup):
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain = run("torch", models["torch"], ids, mask, max_length=10)
    banned = int(plain[0, 1])
    bias = np.zeros(config.vocab_size, np.float32)
    bias[banned] = -np.inf
    processors = {
        "torch": lambda input_ids, scores: scores + torch.from_numpy(bias),  # transformers' PyTorch convention
        "tf": lambda input_ids, scores, cur_len: scores + tf.constant(bias),  # its TF / Flax convention
        "flax": lambda input_ids, scores, cur_len: scores + jax.numpy.asarray(bias),
    }
    got = {name: run(name, model, ids, mask, max_length=10, logits_processor=[processors[name]])
           for name, model in models.items()}
    assert not (got["torch"][:, 1:] == banned).any()
    assert got["torch"].tolist() == got["tf"].tolist() == got["flax"].tolist()


BOOST = 9  # the token the callers' processor below favours


def test_warpers_and_callers_processors_in_every_backend_as_transformers(setup):
    """min_p, typical_p, epsilon and eta cutoffs, suppressed tokens (always, and for the first reply token), the
    exponential length penalty, sequence biases and renormalized logits: each sampling step's scores in every backend equal transformers' processors (in its
    order: a caller's processor before temperature and the warpers, the renormalization last) applied to that
    step's logits."""
    import transformers.generation.logits_process as lp

    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    boost = np.zeros(config.vocab_size, np.float32)
    boost[BOOST] = 1.5
    callers = {"torch": lambda input_ids, scores: scores + torch.from_numpy(boost),
               "tf": lambda input_ids, scores, cur_len: scores + tf.constant(boost),
               "flax": lambda input_ids, scores, cur_len: scores + jax.numpy.asarray(boost)}
    settings = dict(NEUTRAL, do_sample=True, seed=4, max_length=7, temperature=0.5, top_k=0, min_p=0.02,
                    typical_p=0.95, epsilon_cutoff=0.002, eta_cutoff=0.003, suppress_tokens=[5, 6],
                    begin_suppress_tokens=[BOOST], renormalize_logits=True, exponential_decay_length_penalty=(2, 1.5),
                    sequence_bias={(11,): 1.0, (1, 12): 2.0},
                    return_dict_in_generate=True,
                    output_scores=True, output_logits=True)
    reference = lp.LogitsProcessorList([
        lp.SequenceBiasLogitsProcessor([[[11], 1.0], [[1, 12], 2.0]]), lp.ExponentialDecayLengthPenalty((2, 1.5), EOS, 1), lp.SuppressTokensLogitsProcessor([5, 6]), lp.SuppressTokensAtBeginLogitsProcessor([BOOST], 1),
        lambda input_ids, scores: scores + torch.from_numpy(boost), lp.TemperatureLogitsWarper(0.5),
        lp.MinPLogitsWarper(0.02), lp.TypicalLogitsWarper(0.95), lp.EpsilonLogitsWarper(0.002),
        lp.EtaLogitsWarper(0.003), lp.LogitNormalization()])
    for name, model in models.items():
        out = run_output(name, model, ids, mask, logits_processor=[callers[name]], **settings)
        sequences = host(out.sequences)
        removed = 0
        for step, (scores, logits) in enumerate(zip(out.scores, out.logits, strict=True)):
            prefix = torch.from_numpy(sequences[:, :step + 1].astype(np.int64))
            want = reference(prefix, torch.from_numpy(host(logits))).numpy()
            np.testing.assert_allclose(host(scores), want, rtol=1e-5, atol=1e-5, err_msg=f"{name} {step}")
            removed += int(np.isinf(want).sum()) - 2 * want.shape[0]
        assert removed > 0, name  # the warpers removed tokens beyond the suppressed ones


def host(x):
    return np.array(x.numpy() if hasattr(x, "numpy") else x)


def run_output(backend, model, ids, mask, **kwargs):
    if backend == "torch":
        return model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs)
    if backend == "tf":
        return model.generate(tf.constant(ids), attention_mask=tf.constant(mask), **kwargs)
    return model.generate(ids, attention_mask=mask, **kwargs)


FORCED = 17  # the token the rule below forces when the decoder holds 3 tokens


def _rules(vocab):
    """One logits processor in each framework's convention and ops: ban the previous token (read from
    input_ids at cur_len), then force FORCED when the decoder holds 3 tokens."""
    def torch_rule(input_ids, scores):
        scores = scores.scatter(1, input_ids[:, -1:], float("-inf"))
        if input_ids.shape[1] == 3:
            scores = torch.where(torch.arange(vocab) == FORCED, 0.0, float("-inf")).expand_as(scores)
        return scores

    def tf_rule(input_ids, scores, cur_len):
        previous = tf.gather(input_ids, cur_len - 1, axis=1)
        scores = tf.where(tf.range(vocab)[None, :] == previous[:, None], float("-inf"), scores)
        forced = tf.where(tf.range(vocab)[None, :] == FORCED, 0.0, float("-inf")) + tf.zeros_like(scores)
        return tf.where(cur_len == 3, forced, scores)

    def jax_rule(input_ids, scores, cur_len):
        jnp = jax.numpy
        previous = jnp.take(input_ids, cur_len - 1, axis=1)
        scores = jnp.where(jnp.arange(vocab)[None, :] == previous[:, None], -jnp.inf, scores)
        forced = jnp.where(jnp.arange(vocab)[None, :] == FORCED, 0.0, -jnp.inf) + jnp.zeros_like(scores)
        return jnp.where(cur_len == 3, forced, scores)

    return {"torch": torch_rule, "tf": tf_rule, "flax": jax_rule}


def test_user_processor_runs_inside_the_compiled_loops(setup):
    """The rule compiles into TF's XLA loop and Flax's jitted one, and gives the PyTorch tokens; the tokens
    show both of its effects."""
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    settings = dict(max_length=9, min_length=9)  # no reply ends early: every row shows the rule
    rules = _rules(config.vocab_size)
    want = run("torch", models["torch"], ids, mask, logits_processor=[rules["torch"]], **settings)
    assert (want[:, 3] == FORCED).all()
    repeats = want[:, 1:] == want[:, :-1]
    repeats[:, 2] = False  # the forced token may repeat the one before it
    assert not repeats.any()
    assert not np.array_equal(want, run("torch", models["torch"], ids, mask, **settings))
    xla = tf.function(models["tf"].generate, jit_compile=True)
    got_tf = xla(tf.constant(ids), attention_mask=tf.constant(mask), logits_processor=[rules["tf"]], **settings)
    np.testing.assert_array_equal(np.asarray(got_tf), want)
    got_flax = run("flax", models["flax"], ids, mask, logits_processor=[rules["flax"]], **settings)
    np.testing.assert_array_equal(got_flax, want)


class _Streamer:
    def put(self, ids):
        pass

    def end(self):
        pass


def test_hooks_inside_compiled_functions_and_bad_processors_raise_naming_them(setup):
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tf_graph = tf.function(models["tf"].generate)
    with pytest.raises(ConfigError, match=r"streamer= runs Python on the host.*inside tf\.function"):
        tf_graph(tf.constant(ids), attention_mask=tf.constant(mask), max_length=5, streamer=_Streamer())
    flax_jit = jax.jit(lambda i, m: models["flax"].generate(
        i, attention_mask=m, max_length=5, stopping_criteria=[lambda input_ids, scores: False], max_time=5.0))
    with pytest.raises(ConfigError, match=r"stopping_criteria= and max_time= run Python .*jax\.jit"):
        flax_jit(ids, mask)
    rules = _rules(config.vocab_size)
    wrong = {"torch": rules["tf"], "tf": rules["torch"], "flax": rules["torch"]}  # another framework's arguments
    for name, model in models.items():
        with pytest.raises(ConfigError, match=r"logits_processor\[1\] must take \(input_ids, scores"):
            run(name, model, ids, mask, max_length=5, logits_processor=[rules[name], wrong[name]])


# ---------------------------------------------------------------------- the core alone, over NumPy
def test_numpy_ops_search_equals_the_torch_backend(setup):
    """The core's search driven by NumpyOps (as an onnxruntime decoder would drive it) gives the PyTorch tokens."""
    config, models, batch = setup
    model = models["torch"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    settings = dict(max_length=12, num_beams=3, num_return_sequences=2, no_repeat_ngram_size=2,
                    encoder_no_repeat_ngram_size=2, min_length=4)
    want = run("torch", model, ids, mask, **settings)
    request = prepare(model.generation_config, config, dict(settings))
    spec, ops = request.spec, NumpyOps()
    with torch.no_grad():
        torch_step, cache = model._decoder_step((torch.from_numpy(ids), torch.from_numpy(mask)), spec,
                                                rows=3 * spec.copies, cuda_graph=False)

    def step(tokens, index, cache):
        with torch.no_grad():
            logits, cache = torch_step(torch.from_numpy(np.asarray(tokens, np.int64)), int(index), cache)
        return logits.numpy(), cache

    def reorder(cache, rows):
        cache.reorder(torch.from_numpy(np.asarray(rows, np.int64)))
        return cache

    processors = LP.build_processors(ops, spec.plan, LP.encoder_ngrams(ops, spec.plan, ids, spec.copies))
    prompt = np.full((3, 1), config.decoder_start_token_id, np.int32)
    sequences, length, _, _ = decode(ops, request, step=step, cache=cache, prompt=prompt, processors=processors,
                                  reorder=reorder)
    np.testing.assert_array_equal(sequences[:, :int(length)], want)


def _hf(name, *args):
    import transformers.generation.logits_process as lp

    return getattr(lp, name)(*args)


def test_processors_equal_transformers_on_random_scores():
    pytest.importorskip("transformers")
    ops = NumpyOps()
    rng = np.random.default_rng(0)
    n, v, length, cur = 6, 12, 10, 7
    tokens = rng.integers(3, 7, (n, length)).astype(np.int32)  # few distinct ids: many repeated n-grams
    scores = rng.normal(size=(n, v)).astype(np.float32)
    encoder_ids = rng.integers(3, 7, (2, 9)).astype(np.int32)
    grams = LP.encoder_ngrams(ops, (LP_spec("encoder_no_repeat_ngram", 2),), encoder_ids, 3)
    scores[1, 2] = -np.inf  # an eos score that is not finite keeps its value
    last2 = tuple(int(t) for t in tokens[1, cur - 2:cur])
    biases = (((4,), 1.5), ((3,), -np.inf), ((int(tokens[0, cur - 1]), 9), -2.0), ((*last2, 9), 0.7),
              ((last2[1], 9), 0.25), ((*tokens[2, :cur].tolist(), 8, 8), 3.0))  # (two hits on 9; one too long)
    decay, late = (GenerationConfig(exponential_decay_length_penalty=(start, 1.7), eos_token_id=[2, 5], max_length=10)
                   .resolve(None, decoder_start_token_id=1).processor_plan()[0] for start in (3, 6))
    cases = [
        (LP.no_repeat_ngram, (2,), _hf("NoRepeatNGramLogitsProcessor", 2)),
        (LP.no_repeat_ngram, (3,), _hf("NoRepeatNGramLogitsProcessor", 3)),
        (LP.encoder_no_repeat_ngram, (2, grams),
         _hf("EncoderNoRepeatNGramLogitsProcessor", 2, torch.from_numpy(encoder_ids.astype(np.int64)))),
        (LP.repetition_penalty, (1.5,), _hf("RepetitionPenaltyLogitsProcessor", 1.5)),
        (LP.bad_words, (((4,), (int(tokens[0, cur - 1]), 9)),),
         _hf("NoBadWordsLogitsProcessor", [[4], [int(tokens[0, cur - 1]), 9]], 2)),
        (LP.top_k, (3,), _hf("TopKLogitsWarper", 3)),
        (LP.top_p, (0.7, 1), _hf("TopPLogitsWarper", 0.7)),
        (LP.min_length, (9, (2,)), _hf("MinLengthLogitsProcessor", 9, 2)),
        (LP.forced_token, (2, cur), _hf("ForcedEOSTokenLogitsProcessor", cur + 1, 2)),
        (LP.min_p, (0.2, 1), _hf("MinPLogitsWarper", 0.2)),
        (LP.min_p, (0.9, 3), _hf("MinPLogitsWarper", 0.9, -float("inf"), 3)),
        (LP.typical_p, (0.6, 1), _hf("TypicalLogitsWarper", 0.6)),
        (LP.typical_p, (0.2, 3), _hf("TypicalLogitsWarper", 0.2, -float("inf"), 3)),
        (LP.epsilon_cutoff, (0.09, 1), _hf("EpsilonLogitsWarper", 0.09)),
        (LP.epsilon_cutoff, (0.3, 2), _hf("EpsilonLogitsWarper", 0.3, -float("inf"), 2)),
        (LP.eta_cutoff, (0.2, 1), _hf("EtaLogitsWarper", 0.2)),
        (LP.eta_cutoff, (0.5, 2), _hf("EtaLogitsWarper", 0.5, -float("inf"), 2)),
        (LP.suppress_tokens, ((3, 5), None), _hf("SuppressTokensLogitsProcessor", [3, 5])),
        (LP.suppress_tokens, ((3, 5), cur), _hf("SuppressTokensAtBeginLogitsProcessor", [3, 5], cur)),
        (LP.suppress_tokens, ((3, 5), cur + 1), _hf("SuppressTokensAtBeginLogitsProcessor", [3, 5], cur + 1)),
        (LP.renormalize, (), _hf("LogitNormalization")),
        (LP.sequence_bias, (biases,), _hf("SequenceBiasLogitsProcessor", [[list(k), v] for k, v in biases])),
        (LP.exponential_decay, decay.params, _hf("ExponentialDecayLengthPenalty", (3, 1.7), [2, 5], 1)),
        (LP.exponential_decay, late.params, _hf("ExponentialDecayLengthPenalty", (6, 1.7), [2, 5], 1)),
    ]
    for ours, params, theirs in cases:
        got = ours(ops, *params, tokens, cur, scores.copy())
        want = theirs(torch.from_numpy(tokens[:, :cur].astype(np.int64)), torch.from_numpy(scores.copy())).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(theirs))


def LP_spec(name, *params):
    from blenderbot_mb.generation_config import ProcessorSpec

    return ProcessorSpec(name, params)


def test_fallback_pad_id_is_one_rule():
    config = make_config("tiny")
    resolved = GenerationConfig(max_length=5).resolve(config)
    assert fallback_pad_id(resolved) == config.pad_token_id
    no_pad = GenerationConfig(max_length=5, decoder_start_token_id=1, eos_token_id=[7, 2])
    assert fallback_pad_id(no_pad.resolve(None)) == 7  # pad unset: the first eos, as transformers
    assert fallback_pad_id(GenerationConfig(max_length=5, decoder_start_token_id=1).resolve(None)) == 0


def test_unfeasible_lengths_warn_in_every_backend_as_the_reference(setup, tmp_path):
    """min_length above max_length: every backend warns once with the reference's words (transformers, where
    installed, warns the same), and decodes to max_length; feasible lengths give no warning."""
    import warnings

    config, models, batch = setup
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    references = {}
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        models["torch"].save_pretrained(tmp_path)
        references["transformers"] = transformers.BlenderbotForConditionalGeneration.from_pretrained(tmp_path)
    for name, model in {**models, **references}.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if name == "transformers":
                out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_length=8,
                                     min_length=30, num_beams=1).numpy()
            else:
                out = run(name, model, ids, mask, max_length=8, min_length=30)
        unfeasible = [w for w in caught if "Unfeasible length constraints" in str(w.message)]
        assert len(unfeasible) == 1 and issubclass(unfeasible[0].category, UserWarning), (name, caught)
        assert "min_length" in str(unfeasible[0].message) and "(30)" in str(unfeasible[0].message), name
        assert out.shape[1] == 8, name  # the maximum wins: no eos before it, none past it
        if name != "transformers":
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                run(name, model, ids, mask, max_length=8, min_length=8)


NEUTRAL = dict(min_length=0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, repetition_penalty=1.0,
               forced_eos_token_id=None, forced_bos_token_id=None, bad_words_ids=None)


def penalized_greedy(model, ids, mask, presence, frequency, max_length):
    """Greedy decoding written out: the full forward pass at each step (no cache), OpenAI's penalties applied in
    float64 NumPy to counts of the reply's tokens (start token excluded), the best score taken."""
    config = model.config
    rows = []
    for row in range(ids.shape[0]):
        tokens = [config.decoder_start_token_id]
        while len(tokens) < max_length and tokens[-1] != EOS:
            with torch.no_grad():
                logits = model(input_ids=torch.from_numpy(ids[row:row + 1]),
                               attention_mask=torch.from_numpy(mask[row:row + 1]),
                               decoder_input_ids=torch.tensor([tokens])).logits[0, -1].double().numpy()
            counts = np.bincount(tokens[1:], minlength=logits.shape[0]).astype(np.float64)
            tokens.append(int(np.argmax(logits - frequency * counts - presence * (counts > 0))))
        rows.append(tokens + [config.pad_token_id] * (max_length - len(tokens)))
    return np.array(rows)


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (-0.5, 1.2)])
def test_presence_and_frequency_penalties_against_a_loop_written_out(setup, presence, frequency):
    """OpenAI's penalties (not in transformers): every backend's greedy tokens equal a loop written out here, and
    every backend's beam search gives the same tokens; they change the reply."""
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    want = penalized_greedy(models["torch"], ids, mask, presence, frequency, max_length=12)
    plain = run("torch", models["torch"], ids, mask, max_length=12, num_beams=1, **NEUTRAL)
    assert not np.array_equal(want[:, :plain.shape[1]], plain) or want.shape[1] != plain.shape[1]
    beams = {}
    for name, model in models.items():
        got = run(name, model, ids, mask, max_length=12, num_beams=1, presence_penalty=presence,
                  frequency_penalty=frequency, **NEUTRAL)
        np.testing.assert_array_equal(got, want[:, :got.shape[1]], err_msg=name)
        assert (want[:, got.shape[1]:] == config.pad_token_id).all()
        beams[name] = run(name, model, ids, mask, max_length=12, num_beams=3, presence_penalty=presence,
                          frequency_penalty=frequency, **NEUTRAL)
    for name in ("tf", "flax"):
        np.testing.assert_array_equal(beams[name], beams["torch"], err_msg=name)


def test_presence_and_frequency_penalties_count_only_the_reply():
    ops = NumpyOps()
    tokens = np.array([[1, 4, 4, 5, 9, 9], [7, 7, 3, 0, 0, 0]], np.int32)  # [0:2] the decoder prompt
    scores = np.zeros((2, 10), np.float32)
    got = LP.presence_frequency(ops, 0.5, 0.25, 2, tokens, 5, scores)  # the reply so far: columns 2..4
    want = np.zeros((2, 10), np.float32)
    want[0, 4] = -(0.5 + 0.25)
    want[0, 5] = -(0.5 + 0.25)
    want[0, 9] = -(0.5 + 0.25)
    want[1, 3] = -(0.5 + 0.25)
    want[1, 0] = -(0.5 + 2 * 0.25)
    np.testing.assert_allclose(got, want)
    for bad in ("0.5", float("nan"), True):
        with pytest.raises(ConfigError, match="presence_penalty"):
            GenerationConfig(presence_penalty=bad)


def test_decoder_prompts_as_transformers(setup, tmp_path):
    """decoder_input_ids prompts: the start token is put before a prompt none of whose rows begins with it (as
    transformers does), the tokens equal transformers' on every backend, greedy and beam search (Flax also inside
    a caller's jax.jit); a prompt per input or an InputError."""
    transformers = pytest.importorskip("transformers")
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    models["torch"].save_pretrained(tmp_path)
    reference = transformers.BlenderbotForConditionalGeneration.from_pretrained(tmp_path).eval()
    prompts = [np.array([[1, 5], [7, 5], [9, 9]]), np.array([[5, 6], [7, 5], [9, 9]])]  # with, without the start
    for p, prompt in enumerate(prompts):
        with torch.no_grad():
            want = reference.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                                      decoder_input_ids=torch.from_numpy(prompt), max_new_tokens=4,
                                      num_beams=1).numpy()
            beams = reference.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                                       decoder_input_ids=torch.from_numpy(prompt), max_new_tokens=4,
                                       num_beams=2).numpy()
        assert (want[:, 0] == config.decoder_start_token_id).any()
        for name in ("torch", "tf", "flax"):
            got = run(name, models[name], ids, mask, decoder_input_ids=prompt, max_new_tokens=4, num_beams=1)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {prompt.tolist()}")
            if p == 1:  # (beam search from the prompt the start token is put before)
                got = run(name, models[name], ids, mask, decoder_input_ids=prompt, max_new_tokens=4, num_beams=2)
                np.testing.assert_array_equal(got, beams, err_msg=f"{name} beams {prompt.tolist()}")
    # inside a caller's jit the prompt is taken as given (here one that begins with the start token), and the
    # sequences keep their full length (max_length columns: the trimming needs a concrete length)
    jitted = jax.jit(lambda i, m, d: models["flax"].generate(i, attention_mask=m, decoder_input_ids=d,
                                                             max_new_tokens=4, num_beams=1).sequences)
    got = np.asarray(jitted(ids, mask, prompts[0]))
    want = run("torch", models["torch"], ids, mask, decoder_input_ids=prompts[0], max_new_tokens=4, num_beams=1)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    for name in ("torch", "tf", "flax"):
        with pytest.raises(BlenderbotError, match="decoder_input_ids has 1 rows and input_ids 3"):
            run(name, models[name], ids, mask, decoder_input_ids=np.ones((1, 1), np.int64), max_new_tokens=2)


@pytest.mark.parametrize("settings", [dict(num_beams=3, num_return_sequences=2, max_length=12, min_length=3),
                                      dict(max_length=10)], ids=["beam", "greedy"])
def test_scores_logits_beam_indices_and_transition_scores_in_every_backend(setup, settings):
    """return_dict_in_generate's scores, logits and beam_indices and compute_transition_scores: the same on the
    three backends (PyTorch's against transformers: test_torch_generation)."""
    config, models, batch = setup
    kw = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, **settings)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got = {"torch": models["torch"].generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw),
           "tf": models["tf"].generate(tf.constant(ids), attention_mask=tf.constant(mask), **kw),
           "flax": models["flax"].generate(ids, attention_mask=mask, **kw)}
    want = got["torch"]
    for backend, out in got.items():
        assert np.asarray(out.sequences).tolist() == want.sequences.tolist(), backend
        assert len(out.scores) == len(want.scores) and len(out.logits) == len(want.logits), backend
        for mine, theirs in zip(out.scores + out.logits, want.scores + want.logits, strict=True):
            np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), atol=1e-5, err_msg=backend)
        if want.beam_indices is None:
            assert out.beam_indices is None, backend
        else:
            assert np.asarray(out.beam_indices).tolist() == want.beam_indices.tolist(), backend
        for scores, normalize in ((out.scores, False), (out.logits, True)):
            mine = models[backend].compute_transition_scores(out.sequences, scores, out.beam_indices, normalize)
            theirs = models["torch"].compute_transition_scores(want.sequences, want.scores if not normalize
                                                               else want.logits, want.beam_indices, normalize)
            np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), atol=1e-5, err_msg=backend)


@pytest.mark.parametrize("settings", [dict(num_beams=1, max_new_tokens=6),
                                      dict(num_beams=3, num_return_sequences=2, max_new_tokens=6)],
                         ids=["greedy", "beam"])
def test_attentions_and_hidden_states_of_every_step_as_transformers(setup, tmp_path, settings):
    """generate(output_attentions=True, output_hidden_states=True, return_dict_in_generate=True): the encoder's
    and every step's decoder attentions (self over the positions so far, cross over the input), and hidden
    states, as transformers' eager attention gives them, on the three backends (inputs with padding)."""
    transformers = pytest.importorskip("transformers")
    config, models, batch = setup
    ids, mask = batch["input_ids"], batch["attention_mask"]
    models["torch"].save_pretrained(tmp_path)
    reference = transformers.BlenderbotForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    kwargs = dict(output_attentions=True, output_hidden_states=True, return_dict_in_generate=True, do_sample=False,
                  **settings)
    with torch.no_grad():
        want = reference.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs)
    fields = ("encoder_attentions", "encoder_hidden_states", "decoder_attentions", "cross_attentions",
              "decoder_hidden_states")
    for name in ("torch", "tf", "flax"):
        if name == "torch":
            got = models[name].generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs)
        elif name == "tf":
            got = models[name].generate(tf.constant(ids), attention_mask=tf.constant(mask), **kwargs)
        else:
            got = models[name].generate(ids, attention_mask=mask, **kwargs)
        np.testing.assert_array_equal(np.asarray(got.sequences), want.sequences.numpy(), err_msg=name)
        for field in fields:
            ours, theirs = getattr(got, field), getattr(want, field)
            if field.startswith("encoder"):
                ours, theirs = (ours,), (theirs,)
            assert len(ours) == len(theirs), (name, field)
            for step_ours, step_theirs in zip(ours, theirs, strict=True):
                assert len(step_ours) == len(step_theirs), (name, field)
                for a, b in zip(step_ours, step_theirs, strict=True):
                    assert a.shape == tuple(b.shape), (name, field, a.shape, tuple(b.shape))
                    np.testing.assert_allclose(a, b.numpy(), atol=2e-5, err_msg=f"{name} {field}")
    with pytest.raises(ConfigError, match="decoder_input_ids prompt"):
        models["torch"].generate(torch.from_numpy(ids), decoder_input_ids=torch.ones((3, 2), dtype=torch.long),
                                 **kwargs)

"""generate() against transformers' generate on the same weights: identical greedy and beam tokens."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import hf_model, make_config, random_batch, random_weights  # noqa: E402

from blenderbot_mb import GenerationConfig  # noqa: E402
from blenderbot_mb import logits_process as LP  # noqa: E402
from blenderbot_mb.errors import ConfigError, InputError  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration, TorchOps  # noqa: E402

EOS, PAD = 2, 0


def pad_after_eos(sequences):
    """transformers 5 fills finished beams with EOS when pad_token_id is 0; the reference (4.x) pads."""
    out = sequences.clone()
    for row in out:
        hits = (row[1:] == EOS).nonzero()
        if len(hits):
            row[int(hits[0, 0]) + 2:] = PAD
    return out


def make_pair(name: str, **overrides):
    """Our model and transformers' on weights that make EOS likely, so replies end at different lengths
    (`overrides`: of the config, e.g. fewer heads; the weights' shapes stay)."""
    config = make_config(name, **overrides)
    weights = random_weights(config, seed=5)
    weights["final_logits_bias"][0, EOS] += 3.0
    ours = BlenderbotForConditionalGeneration(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    b = random_batch(config, batch=4, src_len=10)
    return ours, hf_model(config, weights), torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])


@pytest.fixture(scope="module", params=["tiny", "odd"])
def pair(request):
    return make_pair(request.param)


CASES = {
    "greedy": dict(max_length=14),
    "greedy_min_length": dict(max_length=16, min_length=6),
    "greedy_ngram": dict(max_length=20, no_repeat_ngram_size=2, min_length=4),
    "greedy_encoder_ngram": dict(max_length=16, encoder_no_repeat_ngram_size=2, min_length=3),
    "greedy_repetition_bad_words": dict(max_length=16, repetition_penalty=1.7, bad_words_ids=[[5], [7, 8], [EOS]],
                                        min_length=3),
    "greedy_new_tokens": dict(max_new_tokens=9, min_new_tokens=4),
    "greedy_forced": dict(max_length=12, forced_bos_token_id=9, forced_eos_token_id=11),
    "greedy_no_forced_eos": dict(max_length=12, forced_eos_token_id=None, min_length=3),
    "beam": dict(max_length=15, num_beams=4),
    "beam_published_style": dict(max_length=20, num_beams=5, length_penalty=0.65, min_length=8,
                                 no_repeat_ngram_size=3, encoder_no_repeat_ngram_size=3),
    "beam_return_3_early": dict(max_length=18, num_beams=4, num_return_sequences=3, early_stopping=True,
                                min_length=3),
    "beam_return_2_not_early": dict(max_length=18, num_beams=3, num_return_sequences=2, early_stopping=False,
                                    length_penalty=1.5, min_length=2),
    "beam_never": dict(max_length=18, num_beams=3, early_stopping="never", length_penalty=2.0, min_length=4),
    "beam_negative_penalty": dict(max_length=14, num_beams=3, length_penalty=-0.5, min_length=2),
    "beam_repetition_bad_words": dict(max_length=14, num_beams=3, repetition_penalty=1.3,
                                      bad_words_ids=[[4], [6, 9]], min_length=5),
    "greedy_bias_suppress_decay": dict(max_length=14, sequence_bias=[[[6], 1.5], [[39, 35], 4.0], [[6, 8], -3.0]],
                                       suppress_tokens=[5], begin_suppress_tokens=[9], min_length=5,
                                       exponential_decay_length_penalty=(3, 1.6), renormalize_logits=True),
    "beam_bias_suppress_decay": dict(max_length=14, num_beams=3, sequence_bias={(6,): 1.5, (7, 8): 2.5},
                                     suppress_tokens=[5], begin_suppress_tokens=[9],
                                     exponential_decay_length_penalty=(2, 1.3), renormalize_logits=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokens_equal_transformers(pair, case):
    ours, ref, ids, mask = pair
    settings = CASES[case]
    got = ours.generate(ids, attention_mask=mask, **settings)
    want = pad_after_eos(ref.generate(ids, attention_mask=mask, **settings))
    assert got.tolist() == want.tolist()


def test_replies_end_at_different_lengths(pair):
    """Guard for the parity tests: with these weights, some replies end before max_length."""
    ours, _, ids, mask = pair
    for settings in (CASES["greedy_min_length"], CASES["beam_return_3_early"]):
        got = ours.generate(ids, attention_mask=mask, **settings)
        ended = [(row[1:] == EOS).nonzero()[0, 0].item() + 2 for row in got if (row[1:] == EOS).any()]
        assert ended and min(ended) < settings["max_length"]
        assert all(row[0] == 1 for row in got)


def test_beam_scores_equal_transformers(pair):
    ours, ref, ids, mask = pair
    settings = dict(max_length=16, num_beams=4, num_return_sequences=2, length_penalty=0.65, min_length=3)
    got = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, **settings)
    want = ref.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **settings)
    assert got.sequences.tolist() == pad_after_eos(want.sequences).tolist()
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=0)


def test_single_unpadded_input(pair):
    ours, ref, ids, _ = pair
    row = ids[:1]
    for settings in (CASES["greedy"], CASES["beam_published_style"]):
        assert ours.generate(row, **settings).tolist() == pad_after_eos(ref.generate(row, **settings)).tolist()


def test_attention_mask_inferred_from_padding(pair):
    """As the 4.x reference: without a mask, padding (pad != eos) is masked."""
    ours, _, ids, mask = pair
    assert torch.equal(ours.generate(ids, max_length=12), ours.generate(ids, attention_mask=mask, max_length=12))


def test_default_settings_come_from_generation_config(pair):
    ours, ref, ids, mask = pair
    saved = ours.generation_config
    try:
        ours.generation_config = GenerationConfig.from_dict({**saved.to_dict(), "num_beams": 3, "max_length": 11})
        got = ours.generate(ids, attention_mask=mask)
    finally:
        ours.generation_config = saved
    assert got.tolist() == pad_after_eos(ref.generate(ids, attention_mask=mask, num_beams=3, max_length=11)).tolist()
    # forced EOS off through a generation config
    plain = GenerationConfig(max_length=10, forced_eos_token_id=None, encoder_no_repeat_ngram_size=0)
    got = ours.generate(ids, attention_mask=mask, generation_config=plain)
    want = ref.generate(ids, attention_mask=mask, max_length=10, forced_eos_token_id=None,
                        encoder_no_repeat_ngram_size=0)
    assert got.tolist() == want.tolist()


# ---------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    ours, _, ids, mask = pair
    kw = dict(attention_mask=mask, max_length=14, do_sample=True, top_k=0, temperature=1.5)
    a = ours.generate(ids, seed=7, **kw)
    assert torch.equal(a, ours.generate(ids, seed=7, **kw))
    drawn = ours.generate(ids, generator=torch.Generator().manual_seed(7), **kw)  # the seed drawn from it
    assert torch.equal(drawn, ours.generate(ids, generator=torch.Generator().manual_seed(7), **kw))
    assert any(not torch.equal(a, ours.generate(ids, seed=s, **kw)) for s in range(8, 12))
    greedy = ours.generate(ids, attention_mask=mask, max_length=14)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=14, do_sample=True, top_k=1, seed=3), greedy)
    several = ours.generate(ids, attention_mask=mask, max_length=10, do_sample=True, num_return_sequences=3, seed=1)
    assert several.shape[0] == 3 * ids.shape[0]


def test_beam_sample_runs_and_is_seeded(pair):
    ours, _, ids, mask = pair
    kw = dict(attention_mask=mask, max_length=12, do_sample=True, num_beams=3, top_p=0.9, num_return_sequences=2)
    a = ours.generate(ids, seed=4, **kw)
    assert a.shape[0] == 2 * ids.shape[0] and torch.equal(a, ours.generate(ids, seed=4, **kw))


def test_top_p_and_ngram_processors_by_hand():
    ops = TorchOps(torch.device("cpu"))
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = LP.top_p(ops, 0.8, 1, None, 0, scores)
    assert torch.isinf(kept).tolist() == [[False, False, True, True]]
    ids = torch.tensor([[1, 5, 6, 5, 0]])  # after "5" came "6": 5 -> 6 is banned
    out = LP.no_repeat_ngram(ops, 2, ids, 4, torch.zeros(1, 8))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [6]


def test_bad_settings_raise_config_error(pair):
    ours, _, ids, _ = pair
    with pytest.raises(ConfigError):
        ours.generate(ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(ConfigError):
        ours.generate(ids, max_length=10_000)
    with pytest.raises(ConfigError):
        ours.generate(ids, no_such_setting=1)


# ---------------------------------------------------------------------- decoder-only and hooks
@pytest.mark.parametrize("device_loop", [False, True], ids=["loop", "device-loop"])
def test_causal_lm_generate_equals_transformers(device_loop):
    """A prompt of several tokens (run before the loop, at host indices); device_loop: the loop body without
    host reads (TorchOps(eager=False), what CUDA captures)."""
    from blenderbot_mb.torch import BlenderbotForCausalLM

    config = make_config("tiny")
    weights = random_weights(config, "BlenderbotForCausalLM", seed=2)
    ours = BlenderbotForCausalLM(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    ref = hf_model(config, weights, "BlenderbotForCausalLM")
    prompt = torch.from_numpy(random_batch(config, batch=2, src_len=5, pad=False)["input_ids"])
    prompt[:, 2] = EOS  # eos in the prompt does not end a row
    n = prompt.shape[1]
    for settings in (dict(max_new_tokens=8), dict(max_new_tokens=7, num_beams=3, no_repeat_ngram_size=2)):
        want = ref.generate(prompt, forced_eos_token_id=None, **settings)
        want = torch.cat([want[:, :n], pad_after_eos(torch.cat([want[:, :1], want[:, n:]], 1))[:, 1:]], 1)
        got = ours.generate(prompt, forced_eos_token_id=None, device_loop=device_loop, **settings)
        assert got.tolist() == want.tolist(), settings


class WordTokenizer:
    """Decodes ids as space-separated numbers (enough for transformers' streamers)."""

    def decode(self, ids, **kwargs):
        return "".join(f"{i} " for i in ids)


@pytest.mark.parametrize("settings", [dict(max_length=14), dict(max_length=12, do_sample=True, seed=3),
                                      dict(max_length=14, num_beams=3)])
def test_transformers_text_iterator_streamer_gets_the_reply(pair, settings):
    from transformers import TextIteratorStreamer

    ours, _, ids, mask = pair
    streamer = TextIteratorStreamer(WordTokenizer(), skip_prompt=True)
    out = ours.generate(ids[:1], attention_mask=mask[:1], streamer=streamer, **settings)
    assert "".join(streamer) == WordTokenizer().decode(out[0, 1:].tolist())


@pytest.mark.parametrize("settings", [
    dict(max_length=16, num_beams=4, num_return_sequences=2, length_penalty=0.65, min_length=3),
    dict(max_length=14, num_beams=3, early_stopping=True),
    dict(max_length=12),
], ids=["beam-2-returned", "beam-early", "greedy"])
def test_scores_logits_beam_indices_and_transition_scores_equal_transformers(pair, settings):
    """return_dict_in_generate as transformers: a step's scores and raw logits for every step the search ran
    (beam search runs past its longest returned hypothesis), beam_indices (-1 after an end), and
    compute_transition_scores on them; for beam search the transition scores rebuild sequences_scores (their
    sum over length ** length_penalty: transformers' documented identity)."""
    ours, ref, ids, mask = pair
    kw = dict(attention_mask=mask, return_dict_in_generate=True, output_scores=True, output_logits=True, **settings)
    got, want = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert got.sequences.tolist() == pad_after_eos(want.sequences).tolist()
    assert len(got.scores) == len(want.scores) and len(got.logits) == len(want.logits)
    for mine, theirs in zip(got.scores + got.logits, want.scores + want.logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    beams = want.get("beam_indices")
    if beams is None:
        assert got.beam_indices is None
    else:
        assert got.beam_indices.tolist() == beams.tolist()
    mine = ours.compute_transition_scores(got.sequences, got.scores, got.beam_indices)
    theirs = ref.compute_transition_scores(want.sequences, want.scores, beams)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    normalized = ours.compute_transition_scores(got.sequences, got.logits, got.beam_indices, normalize_logits=True)
    torch.testing.assert_close(normalized, ref.compute_transition_scores(want.sequences, want.logits, beams,
                                                                         normalize_logits=True), atol=1e-5, rtol=0)
    if beams is not None:
        length = (mine < 0).sum(1).double()
        rebuilt = mine.double().sum(1) / length ** settings.get("length_penalty", 1.0)
        torch.testing.assert_close(rebuilt, got.sequences_scores.double(), atol=1e-4, rtol=0)
    else:  # greedy: a token's score is its (processed) log-softmax, NumPy's
        logits = np.stack([x.numpy().astype(np.float64) for x in got.logits], 1)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        tokens = got.sequences[:, 1:].numpy()
        expected = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(normalized.numpy(), expected, atol=1e-5)


def test_transition_scores_refuse_what_generate_did_not_give(pair):
    ours, _, ids, mask = pair
    out = ours.generate(ids, attention_mask=mask, max_length=10, return_dict_in_generate=True, num_beams=2)
    assert out.scores is None and out.logits is None and out.beam_indices is not None
    with pytest.raises(InputError, match="output_scores=True"):
        ours.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    scored = ours.generate(ids, attention_mask=mask, max_length=10, return_dict_in_generate=True, output_scores=True)
    with pytest.raises(InputError, match="do not belong to one generate"):
        ours.compute_transition_scores(scored.sequences[:2], scored.scores)

import json
import warnings

import pytest

from blenderbot_mb import BlenderbotConfig, ConfigError, GenerationConfig


def test_reads_generation_config_json(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 10, "min_length": 20, "max_length": 60,
                                                                  "length_penalty": 0.65, "no_repeat_ngram_size": 3}))
    gen = GenerationConfig.from_pretrained(tmp_path, config=BlenderbotConfig())
    assert (gen.num_beams, gen.min_length, gen.max_length, gen.length_penalty) == (10, 20, 60, 0.65)


@pytest.mark.parametrize("text, message", [
    ('{"num_beams": 4,', "generation_config.json is not valid JSON"),
    ('{"num_beams": 1' + "0" * 5000 + "}", "generation_config.json is not usable JSON"),
    ('{"num_beams": "four"}', "generation_config.json: .*num_beams"),
])
def test_bad_generation_config_json_names_the_file(tmp_path, text, message):
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        GenerationConfig.from_pretrained(tmp_path, config=BlenderbotConfig())


def test_legacy_fields_in_config_json(tmp_path):
    data = BlenderbotConfig().to_dict()
    data.update(num_beams=10, min_length=20, max_length=60, length_penalty=0.65, no_repeat_ngram_size=3)
    (tmp_path / "config.json").write_text(json.dumps(data))
    gen = GenerationConfig.from_pretrained(tmp_path)
    assert (gen.num_beams, gen.min_length, gen.max_length, gen.no_repeat_ngram_size) == (10, 20, 60, 3)
    assert gen.encoder_no_repeat_ngram_size == 3 and gen.forced_eos_token_id == 2


def test_save_round_trip_writes_only_changes(tmp_path):
    gen = GenerationConfig(num_beams=4, length_penalty=0.65)
    gen.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "generation_config.json").read_text())
    assert data == {"num_beams": 4, "length_penalty": 0.65}
    assert GenerationConfig.from_pretrained(tmp_path, config=BlenderbotConfig()) == gen
    # transformers' dict form of sequence_bias is written as its list form; the pair and the lists come back
    gen = GenerationConfig(sequence_bias={(5,): 1.0, (6, 7): -2.0}, exponential_decay_length_penalty=(3, 1.2))
    gen.save_pretrained(tmp_path / "more")
    data = json.loads((tmp_path / "more" / "generation_config.json").read_text())
    assert data == {"sequence_bias": [[[5], 1.0], [[6, 7], -2.0]], "exponential_decay_length_penalty": [3, 1.2]}
    assert GenerationConfig.from_pretrained(tmp_path / "more", config=BlenderbotConfig()) == gen


def test_resolve_lengths():
    config = BlenderbotConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4)
    gen = GenerationConfig(max_length=60, min_length=20)
    r = gen.resolve(config)
    assert (r.max_length, r.min_length, r.mode) == (60, 20, "greedy")
    with pytest.warns(UserWarning, match=r"min_length \(20\) is larger than the maximum possible length \(6\)"):
        r = gen.resolve(config, max_new_tokens=5, min_new_tokens=3, num_beams=3)
    # decoder lengths include the start token; min_length (20) is capped at max_length
    assert (r.max_length, r.min_length, r.mode, r.num_beams) == (6, 6, "beam_search", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # feasible lengths: no warning
        r = GenerationConfig().resolve(config, min_new_tokens=3, do_sample=True)
        gen.resolve(config, max_new_tokens=19)
    assert (r.min_length, r.mode, r.eos_token_id, r.decoder_start_token_id) == (4, "sample", 2, 1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_return_sequences=3, num_beams=2), "num_return_sequences"),
        (dict(bad_words_ids=[[]]), "bad_words_ids"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(nonsense=1), "nonsense"),
        (dict(forced_eos_token_id=10**6), "forced_eos_token_id"),
        (dict(max_length=500), "max_length"),
        (dict(min_p=1.5), r"'min_p' must be in \[0, 1\]"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(typical_p=0.0), r"'typical_p' must be in \(0, 1\]"),
        (dict(epsilon_cutoff=1.0), r"'epsilon_cutoff' must be in \[0, 1\)"),
        (dict(eta_cutoff=-0.1), "eta_cutoff"),
        (dict(suppress_tokens=[3, 10**6]), "suppress_tokens"),
        (dict(suppress_tokens=[3] * 70000), "'suppress_tokens' is 70000, above the limit"),
        (dict(begin_suppress_tokens=["a"]), "begin_suppress_tokens"),
        (dict(renormalize_logits=1), "renormalize_logits"),
        (dict(exponential_decay_length_penalty=(2, 0.0)), "exponential_decay_length_penalty"),
        (dict(sequence_bias=[[[], 1.0]]), "sequence_bias"),
        (dict(sequence_bias={(3,): float("nan")}), "sequence_bias"),
        (dict(sequence_bias=[[[3, 10**6], 1.0]]), "sequence_bias"),
        (dict(sequence_bias=[[[-1], 1.0]]), "sequence_bias"),
        (dict(exponential_decay_length_penalty=[2.5, 1.1]), "exponential_decay_length_penalty"),
        (dict(exponential_decay_length_penalty=(1, 1e10)), r"exponential_decay_length_penalty.*overflows"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GenerationConfig().resolve(BlenderbotConfig(), **kwargs)


# ---------------------------------------------------------------------- the logits-processor plan
# Expected plans are written out by hand from the reference's rules: repetition penalty, no-repeat n-gram, encoder
# no-repeat n-gram, bad words (minus a word that is only eos), min length, forced bos at 1, forced eos at
# max_length - 1; then, when sampling, temperature, top-k, top-p (min_tokens_to_keep 2 for beam sampling, else 1).
def _plan(**kwargs):
    from blenderbot_mb.generation_config import ProcessorSpec

    config = BlenderbotConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, eos_token_id=2)
    plan = GenerationConfig(top_k=0, forced_eos_token_id=None).resolve(config, **kwargs).processor_plan()
    assert all(isinstance(spec, ProcessorSpec) for spec in plan)
    hash(plan)  # Flax uses it in its jit cache key
    return [(spec.name, spec.params) for spec in plan]


def test_plan_no_op_settings_add_nothing():
    assert _plan() == []
    assert _plan(repetition_penalty=1.0, top_p=1.0, temperature=1.0, top_k=0, do_sample=True) == []
    # without sampling the warpers are not used at all
    assert _plan(temperature=0.5, top_k=10, top_p=0.5) == []
    # a bad word that is only eos is dropped (min_length does that job); nothing left -> no processor
    assert _plan(bad_words_ids=[[2]]) == []


def test_plan_greedy_everything_in_reference_order():
    plan = _plan(repetition_penalty=1.3, no_repeat_ngram_size=3, encoder_no_repeat_ngram_size=2,
                 bad_words_ids=[[7], [2], [4, 5, 6]], min_length=5, forced_bos_token_id=1, forced_eos_token_id=2,
                 max_length=12)
    assert plan == [
        ("repetition_penalty", (1.3,)),
        ("no_repeat_ngram", (3,)),
        ("encoder_no_repeat_ngram", (2,)),
        ("bad_words", (((7,), (4, 5, 6)),)),  # one parameter: the words
        ("min_length", (5, (2,))),
        ("forced_bos", (1, 1)),
        ("forced_eos", (2, 11)),
    ]


def test_plan_lengths_come_from_resolve():
    # max_new_tokens=4 -> decoder max_length 5, forced eos at length 4; min_new_tokens=2 -> min_length 3
    assert _plan(max_new_tokens=4, min_new_tokens=2, forced_eos_token_id=2) == [
        ("min_length", (3, (2,))), ("forced_eos", (2, 4))]


def test_plan_sampling():
    assert _plan(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_length=3) == [
        ("min_length", (3, (2,))), ("temperature", (0.7,)), ("top_k", (5,)), ("top_p", (0.9, 1))]
    assert _plan(do_sample=True, top_k=1) == [("top_k", (1,))]


def test_plan_warpers_suppression_and_renormalization_in_reference_order():
    # suppressed tokens after forced eos; min_p, typical_p, epsilon, eta after top_p; renormalization last;
    # begin_suppress_tokens at the first reply token: length 1, or 2 after a forced bos
    assert _plan(do_sample=True, temperature=0.7, top_p=0.9, min_p=0.1, typical_p=0.8, epsilon_cutoff=0.01,
                 eta_cutoff=0.02, suppress_tokens=[5, 6], begin_suppress_tokens=[7], renormalize_logits=True,
                 forced_eos_token_id=2, max_length=9) == [
        ("forced_eos", (2, 8)), ("suppress_tokens", ((5, 6), None)), ("begin_suppress_tokens", ((7,), 1)),
        ("temperature", (0.7,)), ("top_p", (0.9, 1)), ("min_p", (0.1, 1)), ("typical_p", (0.8, 1)),
        ("epsilon_cutoff", (0.01, 1)), ("eta_cutoff", (0.02, 1)), ("renormalize_logits", ())]
    assert _plan(begin_suppress_tokens=[7], forced_bos_token_id=3)[-1] == ("begin_suppress_tokens", ((7,), 2))
    # off values add nothing; without sampling only the suppression and the renormalization remain
    assert _plan(do_sample=True, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, suppress_tokens=[]) == []
    assert _plan(min_p=0.5, typical_p=0.5, renormalize_logits=True) == [("renormalize_logits", ())]
    assert _plan(do_sample=True, num_beams=3, min_p=0.0) == [("min_p", (0.0, 2))]
    # sequence_bias first; transformers' dict form read as pairs; a repeated sequence: the last bias
    assert _plan(sequence_bias={(5,): 1.0, (6, 7): -2.0}, repetition_penalty=1.2) == [
        ("sequence_bias", ((((5,), 1.0), ((6, 7), -2.0)),)), ("repetition_penalty", (1.2,))]
    assert _plan(sequence_bias=[[[5], 1.0], [[5], 3.0]]) == [("sequence_bias", ((((5,), 3.0),),))]


def test_plan_beam_sampling_keeps_two_tokens():
    # beam sampling keeps at least 2 tokens: top_k 1 is raised to 2, top_p keeps 2
    assert _plan(do_sample=True, num_beams=3, top_k=1, top_p=0.5, repetition_penalty=0.8) == [
        ("repetition_penalty", (0.8,)), ("top_k", (2,)), ("top_p", (0.5, 2))]
    assert _plan(do_sample=True, num_beams=3, top_k=7) == [("top_k", (7,))]
    # beam search without sampling: no warpers
    assert _plan(num_beams=3, top_k=1, top_p=0.5, temperature=2.0) == []


def test_plan_without_eos_has_no_min_length():
    config = BlenderbotConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4)
    r = GenerationConfig(min_length=4, eos_token_id=None, forced_eos_token_id=None, top_k=0,
                         decoder_start_token_id=1).resolve()
    assert r.eos_token_ids == () and r.processor_plan() == ()
    r = GenerationConfig(min_length=4, top_k=0, forced_eos_token_id=None).resolve(config)
    assert [s.name for s in r.processor_plan()] == ["min_length"]

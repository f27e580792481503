import json

import pytest

from blenderbot_mb import BlenderbotConfig, ConfigError, GenerationConfig


def test_reads_generation_config_json(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 10, "min_length": 20, "max_length": 60,
                                                                  "length_penalty": 0.65, "no_repeat_ngram_size": 3}))
    gen = GenerationConfig.from_pretrained(tmp_path, config=BlenderbotConfig())
    assert (gen.num_beams, gen.min_length, gen.max_length, gen.length_penalty) == (10, 20, 60, 0.65)


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


def test_resolve_lengths():
    config = BlenderbotConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4)
    gen = GenerationConfig(max_length=60, min_length=20)
    r = gen.resolve(config)
    assert (r.max_length, r.min_length, r.mode) == (60, 20, "greedy")
    r = gen.resolve(config, max_new_tokens=5, min_new_tokens=3, num_beams=3)
    # decoder lengths include the start token; min_length (20) is capped at max_length
    assert (r.max_length, r.min_length, r.mode, r.num_beams) == (6, 6, "beam_search", 3)
    r = GenerationConfig().resolve(config, min_new_tokens=3, do_sample=True)
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
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GenerationConfig().resolve(BlenderbotConfig(), **kwargs)

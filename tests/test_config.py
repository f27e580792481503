import json

import pytest

from blenderbot_mb import BlenderbotConfig, ConfigError
from blenderbot_mb.presets import PRESETS

# The reference's documented defaults (transformers.BlenderbotConfig signature, API reference).
REFERENCE_DEFAULTS = dict(
    vocab_size=8008, max_position_embeddings=128, encoder_layers=2, encoder_ffn_dim=10240,
    encoder_attention_heads=32, decoder_layers=24, decoder_ffn_dim=10240, decoder_attention_heads=32,
    encoder_layerdrop=0.0, decoder_layerdrop=0.0, use_cache=True, is_encoder_decoder=True,
    activation_function="gelu", d_model=2560, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
    init_std=0.02, decoder_start_token_id=1, scale_embedding=False, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, encoder_no_repeat_ngram_size=3, forced_eos_token_id=2,
)


def test_defaults_match_reference():
    config = BlenderbotConfig()
    for name, value in REFERENCE_DEFAULTS.items():
        assert getattr(config, name) == value, name


def test_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    ref = transformers.BlenderbotConfig()
    ours = BlenderbotConfig()
    for name in REFERENCE_DEFAULTS:
        assert getattr(ours, name) == getattr(ref, name), name


def test_round_trip_preserves_unknown_keys(tmp_path):
    data = dict(REFERENCE_DEFAULTS, d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                num_beams=10, length_penalty=0.65, architectures=["BlenderbotForConditionalGeneration"],
                some_future_field={"a": [1, 2]})
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = BlenderbotConfig.from_pretrained(tmp_path)
    assert config.d_model == 64 and config.extra["num_beams"] == 10
    config.save_pretrained(tmp_path / "out")
    again = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: again[k] for k in data} == data
    assert set(again) - set(data) <= set(BlenderbotConfig.field_names())  # only known fields are added
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]


def test_transformers_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    BlenderbotConfig.from_preset("blenderbot-400M-distill").save_pretrained(tmp_path)
    ref = transformers.BlenderbotConfig.from_pretrained(tmp_path)
    assert (ref.d_model, ref.decoder_layers, ref.encoder_ffn_dim, ref.scale_embedding) == (1280, 12, 5120, True)


@pytest.mark.parametrize(
    "name, d_model, enc, dec, ffn",
    [("blenderbot-400M-distill", 1280, 2, 12, 5120), ("blenderbot-1B-distill", 2560, 2, 12, 10240),
     ("blenderbot-3B", 2560, 2, 24, 10240)],
)
def test_presets(name, d_model, enc, dec, ffn):
    config = BlenderbotConfig.from_preset(name)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_ffn_dim) == (d_model, enc, dec, ffn)
    assert config.vocab_size == 8008 and config.encoder_attention_heads == 32 and config.scale_embedding
    assert PRESETS[name]["generation"]["num_beams"] == 10
    assert BlenderbotConfig.from_pretrained(name) == config  # preset names resolve without files


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(d_model=100, encoder_attention_heads=32), "d_model"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(decoder_ffn_dim=-5), "decoder_ffn_dim"),
        (dict(eos_token_id=9000), "eos_token_id"),
        (dict(pad_token_id=8008), "pad_token_id"),
        (dict(activation_function="mish"), "activation_function"),
        (dict(dropout=1.5), "dropout"),
        (dict(d_model="1280"), "d_model"),
        (dict(model_type="blenderbot-small"), "model_type"),
    ],
)
def test_validation_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        BlenderbotConfig.from_dict({**REFERENCE_DEFAULTS, **change})


def test_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text('{"d_model": 64,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        BlenderbotConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        BlenderbotConfig.from_pretrained(tmp_path)

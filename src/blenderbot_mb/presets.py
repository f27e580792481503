"""Presets: the published Blenderbot checkpoints as data (architecture and generation settings)."""

from __future__ import annotations

_COMMON = dict(
    vocab_size=8008,
    max_position_embeddings=128,
    encoder_attention_heads=32,
    decoder_attention_heads=32,
    activation_function="gelu",
    scale_embedding=True,
    dropout=0.1,
    attention_dropout=0.0,
    activation_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    forced_eos_token_id=2,
    encoder_no_repeat_ngram_size=3,
)

# the published generation settings of all three checkpoints
PUBLISHED_GENERATION = dict(
    num_beams=10,
    min_length=20,
    max_length=60,
    length_penalty=0.65,
    no_repeat_ngram_size=3,
    encoder_no_repeat_ngram_size=3,
    forced_eos_token_id=2,
    decoder_start_token_id=1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _preset(d_model, encoder_layers, decoder_layers, ffn, hub_id, params):
    return {
        "hub_id": hub_id,
        "params": params,
        "config": dict(
            _COMMON,
            d_model=d_model,
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
        ),
        "generation": dict(PUBLISHED_GENERATION),
    }


PRESETS = {
    "blenderbot-400M-distill": _preset(1280, 2, 12, 5120, "facebook/blenderbot-400M-distill", "365M"),
    "blenderbot-1B-distill": _preset(2560, 2, 12, 10240, "facebook/blenderbot-1B-distill", "1.0B"),
    "blenderbot-3B": _preset(2560, 2, 24, 10240, "facebook/blenderbot-3B", "2.7B"),
}

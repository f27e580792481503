"""The original ParlAI Blenderbot checkpoints (`*.pt`): a PyTorch pickle with the weights under "model" and
the training options under "opt" (or in a `<file>.opt` JSON file beside it). Read only, through
`checkpoint_pickle.load_pickle` (so only with an explicit `allow_pickle=True`).

ParlAI's TransformerGeneratorModel names modules by role; `parlai_name` gives the ParlAI name of each
Hugging Face tensor name (`naming.tensor_specs`, tied copies included), and `name_map` inverts it, so the
one table below serves both directions. Encoder layers have one attention and two norms (before attention,
before the FFN); decoder layers have two attentions and three norms; in the pre-LayerNorm variant,
`norm_embeddings` is applied after the last layer. ParlAI's output layer has no bias: `final_logits_bias`
is zeros.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoint import StoredTensor, match_weights
from .config import BlenderbotConfig
from .errors import CheckpointError, ConfigError
from .fileio import checked_file
from .generation_config import GenerationConfig
from .naming import tensor_specs, tied_aliases

ARCHITECTURE = "BlenderbotForConditionalGeneration"
# Hugging Face module -> ParlAI module, per stack
_LAYER = {
    "encoder": {"self_attn": "attention", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
                "fc1": "ffn.lin1", "fc2": "ffn.lin2"},
    "decoder": {"self_attn": "self_attention", "encoder_attn": "encoder_attention", "self_attn_layer_norm": "norm1",
                "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3", "fc1": "ffn.lin1", "fc2": "ffn.lin2"},
}
_PROJ = {"q_proj": "q_lin", "k_proj": "k_lin", "v_proj": "v_lin", "out_proj": "out_lin"}
_STACK = {"embed_tokens": "embeddings", "embed_positions": "position_embeddings", "layer_norm": "norm_embeddings"}
IGNORED = ("START",)  # a buffer holding the start token id, not a weight


def parlai_name(name: str) -> str | None:
    """The ParlAI name of a Hugging Face (BlenderbotForConditionalGeneration) tensor; None if ParlAI has none.

    `model.encoder.layers.0.self_attn.q_proj.weight` -> `encoder.layers.0.attention.q_lin.weight`;
    `model.shared.weight` -> `embeddings.weight`; `model.decoder.layer_norm.bias` -> `decoder.norm_embeddings.bias`.
    """
    if name == "model.shared.weight":
        return "embeddings.weight"
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "model" or parts[1] not in _LAYER:
        return None
    stack, leaf = parts[1], parts[-1]
    if len(parts) == 4 and parts[2] in _STACK:
        return f"{stack}.{_STACK[parts[2]]}.{leaf}"
    if parts[2] != "layers" or len(parts) < 6:
        return None
    module = _LAYER[stack][parts[4]]
    proj = [_PROJ[parts[5]]] if len(parts) == 7 else []
    return ".".join([stack, "layers", parts[3], module, *proj, leaf])


def name_map(config) -> dict[str, str]:
    """{ParlAI name: Hugging Face name} of every tensor of `config`'s model (tied copies map to their alias,
    which the checkpoint check accepts and drops)."""
    names = [s.name for s in tensor_specs(config, ARCHITECTURE)] + list(tied_aliases(config, ARCHITECTURE))
    return {p: n for n in names if (p := parlai_name(n)) is not None}


def load_parlai(path: str, allow_pickle: bool = False) -> tuple[dict[str, StoredTensor], dict[str, Any]]:
    """(tensors by ParlAI name, opt) of a ParlAI checkpoint."""
    from .checkpoint_pickle import load_pickle, stored_tensors

    if not os.path.lexists(path):
        raise CheckpointError(f"no ParlAI checkpoint file at {path}")
    path = checked_file(os.path.dirname(os.path.abspath(path)), os.path.basename(path), "ParlAI checkpoint")
    data = load_pickle(path, allow_pickle, what="a pickle file (a ParlAI checkpoint)")
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise CheckpointError(f"{path} is not a ParlAI checkpoint: expected a dict with the weights under 'model'")
    opt = data.get("opt")
    if opt is None and os.path.lexists(path + ".opt"):
        opt_path = checked_file(os.path.dirname(path), os.path.basename(path) + ".opt", "ParlAI options file")
        try:
            with open(opt_path, encoding="utf-8") as f:
                opt = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}.opt is not valid JSON: {e}") from None
    if not isinstance(opt, Mapping):
        raise ConfigError(f"{path} has no ParlAI options: expected an 'opt' dict in it or a {path}.opt file")
    return stored_tensors(data["model"], path, skip=IGNORED), dict(opt)


def _opt_int(opt: Mapping, key: str, default: int | None = None) -> int | None:
    value = opt.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"ParlAI option {key!r} must be an integer, got {value!r}")
    return value


def parlai_config(opt: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[BlenderbotConfig, GenerationConfig]:
    """The BlenderbotConfig and generation settings a ParlAI `opt` describes.

    Sizes come from the options and are checked against the tensors (vocabulary size and position count
    are read off the embeddings). Only the pre-LayerNorm `variant` is Blenderbot; ParlAI's special tokens
    `__null__`, `__start__`, `__end__`, `__unk__` are ids 0-3, i.e. pad, bos/decoder start, eos, unk.
    """
    variant = opt.get("variant", "aiayn")
    if variant != "prelayernorm":
        raise ConfigError(
            f"ParlAI option 'variant' is {variant!r}; Blenderbot (this architecture) is the 'prelayernorm' variant "
            "('xlm' is BlenderbotSmall, 'aiayn' the post-LayerNorm Transformer)"
        )
    if "embeddings.weight" not in state or "encoder.position_embeddings.weight" not in state:
        raise CheckpointError("ParlAI state dict lacks 'embeddings.weight' or 'encoder.position_embeddings.weight'")
    vocab, width = (int(d) for d in state["embeddings.weight"].shape)
    positions = int(state["encoder.position_embeddings.weight"].shape[0])
    d_model = _opt_int(opt, "embedding_size", width)
    if d_model != width:
        raise ConfigError(f"ParlAI option 'embedding_size' is {d_model}, but the embeddings are {width} wide")
    n_positions = _opt_int(opt, "n_positions", positions)
    if n_positions != positions:
        raise ConfigError(f"ParlAI option 'n_positions' is {n_positions}, but the position table has {positions} rows")
    n_layers = _opt_int(opt, "n_layers", 2)
    enc = _opt_int(opt, "n_encoder_layers", -1)
    dec = _opt_int(opt, "n_decoder_layers", -1)
    heads = _opt_int(opt, "n_heads", 2)
    ffn = _opt_int(opt, "ffn_size", None)
    if ffn is None:
        raise ConfigError("ParlAI options lack 'ffn_size'")
    tokens = [opt.get(k) for k in ("dict_nulltoken", "dict_starttoken", "dict_endtoken", "dict_unktoken")]
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
               "forced_eos_token_id": 2}
    context_block = max(0, _opt_int(opt, "beam_context_block_ngram", 0))
    config = BlenderbotConfig.from_dict(dict(
        vocab_size=vocab, max_position_embeddings=positions, d_model=d_model,
        encoder_layers=n_layers if enc in (None, -1) else enc, decoder_layers=n_layers if dec in (None, -1) else dec,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        activation_function=opt.get("activation", "relu"), scale_embedding=bool(opt.get("embeddings_scale", True)),
        dropout=float(opt.get("dropout", 0.0)), attention_dropout=float(opt.get("attention_dropout", 0.0)),
        activation_dropout=float(opt.get("relu_dropout", 0.0)), encoder_no_repeat_ngram_size=context_block,
        architectures=[ARCHITECTURE], **special,
    ))
    if any(t is not None for t in tokens):
        config = config.replace(parlai_special_tokens=tokens)
    max_length = min(positions, _opt_int(opt, "label_truncate", 60) or 60)
    generation = GenerationConfig.from_dict(dict(
        num_beams=max(1, _opt_int(opt, "beam_size", 1)),
        min_length=min(max(0, _opt_int(opt, "beam_min_length", 0)), max_length),
        max_length=max_length,
        length_penalty=float(opt.get("beam_length_penalty", 1.0)),
        no_repeat_ngram_size=max(0, _opt_int(opt, "beam_block_ngram", 0)),
        encoder_no_repeat_ngram_size=context_block,
        **special,
    ))
    return config, generation


def parlai_to_hf_weights(state: Mapping[str, Any], config) -> dict[str, Any]:
    """Rename a ParlAI state dict to Hugging Face names (`name_map`), add the zero `final_logits_bias`, and
    check the result against the config (ParlAI names the map does not know are listed as unexpected)."""
    names = name_map(config)
    renamed = {names.get(name, name): t for name, t in state.items() if name not in IGNORED}
    dtype = renamed["model.shared.weight"].dtype if "model.shared.weight" in renamed else "float32"
    dtype = dtype if dtype in ("float16", "float32", "float64") else "float32"
    zeros = np.zeros((1, config.vocab_size), dtype=dtype)
    renamed.setdefault("final_logits_bias", StoredTensor(zeros.shape, dtype, lambda: zeros))
    return match_weights(renamed, config, ARCHITECTURE, source="ParlAI checkpoint")


def read_parlai_checkpoint(path: str, allow_pickle: bool = False):
    """(config, generation settings, {Hugging Face name: StoredTensor}) of a ParlAI original checkpoint."""
    state, opt = load_parlai(path, allow_pickle)
    config, generation = parlai_config(opt, state)
    return config, generation, parlai_to_hf_weights(state, config)

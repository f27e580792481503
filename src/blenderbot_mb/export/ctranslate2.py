"""CTranslate2 export: the model as a `ctranslate2.specs.TransformerSpec`, saved by CTranslate2 itself.

Blenderbot fits CTranslate2's pre-norm Transformer: final LayerNorms on both stacks, embeddings scaled by
sqrt(d_model), learned position tables indexed from 0, the tied output projection with
`final_logits_bias` as its bias. The export holds two CTranslate2 models:

    float32/   the weights as they are
    int8/      int8 weights (CTranslate2's own quantization), float32 activations

plus config.json, generation_config.json and the tokenizer files at the top. CTranslate2 works on token
strings: its vocabulary is the tokenizer's (ids keep their order), or `<id_N>` names without a tokenizer.
`CTranslate2Blenderbot` runs `generate` on token ids with the settings CTranslate2 has; docs/export.md
lists those it lacks (encoder-side n-gram blocking, forced eos at the last position).
"""

from __future__ import annotations

import json
import os

import numpy as np

from .._backends import require_module
from ..errors import InputError

VARIANTS = {"float32": None, "int8": "int8"}
SPECIAL_NAMES = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>"}


def _activation(name: str):
    from ctranslate2.specs import common_spec

    act = common_spec.Activation
    table = {"gelu": act.GELU, "relu": act.RELU, "gelu_new": act.GELUTanh, "gelu_pytorch_tanh": act.GELUTanh,
             "gelu_fast": act.GELUTanh, "silu": act.SWISH, "swish": act.SWISH, "tanh": act.Tanh}
    return table[name]


def _linear(spec, w: dict, name: str) -> None:
    spec.weight = w[f"{name}.weight"]  # [out, in], as PyTorch
    spec.bias = w[f"{name}.bias"]


def _norm(spec, w: dict, name: str) -> None:
    spec.gamma, spec.beta = w[f"{name}.weight"], w[f"{name}.bias"]


def _attention(spec, w: dict, name: str, self_attention: bool) -> None:
    q, k, v = (w[f"{name}.{p}_proj.weight"] for p in "qkv")
    qb, kb, vb = (w[f"{name}.{p}_proj.bias"] for p in "qkv")
    if self_attention:  # one fused [3d, d] projection
        spec.linear[0].weight, spec.linear[0].bias = np.concatenate([q, k, v]), np.concatenate([qb, kb, vb])
    else:  # queries from the decoder, fused keys/values from the encoder
        spec.linear[0].weight, spec.linear[0].bias = q, qb
        spec.linear[1].weight, spec.linear[1].bias = np.concatenate([k, v]), np.concatenate([kb, vb])
    _linear(spec.linear[-1], w, f"{name}.out_proj")


def _stack(spec, w: dict, prefix: str, layers: int, config, decoder: bool) -> None:
    spec.scale_embeddings = float(np.sqrt(config.d_model)) if config.scale_embedding else 1.0
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = w["model.shared.weight"]
    spec.position_encodings.encodings = w[f"{prefix}.embed_positions.weight"]  # no offset: row i is position i
    _norm(spec.layer_norm, w, f"{prefix}.layer_norm")
    for i, layer in enumerate(spec.layer[:layers]):
        p = f"{prefix}.layers.{i}"
        _attention(layer.self_attention, w, f"{p}.self_attn", self_attention=True)
        _norm(layer.self_attention.layer_norm, w, f"{p}.self_attn_layer_norm")
        if decoder:
            _attention(layer.attention, w, f"{p}.encoder_attn", self_attention=False)
            _norm(layer.attention.layer_norm, w, f"{p}.encoder_attn_layer_norm")
        _linear(layer.ffn.linear_0, w, f"{p}.fc1")
        _linear(layer.ffn.linear_1, w, f"{p}.fc2")
        _norm(layer.ffn.layer_norm, w, f"{p}.final_layer_norm")


def model_spec(weights: dict[str, np.ndarray], config):
    """The TransformerSpec of a BlenderbotForConditionalGeneration's weights (PyTorch names and layout)."""
    require_module("ctranslate2", "export", "CTranslate2 export")
    from ctranslate2.specs import transformer_spec

    activation = _activation(config.activation_function)
    encoder = transformer_spec.TransformerEncoderSpec(config.encoder_layers, config.encoder_attention_heads,
                                                      pre_norm=True, activation=activation)
    decoder = transformer_spec.TransformerDecoderSpec(config.decoder_layers, config.decoder_attention_heads,
                                                      pre_norm=True, activation=activation)
    _stack(encoder, weights, "model.encoder", config.encoder_layers, config, decoder=False)
    _stack(decoder, weights, "model.decoder", config.decoder_layers, config, decoder=True)
    decoder.projection.weight = weights.get("lm_head.weight", weights["model.shared.weight"])
    decoder.projection.bias = weights["final_logits_bias"].reshape(-1)
    return transformer_spec.TransformerSpec(encoder, decoder)


def vocabulary(folder: str, vocab_size: int) -> list[str]:
    """Token strings for ids 0..vocab_size-1: the tokenizer's where the folder has one, else `<id_N>`."""
    tokens = {i: SPECIAL_NAMES.get(i, f"<id_{i}>") for i in range(vocab_size)}
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json")):
        from ..tokenizer import BlenderbotTokenizer

        for token, i in BlenderbotTokenizer.from_pretrained(folder).get_vocab().items():
            if 0 <= i < vocab_size:
                tokens[i] = token
    names = [tokens[i] for i in range(vocab_size)]
    if len(set(names)) != vocab_size:  # a tokenizer name that equals a filler name: keep ids distinct
        names = [f"<id_{i}>" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names


def export_folder(src: str, dst: str, allow_pickle: bool = False, quantization: tuple[str, ...] = tuple(VARIANTS)
                  ) -> list[str]:
    """Write the CTranslate2 models of the model folder `src` (variants `quantization`) into `dst`."""
    from ..convert import read_folder_config, read_numpy_weights
    from . import save_configs

    unknown = set(quantization) - set(VARIANTS)
    if unknown:
        raise InputError(f"unknown CTranslate2 variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    folder, config, arch = read_folder_config(src, allow_pickle)
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in read_numpy_weights(folder, config, arch,
                                                                                 allow_pickle).items()}
    tokens = vocabulary(folder, config.vocab_size)
    for variant in quantization:
        spec = model_spec(weights, config)
        spec.register_source_vocabulary(tokens)
        spec.register_target_vocabulary(tokens)
        spec.config.bos_token, spec.config.eos_token = tokens[config.bos_token_id], tokens[config.eos_token_id]
        spec.config.unk_token = tokens[3] if config.vocab_size > 3 else tokens[0]
        spec.config.decoder_start_token = tokens[config.decoder_start_token_id]
        spec.validate()
        spec.optimize(quantization=VARIANTS[variant])
        os.makedirs(os.path.join(dst, variant))
        spec.save(os.path.join(dst, variant))
    save_configs(folder, dst)
    return list(quantization)


# the processor plan's entries (generation_config.processor_plan) that generate() maps onto CTranslate2's options
_CAN = frozenset({"repetition_penalty", "no_repeat_ngram", "encoder_no_repeat_ngram", "min_length", "forced_eos",
                  "temperature", "top_k", "top_p"})
_SETTING = {"presence_frequency": "presence_penalty / frequency_penalty", "bad_words": "bad_words_ids",
            "forced_bos": "forced_bos_token_id"}


class CTranslate2Blenderbot:
    """A CTranslate2 export run on token ids: `generate` as the PyTorch backend's, for what CTranslate2 has.

    >>> bot = CTranslate2Blenderbot.from_pretrained("bb-ct2", variant="int8")      # doctest: +SKIP
    >>> bot.generate([[6950, 1085, 2]], num_beams=10)                              # doctest: +SKIP
    """

    def __init__(self, translator, tokens: list[str], generation_config, config):
        self.translator, self.tokens, self.config = translator, tokens, config
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.generation_config = generation_config

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, variant: str = "float32", device: str = "cpu",
                        intra_threads: int = 0):
        ctranslate2 = require_module("ctranslate2", "export", "Running a CTranslate2 export")
        from ..config import BlenderbotConfig
        from ..generation_config import GenerationConfig

        folder = os.fspath(folder)
        path = os.path.join(folder, variant)
        if not os.path.isfile(os.path.join(path, "model.bin")):
            raise InputError(f"{folder} has no CTranslate2 {variant!r} model (expected {path}/model.bin)")
        config = BlenderbotConfig.from_pretrained(folder)
        with open(os.path.join(path, "shared_vocabulary.json"), encoding="utf-8") as f:
            tokens = json.load(f)
        translator = ctranslate2.Translator(path, device=device, intra_threads=intra_threads)
        return cls(translator, tokens, GenerationConfig.from_pretrained(folder, config), config)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> list[list[int]]:
        """Replies to a batch of id lists (padding dropped by `attention_mask`), as lists of ids that start
        with the decoder start token and end with eos when the model produced one.

        Uses num_beams, max_length / max_new_tokens, min_length, length_penalty, no_repeat_ngram_size,
        repetition_penalty, do_sample with top_k / top_p / temperature. forced_eos_token_id replaces the
        last token of a reply cut at max_length (what the reference does for greedy search and sampling; for
        beam search the reference also ranks the beams with it). Other settings (encoder_no_repeat_ngram_size,
        bad_words_ids, min_p, ...) raise InputError: CTranslate2 has no such options.
        """
        gen = self.generation_config.resolve(self.config, **kwargs)
        if gen.encoder_no_repeat_ngram_size:
            raise InputError("CTranslate2 has no encoder-side n-gram blocking; pass encoder_no_repeat_ngram_size=0 "
                             "to generate without it")
        missing = [_SETTING.get(spec.name, spec.name) for spec in gen.processor_plan() if spec.name not in _CAN]
        if missing:
            raise InputError(f"CTranslate2's generation has no {', '.join(missing)}; generate with this package's "
                             "backends for them")
        rows = [list(map(int, r)) for r in np.asarray(input_ids).tolist()] if not isinstance(input_ids, list) \
            else [list(map(int, r)) for r in input_ids]
        if attention_mask is not None:
            rows = [[t for t, m in zip(r, ms, strict=True) if m] for r, ms in
                    zip(rows, np.asarray(attention_mask).tolist(), strict=True)]
        source = [[self.tokens[t] for t in r] for r in rows]
        options = dict(beam_size=gen.num_beams, max_decoding_length=gen.max_length - 1,
                       min_decoding_length=max(0, gen.min_length - 1), length_penalty=gen.length_penalty,
                       no_repeat_ngram_size=gen.no_repeat_ngram_size, repetition_penalty=gen.repetition_penalty,
                       return_end_token=True)
        if gen.do_sample:
            options.update(sampling_topk=gen.top_k or 0, sampling_topp=gen.top_p,
                           sampling_temperature=gen.temperature)
        results = self.translator.translate_batch(source, **options)
        out = [[gen.decoder_start_token_id, *(self.ids[t] for t in r.hypotheses[0])] for r in results]
        for seq in out:
            if gen.forced_eos_token_id is not None and len(seq) == gen.max_length and seq[-1] not in gen.eos_token_ids:
                seq[-1] = gen.forced_eos_token_id
        return out

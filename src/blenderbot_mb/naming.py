"""Tensor names: the single source of truth for every backend and converter.

`tensor_specs(config, architecture)` lists every tensor of a model in Hugging Face's PyTorch naming
(`model.encoder.layers.0.self_attn.k_proj.weight`), with its shape in PyTorch layout ([out, in] for
Linear weights) and its kind. The other layouts are functions of that name and kind:

- Flax (`flax_model.msgpack`, our Flax params): `model/encoder/layers/0/self_attn/k_proj/kernel`,
  Linear kernels [in, out], LayerNorm `scale`/`bias`, embeddings `embedding`.
- TensorFlow (`tf_model.h5`): see `tf_weight_name`.

Tied copies (the encoder/decoder `embed_tokens` and `lm_head` of a tied model) are aliases of the
canonical embedding and are accepted, checked and dropped on load.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("BlenderbotModel", "BlenderbotForConditionalGeneration", "BlenderbotForCausalLM")

LINEAR, BIAS, NORM_WEIGHT, NORM_BIAS, EMBEDDING, LOGITS_BIAS = (
    "linear", "bias", "norm_weight", "norm_bias", "embedding", "logits_bias",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str  # Hugging Face PyTorch name
    shape: tuple[int, ...]  # PyTorch layout
    kind: str  # one of LINEAR, BIAS, NORM_WEIGHT, NORM_BIAS, EMBEDDING, LOGITS_BIAS


def base_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES and architecture.replace("TF", "").replace("Flax", "") not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    return architecture.replace("TF", "", 1) if architecture.startswith("TF") else architecture.replace("Flax", "", 1)


def _attention(prefix: str, d: int) -> list[TensorSpec]:
    out = []
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        out.append(TensorSpec(f"{prefix}.{proj}.weight", (d, d), LINEAR))
        out.append(TensorSpec(f"{prefix}.{proj}.bias", (d,), BIAS))
    return out


def _norm(prefix: str, d: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (d,), NORM_WEIGHT), TensorSpec(f"{prefix}.bias", (d,), NORM_BIAS)]


def _stack(prefix: str, config, decoder: bool) -> list[TensorSpec]:
    d = config.d_model
    layers = config.decoder_layers if decoder else config.encoder_layers
    ffn = config.decoder_ffn_dim if decoder else config.encoder_ffn_dim
    specs = [TensorSpec(f"{prefix}.embed_positions.weight", (config.max_position_embeddings, d), EMBEDDING)]
    for i in range(layers):
        p = f"{prefix}.layers.{i}"
        specs += _attention(f"{p}.self_attn", d) + _norm(f"{p}.self_attn_layer_norm", d)
        if decoder:
            specs += _attention(f"{p}.encoder_attn", d) + _norm(f"{p}.encoder_attn_layer_norm", d)
        specs += [
            TensorSpec(f"{p}.fc1.weight", (ffn, d), LINEAR),
            TensorSpec(f"{p}.fc1.bias", (ffn,), BIAS),
            TensorSpec(f"{p}.fc2.weight", (d, ffn), LINEAR),
            TensorSpec(f"{p}.fc2.bias", (d,), BIAS),
        ]
        specs += _norm(f"{p}.final_layer_norm", d)
    specs += _norm(f"{prefix}.layer_norm", d)
    return specs


def tensor_specs(config, architecture: str = "BlenderbotForConditionalGeneration") -> list[TensorSpec]:
    """Every canonical tensor of `architecture` for `config`, in a fixed order."""
    arch = base_architecture(architecture)
    v, d = config.vocab_size, config.d_model
    if arch == "BlenderbotForCausalLM":
        specs = [TensorSpec("model.decoder.embed_tokens.weight", (v, d), EMBEDDING)]
        specs += _stack("model.decoder", config, decoder=True)
        if not config.tie_word_embeddings:
            specs.append(TensorSpec("lm_head.weight", (v, d), EMBEDDING))
        return specs
    prefix = "model." if arch == "BlenderbotForConditionalGeneration" else ""
    specs = [TensorSpec(f"{prefix}shared.weight", (v, d), EMBEDDING)]
    specs += _stack(f"{prefix}encoder", config, decoder=False)
    specs += _stack(f"{prefix}decoder", config, decoder=True)
    if arch == "BlenderbotForConditionalGeneration":
        specs.append(TensorSpec("final_logits_bias", (1, v), LOGITS_BIAS))
        if not config.tie_word_embeddings:
            specs.append(TensorSpec("lm_head.weight", (v, d), EMBEDDING))
    return specs


def tensor_names(config, architecture: str = "BlenderbotForConditionalGeneration") -> dict[str, tuple[int, ...]]:
    """{name: shape} of every canonical tensor (PyTorch names and layout)."""
    return {s.name: s.shape for s in tensor_specs(config, architecture)}


def tied_aliases(config, architecture: str = "BlenderbotForConditionalGeneration") -> dict[str, str]:
    """{alias name: canonical name} for tensors that are tied copies of another tensor."""
    arch = base_architecture(architecture)
    if arch == "BlenderbotForCausalLM":
        return {"lm_head.weight": "model.decoder.embed_tokens.weight"} if config.tie_word_embeddings else {}
    prefix = "model." if arch == "BlenderbotForConditionalGeneration" else ""
    aliases = {
        f"{prefix}encoder.embed_tokens.weight": f"{prefix}shared.weight",
        f"{prefix}decoder.embed_tokens.weight": f"{prefix}shared.weight",
    }
    if arch == "BlenderbotForConditionalGeneration" and config.tie_word_embeddings:
        aliases["lm_head.weight"] = "model.shared.weight"
    return aliases


# ---------------------------------------------------------------------- Flax layout
_FLAX_LEAF = {LINEAR: "kernel", BIAS: "bias", NORM_WEIGHT: "scale", NORM_BIAS: "bias", EMBEDDING: "embedding"}


def flax_path(spec: TensorSpec) -> tuple[str, ...]:
    """The Flax params path of a tensor: ('model', 'encoder', 'layers', '0', 'fc1', 'kernel').

    An untied `lm_head` is a Dense layer in Hugging Face's Flax model: `lm_head/kernel`, [d_model, vocab].
    """
    if spec.kind == LOGITS_BIAS:
        return (spec.name,)
    if spec.name == "lm_head.weight":
        return ("lm_head", "kernel")
    parts = spec.name.split(".")
    return (*parts[:-1], _FLAX_LEAF[spec.kind])


def flax_transposed(spec: TensorSpec) -> bool:
    """Whether Flax stores the tensor transposed: Linear kernels (and an untied lm_head) are [in, out]."""
    return spec.kind == LINEAR or spec.name == "lm_head.weight"


# ---------------------------------------------------------------------- TensorFlow layout (tf_model.h5)
# Hugging Face's TF models (transformers 4.x) save with Keras 2's h5 weights format: one h5 group per top-level
# layer ("model", and "final_logits_bias" for the LM), each weight named by its variable name. Variables sit under
# the model's name scope ("tf_blenderbot_for_conditional_generation/model/encoder/layers.0/fc1/kernel:0"), except
# the shared embedding, built in the absolute scope "model.shared/model.shared/", and final_logits_bias.
_TF_LEAF = {LINEAR: "kernel", BIAS: "bias", NORM_WEIGHT: "gamma", NORM_BIAS: "beta", EMBEDDING: "embeddings"}
TF_ROOT_NAMES = {"BlenderbotModel": "tf_blenderbot_model",
                 "BlenderbotForConditionalGeneration": "tf_blenderbot_for_conditional_generation"}


def tf_weight_name(spec: TensorSpec, architecture: str = "BlenderbotForConditionalGeneration") -> tuple[str, str]:
    """(h5 layer group, Keras weight name) of a tensor as Hugging Face's TFBlenderbot saves it.

    `model.encoder.layers.0.fc1.weight` -> ("model", "tf_blenderbot_for_conditional_generation/model/encoder/
    layers.0/fc1/kernel:0"); `model.shared.weight` -> ("model", "model.shared/model.shared/embeddings:0").
    """
    arch = base_architecture(architecture)
    if spec.kind == LOGITS_BIAS:
        return "final_logits_bias", "final_logits_bias:0"
    name = spec.name if spec.name.startswith("model.") else "model." + spec.name  # BlenderbotModel has no prefix
    if name == "model.shared.weight":
        return "model", "model.shared/model.shared/embeddings:0"
    parts = name.split(".")[:-1]
    # "layers.0" is one Keras layer name
    path, i = [], 0
    while i < len(parts):
        if parts[i] == "layers" and i + 1 < len(parts):
            path.append(f"layers.{parts[i + 1]}")
            i += 2
        else:
            path.append(parts[i])
            i += 1
    return "model", "/".join([TF_ROOT_NAMES[arch], *path, _TF_LEAF[spec.kind]]) + ":0"

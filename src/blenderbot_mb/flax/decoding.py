"""The Flax decode step written with the Pallas kernels of `blenderbot_mb.flax.kernels` (generate(kernels=True)).

The same arithmetic as the module's `decode_logits` at one new token per row (pre-LayerNorm decoder
layers, embeddings scaled by sqrt(d_model) when `scale_embedding`, the tied LM head plus
`final_logits_bias`), in a few kernels per layer: layer norm + fused q/k/v projection, the new keys/values
written into the module's cache at its index, self-attention over the cache, output projection +
residual, layer norm + cross-attention query, cross-attention over the keys/values `_cross_kv` made
once, output projection + residual, layer norm + fc1 + activation, fc2 + residual; then the final layer
norm and the LM head as one more kernel. It reads and writes the module's own cache pytree, so the
core's search (and its beam reorder) is unchanged. `prepare_weights` gathers the decoder's weights once
per generate call, inside the jit (q/k/v concatenated, matrices and biases in the compute dtype).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from ..errors import ConfigError
from .kernels import ACTIVATIONS, decode_attention, linear

EPS = 1e-5  # the module's LayerNorm epsilon


@dataclasses.dataclass(frozen=True)
class Launch:
    """Kernel launch parameters (block sizes are powers of two; None picks the kernel's default)."""

    block_n: int | None = None  # output columns per program of the projections
    block_k: int | None = None  # input features per step of the projections
    linear_warps: int = 4
    linear_stages: int = 2
    head_block_n: int | None = None  # the LM head's columns per program (vocabulary)
    block_l: int = 64  # keys per step of the attention
    attention_warps: int = 2
    attention_stages: int = 2

    def linear(self, head: bool = False) -> dict:
        return dict(block_n=self.head_block_n if head else self.block_n, block_k=self.block_k,
                    num_warps=self.linear_warps, num_stages=self.linear_stages)

    def attention(self) -> dict:
        return dict(block_l=self.block_l, num_warps=self.attention_warps, num_stages=self.attention_stages)


def check_supported(config) -> None:
    """ConfigError for what the kernel step does not compute."""
    if config.activation_function not in ACTIVATIONS:
        raise ConfigError(f"generate(kernels=True) supports the activations {', '.join(ACTIVATIONS)}; this "
                          f"model's is {config.activation_function!r} (use kernels=False)")


def prepare_weights(params, config, dtype) -> dict:
    """The decoder's weights as the step reads them: per layer the q/k/v kernels concatenated [d, 3d],
    matrices and biases cast to the compute dtype (as the module's Dense casts them), norms as they are."""
    base = params["model"]
    dec = base["decoder"]

    def dense(p):
        return p["kernel"].astype(dtype), p["bias"].astype(dtype)

    def norm(p):
        return p["scale"], p["bias"]

    layers = []
    for i in range(config.decoder_layers):
        p = dec["layers"][str(i)]
        attn = p["self_attn"]
        qkv = [dense(attn[name]) for name in ("q_proj", "k_proj", "v_proj")]
        layers.append(dict(
            qkv=(jnp.concatenate([w for w, _ in qkv], axis=1), jnp.concatenate([b for _, b in qkv])),
            out=dense(attn["out_proj"]), norm1=norm(p["self_attn_layer_norm"]),
            cross_q=dense(p["encoder_attn"]["q_proj"]), cross_out=dense(p["encoder_attn"]["out_proj"]),
            norm2=norm(p["encoder_attn_layer_norm"]), fc1=dense(p["fc1"]), fc2=dense(p["fc2"]),
            norm3=norm(p["final_layer_norm"])))
    head = base["shared"]["embedding"] if config.tie_word_embeddings else params["lm_head"]["kernel"]
    return dict(embedding=base["shared"]["embedding"].astype(dtype),
                positions=dec["embed_positions"]["embedding"].astype(dtype), layers=layers,
                final_norm=norm(dec["layer_norm"]), head=head.astype(dtype),
                logits_bias=params["final_logits_bias"][0].astype(dtype))


def decode_step(config, weights, cache, cross_kv, token, cur_len, encoder_attention_mask, launch: Launch | None = None):
    """Logits [N, V] (float32) for one new token per row at position cur_len - 1, and the updated cache:
    the module's `_decode_step` (same cache and cross K/V pytrees) computed by the Pallas kernels."""
    launch = launch or Launch()
    n, d, heads = token.shape[0], config.d_model, config.decoder_attention_heads
    hd = d // heads
    scale = math.sqrt(d) if config.scale_embedding else 1.0
    position = lax.dynamic_index_in_dim(weights["positions"], cur_len - 1, keepdims=True)  # [1, d]
    x = jnp.take(weights["embedding"], token, axis=0) * scale + position  # [n, d]
    layers_cache = cache["model"]["decoder"]["layers"]
    layers_kv = cross_kv["model"]["decoder"]["layers"]
    key_mask = encoder_attention_mask
    mm = launch.linear()
    new_layers = {}
    for i, w in enumerate(weights["layers"]):
        c = layers_cache[str(i)]["self_attn"]
        index = c["cache_index"]
        qkv = linear(x, *w["qkv"], norm=(*w["norm1"], EPS), **mm).reshape(n, 3, heads, hd)
        keys = lax.dynamic_update_slice(c["cached_key"], qkv[:, 1, :, None].astype(c["cached_key"].dtype),
                                        (0, 0, index, 0))  # [n, heads, L, hd]
        values = lax.dynamic_update_slice(c["cached_value"], qkv[:, 2, :, None].astype(c["cached_value"].dtype),
                                          (0, 0, index, 0))
        att = decode_attention(qkv[:, 0], keys, values, valid=index, **launch.attention())
        x = linear(att.reshape(n, d), *w["out"], residual=x, **mm)
        q = linear(x, *w["cross_q"], norm=(*w["norm2"], EPS), **mm).reshape(n, heads, hd)
        kv = layers_kv[str(i)]["encoder_attn"]
        att = decode_attention(q, kv["key"], kv["value"], valid=key_mask, **launch.attention())
        x = linear(att.reshape(n, d), *w["cross_out"], residual=x, **mm)
        h = linear(x, *w["fc1"], norm=(*w["norm3"], EPS), activation=config.activation_function, **mm)
        x = linear(h, *w["fc2"], residual=x, **mm)
        new_layers[str(i)] = {"self_attn": {"cached_key": keys, "cached_value": values, "cache_index": index + 1}}
    logits = linear(x, weights["head"], weights["logits_bias"], norm=(*weights["final_norm"], EPS),
                    transposed=config.tie_word_embeddings, out_dtype=jnp.float32, **launch.linear(head=True))
    return logits, {"model": {"decoder": {"layers": new_layers}}}

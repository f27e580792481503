"""Blenderbot in JAX / Flax (linen): pre-LayerNorm encoder-decoder Transformer.

Same math as `blenderbot_mb.torch.modeling`, module for module. Params are a plain nested dict whose
paths are Hugging Face's Flax names (`model/encoder/layers/0/self_attn/k_proj/kernel`), so HF
`flax_model.msgpack` files load as they are. `dtype` is the compute dtype (float32 or bfloat16);
params stay float32 unless `param_dtype` says otherwise. The decoder's self-attention cache is a
fixed-shape buffer `(batch, heads, max_length, head_dim)` written at a running index, so a whole
generation loop compiles under `jax.jit` (heads before positions, as the attention products read it: stored
`(batch, max_length, heads, head_dim)`, as the reference does, XLA copied the whole cache to that order for
every layer at every step). A cache with a `beam_table` beside the keys and values (generate()'s beam search)
is read through it: position p of row r from cache row table[r, p]. The cross-attention keys/values of the
encoder states can be stored once in a `cross_kv` collection (apply with it mutable) and then read instead of
projected (apply with it given); generate() does this, every other call projects them as the reference.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from functools import partial
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import outputs as O
from .. import validation
from ..checkpoint import load_pretrained
from ..checkpoint import save_pretrained as save_checkpoint
from ..checkpoint_msgpack import params_from_tensors, tensors_from_params
from ..config import BlenderbotConfig, as_config
from ..errors import ConfigError, InputError, check_sequence_length
from ..generation_config import GenerationConfig, GenerationConfigAttribute
from ..naming import flax_path, flax_transposed, tensor_specs
from ..training import IGNORE_INDEX, loss_dtype
from ..vocab_resize import resize_vocab_tensor, resized_vocab_size, vocab_tensor_names
from .generation import FlaxGenerationMixin, follow_table

ACT2FN = {
    "gelu": partial(jax.nn.gelu, approximate=False),  # exact erf GELU, as the reference
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "tanh": jnp.tanh,
}


def _register_outputs_as_pytrees():
    """The output classes pass through jit/pmap: children are the dataclass fields, None included."""
    for cls in (O.BaseModelOutput, O.BaseModelOutputWithPastAndCrossAttentions, O.Seq2SeqModelOutput,
                O.Seq2SeqLMOutput, O.CausalLMOutputWithCrossAttentions, O.GenerateOutput):
        names = tuple(f.name for f in dataclasses.fields(cls))
        try:
            jax.tree_util.register_pytree_node(
                cls, lambda o, n=names: (tuple(getattr(o, k) for k in n), None), lambda _, ch, c=cls: c(*ch)
            )
        except ValueError:  # already registered (module reloaded)
            pass


_register_outputs_as_pytrees()


def shift_tokens_right(input_ids, pad_token_id: int, decoder_start_token_id: int):
    """Prepend the decoder start token, drop the last token, and replace -100 (ignored labels) by pad."""
    input_ids = jnp.asarray(input_ids)
    start = jnp.full((input_ids.shape[0], 1), decoder_start_token_id, input_ids.dtype)
    shifted = jnp.concatenate([start, input_ids[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def cross_entropy_loss(logits, labels, label_smoothing: float = 0.0):
    """Mean token cross-entropy over the labels that count (`blenderbot_mb.training.IGNORE_INDEX` is
    ignored), in `training.loss_dtype`; label smoothing as defined in `blenderbot_mb.training`."""
    logits = logits.astype(loss_dtype(str(logits.dtype)))
    mask = labels != IGNORE_INDEX
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
    return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1)


def _precision(dtype):
    """Full float32 matmuls for float32 compute (GPUs would otherwise use TF32); default for bf16."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ---------------------------------------------------------------------- layers
class FlaxBlenderbotAttention(nn.Module):
    config: BlenderbotConfig
    num_heads: int
    dropout: float = 0.0
    causal: bool = False  # decoder self-attention: causal mask and KV cache
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, key_value_states=None, key_mask=None, init_cache=False, deterministic=True):
        d, h = self.config.d_model, self.num_heads
        hd = d // h
        prec = _precision(self.dtype)
        dense = partial(nn.Dense, d, dtype=self.dtype, precision=prec,
                        kernel_init=nn.initializers.normal(self.config.init_std))
        b, q_len = hidden_states.shape[:2]
        kv_in = hidden_states if key_value_states is None else key_value_states
        def heads(x):  # [b, t, d] -> [b, h, t, hd]: the attention products' batch dimensions lead, so the cached
            return x.reshape(b, x.shape[1], h, hd).transpose(0, 2, 1, 3)  # keys are not copied to that each step

        q = heads(dense(name="q_proj")(hidden_states))
        if key_value_states is not None and self.has_variable("cross_kv", "key"):
            # the encoder's keys/values, projected once per generate() call (collection `cross_kv`)
            k, v = self.get_variable("cross_kv", "key"), self.get_variable("cross_kv", "value")
        else:
            k, v = heads(dense(name="k_proj")(kv_in)), heads(dense(name="v_proj")(kv_in))
            if key_value_states is not None and self.is_mutable_collection("cross_kv"):
                self.put_variable("cross_kv", "key", k)
                self.put_variable("cross_kv", "value", v)

        mask = None if key_mask is None else key_mask[:, None, None, :]  # (b, 1, 1, keys)
        if self.causal:
            query_pos = jnp.arange(q_len)
            if self.has_variable("cache", "cached_key"):  # write this block at the cache index
                cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
                cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
                index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
                start = index.value
                zero = jnp.zeros((), start.dtype)  # (indices of one type, also where jax_enable_x64 makes 0 int64)
                k = lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (zero, zero, start, zero))
                v = lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (zero, zero, start, zero))
                cached_k.value, cached_v.value, index.value = k, v, start + q_len
                query_pos = start + query_pos
                if self.has_variable("cache", "beam_table"):  # beam search: rows read through the table
                    table = lax.dynamic_update_slice(  # this block's positions: each row's own cache row
                        self.get_variable("cache", "beam_table"),
                        jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, q_len)), (zero, start))
                    self.put_variable("cache", "beam_table", table)
                    k, v = follow_table(k, table), follow_table(v, table)
            elif init_cache:  # first call: create the buffers, shaped by this (batch, max_length) input
                self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
                self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
                self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            causal = jnp.arange(k.shape[2])[None, :] <= query_pos[:, None]  # (q, keys)
            mask = causal[None, None] if mask is None else (mask & causal[None, None])

        scores = jnp.einsum("bhqd,bhkd->bhqk", q * hd**-0.5, k, precision=prec)
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(loss_dtype(str(scores.dtype))), axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v, precision=prec).transpose(0, 2, 1, 3).reshape(b, q_len, d)
        return dense(name="out_proj")(out), weights


def _norm(name, dtype):
    """LayerNorm with the variance as the mean of (x - mean)^2, as PyTorch's. Flax's default (fast) variance,
    E[x^2] - E[x]^2, makes both sums in one multi-output reduction, which XLA's GPU compiler leaves apart from
    the normalized rows (two kernels a norm); this one is a single normalization kernel (docs/benchmarks.md)."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)


def _feed_forward(module, x, ffn_dim, deterministic):
    """fc1 -> activation -> fc2, created inside `module` (params `fc1`, `fc2` of the layer)."""
    c = module.config
    prec = _precision(module.dtype)
    init = nn.initializers.normal(c.init_std)
    x = nn.Dense(ffn_dim, dtype=module.dtype, precision=prec, kernel_init=init, name="fc1")(x)
    x = ACT2FN[c.activation_function](x)
    x = nn.Dropout(c.activation_dropout)(x, deterministic=deterministic)
    return nn.Dense(c.d_model, dtype=module.dtype, precision=prec, kernel_init=init, name="fc2")(x)


class FlaxBlenderbotEncoderLayer(nn.Module):
    config: BlenderbotConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic=True):
        c = self.config
        drop = nn.Dropout(c.dropout)
        attn = FlaxBlenderbotAttention(c, c.encoder_attention_heads, c.attention_dropout, dtype=self.dtype,
                                       name="self_attn")
        h, weights = attn(_norm("self_attn_layer_norm", self.dtype)(x), key_mask=key_mask, deterministic=deterministic)
        x = x + drop(h, deterministic=deterministic)
        h = _feed_forward(self, _norm("final_layer_norm", self.dtype)(x), c.encoder_ffn_dim, deterministic)
        return x + drop(h, deterministic=deterministic), weights


class FlaxBlenderbotDecoderLayer(nn.Module):
    config: BlenderbotConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, encoder_hidden_states, encoder_key_mask, init_cache=False, deterministic=True):
        c = self.config
        drop = nn.Dropout(c.dropout)
        self_attn = FlaxBlenderbotAttention(c, c.decoder_attention_heads, c.attention_dropout, causal=True,
                                            dtype=self.dtype, name="self_attn")
        h, self_weights = self_attn(_norm("self_attn_layer_norm", self.dtype)(x), key_mask=key_mask,
                                    init_cache=init_cache, deterministic=deterministic)
        x = x + drop(h, deterministic=deterministic)
        cross_weights = None
        if encoder_hidden_states is not None:
            cross = FlaxBlenderbotAttention(c, c.decoder_attention_heads, c.attention_dropout, dtype=self.dtype,
                                            name="encoder_attn")
            h, cross_weights = cross(_norm("encoder_attn_layer_norm", self.dtype)(x), encoder_hidden_states,
                                     key_mask=encoder_key_mask, deterministic=deterministic)
            x = x + drop(h, deterministic=deterministic)
        h = _feed_forward(self, _norm("final_layer_norm", self.dtype)(x), c.decoder_ffn_dim, deterministic)
        return x + drop(h, deterministic=deterministic), self_weights, cross_weights


class FlaxBlenderbotEncoderLayerCollection(nn.Module):
    """Holds the layers under the names '0', '1', ... (HF's params paths `encoder/layers/0/...`).

    With `gradient_checkpointing`, each layer's activations are recomputed in the backward pass (`nn.remat`)."""

    config: BlenderbotConfig
    dtype: jnp.dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, key_mask, deterministic=True, output_attentions=False, output_hidden_states=False):
        layer = FlaxBlenderbotEncoderLayer
        if self.gradient_checkpointing:
            layer = nn.remat(layer, static_argnums=(3,))  # (self, x, key_mask, deterministic)
        hidden, attentions = (), ()
        for i in range(self.config.encoder_layers):
            hidden += (x,)
            x, weights = layer(self.config, self.dtype, name=str(i))(x, key_mask, deterministic)
            attentions += (weights,)
        return x, (hidden + (x,) if output_hidden_states else None), (attentions if output_attentions else None)


class FlaxBlenderbotDecoderLayerCollection(nn.Module):
    config: BlenderbotConfig
    dtype: jnp.dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, key_mask, encoder_hidden_states, encoder_key_mask, init_cache=False, deterministic=True,
                 output_attentions=False, output_hidden_states=False):
        layer = FlaxBlenderbotDecoderLayer
        if self.gradient_checkpointing:  # static: init_cache, deterministic
            layer = nn.remat(layer, static_argnums=(5, 6))
        hidden, self_attns, cross_attns = (), (), ()
        for i in range(self.config.decoder_layers):
            hidden += (x,)
            x, sw, cw = layer(self.config, self.dtype, name=str(i))(
                x, key_mask, encoder_hidden_states, encoder_key_mask, init_cache, deterministic)
            self_attns += (sw,)
            cross_attns += (cw,)
        if not output_attentions:
            self_attns = cross_attns = None
        elif encoder_hidden_states is None:
            cross_attns = None
        return x, (hidden + (x,) if output_hidden_states else None), self_attns, cross_attns


def _embed_scale(config):
    return math.sqrt(config.d_model) if config.scale_embedding else 1.0


class _FlaxBlenderbotStack(nn.Module):
    """What the encoder and the decoder share: the shared token embedding (scaled by sqrt(d_model) when
    `scale_embedding`), learned positions, the layer collection and the final LayerNorm."""

    config: BlenderbotConfig
    embed_tokens: nn.Embed
    dtype: jnp.dtype = jnp.float32
    gradient_checkpointing: bool = False
    collection_class: ClassVar[type[nn.Module]]

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.init_std)
        self.embed_positions = nn.Embed(c.max_position_embeddings, c.d_model, embedding_init=init, dtype=self.dtype)
        self.layers = self.collection_class(c, self.dtype, self.gradient_checkpointing)
        self.layer_norm = _norm(None, self.dtype)
        self.dropout_layer = nn.Dropout(c.dropout)

    def embed(self, input_ids, position_ids, deterministic):
        x = self.embed_tokens(input_ids) * _embed_scale(self.config) + self.embed_positions(position_ids)
        return self.dropout_layer(x, deterministic=deterministic)


class FlaxBlenderbotEncoder(_FlaxBlenderbotStack):
    collection_class: ClassVar[type[nn.Module]] = FlaxBlenderbotEncoderLayerCollection

    def __call__(self, input_ids, attention_mask, position_ids, output_attentions=False,
                 output_hidden_states=False, deterministic=True):
        x = self.embed(input_ids, position_ids, deterministic)
        x, hidden, attentions = self.layers(x, attention_mask.astype(bool), deterministic, output_attentions,
                                            output_hidden_states)
        x = self.layer_norm(x)
        if hidden is not None:  # the last entry is the normed output, as the reference returns it
            hidden = hidden[:-1] + (x,)
        return O.BaseModelOutput(last_hidden_state=x, hidden_states=hidden, attentions=attentions)


class FlaxBlenderbotDecoder(_FlaxBlenderbotStack):
    collection_class: ClassVar[type[nn.Module]] = FlaxBlenderbotDecoderLayerCollection

    def __call__(self, input_ids, attention_mask, position_ids, encoder_hidden_states=None,
                 encoder_attention_mask=None, init_cache=False, output_attentions=False,
                 output_hidden_states=False, deterministic=True):
        x = self.embed(input_ids, position_ids, deterministic)
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        enc_mask = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
        x, hidden, self_attns, cross_attns = self.layers(
            x, key_mask, encoder_hidden_states, enc_mask, init_cache, deterministic, output_attentions,
            output_hidden_states)
        x = self.layer_norm(x)
        if hidden is not None:
            hidden = hidden[:-1] + (x,)
        return O.BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=x, hidden_states=hidden, attentions=self_attns, cross_attentions=cross_attns)


class FlaxBlenderbotModule(nn.Module):
    config: BlenderbotConfig
    dtype: jnp.dtype = jnp.float32
    gradient_checkpointing: bool = False

    def setup(self):
        c = self.config
        self.shared = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(c.init_std),
                               dtype=self.dtype)
        self.encoder = FlaxBlenderbotEncoder(c, self.shared, self.dtype, self.gradient_checkpointing)
        self.decoder = FlaxBlenderbotDecoder(c, self.shared, self.dtype, self.gradient_checkpointing)

    def _get_encoder_module(self):
        return self.encoder

    def _get_decoder_module(self):
        return self.decoder

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, position_ids,
                 decoder_position_ids, output_attentions=False, output_hidden_states=False, deterministic=True):
        enc = self.encoder(input_ids, attention_mask, position_ids, output_attentions, output_hidden_states,
                           deterministic)
        dec = self.decoder(decoder_input_ids, decoder_attention_mask, decoder_position_ids, enc.last_hidden_state,
                           attention_mask, False, output_attentions, output_hidden_states, deterministic)
        return O.Seq2SeqModelOutput(
            last_hidden_state=dec.last_hidden_state, decoder_hidden_states=dec.hidden_states,
            decoder_attentions=dec.attentions, cross_attentions=dec.cross_attentions,
            encoder_last_hidden_state=enc.last_hidden_state, encoder_hidden_states=enc.hidden_states,
            encoder_attentions=enc.attentions)


class FlaxBlenderbotForConditionalGenerationModule(nn.Module):
    config: BlenderbotConfig
    dtype: jnp.dtype = jnp.float32
    gradient_checkpointing: bool = False

    def setup(self):
        c = self.config
        self.model = FlaxBlenderbotModule(c, self.dtype, self.gradient_checkpointing)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, precision=_precision(self.dtype),
                                    kernel_init=nn.initializers.normal(c.init_std))
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (1, c.vocab_size))

    def _get_encoder_module(self):
        return self.model.encoder

    def _get_decoder_module(self):
        return self.model.decoder

    def logits(self, hidden_states):
        """LM head (tied: hidden @ shared.T) plus the non-trainable final_logits_bias."""
        if self.config.tie_word_embeddings:
            emb = self.model.shared.embedding.astype(self.dtype)
            logits = jnp.einsum("btd,vd->btv", hidden_states, emb, precision=_precision(self.dtype))
        else:
            logits = self.lm_head(hidden_states)
        return logits + self.final_logits_bias.astype(self.dtype)

    def decode_logits(self, decoder_input_ids, decoder_attention_mask, decoder_position_ids, **kwargs):
        dec = self.model.decoder(decoder_input_ids, decoder_attention_mask, decoder_position_ids, **kwargs)
        return O.CausalLMOutputWithCrossAttentions(
            logits=self.logits(dec.last_hidden_state), hidden_states=dec.hidden_states, attentions=dec.attentions,
            cross_attentions=dec.cross_attentions)

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        return O.Seq2SeqLMOutput(
            logits=self.logits(out.last_hidden_state), decoder_hidden_states=out.decoder_hidden_states,
            decoder_attentions=out.decoder_attentions, cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=out.encoder_last_hidden_state, encoder_hidden_states=out.encoder_hidden_states,
            encoder_attentions=out.encoder_attentions)


# ---------------------------------------------------------------------- user-facing models
def _float_dtype(dtype, what: str):
    """A floating compute or param dtype (a jnp type or its name); None is float32. ConfigError otherwise."""
    if dtype is None:
        return jnp.float32
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ConfigError(f"{what} must be a floating dtype (jnp.float32, jnp.bfloat16, 'float16', ...), got "
                          f"{dtype!r}")
    return dtype


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_ids(x, what: str):
    """Concrete ids as int32; floats, bools and ids beyond int32 stay as they are, for `_check_ids` to refuse."""
    if isinstance(x, jax.Array) and not _concrete(x):
        return x
    x = validation.host_array(x, what)
    fits = x.dtype.kind in "iu" and (not x.size or (x.min() >= -(2**31) and x.max() < 2**31))
    return jnp.asarray(x, dtype=jnp.int32) if fits else x


def _positions(batch, length, start=0):
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))


def _cache_index(cache):
    """The running index of a decoder cache (every layer holds the same value)."""
    leaves = [v for path, v in jax.tree_util.tree_leaves_with_path(cache) if str(path[-1]).find("cache_index") >= 0]
    return leaves[0]


class FlaxBlenderbotPreTrainedModel(FlaxGenerationMixin):
    """Holds a config, a linen module and its params; the reference's Flax calling convention.

    `params` is a nested dict (HF Flax names); every method takes `params=` to use other params
    (e.g. inside a jitted train step). `dtype` is the compute dtype.
    """

    module_class: type[nn.Module] = None
    architecture = "BlenderbotForConditionalGeneration"
    base_model_prefix = "model"

    def __init__(self, config: BlenderbotConfig, input_shape=(1, 1), seed: int = 0, dtype=jnp.float32,
                 _do_init: bool = True, params=None, generation_config: GenerationConfig | None = None,
                 gradient_checkpointing: bool = False):
        config = as_config(config)
        config.validate()
        self.config = config
        self.dtype = dtype = _float_dtype(dtype, "dtype")
        self.module = self.module_class(config=config, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self._generate_fns = {}
        if params is None and _do_init:
            params = self.init_weights(jax.random.PRNGKey(seed), input_shape)
        self._params = None
        if params is not None:
            self.params = params  # checked

    generation_config = GenerationConfigAttribute()  # a transformers GenerationConfig assigned here is converted

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in the backward pass (`nn.remat`): less memory, more compute."""
        self.module = self.module_class(config=self.config, dtype=self.dtype, gradient_checkpointing=True)
        self._generate_fns = {}

    # ------------------------------------------------------------------ params
    @property
    def params(self):
        if self._params is None:
            raise ValueError("this model was built with _do_init=False; pass params= or set model.params")
        return self._params

    @params.setter
    def params(self, params):
        """Checked as the reference checks it: every parameter of the model present (a ValueError names the
        missing ones), and here also of its shape; other entries are kept."""
        from flax.core import unfreeze
        from flax.traverse_util import flatten_dict

        params = unfreeze(params) if hasattr(params, "unfreeze") else params
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a nested dict of arrays, got {type(params).__name__}")
        given = flatten_dict(params)
        expected = self._param_shapes()
        missing = sorted("/".join(k) for k in expected if k not in given)
        if missing:
            raise ValueError(f"Some parameters are missing: {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        wrong = [f"{'/'.join(k)} {tuple(np.shape(given[k]))} (expected {shape})" for k, shape in expected.items()
                 if tuple(np.shape(given[k])) != shape]
        if wrong:
            raise ValueError(f"parameters of the wrong shape: {'; '.join(wrong[:4])}")
        self._params = params

    def _param_shapes(self) -> dict[tuple, tuple]:
        """{flattened param path: shape} of this model's config (the core's tensor names, in Flax's layout)."""
        return {tuple(flax_path(spec)): tuple(reversed(spec.shape)) if flax_transposed(spec) else tuple(spec.shape)
                for spec in tensor_specs(self.config, self.architecture)}

    def init_weights(self, rng, input_shape=(1, 1), params=None):
        """Random params (the reference's initializers); with `params`, the ones missing from it are filled
        in from the random ones (as the reference does for a checkpoint lacking some)."""
        ids = jnp.zeros(input_shape, jnp.int32).at[..., -1].set(self.config.eos_token_id)
        mask = jnp.ones_like(ids)
        pos = _positions(*input_shape)
        params_rng, dropout_rng = jax.random.split(rng)
        init = jax.jit(self.module.init)
        random_params = init({"params": params_rng, "dropout": dropout_rng}, ids, mask, ids, mask, pos, pos)["params"]
        if params is None:
            return random_params
        from flax.core import unfreeze
        from flax.traverse_util import flatten_dict, unflatten_dict

        given = flatten_dict(unfreeze(params) if hasattr(params, "unfreeze") else params)
        return unflatten_dict({**flatten_dict(random_params), **given})

    def _cast(self, params, dtype, mask):
        """params (default self.params) cast to `dtype` where the matching leaf of `mask` (a pytree of bools of
        the params' structure, as the reference's) is True; float leaves only."""
        params = self.params if params is None else params
        cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p  # noqa: E731
        if mask is None:
            return jax.tree_util.tree_map(cast, params)
        return jax.tree_util.tree_map(lambda p, m: cast(p) if m else p, params, mask)

    def to_bf16(self, params=None, mask=None):
        return self._cast(params, jnp.bfloat16, mask)

    def to_fp16(self, params=None, mask=None):
        return self._cast(params, jnp.float16, mask)

    def to_fp32(self, params=None, mask=None):
        return self._cast(params, jnp.float32, mask)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True):
        """Give the vocabulary `new_num_tokens` entries (rounded up to `pad_to_multiple_of`) and return the
        new input embedding matrix (vocab, d_model). `self.params` (the shared embedding, an untied
        `lm_head`, `final_logits_bias`) and `config.vocab_size` change together; the rule for new rows is
        `blenderbot_mb.vocab_resize`'s."""
        size = resized_vocab_size(self.config, new_num_tokens, pad_to_multiple_of)
        names = vocab_tensor_names(self.config, self.architecture)
        if size != self.config.vocab_size:
            tensors = tensors_from_params(self.params, self.config, self.architecture)
            for name in names:
                old = tensors[name]
                tensors[name] = jnp.asarray(resize_vocab_tensor(name, np.asarray(old), size, self.config.init_std,
                                                                mean_resizing), dtype=old.dtype)
            self.config.vocab_size = size  # in place: the linen module holds this config
            self.params = params_from_tensors(tensors, self.config, self.architecture)
            self._generate_fns = {}  # compiled for the old vocabulary
        return tensors_from_params(self.params, self.config, self.architecture)[names[0]]

    def state_dict(self, params=None) -> dict[str, np.ndarray]:
        """{canonical HF PyTorch name: numpy array in PyTorch layout} (what checkpoints hold)."""
        tensors = tensors_from_params(self.params if params is None else params, self.config, self.architecture)
        return {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, config: BlenderbotConfig | None = None,
                        dtype=jnp.float32, param_dtype=jnp.float32, allow_pickle: bool = False,
                        _do_init: bool = True, **kwargs):
        """Load a folder or hub id: safetensors (any backend's), HF `flax_model.msgpack`, or (opt-in) a pickle.

        Params are cast to `param_dtype` (float32 by default; pass None to keep the file's dtype). Other
        keyword arguments are hub options or config overrides, as in the reference. `_do_init=False` returns
        `(model, params)` with the params kept outside the model, as the reference does (for sharding them
        yourself: every method takes `params=`).
        """
        dtype = _float_dtype(dtype, "dtype")
        param_dtype = None if param_dtype is None else _float_dtype(param_dtype, "param_dtype")
        config, tensors, generation_config = load_pretrained(os.fspath(pretrained_model_name_or_path),
                                                             cls.architecture, "numpy", config, allow_pickle, **kwargs)
        params = params_from_tensors(tensors, config, cls.architecture)
        params = jax.tree_util.tree_map(
            lambda t: jnp.asarray(t, dtype=param_dtype if param_dtype is not None else t.dtype), params)
        if not _do_init:
            return cls(config, dtype=dtype, _do_init=False, generation_config=generation_config), params
        model = cls(config, dtype=dtype, _do_init=False, generation_config=generation_config)
        model.params = params  # checked: every parameter present, of its shape
        return model

    def save_pretrained(self, save_directory, params=None, max_shard_size="5GB", safe_serialization: bool = True):
        """config.json, generation_config.json and model.safetensors (HF PyTorch layout, any backend reads it).

        safe_serialization=False writes HF's Flax `flax_model.msgpack` instead.
        """
        save_checkpoint(os.fspath(save_directory), self.config, self.state_dict(params), framework="numpy",
                        generation_config=self.generation_config, max_shard_size=max_shard_size,
                        architecture=self.architecture, weights_format="safetensors" if safe_serialization else "flax")

    # ------------------------------------------------------------------ input checks
    def _check_ids(self, ids, what):
        validation.check_input_ids(ids, self.config.vocab_size, self.config.max_position_embeddings, what,
                                   values=_concrete(ids))

    # ------------------------------------------------------------------ forward passes
    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 position_ids=None, decoder_position_ids=None, output_attentions=None, output_hidden_states=None,
                 return_dict=None, train: bool = False, params=None, dropout_rng=None, labels=None):
        """Full forward pass. `labels` (our addition, as the PyTorch classes) adds the loss and, without
        decoder_input_ids, feeds `shift_tokens_right(labels)` to the decoder."""
        c = self.config
        input_ids = _as_ids(input_ids, "input_ids")
        self._check_ids(input_ids, "input_ids")
        labels = None if labels is None else _as_ids(labels, "labels")
        if labels is not None:
            validation.check_labels(labels, None if decoder_input_ids is None else np.shape(decoder_input_ids),
                                    c.vocab_size, values=_concrete(labels), max_positions=c.max_position_embeddings)
        if decoder_input_ids is None:  # from the labels, else (as the reference Flax classes) from input_ids
            source = labels if labels is not None else input_ids
            decoder_input_ids = shift_tokens_right(source, c.pad_token_id, c.decoder_start_token_id)
        decoder_input_ids = _as_ids(decoder_input_ids, "decoder_input_ids")
        self._check_ids(decoder_input_ids, "decoder_input_ids")
        b, s = input_ids.shape
        t = decoder_input_ids.shape[1]
        validation.check_batch_rows(decoder_input_ids.shape[0], b)
        validation.check_attention_mask(attention_mask, (b, s), values=_concrete(attention_mask))
        validation.check_attention_mask(decoder_attention_mask, (b, t), "decoder_attention_mask",
                                        values=_concrete(decoder_attention_mask))
        attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        decoder_attention_mask = (jnp.ones_like(decoder_input_ids) if decoder_attention_mask is None
                                  else jnp.asarray(decoder_attention_mask))
        position_ids = _positions(b, s) if position_ids is None else jnp.asarray(position_ids)
        decoder_position_ids = _positions(b, t) if decoder_position_ids is None else jnp.asarray(decoder_position_ids)
        out = self.module.apply(
            {"params": self.params if params is None else params}, input_ids, attention_mask, decoder_input_ids,
            decoder_attention_mask, position_ids, decoder_position_ids,
            output_attentions=bool(output_attentions if output_attentions is not None else c.output_attentions),
            output_hidden_states=bool(output_hidden_states if output_hidden_states is not None
                                      else c.output_hidden_states),
            deterministic=not train, rngs={"dropout": dropout_rng} if dropout_rng is not None else {})
        if labels is not None and hasattr(out, "logits"):  # nan when no label counts, as the reference
            counted = jnp.sum(labels != IGNORE_INDEX)
            out.loss = jnp.where(counted > 0, cross_entropy_loss(out.logits, labels), jnp.nan)
        return out if (return_dict if return_dict is not None else c.use_return_dict) else out.to_tuple()

    def encode(self, input_ids, attention_mask=None, position_ids=None, output_attentions=None,
               output_hidden_states=None, return_dict=None, train: bool = False, params=None, dropout_rng=None):
        c = self.config
        input_ids = _as_ids(input_ids, "input_ids")
        self._check_ids(input_ids, "input_ids")
        b, s = input_ids.shape
        validation.check_attention_mask(attention_mask, (b, s), values=_concrete(attention_mask))
        attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        position_ids = _positions(b, s) if position_ids is None else jnp.asarray(position_ids)
        out = self.module.apply(
            {"params": self.params if params is None else params}, input_ids, attention_mask, position_ids,
            bool(output_attentions if output_attentions is not None else c.output_attentions),
            bool(output_hidden_states if output_hidden_states is not None else c.output_hidden_states),
            not train, rngs={"dropout": dropout_rng} if dropout_rng is not None else {},
            method=lambda m, *a: m._get_encoder_module()(*a))
        return out if (return_dict if return_dict is not None else c.use_return_dict) else out.to_tuple()

    def init_cache(self, batch_size: int, max_length: int, encoder_outputs=None):
        """A zeroed decoder self-attention cache for `max_length` decoder positions (a nested dict). The
        reference's `encoder_outputs` argument is taken and not needed: the cache's shape depends only on the
        batch size and `max_length`."""
        check_sequence_length(max_length, self.config.max_position_embeddings, "cache max_length")
        ids = jnp.ones((batch_size, max_length), jnp.int32)

        def create(module):
            decoder = module._get_decoder_module()
            return decoder(ids, None, _positions(batch_size, max_length), init_cache=True)

        shapes = jax.eval_shape(lambda: self.module.init(jax.random.PRNGKey(0), method=create)["cache"])
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def _decode_method(self):
        return lambda m, *a, **k: m._get_decoder_module()(*a, **k)

    def decode(self, decoder_input_ids, encoder_outputs, encoder_attention_mask=None, decoder_attention_mask=None,
               decoder_position_ids=None, past_key_values=None, output_attentions=None, output_hidden_states=None,
               return_dict=None, train: bool = False, params=None, dropout_rng=None):
        """Run the decoder (and the LM head, for the generation class) on `encoder_outputs`.

        With `past_key_values` (from `init_cache` or a previous call) the new tokens are written into the
        cache at its index and the updated cache comes back as `past_key_values`; positions default to
        the cache index onwards. `decoder_attention_mask` then covers the whole cache length.
        """
        c = self.config
        decoder_input_ids = _as_ids(decoder_input_ids, "decoder_input_ids")
        self._check_ids(decoder_input_ids, "decoder_input_ids")
        encoder_hidden_states = O.as_encoder_outputs(encoder_outputs).last_hidden_state
        b, t = decoder_input_ids.shape
        validation.check_batch_rows(b, encoder_hidden_states.shape[0])
        validation.check_attention_mask(encoder_attention_mask, encoder_hidden_states.shape[:2],
                                        "encoder attention_mask", values=_concrete(encoder_attention_mask))
        if encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
        variables = {"params": self.params if params is None else params}
        if past_key_values is not None:
            variables["cache"] = past_key_values
            cache_len = next(x.shape[2] for x in jax.tree_util.tree_leaves(past_key_values) if x.ndim == 4)
            if decoder_attention_mask is not None and decoder_attention_mask.shape[-1] != cache_len:
                raise InputError(
                    f"with past_key_values, decoder_attention_mask must cover the whole cache ({cache_len} "
                    f"positions), got length {decoder_attention_mask.shape[-1]}")
            index = _cache_index(past_key_values)
            if _concrete(index) and int(index) + t > cache_len:
                raise InputError(f"the cache holds {cache_len} positions; {int(index)} are used and {t} more "
                                 "do not fit. Call init_cache with a larger max_length.")
            if decoder_position_ids is None:
                decoder_position_ids = _positions(b, t, index)
        elif decoder_position_ids is None:
            decoder_position_ids = _positions(b, t)
        method = "decode_logits" if hasattr(self.module, "decode_logits") else self._decode_method()
        out = self.module.apply(
            variables, decoder_input_ids,
            None if decoder_attention_mask is None else jnp.asarray(decoder_attention_mask),
            jnp.asarray(decoder_position_ids), encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=jnp.asarray(encoder_attention_mask),
            output_attentions=bool(output_attentions if output_attentions is not None else c.output_attentions),
            output_hidden_states=bool(output_hidden_states if output_hidden_states is not None
                                      else c.output_hidden_states),
            deterministic=not train, rngs={"dropout": dropout_rng} if dropout_rng is not None else {},
            mutable=["cache"] if past_key_values is not None else False, method=method)
        if past_key_values is not None:
            out, updated = out
            out.past_key_values = updated["cache"]
        return out if (return_dict if return_dict is not None else c.use_return_dict) else out.to_tuple()


class FlaxBlenderbotModel(FlaxBlenderbotPreTrainedModel):
    """The bare encoder-decoder (no LM head); params without the `model` level."""

    module_class = FlaxBlenderbotModule
    architecture = "BlenderbotModel"

    def generate(self, *args, **kwargs):
        raise TypeError("FlaxBlenderbotModel has no LM head; use FlaxBlenderbotForConditionalGeneration.generate")


class FlaxBlenderbotForConditionalGeneration(FlaxBlenderbotPreTrainedModel):
    """Encoder-decoder with the tied LM head and `final_logits_bias`; `generate()` runs under jax.jit."""

    module_class = FlaxBlenderbotForConditionalGenerationModule
    architecture = "BlenderbotForConditionalGeneration"

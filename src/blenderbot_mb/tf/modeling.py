"""Blenderbot in Keras 3 on the TensorFlow backend: the same math and names as `blenderbot_mb.torch.modeling`.

Pre-LayerNorm encoder-decoder Transformer: `x + SelfAttn(LN(x))`, (decoder) `x + CrossAttn(LN(x), enc)`,
`x + FC2(act(FC1(LN(x))))`, a final LayerNorm per stack, shared token embeddings scaled by sqrt(d_model) when
`scale_embedding`, learned positions from 0, tied LM head plus a frozen `final_logits_bias`.

Two cache forms: `past_key_values` as in the reference (per decoder layer a tuple self-k, self-v, cross-k, cross-v
that grows by concatenation), and the fixed-shape form `generate` uses under XLA (self-k/v preallocated to the
maximum length and written at `cache_index`).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from .. import validation
from ..checkpoint import load_pretrained
from ..checkpoint import save_pretrained as save_checkpoint
from ..config import BlenderbotConfig, as_config
from ..errors import ConfigError, InputError, check_sequence_length
from ..generation_config import GenerationConfig, GenerationConfigAttribute
from ..outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    as_encoder_outputs,
)
from ..training import IGNORE_INDEX, loss_dtype
from ..vocab_resize import resize_vocab_tensor, resized_vocab_size, vocab_tensor_names
from .generation import TFGenerationMixin

CALL_ARGS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "decoder_position_ids",
             "head_mask", "decoder_head_mask", "cross_attn_head_mask", "encoder_outputs", "past_key_values",
             "inputs_embeds", "decoder_inputs_embeds", "use_cache", "output_attentions", "output_hidden_states",
             "return_dict", "labels")


def shift_tokens_right(input_ids, pad_token_id: int, decoder_start_token_id: int):
    """Prepend the start token, drop the last token, and replace -100 (ignored labels) by pad."""
    input_ids = tf.convert_to_tensor(input_ids)
    start = tf.fill((tf.shape(input_ids)[0], 1), tf.cast(decoder_start_token_id, input_ids.dtype))
    shifted = tf.concat([start, input_ids[:, :-1]], axis=-1)
    return tf.where(shifted == -100, tf.cast(pad_token_id, input_ids.dtype), shifted)


def masked_lm_loss(labels, logits):
    """Mean cross-entropy over the labels that count (`blenderbot_mb.training.IGNORE_INDEX` is ignored), in
    `training.loss_dtype`."""
    dtype = loss_dtype(logits.dtype.name)
    labels = tf.cast(labels, tf.int32)
    keep = labels != IGNORE_INDEX
    per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(keep, labels, 0), tf.cast(logits, dtype))
    keep = tf.cast(keep, dtype)
    return tf.reduce_sum(per_token * keep) / tf.reduce_sum(keep)  # nan when none counts, as the reference


def activation(name: str):
    tanh_gelu = lambda x: tf.nn.gelu(x, approximate=True)  # noqa: E731
    table = {"gelu": lambda x: tf.nn.gelu(x, approximate=False), "relu": tf.nn.relu, "silu": tf.nn.silu,
             "swish": tf.nn.silu, "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu, "gelu_fast": tanh_gelu,
             "tanh": tf.tanh}
    return table[name]


def _dense(units: int, fan_in: int, name: str, std: float) -> keras.layers.Dense:
    layer = keras.layers.Dense(units, name=name, kernel_initializer=keras.initializers.RandomNormal(stddev=std))
    layer.build((None, fan_in))
    return layer


def _layer_norm(d: int, name: str) -> keras.layers.LayerNormalization:
    layer = keras.layers.LayerNormalization(epsilon=1e-5, name=name)
    layer.build((None, d))
    return layer


def _embedding(n: int, d: int, name: str, std: float) -> keras.layers.Embedding:
    layer = keras.layers.Embedding(n, d, name=name, embeddings_initializer=keras.initializers.RandomNormal(stddev=std))
    layer.build()
    return layer


def write_at(buffer, new, index):
    """Write `new` (b, h, t, d) into the preallocated `buffer` (b, h, L, d) at positions index..index+t-1.

    Done with a 0/1 mask, which is exact and keeps every shape static for XLA.
    """
    length, t = tf.shape(buffer)[2], tf.shape(new)[2]
    place = tf.cast(tf.range(length)[None, :] == (index + tf.range(t))[:, None], buffer.dtype)  # (t, L)
    keep = 1.0 - tf.reduce_sum(place, axis=0)[None, None, :, None]
    return buffer * keep + tf.einsum("bhtd,tl->bhld", new, place)


# ---------------------------------------------------------------------- layers
class TFBlenderbotAttention(keras.layers.Layer):
    """Multi-head attention; k/v/q/out projections with bias, queries scaled by head_dim**-0.5."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, is_decoder: bool = False,
                 init_std: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_decoder = is_decoder
        self.k_proj = _dense(embed_dim, embed_dim, "k_proj", init_std)
        self.v_proj = _dense(embed_dim, embed_dim, "v_proj", init_std)
        self.q_proj = _dense(embed_dim, embed_dim, "q_proj", init_std)
        self.out_proj = _dense(embed_dim, embed_dim, "out_proj", init_std)
        self.dropout = keras.layers.Dropout(dropout)
        self.built = True

    def _heads(self, x):  # (b, t, d) -> (b, heads, t, head_dim)
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, (b, t, self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def call(self, hidden_states, key_value_states=None, past_key_value=None, attention_mask=None,
             cache_index=None, layer_head_mask=None, training=False):
        q = self._heads(self.q_proj(hidden_states) * self.scaling)
        if key_value_states is not None:  # cross-attention: keys/values of the encoder, computed once
            if past_key_value is not None:
                k, v = past_key_value
            else:
                k, v = self._heads(self.k_proj(key_value_states)), self._heads(self.v_proj(key_value_states))
        else:
            k, v = self._heads(self.k_proj(hidden_states)), self._heads(self.v_proj(hidden_states))
            if past_key_value is not None and cache_index is None:
                k, v = tf.concat([past_key_value[0], k], axis=2), tf.concat([past_key_value[1], v], axis=2)
            elif past_key_value is not None:
                k = write_at(past_key_value[0], k, cache_index)
                v = write_at(past_key_value[1], v, cache_index)
        present = (k, v) if self.is_decoder else None
        wide = tf.as_dtype(loss_dtype(q.dtype.name))  # the softmax in float32 at least (float64 kept)
        scores = tf.cast(tf.matmul(q, k, transpose_b=True), wide)
        if attention_mask is not None:  # boolean (b, 1, t, keys); booleans also escape Keras' float16 autocast
            scores = tf.where(attention_mask, scores, wide.min)
        weights = tf.nn.softmax(scores, axis=-1)
        if layer_head_mask is not None:
            weights = tf.reshape(tf.cast(layer_head_mask, weights.dtype), (1, -1, 1, 1)) * weights
        probs = tf.cast(self.dropout(weights, training=training), v.dtype)
        out = tf.transpose(tf.matmul(probs, v), (0, 2, 1, 3))
        out = tf.reshape(out, (tf.shape(out)[0], tf.shape(out)[1], self.embed_dim))
        return self.out_proj(out), weights, present


class TFBlenderbotEncoderLayer(keras.layers.Layer):
    def __init__(self, config: BlenderbotConfig, **kwargs):
        super().__init__(**kwargs)
        d, std = config.d_model, config.init_std
        self.self_attn = TFBlenderbotAttention(d, config.encoder_attention_heads, config.attention_dropout,
                                               init_std=std, name="self_attn")
        self.self_attn_layer_norm = _layer_norm(d, "self_attn_layer_norm")
        self.fc1 = _dense(config.encoder_ffn_dim, d, "fc1", std)
        self.fc2 = _dense(d, config.encoder_ffn_dim, "fc2", std)
        self.final_layer_norm = _layer_norm(d, "final_layer_norm")
        self.dropout = keras.layers.Dropout(config.dropout)
        self.activation_dropout = keras.layers.Dropout(config.activation_dropout)
        self.activation_fn = activation(config.activation_function)
        self.built = True

    def call(self, hidden_states, attention_mask=None, layer_head_mask=None, training=False):
        h, attn, _ = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask,
                                    layer_head_mask=layer_head_mask, training=training)
        hidden_states = hidden_states + self.dropout(h, training=training)
        h = self.activation_dropout(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))),
                                    training=training)
        hidden_states = hidden_states + self.dropout(self.fc2(h), training=training)
        return hidden_states, attn


class TFBlenderbotDecoderLayer(keras.layers.Layer):
    def __init__(self, config: BlenderbotConfig, **kwargs):
        super().__init__(**kwargs)
        d, heads, std = config.d_model, config.decoder_attention_heads, config.init_std
        self.self_attn = TFBlenderbotAttention(d, heads, config.attention_dropout, is_decoder=True, init_std=std,
                                               name="self_attn")
        self.self_attn_layer_norm = _layer_norm(d, "self_attn_layer_norm")
        self.encoder_attn = TFBlenderbotAttention(d, heads, config.attention_dropout, is_decoder=True, init_std=std,
                                                  name="encoder_attn")
        self.encoder_attn_layer_norm = _layer_norm(d, "encoder_attn_layer_norm")
        self.fc1 = _dense(config.decoder_ffn_dim, d, "fc1", std)
        self.fc2 = _dense(d, config.decoder_ffn_dim, "fc2", std)
        self.final_layer_norm = _layer_norm(d, "final_layer_norm")
        self.dropout = keras.layers.Dropout(config.dropout)
        self.activation_dropout = keras.layers.Dropout(config.activation_dropout)
        self.activation_fn = activation(config.activation_function)
        self.built = True

    def call(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
             layer_head_mask=None, cross_attn_layer_head_mask=None, past_key_value=None, cache_index=None,
             training=False):
        self_past = past_key_value[:2] if past_key_value is not None else None
        h, self_w, present = self.self_attn(self.self_attn_layer_norm(hidden_states), past_key_value=self_past,
                                            attention_mask=attention_mask, cache_index=cache_index,
                                            layer_head_mask=layer_head_mask, training=training)
        hidden_states = hidden_states + self.dropout(h, training=training)
        cross_w = None
        if encoder_hidden_states is not None:
            cross_past = past_key_value[2:] if past_key_value is not None and len(past_key_value) == 4 else None
            h, cross_w, cross_present = self.encoder_attn(
                self.encoder_attn_layer_norm(hidden_states), key_value_states=encoder_hidden_states,
                past_key_value=cross_past, attention_mask=encoder_attention_mask,
                layer_head_mask=cross_attn_layer_head_mask, training=training)
            hidden_states = hidden_states + self.dropout(h, training=training)
            present = present + cross_present
        h = self.activation_dropout(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))),
                                    training=training)
        hidden_states = hidden_states + self.dropout(self.fc2(h), training=training)
        return hidden_states, self_w, cross_w, present


def _check_ids(ids, config, what):
    """Clear errors for bad ids: values checked in eager mode, the static shape also while tracing."""
    if ids is not None:
        validation.check_input_ids(ids, config.vocab_size, config.max_position_embeddings, what,
                                   values=tf.executing_eagerly())


class _TFBlenderbotStack(keras.layers.Layer):
    """What the encoder and the decoder share: the shared token embedding (scaled by sqrt(d_model) when
    `scale_embedding`), learned positions, the layers and the final LayerNorm."""

    layer_class: type[keras.layers.Layer]
    num_layers_field: str  # the config field that counts the layers

    def __init__(self, config: BlenderbotConfig, embed_tokens=None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self._embed_tokens = [embed_tokens]  # the model's shared embedding (a tracked list: see set_input_embeddings)
        self.embed_positions = _embedding(config.max_position_embeddings, config.d_model, "embed_positions",
                                          config.init_std)
        self.layers = [self.layer_class(config, name=f"layers.{i}") for i in range(getattr(config,
                                                                                         self.num_layers_field))]
        self.layer_norm = _layer_norm(config.d_model, "layer_norm")
        self.dropout = keras.layers.Dropout(config.dropout)
        self.built = True

    @property
    def embed_tokens(self):
        return self._embed_tokens[0]


class TFBlenderbotEncoder(_TFBlenderbotStack):
    layer_class, num_layers_field = TFBlenderbotEncoderLayer, "encoder_layers"

    def call(self, input_ids=None, inputs_embeds=None, attention_mask=None, head_mask=None, output_attentions=False,
             output_hidden_states=False, return_dict=True, training=False):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds to the encoder")
        if inputs_embeds is None:
            input_ids = tf.convert_to_tensor(input_ids)
            _check_ids(input_ids, self.config, "input_ids")
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        elif inputs_embeds.shape[1] is not None:
            check_sequence_length(int(inputs_embeds.shape[1]), self.config.max_position_embeddings, "inputs_embeds")
        seq_len = tf.shape(inputs_embeds)[1]
        hidden = self.dropout(inputs_embeds + self.embed_positions(tf.range(seq_len)), training=training)
        validation.check_attention_mask(attention_mask, inputs_embeds.shape[:2], values=tf.executing_eagerly())
        mask = None
        if attention_mask is not None:
            mask = tf.cast(attention_mask, tf.bool)[:, None, None, :]
        states, attentions = (), ()
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                states += (hidden,)
            if training and self.config.encoder_layerdrop > 0 and float(tf.random.uniform(())) < \
                    self.config.encoder_layerdrop:
                continue
            hidden, attn = layer(hidden, attention_mask=mask,
                                 layer_head_mask=None if head_mask is None else head_mask[i], training=training)
            attentions += (attn,)
        hidden = self.layer_norm(hidden)
        if output_hidden_states:
            states += (hidden,)
        out = BaseModelOutput(last_hidden_state=hidden, hidden_states=states if output_hidden_states else None,
                              attentions=attentions if output_attentions else None)
        return out if return_dict else out.to_tuple()


class TFBlenderbotDecoder(_TFBlenderbotStack):
    layer_class, num_layers_field = TFBlenderbotDecoderLayer, "decoder_layers"

    def call(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
             encoder_hidden_states=None, encoder_attention_mask=None, head_mask=None, cross_attn_head_mask=None,
             past_key_values=None, cache_index=None, use_cache=None, output_attentions=False,
             output_hidden_states=False, return_dict=True, training=False):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of decoder_input_ids and decoder_inputs_embeds to the decoder")
        if inputs_embeds is None:
            input_ids = tf.convert_to_tensor(input_ids)
            _check_ids(input_ids, self.config, "decoder_input_ids")
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        batch, seq_len = tf.shape(inputs_embeds)[0], tf.shape(inputs_embeds)[1]
        # where this call's tokens start: the cache write index, or the length of a growing cache
        if cache_index is not None:
            start = tf.cast(cache_index, tf.int32)
        elif past_key_values is not None:
            start = tf.shape(past_key_values[0][0])[2]
        else:
            start = 0
        if tf.executing_eagerly() and position_ids is None:
            check_sequence_length(int(start + seq_len), self.config.max_position_embeddings, "decoder_input_ids")
        if tf.executing_eagerly() and cache_index is None:
            validation.check_attention_mask(attention_mask, (int(batch), int(start + seq_len)), "decoder_attention_mask")
        if encoder_hidden_states is not None:
            validation.check_batch_rows(inputs_embeds.shape[0], encoder_hidden_states.shape[0])
            validation.check_attention_mask(encoder_attention_mask, encoder_hidden_states.shape[:2],
                                            "encoder attention_mask", values=tf.executing_eagerly())
        if position_ids is None:
            position_ids = start + tf.range(seq_len)
        hidden = self.dropout(inputs_embeds + self.embed_positions(position_ids), training=training)

        key_len = tf.shape(past_key_values[0][0])[2] if cache_index is not None else start + seq_len
        allowed = tf.range(key_len)[None, :] <= (start + tf.range(seq_len))[:, None]  # causal, (t, keys)
        allowed = tf.broadcast_to(allowed[None, None], (batch, 1, seq_len, key_len))
        if attention_mask is not None:
            allowed &= tf.cast(attention_mask, tf.bool)[:, None, None, :]
        self_mask = allowed
        cross_mask = None
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            cross_mask = tf.cast(encoder_attention_mask, tf.bool)[:, None, None, :]

        states, self_attns, cross_attns, presents = (), (), (), ()
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                states += (hidden,)
            if training and self.config.decoder_layerdrop > 0 and float(tf.random.uniform(())) < \
                    self.config.decoder_layerdrop:
                continue
            hidden, self_w, cross_w, present = layer(
                hidden, attention_mask=self_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=cross_mask, layer_head_mask=None if head_mask is None else head_mask[i],
                cross_attn_layer_head_mask=None if cross_attn_head_mask is None else cross_attn_head_mask[i],
                past_key_value=None if past_key_values is None else past_key_values[i], cache_index=cache_index,
                training=training)
            presents += (present,)
            self_attns += (self_w,)
            cross_attns += (cross_w,)
        hidden = self.layer_norm(hidden)
        if output_hidden_states:
            states += (hidden,)
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden, past_key_values=presents if use_cache else None,
            hidden_states=states if output_hidden_states else None,
            attentions=self_attns if output_attentions else None,
            cross_attentions=cross_attns if output_attentions and encoder_hidden_states is not None else None)
        return out if return_dict else out.to_tuple()


class TFBlenderbotMainLayer(keras.layers.Layer):
    """Shared embedding, encoder and decoder (the reference's `model` scope)."""

    def __init__(self, config: BlenderbotConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.shared = _embedding(config.vocab_size, config.d_model, "shared", config.init_std)
        self.encoder = TFBlenderbotEncoder(config, self.shared, name="encoder")
        self.decoder = TFBlenderbotDecoder(config, self.shared, name="decoder")
        self.built = True

    def set_input_embeddings(self, embedding: keras.layers.Embedding) -> None:
        """Share `embedding` as the encoder's and decoder's token embedding (the old one is dropped)."""
        _replace_layer(self, "shared", embedding)
        for stack in (self.encoder, self.decoder):  # a tracked list: remove() and append() (un)track
            stack._embed_tokens.remove(stack.embed_tokens)
            stack._embed_tokens.append(embedding)

    def call(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
             decoder_position_ids=None, head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None,
             encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
             use_cache=None, output_attentions=False, output_hidden_states=False, training=False, cache_index=None):
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                           attention_mask=attention_mask, head_mask=head_mask,
                                           output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states, training=training)
        else:
            encoder_outputs = as_encoder_outputs(encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids, inputs_embeds=decoder_inputs_embeds, attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids, encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask, head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask, past_key_values=past_key_values, cache_index=cache_index,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            training=training)
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state, past_key_values=decoder_outputs.past_key_values,
            decoder_hidden_states=decoder_outputs.hidden_states, decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions)


# ---------------------------------------------------------------------- weights <-> canonical names
def _replace_layer(owner: keras.layers.Layer, attr: str, layer: keras.layers.Layer) -> None:
    """Set `owner.attr` to `layer`, dropping the old layer from Keras' tracking (its weights leave
    `owner.weights`)."""
    owner._tracker.untrack(getattr(owner, attr))
    setattr(owner, attr, layer)


def _vocab_embedding(like: keras.layers.Embedding, value) -> keras.layers.Embedding:
    """An Embedding holding `value` (vocab, d), with the name and dtype policy of `like`."""
    layer = keras.layers.Embedding(value.shape[0], value.shape[1], name=like.name, dtype=like.dtype_policy)
    layer.build()
    layer.embeddings.assign(tf.cast(value, layer.embeddings.dtype))
    return layer


def _named_leaves(layer, prefix: str):
    """{canonical name: (keras variable, transposed)} below `layer`, following the attribute names."""
    if isinstance(layer, keras.layers.Dense):
        return {f"{prefix}weight": (layer.kernel, True), f"{prefix}bias": (layer.bias, False)}
    if isinstance(layer, keras.layers.LayerNormalization):
        return {f"{prefix}weight": (layer.gamma, False), f"{prefix}bias": (layer.beta, False)}
    if isinstance(layer, keras.layers.Embedding):
        return {f"{prefix}weight": (layer.embeddings, False)}
    out = {}
    for name, value in vars(layer).items():
        if name.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer) and not isinstance(value, keras.layers.Dropout):
            out.update(_named_leaves(value, f"{prefix}{name}."))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, keras.layers.Layer) for v in value):
            for i, v in enumerate(value):
                out.update(_named_leaves(v, f"{prefix}{name}.{i}."))
    return out


def unpack_inputs(call):
    """The reference's calling conventions for a model's `call`, in one place.

    Inputs come as keywords, or all of them as the first argument in a dict or in a list (CALL_ARGS order);
    python lists of ids become tensors; an unknown input name raises InputError; `use_cache`,
    `output_attentions` and `output_hidden_states` left unset take the config's values. `call` then gets
    `input_ids`, `training` and every other input as a keyword.
    """

    @functools.wraps(call)
    def wrapper(self, input_ids=None, *args, training=False, **inputs):
        inputs.update(zip(CALL_ARGS[1:], args, strict=False))
        given = {k: v for k, v in inputs.items() if v is not None}
        if isinstance(input_ids, Mapping):
            inputs = {**input_ids, **given}
            input_ids = inputs.pop("input_ids", None)
        elif isinstance(input_ids, (list, tuple)) and input_ids and not isinstance(input_ids[0], (int, list)):
            inputs = {**dict(zip(CALL_ARGS, input_ids, strict=False)), **given}
            input_ids = inputs.pop("input_ids", None)
        unknown = set(inputs) - set(CALL_ARGS) - {"cache_index"}
        if unknown:
            raise InputError(f"unexpected model input(s): {', '.join(sorted(unknown))}; known: {', '.join(CALL_ARGS)}")
        # python lists of ids -> tensors, read by the core first: rows of different lengths or values that are
        # not numbers are the InputError every backend gives
        if isinstance(input_ids, (list, tuple)):
            input_ids = tf.convert_to_tensor(validation.host_array(input_ids, "input_ids"))
        for key in ("attention_mask", "decoder_input_ids", "decoder_attention_mask", "decoder_position_ids", "labels"):
            if isinstance(inputs.get(key), (list, tuple)):
                inputs[key] = tf.convert_to_tensor(validation.host_array(inputs[key], key))
        config = self.config
        inputs["use_cache"] = config.use_cache if inputs.get("use_cache") is None else inputs["use_cache"]
        inputs["output_attentions"] = bool(inputs.get("output_attentions") or config.output_attentions)
        inputs["output_hidden_states"] = bool(inputs.get("output_hidden_states") or config.output_hidden_states)
        return call(self, input_ids, training=training, **inputs)

    # Keras binds a call's arguments by its signature: one parameter per input (unknown names are caught
    # above, with a clear error, rather than by Keras)
    P = inspect.Parameter
    wrapper.__signature__ = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(name, P.POSITIONAL_OR_KEYWORD, default=None) for name in CALL_ARGS]
        + [P("training", P.KEYWORD_ONLY, default=False), P("cache_index", P.KEYWORD_ONLY, default=None),
           P("unexpected", P.VAR_KEYWORD)])
    return wrapper


class TFBlenderbotPreTrainedModel(keras.Model, TFGenerationMixin):
    """Loading, saving and the Keras training hooks common to the Blenderbot models."""

    config_class = BlenderbotConfig
    base_model_prefix = "model"
    architecture = "BlenderbotModel"
    main_input_name = "input_ids"

    def __init__(self, config: BlenderbotConfig, **kwargs):
        config = as_config(config)
        super().__init__(**kwargs)
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)

    generation_config = GenerationConfigAttribute()  # a transformers GenerationConfig assigned here is converted

    # every subclass holds the encoder-decoder as `self.model` (a TFBlenderbotMainLayer)
    def get_encoder(self):
        return self.model.encoder

    def get_decoder(self):
        return self.model.decoder

    def get_input_embeddings(self):
        return self.model.shared

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> keras.layers.Embedding:
        """Give the vocabulary `new_num_tokens` entries (rounded up to `pad_to_multiple_of`); returns the
        input embedding. The shared embedding, an untied `lm_head`, `final_logits_bias` and
        `config.vocab_size` change together; the rule for new rows is `blenderbot_mb.vocab_resize`'s."""
        size = resized_vocab_size(self.config, new_num_tokens, pad_to_multiple_of)
        if size == self.config.vocab_size:
            return self.get_input_embeddings()
        named = self.named_weights()
        for name in vocab_tensor_names(self.config, self.architecture):
            value = resize_vocab_tensor(name, keras.ops.convert_to_numpy(named[name][0]), size,
                                        self.config.init_std, mean_resizing)
            if name == "final_logits_bias":
                dtype = self.final_logits_bias.dtype
                del self.final_logits_bias  # Keras untracks a deleted variable
                self.final_logits_bias = self.add_weight(name="final_logits_bias", shape=value.shape,
                                                         initializer="zeros", trainable=False, dtype=dtype)
                self.final_logits_bias.assign(tf.cast(value, dtype))
            elif name == "lm_head.weight":
                _replace_layer(self, "lm_head", _vocab_embedding(self.lm_head, value))
            else:
                self.model.set_input_embeddings(_vocab_embedding(self.model.shared, value))
        self.config.vocab_size = size  # in place: every layer holds this config
        return self.get_input_embeddings()

    def __call__(self, *args, **kwargs):
        # tokenizer outputs (dict subclasses) as the first argument, as the reference's examples pass them
        if args and isinstance(args[0], Mapping):
            args = (self._read_host_inputs(dict(args[0])), *args[1:])
        elif args and (isinstance(args[0], np.ndarray) or isinstance(args[0], (list, tuple)) and args[0] and
                       isinstance(args[0][0], (int, np.integer, float, list, tuple))):  # ids, not a list of inputs
            args = (self._read_host_inputs({"input_ids": args[0]})["input_ids"], *args[1:])
        return super().__call__(*args, **self._read_host_inputs(kwargs))

    def _read_host_inputs(self, inputs: dict) -> dict:
        """Ids, masks and labels given as nested lists or NumPy arrays, read by the core before Keras takes them
        (Keras casts float64 to float32, and refuses lists as positional arguments): rows of different lengths,
        values that are not numbers and float ids are the InputErrors every backend gives."""
        out = dict(inputs)
        for name in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"):
            value = inputs.get(name)
            if not isinstance(value, (list, tuple, np.ndarray)):
                continue
            value = out[name] = validation.host_array(value, name)
            if name == "labels" and value.dtype.kind not in "iu":
                validation.check_labels(value, None, self.config.vocab_size)
            elif name.endswith("input_ids") and value.dtype.kind not in "iu":
                validation.check_input_ids(value, self.config.vocab_size, self.config.max_position_embeddings, name)
        return out

    # ------------------------------------------------------------------ weights by canonical name
    def named_weights(self) -> dict[str, tuple]:
        """{Hugging Face PyTorch name: (keras variable, stored transposed)} for every canonical tensor."""
        raise NotImplementedError

    def load_weights_dict(self, tensors: Mapping) -> None:
        """Assign tensors in canonical names and PyTorch layout (as `checkpoint.read_weights` returns them)."""
        named = self.named_weights()
        missing = sorted(set(named) - set(tensors))
        if missing:
            from ..errors import CheckpointError

            raise CheckpointError(f"missing tensors: {', '.join(missing)}")
        for name, (variable, transposed) in named.items():
            value = tf.convert_to_tensor(tensors[name])
            if transposed:
                value = tf.transpose(value)
            variable.assign(tf.cast(value, variable.dtype))

    def state_dict(self) -> dict:
        """{canonical name: numpy array in PyTorch layout} (the tensors `save_pretrained` writes)."""
        out = {}
        for name, (variable, transposed) in self.named_weights().items():
            value = keras.ops.convert_to_numpy(variable)
            out[name] = value.T.copy() if transposed else value
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, config: BlenderbotConfig | None = None,
                        allow_pickle: bool = False, dtype=None, **kwargs):
        """A local folder or hub id: safetensors (any backend's), sharded safetensors or HF's tf_model.h5.

        `dtype`: a Keras dtype policy name ("float32", "bfloat16", "mixed_bfloat16", "mixed_float16") the
        model is built under, without changing the global policy; None builds under the global one.
        Other keyword arguments are hub options, config fields or generation settings, as in the
        reference; unsupported transformers options raise ConfigError naming the argument.
        """
        policy = _float_policy(dtype)
        config, weights, generation_config = load_pretrained(pretrained_model_name_or_path, cls.architecture,
                                                             "tf", config, allow_pickle, **kwargs)
        model = cls._built_under(policy, config)
        model.load_weights_dict(weights)
        model.generation_config = generation_config
        return model

    @classmethod
    def _built_under(cls, policy, config: BlenderbotConfig, **kwargs):
        """The model's layers made under a Keras dtype policy, the global one left as it was."""
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            return cls(config, **kwargs)
        finally:
            keras.config.set_dtype_policy(previous)

    # ------------------------------------------------------------------ Keras saving (model.save("x.keras"))
    def get_config(self) -> dict:
        """What `model.save("x.keras")` stores to rebuild the model: its BlenderbotConfig, name and dtype policy
        (the weights are stored beside it by Keras; `save_pretrained` writes the Hugging Face layout)."""
        return {"config": self.config.to_dict(), "generation_config": self.generation_config.to_diff_dict(),
                "name": self.name, "trainable": self.trainable, "dtype": self.dtype_policy.name}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        model_config = BlenderbotConfig.from_dict(config.pop("config"))
        generation = config.pop("generation_config", None)
        policy = keras.DTypePolicy(config.pop("dtype", None) or keras.config.dtype_policy().name)
        model = cls._built_under(policy, model_config, **config)
        if generation is not None:
            model.generation_config = GenerationConfig.from_dict(generation)
        return model

    def save_pretrained(self, save_directory, max_shard_size="5GB", safe_serialization: bool = True) -> None:
        """config.json, generation_config.json and model.safetensors (HF layout, loads in every backend);
        with `safe_serialization=False`, Hugging Face's TF `tf_model.h5` instead of safetensors."""
        save_checkpoint(os.fspath(save_directory), self.config, self.state_dict(), framework="numpy",
                        generation_config=self.generation_config, max_shard_size=max_shard_size,
                        architecture=self.architecture, weights_format="safetensors" if safe_serialization else "tf")

    # ------------------------------------------------------------------ Keras training hooks
    # As the reference's: compiled without a loss, the model's own masked LM loss (labels -100 ignored), the
    # labels given as `y` or as x["labels"]; compiled with a Keras loss (and any metrics), `y` is matched to
    # the model's first output that is not the loss (the logits; the bare model's last hidden state).
    @staticmethod
    def _keras_output(y_pred):
        if isinstance(y_pred, Mapping):
            return next(v for k, v in y_pred.items() if k != "loss" and v is not None)
        return y_pred

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self._compile_loss is None and isinstance(y_pred, Mapping) and "loss" in y_pred:
            if sample_weight is not None:
                raise InputError("sample_weight (or class_weight) needs a Keras loss: compile(loss=keras.losses."
                                 "SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)); the model's "
                                 "own loss is the mean over label tokens (give a token the label -100 to skip it)")
            loss = y_pred["loss"]
            if self.losses:
                loss = loss + tf.add_n([tf.cast(term, loss.dtype) for term in self.losses])
            # Keras sums the replicas' losses (and gradients) under a tf.distribute strategy: each replica's
            # share, as Keras' own losses give it (the loss it reports is then the replicas' mean)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            return loss if replicas == 1 else loss * tf.cast(1.0 / replicas, loss.dtype)
        return super().compute_loss(x=x, y=y, y_pred=self._keras_output(y_pred), sample_weight=sample_weight,
                                    training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is None and isinstance(x, Mapping) and "labels" in x:  # the labels given inside x
            y = x["labels"]
        return super().compute_metrics(x, y, self._keras_output(y_pred), sample_weight=sample_weight)

    def _with_labels(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if not isinstance(x, Mapping):
            return x, y, sample_weight
        if y is None and not any(k in x for k in ("labels", "decoder_input_ids", "decoder_inputs_embeds")):
            raise InputError("fit() and evaluate() need the replies' labels: give them in x['labels'] or as y "
                             "(the decoder's input is shifted from them)")
        if self._compile_loss is None:
            if y is not None and "labels" not in x:
                x = {**x, "labels": y}
            return x, y, sample_weight
        if y is None and "labels" in x:  # a Keras loss reads the labels as y
            x = dict(x)
            y = x.pop("labels")
        if y is not None and "decoder_input_ids" not in x and "decoder_inputs_embeds" not in x:
            x = {**x, "decoder_input_ids": shift_tokens_right(y, self.config.pad_token_id,
                                                              self.config.decoder_start_token_id)}
        return x, y, sample_weight

    def _symbolic_build(self, iterator=None, data_batch=None):
        """Under a tf.distribute strategy Keras builds the compiled loss, metrics and optimizer from the first
        batch averaged over the replicas, which turns token ids into floats: they go back to integers (only
        their shapes and types are read there), or the model would refuse them; the labels then reach the
        model as in train_step."""
        if data_batch is not None:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data_batch)

            def ids(value):
                return tf.cast(value, tf.int32) if tf.is_tensor(value) and value.dtype.is_floating else value

            x = ({k: v if k.endswith("_embeds") else ids(v) for k, v in x.items()} if isinstance(x, Mapping)
                 else ids(x))
            data_batch = self._with_labels((x, ids(y) if y is not None else None, sample_weight))
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data):
        return super().train_step(self._with_labels(data))

    def test_step(self, data):
        return super().test_step(self._with_labels(data))

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, Mapping) and not any(k in x for k in ("labels", "decoder_input_ids", "decoder_inputs_embeds")):
            raise InputError("predict() scores given replies: give x['decoder_input_ids'] (or x['labels'], shifted "
                             "into them); generate() writes new replies")
        out = self(x, training=False)
        return {k: out[k] for k in ("logits", "last_hidden_state", "encoder_last_hidden_state") if k in out}


def _float_policy(dtype) -> keras.DTypePolicy:
    """`from_pretrained(dtype=)` as a Keras dtype policy of floats: a policy, its name, or a dtype (tf.float16,
    np.float16, "bfloat16"); None is the global policy. ConfigError for anything else."""
    if dtype is None:
        return keras.config.dtype_policy()
    if isinstance(dtype, keras.DTypePolicy):
        policy = dtype
    else:
        name = dtype if isinstance(dtype, str) else getattr(dtype, "name", None)
        if name is None:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = repr(dtype)
        try:
            policy = keras.DTypePolicy(name)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"dtype={dtype!r} is not a Keras dtype policy: {e}") from None
    if not all("float" in d for d in (policy.compute_dtype, policy.variable_dtype)):
        raise ConfigError(f"dtype={dtype!r} must be floating (a Keras dtype policy such as 'float32', 'bfloat16', "
                          "'mixed_bfloat16', 'mixed_float16')")
    return policy


@keras.saving.register_keras_serializable(package="blenderbot_mb")
class TFBlenderbotModel(TFBlenderbotPreTrainedModel):
    """The bare encoder-decoder, returning the decoder's last hidden state."""

    architecture = "BlenderbotModel"

    def __init__(self, config: BlenderbotConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.model = TFBlenderbotMainLayer(config, name="model")
        self.built = True

    def named_weights(self):
        return _named_leaves(self.model, "")

    @unpack_inputs
    def call(self, input_ids=None, decoder_input_ids=None, decoder_inputs_embeds=None, return_dict=None,
             training=False, **inputs):
        """The decoder's last hidden state. Inputs: the names in CALL_ARGS (see `unpack_inputs`)."""
        inputs.pop("labels", None)
        if decoder_input_ids is None and decoder_inputs_embeds is None and input_ids is not None:
            # the reference's documented `model(inputs)` passes no decoder input: decode the start token
            batch = tf.shape(tf.convert_to_tensor(input_ids))[0]
            decoder_input_ids = tf.fill((batch, 1), self.config.decoder_start_token_id)
        out = self.model(input_ids, decoder_input_ids=decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds,
                         training=training, **inputs)
        return out if return_dict is not False else out.to_tuple()


@keras.saving.register_keras_serializable(package="blenderbot_mb")
class TFBlenderbotForConditionalGeneration(TFBlenderbotPreTrainedModel):
    """Encoder-decoder with the tied LM head and `final_logits_bias`; `generate()` and `fit()` ready."""

    architecture = "BlenderbotForConditionalGeneration"

    def __init__(self, config: BlenderbotConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.model = TFBlenderbotMainLayer(config, name="model")
        self.final_logits_bias = self.add_weight(name="final_logits_bias", shape=(1, config.vocab_size),
                                                 initializer="zeros", trainable=False)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = _embedding(config.vocab_size, config.d_model, "lm_head", config.init_std)
        self.built = True

    def get_output_embeddings(self):
        return self.lm_head if self.lm_head is not None else self.model.shared

    def named_weights(self):
        out = _named_leaves(self.model, "model.")
        out["final_logits_bias"] = (self.final_logits_bias, False)
        if self.lm_head is not None:
            out["lm_head.weight"] = (self.lm_head.embeddings, False)
        return out

    def lm_logits(self, hidden):
        """hidden (b, t, d) -> logits (b, t, vocab): the (tied) embedding matrix plus final_logits_bias."""
        table = tf.cast(self.get_output_embeddings().embeddings, hidden.dtype)
        logits = tf.matmul(hidden, table, transpose_b=True)
        return logits + tf.cast(self.final_logits_bias, logits.dtype)

    @unpack_inputs
    def call(self, input_ids=None, decoder_input_ids=None, decoder_inputs_embeds=None, labels=None,
             return_dict=None, training=False, **inputs):
        """Logits (and the loss, given `labels`). Inputs: the names in CALL_ARGS (see `unpack_inputs`)."""
        if labels is not None:
            labels = tf.convert_to_tensor(labels)
            given = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
            validation.check_labels(labels, None if given is None else given.shape[:2], self.config.vocab_size,
                                    tf.executing_eagerly(), max_positions=self.config.max_position_embeddings)
            inputs["use_cache"] = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                       self.config.decoder_start_token_id)
        out = self.model(input_ids, decoder_input_ids=decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds,
                         training=training, **inputs)
        logits = self.lm_logits(out.last_hidden_state)
        loss = None if labels is None else masked_lm_loss(labels, logits)
        result = Seq2SeqLMOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values,
            decoder_hidden_states=out.decoder_hidden_states, decoder_attentions=out.decoder_attentions,
            cross_attentions=out.cross_attentions, encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_hidden_states=out.encoder_hidden_states, encoder_attentions=out.encoder_attentions)
        return result if return_dict is not False else result.to_tuple()


__all__ = ["TFBlenderbotAttention", "TFBlenderbotEncoderLayer", "TFBlenderbotDecoderLayer", "TFBlenderbotEncoder",
           "TFBlenderbotDecoder", "TFBlenderbotMainLayer", "TFBlenderbotPreTrainedModel", "TFBlenderbotModel",
           "TFBlenderbotForConditionalGeneration", "shift_tokens_right", "masked_lm_loss"]

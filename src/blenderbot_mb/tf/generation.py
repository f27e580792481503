"""`generate()` for the TensorFlow backend: the core's search (`blenderbot_mb.search`) over TensorFlow arrays.

What lives here is only what is TensorFlow: `TFOps` (the core's array operations), the decoder step on a
self-attention cache preallocated to `max_length` and written at the step's index, and the loop driver,
`tf.while_loop` over fixed shapes. So `tf.function(model.generate, jit_compile=True)` compiles the whole
search, n-gram blocking included. In eager mode the result is trimmed to the generated length like the
reference; inside `tf.function` it keeps the static `max_length` width, padded.

Host hooks (streamer, stopping criteria, stop strings, max_time, per-step scores) run in eager `generate()`,
where `tf.while_loop` is a Python loop; inside `tf.function` they raise ConfigError naming them. A caller's
`logits_processor=` functions, written with TF ops, compile into the loop (under XLA too).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from ..scoring import transition_scores
from ..search import (
    build_processors,
    check_inputs,
    check_rows_attend,
    decode,
    decoder_prompt,
    encoder_ngrams,
    generate_inputs,
    generate_output,
    infer_attention_mask,
    prepare,
    record_layers,
    refuse_host_hooks,
    stream_ids,
)
from ..search_ops import ArrayOps

_DTYPES = {"int32": tf.int32, "float32": tf.float32, "bool": tf.bool}


class TFOps(ArrayOps):
    """The core's array operations in TensorFlow; the random state is a stateless seed pair per row."""

    eager = False
    processor_arguments = ("input_ids", "scores", "cur_len")

    def constant(self, value, dtype):
        return tf.constant(value, _DTYPES[dtype])

    def full(self, shape, value, dtype):
        return tf.fill(shape, tf.constant(value, _DTYPES[dtype]))

    def arange(self, n):
        return tf.range(n)

    def seed_words(self, seed):
        seed = tf.cast(seed, tf.int64)
        return tf.stack([[tf.cast(tf.bitwise.bitwise_and(tf.bitwise.right_shift(seed, tf.constant(shift, tf.int64)),
                                                         tf.constant(0xFFFF, tf.int64)), tf.int32)
                          for shift in (48, 32, 16, 0)]])

    def cast(self, x, dtype):
        return tf.cast(x, _DTYPES[dtype])

    def to_host(self, x):
        return np.asarray(x)

    def size(self, x, axis):
        return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]

    def where(self, cond, x, y):
        return tf.where(cond, x, y)

    def masked_fill(self, x, mask, value):
        return tf.where(mask, tf.cast(value, x.dtype), x)

    def fill_columns(self, x, ids, value):
        return tf.where(tf.constant(np.isin(np.arange(x.shape[-1]), ids))[None, :], tf.cast(value, x.dtype), x)

    def select(self, pred, if_true, if_false):
        if isinstance(pred, bool):
            return if_true() if pred else if_false()
        return tf.where(pred, if_true(), if_false())

    def any(self, x, axis=None, keepdims=False):
        return tf.reduce_any(x, axis=axis, keepdims=keepdims)

    def all(self, x, axis=None, keepdims=False):
        return tf.reduce_all(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def min(self, x, axis=None, keepdims=False):
        return tf.reduce_min(x, axis=axis, keepdims=keepdims)

    def argmax(self, x):
        return tf.argmax(x, axis=-1, output_type=tf.int32)

    def top_k(self, x, k):
        return tf.math.top_k(x, k)

    def sort(self, x):
        index = tf.argsort(x, axis=-1, stable=True)
        return tf.gather(x, index, batch_dims=1), index

    def take_along(self, x, index, axis):
        if axis not in (-1, len(x.shape) - 1):
            raise ValueError("TFOps.take_along gathers along the last axis")
        return tf.gather(x, index, batch_dims=len(x.shape) - 1)

    def gather_beams(self, x, index):
        return tf.gather(x, index, batch_dims=1)


    def column(self, x, index):
        return tf.gather(x, index, axis=len(x.shape) - 1)

    def set_column(self, x, index, values):
        return tf.where(tf.range(x.shape[-1]) == index, values[..., None], x)

    def slice_columns(self, x, start, size):
        start = tf.clip_by_value(start, 0, x.shape[1] - size)
        return tf.gather(x, start + tf.range(size), axis=1)

    def mark(self, ids, valid, size):
        rows = tf.shape(ids)[0]
        flat = tf.reshape(tf.where(valid, ids, size) + tf.range(rows)[:, None] * (size + 1), [-1])
        hits = tf.math.unsorted_segment_max(tf.ones_like(flat), flat, rows * (size + 1))
        return tf.reshape(hits > 0, (-1, size + 1))[:, :size]

    def count(self, ids, valid, size):
        rows = tf.shape(ids)[0]
        flat = tf.reshape(tf.where(valid, ids, size) + tf.range(rows)[:, None] * (size + 1), [-1])
        counts = tf.math.unsorted_segment_sum(tf.ones(tf.shape(flat), tf.float32), flat, rows * (size + 1))
        return tf.reshape(counts, (-1, size + 1))[:, :size]

    def reshape(self, x, shape):
        return tf.reshape(x, shape)

    def concat(self, xs, axis):
        return tf.concat(xs, axis)

    def repeat(self, x, count, axis):
        return tf.repeat(x, count, axis=axis)

    def log_softmax(self, x):
        return tf.nn.log_softmax(x, axis=-1)

    def softmax(self, x):
        return tf.nn.softmax(x, axis=-1)

    def cumsum(self, x):
        return tf.cumsum(x, axis=-1)

    def sum(self, x, axis=None, keepdims=False):
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def exp(self, x):
        return tf.exp(x)

    def log(self, x):
        return tf.math.log(x)

    def streams(self, ids, base=None):
        """Per row a stateless seed pair, and the step counter: the 64-bit input seed as two 32-bit halves, each
        mixed with the row's place or index (murmur3's finalizer). Each value of a pair stays within 32 bits:
        XLA's stateless generators read only the low 32 bits of each (inside `tf.function(jit_compile=True)`,
        values packed above them gave every row the same stream)."""
        w = tf.cast(ids, tf.int64)
        sixteen, low = tf.constant(16, tf.int64), tf.constant(0xFFFFFFFF, tf.int64)

        def mix(h):  # a 32-bit hash; int64 products wrap, their low 32 bits are exact
            for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
                h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(shift, tf.int64)))
                if factor is not None:
                    h = tf.bitwise.bitwise_and(h * tf.constant(factor, tf.int64), low)
            return h

        high = tf.bitwise.bitwise_or(tf.bitwise.left_shift(w[:, 0], sixteen), w[:, 1])
        lower = tf.bitwise.bitwise_or(tf.bitwise.left_shift(w[:, 2], sixteen), w[:, 3])
        first = mix(tf.bitwise.bitwise_xor(high, mix(w[:, 4] + 0x9E3779B9)))
        second = mix(tf.bitwise.bitwise_xor(lower, mix(w[:, 5] + 0x7F4A7C15)))
        return tf.stack([first, second], axis=1), tf.constant(0, tf.int32)

    def uniform(self, key, shape):
        pairs, count = key
        u = tf.map_fn(lambda pair: tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(
            pair, count)), pairs, fn_output_signature=tf.float32)
        return u, (pairs, count + 1)

    def while_loop(self, cond, body, state, max_steps, lazy=False):
        state = tf.nest.map_structure(tf.convert_to_tensor, state)
        shapes = tf.nest.map_structure(lambda t: t.shape, state)

        def keep_shapes(*st):  # gathers can lose static dims (batch 1 under tf.function); restore them
            return tf.nest.map_structure(tf.ensure_shape, body(st), shapes)

        return tf.while_loop(lambda *st: cond(st), keep_shapes, state, maximum_iterations=max_steps)

    def host_call(self, fn, args, result_rows=None):  # eager generate() only (refuse_host_hooks)
        result = fn(*(np.asarray(a) for a in args))
        return None if result_rows is None else tf.constant(result, tf.bool)

    def call_processor(self, fn, tokens, cur_len, scores):
        return fn(tokens, scores, cur_len)  # transformers' TF processor convention


class TFGenerationMixin:
    """`generate()` for the Keras encoder-decoder models (needs `model.model.encoder/decoder` and `lm_logits`)."""

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False):
        """transformers' `compute_transition_scores`: each generated token's score, [rows, generated] (0 after
        a beam hypothesis' end), from generate()'s `sequences`, `scores` (or its `logits` with
        `normalize_logits=True`) and, for beam search, `beam_indices` (`blenderbot_mb.scoring.transition_scores`)."""
        return tf.constant(transition_scores(sequences, scores, beam_indices, normalize_logits))

    # plain Python around an explicit tf.while_loop: autograph has nothing to convert, and without it our errors
    # leave tf.function as they are (autograph re-raises them as StagingError)
    @tf.autograph.experimental.do_not_convert
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """Reply ids for `input_ids` (batch, src_len): greedy, sampling or beam search by the settings.

        Settings are those of `self.generation_config` (the checkpoint's), overridden by `generation_config` and
        keyword arguments (num_beams, max_length, max_new_tokens, min_length, no_repeat_ngram_size, ...).
        `seed=` (an int, or one per input) makes sampling reproducible (else a random seed), each sampled reply
        from its own stream. Hooks (eager only): `streamer=`,
        `stopping_criteria=`, `stop_strings=` (with `tokenizer=`), `max_time=`; `logits_processor=` takes
        functions `(input_ids [N, max_length], scores, cur_len) -> scores` that compile with the loop.
        Returns (batch * num_return_sequences, length) int32 ids, or a GenerateOutput with
        `return_dict_in_generate=True`.
        """
        if isinstance(input_ids, Mapping):
            kwargs = {**{k: v for k, v in input_ids.items() if k not in ("input_ids", "attention_mask")}, **kwargs}
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        input_ids = generate_inputs(input_ids, kwargs)
        eager = tf.executing_eagerly()
        check_inputs(input_ids, attention_mask, self.config, "input_ids", values=eager)
        prompt = kwargs.pop("decoder_input_ids", None)
        if prompt is not None:
            check_inputs(prompt, None, self.config, "decoder_input_ids", values=eager)
            if eager:  # (in a tf.function the prompt is taken as it is)
                prompt = decoder_prompt(generation_config or self.generation_config, self.config, kwargs,
                                        np.asarray(prompt), int(tf.shape(input_ids)[0]))[0]
        request = prepare(generation_config or self.generation_config, self.config, kwargs,
                          prompt_length=1 if prompt is None else int(prompt.shape[1]))
        if not eager:
            refuse_host_hooks(request, "tf.function")
        gen, spec, ops = request.gen, request.spec, TFOps()
        input_ids = tf.cast(tf.convert_to_tensor(input_ids), tf.int32)
        if attention_mask is None:
            attention_mask = infer_attention_mask(ops, input_ids, gen)
        attention_mask = tf.cast(tf.convert_to_tensor(attention_mask), tf.int32)
        if eager:
            check_rows_attend(attention_mask.numpy())
        seed = request.seed if request.seed is not None else random.randrange(2**64)
        batch = ops.size(input_ids, 0)
        ids = stream_ids(ops, spec, seed, batch)  # [rows, 6]; None: not sampling (then no rows: no None in the loop)
        if prompt is None:
            prompt = tf.fill((batch, 1), gen.decoder_start_token_id)
        prompt = tf.cast(prompt, tf.int32)

        encoder = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                     output_attentions=spec.output_attentions,
                                     output_hidden_states=spec.output_hidden_states)
        if spec.layer_outputs:  # output_attentions / output_hidden_states (eager only: hooks)
            request.hooks.encoder_width = int(input_ids.shape[1])
            request.hooks.record_encoder(encoder.attentions, encoder.hidden_states)
        encoder_hidden = tf.repeat(encoder.last_hidden_state, spec.copies, axis=0)
        encoder_mask = tf.repeat(attention_mask, spec.copies, axis=0)
        processors = build_processors(ops, spec.plan, encoder_ngrams(ops, spec.plan, input_ids, spec.copies))

        decoder_step = self._graph_step if eager else self._step  # inside a caller's tf.function: traced there

        def step(tokens, index, cache):
            if spec.layer_outputs:
                logits, cache, attentions, cross, hidden = self._graph_step(
                    tokens, index, cache, encoder_hidden, encoder_mask, spec.output_attentions,
                    spec.output_hidden_states)
                record_layers(ops, spec, request.hooks, index, attentions, cross, hidden)
                return logits, cache
            return decoder_step(tokens, index, cache, encoder_hidden, encoder_mask)

        sequences, length, scores, beams = decode(ops, request, step=step,
                                           cache=self._init_generation_cache(encoder_hidden, spec.max_length),
                                           prompt=prompt, processors=processors,
                                           key=ops.streams(tf.zeros((0, 6), tf.int32) if ids is None else ids),
                                           reorder=_reorder)
        if eager:
            sequences = sequences[:, : int(length)]
        if not gen.return_dict_in_generate:
            return sequences
        return generate_output(request, sequences, length, scores, beams, trim=eager)

    # ------------------------------------------------------------------ one decoder step on the fixed cache
    def _init_generation_cache(self, encoder_hidden, max_length):
        """Per decoder layer: self-k, self-v (zeros, max_length long) and the cross-attention k, v."""
        cache = []
        n = tf.shape(encoder_hidden)[0]
        for layer in self.model.decoder.layers:
            attn = layer.encoder_attn
            empty = tf.zeros((n, attn.num_heads, max_length, attn.head_dim), encoder_hidden.dtype)
            cross_k = attn._heads(attn.k_proj(encoder_hidden))
            cross_v = attn._heads(attn.v_proj(encoder_hidden))
            cache.append((empty, empty, cross_k, cross_v))
        return tuple(cache)

    @tf.function(reduce_retracing=True)
    def _graph_step(self, tokens, index, cache, encoder_hidden, encoder_mask, attentions=False, hidden_states=False):
        """`_step` as a graph, for eager generate(): the search around it stays eager (host hooks run there),
        the decoder step runs as one traced function instead of op by op through the Keras layers (the
        default model in `chat`: 3.3 s a reply eager, 0.7 s from the third call; a call with new shapes traces
        again until the shapes generalize); with `attentions` / `hidden_states`, the decoder's layer outputs too."""
        return self._step(tokens, index, cache, encoder_hidden, encoder_mask, attentions, hidden_states)

    def _step(self, tokens, index, cache, encoder_hidden, encoder_mask, attentions=False, hidden_states=False):
        """Logits (N, V) float32 for the next token after `tokens` (N,) at position `index`; the new cache (and,
        with `attentions` / `hidden_states`, the decoder's per-layer self- and cross-attentions and hidden
        states)."""
        decoder = self.model.decoder
        embeds = decoder.embed_tokens(tokens[:, None]) * decoder.embed_scale
        out = decoder(inputs_embeds=embeds, position_ids=index + tf.range(1), encoder_hidden_states=encoder_hidden,
                      encoder_attention_mask=encoder_mask, past_key_values=cache, cache_index=index, use_cache=True,
                      output_attentions=attentions, output_hidden_states=hidden_states)
        logits = tf.cast(self.lm_logits(out.last_hidden_state)[:, -1, :], tf.float32)
        if not (attentions or hidden_states):
            return logits, out.past_key_values
        return (logits, out.past_key_values, tuple(out.attentions or ()), tuple(out.cross_attentions or ()),
                tuple(out.hidden_states or ()))




def _reorder(cache, rows):
    """Beam search: every row takes the self-attention keys/values of row `rows[i]`."""
    return tuple((tf.gather(k, rows), tf.gather(v, rows), ck, cv) for k, v, ck, cv in cache)
